//! Background compaction: etcd's FIFO compaction scheduler and `scheduleCompaction`.
//!
//! Applying a Compact ([`crate::Store::apply_write`], on the apply thread) does only O(1) work:
//! it records `scheduledCompactRev` durably in the entry's batch, raises the store's compact
//! revision (reads below it fail at once) and queues a [`Job`] here. Each store owns at most one
//! worker thread (`mvcc-compactor`, spawned with the first job; stopped and joined when the store
//! is dropped or [`crate::Store::stop_compaction`] is called), which runs the jobs one after the
//! other, in the order they were applied. A job:
//!
//! 1. compacts the key index at its revision, [`CompactionConfig::batch_limit`] keys per hold
//!    of the store's state lock, collecting the revisions to keep on disk;
//! 2. walks the `key` bucket up to its revision `batch_limit` pairs at a time, holding no store
//!    lock: each step deletes the revisions not kept in one backend batch (a run of consecutive
//!    ones as one range deletion, see [`Runs`]), then pauses
//!    [`CompactionConfig::sleep_interval`]. Every pair walked (deleted or not) is hashed before
//!    its deletion, which gives etcd's HashKV at the compact revision, the same on every member:
//!    the previous job finished before this one started, so what the walk sees follows from the
//!    log alone;
//! 3. writes `finishedCompactRev` in its last batch, records the hash, and wakes the waiters
//!    (physical compactions, HashKV at that revision).
//!
//! Readers are unaffected by how far a job got: the index stops pointing at a revision before
//! any job deletes it, a read's backend snapshot is taken together with its index lookup, and
//! HashKV skips what a running compaction will delete.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metastore_storage::{ScanRange, StorageError, Visit, WriteBatch};
use parking_lot::{Condvar, Mutex, RwLockWriteGuard};

use crate::hash::KvHasher;
use crate::key_index::IndexKey;
use crate::revision::{main_prefix, Revision};
use crate::store::{bad_revision_key, Inner};
use crate::{MvccError, FINISHED_COMPACT_KEY, KEY_BUCKET, META_BUCKET};

/// How background compaction paces itself (etcd's `--experimental-compaction-batch-limit` and
/// `--experimental-compaction-sleep-interval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionConfig {
    /// Index keys compacted per hold of the store lock, and `key` bucket pairs visited per
    /// backend batch (0 counts as 1). etcd's default: 1000.
    pub batch_limit: usize,
    /// Pause between two backend batches. etcd's default: 10 ms.
    pub sleep_interval: Duration,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            batch_limit: 1000,
            sleep_interval: Duration::from_millis(10),
        }
    }
}

/// One compaction to carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Job {
    /// The compact revision.
    pub(crate) rev: i64,
    /// The compact revision before it (what the hash reports as `compact_revision`).
    pub(crate) prev: i64,
    /// Whether to keep the hash for HashKV: not for a compaction resumed on open, part of whose
    /// history may be gone already.
    pub(crate) record_hash: bool,
}

struct Progress {
    /// Queued jobs; the front one is running.
    queue: VecDeque<Job>,
    /// The revision of the last finished compaction (-1 when none).
    finished: i64,
    paused: bool,
    stopped: bool,
    /// A job that failed (its revision and error): the worker has stopped.
    failed: Option<(i64, String)>,
    config: CompactionConfig,
}

/// The queue between the apply thread and the worker, and the worker's progress.
pub(crate) struct Compactor {
    progress: Mutex<Progress>,
    changed: Condvar,
}

/// Why a job did not finish.
pub(crate) enum Interrupt {
    Stopped,
    Failed(MvccError),
}

impl From<MvccError> for Interrupt {
    fn from(e: MvccError) -> Self {
        Interrupt::Failed(e)
    }
}

impl From<StorageError> for Interrupt {
    fn from(e: StorageError) -> Self {
        Interrupt::Failed(e.into())
    }
}

/// What a finished job did.
struct Outcome {
    hash: u32,
    deleted: usize,
    batches: usize,
}

impl Compactor {
    pub(crate) fn new(finished: i64, config: CompactionConfig) -> Self {
        Compactor {
            progress: Mutex::new(Progress {
                queue: VecDeque::new(),
                finished,
                paused: false,
                stopped: false,
                failed: None,
                config,
            }),
            changed: Condvar::new(),
        }
    }

    pub(crate) fn set_config(&self, config: CompactionConfig) {
        self.progress.lock().config = config;
        self.changed.notify_all();
    }

    pub(crate) fn set_paused(&self, paused: bool) {
        self.progress.lock().paused = paused;
        self.changed.notify_all();
    }

    pub(crate) fn finished(&self) -> i64 {
        self.progress.lock().finished
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.progress.lock().stopped
    }

    /// Queue a job behind the others. Ignored once stopped (a store being replaced or dropped);
    /// the durable scheduled mark makes the next store resume it.
    pub(crate) fn enqueue(&self, job: Job) {
        let mut p = self.progress.lock();
        if !p.stopped {
            p.queue.push_back(job);
            self.changed.notify_all();
        }
    }

    /// Ask the worker to stop after its current step and wake every waiter.
    pub(crate) fn stop(&self) {
        self.progress.lock().stopped = true;
        self.changed.notify_all();
    }

    /// Block until the compaction at `rev` or a later one finished (`Ok(true)`), or none is
    /// queued that would (`Ok(false)`: never scheduled here, or the worker stopped).
    pub(crate) fn wait_finished(&self, rev: i64) -> Result<bool, MvccError> {
        let mut p = self.progress.lock();
        loop {
            if p.finished >= rev {
                return Ok(true);
            }
            if let Some((failed_rev, message)) = &p.failed {
                return Err(StorageError::Engine(format!(
                    "compaction at revision {failed_rev} failed: {message}"
                ))
                .into());
            }
            if p.stopped || !p.queue.iter().any(|j| j.rev >= rev) {
                return Ok(false);
            }
            self.changed.wait(&mut p);
        }
    }

    /// Block while a queued job at `rev` will record a hash for it.
    pub(crate) fn wait_for_hash(&self, rev: i64) {
        let mut p = self.progress.lock();
        while !p.stopped
            && p.failed.is_none()
            && p.queue.iter().any(|j| j.rev == rev && j.record_hash)
        {
            self.changed.wait(&mut p);
        }
    }

    /// The job to run next, waiting for one; `None` once stopped.
    fn next_job(&self) -> Option<Job> {
        let mut p = self.progress.lock();
        loop {
            if p.stopped {
                return None;
            }
            if let Some(job) = p.queue.front() {
                return Some(*job);
            }
            self.changed.wait(&mut p);
        }
    }

    fn job_finished(&self, rev: i64) {
        let mut p = self.progress.lock();
        p.queue.pop_front();
        p.finished = rev;
        self.changed.notify_all();
    }

    fn job_failed(&self, rev: i64, message: String) {
        let mut p = self.progress.lock();
        p.failed = Some((rev, message));
        self.changed.notify_all();
    }

    /// Before each step: wait while paused; the batch limit to use, or why to give up.
    fn proceed(&self) -> Result<usize, Interrupt> {
        let mut p = self.progress.lock();
        while p.paused && !p.stopped {
            self.changed.wait(&mut p);
        }
        if p.stopped {
            return Err(Interrupt::Stopped);
        }
        Ok(p.config.batch_limit.max(1))
    }

    /// Between two backend batches: the configured pause, cut short by a stop.
    fn rest(&self) -> Result<(), Interrupt> {
        let mut p = self.progress.lock();
        let deadline = Instant::now() + p.config.sleep_interval;
        while !p.stopped && !self.changed.wait_until(&mut p, deadline).timed_out() {}
        if p.stopped {
            return Err(Interrupt::Stopped);
        }
        Ok(())
    }
}

/// The worker thread's loop: run queued jobs in order until stopped or a job fails.
pub(crate) fn run(inner: Arc<Inner>) {
    while let Some(job) = inner.compactor.next_job() {
        let started = Instant::now();
        match run_job(&inner, job) {
            Ok(outcome) => {
                if job.record_hash {
                    inner.record_hash(job.prev, job.rev, outcome.hash);
                }
                inner.compactor.job_finished(job.rev);
                crate::metrics::compaction_finished(outcome.deleted, started.elapsed());
                tracing::info!(
                    compact_revision = job.rev,
                    deleted = outcome.deleted,
                    batches = outcome.batches,
                    took_ms = started.elapsed().as_millis() as u64,
                    "finished scheduled compaction"
                );
            }
            Err(Interrupt::Stopped) => return,
            Err(Interrupt::Failed(e)) => {
                tracing::error!(compact_revision = job.rev, error = %e, "compaction failed");
                inner.compactor.job_failed(job.rev, e.to_string());
                return;
            }
        }
    }
}

fn run_job(inner: &Inner, job: Job) -> Result<Outcome, Interrupt> {
    // 1. The key index, a bounded number of keys per hold of the lock.
    let mut available = HashSet::new();
    let mut after: Option<IndexKey> = None;
    loop {
        let limit = inner.compactor.proceed()?;
        let mut st = inner.state.write();
        let next = st
            .index
            .compact_some(job.rev, after.as_deref(), limit, &mut available);
        // Hand the lock to whoever waits (readers, the apply thread) before the next step.
        RwLockWriteGuard::unlock_fair(st);
        match next {
            Some(last) => after = Some(last),
            None => break,
        }
    }

    // 2. The backend, one batch at a time, no store lock held.
    let mut hasher = KvHasher::new(job.prev, job.rev, &available);
    let end = main_prefix(job.rev + 1);
    let mut start = Vec::new();
    let mut deleted = 0;
    let mut batches = 0;
    loop {
        let limit = inner.compactor.proceed()?;
        let view = inner.backend.snapshot()?;
        let mut batch = WriteBatch::new();
        let mut runs = Runs::default();
        let mut visited = 0;
        let mut last_key = Vec::new();
        let mut failure = None;
        view.scan(
            KEY_BUCKET,
            ScanRange::between(&start, Some(&end)).limit(limit),
            &mut |k, v| {
                let Some((r, tombstone)) = Revision::from_key(k) else {
                    failure = Some(bad_revision_key(k));
                    return Visit::Stop;
                };
                visited += 1;
                if available.contains(&r) {
                    runs.close(&mut batch);
                } else {
                    runs.extend(k);
                }
                hasher.write(k, v, r, tombstone);
                last_key.clear();
                last_key.extend_from_slice(k);
                Visit::Continue
            },
        )?;
        drop(view);
        if let Some(e) = failure {
            return Err(e.into());
        }
        runs.close(&mut batch);
        deleted += runs.deleted;
        let last = visited < limit;
        if last {
            batch.put(
                META_BUCKET,
                FINISHED_COMPACT_KEY,
                Revision::new(job.rev, 0).to_key(false),
            );
        }
        crate::metrics::commit(inner.backend.as_ref(), batch)?;
        batches += 1;
        fail::fail_point!("mvcc::compaction::batch_committed");
        if last {
            return Ok(Outcome {
                hash: hasher.sum(),
                deleted,
                batches,
            });
        }
        // The smallest key after the last one visited.
        start = last_key;
        start.push(0);
        inner.compactor.rest()?;
    }
}

/// The revisions one step deletes, queued as runs of consecutive keys of the `key` bucket: a
/// run of several as one range deletion, a run of one as a point deletion. On RocksDB a
/// compaction of 1M revisions over 10,000 keys then writes about 10,000 range tombstones
/// instead of a tombstone per revision, which RocksDB's own compactions had to carry down and
/// merge level by level.
///
/// A run's range `[first, last + 0x00)` holds exactly the keys walked: they are consecutive in
/// the step's snapshot, and nothing is ever written at or below a compact revision, so no key
/// can appear between them before the deletion lands.
#[derive(Default)]
struct Runs {
    first: Vec<u8>,
    last: Vec<u8>,
    /// Keys in the open run.
    len: usize,
    /// Keys deleted by the runs closed so far.
    deleted: usize,
}

impl Runs {
    /// The next key walked is deleted.
    fn extend(&mut self, key: &[u8]) {
        if self.len == 0 {
            self.first.clear();
            self.first.extend_from_slice(key);
        }
        self.last.clear();
        self.last.extend_from_slice(key);
        self.len += 1;
    }

    /// The next key walked is kept, or the step ends: queue the open run's deletion.
    fn close(&mut self, batch: &mut WriteBatch) {
        match self.len {
            0 => return,
            1 => batch.delete(KEY_BUCKET, self.first.clone()),
            _ => {
                let mut end = self.last.clone();
                end.push(0);
                batch.delete_range(KEY_BUCKET, self.first.clone(), end);
            }
        }
        self.deleted += self.len;
        self.len = 0;
    }
}
