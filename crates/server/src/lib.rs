//! The server: parses etcd's flags, opens the storage engine, starts the raft node and serves
//! etcd's gRPC API ([`main`]). The `metastore` binary (the workspace's root package) is a call to
//! it. Thin by design: the other crates do the work.
//!
//! [`serve`] puts the member together from its parts: `context` builds the member (data
//! directory, engine, raft node, peer network, the shared `ServerContext`), `peers` and
//! `clients` serve the two ports, `leader_duties` runs what the member does on its own, and
//! `shutdown` waits for the end and stops everything in order.

mod auto_compaction;
mod boot;
mod clients;
mod config;
mod config_sources;
mod context;
mod gateway;
mod http;
mod leader_duties;
mod logging;
mod metrics;
mod peers;
mod shutdown;
mod snapshot_cmd;
mod tls;
mod urls;

use std::time::Duration;

use anyhow::Result;

/// mimalloc asks the kernel for transparent huge pages on its arenas (`madvise(MADV_HUGEPAGE)`).
/// Then every fresh or purged-and-reused 4 KiB of heap costs a 2 MiB page to fault in and clear:
/// on a loaded 3-member cluster that was about 5% of each member's CPU in `clear_page`, and
/// resident memory grew in 2 MiB steps (25–30% more RSS per member). Turned off for this process
/// only; the system setting is not touched.
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes no memory we own.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        // Old kernels lack it; nothing depends on it but memory use.
        eprintln!(
            "metastore: cannot disable transparent huge pages: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Crash points for the crash-recovery tests (built with the `failpoints` feature only):
/// `FAILPOINTS="raft::wal::after_fsync=3*off->panic"` arms them (the `fail` crate's syntax), and
/// any panic then aborts the whole process, as a crash would, whichever thread it is on.
#[cfg(feature = "failpoints")]
fn arm_failpoints() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    // Configured for the life of the process.
    std::mem::forget(fail::FailScenario::setup());
}

/// Runs `metastore` with the process's command line: a member (etcd's flags), or
/// `metastore snapshot …`.
pub fn main() -> Result<()> {
    #[cfg(feature = "failpoints")]
    arm_failpoints();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    // Responses finished together leave in one HTTP/2 write (see .cargo/config.toml).
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    runtime.build()?.block_on(serve())
}

/// Runs the member until a signal or its removal stops it (or the `snapshot` subcommand).
async fn serve() -> Result<()> {
    disable_transparent_huge_pages();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("snapshot") {
        return snapshot_cmd::run(&args[2..]);
    }
    let loaded = config_sources::load(std::env::args_os(), std::env::vars_os())?;
    let cfg = loaded.config;
    if cfg.version {
        print!("{}", config::version_text());
        return Ok(());
    }
    logging::init(&cfg)?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    cfg.check_urls()?;
    let auto_compaction = auto_compaction::Policy::from_flags(
        &cfg.auto_compaction_mode,
        &cfg.auto_compaction_retention,
    )?;
    // Before anything talks to peers (joining asks the running members).
    let tls_options = tls::Options::from_config(&cfg)?;
    let client_tls = tls::client_side(&cfg, &tls_options)?;
    let peer_tls = tls::peer_side(&cfg, &tls_options)?;

    // Before the member starts: every crate's metric handles must reach this recorder.
    metrics::install()?;
    let member_dir = context::member_dir(&cfg)?;
    let identity = boot::identify(&cfg, &member_dir, peer_tls.client.as_ref()).await?;
    // Both ports are bound before the raft node starts, so that a taken port or a bad socket
    // path fails before anything else happens.
    let peer_listeners = peers::bind(&cfg).await?;
    let client_listeners = clients::bind(&cfg).await?;
    let metrics_listeners = clients::bind_metrics(&cfg).await?;
    let member = context::start(&cfg, &member_dir, &identity, peer_tls.client.clone())?;

    // grpc.health.v1: the overall status ("") is SERVING while this member knows a leader.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    leader_duties::Duties {
        ctx: member.ctx.clone(),
        lessor: member.lessor.clone(),
        network: member.network.clone(),
        lease_extend: Duration::from_millis(cfg.election_timeout),
        corrupt_check_interval: cfg.experimental_corrupt_check_time,
        name: cfg.name.clone(),
        client_urls: cfg.advertise_client_urls.clone(),
        health: health_reporter,
        auto_compaction,
        auto_compaction_check: auto_compaction::revision_check_interval(
            cfg.auto_compaction_revision_check_interval,
        ),
    }
    .spawn();

    metrics::spawn_upkeep();
    let http_state = http::HttpState::new(
        member.ctx.clone(),
        Duration::from_millis(cfg.election_timeout),
        metrics::Exporter::new(
            member.ctx.clone(),
            member.backend.clone(),
            member.watch_hub.clone(),
        ),
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let peer_servers = peers::serve(&member, peer_listeners, peer_tls.server.as_ref(), &stop_rx)?;
    if cfg.experimental_initial_corrupt_check {
        leader_duties::initial_corrupt_check(&member.ctx).await?;
    }
    let mut client_servers = clients::serve(
        &cfg,
        &member,
        client_listeners,
        client_tls.as_ref(),
        health_service,
        &http_state,
        &stop_rx,
    )?;
    let metrics_servers = clients::serve_metrics(
        metrics_listeners,
        client_tls.as_ref(),
        &http_state,
        &stop_rx,
    )?;
    client_servers.extend(metrics_servers);

    shutdown::wait(&member, &member_dir).await;
    shutdown::stop(&member, peer_servers, client_servers, stop_tx).await;
    Ok(())
}
