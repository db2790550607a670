//! What each request needs, in one place: the API checks it before proposing or reading, and the
//! apply step checks the same list again against the auth store as of the request's log position.
//! The per-RPC table ([`RPC_RULES`]) says what the API requires of callers of each method.

use metastore_proto::etcdserverpb::{
    request_op, DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest,
};

/// One thing a request needs from its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need<'a> {
    /// Any authenticated user.
    Authenticated,
    /// The `root` role.
    Admin,
    /// Read permission on `(key, range_end)`.
    Read(&'a [u8], &'a [u8]),
    /// Write permission on `(key, range_end)`.
    Write(&'a [u8], &'a [u8]),
}

/// A Range reads its range.
pub fn range(r: &RangeRequest) -> Vec<Need<'_>> {
    vec![Need::Read(&r.key, &r.range_end)]
}

/// A Put writes its key, and reads it when it asks for the previous value.
pub fn put(r: &PutRequest) -> Vec<Need<'_>> {
    let mut needs = vec![Need::Write(&r.key, &[])];
    if r.prev_kv {
        needs.push(Need::Read(&r.key, &[]));
    }
    needs
}

/// A DeleteRange writes its range, and reads it when it asks for the previous values.
pub fn delete_range(r: &DeleteRangeRequest) -> Vec<Need<'_>> {
    let mut needs = vec![Need::Write(&r.key, &r.range_end)];
    if r.prev_kv {
        needs.push(Need::Read(&r.key, &r.range_end));
    }
    needs
}

/// A Txn reads every compared key, and needs what each operation of both branches needs,
/// nested transactions included (etcd's `checkTxnAuth`).
pub fn txn(r: &TxnRequest) -> Vec<Need<'_>> {
    let mut needs = Vec::new();
    txn_into(r, &mut needs);
    needs
}

fn txn_into<'a>(r: &'a TxnRequest, needs: &mut Vec<Need<'a>>) {
    for c in &r.compare {
        needs.push(Need::Read(&c.key, &c.range_end));
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => needs.extend(range(r)),
            Some(request_op::Request::RequestPut(r)) => needs.extend(put(r)),
            Some(request_op::Request::RequestDeleteRange(r)) => needs.extend(delete_range(r)),
            Some(request_op::Request::RequestTxn(r)) => txn_into(r, needs),
            None => {}
        }
    }
}

/// What the API requires of the caller of an RPC before looking at the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone, even without credentials.
    Open,
    /// Any authenticated user.
    Authenticated,
    /// The `root` role.
    Admin,
    /// Decided per request from its keys (see the functions of this module), by the handler.
    Keys,
    /// The caller's own user or roles may be read without `root`; anything else needs `root`.
    SelfOrAdmin,
}

/// Every RPC MetaStore serves on the client port and what it requires of callers while auth is
/// enabled. `docs/auth.md` prints this table; a test walks it against a running server. An RPC
/// missing here is refused to everyone but `root`.
pub const RPC_RULES: &[(&str, Rule, &str)] = &[
    ("/etcdserverpb.KV/Range", Rule::Keys, "read on the range"),
    ("/etcdserverpb.KV/Put", Rule::Keys, "write on the key; read too with prev_kv; write on the keys already attached to its lease"),
    ("/etcdserverpb.KV/DeleteRange", Rule::Keys, "write on the range (and read with prev_kv)"),
    ("/etcdserverpb.KV/Txn", Rule::Keys, "read on every compared key; each operation's own need, in both branches, nested txns included"),
    ("/etcdserverpb.KV/Compact", Rule::Admin, "root (etcd checks nothing)"),
    ("/etcdserverpb.Watch/Watch", Rule::Keys, "read on the watched range, checked when each watcher is created"),
    ("/etcdserverpb.Lease/LeaseGrant", Rule::Authenticated, "any user"),
    ("/etcdserverpb.Lease/LeaseRevoke", Rule::Keys, "write on every key attached to the lease"),
    ("/etcdserverpb.Lease/LeaseKeepAlive", Rule::Keys, "write on every key attached to the lease"),
    ("/etcdserverpb.Lease/LeaseTimeToLive", Rule::Keys, "any user; with keys=true, read on every attached key"),
    ("/etcdserverpb.Lease/LeaseLeases", Rule::Keys, "read on every key attached to any lease"),
    ("/etcdserverpb.Cluster/MemberList", Rule::Authenticated, "any user"),
    ("/etcdserverpb.Cluster/MemberAdd", Rule::Admin, "root"),
    ("/etcdserverpb.Cluster/MemberRemove", Rule::Admin, "root"),
    ("/etcdserverpb.Cluster/MemberUpdate", Rule::Admin, "root"),
    ("/etcdserverpb.Cluster/MemberPromote", Rule::Admin, "root"),
    ("/etcdserverpb.Maintenance/Status", Rule::Authenticated, "any user"),
    ("/etcdserverpb.Maintenance/Alarm", Rule::Keys, "any user to list; root to activate or deactivate"),
    ("/etcdserverpb.Maintenance/Defragment", Rule::Admin, "root"),
    ("/etcdserverpb.Maintenance/Hash", Rule::Admin, "root"),
    ("/etcdserverpb.Maintenance/HashKV", Rule::Admin, "root"),
    ("/etcdserverpb.Maintenance/Snapshot", Rule::Admin, "root"),
    ("/etcdserverpb.Maintenance/MoveLeader", Rule::Admin, "root"),
    ("/etcdserverpb.Maintenance/Downgrade", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/Authenticate", Rule::Open, "a valid user name and password"),
    ("/etcdserverpb.Auth/AuthStatus", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/AuthEnable", Rule::Admin, "root (nothing while auth is disabled)"),
    ("/etcdserverpb.Auth/AuthDisable", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/UserAdd", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/UserGet", Rule::SelfOrAdmin, "root, or the user itself"),
    ("/etcdserverpb.Auth/UserList", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/UserDelete", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/UserChangePassword", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/UserGrantRole", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/UserRevokeRole", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/RoleAdd", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/RoleGet", Rule::SelfOrAdmin, "root, or a user holding the role"),
    ("/etcdserverpb.Auth/RoleList", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/RoleDelete", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/RoleGrantPermission", Rule::Admin, "root"),
    ("/etcdserverpb.Auth/RoleRevokePermission", Rule::Admin, "root"),
    ("/v3lockpb.Lock/Lock", Rule::Keys, "write on the lock's prefix (the recipe's keys)"),
    ("/v3lockpb.Lock/Unlock", Rule::Keys, "write on the lock key"),
    ("/v3electionpb.Election/Campaign", Rule::Keys, "write on the election's prefix"),
    ("/v3electionpb.Election/Proclaim", Rule::Keys, "write on the leader key"),
    ("/v3electionpb.Election/Leader", Rule::Keys, "read on the election's prefix"),
    ("/v3electionpb.Election/Observe", Rule::Keys, "read on the election's prefix"),
    ("/v3electionpb.Election/Resign", Rule::Keys, "write on the leader key"),
    ("/grpc.health.v1.Health/Check", Rule::Open, "nothing"),
    ("/grpc.health.v1.Health/Watch", Rule::Open, "nothing"),
];

/// The rule for a gRPC method path; unknown methods need `root`.
pub fn rule_for(path: &str) -> Rule {
    RPC_RULES
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, rule, _)| *rule)
        .unwrap_or(Rule::Admin)
}
