//! The Lease service: Grant, Revoke, KeepAlive, TimeToLive, Leases.
//!
//! Grant picks the lease id before proposing (when the client leaves it 0), so that applying stays
//! deterministic. Renewals and TTL reads are local to the lessor; only the leader counts leases
//! down (a follower forwards them to it), and the leader's expiry loop, which proposes a revoke
//! for each lease that ran out, is one of the server's leader duties.

use std::pin::Pin;
use std::sync::Arc;

use metastore_lease::{LeaseError, Lessor, MAX_LEASE_TTL_SECS};
use metastore_proto::etcdserverpb::lease_server::Lease;
use metastore_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_state_machine::Output;
use tokio_stream::Stream;
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

use metastore_api_context::lease_status;
use metastore_auth::Need;

use metastore_api_context::{Caller, ServerContext};

/// etcd's Lease service.
pub struct LeaseService {
    ctx: ServerContext,
    lessor: Arc<Lessor>,
}

impl LeaseService {
    /// A Lease service over the member's lease table.
    pub fn new(ctx: ServerContext, lessor: Arc<Lessor>) -> Self {
        LeaseService { ctx, lessor }
    }

    fn unexpected() -> Status {
        Status::internal("etcdserver: unexpected apply result for a lease request")
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: GrpcRequest<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let who = self
            .ctx
            .authorize(&Caller::of(&request), &[Need::Authenticated])?;
        let req = request.into_inner();
        if req.ttl > MAX_LEASE_TTL_SECS {
            return Err(lease_status(&LeaseError::TtlTooLarge));
        }
        let id = if req.id != 0 {
            req.id
        } else {
            // Chosen here, not when applying: every member must apply the same id.
            loop {
                let id = rand::random::<i64>() & i64::MAX;
                if id != 0 && !self.lessor.contains(id) {
                    break id;
                }
            }
        };
        if self.lessor.contains(id) {
            return Err(lease_status(&LeaseError::Exists));
        }
        // etcd refuses new leases while NOSPACE is active, before proposing (and again at apply).
        self.ctx
            .check_quota(metastore_alarm::lease_grant_cost())
            .await?;
        let grant = LeaseGrantRequest { ttl: req.ttl, id };
        match self
            .ctx
            .propose_as(Request::LeaseGrant(grant), &who)
            .await?
        {
            Output::LeaseGrant { id, ttl_secs } => Ok(Response::new(LeaseGrantResponse {
                header: Some(self.ctx.header(0)),
                id,
                ttl: ttl_secs,
                error: String::new(),
            })),
            _ => Err(Self::unexpected()),
        }
    }

    async fn lease_revoke(
        &self,
        request: GrpcRequest<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let caller = Caller::of(&request);
        let req = request.into_inner();
        // etcd's checkLeasePuts: write permission on every attached key.
        let keys = self.ctx.lease_keys_to_check(req.id);
        let needs: Vec<Need<'_>> = keys.iter().map(|k| Need::Write(k, &[])).collect();
        let who = self.ctx.authorize(&caller, &needs)?;
        match self.ctx.propose_as(Request::LeaseRevoke(req), &who).await? {
            Output::LeaseRevoke { revision } => Ok(Response::new(LeaseRevokeResponse {
                header: Some(self.ctx.header(revision)),
            })),
            _ => Err(Self::unexpected()),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: GrpcRequest<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        self.ctx.refuse_on_learner()?;
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let ctx = self.ctx.clone();
        let lessor = self.lessor.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                // etcd 3.5+: renewing needs write permission on the lease's keys, checked with
                // the stream's credentials as they are now.
                let keys = ctx.lease_keys_to_check(req.id);
                let needs: Vec<Need<'_>> = keys.iter().map(|k| Need::Write(k, &[])).collect();
                let mut needs = needs;
                needs.push(Need::Authenticated);
                if let Err(status) = ctx.authorize_on_stream(&caller, &needs) {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                // Only the leader counts leases down: a follower forwards the renewal.
                let renewed = match ctx.remote_leader() {
                    Ok(None) => lessor.renew(req.id).map_err(|e| lease_status(&e)),
                    Ok(Some(leader)) => ctx
                        .forwarder
                        .lease_renew(leader, req.id)
                        .await
                        .and_then(|ttl| ttl.ok_or_else(|| lease_status(&LeaseError::NotFound))),
                    Err(status) => Err(status),
                };
                // etcd answers TTL 0 for a lease it does not know (or that just expired).
                let ttl = match renewed {
                    Ok(ttl) => ttl,
                    Err(status) if status.code() == tonic::Code::NotFound => 0,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let resp = LeaseKeepAliveResponse {
                    header: Some(ctx.header(0)),
                    id: req.id,
                    ttl,
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn lease_time_to_live(
        &self,
        request: GrpcRequest<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let caller = Caller::of(&request);
        let req = request.into_inner();
        // Linearizable: the table reflects every grant and revoke committed before the call.
        self.ctx.linearizable_barrier().await?;
        let mut found = self.lessor.time_to_live(req.id);
        // etcd's checkLeaseTimeToLive: listing the keys needs read permission on each.
        match (&found, req.keys) {
            (Some(status), true) => {
                let needs: Vec<Need<'_>> = status.keys.iter().map(|k| Need::Read(k, &[])).collect();
                self.ctx.authorize(&caller, &needs)?;
            }
            _ => {
                self.ctx.authorize(&caller, &[Need::Authenticated])?;
            }
        }
        // The remaining TTL is only counted on the leader.
        if let (Some(status), Some(leader)) = (found.as_mut(), self.ctx.remote_leader()?) {
            match self.ctx.forwarder.lease_ttl(leader, req.id).await? {
                Some((remaining, granted)) => {
                    status.remaining_ttl_secs = remaining;
                    status.granted_ttl_secs = granted;
                }
                None => found = None,
            }
        }
        let resp = match found {
            None => LeaseTimeToLiveResponse {
                header: Some(self.ctx.header(0)),
                id: req.id,
                ttl: -1,
                ..Default::default()
            },
            Some(status) => LeaseTimeToLiveResponse {
                header: Some(self.ctx.header(0)),
                id: req.id,
                ttl: status.remaining_ttl_secs,
                granted_ttl: status.granted_ttl_secs,
                keys: if req.keys { status.keys } else { Vec::new() },
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        request: GrpcRequest<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        // etcd 3.5+: listing leases needs read permission on every attached key.
        let ids = self.lessor.leases();
        let keys: Vec<Vec<u8>> = ids
            .iter()
            .flat_map(|id| self.ctx.lease_keys_to_check(*id))
            .collect();
        let mut needs: Vec<Need<'_>> = keys.iter().map(|k| Need::Read(k, &[])).collect();
        needs.push(Need::Authenticated);
        self.ctx.authorize(&Caller::of(&request), &needs)?;
        let leases = self
            .lessor
            .leases()
            .into_iter()
            .map(|id| LeaseStatus { id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.ctx.header(0)),
            leases,
        }))
    }
}
