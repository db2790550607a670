//! Building the member: its data directory, the storage engine and the state machine, the raft
//! node with the peer network it talks through, and the [`ServerContext`] every client service
//! shares. Nothing here serves or runs on its own.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use metastore_api_context::{AuthGate, BoxFuture, LeaderForwarder, Limits, ServerContext};
use metastore_lease::Lessor;
use metastore_peer::PeerNetwork;
use metastore_peer::PeerTls;
use metastore_raft_node::{RaftConfig, RaftNode};
use metastore_state_machine::{ApplyOutput, KvStateMachine, MemberTable};
use metastore_storage::Backend;
use metastore_watch::WatchHub;
use tracing::info;

use crate::boot::{self, Identity};
use crate::config::{Config, Engine};

/// A started member: what serving peers and clients, the duties and shutting down need.
pub struct Member {
    /// What every client service shares (the raft handle, the store, membership, …).
    pub ctx: ServerContext,
    /// The member's way to its peers.
    pub network: PeerNetwork<ApplyOutput>,
    /// The storage engine (Maintenance reads sizes, hashes and snapshots from it).
    pub backend: Arc<dyn Backend>,
    /// The lease table.
    pub lessor: Arc<Lessor>,
    /// Where watchers are registered.
    pub watch_hub: Arc<WatchHub>,
}

/// The member's directory (`<--data-dir>/member`), created if need be; refused when another
/// engine wrote it or this member was removed from its cluster.
pub fn member_dir(cfg: &Config) -> Result<PathBuf> {
    let member_dir = cfg.data_dir().join("member");
    std::fs::create_dir_all(&member_dir)
        .with_context(|| format!("creating {}", member_dir.display()))?;
    check_engine_marker(&member_dir, cfg.storage_engine)?;
    let removed_marker = removed_marker(&member_dir);
    if removed_marker.exists() {
        bail!(
            "this member was permanently removed from the cluster ({} exists); start a new \
             member with an empty --data-dir instead",
            removed_marker.display()
        );
    }
    Ok(member_dir)
}

/// The file recording that this member was removed: it must not start again.
pub fn removed_marker(member_dir: &Path) -> PathBuf {
    member_dir.join("removed")
}

/// Refuse to start on a data dir written by the other engine: its content would be ignored.
pub fn check_engine_marker(member_dir: &Path, engine: Engine) -> Result<()> {
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

/// Opens the storage engine `--storage-engine` names, in `member_dir`.
pub fn open_backend(cfg: &Config, member_dir: &Path) -> Result<Arc<dyn Backend>> {
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

/// Opens the store in `member_dir`, starts the raft node (reaching `https://` peers with
/// `peer_tls`) and builds the context. Blocking disk I/O (opening the engine, replaying the WAL).
pub fn start(
    cfg: &Config,
    member_dir: &Path,
    identity: &Identity,
    peer_tls: Option<PeerTls>,
) -> Result<Member> {
    let (member_id, cluster_id) = (identity.member_id, identity.cluster_id);
    let backend = open_backend(cfg, member_dir)?;
    let sm = KvStateMachine::open(backend.clone())
        .context("opening the mvcc store")?
        .with_quota_bytes(cfg.quota_backend_bytes)
        .with_compaction_config(metastore_mvcc::CompactionConfig {
            batch_limit: cfg.experimental_compaction_batch_limit,
            sleep_interval: cfg.experimental_compaction_sleep_interval,
        });
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

    let mut raft_cfg = RaftConfig::new(member_id, member_dir.to_path_buf());
    raft_cfg.peers = identity.peers.clone();
    raft_cfg.bootstrap = identity.bootstrap.clone();
    raft_cfg.join = identity.join;
    raft_cfg.snapshot_count = cfg.snapshot_count;
    raft_cfg.wal_dir_override = cfg.wal_dir.clone();
    raft_cfg.max_wals = cfg.max_wals;
    raft_cfg.max_snapshots = cfg.max_snapshots;
    raft_cfg.disk_reserve_bytes = cfg.disk_reserve_bytes;
    raft_cfg.tick_interval = Duration::from_millis(cfg.heartbeat_interval.max(1));
    raft_cfg.election_ticks = election_ticks.max(2) as usize;
    raft_cfg.heartbeat_ticks = 1;
    let network = PeerNetwork::new(
        cluster_id,
        member_id,
        url_resolver(members.clone(), identity.known_urls.clone()),
        tokio::runtime::Handle::current(),
        peer_tls,
    );
    let raft = RaftNode::start(raft_cfg, sm, Arc::new(network.clone())).context("starting raft")?;
    network.set_node(raft.clone());
    network.spawn_prober();
    boot::write_identity(member_dir, member_id, cluster_id)?;
    info!(
        name = %cfg.name,
        member_id = %format!("{member_id:x}"),
        cluster_id = %format!("{cluster_id:x}"),
        data_dir = %cfg.data_dir().display(),
        engine = cfg.storage_engine.name(),
        peer_urls = %cfg.initial_advertise_peer_urls.join(","),
        "starting member"
    );

    let ctx = ServerContext {
        raft,
        store,
        cluster_id,
        member_id,
        limits: Limits {
            max_request_bytes: cfg.max_request_bytes,
            max_txn_ops: cfg.max_txn_ops,
        },
        alarms,
        quota: metastore_alarm::Quota::new(backend.clone(), cfg.quota_backend_bytes),
        members,
        forwarder: Arc::new(Forwarder(network.clone())),
        auth: auth_gate,
        lessor: lessor.clone(),
    };
    Ok(Member {
        ctx,
        network,
        backend,
        lessor,
        watch_hub,
    })
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

    fn leader_progress(&self, leader: u64) -> BoxFuture<Result<BTreeMap<u64, u64>, tonic::Status>> {
        let network = self.0.clone();
        Box::pin(async move { Ok(network.leader_progress(leader).await?.into_iter().collect()) })
    }
}

/// Peer URLs of a member: the replicated membership table first, then what the flags or the
/// running cluster said at start.
fn url_resolver(
    members: MemberTable,
    known: HashMap<u64, Vec<String>>,
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
