//! etcd's watchers.
//!
//! Owns: the [`WatchHub`] — every watcher of every watch stream, split into *synced* watchers
//! (up to date: they get each applied revision's events as the dispatcher hands them out) and
//! *unsynced* ones (starting in the past, or too slow to keep up), which are caught up from
//! mvcc's history; the cancellation of watchers whose start revision was compacted; progress
//! notifications; and fragmentation of large responses.
//!
//! Threads. The apply path (the raft loop) calls [`WatchHub::queue`] for each revision, which
//! only appends its events to a bounded queue behind its own small lock, and
//! [`WatchHub::wake`] once per applied batch, which wakes the *dispatcher* thread
//! (`watch-dispatch`, started by the first `queue`; [`WatchHub::notify`] does both): neither
//! takes the hub's lock, waits on a client, or does work per watcher (only a snapshot
//! restore's [`WatchHub::reset`] takes the hub's lock on the apply path). The dispatcher hands each
//! queued revision to the synced watchers; the *catch-up* thread (`watch-sync`,
//! [`WatchHub::start_sync_thread`]) serves the unsynced ones from history, one read per round
//! shared by all of them. The gRPC tasks create and cancel watchers and ask for progress,
//! taking the hub's lock through `lock_from_task` so that a runtime worker never waits for it in
//! place (with every worker waiting, peer messages would stop and the leader lose its followers).
//!
//! Cost. Both sets are indexed by what their watchers watch (a key map plus an interval tree, as
//! etcd's `watcherGroup`; see `index`): an event is matched against the watchers it concerns
//! only, O(log n + matches), however many watchers watch other keys; a catch-up round costs
//! O(unsynced watchers + events × log n + matches). A synced watcher's `next_rev` therefore
//! moves only when an event concerns it: the hub's `dispatched_rev` says up to which revision
//! every synced watcher has been served, and a watcher leaving the synced set gets
//! `max(next_rev, dispatched_rev + 1)`.
//!
//! Invariants.
//! - A watcher's `next_rev` (the first revision it may still be sent) is the single source of
//!   truth, read and moved only under the hub's lock, on both paths; the dispatcher holds that
//!   lock for a whole revision. So no event is lost or sent twice, every revision's events (one
//!   Txn) travel in one response, and a watcher created while revisions are queued gets exactly
//!   those at or after its `next_rev`.
//! - Every revision after `max(dispatched_rev, gap_through)` that had events is in the queue. A
//!   watcher is synced only if its `next_rev` lies after that point (created, or caught up, so
//!   far), so the queue holds everything it still needs.
//! - Each stream has one bounded channel of responses ([`WatchHub::open_stream`]), never waited
//!   on: a watcher whose events do not fit moves to the unsynced set, so a slow client costs at
//!   most its channel's worth of memory. The queue is bounded too: past the bound it is dropped
//!   and the watchers that needed it catch up from history (see `Queue`).
//! - A progress response (requested, or periodic) is sent under the hub's lock, after the events
//!   it speaks for, and never names a revision still queued for one of its watchers.
//! - Previous values (`prev_kv`) are read from the current store at `mod_revision - 1`, and only
//!   for events a watcher that asked for them is sent, as etcd's watch server does; a restored
//!   store carries the same history, and one compacted past that revision leaves it out.
//!
//! Modules: `watcher` (a watcher and the indexed sets of them), `dispatch` (the queue and the
//! dispatcher thread), `catch_up` (the catch-up thread), `stream` ([`WatchStream`] and the hub's
//! side of each stream), `response` (building, fragmenting and sending responses; `prev_kv`),
//! `index` (the key map and interval tree).
//!
//! Must not depend on: raft, gRPC services. It reads the store through [`StoreSource`]; response
//! headers carry only the revision (the gRPC layer fills in cluster, member and term).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::Thread;

use foldhash::{HashMap, HashMapExt};
use metastore_mvcc::Store;
use parking_lot::Mutex;

mod catch_up;
mod dispatch;
mod index;
mod response;
mod stream;
mod watcher;

pub use stream::WatchStream;

use dispatch::Queue;
use watcher::{StreamState, WatcherKey, WatcherSet};

/// Responses buffered per stream before its watchers fall back to catching up from history
/// (etcd's `chanBufLen`).
pub const STREAM_BUFFER: usize = 128;
/// Most events read from history per catch-up round.
const CATCH_UP_BATCH: usize = 1000;
/// Default bound of the dispatch queue's memory ([`WatchHub::set_max_queued_bytes`]).
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;
/// `watch_id` of a progress response that speaks for every watcher of a stream.
pub const PROGRESS_ALL_WATCHERS: i64 = -1;
/// etcd's reason for a create naming a watch id already in use on the stream.
const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// etcd's reason for a create whose range is empty.
const EMPTY_RANGE: &str = "mvcc: watcher range is empty";

/// How the hub reaches the current mvcc store (a snapshot restore replaces it).
pub trait StoreSource: Send + Sync + 'static {
    /// The store to read from now.
    fn store(&self) -> Arc<Store>;
}

/// Errors of a watch stream.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The stream's receiving side is gone (the client left).
    #[error("watch stream closed")]
    Closed,
}

/// What the hub has done so far ([`WatchHub::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Watchers that get events as they are applied.
    pub synced: usize,
    /// Watchers catching up from history.
    pub unsynced: usize,
    /// The newest revision handed to [`WatchHub::notify`].
    pub notified_revision: i64,
    /// Every revision up to this one has been handed to the synced watchers.
    pub dispatched_revision: i64,
    /// Revisions notified but not yet dispatched.
    pub queued_revisions: usize,
    /// Their estimated size.
    pub queued_bytes: usize,
    /// Times the queue outgrew its bound and was dropped (its watchers caught up from history).
    pub overflows: u64,
    /// Since the hub was made: watchers whose key or range matched a live event, each counted
    /// once per revision. Watchers on other keys are not looked at, so with no matches this
    /// stays put however many watchers there are.
    pub examined: u64,
    /// Since the hub was made: index entries (single-key buckets and interval-tree nodes)
    /// looked at to find those matches, O(log n) per event.
    pub index_visits: u64,
}

struct HubInner {
    /// Every revision up to this one has been handed to the synced watchers: a synced watcher
    /// has been sent everything before `max(next_rev, dispatched_rev + 1)` (its own `next_rev`
    /// moves only when an event concerns it, so that a write costs nothing for the others).
    dispatched_rev: i64,
    next_stream_id: u64,
    streams: HashMap<u64, StreamState>,
    synced: WatcherSet,
    unsynced: WatcherSet,
    examined: u64,
    index_visits: u64,
}

impl HubInner {
    fn remove(&mut self, key: WatcherKey) -> bool {
        if let Some(s) = self.streams.get_mut(&key.0) {
            s.ids.remove(&key.1);
        }
        self.synced.remove(key).is_some() || self.unsynced.remove(key).is_some()
    }

    /// Moves a synced watcher to the unsynced set, its `next_rev` made explicit.
    fn unsync(&mut self, key: WatcherKey) {
        if let Some(mut w) = self.synced.remove(key) {
            w.next_rev = w.next_rev.max(self.dispatched_rev + 1);
            self.unsynced.insert(key, w);
        }
    }

    /// The revision up to which a watcher has been sent everything (`notified`: the queue's
    /// `notified_rev`). Revisions still queued count as not sent: a synced watcher is only
    /// known to have everything up to `dispatched_rev`.
    fn progress(&self, key: &WatcherKey, notified: i64) -> Option<i64> {
        let sent = match (self.synced.get(key), self.unsynced.get(key)) {
            (Some(w), _) => (w.next_rev - 1).max(self.dispatched_rev),
            (None, Some(w)) => w.next_rev - 1,
            (None, None) => return None,
        };
        Some(sent.min(notified))
    }
}

/// Every watcher of this member. Shared by the apply path, the Watch service, the dispatcher and
/// the catch-up thread.
pub struct WatchHub {
    source: Arc<dyn StoreSource>,
    /// Lock order: `inner`, then `queue`. The apply path takes only `queue`.
    inner: Mutex<HubInner>,
    queue: Mutex<Queue>,
    max_response_bytes: AtomicUsize,
    sync_thread: OnceLock<Thread>,
    /// The dispatcher thread, started by the first [`WatchHub::queue`]; `None` if it could not
    /// be started (then `wake` dispatches itself).
    dispatcher: OnceLock<Option<Thread>>,
    /// Revisions were queued by [`WatchHub::queue`] since the dispatcher was last woken.
    unwoken: std::sync::atomic::AtomicBool,
    /// Async tasks pass this gate (one at a time) before they take `inner`, so that at most one
    /// of them waits for the lock in a blocking thread (`lock_from_task`); the others wait
    /// here without holding a thread.
    task_gate: tokio::sync::Semaphore,
    me: Weak<WatchHub>,
    /// Tests hold the dispatcher thread back to look at queued-but-undelivered states.
    #[cfg(test)]
    dispatch_paused: std::sync::atomic::AtomicBool,
    /// How many times the dispatcher was woken (tests count wake-ups).
    #[cfg(test)]
    wakeups: std::sync::atomic::AtomicU64,
}

impl WatchHub {
    /// A hub with no watchers, up to date with the store's current revision.
    pub fn new(source: Arc<dyn StoreSource>) -> Arc<WatchHub> {
        let notified_rev = source.store().current_revision();
        Arc::new_cyclic(|me| WatchHub {
            source,
            task_gate: tokio::sync::Semaphore::new(1),
            queue: Mutex::new(Queue {
                notified_rev,
                revisions: VecDeque::new(),
                bytes: 0,
                max_bytes: MAX_QUEUED_BYTES,
                gap_through: notified_rev,
                overflows: 0,
            }),
            dispatcher: OnceLock::new(),
            unwoken: std::sync::atomic::AtomicBool::new(false),
            me: me.clone(),
            #[cfg(test)]
            dispatch_paused: Default::default(),
            #[cfg(test)]
            wakeups: Default::default(),
            inner: Mutex::new(HubInner {
                dispatched_rev: notified_rev,
                next_stream_id: 0,
                streams: HashMap::new(),
                synced: WatcherSet::new(),
                unsynced: WatcherSet::new(),
                examined: 0,
                index_visits: 0,
            }),
            max_response_bytes: AtomicUsize::new(1536 * 1024),
            sync_thread: OnceLock::new(),
        })
    }

    /// Responses of watchers that asked for fragmentation are split above this size
    /// (`--max-request-bytes`).
    pub fn set_max_response_bytes(&self, bytes: usize) {
        self.max_response_bytes
            .store(bytes.max(1), Ordering::Relaxed);
    }

    /// Bounds the memory of revisions applied but not yet dispatched (default
    /// [`MAX_QUEUED_BYTES`]); past it, lagging watchers catch up from history instead.
    pub fn set_max_queued_bytes(&self, bytes: usize) {
        self.queue.lock().max_bytes = bytes;
    }

    /// The hub's lock, taken from a task of the async runtime (the gRPC and HTTP handlers).
    /// The dispatcher and catch-up threads may hold it for a whole revision or round; a
    /// runtime worker that waited for it in place could not run anything else meanwhile, and
    /// with every worker waiting, the runtime (peer messages, raft heartbeats included) would
    /// stall: a client with enough watchers could make its leader lose its followers. So a
    /// contended lock is waited for through `block_in_place`, which hands the worker's other
    /// tasks to another thread first.
    pub(crate) fn lock_from_task(&self) -> parking_lot::MutexGuard<'_, HubInner> {
        if let Some(inner) = self.inner.try_lock() {
            return inner;
        }
        let on_multi_thread_runtime = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_multi_thread_runtime {
            tokio::task::block_in_place(|| self.inner.lock())
        } else {
            self.inner.lock()
        }
    }

    /// (synced, unsynced) watcher counts.
    pub fn watcher_counts(&self) -> (usize, usize) {
        let inner = self.lock_from_task();
        (inner.synced.len(), inner.unsynced.len())
    }

    /// Watcher counts and the work done matching events to watchers.
    pub fn stats(&self) -> WatchStats {
        let inner = self.lock_from_task();
        let queue = self.queue.lock();
        WatchStats {
            synced: inner.synced.len(),
            unsynced: inner.unsynced.len(),
            notified_revision: queue.notified_rev,
            dispatched_revision: inner.dispatched_rev,
            queued_revisions: queue.revisions.len(),
            queued_bytes: queue.bytes,
            overflows: queue.overflows,
            examined: inner.examined,
            index_visits: inner.index_visits,
        }
    }

    /// The state jumped to `revision` (a snapshot was restored): queued revisions are dropped
    /// and every watcher catches up from history.
    pub fn reset(&self, revision: i64) {
        let mut inner = self.inner.lock();
        let mut queue = self.queue.lock();
        queue.revisions.clear();
        queue.bytes = 0;
        queue.notified_rev = revision;
        queue.gap_through = revision;
        drop(queue);
        let dispatched = inner.dispatched_rev;
        for (key, mut w) in inner.synced.take_all() {
            w.next_rev = w.next_rev.max(dispatched + 1);
            inner.unsynced.insert(key, w);
        }
        inner.dispatched_rev = revision;
        drop(inner);
        self.wake_sync();
    }
}

#[cfg(test)]
mod tests;
