//! The Cluster service: MemberList, MemberAdd, MemberRemove, MemberUpdate, MemberPromote.
//!
//! Adding, promoting and removing members are raft membership changes (carrying the member's
//! URLs); MemberUpdate and each member's publication of its name and client URLs (made by the
//! server's own duties) are ordinary entries. The refusals are etcd's, with its codes and
//! messages.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

use metastore_proto::etcdserverpb::cluster_server::Cluster;
use metastore_proto::etcdserverpb::{
    Member as PbMember, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::metastorepb::{Member, MemberPeerUrls};
use metastore_raft_node::MemberChange;
use metastore_state_machine::{ApplyError, Output};
use prost::Message;
use tonic::{Request as GrpcRequest, Response, Status};

use metastore_api_context::{
    apply_error_status, member_not_found, raft_status, request_too_large, ServerContext,
    PROPOSAL_TIMEOUT,
};

/// etcd allows at most this many learners at a time.
const MAX_LEARNERS: usize = 1;
/// A learner may be promoted once it has replicated this share of the leader's log (etcd: 90%).
const PROMOTE_READY_RATIO: f64 = 0.9;

/// The wire form of a member.
pub fn member_to_pb(m: &Member) -> PbMember {
    PbMember {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: m.is_learner,
    }
}

fn peer_urls_exist() -> Status {
    Status::failed_precondition("etcdserver: Peer URLs already exists")
}

fn bad_urls() -> Status {
    Status::invalid_argument("etcdserver: given member URLs are invalid")
}

/// etcd checks that peer URLs are absolute `http(s)://host:port` URLs.
fn valid_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return false;
    };
    let hostport = rest.trim_end_matches('/');
    match hostport.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    }
}

/// etcd's Cluster service.
pub struct ClusterService {
    ctx: ServerContext,
}

impl ClusterService {
    /// A Cluster service over the member's context.
    pub fn new(ctx: ServerContext) -> Self {
        ClusterService { ctx }
    }

    fn members_pb(members: &[Member]) -> Vec<PbMember> {
        members.iter().map(member_to_pb).collect()
    }

    /// Proposes a membership change and returns the members afterwards.
    async fn change(
        &self,
        changes: &[MemberChange],
        payload: Vec<u8>,
    ) -> Result<Vec<Member>, Status> {
        // The member record enters the log like any request, under the same limit.
        if payload.len() > self.ctx.limits.max_request_bytes {
            return Err(request_too_large());
        }
        let proposal = self.ctx.raft.propose_membership(changes, payload);
        match tokio::time::timeout(PROPOSAL_TIMEOUT, proposal).await {
            Err(_) => Err(Status::unavailable("etcdserver: request timed out")),
            Ok(Err(e)) => Err(raft_status(&e)),
            Ok(Ok(result)) => Self::members_of(result),
        }
    }

    fn members_of(result: Result<Output, ApplyError>) -> Result<Vec<Member>, Status> {
        match result {
            Ok(Output::Members(members)) => Ok(members),
            Ok(_) => Err(Status::internal(
                "etcdserver: unexpected apply result for a membership request",
            )),
            Err(e) => Err(apply_error_status(&e)),
        }
    }

    /// A new member id: etcd hashes the peer URLs with the time of the request.
    fn new_member_id(&self, peer_urls: &[String]) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut salt = 0u64;
        loop {
            let mut h = DefaultHasher::new();
            peer_urls.hash(&mut h);
            now.hash(&mut h);
            salt.hash(&mut h);
            let id = h.finish();
            if id != 0 && self.ctx.members.get(id).is_none() {
                return id;
            }
            salt += 1;
        }
    }

    /// Whether the learner has caught up with the leader (asked on the leader).
    async fn learner_ready(&self, learner: u64) -> Result<bool, Status> {
        let progress = match self.ctx.remote_leader()? {
            None => self.ctx.raft.status().progress,
            Some(leader) => self.ctx.forwarder.leader_progress(leader).await?,
        };
        let leader_match = progress.values().copied().max().unwrap_or(0);
        let learner_match = progress.get(&learner).copied().unwrap_or(0);
        Ok(learner_match as f64 >= leader_match as f64 * PROMOTE_READY_RATIO)
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: GrpcRequest<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let req = request.into_inner();
        if req.peer_ur_ls.is_empty() || !req.peer_ur_ls.iter().all(|u| valid_url(u)) {
            return Err(bad_urls());
        }
        let members = self.ctx.members.list();
        if members
            .iter()
            .any(|m| m.peer_urls.iter().any(|u| req.peer_ur_ls.contains(u)))
        {
            return Err(peer_urls_exist());
        }
        if req.is_learner && members.iter().filter(|m| m.is_learner).count() >= MAX_LEARNERS {
            return Err(Status::failed_precondition(
                "etcdserver: too many learner members in cluster",
            ));
        }
        let member = Member {
            id: self.new_member_id(&req.peer_ur_ls),
            name: String::new(),
            peer_urls: req.peer_ur_ls,
            client_urls: Vec::new(),
            is_learner: req.is_learner,
        };
        let change = if req.is_learner {
            MemberChange::AddLearner(member.id)
        } else {
            MemberChange::AddVoter(member.id)
        };
        let members = self.change(&[change], member.encode_to_vec()).await?;
        let added = members
            .iter()
            .find(|m| m.id == member.id)
            .cloned()
            .unwrap_or(member);
        Ok(Response::new(MemberAddResponse {
            header: Some(self.ctx.header(0)),
            member: Some(member_to_pb(&added)),
            members: Self::members_pb(&members),
        }))
    }

    async fn member_remove(
        &self,
        request: GrpcRequest<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let id = request.into_inner().id;
        if self.ctx.members.get(id).is_none() && !self.ctx.raft.status().membership.contains(id) {
            return Err(member_not_found());
        }
        let members = self.change(&[MemberChange::Remove(id)], Vec::new()).await?;
        Ok(Response::new(MemberRemoveResponse {
            header: Some(self.ctx.header(0)),
            members: Self::members_pb(&members),
        }))
    }

    async fn member_update(
        &self,
        request: GrpcRequest<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let req = request.into_inner();
        if req.peer_ur_ls.is_empty() || !req.peer_ur_ls.iter().all(|u| valid_url(u)) {
            return Err(bad_urls());
        }
        if self.ctx.members.get(req.id).is_none() {
            return Err(member_not_found());
        }
        if self
            .ctx
            .members
            .list()
            .iter()
            .any(|m| m.id != req.id && m.peer_urls.iter().any(|u| req.peer_ur_ls.contains(u)))
        {
            return Err(peer_urls_exist());
        }
        let update = Request::MemberPeerUrls(MemberPeerUrls {
            id: req.id,
            peer_urls: req.peer_ur_ls,
        });
        let members = match self.ctx.propose(update).await? {
            Output::Members(members) => members,
            _ => return Err(Status::internal("etcdserver: unexpected apply result")),
        };
        Ok(Response::new(MemberUpdateResponse {
            header: Some(self.ctx.header(0)),
            members: Self::members_pb(&members),
        }))
    }

    async fn member_list(
        &self,
        request: GrpcRequest<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        if request.into_inner().linearizable {
            self.ctx.linearizable_barrier().await?;
        }
        Ok(Response::new(MemberListResponse {
            header: Some(self.ctx.header(0)),
            members: Self::members_pb(&self.ctx.members.list()),
        }))
    }

    async fn member_promote(
        &self,
        request: GrpcRequest<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let id = request.into_inner().id;
        let Some(member) = self.ctx.members.get(id) else {
            return Err(member_not_found());
        };
        if !member.is_learner {
            return Err(Status::failed_precondition(
                "etcdserver: can only promote a learner member",
            ));
        }
        if !self.learner_ready(id).await? {
            return Err(Status::failed_precondition(
                "etcdserver: can only promote a learner member which is in sync with leader",
            ));
        }
        let members = self
            .change(&[MemberChange::AddVoter(id)], Vec::new())
            .await?;
        Ok(Response::new(MemberPromoteResponse {
            header: Some(self.ctx.header(0)),
            members: Self::members_pb(&members),
        }))
    }
}
