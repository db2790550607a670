//! Snapshot scheduling and log compaction: when a snapshot is due (every
//! [`crate::RaftConfig::snapshot_count`] applied entries, or at once when a follower needs one
//! the newest file cannot serve), the background thread that writes it (or runs the state
//! machine's persist job for a snapshot in place), recording the finished snapshot in the WAL,
//! and what that releases: the in-memory log before it, old WAL segments and old snapshot files.
//!
//! Owns the schedule (newest snapshot file, next snapshot index), the snapshot thread and the
//! release thread, which deletes the files a snapshot made obsolete. It
//! must not apply entries nor install a snapshot received from the leader: the Ready loop does,
//! and then tells it ([`SnapshotScheduler::installed`]). The thread only reports back through the
//! command channel; every WAL and log change happens on the loop.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use raft::eraftpb::SnapshotMetadata;
use raft::{RawNode, StateRole};

use super::Command;
use crate::snap::{SnapError, SnapshotFile, Snapshotter};
use crate::storage::LogStore;
use crate::wal::{remove_segments, Wal};
use crate::{RaftError, StateMachine};

/// Applied entries kept in the in-memory log for followers that lag a little (etcd's
/// `SnapshotCatchUpEntries`).
const MEMORY_CATCH_UP_ENTRIES: u64 = 5_000;

/// Lowers the calling thread's CPU priority by 10 nice steps. A snapshot is background work: on
/// a machine whose cores are busy serving requests, those should get the CPU first and the
/// snapshot the rest (about a tenth under full contention), as RocksDB runs its compactions. On
/// Linux the nice value belongs to the thread, so the loop and the servers keep theirs.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: `getpriority` and `setpriority` take plain integers; `who` 0 is the calling
    // thread.
    unsafe {
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        libc::setpriority(libc::PRIO_PROCESS, 0, (nice + 10).min(19));
    }
}

/// When snapshots are taken and what they release.
pub(super) struct SnapshotScheduler<O> {
    member_id: u64,
    snapshotter: Arc<Snapshotter>,
    /// For the snapshot thread to report back.
    done: super::CommandSender<O>,
    snapshot_count: u64,
    /// Most WAL segments and snapshot files kept (0: all).
    max_wals: usize,
    max_snapshots: usize,
    /// Index of the newest snapshot file.
    snapshot_index: u64,
    /// Applied index at which the next snapshot is taken.
    next_snapshot_at: u64,
    snapshot_thread: Option<JoinHandle<()>>,
    /// When the running snapshot job started.
    snapshot_started: Instant,
    releaser: Releaser,
    /// Size of the state in the last snapshot file this member wrote (0: none yet).
    last_file_bytes: u64,
    /// The WAL's [`Wal::appended_bytes`] when that snapshot was taken.
    wal_bytes_at_file: u64,
}

/// Files a durable snapshot made obsolete, for the release thread to delete.
struct Release {
    wal_dir: PathBuf,
    /// WAL segment files the WAL let go of, oldest first.
    segments: Vec<PathBuf>,
    /// Snapshot files to keep (`--max-snapshots`, 0: all) at or below the durable index.
    snapshots: Option<(usize, u64)>,
}

impl Release {
    /// Deletes the files. Failing to is not fatal: they are merely kept.
    fn run(self, snapshotter: &Snapshotter) {
        fail::fail_point!("raft::release::before_remove");
        match remove_segments(&self.wal_dir, &self.segments) {
            Ok(()) if self.segments.is_empty() => {}
            Ok(()) => tracing::debug!(released = self.segments.len(), "released WAL segments"),
            Err(e) => tracing::warn!(error = %e, "cannot release WAL segments"),
        }
        if let Some((keep, durable_index)) = self.snapshots {
            if let Err(e) = snapshotter.purge(keep, durable_index) {
                tracing::warn!(error = %e, "cannot remove old snapshots");
            }
        }
    }
}

/// Deletes obsolete files on its own thread, in the order they were released. Deleting a 64 MiB
/// WAL segment or a snapshot of the whole state keeps the kernel busy for tens of milliseconds
/// (freeing its pages and extents, discarding its blocks): on the loop that held up every
/// write at each snapshot (the memory engine's put spikes of issue 24).
struct Releaser {
    snapshotter: Arc<Snapshotter>,
    jobs: Option<mpsc::Sender<Release>>,
    thread: Option<JoinHandle<()>>,
}

impl Releaser {
    fn new(member_id: u64, snapshotter: Arc<Snapshotter>) -> Releaser {
        let (tx, rx) = mpsc::channel::<Release>();
        let on_thread = Arc::clone(&snapshotter);
        let spawned = thread::Builder::new()
            .name(format!("raft-rm-{member_id:x}"))
            .spawn(move || {
                lower_thread_priority();
                for job in rx {
                    job.run(&on_thread);
                }
            });
        match spawned {
            Ok(handle) => Releaser {
                snapshotter,
                jobs: Some(tx),
                thread: Some(handle),
            },
            Err(e) => {
                tracing::warn!(error = %e, "no file release thread: releasing on the loop");
                Releaser {
                    snapshotter,
                    jobs: None,
                    thread: None,
                }
            }
        }
    }

    fn release(&self, job: Release) {
        let job = match &self.jobs {
            Some(jobs) => match jobs.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        job.run(&self.snapshotter);
    }

    /// Waits for the releases queued so far.
    fn join(&mut self) {
        self.jobs = None;
        if let Some(handle) = self.thread.take() {
            let _ = handle.join();
        }
    }
}

impl<O: Send + 'static> SnapshotScheduler<O> {
    /// `snapshot_index` is the index of the newest snapshot file recovery found (0 if none).
    pub(super) fn new(
        member_id: u64,
        snapshotter: Arc<Snapshotter>,
        done: super::CommandSender<O>,
        snapshot_count: u64,
        snapshot_index: u64,
        (max_wals, max_snapshots): (usize, usize),
    ) -> Self {
        SnapshotScheduler {
            member_id,
            releaser: Releaser::new(member_id, Arc::clone(&snapshotter)),
            snapshotter,
            done,
            snapshot_count,
            max_wals,
            max_snapshots,
            snapshot_index,
            next_snapshot_at: snapshot_index.saturating_add(snapshot_count),
            snapshot_thread: None,
            snapshot_started: Instant::now(),
            last_file_bytes: 0,
            wal_bytes_at_file: 0,
        }
    }

    /// A snapshot received from the leader at `index` was installed: it is the newest file, and
    /// the next snapshot is counted from it. Files are released by
    /// [`SnapshotScheduler::release_old_files`].
    pub(super) fn installed(&mut self, index: u64) {
        self.snapshot_index = index;
        self.next_snapshot_at = index.saturating_add(self.snapshot_count);
    }

    /// Once enough entries were applied: starts, on another thread, the state machine's persist
    /// job (for a snapshot in place) or the writing of the whole state. A snapshot a follower
    /// asked for is always written whole.
    ///
    /// A whole state written every `--snapshot-count` entries costs more than the log it lets
    /// go of once the state is large (a million keys of 256 bytes is a 300 MB file every 30 MB
    /// of log): such a snapshot also waits until the WAL has grown by half the last file's size
    /// (`wal_bytes`, the WAL's [`Wal::appended_bytes`]). Writing the state then costs at most
    /// twice the log, and a restart replays at most half a state's worth of log after it.
    pub(super) fn maybe_snapshot<S: StateMachine<Output = O>>(
        &mut self,
        raw: &RawNode<LogStore>,
        store: &LogStore,
        sm: &mut S,
        applied_index: u64,
        wal_bytes: u64,
    ) -> Result<(), RaftError> {
        if self.snapshot_thread.is_some() {
            return Ok(());
        }
        let wanted = store.take_snapshot_wanted() && applied_index > self.snapshot_index;
        if !wanted && (self.snapshot_count == 0 || applied_index < self.next_snapshot_at) {
            return Ok(());
        }
        let persist = if wanted { None } else { sm.persist() };
        let log_since_file = wal_bytes.saturating_sub(self.wal_bytes_at_file);
        if !wanted && persist.is_none() && log_since_file < self.last_file_bytes / 2 {
            return Ok(());
        }
        let index = applied_index;
        let term = match raw.raft.raft_log.term(index) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(index, error = %e, "cannot snapshot: term unknown");
                self.next_snapshot_at = index.saturating_add(self.snapshot_count);
                return Ok(());
            }
        };
        let metadata = SnapshotMetadata {
            index,
            term,
            conf_state: Some(raw.raft.prs().conf().to_conf_state()).into(),
            ..Default::default()
        };
        let done = self.done.clone();
        let job: Box<dyn FnOnce() + Send> = match persist {
            // The flush runs beside the loop: an apply round does not wait for the disk.
            Some(persist) => Box::new(move || {
                let result = persist();
                fail::fail_point!("raft::snapshot::persisted");
                // The loop may have stopped; then the marker is simply not written.
                let _ = done.send(Command::PersistedInPlace { metadata, result });
            }),
            None => {
                self.wal_bytes_at_file = wal_bytes;
                let write = sm.snapshot();
                let snapshotter = Arc::clone(&self.snapshotter);
                Box::new(move || {
                    let result = snapshotter.save(&metadata, write);
                    // The loop may have stopped; then the file is simply not used.
                    let _ = done.send(Command::SnapshotSaved(result));
                })
            }
        };
        let spawned = thread::Builder::new()
            .name(format!("raft-snap-{:x}", self.member_id))
            .spawn(move || {
                lower_thread_priority();
                job()
            });
        match spawned {
            Ok(handle) => {
                self.snapshot_thread = Some(handle);
                self.snapshot_started = Instant::now();
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the snapshot thread");
                self.next_snapshot_at = index.saturating_add(self.snapshot_count);
            }
        }
        Ok(())
    }

    /// A snapshot of a state machine that holds its state durably: a WAL marker at the applied
    /// index, after which the WAL below it is released. On restart the state machine's applied
    /// index covers the marker, so recovery starts from it without a snapshot file. The
    /// in-memory log keeps [`MEMORY_CATCH_UP_ENTRIES`] before the marker; a follower that needs
    /// older entries gets a whole snapshot written for it.
    fn snapshot_in_place(
        &mut self,
        metadata: SnapshotMetadata,
        wal: &mut Wal,
        store: &LogStore,
    ) -> Result<(), RaftError> {
        let index = metadata.index;
        self.next_snapshot_at = index.saturating_add(self.snapshot_count);
        if index <= self.snapshot_index {
            // A snapshot received from the leader while the state was persisted is newer.
            return Ok(());
        }
        wal.save_snapshot_marker(&metadata)?;
        wal.sync()?;
        fail::fail_point!("raft::snapshot::after_marker");
        // `snapshot_index` stays the newest snapshot *file*'s: a follower may still need one
        // written at this index.
        // As etcd does, keep a few thousand entries before the snapshot in memory for slow
        // followers; one further behind gets a snapshot written for it.
        let compact_to = index.saturating_sub(MEMORY_CATCH_UP_ENTRIES);
        if compact_to > raft::Storage::first_index(&store.mem).unwrap_or(0) {
            store
                .mem
                .wl()
                .compact(compact_to)
                .map_err(|e| RaftError::Raft(e.to_string()))?;
        }
        tracing::info!(
            index,
            "state persisted in place; released the raft log before it"
        );
        self.release_old_files(wal, index);
        Ok(())
    }

    /// The persist job of a snapshot in place finished: records the marker if it succeeded.
    pub(super) fn on_persisted_in_place(
        &mut self,
        metadata: SnapshotMetadata,
        result: std::io::Result<()>,
        wal: &mut Wal,
        store: &LogStore,
        applied_index: u64,
    ) -> Result<(), RaftError> {
        if let Some(handle) = self.snapshot_thread.take() {
            // It sent its result as its last act, so this returns at once.
            let _ = handle.join();
        }
        match result {
            Ok(()) => self.snapshot_in_place(metadata, wal, store),
            Err(e) => {
                tracing::error!(index = metadata.index, error = %e, "failed to persist the state");
                self.next_snapshot_at = applied_index.saturating_add(self.snapshot_count);
                Ok(())
            }
        }
    }

    /// Records a finished snapshot in the WAL, then compacts the log and removes old files.
    pub(super) fn on_snapshot_saved(
        &mut self,
        result: Result<SnapshotFile, SnapError>,
        wal: &mut Wal,
        store: &LogStore,
        applied_index: u64,
    ) -> Result<(), RaftError> {
        if let Some(handle) = self.snapshot_thread.take() {
            // It sent its result as its last act, so this returns at once.
            let _ = handle.join();
        }
        let file = match result {
            Ok(file) => file,
            Err(e) => {
                tracing::error!(error = %e, "failed to write snapshot");
                self.next_snapshot_at = applied_index.saturating_add(self.snapshot_count);
                return Ok(());
            }
        };
        let index = file.metadata.index;
        self.next_snapshot_at = index.saturating_add(self.snapshot_count);
        self.last_file_bytes = file.data_len();
        if index <= self.snapshot_index {
            // A snapshot received from the leader in the meantime is newer.
            return Ok(());
        }
        wal.save_snapshot_marker(&file.metadata)?;
        wal.sync()?;
        fail::fail_point!("raft::snapshot::after_marker");
        self.snapshot_index = index;
        store.set_latest_snapshot(file);
        store
            .mem
            .wl()
            .compact(index)
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        tracing::info!(
            index,
            bytes = self.last_file_bytes,
            took_ms = self.snapshot_started.elapsed().as_millis() as u64,
            "saved snapshot and compacted the raft log"
        );
        self.release_old_files(wal, index);
        Ok(())
    }

    /// At start: the files a crash left beyond the limits (between saving a snapshot and
    /// releasing the older files) are released now, not at the next snapshot.
    pub(super) fn release_left_over_files(&mut self, wal: &mut Wal) {
        if self.snapshot_index > 0 {
            self.release_old_files(wal, self.snapshot_index);
        }
    }

    /// Releases WAL segments below a durable snapshot beyond `--max-wals`, and snapshot files at
    /// or below it beyond `--max-snapshots`: the WAL lets go of the segments now, the release
    /// thread deletes the files.
    pub(super) fn release_old_files(&mut self, wal: &mut Wal, snapshot_index: u64) {
        let segments = if self.max_wals == 0 {
            Vec::new()
        } else {
            wal.release_segments(snapshot_index, self.max_wals)
        };
        let snapshots = (self.max_snapshots > 0).then_some((self.max_snapshots, snapshot_index));
        if segments.is_empty() && snapshots.is_none() {
            return;
        }
        self.releaser.release(Release {
            wal_dir: wal.dir().to_path_buf(),
            segments,
            snapshots,
        });
    }

    /// Drops applied entries from the in-memory log, keeping [`MEMORY_CATCH_UP_ENTRIES`] for
    /// followers that lag a little and, on a leader, everything a follower has not yet
    /// replicated. Without this the memory log grows to `--snapshot-count` entries (about 40 MB
    /// at 100,000 entries of 256-byte values). The entries stay in the WAL files until the
    /// next snapshot; a follower that needs a trimmed entry gets a fresh snapshot.
    pub(super) fn trim_memory_log(
        &self,
        raw: &RawNode<LogStore>,
        store: &LogStore,
        applied_index: u64,
    ) {
        let mut upto = applied_index.saturating_sub(MEMORY_CATCH_UP_ENTRIES);
        if raw.raft.state == StateRole::Leader {
            for (id, progress) in raw.raft.prs().iter() {
                if *id != self.member_id {
                    upto = upto.min(progress.matched + 1);
                }
            }
        }
        let first = raft::Storage::first_index(&store.mem).unwrap_or(0);
        // In steps, not on every round.
        if upto < first.saturating_add(MEMORY_CATCH_UP_ENTRIES) {
            return;
        }
        if let Err(e) = store.mem.wl().compact(upto) {
            tracing::warn!(index = upto, error = %e, "cannot trim the in-memory raft log");
        }
    }

    /// Waits for a snapshot being written and for the files released so far to be deleted
    /// (when the loop stops).
    pub(super) fn join(&mut self) {
        if let Some(handle) = self.snapshot_thread.take() {
            let _ = handle.join();
        }
        self.releaser.join();
    }
}
