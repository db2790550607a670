//! raft-rs's view of the log: an in-memory copy of the durable log (the WAL is the durable copy)
//! plus the newest snapshot file, which is what a lagging follower is sent.

use std::sync::Arc;

use parking_lot::Mutex;
use raft::eraftpb::{Entry, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::snap::{SnapshotFile, Snapshotter};

/// The raft log as raft-rs reads it. Cloning shares the same log.
#[derive(Clone)]
pub(crate) struct LogStore {
    /// Entries, hard state and membership, mirrored from the WAL.
    pub mem: MemStorage,
    latest_snapshot: Arc<Mutex<Option<SnapshotFile>>>,
    snapshotter: Arc<Snapshotter>,
}

impl LogStore {
    pub(crate) fn new(mem: MemStorage, snapshotter: Arc<Snapshotter>) -> Self {
        LogStore {
            mem,
            latest_snapshot: Arc::new(Mutex::new(None)),
            snapshotter,
        }
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

    /// The newest snapshot file with its data. raft-rs retries later on
    /// `SnapshotTemporarilyUnavailable` (and treats any other error as fatal), so every failure
    /// maps to it.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable);
        let Some(file) = self.latest_snapshot.lock().clone() else {
            return Err(unavailable());
        };
        if file.metadata.index < request_index {
            return Err(unavailable());
        }
        match self.snapshotter.read_data(&file) {
            Ok(data) => {
                let snapshot = Snapshot {
                    data: data.into(),
                    metadata: Some(file.metadata).into(),
                    ..Default::default()
                };
                tracing::info!(
                    to = format_args!("{to:x}"),
                    index = snapshot.get_metadata().index,
                    size_bytes = snapshot.data.len(),
                    "sending snapshot"
                );
                Ok(snapshot)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read snapshot for a follower");
                Err(unavailable())
            }
        }
    }
}
