//! etcd's v3 gRPC services.
//!
//! Owns: the tonic services (KV, Watch, Lease, Lock, Election, Cluster, Auth), request validation
//! as etcd's v3rpc layer does it, and response headers.
//!
//! Must not depend on: the engine choice, raft internals beyond [`RaftNode`]'s handle, the
//! Maintenance service (`metastore-maintenance-api` is a sibling: both stand on
//! `metastore-api-context`, which owns the shared [`ServerContext`], the error mapping and the
//! auth layer).
//!
//! [`RaftNode`]: metastore_raft_node::RaftNode
//! [`ServerContext`]: metastore_api_context::ServerContext

mod auth;
mod cluster;
mod election;
mod kv;
mod lease;
mod lock;
mod recipes;
mod watch;

pub use auth::AuthService;
pub use cluster::{member_to_pb, ClusterService};
pub use election::ElectionService;
pub use kv::KvService;
pub use lease::LeaseService;
pub use lock::LockService;
pub use watch::{WatchService, DEFAULT_PROGRESS_NOTIFY_INTERVAL};
