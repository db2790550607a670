//! The Election service: Campaign, Proclaim, Leader, Observe, Resign — etcd's `v3election`
//! server over its `concurrency.Election`.
//!
//! A candidate's key is `name/<lease id in hex>`, holding its proclaimed value and attached to its
//! lease. The leader is the key under `name/` with the lowest create revision; Campaign waits, as
//! Lock does, until every older key is deleted. A [`LeaderKey`] names a leadership by key and
//! create revision, so Proclaim and Resign act only while that very key still exists (like etcd,
//! they do not check that it still leads: a queued candidate may proclaim). Observe follows the
//! leader key: each put on it (a new value) and, after its deletion, the next leader.

use std::pin::Pin;
use std::sync::Arc;

use metastore_proto::etcdserverpb::range_request::SortOrder;
use metastore_proto::etcdserverpb::{ResponseHeader, TxnRequest};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::mvccpb::KeyValue;
use metastore_proto::v3electionpb::election_server::Election;
use metastore_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use metastore_watch::WatchHub;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request as GrpcRequest, Response, Status};

use crate::recipes::{
    as_client_error, by_create_revision, created_at, delete_op, get, is_delete, prefix_range_end,
    put_op, range_op, session_key, txn_range_kvs, Recipes, ReleaseOnCancel, WatchBatch,
};
use metastore_api_context::{Caller, ServerContext};

/// etcd's `ErrElectionNotLeader`: the leader key is gone or was re-created.
const NOT_LEADER: &str = "election: not leader";
/// etcd's `ErrElectionNoLeader`: no candidate under the election's prefix.
const NO_LEADER: &str = "election: no leader";
/// etcd's `ErrMissingLeaderKey`.
const MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";

/// etcd's Election service.
pub struct ElectionService {
    recipes: Recipes,
}

fn election_prefix(name: &[u8]) -> Vec<u8> {
    [name, b"/"].concat()
}

/// The key of a request's leader (empty when missing; the recipe then refuses it).
fn leader_key(leader: &Option<LeaderKey>) -> &[u8] {
    leader.as_ref().map_or(&[], |l| l.key.as_slice())
}

fn leader_of(leader: Option<LeaderKey>) -> Result<LeaderKey, Status> {
    leader.ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))
}

/// Resigns `key` if it is still the leadership created at `revision`.
fn resign_txn(key: &[u8], revision: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![created_at(key, revision)],
        success: vec![delete_op(key)],
        failure: Vec::new(),
    }
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send + 'static>>;

impl ElectionService {
    /// An Election service over the member's context and watch hub (the waits are watchers).
    pub fn new(ctx: &ServerContext, watch_hub: &Arc<WatchHub>) -> Self {
        ElectionService {
            recipes: Recipes::new(ctx.clone(), watch_hub.clone()),
        }
    }

    /// etcd's `Election.Proclaim`: puts `value` at the leader key if it is still the one created
    /// at `revision`. The answer's header is the txn's.
    async fn proclaim_as(
        &self,
        key: &[u8],
        revision: i64,
        lease_id: i64,
        value: Vec<u8>,
    ) -> Result<Option<ResponseHeader>, Status> {
        let txn = TxnRequest {
            compare: vec![created_at(key, revision)],
            success: vec![put_op(key, value, lease_id)],
            failure: Vec::new(),
        };
        let resp = self.recipes.txn(txn).await?;
        if !resp.succeeded {
            return Err(Status::unknown(NOT_LEADER));
        }
        Ok(resp.header)
    }

    /// etcd's `Election.Campaign` with a session on `req.lease` (a fresh 60 s lease for 0).
    async fn campaign(&self, req: CampaignRequest) -> Result<CampaignResponse, Status> {
        let lease_id = self.recipes.session_lease(req.lease).await?;
        let prefix = election_prefix(&req.name);
        let key = session_key(&prefix, lease_id);
        let txn = TxnRequest {
            compare: vec![created_at(&key, 0)],
            success: vec![put_op(&key, req.value.clone(), lease_id)],
            failure: vec![range_op(get(&key))],
        };
        let resp = self.recipes.txn(txn).await?;
        let mut revision = resp.header.as_ref().map_or(0, |h| h.revision);
        if !resp.succeeded {
            // This lease campaigns already: keep its place and post the new value.
            let existing = txn_range_kvs(&resp, 0).first().ok_or_else(|| {
                Status::internal("etcdserver: election key vanished inside a txn")
            })?;
            revision = existing.create_revision;
            if existing.value != req.value {
                if let Err(e) = self
                    .proclaim_as(&key, revision, lease_id, req.value.clone())
                    .await
                {
                    let _ = self.recipes.txn(resign_txn(&key, revision)).await;
                    return Err(e);
                }
            }
        }

        // Only a cancelled campaign gives up its key; etcd keeps it on other failures.
        let resign_on_cancel =
            ReleaseOnCancel::new(self.recipes.ctx(), Request::Txn(resign_txn(&key, revision)));
        let waited = self.recipes.wait_deletes(&prefix, revision - 1).await;
        resign_on_cancel.disarm();
        waited?;
        Ok(CampaignResponse {
            // etcd answers the header of the campaign's first txn.
            header: resp.header,
            leader: Some(LeaderKey {
                name: req.name,
                key,
                rev: revision,
                lease: lease_id,
            }),
        })
    }

    async fn proclaim(&self, req: ProclaimRequest) -> Result<ProclaimResponse, Status> {
        let leader = leader_of(req.leader)?;
        // etcd resumes the election in a session on the leader's lease (a fresh one for 0).
        let lease_id = self.recipes.session_lease(leader.lease).await?;
        let header = self
            .proclaim_as(&leader.key, leader.rev, lease_id, req.value)
            .await?;
        Ok(ProclaimResponse { header })
    }

    async fn leader(&self, req: LeaderRequest) -> Result<LeaderResponse, Status> {
        let prefix = election_prefix(&req.name);
        let resp = self
            .recipes
            .range(by_create_revision(&prefix, SortOrder::Ascend, 0))
            .await?;
        let kv = resp
            .kvs
            .into_iter()
            .next()
            .ok_or_else(|| Status::unknown(NO_LEADER))?;
        Ok(LeaderResponse {
            header: resp.header,
            kv: Some(kv),
        })
    }

    async fn resign(&self, req: ResignRequest) -> Result<ResignResponse, Status> {
        let leader = leader_of(req.leader)?;
        // Not (or no longer) the leader: nothing is deleted, and that is no error (etcd's
        // behaviour). etcd also opens a session on `leader.lease` here, granting a lease it never
        // uses when that is 0; nothing depends on it, so none is granted.
        let resp = self
            .recipes
            .txn(resign_txn(&leader.key, leader.rev))
            .await?;
        Ok(ResignResponse {
            header: resp.header,
        })
    }
}

/// etcd's `Election.Observe`: sends the current leader (waiting for the first candidate if there
/// is none), then every put on its key; once that key is deleted, the next leader, and so on.
/// Returns when the receiver is gone. A failed read ends the stream with that error as its last
/// message (etcd ends it without one, which a client cannot tell from a clean end).
async fn observe(
    recipes: Recipes,
    prefix: Vec<u8>,
    tx: mpsc::Sender<Result<LeaderResponse, Status>>,
) {
    let failed = match observe_leaders(&recipes, &prefix, &tx).await {
        Ok(()) => return,
        Err(status) => status,
    };
    let _ = tx.send(Err(as_client_error(failed))).await;
}

async fn observe_leaders(
    recipes: &Recipes,
    prefix: &[u8],
    tx: &mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), Status> {
    let ctx = recipes.ctx();
    // (key, mod revision) of the last value sent: a watcher restarted after a compaction must
    // not report the same value twice.
    let mut last_sent: Option<(Vec<u8>, i64)> = None;
    let send = |header: ResponseHeader, kv: KeyValue| async move {
        let resp = LeaderResponse {
            header: Some(header),
            kv: Some(kv),
        };
        tx.send(Ok(resp)).await.is_ok()
    };
    loop {
        let resp = recipes
            .range(by_create_revision(prefix, SortOrder::Ascend, 0))
            .await?;
        let range_revision = resp.header.as_ref().map_or(0, |h| h.revision);
        let (header, kv) = match resp.kvs.into_iter().next() {
            Some(kv) => (resp.header.unwrap_or_default(), kv),
            None => {
                // No leader yet: the first key put under the prefix becomes it.
                let mut watch = recipes
                    .watch(prefix.to_vec(), prefix_range_end(prefix), range_revision)
                    .await?;
                let first_put = loop {
                    match watch.next().await {
                        WatchBatch::Events { events, .. } => {
                            if let Some(kv) = events
                                .into_iter()
                                .find(|e| !is_delete(e))
                                .and_then(|e| e.kv)
                            {
                                break Some(kv);
                            }
                        }
                        WatchBatch::Compacted => break None,
                        WatchBatch::Closed => return Ok(()),
                    }
                };
                let Some(kv) = first_put else { continue };
                (ctx.header(kv.mod_revision), kv)
            }
        };
        let revision = header.revision;
        let key = kv.key.clone();
        let current = Some((kv.key.clone(), kv.mod_revision));
        if last_sent != current {
            last_sent = current;
            if !send(header, kv).await {
                return Ok(());
            }
        }

        // Follow the leader key until it is deleted.
        let mut watch = recipes.watch(key, Vec::new(), revision + 1).await?;
        'leader: loop {
            match watch.next().await {
                WatchBatch::Events { revision, events } => {
                    for event in events {
                        if is_delete(&event) {
                            break 'leader;
                        }
                        let Some(kv) = event.kv else { continue };
                        last_sent = Some((kv.key.clone(), kv.mod_revision));
                        if !send(ctx.header(revision), kv).await {
                            return Ok(());
                        }
                    }
                }
                // Events were lost to a compaction: read the leader again.
                WatchBatch::Compacted => break 'leader,
                WatchBatch::Closed => return Ok(()),
            }
        }
    }
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        request: GrpcRequest<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        self.recipes.ctx().refuse_on_learner()?;
        let prefix = election_prefix(&request.get_ref().name);
        self.recipes
            .authorize_prefix(&Caller::of(&request), &prefix, true)?;
        ElectionService::campaign(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(as_client_error)
    }

    async fn proclaim(
        &self,
        request: GrpcRequest<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        self.recipes.ctx().refuse_on_learner()?;
        self.recipes
            .authorize_key(&Caller::of(&request), leader_key(&request.get_ref().leader))?;
        ElectionService::proclaim(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(as_client_error)
    }

    async fn leader(
        &self,
        request: GrpcRequest<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        self.recipes.ctx().refuse_on_learner()?;
        let prefix = election_prefix(&request.get_ref().name);
        self.recipes
            .authorize_prefix(&Caller::of(&request), &prefix, false)?;
        ElectionService::leader(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(as_client_error)
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        request: GrpcRequest<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        self.recipes.ctx().refuse_on_learner()?;
        let caller = Caller::of(&request);
        let prefix = election_prefix(&request.into_inner().name);
        self.recipes.authorize_prefix(&caller, &prefix, false)?;
        // Unbuffered in etcd; a small buffer keeps the observer a step ahead at most.
        let (tx, rx) = mpsc::channel(1);
        let recipes = self.recipes.clone();
        tokio::spawn(async move {
            // Stop as soon as the client leaves, even while no leader changes.
            let closed = tx.clone();
            tokio::select! {
                _ = observe(recipes, prefix, tx) => {}
                _ = closed.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(
        &self,
        request: GrpcRequest<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        self.recipes.ctx().refuse_on_learner()?;
        self.recipes
            .authorize_key(&Caller::of(&request), leader_key(&request.get_ref().leader))?;
        ElectionService::resign(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(as_client_error)
    }
}
