//! raft-rs's view of the log: an in-memory copy of the durable log (the WAL is the durable copy)
//! plus the newest snapshot file, which is what a lagging follower is sent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use raft::eraftpb::{Entry, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::snap::SnapshotFile;

/// The raft log as raft-rs reads it. Cloning shares the same log.
#[derive(Clone)]
pub(crate) struct LogStore {
    /// Entries, hard state and membership, mirrored from the WAL.
    pub mem: MemStorage,
    latest_snapshot: Arc<Mutex<Option<SnapshotFile>>>,
    /// Set when a follower needed a snapshot the newest file cannot serve (too old, or taken
    /// before the follower joined): the loop then takes a new one at once.
    wanted: Arc<AtomicBool>,
}

impl LogStore {
    pub(crate) fn new(mem: MemStorage) -> Self {
        LogStore {
            mem,
            latest_snapshot: Arc::new(Mutex::new(None)),
            wanted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether a follower asked for a snapshot newer than the newest file; clears the request.
    pub(crate) fn take_snapshot_wanted(&self) -> bool {
        self.wanted.swap(false, Ordering::Relaxed)
    }

    /// Makes `snapshot` the one sent to followers that need a snapshot.
    pub(crate) fn set_latest_snapshot(&self, snapshot: SnapshotFile) {
        *self.latest_snapshot.lock() = Some(snapshot);
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    /// The newest snapshot file's metadata. The data stays on disk: the transport streams the
    /// file ([`crate::RaftNode::open_snapshot`]), so a leader never holds a whole snapshot in
    /// memory. raft-rs retries later on `SnapshotTemporarilyUnavailable` (and treats any other
    /// error as fatal), so a missing snapshot maps to it.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable);
        let Some(file) = self.latest_snapshot.lock().clone() else {
            self.wanted.store(true, Ordering::Relaxed);
            return Err(unavailable());
        };
        let conf_state = file.metadata.get_conf_state();
        // A member must be in the snapshot's membership, or it refuses the snapshot.
        let includes_follower = conf_state.voters.contains(&to)
            || conf_state.learners.contains(&to)
            || conf_state.voters_outgoing.contains(&to)
            || conf_state.learners_next.contains(&to);
        // The log in memory may have been trimmed past the snapshot (see `trim_memory_log`): a
        // follower given this snapshot would still miss the entries in between.
        let first_in_memory = self.mem.first_index().unwrap_or(0);
        if file.metadata.index < request_index
            || file.metadata.index + 1 < first_in_memory
            || !includes_follower
        {
            self.wanted.store(true, Ordering::Relaxed);
            return Err(unavailable());
        }
        tracing::info!(
            to = format_args!("{to:x}"),
            index = file.metadata.index,
            path = %file.path.display(),
            "sending snapshot"
        );
        Ok(Snapshot {
            metadata: Some(file.metadata).into(),
            ..Default::default()
        })
    }
}
