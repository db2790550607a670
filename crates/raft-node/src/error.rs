//! Errors returned by the raft node.

use crate::{SnapError, WalError};

/// Why a raft request or the node itself failed. Request errors use etcd's wording so that the
/// API layer can pass them on unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RaftError {
    /// No leader is known, so the proposal or read was dropped; retry after an election.
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The member's disk has less free space than its reserve: writes are refused until space
    /// returns (etcd's answer when its space quota is exceeded).
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// The node is shut down (or stopped after a fatal disk error).
    #[error("etcdserver: server stopped")]
    Stopped,
    /// The request did not complete in time.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The proposal was appended by a leader that lost its leadership before committing it; the
    /// entry was replaced and will never be applied.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    /// The write-ahead log could not be read or written.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// A snapshot file could not be read or written.
    #[error(transparent)]
    Snap(#[from] SnapError),
    /// The state machine failed to restore a snapshot.
    #[error("state machine: restore snapshot at index {index}: {source}")]
    Restore {
        /// Index of the snapshot being restored.
        index: u64,
        /// The state machine's error.
        source: std::io::Error,
    },
    /// The durable state does not fit together (for example the state machine is ahead of the
    /// log); the member must not start from it.
    #[error("raft: inconsistent durable state: {0}")]
    Inconsistent(String),
    /// The configuration is invalid.
    #[error("raft: invalid configuration: {0}")]
    InvalidConfig(String),
    /// raft-rs refused an operation.
    #[error("raft: {0}")]
    Raft(String),
}
