//! Consensus for MetaStore: a raft-rs `RawNode` driven by a dedicated thread, with its log made
//! durable in a write-ahead log (`<data_dir>/wal/`) and compacted by snapshots
//! (`<data_dir>/snap/`).
//!
//! What this crate owns:
//! - the Ready loop ([`RaftNode`]): ticking, group-committing proposals (many proposals share one
//!   WAL fsync), sending messages through a [`Transport`], applying committed entries to a
//!   [`StateMachine`] in log order and waking the request that proposed each entry;
//! - linearizable reads: ReadIndex requests batched across concurrent callers
//!   ([`RaftNode::read_index`]);
//! - the WAL: CRC-checked records in rotating segment files; a torn tail is truncated on start,
//!   any other damage is a [`WalError::Corrupt`] naming the file and byte offset;
//! - snapshots: taken every [`RaftConfig::snapshot_count`] applied entries on a separate thread,
//!   CRC-checked on load ([`SnapError`]), after which old WAL segments and snapshots are removed.
//!   A state machine that keeps its state on disk ([`StateMachine::persist`]) gets a WAL marker
//!   instead, and a snapshot file only when a follower needs one.
//!
//! What it must not know about: MVCC, leases, auth or any storage engine. The replicated state is
//! only reachable through the [`StateMachine`] trait, whose payloads are opaque bytes, and peers
//! are only reachable through the [`Transport`] trait.

mod config;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod logger;
mod metrics;
mod node;
mod snap;
mod storage;
mod wal;

pub use config::{RaftConfig, DEFAULT_DISK_RESERVE_BYTES};
pub use error::RaftError;
pub use node::{bootstrap_from_snapshot, RaftNode, RaftStatus};
pub use raft::eraftpb::MessageType;
pub use snap::SnapError;
pub use wal::WalError;

/// raft-rs message type exchanged between members, re-exported so that transports need not
/// depend on raft-rs directly.
pub use raft::eraftpb::Message;

/// The replicated state machine driven by a [`RaftNode`].
///
/// Every method is called from the raft loop, one at a time, in log order; applying runs where
/// blocking is allowed (on a runtime, inside `block_in_place`). Applying must be deterministic:
/// the same entries applied to the same state give the same state on every member.
pub trait StateMachine: Send + 'static {
    /// The result of applying one proposal, handed to the caller of [`RaftNode::propose`].
    type Output: Send + 'static;

    /// Index of the last entry whose effects the state holds durably (0 for fresh or volatile
    /// state). Called once at start; entries after it are applied again.
    fn applied_index(&self) -> u64;

    /// Called once at start with the index of the last entry this member's log holds: entries
    /// up to it that are applied now were already applied by an earlier run (or proposed by
    /// one), so effects meant only for that run's clients (e.g. auth tokens) can be skipped.
    fn recovered(&mut self, _last_index: u64) {}

    /// Applies a committed normal entry's payload at `index` (deterministic).
    fn apply(&mut self, index: u64, term: u64, payload: &[u8]) -> Self::Output;

    /// An entry with no payload (a new leader's no-op) was committed at `index`.
    fn apply_noop(&mut self, index: u64, term: u64);

    /// The loop applied the committed entries of one round (one or more calls above), before it
    /// answers their proposers: for work worth doing once per batch rather than per entry, such
    /// as waking a thread that hands the new events to watchers.
    fn applied_batch(&mut self) {}

    /// For a state machine that keeps its state on disk: the work that makes everything applied
    /// so far durable, which the loop runs on another thread while it goes on applying. A
    /// periodic snapshot is then only a marker in the WAL, recorded once the work is done, and
    /// restart takes the state as it is (its [`StateMachine::applied_index`] covers the marker).
    /// None (the default) means the state is volatile and every snapshot carries it whole. A
    /// snapshot a follower needs is written whole either way.
    fn persist(&mut self) -> Option<PersistJob> {
        None
    }

    /// A membership change was committed at `index` and raft has applied it (or refused it: see
    /// [`MembershipChange::outcome`]). Deterministic like [`StateMachine::apply`].
    fn apply_membership(
        &mut self,
        index: u64,
        term: u64,
        change: &MembershipChange<'_>,
    ) -> Self::Output;

    /// Captures the current state cheaply; the returned writer serializes it on another thread
    /// while the loop keeps applying.
    fn snapshot(&self) -> SnapshotWriter;

    /// Replaces the whole state with a snapshot taken at `index`.
    fn restore(
        &mut self,
        index: u64,
        term: u64,
        reader: &mut dyn std::io::Read,
    ) -> std::io::Result<()>;
}

/// One step of a membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// Add a voter, or promote a learner to voter.
    AddVoter(u64),
    /// Add a learner: it receives the log but does not vote.
    AddLearner(u64),
    /// Remove a voter or learner.
    Remove(u64),
}

/// The voters and learners of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// Members that vote, sorted.
    pub voters: Vec<u64>,
    /// Members that only replicate, sorted.
    pub learners: Vec<u64>,
}

impl Membership {
    /// Whether `id` is a voter or a learner.
    pub fn contains(&self, id: u64) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }
}

/// A committed membership change, as handed to [`StateMachine::apply_membership`].
#[derive(Debug)]
pub struct MembershipChange<'a> {
    /// What was asked.
    pub changes: Vec<MemberChange>,
    /// The proposer's payload (e.g. the new member's name and URLs).
    pub payload: &'a [u8],
    /// The membership after the change, or why raft refused it (the same on every member).
    pub outcome: Result<Membership, String>,
}

/// Serializes a state captured by [`StateMachine::snapshot`] into the given writer.
pub type SnapshotWriter =
    Box<dyn FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send + 'static>;

/// Makes a state machine's applied state durable (see [`StateMachine::persist`]); runs on a
/// thread of its own.
pub type PersistJob = Box<dyn FnOnce() -> std::io::Result<()> + Send + 'static>;

/// Delivers raft messages to other members.
///
/// Called from the raft loop after the messages' entries are durable; it must not block (queue
/// the messages and send them elsewhere): the loop usually runs as a task of the runtime (see
/// [`RaftNode::start`]), and a worker blocked in place holds up the tasks queued on it and,
/// while it blocks, the runtime's timers. A transport that must wait does it through
/// `tokio::task::block_in_place`. A message that cannot be delivered may be
/// dropped: raft retries; telling the node with [`RaftNode::report_unreachable`] speeds that up.
/// Every `MsgSnapshot` must be followed by [`RaftNode::report_snapshot`] on the sending node.
/// A single-member cluster never sends anything.
pub trait Transport: Send + Sync + 'static {
    /// Sends each message to the member named by its `to` field.
    fn send(&self, messages: Vec<Message>);
}
