//! Domain errors to etcd's gRPC status codes and messages (etcd's `api/v3rpc/rpctypes`).
//! Clients match on the message text, so the strings are etcd's, byte for byte.

use metastore_mvcc::MvccError;
use metastore_raft_node::RaftError;
use metastore_state_machine::ApplyError;
use tonic::{Code, Status};

/// The status etcd answers for an mvcc refusal. Storage failures have no etcd string (etcd
/// panics); their detail goes into the message so the operator sees the cause.
pub fn mvcc_status(e: &MvccError) -> Status {
    let code = Code::from_i32(e.grpc_code());
    match e {
        MvccError::Storage(_) | MvccError::Corrupt(_) | MvccError::NotReadOnly => {
            Status::new(code, format!("{}: {e}", e.etcd_message()))
        }
        _ => Status::new(code, e.etcd_message()),
    }
}

/// The status etcd answers when consensus cannot serve a request.
pub fn raft_status(e: &RaftError) -> Status {
    match e {
        RaftError::NoLeader => Status::unavailable("etcdserver: no leader"),
        RaftError::Timeout => Status::unavailable("etcdserver: request timed out"),
        RaftError::Stopped => Status::unavailable("etcdserver: server stopped"),
        RaftError::NoSpace => {
            Status::resource_exhausted("etcdserver: mvcc: database space exceeded")
        }
        other => Status::internal(format!("etcdserver: {other}")),
    }
}

/// The status for a request that was committed but refused when applied.
pub fn apply_error_status(e: &ApplyError) -> Status {
    match e {
        ApplyError::Mvcc(m) => mvcc_status(m),
        ApplyError::Unsupported(what) => Status::internal(format!("etcdserver: {what}")),
        ApplyError::NoSpace => no_space(),
        ApplyError::Corrupt => Status::data_loss("etcdserver: corrupt cluster"),
        ApplyError::Alarm(e) => Status::internal(format!("etcdserver: {e}")),
        ApplyError::Lease(e) => lease_status(e),
        // etcd answers a refused membership change as a failed precondition.
        ApplyError::MembershipRefused(reason) => {
            Status::failed_precondition(format!("etcdserver: {reason}"))
        }
        ApplyError::MemberNotFound => member_not_found(),
        ApplyError::Auth(e) => crate::auth::auth_status(e),
    }
}

/// The status etcd answers for a lease refusal.
pub fn lease_status(e: &metastore_lease::LeaseError) -> Status {
    let code = Code::from_i32(e.grpc_code());
    match e {
        metastore_lease::LeaseError::Storage(_) | metastore_lease::LeaseError::Corrupt(_) => {
            Status::new(code, format!("etcdserver: {e}"))
        }
        _ => Status::new(code, e.to_string()),
    }
}

/// etcd's answer to a request over `--max-request-bytes`.
pub fn request_too_large() -> Status {
    Status::invalid_argument("etcdserver: request is too large")
}

/// etcd's answer to a write while the NOSPACE alarm is active or past the backend quota.
pub fn no_space() -> Status {
    Status::resource_exhausted("etcdserver: mvcc: database space exceeded")
}

/// etcd's answer when a member id is not in the cluster.
pub fn member_not_found() -> Status {
    Status::not_found("etcdserver: member not found")
}
