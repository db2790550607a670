//! etcd's auth errors, with its gRPC codes and messages (etcd's `api/v3rpc/rpctypes`). Clients
//! match on the text: `invalid auth token` and `revision of auth store is old` make clientv3
//! authenticate again and retry.

/// Why the auth store refused a request. Deterministic when returned by the apply step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Auth is enabled and the request carries no user.
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    /// The user lacks the permission.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// The token is unknown, expired or badly signed.
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// Wrong user name or password.
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    /// An auth-only RPC while auth is disabled.
    #[error("etcdserver: authentication is not enabled")]
    NotEnabled,
    /// AuthEnable without a `root` user.
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    /// AuthEnable while `root` lacks the `root` role.
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    /// UserAdd of an existing user.
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    /// A user that does not exist.
    #[error("etcdserver: user name not found")]
    UserNotFound,
    /// RoleAdd of an existing role.
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    /// A role that does not exist.
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    /// RoleAdd with an empty name.
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    /// RoleGrantPermission without a permission.
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    /// RoleRevokePermission of a permission the role does not have.
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    /// UserRevokeRole of a role the user does not have.
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    /// The permissions changed between the check at the API and the apply step.
    #[error("etcdserver: revision of auth store is old")]
    OldRevision,
    /// A change that would lock everyone out (deleting root, revoking root's role, …) or an
    /// invalid permission range.
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    /// Authenticate for a user created with `--no-password`. etcd sends its internal text with
    /// code Unknown (the error is missing from its gRPC mapping); clients see exactly that.
    #[error("auth: authentication failed, password was given for no password user")]
    NoPasswordUser,
    /// Too many Authenticate calls for one user in a short time.
    #[error("etcdserver: too many requests")]
    TooManyRequests,
    /// The auth buckets could not be read or written.
    #[error("etcdserver: auth storage: {0}")]
    Storage(String),
}

impl AuthError {
    /// The gRPC code etcd answers with (as `tonic::Code` numbers).
    pub fn grpc_code(&self) -> i32 {
        use AuthError::*;
        // Codes: 2 Unknown, 3 InvalidArgument, 7 PermissionDenied, 8 ResourceExhausted,
        // 9 FailedPrecondition, 13 Internal, 16 Unauthenticated.
        match self {
            NoPasswordUser => 2,
            UserEmpty | AuthFailed | RoleEmpty | PermissionNotGiven | OldRevision
            | InvalidAuthMgmt => 3,
            PermissionDenied => 7,
            TooManyRequests => 8,
            NotEnabled | RootUserNotExist | RootRoleNotExist | UserAlreadyExist | UserNotFound
            | RoleAlreadyExist | RoleNotFound | PermissionNotGranted | RoleNotGranted => 9,
            Storage(_) => 13,
            InvalidAuthToken => 16,
        }
    }
}

impl From<metastore_storage::StorageError> for AuthError {
    fn from(e: metastore_storage::StorageError) -> Self {
        AuthError::Storage(e.to_string())
    }
}
