//! The Lock service: Lock and Unlock, etcd's `v3lock` server over its `concurrency.Mutex`.
//!
//! Lock puts the key `name/<lease id in hex>` (empty value, attached to the lease) unless that
//! key exists already, then waits until every key under `name/` created before it is deleted:
//! the waiters form a queue ordered by create revision, each watching the key just ahead of it.
//! The lock is released by Unlock (a delete of the key), by the lease expiring or being revoked,
//! or, while still waiting, by the caller cancelling (the key is deleted for it).

use std::sync::Arc;

use metastore_proto::etcdserverpb::range_request::SortOrder;
use metastore_proto::etcdserverpb::{DeleteRangeRequest, TxnRequest};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::v3lockpb::lock_server::Lock;
use metastore_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use metastore_watch::WatchHub;
use tonic::{Request as GrpcRequest, Response, Status};

use crate::recipes::{
    as_client_error, by_create_revision, created_at, get, put_op, range_op, session_key,
    txn_range_kvs, Recipes, ReleaseOnCancel,
};
use metastore_api_context::{Caller, ServerContext};

/// etcd's error when the waiter's own key vanished (its lease expired) while it waited.
const SESSION_EXPIRED: &str = "mutex: session is expired";

/// etcd's Lock service.
pub struct LockService {
    recipes: Recipes,
}

impl LockService {
    /// A Lock service over the member's context and watch hub (the waits are watchers).
    pub fn new(ctx: &ServerContext, watch_hub: &Arc<WatchHub>) -> Self {
        LockService {
            recipes: Recipes::new(ctx.clone(), watch_hub.clone()),
        }
    }

    /// etcd's `Mutex.Lock` with a session on `req.lease` (a fresh 60 s lease for 0).
    async fn lock(&self, req: LockRequest) -> Result<LockResponse, Status> {
        let lease_id = self.recipes.session_lease(req.lease).await?;
        let prefix = [req.name.as_slice(), b"/"].concat();
        let key = session_key(&prefix, lease_id);
        // Queue up unless this lease queued already (locking twice with one lease is a no-op),
        // and read the current holder in the same revision.
        let owner = by_create_revision(&prefix, SortOrder::Ascend, 0);
        let txn = TxnRequest {
            compare: vec![created_at(&key, 0)],
            success: vec![put_op(&key, Vec::new(), lease_id), range_op(owner.clone())],
            failure: vec![range_op(get(&key)), range_op(owner)],
        };
        let resp = self.recipes.txn(txn).await?;
        let my_revision = if resp.succeeded {
            resp.header.as_ref().map_or(0, |h| h.revision)
        } else {
            txn_range_kvs(&resp, 0)
                .first()
                .map(|kv| kv.create_revision)
                .ok_or_else(|| Status::internal("etcdserver: lock key vanished inside a txn"))?
        };
        let holder = txn_range_kvs(&resp, 1).first();
        if holder.is_none_or(|kv| kv.create_revision == my_revision) {
            return Ok(LockResponse {
                header: resp.header,
                key,
            });
        }

        let release = ReleaseOnCancel::new(
            self.recipes.ctx(),
            Request::DeleteRange(DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            }),
        );
        if let Err(e) = self.recipes.wait_deletes(&prefix, my_revision - 1).await {
            release.release_now().await;
            return Err(e);
        }
        // Still queued? The lease may have expired while waiting.
        let mine = match self.recipes.range(get(&key)).await {
            Ok(mine) => mine,
            Err(e) => {
                release.release_now().await;
                return Err(e);
            }
        };
        release.disarm();
        if mine.kvs.is_empty() {
            return Err(Status::unknown(SESSION_EXPIRED));
        }
        Ok(LockResponse {
            header: mine.header,
            key,
        })
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(
        &self,
        request: GrpcRequest<LockRequest>,
    ) -> Result<Response<LockResponse>, Status> {
        self.recipes.ctx().refuse_on_learner()?;
        let prefix = [request.get_ref().name.as_slice(), b"/"].concat();
        self.recipes
            .authorize_prefix(&Caller::of(&request), &prefix, true)?;
        LockService::lock(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(as_client_error)
    }

    async fn unlock(
        &self,
        request: GrpcRequest<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        self.recipes.ctx().refuse_on_learner()?;
        self.recipes
            .authorize_key(&Caller::of(&request), &request.get_ref().key)?;
        let resp = self
            .recipes
            .delete(request.into_inner().key)
            .await
            .map_err(as_client_error)?;
        Ok(Response::new(UnlockResponse {
            header: resp.header,
        }))
    }
}
