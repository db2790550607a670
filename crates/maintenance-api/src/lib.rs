//! etcd's Maintenance gRPC service.
//!
//! Owns: Status (raft and backend figures, active alarms), Hash (CRC32-Castagnoli over the whole
//! backend), HashKV (mvcc's etcd-identical hash), Alarm (proposed through raft), Snapshot (a
//! consistent backend view streamed as etcd's bbolt database followed by its SHA-256 — see
//! [`snapshot`]), Defragment (the backend's, on a blocking thread) and MoveLeader
//! (single-member rules). Downgrade answers `Unimplemented`.
//!
//! Must not depend on: the engine choice (it holds an `Arc<dyn Backend>`), raft internals beyond
//! the [`ServerContext`]'s handle, `metastore-etcd-api` (a sibling: both stand on
//! `metastore-api-context`).

pub mod snapshot;

use std::pin::Pin;
use std::sync::Arc;

use metastore_api_context::{mvcc_status, ServerContext};
use metastore_proto::etcdserverpb::downgrade_request::DowngradeAction;
use metastore_proto::etcdserverpb::maintenance_server::Maintenance;
use metastore_proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse, DowngradeInfo,
    DowngradeRequest, DowngradeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse,
    MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_state_machine::Output;
use metastore_storage::{Backend, ScanRange, Visit};
use tokio_stream::Stream;
use tonic::{Request as GrpcRequest, Response, Status};

/// The etcd API level MetaStore implements, answered as Status's `version` (clients gate
/// features on it, e.g. Kubernetes' watch progress requests need >= 3.5.13).
pub const ETCD_API_VERSION: &str = "3.6.0";

/// `meta` keys left out of Hash, as etcd's `DefaultIgnores` does: they differ between members
/// holding the same data.
const HASH_IGNORED_META_KEYS: &[&[u8]] = &[b"consistent_index", b"term"];

/// etcd's Maintenance service.
pub struct MaintenanceService {
    ctx: ServerContext,
    backend: Arc<dyn Backend>,
}

impl MaintenanceService {
    /// A Maintenance service over `ctx`, reading sizes, hashes and snapshots from `backend`.
    pub fn new(ctx: ServerContext, backend: Arc<dyn Backend>) -> Self {
        MaintenanceService { ctx, backend }
    }
}

fn task_failed(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("etcdserver: {what} task failed: {e}"))
}

fn storage_status(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("etcdserver: storage failure: {e}"))
}

fn hash_ignores(bucket: &str, key: &[u8]) -> bool {
    bucket == metastore_mvcc::META_BUCKET && HASH_IGNORED_META_KEYS.contains(&key)
}

/// CRC32-Castagnoli over every bucket in name order: the bucket name, then each key and value in
/// key order (etcd's `backend.Hash` with its default ignores).
pub fn backend_hash(backend: &dyn Backend) -> metastore_storage::Result<u32> {
    let view = backend.snapshot()?;
    let mut buckets = backend.buckets();
    buckets.sort_unstable();
    let mut crc = 0;
    for bucket in buckets {
        crc = crc32c::crc32c_append(crc, bucket.as_bytes());
        view.scan(bucket, ScanRange::all(), &mut |k, v| {
            if !hash_ignores(bucket, k) {
                crc = crc32c::crc32c_append(crc, k);
                crc = crc32c::crc32c_append(crc, v);
            }
            Visit::Continue
        })?;
    }
    Ok(crc)
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: GrpcRequest<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let caller = metastore_api_context::Caller::of(&request);
        let req = request.into_inner();
        // etcd 3.5+: any user may list alarms; raising or clearing one needs root.
        let need = if req.action
            == metastore_proto::etcdserverpb::alarm_request::AlarmAction::Get as i32
        {
            metastore_auth::Need::Authenticated
        } else {
            metastore_auth::Need::Admin
        };
        let who = self.ctx.authorize(&caller, &[need])?;
        match self.ctx.propose_as(Request::Alarm(req), &who).await? {
            Output::Alarm(mut resp) => {
                resp.header = Some(self.ctx.header(0));
                Ok(Response::new(resp))
            }
            _ => Err(Status::internal(
                "etcdserver: unexpected apply result for alarm",
            )),
        }
    }

    async fn status(
        &self,
        _request: GrpcRequest<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let raft = self.ctx.raft.status();
        let backend = self.backend.clone();
        let size = tokio::task::spawn_blocking(move || backend.size())
            .await
            .map_err(|e| task_failed("status", e))?
            .map_err(storage_status)?;
        let mut errors = Vec::new();
        if raft.leader_id == 0 {
            errors.push("etcdserver: no leader".to_string());
        }
        errors.extend(
            self.ctx
                .alarms
                .get(AlarmType::None)
                .iter()
                .map(metastore_alarm::alarm_text),
        );
        Ok(Response::new(StatusResponse {
            header: Some(self.ctx.header(0)),
            version: ETCD_API_VERSION.to_string(),
            db_size: i64::try_from(size.size_bytes).unwrap_or(i64::MAX),
            leader: raft.leader_id,
            raft_index: raft.committed_index,
            raft_term: raft.term,
            raft_applied_index: raft.applied_index,
            errors,
            db_size_in_use: i64::try_from(size.size_in_use_bytes).unwrap_or(i64::MAX),
            is_learner: raft.membership.learners.contains(&self.ctx.member_id),
            storage_version: ETCD_API_VERSION.to_string(),
            db_size_quota: i64::try_from(self.ctx.quota.quota_bytes()).unwrap_or(i64::MAX),
            downgrade_info: Some(DowngradeInfo {
                enabled: false,
                target_version: String::new(),
            }),
        }))
    }

    async fn defragment(
        &self,
        _request: GrpcRequest<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let backend = self.backend.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || backend.defragment())
            .await
            .map_err(|e| task_failed("defragment", e))?
            .map_err(storage_status)?;
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "defragmented the backend"
        );
        // etcd answers Defragment without a header.
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    async fn hash(
        &self,
        _request: GrpcRequest<HashRequest>,
    ) -> Result<Response<HashResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let revision = self.ctx.store.current().current_revision();
        let backend = self.backend.clone();
        let hash = tokio::task::spawn_blocking(move || backend_hash(&*backend))
            .await
            .map_err(|e| task_failed("hash", e))?
            .map_err(storage_status)?;
        Ok(Response::new(HashResponse {
            header: Some(self.ctx.header(revision)),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: GrpcRequest<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let revision = request.into_inner().revision;
        let store = self.ctx.store.current();
        let h = tokio::task::spawn_blocking(move || store.hash_kv(revision))
            .await
            .map_err(|e| task_failed("hashkv", e))?
            .map_err(|e| mvcc_status(&e))?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.ctx.header(h.current_revision)),
            hash: h.hash,
            compact_revision: h.compact_revision,
            hash_revision: h.hash_revision,
        }))
    }

    type SnapshotStream =
        Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send + 'static>>;

    async fn snapshot(
        &self,
        _request: GrpcRequest<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.ctx.refuse_on_learner()?;
        let rx = snapshot::stream(self.backend.clone(), ETCD_API_VERSION);
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn move_leader(
        &self,
        request: GrpcRequest<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let target = request.into_inner().target_id;
        let raft = self.ctx.raft.status();
        if !raft.is_leader {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        // etcd answers MoveLeader without a header.
        if target == self.ctx.member_id {
            return Ok(Response::new(MoveLeaderResponse { header: None }));
        }
        if !raft.membership.voters.contains(&target) {
            return Err(Status::failed_precondition(
                "etcdserver: bad leader transferee",
            ));
        }
        self.ctx
            .raft
            .transfer_leader(target)
            .map_err(|e| metastore_api_context::raft_status(&e))?;
        // etcd waits up to its request timeout for the transferee to lead.
        match self
            .ctx
            .raft
            .wait_leader_is(target, metastore_api_context::PROPOSAL_TIMEOUT)
            .await
        {
            Ok(()) => Ok(Response::new(MoveLeaderResponse { header: None })),
            Err(metastore_raft_node::RaftError::Timeout) => Err(Status::unavailable(
                "etcdserver: request timed out, leader transfer took too long",
            )),
            Err(e) => Err(metastore_api_context::raft_status(&e)),
        }
    }

    /// etcd's rules, for the versions MetaStore supports: a target must be a `major.minor[.patch]`
    /// version (else `wrong downgrade target version format`) and a release this cluster could
    /// downgrade to. MetaStore has a single release, serving etcd's 3.6 API, so no target is
    /// valid (`invalid downgrade target version`), no downgrade is ever in progress, and CANCEL
    /// answers `no inflight downgrade job` — exactly what etcd answers in those situations.
    async fn downgrade(
        &self,
        request: GrpcRequest<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let req = request.into_inner();
        match DowngradeAction::try_from(req.action) {
            Ok(DowngradeAction::Cancel) => Err(Status::failed_precondition(
                "etcdserver: no inflight downgrade job",
            )),
            Ok(DowngradeAction::Validate | DowngradeAction::Enable) => {
                if !is_cluster_version(&req.version) {
                    return Err(Status::invalid_argument(
                        "etcdserver: wrong downgrade target version format",
                    ));
                }
                Err(Status::invalid_argument(
                    "etcdserver: invalid downgrade target version",
                ))
            }
            Err(_) => Err(Status::invalid_argument(format!(
                "etcdserver: unknown downgrade action {}",
                req.action
            ))),
        }
    }
}

/// `major.minor` or `major.minor.patch`, numbers only (etcd parses the target as a semantic
/// version and keeps major.minor).
fn is_cluster_version(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}
