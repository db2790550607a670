//! The server: parses etcd's flags, opens the storage engine, starts the raft node and serves
//! etcd's gRPC API ([`main`]). The `metastore` binary (the workspace's root package) is a call to
//! it. Thin by design: the other crates do the work.

mod boot;
mod config;
mod leader_duties;
mod snapshot_cmd;
mod tls;
mod urls;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use metastore_api_context::{
    AuthGate, AuthLayer, BoxFuture, LeaderForwarder, Limits, ServerContext,
};
use metastore_etcd_api::{
    AuthService, ClusterService, ElectionService, KvService, LeaseService, LockService,
    WatchService,
};
use metastore_lease::Lessor;
use metastore_maintenance_api::MaintenanceService;
use metastore_peer::{LeaseHandler, PeerNetwork, PeerService};
use metastore_proto::etcdserverpb::auth_server::AuthServer;
use metastore_proto::etcdserverpb::cluster_server::ClusterServer;
use metastore_proto::etcdserverpb::kv_server::KvServer;
use metastore_proto::etcdserverpb::lease_server::LeaseServer;
use metastore_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use metastore_proto::etcdserverpb::watch_server::WatchServer;
use metastore_proto::v3electionpb::election_server::ElectionServer;
use metastore_proto::v3lockpb::lock_server::LockServer;
use metastore_raft_node::{RaftConfig, RaftNode};
use metastore_state_machine::{ApplyOutput, KvStateMachine, MemberTable};
use metastore_storage::Backend;
use tracing::info;

use config::{Config, Engine};

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

/// Bytes gRPC may receive on top of `--max-request-bytes` (etcd's `grpcOverheadBytes`), so that
/// an oversized request reaches our check and gets etcd's own error.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// The leader's side of forwarded lease requests, and this member's HashKV for the leader's
/// corruption check.
struct Leases(Arc<Lessor>, metastore_state_machine::StoreHandle);

impl LeaseHandler for Leases {
    fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), tonic::Status> {
        let h = self
            .1
            .current()
            .hash_kv(revision)
            .map_err(|e| metastore_api_context::mvcc_status(&e))?;
        Ok((h.hash, h.compact_revision, h.hash_revision))
    }

    fn renew(&self, id: i64) -> Option<i64> {
        self.0.renew(id).ok()
    }

    fn ttl(&self, id: i64) -> Option<(i64, i64)> {
        self.0
            .time_to_live(id)
            .map(|s| (s.remaining_ttl_secs, s.granted_ttl_secs))
    }
}

/// A follower's way to the leader: the peer network.
struct Forwarder(PeerNetwork<ApplyOutput>);

impl LeaderForwarder for Forwarder {
    fn lease_renew(&self, leader: u64, id: i64) -> BoxFuture<Result<Option<i64>, tonic::Status>> {
        let network = self.0.clone();
        Box::pin(async move { network.lease_renew(leader, id).await })
    }

    fn lease_ttl(
        &self,
        leader: u64,
        id: i64,
    ) -> BoxFuture<Result<Option<(i64, i64)>, tonic::Status>> {
        let network = self.0.clone();
        Box::pin(async move { network.lease_ttl(leader, id).await })
    }

    fn peer_hash_kv(
        &self,
        member: u64,
        revision: i64,
    ) -> BoxFuture<Result<(u32, i64, i64), tonic::Status>> {
        let network = self.0.clone();
        Box::pin(async move {
            let h = network.hash_kv(member, revision).await?;
            Ok((h.hash, h.compact_revision, h.hash_revision))
        })
    }

    fn leader_progress(
        &self,
        leader: u64,
    ) -> BoxFuture<Result<std::collections::BTreeMap<u64, u64>, tonic::Status>> {
        let network = self.0.clone();
        Box::pin(async move { Ok(network.leader_progress(leader).await?.into_iter().collect()) })
    }
}

/// Peer URLs of a member: the replicated membership table first, then what the flags or the
/// running cluster said at start.
fn url_resolver(
    members: MemberTable,
    known: std::collections::HashMap<u64, Vec<String>>,
) -> metastore_peer::UrlResolver {
    Arc::new(move |id| {
        members
            .get(id)
            .map(|m| m.peer_urls)
            .filter(|urls| !urls.is_empty())
            .or_else(|| known.get(&id).cloned())
            .unwrap_or_default()
    })
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_format == "text" {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

/// Refuse to start on a data dir written by the other engine: its content would be ignored.
fn check_engine_marker(member_dir: &Path, engine: Engine) -> Result<()> {
    let marker = member_dir.join("engine");
    match std::fs::read_to_string(&marker) {
        Ok(found) if found.trim() == engine.name() => Ok(()),
        Ok(found) => bail!(
            "{} was created with --storage-engine {}; start with that engine or use another --data-dir",
            member_dir.display(),
            found.trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&marker, engine.name()).with_context(|| format!("writing {}", marker.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", marker.display())),
    }
}

fn open_backend(cfg: &Config, member_dir: &Path) -> Result<Arc<dyn Backend>> {
    let buckets = metastore_state_machine::buckets();
    Ok(match cfg.storage_engine {
        Engine::Memory => Arc::new(metastore_storage_mem::MemBackend::new(&buckets)),
        Engine::Rocksdb => {
            let path = member_dir.join("db");
            Arc::new(
                metastore_storage_rocks::RocksBackend::open(&path, &buckets)
                    .with_context(|| format!("opening RocksDB at {}", path.display()))?
                    // The raft WAL is fsynced before apply and replayed after the persisted
                    // applied index: a second fsync per applied entry buys nothing.
                    .with_sync_writes(false),
            )
        }
    })
}

/// Runs `metastore` with the process's command line: a member (etcd's flags), or
/// `metastore snapshot …`.
pub fn main() -> Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    // Responses finished together leave in one HTTP/2 write (see .cargo/config.toml).
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    runtime.build()?.block_on(serve())
}

async fn serve() -> Result<()> {
    disable_transparent_huge_pages();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("snapshot") {
        return snapshot_cmd::run(&args[2..]);
    }
    let cfg = Config::parse();
    init_logging(&cfg);
    cfg.check_urls()?;
    // Before anything talks to peers (joining asks the running members).
    let client_tls = tls::client_side(&cfg)?;
    let peer_tls = tls::peer_side(&cfg)?;

    let data_dir = cfg.data_dir();
    let member_dir = data_dir.join("member");
    std::fs::create_dir_all(&member_dir)
        .with_context(|| format!("creating {}", member_dir.display()))?;
    check_engine_marker(&member_dir, cfg.storage_engine)?;
    let removed_marker = member_dir.join("removed");
    if removed_marker.exists() {
        bail!(
            "this member was permanently removed from the cluster ({} exists); start a new \
             member with an empty --data-dir instead",
            removed_marker.display()
        );
    }
    let identity = boot::identify(&cfg, &member_dir, peer_tls.client.as_ref()).await?;
    let (member_id, cluster_id) = (identity.member_id, identity.cluster_id);

    // Bind the peer port before anything starts, so a taken port fails fast.
    let mut peer_listeners = Vec::new();
    for url in urls::parse_tcp("--listen-peer-urls", &cfg.listen_peer_urls)? {
        let urls::Bind::Tcp(addr) = url.bind("--listen-peer-urls")? else {
            unreachable!("parse_tcp refuses unix URLs")
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for peers on {}", url.text))?;
        peer_listeners.push((addr, listener));
    }
    // Bound before the raft node starts too, so that a taken port or a bad socket path fails
    // before anything else happens.
    let mut client_listeners = Vec::new();
    for url in urls::parse_all("--listen-client-urls", &cfg.listen_client_urls)? {
        let listener = Listener::bind(&url.bind("--listen-client-urls")?)
            .await
            .with_context(|| format!("listening for clients on {}", url.text))?;
        client_listeners.push((url, listener));
    }

    let backend = open_backend(&cfg, &member_dir)?;
    let sm = KvStateMachine::open(backend.clone())
        .context("opening the mvcc store")?
        .with_quota_bytes(cfg.quota_backend_bytes);
    let alarms = sm.alarms();
    let store = sm.store();
    let lessor = sm.lessor();
    // etcd's minimum lease TTL: 1.5 election timeouts, rounded up to whole seconds.
    let election_ticks = cfg.election_timeout / cfg.heartbeat_interval.max(1);
    let min_ttl_ms = (3 * election_ticks / 2) * cfg.heartbeat_interval;
    lessor.set_min_ttl_secs(min_ttl_ms.div_ceil(1000) as i64);
    let members = sm.members();
    let auth_store = sm.auth();
    auth_store
        .simple_tokens()
        .set_ttl(Duration::from_secs(cfg.auth_token_ttl.max(1)));
    let tokens = metastore_auth::tokens::TokenProvider::from_flag(&cfg.auth_token)
        .map_err(|e| anyhow::anyhow!(e))?;
    let auth_gate = Arc::new(AuthGate::new(
        auth_store,
        tokens,
        cfg.bcrypt_cost,
        cfg.client_cert_auth,
    ));
    let watch_hub = sm.watch_hub();
    watch_hub.set_max_response_bytes(cfg.max_request_bytes);
    watch_hub
        .start_sync_thread()
        .context("starting the watch catch-up thread")?;

    let mut raft_cfg = RaftConfig::new(member_id, member_dir.clone());
    raft_cfg.peers = identity.peers.clone();
    raft_cfg.bootstrap = identity.bootstrap.clone();
    raft_cfg.join = identity.join;
    raft_cfg.snapshot_count = cfg.snapshot_count;
    raft_cfg.tick_interval = Duration::from_millis(cfg.heartbeat_interval.max(1));
    raft_cfg.election_ticks = election_ticks.max(2) as usize;
    raft_cfg.heartbeat_ticks = 1;
    let network = PeerNetwork::new(
        cluster_id,
        member_id,
        url_resolver(members.clone(), identity.known_urls.clone()),
        tokio::runtime::Handle::current(),
        peer_tls.client.clone(),
    );
    let raft = RaftNode::start(raft_cfg, sm, Arc::new(network.clone())).context("starting raft")?;
    network.set_node(raft.clone());
    boot::write_identity(&member_dir, member_id, cluster_id)?;
    info!(
        name = %cfg.name,
        member_id = %format!("{member_id:x}"),
        cluster_id = %format!("{cluster_id:x}"),
        data_dir = %data_dir.display(),
        engine = cfg.storage_engine.name(),
        peer_urls = %cfg.initial_advertise_peer_urls.join(","),
        "starting member"
    );

    let ctx = ServerContext {
        raft: raft.clone(),
        store,
        cluster_id,
        member_id,
        limits: Limits {
            max_request_bytes: cfg.max_request_bytes,
            max_txn_ops: cfg.max_txn_ops,
        },
        alarms,
        quota: metastore_alarm::Quota::new(backend.clone(), cfg.quota_backend_bytes),
        members: members.clone(),
        forwarder: Arc::new(Forwarder(network.clone())),
        auth: auth_gate,
        lessor: lessor.clone(),
    };
    let max_recv = cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;

    // grpc.health.v1: the overall status ("") is SERVING while this member knows a leader.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    leader_duties::Duties {
        ctx: ctx.clone(),
        lessor: lessor.clone(),
        network: network.clone(),
        lease_extend: Duration::from_millis(cfg.election_timeout),
        corrupt_check_interval: cfg.experimental_corrupt_check_time,
        name: cfg.name.clone(),
        client_urls: cfg.advertise_client_urls.clone(),
        health: health_reporter,
    }
    .spawn();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let mut peer_servers = Vec::new();
    let members_source: metastore_peer::MemberSource = {
        let members = members.clone();
        Arc::new(move || members.list())
    };
    for (addr, listener) in peer_listeners {
        info!(address = %addr, "serving peer traffic");
        let peer = PeerService::server(
            cluster_id,
            member_id,
            raft.clone(),
            members_source.clone(),
            {
                let members = members.clone();
                Arc::new(move |id| !members.is_removed(id))
            },
            Arc::new(Leases(lessor.clone(), ctx.store.clone())),
            {
                let network = network.clone();
                Arc::new(move || network.mark_removed())
            },
        );
        let mut stop = stop_rx.clone();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &peer_tls.server {
            builder = builder.tls_config(tls.clone())?;
        }
        peer_servers.push(tokio::spawn(
            builder
                .add_service(peer)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                }),
        ));
    }
    for (url, listener) in client_listeners {
        info!(address = %listener.address(), url = %url.text, "serving client requests");
        let kv = KvServer::new(KvService::new(ctx.clone())).max_decoding_message_size(max_recv);
        let maintenance =
            MaintenanceServer::new(MaintenanceService::new(ctx.clone(), backend.clone()));
        let watch = WatchServer::new(WatchService::new(
            ctx.clone(),
            watch_hub.clone(),
            cfg.experimental_watch_progress_notify_interval,
        ))
        .max_decoding_message_size(max_recv);
        let lease = LeaseServer::new(LeaseService::new(ctx.clone(), lessor.clone()))
            .max_decoding_message_size(max_recv);
        let cluster = ClusterServer::new(ClusterService::new(ctx.clone()));
        let mut stop = stop_rx.clone();
        let mut builder = tonic::transport::Server::builder();
        if url.scheme.tls() {
            let tls = client_tls.clone().with_context(|| {
                format!(
                    "TLS key/cert (--cert-file, --key-file) must be provided for client url \
                     {} with HTTPS scheme",
                    url.text
                )
            })?;
            builder = builder.tls_config(tls)?;
        }
        let router = builder
            // Every call passes the auth layer: one place decides who may call what.
            .layer(AuthLayer::new(ctx.clone()))
            .add_service(kv)
            .add_service(watch)
            .add_service(lease)
            .add_service(maintenance)
            .add_service(cluster)
            .add_service(AuthServer::new(AuthService::new(ctx.clone())))
            .add_service(LockServer::new(LockService::new(&ctx, &watch_hub)))
            .add_service(ElectionServer::new(ElectionService::new(&ctx, &watch_hub)))
            .add_service(health_service.clone());
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        servers.push(match listener {
            Listener::Tcp(listener) => {
                // Small responses must not wait for Nagle's algorithm (40 ms with delayed ACKs).
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
            }
            Listener::Unix(listener, _) => {
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
            }
        });
    }

    tokio::select! {
        _ = shutdown_signal() => info!("shutting down"),
        _ = leader_duties::removed(raft.clone(), network.clone()) => {
            tracing::warn!(
                member_id = %format!("{member_id:x}"),
                "this member was removed from the cluster; shutting down"
            );
            if let Err(e) = std::fs::write(&removed_marker, format!("{member_id:x}\n")) {
                tracing::error!(error = %e, "cannot record the removal");
            }
        }
    }
    // Peers keep long-lived streams open and retry anyway: no grace for them. Clients get a
    // moment to finish what is in flight (watch streams would hold a graceful stop forever).
    for server in &peer_servers {
        server.abort();
    }
    let _ = stop_tx.send(true);
    for server in servers {
        let abort = server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    raft.shutdown();
    Ok(())
}

/// A bound client listener: TCP, or a unix socket (`unix://` and `unixs://` URLs).
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl Listener {
    async fn bind(bind: &urls::Bind) -> std::io::Result<Listener> {
        Ok(match bind {
            urls::Bind::Tcp(addr) => Listener::Tcp(tokio::net::TcpListener::bind(addr).await?),
            urls::Bind::Unix(path) => {
                // As etcd: a socket file left by an earlier run is replaced.
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                Listener::Unix(tokio::net::UnixListener::bind(path)?, path.clone())
            }
        })
    }

    fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
