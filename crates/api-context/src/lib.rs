//! The request context both API crates (`metastore-etcd-api`, `metastore-maintenance-api`)
//! stand on, so that they are siblings rather than one reaching into the other.
//!
//! Owns:
//! - [`ServerContext`], what every service needs: the raft handle, the store, identity,
//!   [`Limits`], alarms and quota, membership, leases and the auth gate; with the request paths
//!   every service shares (proposing with etcd's timeouts and errors, linearizable barriers,
//!   Range, the learner and leader checks, the NOSPACE quota check, response headers);
//! - [`LeaderForwarder`] (and its [`BoxFuture`]), how a follower reaches the leader;
//! - the mapping of domain errors to etcd's gRPC codes and messages ([`mvcc_status`],
//!   [`raft_status`], [`apply_error_status`], …) and [`PROPOSAL_TIMEOUT`];
//! - [`OversizeLayer`], grpc-go's answer to a message over the receive limit;
//! - authentication and authorization at the API: [`AuthLayer`] in front of every client-port
//!   service, [`AuthGate`], the resolved [`Caller`] and [`ServerContext::authorize`].
//!
//! Must not depend on: any gRPC service (KV, Maintenance, … live in the API crates), the peer
//! network, the engine choice, raft internals beyond [`RaftNode`]'s handle.

mod auth;
mod errors;
mod oversize;

pub use auth::{
    auth_status, name_for_log, AuthGate, AuthLayer, AuthMiddleware, Caller, AUTH_TRACKED_USERS,
};
pub use errors::{
    apply_error_status, lease_status, member_not_found, mvcc_status, no_space, raft_status,
    request_too_large,
};
pub use oversize::{OversizeLayer, OversizeService};

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use metastore_alarm::{AlarmTable, Quota};
use metastore_auth::AuthInfo;
use metastore_mvcc::{MvccError, Store};
use metastore_proto::etcdserverpb::alarm_request::AlarmAction;
use metastore_proto::etcdserverpb::{
    AlarmRequest, AlarmType, RangeRequest, RangeResponse, ResponseHeader,
};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::range_frame::RangeFrame;
use metastore_raft_node::{RaftError, RaftNode};
use metastore_state_machine::{
    encode_request, encode_request_as, ApplyError, ApplyOutput, MemberTable, Output, StoreHandle,
};
use tonic::Status;

/// How long a proposal may wait to be applied before etcd's `request timed out` (etcd: 5 s plus
/// twice the election timeout).
pub const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(7);

/// Pause before proposing again a proposal raft dropped for lack of a leader, once a leader is
/// known (a leader still handing over drops proposals until its transferee leads).
const NO_LEADER_RETRY_PAUSE: Duration = Duration::from_millis(5);

/// Limits that etcd enforces at its API (`--max-request-bytes`, `--max-txn-ops`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request accepted, in bytes (etcd's default: 1.5 MiB).
    pub max_request_bytes: usize,
    /// Most operations in one Txn (etcd's default: 128).
    pub max_txn_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
        }
    }
}

/// A boxed future, for the object-safe [`LeaderForwarder`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Requests a follower hands to the leader (over the peer network): only the leader counts
/// lease TTLs down and knows how far each member has replicated.
pub trait LeaderForwarder: Send + Sync + 'static {
    /// Renews lease `id` on `leader`: its TTL, or `None` when the leader does not know it.
    fn lease_renew(&self, leader: u64, id: i64) -> BoxFuture<Result<Option<i64>, Status>>;
    /// Remaining and granted TTL of lease `id` on `leader`, or `None` when unknown.
    fn lease_ttl(&self, leader: u64, id: i64) -> BoxFuture<Result<Option<(i64, i64)>, Status>>;
    /// The leader's replication progress: match index by member id.
    fn leader_progress(&self, leader: u64) -> BoxFuture<Result<BTreeMap<u64, u64>, Status>>;
    /// Member `member`'s HashKV at `revision`: (hash, compact revision, hash revision).
    fn peer_hash_kv(
        &self,
        member: u64,
        revision: i64,
    ) -> BoxFuture<Result<(u32, i64, i64), Status>>;
}

/// A read of the store for a range request: its answer and the revision it saw.
type StoreRead<T> = fn(&Store, &RangeRequest) -> Result<(T, i64), MvccError>;

/// What every service needs: the raft handle, the store, identity and limits.
#[derive(Clone)]
pub struct ServerContext {
    /// The consensus handle: proposals and ReadIndex.
    pub raft: RaftNode<ApplyOutput>,
    /// The current mvcc store.
    pub store: StoreHandle,
    /// This cluster's id (etcd derives it from the initial members).
    pub cluster_id: u64,
    /// This member's id.
    pub member_id: u64,
    /// Request limits.
    pub limits: Limits,
    /// The replicated alarm table (read side; changes go through raft).
    pub alarms: AlarmTable,
    /// The backend quota (`--quota-backend-bytes`).
    pub quota: Quota,
    /// The replicated membership table (read side; changes go through raft).
    pub members: MemberTable,
    /// Reaches the leader for what only the leader knows.
    pub forwarder: Arc<dyn LeaderForwarder>,
    /// Users, roles and tokens.
    pub auth: Arc<AuthGate>,
    /// The lease table (read side), for the permission checks on attached keys.
    pub lessor: Arc<metastore_lease::Lessor>,
}

impl ServerContext {
    /// A response header carrying `revision` (0: the store's current revision).
    pub fn header(&self, revision: i64) -> ResponseHeader {
        let revision = if revision == 0 {
            self.store.current().current_revision()
        } else {
            revision
        };
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.raft.with_status(|s| s.term),
        }
    }
}

impl ServerContext {
    /// The keys attached to lease `id` whose permissions a request on the lease needs: none
    /// while auth is disabled (nothing is checked then, so the hot paths skip collecting them)
    /// or when the lease is unknown.
    pub fn lease_keys_to_check(&self, id: i64) -> Vec<Vec<u8>> {
        if id == 0 || !self.auth.store.is_enabled() {
            return Vec::new();
        }
        self.lessor.attached_keys(id).unwrap_or_default()
    }

    /// Waits for a linearizable read barrier (ReadIndex), with etcd's errors.
    pub async fn linearizable_barrier(&self) -> Result<(), Status> {
        match tokio::time::timeout(PROPOSAL_TIMEOUT, self.raft.read_index()).await {
            Err(_) => Err(Status::unavailable("etcdserver: request timed out")),
            Ok(Err(e)) => Err(raft_status(&e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// A Range as etcd serves it: validated, linearizable unless `serializable` (ReadIndex
    /// first), checked against `caller`'s read permission as of after the barrier, read on a
    /// blocking thread, with the header at the revision read.
    /// `caller: None` is the server's own read (the lock and election recipes, whose callers
    /// were checked on the recipe's prefix).
    pub async fn range(
        &self,
        caller: Option<&Caller>,
        req: RangeRequest,
    ) -> Result<RangeResponse, Status> {
        let (mut resp, revision) = self
            .read_range(caller, req, Store::range_with_revision)
            .await?;
        resp.header = Some(self.header(revision));
        Ok(resp)
    }

    /// [`ServerContext::range`] for the wire: the key-values of a plain range are sent as stored
    /// ([`Store::range_frame_with_revision`]).
    pub async fn range_frame(
        &self,
        caller: Option<&Caller>,
        req: RangeRequest,
    ) -> Result<RangeFrame, Status> {
        let (mut frame, revision) = self
            .read_range(caller, req, Store::range_frame_with_revision)
            .await?;
        frame.head.header = Some(self.header(revision));
        Ok(frame)
    }

    /// Checks, the linearizable barrier, permissions, then `read` on the current store.
    async fn read_range<T: Send + 'static>(
        &self,
        caller: Option<&Caller>,
        req: RangeRequest,
        read: StoreRead<T>,
    ) -> Result<(T, i64), Status> {
        metastore_mvcc::check_range(&req).map_err(|e| mvcc_status(&e))?;
        if !req.serializable {
            self.linearizable_barrier().await?;
        }
        if let Some(caller) = caller {
            self.authorize(caller, &metastore_auth::needs::range(&req))?;
        }
        let store = self.store.current();
        if req.range_end.is_empty() {
            // One key: an index lookup and at most one backend read, cheaper than the hop to
            // the blocking pool, which cost a third of the leader's CPU under many readers.
            read(&store, &req).map_err(|e| mvcc_status(&e))
        } else {
            tokio::task::spawn_blocking(move || read(&store, &req))
                .await
                .map_err(|e| Status::internal(format!("etcdserver: range task failed: {e}")))?
                .map_err(|e| mvcc_status(&e))
        }
    }

    /// The leader's id when another member leads; `None` when this member leads; etcd's
    /// `no leader` when there is none.
    pub fn remote_leader(&self) -> Result<Option<u64>, Status> {
        let (is_leader, leader_id) = self.raft.with_status(|s| (s.is_leader, s.leader_id));
        if is_leader {
            Ok(None)
        } else if leader_id == 0 {
            Err(Status::unavailable("etcdserver: no leader"))
        } else {
            Ok(Some(leader_id))
        }
    }

    /// etcd serves only Status and serializable Range on a learner; everything else gets
    /// `rpc not supported for learner`.
    pub fn refuse_on_learner(&self) -> Result<(), Status> {
        let member_id = self.member_id;
        if self
            .raft
            .with_status(|s| s.membership.learners.contains(&member_id))
        {
            return Err(Status::unavailable(
                "etcdserver: rpc not supported for learner",
            ));
        }
        Ok(())
    }

    /// Propose a request the server makes itself (not subject to permissions) through raft
    /// and wait until it is applied here: etcd's `request is too large` / `request timed out` /
    /// `no leader`, or the applied result.
    pub async fn propose(&self, request: Request) -> Result<Output, Status> {
        self.propose_data(encode_request(request)).await
    }

    /// Propose a client's request, made by `who`: the apply step checks its permissions again.
    pub async fn propose_as(&self, request: Request, who: &AuthInfo) -> Result<Output, Status> {
        self.propose_data(encode_request_as(request, who)).await
    }

    async fn propose_data(&self, data: Vec<u8>) -> Result<Output, Status> {
        if data.len() > self.limits.max_request_bytes {
            return Err(request_too_large());
        }
        let proposed = tokio::time::timeout(PROPOSAL_TIMEOUT, async {
            loop {
                // Raft dropped it before it reached any log (no leader known here, or a leader
                // handing over its leadership): wait for a leader and propose again, as the
                // caller would, instead of failing during an election or a transfer.
                match self.raft.propose(&data).await {
                    Err(RaftError::NoLeader) => {
                        // `wait_for` looks at the current value first: a leader elected since
                        // the drop is seen at once. Subscribed only here, off the write path.
                        let _ = self.raft.leader_watch().wait_for(|id| *id != 0).await;
                        tokio::time::sleep(NO_LEADER_RETRY_PAUSE).await;
                    }
                    other => return other,
                }
            }
        });
        match proposed.await {
            Err(_) => Err(Status::unavailable("etcdserver: request timed out")),
            Ok(Err(e)) => Err(raft_status(&e)),
            Ok(Ok(Err(e))) => {
                if matches!(e, ApplyError::NoSpace) {
                    self.raise_no_space().await;
                }
                Err(apply_error_status(&e))
            }
            Ok(Ok(Ok(output))) => Ok(output),
        }
    }

    /// etcd's quota check before proposing a write costing `cost_bytes`: when it does not fit,
    /// raise the NOSPACE alarm (through raft) and answer `database space exceeded`.
    pub async fn check_quota(&self, cost_bytes: u64) -> Result<(), Status> {
        // Cheap: the backend size is measured at most every few milliseconds.
        let fits = self.quota.available(cost_bytes);
        if fits {
            return Ok(());
        }
        self.raise_no_space().await;
        Err(no_space())
    }

    /// Propose this member's NOSPACE alarm unless it is already active. Failures are logged:
    /// the caller answers `database space exceeded` either way, and the next write retries.
    async fn raise_no_space(&self) {
        if self.alarms.is_active(AlarmType::Nospace) {
            return;
        }
        tracing::warn!(
            member_id = %format!("{:x}", self.member_id),
            quota_bytes = self.quota.quota_bytes(),
            "backend quota exceeded; raising the NOSPACE alarm"
        );
        let request = Request::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: self.member_id,
            alarm: AlarmType::Nospace as i32,
        });
        let data = encode_request(request);
        match tokio::time::timeout(PROPOSAL_TIMEOUT, self.raft.propose(data)).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "raising the NOSPACE alarm failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "raising the NOSPACE alarm failed"),
            Err(_) => tracing::error!("raising the NOSPACE alarm timed out"),
        }
    }
}
