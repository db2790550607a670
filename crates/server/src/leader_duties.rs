//! This member's background duties, in one place.
//!
//! While this member leads (each duty keeps its own cadence and checks leadership every round,
//! so a member that loses leadership stops within one round):
//! - lease expiry: the lessor follows leadership (promoted with every countdown restarted, or
//!   demoted) and the leader proposes a revoke, through raft, for each lease that ran out;
//! - the corruption check (`--experimental-corrupt-check-time`): compares the members' HashKV
//!   and raises the CORRUPT alarm through raft on a mismatch;
//! - auto-compaction (`auto_compaction.rs`): every member samples its revision, the leader
//!   proposes the compactions;
//! - telling removed members of their removal (a removed member does not learn the commit of its
//!   own removal, since the leader stops replicating to it).
//!
//! Whatever leads:
//! - publishing this member's name and client URLs (etcd's `publish`);
//! - the gRPC health status (`grpc.health.v1`), which follows whether a leader is known through
//!   raft-node's leader watch ([`RaftNode::leader_watch`]);
//! - noticing this member's own removal ([`removed`]), on which the server stops.
//!
//! Why in the server crate: the duties span the client API's context (proposals, alarms, leases),
//! the peer network (notifying removed members) and the gRPC health service; only the binary
//! composes all three. The API crates keep their services and nothing that runs on its own.
//!
//! [`RaftNode::leader_watch`]: metastore_raft_node::RaftNode::leader_watch

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metastore_api_context::{mvcc_status, ServerContext};
use metastore_lease::Lessor;
use metastore_peer::PeerNetwork;
use metastore_proto::etcdserverpb::alarm_request::AlarmAction;
use metastore_proto::etcdserverpb::{AlarmRequest, AlarmType, LeaseRevokeRequest};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::metastorepb::MemberAttributes;
use metastore_raft_node::RaftNode;
use metastore_state_machine::ApplyOutput;
use tonic::Status;
use tonic_health::server::HealthReporter;

/// How often the leader looks for expired leases (etcd: every 500 ms).
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// Most revokes proposed per check.
const MAX_REVOKES_PER_CHECK: usize = 64;
/// Longest wait for the ReadIndex round that confirms the leadership before revoking leases.
const LEADERSHIP_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a peer may take to answer a HashKV of the corruption checks.
const PEER_HASH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the membership is compared with the one last seen, to find removed members.
const REMOVAL_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// What the duties need, passed explicitly.
pub struct Duties {
    /// The member's request context: proposals, membership, alarms, HashKV of the others.
    pub ctx: ServerContext,
    /// The lease table whose expired leases the leader revokes.
    pub lessor: Arc<Lessor>,
    /// Reaches removed members.
    pub network: PeerNetwork<ApplyOutput>,
    /// Added to every lease's countdown when this member becomes leader (etcd: the election
    /// timeout), so that leases do not expire for the time the election took.
    pub lease_extend: Duration,
    /// `--experimental-corrupt-check-time`; zero turns the check off.
    pub corrupt_check_interval: Duration,
    /// `--name`, published.
    pub name: String,
    /// `--advertise-client-urls`, published.
    pub client_urls: Vec<String>,
    /// The gRPC health service's status ("" is the overall status).
    pub health: HealthReporter,
    /// `--auto-compaction-mode` and `--auto-compaction-retention`.
    pub auto_compaction: crate::auto_compaction::Policy,
    /// How often revision-mode auto-compaction checks.
    pub auto_compaction_check: Duration,
}

impl Duties {
    /// Starts every duty on the current runtime; they run until the process ends.
    pub fn spawn(self) {
        let Duties {
            ctx,
            lessor,
            network,
            lease_extend,
            corrupt_check_interval,
            name,
            client_urls,
            health,
            auto_compaction,
            auto_compaction_check,
        } = self;
        // Leader-only.
        if !corrupt_check_interval.is_zero() {
            tokio::spawn(corruption_check(ctx.clone(), corrupt_check_interval));
        }
        tokio::spawn(notify_removed_members(ctx.clone(), network));
        tokio::spawn(lease_expiry(ctx.clone(), lessor, lease_extend));
        tokio::spawn(crate::auto_compaction::run(
            ctx.clone(),
            auto_compaction,
            auto_compaction_check,
        ));
        // Every member's.
        tokio::spawn(publish(ctx.clone(), name, client_urls));
        tokio::spawn(report_health(health, ctx.raft.clone()));
    }
}

/// Follows this member's leadership (promoting or demoting the lessor; a promotion restarts every
/// countdown with `extend` on top) and, while leader, proposes a revoke for each expired lease.
///
/// Two things keep a leader that was stalled (a long pause, SIGSTOP, a partition) from revoking
/// leases that another leader renewed meanwhile: the lessor is promoted again whenever the term
/// changes, not only when the leadership flag does (leadership lost and won back between two
/// checks missed every renewal the other leader took), and before revoking, the leadership is
/// confirmed by a ReadIndex round in the same term, as etcd 3.5 does (`ensureLeadership`): a
/// resumed leader that does not know yet of a newer term would otherwise have its revokes
/// forwarded to the new leader and committed.
async fn lease_expiry(ctx: ServerContext, lessor: Arc<Lessor>, extend: Duration) {
    let mut ticker = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
    let mut primary_term = 0;
    loop {
        ticker.tick().await;
        let (leader, term) = ctx.raft.with_status(|s| (s.is_leader, s.term));
        if leader && (!lessor.is_primary() || term != primary_term) {
            lessor.promote(extend);
            primary_term = term;
        } else if !leader && lessor.is_primary() {
            lessor.demote();
        }
        if !leader {
            continue;
        }
        let expired = lessor.expired(MAX_REVOKES_PER_CHECK);
        if expired.is_empty() {
            continue;
        }
        let confirmed = matches!(
            tokio::time::timeout(LEADERSHIP_CHECK_TIMEOUT, ctx.raft.read_index()).await,
            Ok(Ok(_))
        ) && ctx.raft.with_status(|s| s.is_leader && s.term == term);
        if !confirmed {
            tracing::info!(
                term,
                "not revoking expired leases: the leadership of this term is not confirmed"
            );
            continue;
        }
        let mut revokes = tokio::task::JoinSet::new();
        for id in expired {
            let ctx = ctx.clone();
            revokes.spawn(async move {
                let result = ctx
                    .propose(Request::LeaseRevoke(LeaseRevokeRequest { id }))
                    .await;
                (id, result)
            });
        }
        while let Some(done) = revokes.join_next().await {
            match done {
                Ok((id, Err(status))) if status.code() != tonic::Code::NotFound => {
                    tracing::warn!(lease_id = id, error = %status.message(), "revoking an expired lease failed");
                }
                Ok((id, _)) => tracing::debug!(lease_id = id, "expired lease revoked"),
                Err(e) => tracing::warn!(error = %e, "lease revoke task failed"),
            }
        }
    }
}

/// etcd's periodic corruption check (`--experimental-corrupt-check-time`): every `interval` the
/// leader computes its HashKV at its current revision and asks every other member for theirs at
/// the same revision; a member whose hash differs at the same compact revision gets the CORRUPT
/// alarm (proposed through raft, so every member then refuses writes with
/// `etcdserver: corrupt cluster`). Members that cannot answer (down, behind, compacted past the
/// revision) are skipped until the next round.
async fn corruption_check(ctx: ServerContext, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if !ctx.raft.with_status(|s| s.is_leader) {
            continue;
        }
        if let Err(e) = check_members_once(&ctx).await {
            tracing::warn!(error = %e, "corruption check failed");
        }
    }
}

/// Compares this member's HashKV at its current revision with every other voter's at that
/// revision, and returns (logging each) the members whose hash differs at the same compact
/// revision. Members that cannot answer (down, behind, compacted past it, or slower than
/// `PEER_HASH_TIMEOUT`) are skipped.
async fn hash_mismatches(ctx: &ServerContext) -> Result<Vec<u64>, Status> {
    let store = ctx.store.current();
    let revision = store.current_revision();
    let own = tokio::task::spawn_blocking(move || store.hash_kv(revision))
        .await
        .map_err(|e| Status::internal(format!("etcdserver: hashkv task failed: {e}")))?
        .map_err(|e| mvcc_status(&e))?;
    let mut mismatches = Vec::new();
    for member in ctx.members.list() {
        if member.id == ctx.member_id || member.is_learner {
            continue;
        }
        let answer = tokio::time::timeout(
            PEER_HASH_TIMEOUT,
            ctx.forwarder.peer_hash_kv(member.id, revision),
        )
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")));
        let (hash, compact_revision, _) = match answer {
            Ok(answer) => answer,
            Err(status) => {
                // etcd warns too ("cannot fetch hash from remote peer").
                tracing::warn!(peer = %format!("{:x}", member.id), error = %status.message(), "hash comparison skipped a member");
                continue;
            }
        };
        if compact_revision != own.compact_revision || hash == own.hash {
            continue;
        }
        tracing::error!(
            peer = %format!("{:x}", member.id),
            revision,
            local_hash = own.hash,
            peer_hash = hash,
            "found data inconsistency with a peer"
        );
        mismatches.push(member.id);
    }
    Ok(mismatches)
}

async fn check_members_once(ctx: &ServerContext) -> Result<(), Status> {
    for member_id in hash_mismatches(ctx).await? {
        let already = ctx
            .alarms
            .get(AlarmType::Corrupt)
            .iter()
            .any(|a| a.member_id == member_id);
        if already {
            continue;
        }
        let request = Request::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id,
            alarm: AlarmType::Corrupt as i32,
        });
        ctx.propose(request).await?;
    }
    Ok(())
}

/// etcd's `--experimental-initial-corrupt-check`: before serving clients, compare this member's
/// HashKV with its peers'; any difference at the same compact revision stops the start (as
/// etcd: `found data inconsistency with peers`). Unreachable peers only skip the comparison.
pub async fn initial_corrupt_check(ctx: &ServerContext) -> anyhow::Result<()> {
    let mismatches = hash_mismatches(ctx)
        .await
        .map_err(|s| anyhow::anyhow!("initial corruption check: {}", s.message()))?;
    if !mismatches.is_empty() {
        anyhow::bail!("{:x} found data inconsistency with peers", ctx.member_id);
    }
    tracing::info!("initial corruption check passed: no data inconsistency with peers");
    Ok(())
}

/// On the leader, tells each member that a committed change removed (a removed member does not
/// learn the commit of its own removal, since the leader stops replicating to it).
async fn notify_removed_members(ctx: ServerContext, network: PeerNetwork<ApplyOutput>) {
    let mut known: HashMap<u64, Vec<String>> = Default::default();
    loop {
        tokio::time::sleep(REMOVAL_CHECK_INTERVAL).await;
        let (membership, is_leader) = ctx
            .raft
            .with_status(|s| (s.membership.clone(), s.is_leader));
        let gone: Vec<(u64, Vec<String>)> = known
            .iter()
            .filter(|(id, _)| !membership.contains(**id))
            .map(|(id, urls)| (*id, urls.clone()))
            .collect();
        for (id, urls) in gone {
            known.remove(&id);
            if is_leader {
                let network = network.clone();
                tokio::spawn(async move { network.notify_removed(id, &urls).await });
            }
        }
        for m in ctx.members.list() {
            if membership.contains(m.id) {
                known.insert(m.id, m.peer_urls);
            }
        }
    }
}

/// Publishes this member's name and client URLs through raft (etcd's `publish`) whenever the
/// membership table disagrees with them, until the process ends.
async fn publish(ctx: ServerContext, name: String, client_urls: Vec<String>) {
    loop {
        let current = ctx.members.get(ctx.member_id);
        let up_to_date = current
            .as_ref()
            .is_some_and(|m| m.name == name && m.client_urls == client_urls);
        // Not in the table yet (a joining member still catching up): wait.
        if up_to_date || current.is_none() || ctx.raft.status().leader_id == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let publish = Request::MemberAttributes(MemberAttributes {
            id: ctx.member_id,
            name: name.clone(),
            client_urls: client_urls.clone(),
        });
        match ctx.propose(publish).await {
            Ok(_) => tracing::info!(
                name = %name,
                client_urls = ?client_urls,
                "published local member attributes to the cluster"
            ),
            Err(status) => {
                tracing::warn!(error = %status.message(), "publishing member attributes failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Keeps the gRPC health status in step with leadership: a member without a leader can serve
/// neither writes nor linearizable reads. Follows raft-node's leader watch; once the raft node
/// stopped there is no leader.
async fn report_health<O: Send + 'static>(reporter: HealthReporter, raft: RaftNode<O>) {
    use tonic_health::ServingStatus;
    let mut leader = raft.leader_watch();
    let mut last = None;
    loop {
        let has_leader = *leader.borrow_and_update() != 0;
        if last != Some(has_leader) {
            let status = if has_leader {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            last = Some(has_leader);
        }
        if leader.changed().await.is_err() {
            if last != Some(false) {
                reporter
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
            }
            return;
        }
    }
}

/// Resolves once a committed membership change removed this member, or a peer told it so.
/// (Polled: neither raft-node nor the peer network notifies of it.)
pub async fn removed<O: Send + 'static>(raft: RaftNode<O>, network: PeerNetwork<O>) {
    loop {
        if raft.status().removed || network.removed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
