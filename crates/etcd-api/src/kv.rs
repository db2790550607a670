//! The KV service: Range, Put, DeleteRange, Txn, Compact.
//!
//! Writes are validated as etcd's v3rpc layer does, then proposed through raft; the proposer's
//! waiter gets the applied result. Linearizable ranges pass a ReadIndex barrier first;
//! serializable ones read the local store at once. Reads run on blocking threads. A Compact is
//! answered once applied (the store deletes history in the background), or with `physical` once
//! the store's compaction worker finished deleting, as etcd does.

use std::sync::Arc;

use metastore_mvcc::{Applied, WriteResponse};
use metastore_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, TxnRequest, TxnResponse,
};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::range_frame::{Kv, RangeFrame};
use metastore_state_machine::Output;
use tonic::{Request as GrpcRequest, Response, Status};

use metastore_auth::{needs, AuthInfo, Need};

use metastore_api_context::{mvcc_status, Caller, ServerContext};

/// etcd's KV service.
pub struct KvService {
    ctx: ServerContext,
}

impl KvService {
    /// A KV service over `ctx`.
    pub fn new(ctx: ServerContext) -> Self {
        KvService { ctx }
    }

    /// Wait until the compaction at `revision` finished deleting. A snapshot restore may replace
    /// the store meanwhile; the new one resumes the compaction, so the wait goes on there.
    async fn wait_compaction(&self, revision: i64) -> Result<(), Status> {
        loop {
            let store = self.ctx.store.current();
            let waited = Arc::clone(&store);
            let finished = tokio::task::spawn_blocking(move || waited.wait_compaction(revision))
                .await
                .map_err(|e| Status::internal(format!("etcdserver: compaction wait failed: {e}")))?
                .map_err(|e| mvcc_status(&e))?;
            if finished || Arc::ptr_eq(&store, &self.ctx.store.current()) {
                return Ok(());
            }
        }
    }

    async fn propose(&self, request: Request, who: &AuthInfo) -> Result<Applied, Status> {
        match self.ctx.propose_as(request, who).await? {
            Output::Kv(applied) => Ok(applied),
            _ => Err(unexpected("kv request")),
        }
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("etcdserver: unexpected apply result for {what}"))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: GrpcRequest<RangeRequest>,
    ) -> Result<Response<RangeFrame>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        if !req.serializable {
            self.ctx.refuse_on_learner()?;
        }
        let frame = self.ctx.range_frame(Some(&caller), req).await?;
        Ok(Response::new(frame))
    }

    async fn put(&self, request: GrpcRequest<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let caller = Caller::of(&request);
        let req = request.into_inner();
        metastore_mvcc::check_put(&req).map_err(|e| mvcc_status(&e))?;
        // etcd's checkLeasePuts: the lease's keys must be writable too.
        let lease_keys = self.ctx.lease_keys_to_check(req.lease);
        let mut put_needs = needs::put(&req);
        put_needs.extend(lease_keys.iter().map(|k| Need::Write(k, &[])));
        let who = self.ctx.authorize(&caller, &put_needs)?;
        self.ctx
            .check_quota(metastore_alarm::put_cost(&req))
            .await?;
        let applied = self.propose(Request::Put(req), &who).await?;
        match applied.response {
            WriteResponse::Put(mut resp) => {
                resp.header = Some(self.ctx.header(applied.revision));
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("put")),
        }
    }

    async fn delete_range(
        &self,
        request: GrpcRequest<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let caller = Caller::of(&request);
        let req = request.into_inner();
        metastore_mvcc::check_delete(&req).map_err(|e| mvcc_status(&e))?;
        let who = self.ctx.authorize(&caller, &needs::delete_range(&req))?;
        let applied = self.propose(Request::DeleteRange(req), &who).await?;
        match applied.response {
            WriteResponse::DeleteRange(mut resp) => {
                resp.header = Some(self.ctx.header(applied.revision));
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("delete range")),
        }
    }

    async fn txn(&self, request: GrpcRequest<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let caller = Caller::of(&request);
        let req = request.into_inner();
        metastore_mvcc::check_txn(&req, self.ctx.limits.max_txn_ops)
            .map_err(|e| mvcc_status(&e))?;
        if metastore_mvcc::is_txn_read_only(&req) {
            // Like etcd, a read-only txn is served locally after the read barrier: it changes
            // nothing, so it need not go through the log.
            self.ctx.linearizable_barrier().await?;
            self.ctx.authorize(&caller, &needs::txn(&req))?;
            let store = self.ctx.store.current();
            let (mut resp, revision) =
                tokio::task::spawn_blocking(move || store.txn_read_only(&req))
                    .await
                    .map_err(|e| Status::internal(format!("etcdserver: txn task failed: {e}")))?
                    .map_err(|e| mvcc_status(&e))?;
            resp.header = Some(self.ctx.header(revision));
            return Ok(Response::new(resp));
        }
        let who = self.ctx.authorize(&caller, &needs::txn(&req))?;
        self.ctx
            .check_quota(metastore_alarm::txn_cost(&req))
            .await?;
        let applied = self.propose(Request::Txn(req), &who).await?;
        match applied.response {
            WriteResponse::Txn(mut resp) => {
                resp.header = Some(self.ctx.header(applied.revision));
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("txn")),
        }
    }

    async fn compact(
        &self,
        request: GrpcRequest<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let who = self.ctx.authorize(&Caller::of(&request), &[Need::Admin])?;
        let req = request.into_inner();
        let (revision, physical) = (req.revision, req.physical);
        let applied = self.propose(Request::Compaction(req), &who).await?;
        if physical {
            self.wait_compaction(revision).await?;
        }
        match applied.response {
            WriteResponse::Compact(mut resp) => {
                resp.header = Some(self.ctx.header(applied.revision));
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("compaction")),
        }
    }
}
