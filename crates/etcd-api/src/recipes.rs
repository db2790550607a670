//! The building blocks of the Lock and Election services: the KV, lease and watch operations of
//! etcd's client-side concurrency recipes (`client/v3/concurrency`: session, mutex, election),
//! run inside the member.
//!
//! etcd serves Lock and Election through an in-process client. Everything here goes through the
//! same paths as the KV service instead: writes are validated, quota-checked and proposed through
//! raft, reads pass a ReadIndex barrier, and waits are watchers of the member's [`WatchHub`].
//! Because etcd's in-process client turns every failure into a plain Go error, those services
//! answer every error as gRPC `Unknown` with etcd's message ([`as_client_error`]).

use std::sync::Arc;

use metastore_mvcc::{Applied, WriteResponse};
use metastore_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use metastore_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use metastore_proto::etcdserverpb::{
    request_op, response_op, Compare, DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest,
    PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
    WatchCreateRequest,
};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::mvccpb::event::EventType;
use metastore_proto::mvccpb::{Event, KeyValue};
use metastore_proto::watch_frame::WatchFrame;
use metastore_state_machine::Output;
use metastore_watch::{WatchHub, WatchStream};
use tokio::sync::mpsc;
use tonic::{Code, Status};

use metastore_api_context::mvcc_status;
use metastore_auth::Need;

use metastore_api_context::{Caller, ServerContext};

/// TTL of the lease a Lock or Campaign without a lease gets (etcd's `defaultSessionTTL`).
const SESSION_TTL_SECS: i64 = 60;

/// How etcd's Lock and Election servers answer a failure: their in-process client hands them a
/// plain error, which gRPC sends as `Unknown` with the same message.
pub(crate) fn as_client_error(status: Status) -> Status {
    if status.code() == Code::Unknown {
        status
    } else {
        Status::unknown(status.message())
    }
}

/// The key a session holds under `prefix`: etcd's `fmt.Sprintf("%s%x", pfx, leaseID)` (Go
/// prints a negative id as `-` and the hex of its magnitude).
pub(crate) fn session_key(prefix: &[u8], lease_id: i64) -> Vec<u8> {
    let hex = if lease_id < 0 {
        format!("-{:x}", lease_id.unsigned_abs())
    } else {
        format!("{lease_id:x}")
    };
    [prefix, hex.as_bytes()].concat()
}

/// The end of the range of every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub(crate) fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte is 0xff: the range runs to the end of the keyspace.
    vec![0]
}

/// The key under `prefix` with the lowest (`Ascend`) or highest (`Descend`) create revision, at
/// most `max_create_revision` when it is not 0 (etcd's `WithFirstCreate` / `WithLastCreate`).
pub(crate) fn by_create_revision(
    prefix: &[u8],
    order: SortOrder,
    max_create_revision: i64,
) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_range_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: SortTarget::Create as i32,
        max_create_revision,
        ..Default::default()
    }
}

/// A Range of the single key `key`.
pub(crate) fn get(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }
}

/// The comparison `create_revision(key) == revision` (0: the key does not exist).
pub(crate) fn created_at(key: &[u8], revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        range_end: Vec::new(),
        target_union: Some(TargetUnion::CreateRevision(revision)),
    }
}

/// A txn operation putting `value` at `key`, attached to `lease_id`.
pub(crate) fn put_op(key: &[u8], value: Vec<u8>, lease_id: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value,
            lease: lease_id,
            ..Default::default()
        })),
    }
}

/// A txn operation reading `range`.
pub(crate) fn range_op(range: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(range)),
    }
}

/// A txn operation deleting `key`.
pub(crate) fn delete_op(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.to_vec(),
                ..Default::default()
            },
        )),
    }
}

/// The key-values read by the `index`-th operation of a txn that ran (empty if it was no Range).
pub(crate) fn txn_range_kvs(resp: &TxnResponse, index: usize) -> &[KeyValue] {
    match resp.responses.get(index).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(range)) => &range.kvs,
        _ => &[],
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("etcdserver: unexpected apply result for {what}"))
}

/// The KV, lease and watch operations the recipes are made of, on this member.
#[derive(Clone)]
pub(crate) struct Recipes {
    ctx: ServerContext,
    hub: Arc<WatchHub>,
}

impl Recipes {
    /// Recipes over the member's context and watch hub.
    pub(crate) fn new(ctx: ServerContext, hub: Arc<WatchHub>) -> Self {
        Recipes { ctx, hub }
    }

    /// The member's context (headers, proposals).
    pub(crate) fn ctx(&self) -> &ServerContext {
        &self.ctx
    }

    /// Checks that `caller` may use the recipe keys under `prefix` (lock or election name plus
    /// `/`): read, and write too when `write`. The recipe's own reads and writes are then made
    /// by the server.
    pub(crate) fn authorize_prefix(
        &self,
        caller: &Caller,
        prefix: &[u8],
        write: bool,
    ) -> Result<(), Status> {
        let end = prefix_range_end(prefix);
        let mut needs = vec![Need::Read(prefix, &end)];
        if write {
            needs.push(Need::Write(prefix, &end));
        }
        self.ctx.authorize(caller, &needs)?;
        Ok(())
    }

    /// Checks that `caller` may write `key` (unlock, proclaim, resign).
    pub(crate) fn authorize_key(&self, caller: &Caller, key: &[u8]) -> Result<(), Status> {
        self.ctx.authorize(caller, &[Need::Write(key, &[])])?;
        Ok(())
    }

    /// A linearizable Range, validated as the KV service does; the header is filled in.
    pub(crate) async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Status> {
        self.ctx
            .range(
                None,
                RangeRequest {
                    serializable: false,
                    ..req
                },
            )
            .await
    }

    async fn propose_kv(&self, request: Request) -> Result<Applied, Status> {
        match self.ctx.propose(request).await? {
            Output::Kv(applied) => Ok(applied),
            _ => Err(unexpected("kv request")),
        }
    }

    /// A txn with writes, validated and quota-checked as the KV service does, proposed through
    /// raft; the header is filled in.
    pub(crate) async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Status> {
        metastore_mvcc::check_txn(&req, self.ctx.limits.max_txn_ops)
            .map_err(|e| mvcc_status(&e))?;
        self.ctx
            .check_quota(metastore_alarm::txn_cost(&req))
            .await?;
        let applied = self.propose_kv(Request::Txn(req)).await?;
        match applied.response {
            WriteResponse::Txn(mut resp) => {
                resp.header = Some(self.ctx.header(applied.revision));
                Ok(resp)
            }
            _ => Err(unexpected("txn")),
        }
    }

    /// Deletes `key`; the header is filled in.
    pub(crate) async fn delete(&self, key: Vec<u8>) -> Result<DeleteRangeResponse, Status> {
        let req = DeleteRangeRequest {
            key,
            ..Default::default()
        };
        metastore_mvcc::check_delete(&req).map_err(|e| mvcc_status(&e))?;
        let applied = self.propose_kv(Request::DeleteRange(req)).await?;
        match applied.response {
            WriteResponse::DeleteRange(mut resp) => {
                resp.header = Some(self.ctx.header(applied.revision));
                Ok(resp)
            }
            _ => Err(unexpected("delete range")),
        }
    }

    /// The lease a recipe attaches its key to: `lease_id` itself, or for 0 a new lease of
    /// [`SESSION_TTL_SECS`] that nobody keeps alive (etcd's server opens a session with a fresh
    /// lease, then orphans it).
    pub(crate) async fn session_lease(&self, lease_id: i64) -> Result<i64, Status> {
        if lease_id != 0 {
            return Ok(lease_id);
        }
        self.ctx
            .check_quota(metastore_alarm::lease_grant_cost())
            .await?;
        let mut attempts = 0;
        loop {
            // Chosen before proposing, as the Lease service does: applying must be deterministic.
            let id = rand::random::<i64>() & i64::MAX;
            if id == 0 {
                continue;
            }
            let grant = LeaseGrantRequest {
                ttl: SESSION_TTL_SECS,
                id,
            };
            match self.ctx.propose(Request::LeaseGrant(grant)).await {
                Ok(Output::LeaseGrant { id, .. }) => return Ok(id),
                Ok(_) => return Err(unexpected("lease grant")),
                // The random id is taken: draw another.
                Err(status) if status.code() == Code::FailedPrecondition && attempts < 3 => {
                    attempts += 1;
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// Watches `key` (with `range_end`, as in a WatchCreateRequest) from `start_revision` on.
    pub(crate) async fn watch(
        &self,
        key: Vec<u8>,
        range_end: Vec<u8>,
        start_revision: i64,
    ) -> Result<KeyWatch, Status> {
        let (stream, rx) = self.hub.open_stream();
        let create = WatchCreateRequest {
            key,
            range_end,
            start_revision,
            ..Default::default()
        };
        stream
            .create(create)
            .await
            .map_err(|e| Status::internal(format!("etcdserver: {e}")))?;
        Ok(KeyWatch {
            _stream: stream,
            rx,
        })
    }

    /// etcd's `waitDeletes`: returns once no key under `prefix` with a create revision of at
    /// most `max_create_revision` is left, waiting each time for the deletion of the newest such
    /// key (the one just ahead of the caller's).
    pub(crate) async fn wait_deletes(
        &self,
        prefix: &[u8],
        max_create_revision: i64,
    ) -> Result<(), Status> {
        loop {
            let resp = self
                .range(by_create_revision(
                    prefix,
                    SortOrder::Descend,
                    max_create_revision,
                ))
                .await?;
            let Some(kv) = resp.kvs.into_iter().next() else {
                return Ok(());
            };
            let revision = resp.header.map_or(0, |h| h.revision);
            self.wait_delete(kv.key, revision).await?;
        }
    }

    /// etcd's `waitDelete`: waits for a deletion of `key` at `revision` or later.
    async fn wait_delete(&self, key: Vec<u8>, revision: i64) -> Result<(), Status> {
        let mut watch = self.watch(key, Vec::new(), revision).await?;
        loop {
            match watch.next().await {
                WatchBatch::Events { events, .. } => {
                    if events.iter().any(is_delete) {
                        return Ok(());
                    }
                }
                // The history the watcher needed was compacted away; etcd fails the wait, while
                // looking again (in `wait_deletes`) gives the same answer without failing.
                WatchBatch::Compacted => return Ok(()),
                WatchBatch::Closed => {
                    return Err(Status::unknown("lost watcher waiting for delete"))
                }
            }
        }
    }
}

/// Whether `event` is a deletion.
pub(crate) fn is_delete(event: &Event) -> bool {
    event.r#type == EventType::Delete as i32
}

/// What a [`KeyWatch`] delivers next.
pub(crate) enum WatchBatch {
    /// The events of one revision (or of several, when caught up from history).
    Events {
        /// The revision of the watch response's header.
        revision: i64,
        /// The events, in order.
        events: Vec<Event>,
    },
    /// The watcher was cancelled because its start revision was compacted.
    Compacted,
    /// The watcher ended for another reason.
    Closed,
}

/// One watcher on the member's hub, removed when dropped.
pub(crate) struct KeyWatch {
    _stream: WatchStream,
    rx: mpsc::Receiver<WatchFrame>,
}

impl KeyWatch {
    /// The next batch of events, skipping the creation and progress responses.
    pub(crate) async fn next(&mut self) -> WatchBatch {
        loop {
            let Some(frame) = self.rx.recv().await else {
                return WatchBatch::Closed;
            };
            // The hub encoded the events for the wire; a recipe reads them back.
            let Ok(resp) = frame.into_response() else {
                return WatchBatch::Closed;
            };
            if resp.canceled {
                return if resp.compact_revision > 0 {
                    WatchBatch::Compacted
                } else {
                    WatchBatch::Closed
                };
            }
            if resp.events.is_empty() {
                continue;
            }
            return WatchBatch::Events {
                revision: resp.header.map_or(0, |h| h.revision),
                events: resp.events,
            };
        }
    }
}

/// A write that releases a recipe's key if the request is dropped before it completes: etcd's
/// recipes release their key with the server's own context when the caller cancels.
pub(crate) struct ReleaseOnCancel {
    ctx: ServerContext,
    request: Option<Request>,
}

impl ReleaseOnCancel {
    /// Arms `request` (a delete or a txn) to run if this guard is dropped.
    pub(crate) fn new(ctx: &ServerContext, request: Request) -> Self {
        ReleaseOnCancel {
            ctx: ctx.clone(),
            request: Some(request),
        }
    }

    /// The request completed: nothing to release.
    pub(crate) fn disarm(mut self) {
        self.request = None;
    }

    /// Releases now and waits for it; a failure is only logged, as etcd ignores it too.
    pub(crate) async fn release_now(mut self) {
        if let Some(request) = self.request.take() {
            if let Err(status) = self.ctx.propose(request).await {
                tracing::warn!(error = %status.message(), "releasing a lock or election key failed");
            }
        }
    }
}

impl Drop for ReleaseOnCancel {
    fn drop(&mut self) {
        let Some(request) = self.request.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ctx = self.ctx.clone();
        runtime.spawn(async move {
            if let Err(status) = ctx.propose(request).await {
                tracing::warn!(error = %status.message(), "releasing a cancelled lock or election key failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_print_the_lease_as_go_does() {
        assert_eq!(
            session_key(b"lock/", 0x694d_77aa_9e38_260f),
            b"lock/694d77aa9e38260f"
        );
        assert_eq!(session_key(b"lock/", 0), b"lock/0");
        assert_eq!(session_key(b"e/", -1), b"e/-1");
        assert_eq!(session_key(b"e/", i64::MIN), b"e/-8000000000000000");
    }

    #[test]
    fn prefix_range_end_is_etcds() {
        assert_eq!(prefix_range_end(b"lock/"), b"lock0");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn client_errors_keep_the_message_and_become_unknown() {
        let status = as_client_error(Status::not_found("etcdserver: requested lease not found"));
        assert_eq!(status.code(), Code::Unknown);
        assert_eq!(status.message(), "etcdserver: requested lease not found");
    }
}
