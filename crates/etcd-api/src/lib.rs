//! etcd's v3 gRPC services.
//!
//! Owns: the tonic services (KV so far), request validation as etcd's v3rpc layer does it, the
//! mapping of domain errors to etcd's gRPC codes and messages, and response headers.
//!
//! Must not depend on: the engine choice, raft internals beyond [`RaftNode`]'s handle.

mod errors;
mod kv;

pub use errors::{apply_error_status, mvcc_status, raft_status};
pub use kv::KvService;

use metastore_proto::etcdserverpb::ResponseHeader;
use metastore_raft_node::RaftNode;
use metastore_state_machine::{ApplyOutput, StoreHandle};

/// Limits that etcd enforces at its API (`--max-request-bytes`, `--max-txn-ops`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request accepted, in bytes (etcd's default: 1.5 MiB).
    pub max_request_bytes: usize,
    /// Most operations in one Txn (etcd's default: 128).
    pub max_txn_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
        }
    }
}

/// What every service needs: the raft handle, the store, identity and limits.
#[derive(Clone)]
pub struct ServerContext {
    /// The consensus handle: proposals and ReadIndex.
    pub raft: RaftNode<ApplyOutput>,
    /// The current mvcc store.
    pub store: StoreHandle,
    /// This cluster's id (etcd derives it from the initial members).
    pub cluster_id: u64,
    /// This member's id.
    pub member_id: u64,
    /// Request limits.
    pub limits: Limits,
}

impl ServerContext {
    /// A response header carrying `revision` (0: the store's current revision).
    pub fn header(&self, revision: i64) -> ResponseHeader {
        let revision = if revision == 0 {
            self.store.current().current_revision()
        } else {
            revision
        };
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.raft.status().term,
        }
    }
}
