//! `metastore snapshot status FILE`: check and describe a file written by `etcdctl snapshot save`
//! against MetaStore (the format is in ARCHITECTURE.md), like `etcdutl snapshot status`.
//! `metastore snapshot restore FILE …`: create a new member of a new cluster from such a file,
//! like `etcdutl snapshot restore`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use metastore_proto::metastorepb::Member;

use crate::config::{self, Config, Engine};

/// Offline snapshot file commands.
#[derive(Parser)]
#[command(name = "metastore snapshot")]
enum SnapshotCommand {
    /// Verify a snapshot file's SHA-256 and print its hash, revision, total keys and total size.
    Status {
        /// The file `etcdctl snapshot save` wrote.
        file: PathBuf,
        /// Output format: simple or json.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
    /// Verify a snapshot file and create a new member's data directory from it, for a new
    /// cluster described by the same flags as the server's. Run it once per member (each with
    /// its own --name and --data-dir), then start every member with the same flags.
    Restore {
        /// The file `etcdctl snapshot save` wrote.
        file: PathBuf,
        /// This member's name.
        #[arg(long, default_value = "default")]
        name: String,
        /// The data directory to create (default: `<name>.metastore`); must not hold a member.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The new cluster's members: `name=peer-url,…`.
        #[arg(long)]
        initial_cluster: Option<String>,
        /// The new cluster's token.
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
        /// This member's peer URLs.
        #[arg(long, default_value = "http://127.0.0.1:2380", value_delimiter = ',')]
        initial_advertise_peer_urls: Vec<String>,
        /// Storage engine of the new member.
        #[arg(long, value_enum, default_value = "memory")]
        storage_engine: Engine,
    },
}

/// The raft term of a restored cluster's first snapshot.
const RESTORE_TERM: u64 = 1;

#[allow(clippy::too_many_arguments)]
fn restore(
    file: PathBuf,
    name: String,
    data_dir: Option<PathBuf>,
    initial_cluster: Option<String>,
    initial_cluster_token: String,
    initial_advertise_peer_urls: Vec<String>,
    storage_engine: Engine,
) -> Result<()> {
    let mut args = vec![
        "metastore".to_string(),
        "--name".into(),
        name,
        "--initial-cluster-token".into(),
        initial_cluster_token,
        "--initial-advertise-peer-urls".into(),
        initial_advertise_peer_urls.join(","),
        "--storage-engine".into(),
        storage_engine.name().into(),
    ];
    if let Some(dir) = &data_dir {
        args.extend(["--data-dir".into(), dir.display().to_string()]);
    }
    if let Some(cluster) = initial_cluster {
        args.extend(["--initial-cluster".into(), cluster]);
    }
    let cfg = Config::try_parse_from(args)?;
    let members = cfg.initial_members()?;
    let me = members
        .iter()
        .find(|m| m.name == cfg.name)
        .context("this member is not in --initial-cluster")?;
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    let cluster_id = config::cluster_id(&ids);
    let member_dir = cfg.data_dir().join("member");
    if member_dir.exists() {
        bail!(
            "{} already exists; restore into a new --data-dir",
            member_dir.display()
        );
    }
    std::fs::create_dir_all(&member_dir)
        .with_context(|| format!("creating {}", member_dir.display()))?;
    crate::context::check_engine_marker(&member_dir, cfg.storage_engine)?;

    let backend = crate::context::open_backend(&cfg, &member_dir)?;
    metastore_maintenance_api::snapshot::import_file(&*backend, &file)
        .with_context(|| format!("restoring {}", file.display()))?;
    // The new cluster's log starts after one index per member, as a bootstrapped one does.
    let index = ids.len() as u64;
    let records: Vec<Member> = members
        .iter()
        .map(|m| Member {
            id: m.id,
            name: m.name.clone(),
            peer_urls: m.peer_urls.clone(),
            client_urls: Vec::new(),
            is_learner: false,
        })
        .collect();
    metastore_state_machine::reset_for_restore(backend.clone(), &records, index)
        .context("rewriting the membership")?;

    let mut raft_cfg = metastore_raft_node::RaftConfig::new(me.id, member_dir.clone());
    raft_cfg.wal_dir_override = cfg.wal_dir.clone();
    let view = backend.snapshot().context("reading the restored state")?;
    let buckets = metastore_state_machine::buckets();
    metastore_raft_node::bootstrap_from_snapshot(
        &raft_cfg,
        index,
        RESTORE_TERM,
        ids,
        Box::new(move |w: &mut dyn std::io::Write| {
            metastore_storage::export_snapshot(&*view, &buckets, w)
                .map(|_| ())
                .map_err(std::io::Error::other)
        }),
    )
    .context("writing the raft snapshot")?;
    crate::boot::write_identity(&member_dir, me.id, cluster_id)?;
    println!(
        "restored {} into {} as member {:x} of cluster {cluster_id:x} ({} members)",
        file.display(),
        cfg.data_dir().display(),
        me.id,
        members.len()
    );
    Ok(())
}

/// Run `metastore snapshot <args>`.
pub fn run(args: &[String]) -> Result<()> {
    let command = SnapshotCommand::parse_from(
        std::iter::once("metastore snapshot".to_string()).chain(args.iter().cloned()),
    );
    match command {
        SnapshotCommand::Status { file, write_out } => {
            let st = metastore_maintenance_api::snapshot::status(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            match write_out.as_str() {
                "json" => println!(
                    "{{\"hash\":{},\"revision\":{},\"totalKey\":{},\"totalSize\":{}}}",
                    st.hash, st.revision, st.total_keys, st.total_size_bytes
                ),
                "simple" => println!(
                    "{:x}, {}, {}, {} B",
                    st.hash, st.revision, st.total_keys, st.total_size_bytes
                ),
                other => anyhow::bail!("unknown --write-out {other:?}: use simple or json"),
            }
            Ok(())
        }
        SnapshotCommand::Restore {
            file,
            name,
            data_dir,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            storage_engine,
        } => restore(
            file,
            name,
            data_dir,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            storage_engine,
        ),
    }
}
