//! etcd's Auth service ([`AuthService`]): enabling and disabling auth, Authenticate (with the
//! per-user rate limit of [`AuthGate`]), users and roles. Who may call what is decided before a
//! call reaches it, by `metastore_api_context::AuthLayer`.
//!
//! [`AuthGate`]: metastore_api_context::AuthGate

use metastore_api_context::{auth_status, name_for_log, Caller, ServerContext};
use metastore_auth::tokens::TokenProvider;
use metastore_auth::{AuthError, Need};
use metastore_proto::authpb::Permission;
use metastore_proto::etcdserverpb::auth_server::Auth;
use metastore_proto::etcdserverpb::*;
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::metastorepb::AuthenticateInternal;
use metastore_state_machine::Output;
use tonic::{Request as GrpcRequest, Response, Status};

/// etcd's Auth service.
pub struct AuthService {
    ctx: ServerContext,
}

impl AuthService {
    /// An Auth service over `ctx`.
    pub fn new(ctx: ServerContext) -> Self {
        AuthService { ctx }
    }

    async fn propose(&self, caller: Caller, r: Request) -> Result<u64, Status> {
        self.ctx.refuse_on_learner()?;
        let who = self.ctx.auth.info(&caller);
        match self.ctx.propose_as(r, &who).await? {
            Output::Auth { revision } => Ok(revision),
            _ => Err(Status::internal(
                "etcdserver: unexpected apply result for auth",
            )),
        }
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(self.ctx.header(0))
    }

    async fn hash(&self, password: String) -> Result<String, Status> {
        let cost = self.ctx.auth.bcrypt_cost;
        tokio::task::spawn_blocking(move || metastore_auth::hash_password(&password, cost))
            .await
            .map_err(|e| Status::internal(format!("etcdserver: hashing failed: {e}")))?
            .map_err(|e| auth_status(&e))
    }

    /// Linearizable reads of the auth store, like etcd's (which go through the log).
    async fn read_barrier(&self) -> Result<(), Status> {
        self.ctx.refuse_on_learner()?;
        self.ctx.linearizable_barrier().await
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        request: GrpcRequest<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        self.propose(
            Caller::of(&request),
            Request::AuthEnable(AuthEnableRequest {}),
        )
        .await?;
        Ok(Response::new(AuthEnableResponse {
            header: self.header(),
        }))
    }

    async fn auth_disable(
        &self,
        request: GrpcRequest<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        self.propose(
            Caller::of(&request),
            Request::AuthDisable(AuthDisableRequest {}),
        )
        .await?;
        Ok(Response::new(AuthDisableResponse {
            header: self.header(),
        }))
    }

    async fn auth_status(
        &self,
        _request: GrpcRequest<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.read_barrier().await?;
        Ok(Response::new(AuthStatusResponse {
            header: self.header(),
            enabled: self.ctx.auth.store.is_enabled(),
            auth_revision: self.ctx.auth.store.revision(),
        }))
    }

    async fn authenticate(
        &self,
        request: GrpcRequest<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        self.ctx.refuse_on_learner()?;
        let req = request.into_inner();
        let gate = &self.ctx.auth;
        if !gate.store.is_enabled() {
            return Err(auth_status(&AuthError::NotEnabled));
        }
        gate.admit_attempt(&req.name).map_err(|e| auth_status(&e))?;
        let store = gate.store.clone();
        let (name, password) = (req.name.clone(), req.password);
        tokio::task::spawn_blocking(move || store.check_password(&name, &password))
            .await
            .map_err(|e| Status::internal(format!("etcdserver: password check failed: {e}")))?
            .map_err(|e| {
                tracing::info!(user = %name_for_log(&req.name), error = %e, "authentication failed");
                auth_status(&e)
            })?;
        let simple_token_prefix = match gate.tokens {
            TokenProvider::Simple => metastore_auth::tokens::simple_token_prefix(),
            TokenProvider::Jwt(_) => String::new(),
        };
        let proposal = Request::Authenticate(AuthenticateInternal {
            name: req.name.clone(),
            simple_token_prefix,
        });
        let (token, revision) = match self.ctx.propose(proposal).await? {
            Output::Authenticated { token, revision } => (token, revision),
            _ => {
                return Err(Status::internal(
                    "etcdserver: unexpected apply result for authenticate",
                ))
            }
        };
        let token = match (&gate.tokens, token) {
            (TokenProvider::Jwt(jwt), _) => {
                jwt.sign(&req.name, revision).map_err(|e| auth_status(&e))?
            }
            (TokenProvider::Simple, Some(token)) => token,
            (TokenProvider::Simple, None) => {
                return Err(Status::internal("etcdserver: no token was issued"))
            }
        };
        Ok(Response::new(AuthenticateResponse {
            header: self.header(),
            token,
        }))
    }

    async fn user_add(
        &self,
        request: GrpcRequest<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let no_password = request
            .get_ref()
            .options
            .as_ref()
            .is_some_and(|o| o.no_password);
        let caller = Caller::of(&request);
        let mut req = request.into_inner();
        if req.name.is_empty() {
            return Err(auth_status(&AuthError::UserEmpty));
        }
        // Only the hash enters the log.
        req.hashed_password = if no_password {
            String::new()
        } else {
            self.hash(std::mem::take(&mut req.password)).await?
        };
        req.password.clear();
        self.propose(caller, Request::UserAdd(req)).await?;
        Ok(Response::new(AuthUserAddResponse {
            header: self.header(),
        }))
    }

    async fn user_get(
        &self,
        request: GrpcRequest<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        self.read_barrier().await?;
        let caller = Caller::of(&request);
        let name = &request.get_ref().name;
        if caller.username != *name {
            self.ctx.authorize(&caller, &[Need::Admin])?;
        }
        let roles = self
            .ctx
            .auth
            .store
            .user_get(name)
            .map_err(|e| auth_status(&e))?;
        Ok(Response::new(AuthUserGetResponse {
            header: self.header(),
            roles,
        }))
    }

    async fn user_list(
        &self,
        _request: GrpcRequest<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        self.read_barrier().await?;
        Ok(Response::new(AuthUserListResponse {
            header: self.header(),
            users: self.ctx.auth.store.user_list(),
        }))
    }

    async fn user_delete(
        &self,
        request: GrpcRequest<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let caller = Caller::of(&request);
        self.propose(caller, Request::UserDelete(request.into_inner()))
            .await?;
        Ok(Response::new(AuthUserDeleteResponse {
            header: self.header(),
        }))
    }

    async fn user_change_password(
        &self,
        request: GrpcRequest<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let caller = Caller::of(&request);
        let mut req = request.into_inner();
        if !self.ctx.auth.store.user_exists(&req.name) {
            return Err(auth_status(&AuthError::UserNotFound));
        }
        req.hashed_password = self.hash(std::mem::take(&mut req.password)).await?;
        self.propose(caller, Request::UserChangePassword(req))
            .await?;
        Ok(Response::new(AuthUserChangePasswordResponse {
            header: self.header(),
        }))
    }

    async fn user_grant_role(
        &self,
        request: GrpcRequest<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let caller = Caller::of(&request);
        self.propose(caller, Request::UserGrantRole(request.into_inner()))
            .await?;
        Ok(Response::new(AuthUserGrantRoleResponse {
            header: self.header(),
        }))
    }

    async fn user_revoke_role(
        &self,
        request: GrpcRequest<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let caller = Caller::of(&request);
        self.propose(caller, Request::UserRevokeRole(request.into_inner()))
            .await?;
        Ok(Response::new(AuthUserRevokeRoleResponse {
            header: self.header(),
        }))
    }

    async fn role_add(
        &self,
        request: GrpcRequest<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let caller = Caller::of(&request);
        self.propose(caller, Request::RoleAdd(request.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleAddResponse {
            header: self.header(),
        }))
    }

    async fn role_get(
        &self,
        request: GrpcRequest<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        self.read_barrier().await?;
        let caller = Caller::of(&request);
        let role = &request.get_ref().role;
        if !self.ctx.auth.store.has_role(&caller.username, role) {
            self.ctx.authorize(&caller, &[Need::Admin])?;
        }
        let perm: Vec<Permission> = self
            .ctx
            .auth
            .store
            .role_get(role)
            .map_err(|e| auth_status(&e))?;
        Ok(Response::new(AuthRoleGetResponse {
            header: self.header(),
            perm,
        }))
    }

    async fn role_list(
        &self,
        _request: GrpcRequest<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        self.read_barrier().await?;
        Ok(Response::new(AuthRoleListResponse {
            header: self.header(),
            roles: self.ctx.auth.store.role_list(),
        }))
    }

    async fn role_delete(
        &self,
        request: GrpcRequest<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let caller = Caller::of(&request);
        self.propose(caller, Request::RoleDelete(request.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleDeleteResponse {
            header: self.header(),
        }))
    }

    async fn role_grant_permission(
        &self,
        request: GrpcRequest<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let caller = Caller::of(&request);
        self.propose(caller, Request::RoleGrantPermission(request.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse {
            header: self.header(),
        }))
    }

    async fn role_revoke_permission(
        &self,
        request: GrpcRequest<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let caller = Caller::of(&request);
        self.propose(caller, Request::RoleRevokePermission(request.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse {
            header: self.header(),
        }))
    }
}
