//! etcd's watchers.
//!
//! Owns: the [`WatchHub`] — every watcher of every watch stream, split into *synced* watchers
//! (up to date: they get each applied revision's events as the dispatcher hands them out) and
//! *unsynced* ones (starting in the past, or too slow to keep up), which are caught up from
//! mvcc's history; the cancellation of watchers whose start revision was compacted; progress
//! notifications; and fragmentation of large responses.
//!
//! Threads. The apply path (the raft loop) calls [`WatchHub::notify`], which only appends the
//! revision's events to a bounded queue behind its own small lock and wakes the *dispatcher*
//! thread (`watch-dispatch`, started by the first `notify`): `notify` never takes the hub's
//! lock, never waits on a client, and does no work per watcher (only a snapshot restore's
//! [`WatchHub::reset`] takes the hub's lock on the apply path). The dispatcher hands each
//! queued revision to the synced watchers; the *catch-up* thread (`watch-sync`,
//! [`WatchHub::start_sync_thread`]) serves the unsynced ones from history, one read per round
//! shared by all of them. The gRPC tasks create and cancel watchers and ask for progress.
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
//! Must not depend on: raft, gRPC services. It reads the store through [`StoreSource`]; response
//! headers carry only the revision (the gRPC layer fills in cluster, member and term).

use std::collections::{HashMap, HashSet, VecDeque};
use std::mem;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use metastore_mvcc::{MvccError, Store};
use metastore_proto::etcdserverpb::{
    watch_create_request::FilterType, RangeRequest, ResponseHeader, WatchCreateRequest,
    WatchResponse,
};
use metastore_proto::mvccpb::{event::EventType, Event};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::mpsc::{self, error::TrySendError, OwnedPermit};

mod index;
use index::KeyIndex;

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

type WatcherKey = (u64, i64);

struct Watcher {
    key: Vec<u8>,
    /// `None`: the single key; `Some(empty)`: every key from `key` on.
    range_end: Option<Vec<u8>>,
    /// The first revision this watcher has not been sent.
    next_rev: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    progress_notify: bool,
    tx: mpsc::Sender<WatchResponse>,
}

impl Watcher {
    fn matches(&self, key: &[u8]) -> bool {
        match &self.range_end {
            None => key == self.key.as_slice(),
            Some(end) => key >= self.key.as_slice() && (end.is_empty() || key < end.as_slice()),
        }
    }

    /// This watcher's view of `events`: its range, its filters, `prev_kv` only if asked for.
    fn select<'a>(&self, events: impl Iterator<Item = &'a Event>) -> Vec<Event> {
        events
            .filter(|e| {
                let is_put = e.r#type == EventType::Put as i32;
                !(is_put && self.no_put || !is_put && self.no_delete)
                    && e.kv.as_ref().is_some_and(|kv| self.matches(&kv.key))
            })
            .map(|e| {
                let mut e = e.clone();
                if !self.prev_kv {
                    e.prev_kv = None;
                }
                e
            })
            .collect()
    }
}

struct StreamState {
    next_watch_id: i64,
    ids: HashSet<i64>,
}

/// Watchers together with a [`KeyIndex`] of what they watch. Every insert and removal goes
/// through it, so the index never disagrees with the map.
struct WatcherSet {
    watchers: HashMap<WatcherKey, Watcher>,
    index: KeyIndex<WatcherKey>,
}

impl WatcherSet {
    fn new() -> Self {
        WatcherSet {
            watchers: HashMap::new(),
            index: KeyIndex::new(),
        }
    }

    fn insert(&mut self, key: WatcherKey, w: Watcher) {
        if let Some(old) = self.watchers.remove(&key) {
            self.index.remove(key, &old.key, old.range_end.as_deref());
        }
        self.index.insert(key, &w.key, w.range_end.as_deref());
        self.watchers.insert(key, w);
    }

    fn remove(&mut self, key: WatcherKey) -> Option<Watcher> {
        let w = self.watchers.remove(&key)?;
        self.index.remove(key, &w.key, w.range_end.as_deref());
        Some(w)
    }

    fn take_all(&mut self) -> HashMap<WatcherKey, Watcher> {
        self.index.clear();
        mem::take(&mut self.watchers)
    }

    fn get(&self, key: &WatcherKey) -> Option<&Watcher> {
        self.watchers.get(key)
    }

    fn get_mut(&mut self, key: &WatcherKey) -> Option<&mut Watcher> {
        self.watchers.get_mut(key)
    }

    fn len(&self) -> usize {
        self.watchers.len()
    }

    fn is_empty(&self) -> bool {
        self.watchers.is_empty()
    }

    /// For each event, the watchers of this set whose key or range contains its key: a map from
    /// watcher to the indices of its events, in order. Adds the index entries looked at to
    /// `visited`.
    fn matching(&self, events: &[Event], visited: &mut u64) -> HashMap<WatcherKey, Vec<usize>> {
        let mut matched: HashMap<WatcherKey, Vec<usize>> = HashMap::new();
        for (i, event) in events.iter().enumerate() {
            let Some(kv) = &event.kv else { continue };
            let looked = self
                .index
                .stab(&kv.key, |id| matched.entry(id).or_default().push(i));
            *visited += looked as u64;
        }
        matched
    }
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

/// Revisions applied but not yet handed to the watchers: what [`WatchHub::notify`] leaves for
/// the dispatcher thread. Behind its own lock, so that the apply path never waits for the hub's.
///
/// Bounded by an estimate of its memory (`max_bytes`). When the dispatcher falls that far
/// behind, the queue is dropped whole and `gap_through` remembers up to which revision: the
/// dispatcher then moves every synced watcher that still needed one of those revisions to the
/// unsynced set, and the catch-up thread reads them from history, in batches shared by all
/// watchers. The events are in the store anyway, so nothing is lost; memory stays bounded
/// however slow the dispatcher is, and `notify` never blocks or does per-watcher work.
/// (Moving every lagging watcher at once is what etcd does for a slow watcher, applied to the
/// whole group: it only happens when the group is already far behind.)
struct Queue {
    /// The newest revision handed to [`WatchHub::notify`].
    notified_rev: i64,
    revisions: VecDeque<Pending>,
    bytes: usize,
    max_bytes: usize,
    /// Revisions up to this one were dropped from the queue (an overflow): whoever still needs
    /// them reads history. Every revision after `max(dispatched_rev, gap_through)` that had
    /// events is in `revisions`.
    gap_through: i64,
    overflows: u64,
}

struct Pending {
    revision: i64,
    events: Vec<Event>,
    bytes: usize,
}

/// What queueing `events` costs, roughly: their encoding plus bookkeeping.
fn queued_bytes(events: &[Event]) -> usize {
    64 + events.iter().map(|e| e.encoded_len() + 64).sum::<usize>()
}

enum SendFailure {
    Full,
    Closed,
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
    /// The dispatcher thread, started by the first [`WatchHub::notify`]; `None` if it could not
    /// be started (then `notify` dispatches itself).
    dispatcher: OnceLock<Option<Thread>>,
    me: Weak<WatchHub>,
    /// Tests hold the dispatcher thread back to look at queued-but-undelivered states.
    #[cfg(test)]
    dispatch_paused: std::sync::atomic::AtomicBool,
}

fn response(revision: i64, watch_id: i64) -> WatchResponse {
    WatchResponse {
        header: Some(ResponseHeader {
            revision,
            ..Default::default()
        }),
        watch_id,
        ..Default::default()
    }
}

/// Splits a response into fragments of at most `max_bytes` (at least one event each); all but
/// the last are marked `fragment`, as etcd's `sendFragments` does.
fn fragments(resp: WatchResponse, max_bytes: usize) -> Vec<WatchResponse> {
    let mut parts: Vec<Vec<Event>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for event in resp.events.iter().cloned() {
        let len = event.encoded_len() + 8;
        if !current.is_empty() && size + len > max_bytes {
            parts.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(event);
    }
    parts.push(current);
    let last = parts.len() - 1;
    parts
        .into_iter()
        .enumerate()
        .map(|(i, events)| WatchResponse {
            events,
            fragment: i < last,
            ..resp.clone()
        })
        .collect()
}

impl WatchHub {
    /// A hub with no watchers, up to date with the store's current revision.
    pub fn new(source: Arc<dyn StoreSource>) -> Arc<WatchHub> {
        let notified_rev = source.store().current_revision();
        Arc::new_cyclic(|me| WatchHub {
            source,
            queue: Mutex::new(Queue {
                notified_rev,
                revisions: VecDeque::new(),
                bytes: 0,
                max_bytes: MAX_QUEUED_BYTES,
                gap_through: notified_rev,
                overflows: 0,
            }),
            dispatcher: OnceLock::new(),
            me: me.clone(),
            #[cfg(test)]
            dispatch_paused: Default::default(),
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

    /// Starts the thread that catches unsynced watchers up from history. It stops once the hub
    /// is dropped.
    pub fn start_sync_thread(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let weak: Weak<WatchHub> = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("watch-sync".into())
            .spawn(move || loop {
                let Some(hub) = weak.upgrade() else { return };
                let round = hub.sync_round();
                drop(hub);
                match round {
                    Round::Progressed => {}
                    Round::Stuck => std::thread::park_timeout(Duration::from_millis(10)),
                    Round::Idle => std::thread::park_timeout(Duration::from_millis(100)),
                }
            })?;
        let _ = self.sync_thread.set(handle.thread().clone());
        Ok(handle)
    }

    fn wake_sync(&self) {
        if let Some(t) = self.sync_thread.get() {
            t.unpark();
        }
    }

    /// (synced, unsynced) watcher counts.
    pub fn watcher_counts(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.synced.len(), inner.unsynced.len())
    }

    /// Watcher counts and the work done matching events to watchers.
    pub fn stats(&self) -> WatchStats {
        let inner = self.inner.lock();
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

    /// Called by the apply path after `events` were applied at `revision`. Only queues them
    /// and wakes the dispatcher thread, which hands them to the watchers: the apply path never
    /// waits for the hub's lock, a client, or work per watcher (only for copying the events).
    pub fn notify(&self, revision: i64, events: &[Event]) {
        let mut queue = self.queue.lock();
        if revision <= queue.notified_rev {
            return;
        }
        queue.notified_rev = revision;
        if events.is_empty() {
            return;
        }
        let bytes = queued_bytes(events);
        if queue.bytes + bytes > queue.max_bytes {
            queue.revisions.clear();
            queue.bytes = 0;
            queue.gap_through = revision;
            queue.overflows += 1;
        } else {
            queue.revisions.push_back(Pending {
                revision,
                events: events.to_vec(),
                bytes,
            });
            queue.bytes += bytes;
        }
        drop(queue);
        self.wake_dispatcher();
    }

    fn wake_dispatcher(&self) {
        match self.dispatcher.get_or_init(|| self.spawn_dispatcher()) {
            Some(thread) => thread.unpark(),
            None => self.dispatch_pending(false),
        }
    }

    fn spawn_dispatcher(&self) -> Option<Thread> {
        let weak = self.me.clone();
        let spawned = std::thread::Builder::new()
            .name("watch-dispatch".into())
            .spawn(move || loop {
                let Some(hub) = weak.upgrade() else { return };
                hub.dispatch_pending(true);
                drop(hub);
                // Woken by notify; the timeout only notices a dropped hub.
                std::thread::park_timeout(Duration::from_millis(100));
            });
        match spawned {
            Ok(handle) => Some(handle.thread().clone()),
            Err(e) => {
                tracing::error!(error = %e, "no watch dispatcher thread: dispatching on the apply path");
                None
            }
        }
    }

    #[cfg(test)]
    fn dispatch_paused(&self) -> bool {
        self.dispatch_paused.load(Ordering::SeqCst)
    }

    #[cfg(not(test))]
    fn dispatch_paused(&self) -> bool {
        false
    }

    /// Hands queued revisions to the synced watchers, oldest first, one revision per hold of
    /// the hub's lock (so a revision is never half dispatched when anyone else looks), until
    /// the queue is empty. On return, every revision notified before the call has been
    /// dispatched. Run by the dispatcher thread (`from_thread`), and by tests to wait for it.
    fn dispatch_pending(&self, from_thread: bool) {
        loop {
            let mut inner = self.inner.lock();
            let mut queue = self.queue.lock();
            // Checked under the queue's lock: nothing queued after a pause is dispatched.
            if from_thread && self.dispatch_paused() {
                return;
            }
            if queue.gap_through > inner.dispatched_rev {
                let gap_through = queue.gap_through;
                drop(queue);
                self.skip_gap(&mut inner, gap_through);
                continue;
            }
            let Some(Pending {
                revision,
                mut events,
                bytes,
            }) = queue.revisions.pop_front()
            else {
                return;
            };
            queue.bytes -= bytes;
            drop(queue);
            if !inner.synced.is_empty() {
                self.dispatch(&mut inner, revision, &mut events);
            }
            inner.dispatched_rev = revision;
        }
    }

    /// Revisions up to `gap_through` were dropped from the queue: the synced watchers that
    /// still needed some of them catch up from history.
    fn skip_gap(&self, inner: &mut HubInner, gap_through: i64) {
        let served = inner.dispatched_rev + 1;
        let lagging: Vec<WatcherKey> = inner
            .synced
            .watchers
            .iter()
            .filter(|(_, w)| w.next_rev.max(served) <= gap_through)
            .map(|(key, _)| *key)
            .collect();
        let woke = !lagging.is_empty();
        for key in lagging {
            inner.unsync(key);
        }
        inner.dispatched_rev = gap_through;
        if woke {
            self.wake_sync();
        }
    }

    /// Returns once every revision notified before the call has been handed to the synced
    /// watchers.
    #[cfg(test)]
    fn flush(&self) {
        self.dispatch_pending(false);
    }

    /// Hands the events of `revision` to the synced watchers they concern, found through the
    /// index: the cost is the matching watchers', not all watchers'. A watcher whose stream
    /// cannot take its response moves to the unsynced set.
    fn dispatch(&self, inner: &mut HubInner, revision: i64, events: &mut [Event]) {
        let mut visited = 0;
        let mut matched = inner.synced.matching(events, &mut visited);
        inner.index_visits += visited;
        inner.examined += matched.len() as u64;
        matched.retain(|key, _| {
            inner
                .synced
                .get(key)
                .is_some_and(|w| w.next_rev <= revision)
        });
        if matched.is_empty() {
            return;
        }
        self.fill_wanted_prev_kv(&inner.synced, &matched, events);
        let max_bytes = self.max_response_bytes.load(Ordering::Relaxed);
        let mut lagging = Vec::new();
        let mut gone = Vec::new();
        for (key, indices) in matched {
            let Some(w) = inner.synced.get_mut(&key) else {
                continue;
            };
            if w.tx.capacity() == 0 && !w.tx.is_closed() {
                lagging.push(key);
                continue;
            }
            let selected = w.select(indices.iter().map(|&i| &events[i]));
            if !selected.is_empty() {
                let mut resp = response(revision, key.1);
                resp.events = selected;
                match send(&w.tx, resp, w.fragment, max_bytes) {
                    Ok(()) => {}
                    Err(SendFailure::Full) => {
                        lagging.push(key);
                        continue;
                    }
                    Err(SendFailure::Closed) => {
                        gone.push(key);
                        continue;
                    }
                }
            }
            w.next_rev = revision + 1;
        }
        for key in gone {
            inner.remove(key);
        }
        let woke = !lagging.is_empty();
        for key in lagging {
            inner.unsync(key);
        }
        if woke {
            self.wake_sync();
        }
    }

    /// Reads the previous value of each event that a matched watcher of `set` will be sent
    /// with `prev_kv` and that lacks one (the apply path reads a put's previous value only when
    /// the request needed it; history never has them). As etcd's watch server does: only for
    /// the events such a watcher is sent.
    fn fill_wanted_prev_kv(
        &self,
        set: &WatcherSet,
        matched: &HashMap<WatcherKey, Vec<usize>>,
        events: &mut [Event],
    ) {
        let mut wanted = vec![false; events.len()];
        for (key, indices) in matched {
            let Some(w) = set.get(key) else { continue };
            if !w.prev_kv {
                continue;
            }
            for &i in indices {
                let is_put = events[i].r#type == EventType::Put as i32;
                wanted[i] |=
                    events[i].prev_kv.is_none() && !(is_put && w.no_put || !is_put && w.no_delete);
            }
        }
        if !wanted.contains(&true) {
            return;
        }
        let store = self.source.store();
        for (event, _) in events.iter_mut().zip(wanted).filter(|(_, w)| *w) {
            fill_prev_kv(&store, std::slice::from_mut(event));
        }
    }

    /// Opens a watch stream whose responses arrive on the returned receiver.
    pub fn open_stream(self: &Arc<Self>) -> (WatchStream, mpsc::Receiver<WatchResponse>) {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut inner = self.inner.lock();
        let id = inner.next_stream_id;
        inner.next_stream_id += 1;
        inner.streams.insert(
            id,
            StreamState {
                next_watch_id: 0,
                ids: HashSet::new(),
            },
        );
        (
            WatchStream {
                hub: self.clone(),
                id,
                tx,
            },
            rx,
        )
    }

    fn create(
        &self,
        stream_id: u64,
        req: WatchCreateRequest,
        permit: OwnedPermit<WatchResponse>,
        tx: mpsc::Sender<WatchResponse>,
    ) {
        let mut inner = self.inner.lock();
        let (now, live_from) = {
            let queue = self.queue.lock();
            (
                queue.notified_rev,
                inner.dispatched_rev.max(queue.gap_through),
            )
        };
        let Some(stream) = inner.streams.get_mut(&stream_id) else {
            return;
        };
        let range_end = match req.range_end.as_slice() {
            [] => None,
            [0] => Some(Vec::new()),
            end => Some(end.to_vec()),
        };
        let refuse = |reason: &str| {
            let mut resp = response(now, -1);
            resp.created = true;
            resp.canceled = true;
            resp.cancel_reason = reason.to_string();
            resp
        };
        if range_end
            .as_ref()
            .is_some_and(|end| !end.is_empty() && req.key.as_slice() >= end.as_slice())
        {
            permit.send(refuse(EMPTY_RANGE));
            return;
        }
        let watch_id = if req.watch_id == 0 {
            while stream.ids.contains(&stream.next_watch_id) {
                stream.next_watch_id += 1;
            }
            stream.next_watch_id += 1;
            stream.next_watch_id - 1
        } else if stream.ids.contains(&req.watch_id) {
            permit.send(refuse(DUPLICATE_ID));
            return;
        } else {
            req.watch_id
        };
        stream.ids.insert(watch_id);
        let next_rev = if req.start_revision > 0 {
            req.start_revision
        } else {
            now + 1
        };
        let watcher = Watcher {
            key: req.key,
            range_end,
            next_rev,
            prev_kv: req.prev_kv,
            no_put: req.filters.contains(&(FilterType::Noput as i32)),
            no_delete: req.filters.contains(&(FilterType::Nodelete as i32)),
            fragment: req.fragment,
            progress_notify: req.progress_notify,
            tx,
        };
        let mut created = response(now, watch_id);
        created.created = true;
        permit.send(created);
        let key = (stream_id, watch_id);
        // Revisions after `live_from` are queued for the synced watchers: one that needs
        // nothing older gets them there, even if it was created after they were applied.
        if next_rev > live_from {
            inner.synced.insert(key, watcher);
        } else {
            inner.unsynced.insert(key, watcher);
            drop(inner);
            self.wake_sync();
        }
    }

    fn cancel(&self, stream_id: u64, watch_id: i64, permit: OwnedPermit<WatchResponse>) {
        let mut inner = self.inner.lock();
        let now = self.queue.lock().notified_rev;
        if inner.remove((stream_id, watch_id)) {
            let mut resp = response(now, watch_id);
            resp.canceled = true;
            permit.send(resp);
        }
    }

    /// The revision up to which every watcher of the stream has been sent everything.
    fn stream_progress(inner: &HubInner, stream_id: u64, notified: i64) -> Option<i64> {
        let stream = inner.streams.get(&stream_id)?;
        let least = stream
            .ids
            .iter()
            .filter_map(|id| inner.progress(&(stream_id, *id), notified))
            .min();
        Some(least.unwrap_or(notified))
    }

    fn close_stream(&self, stream_id: u64) {
        let mut inner = self.inner.lock();
        if let Some(stream) = inner.streams.remove(&stream_id) {
            for id in stream.ids {
                inner.synced.remove((stream_id, id));
                inner.unsynced.remove((stream_id, id));
            }
        }
    }

    /// One catch-up round: reads the history the most lagging watcher needs (one read shared by
    /// every unsynced watcher, outside the lock), then hands each watcher its part, found
    /// through the unsynced set's index (a round costs O(watchers + events × log watchers +
    /// matches), not O(watchers × events)).
    fn sync_round(&self) -> Round {
        let (min_rev, notified) = {
            let inner = self.inner.lock();
            let Some(min_rev) = inner.unsynced.watchers.values().map(|w| w.next_rev).min() else {
                return Round::Idle;
            };
            (min_rev, self.queue.lock().notified_rev)
        };
        let store = self.source.store();
        // Never claim to have covered revisions this store does not have yet.
        let target = notified.min(store.current_revision());
        let start = min_rev.max(store.compact_revision()).max(1);
        let (mut events, covered) = if start > target {
            (Vec::new(), target)
        } else {
            match store.history(start, target, CATCH_UP_BATCH) {
                Ok(events) => {
                    let covered = if events.len() >= CATCH_UP_BATCH {
                        events
                            .last()
                            .and_then(|e| e.kv.as_ref())
                            .map_or(target, |kv| kv.mod_revision)
                    } else {
                        target
                    };
                    (events, covered)
                }
                // Compacted meanwhile: the next round cancels the watchers concerned.
                Err(MvccError::Compacted) => return Round::Progressed,
                Err(e) => {
                    tracing::warn!(error = %e, "reading history for watchers failed");
                    return Round::Stuck;
                }
            }
        };

        let max_bytes = self.max_response_bytes.load(Ordering::Relaxed);
        let mut inner = self.inner.lock();
        let mut visited = 0;
        let mut matched = inner.unsynced.matching(&events, &mut visited);
        // Only the events at or after each watcher's next_rev are its.
        matched.retain(|key, indices| {
            let Some(w) = inner.unsynced.get(key) else {
                return false;
            };
            indices.retain(|&i| {
                events[i]
                    .kv
                    .as_ref()
                    .is_some_and(|kv| kv.mod_revision >= w.next_rev)
            });
            !indices.is_empty() && (start..=covered).contains(&w.next_rev)
        });
        self.fill_wanted_prev_kv(&inner.unsynced, &matched, &mut events);
        let compact_rev = store.compact_revision();
        let live_from = inner.dispatched_rev.max(self.queue.lock().gap_through);
        let mut progressed = false;
        let keys: Vec<WatcherKey> = inner.unsynced.watchers.keys().copied().collect();
        for key in keys {
            let Some(w) = inner.unsynced.get_mut(&key) else {
                continue;
            };
            if w.next_rev < compact_rev {
                // etcd's compaction notice carries no revision in its header.
                let mut resp = response(0, key.1);
                resp.compact_revision = compact_rev;
                resp.canceled = true;
                match w.tx.try_send(resp) {
                    Ok(()) | Err(TrySendError::Closed(_)) => {
                        inner.remove(key);
                        progressed = true;
                    }
                    Err(TrySendError::Full(_)) => {}
                }
                continue;
            }
            // The read covers [start, covered]: a watcher that became unsynced during it with an
            // older next_rev needs more than that, and waits for the next round.
            if w.next_rev < start {
                progressed = true;
                continue;
            }
            if w.next_rev <= covered {
                if w.tx.capacity() == 0 && !w.tx.is_closed() {
                    // Its stream is full: nothing would fit.
                    continue;
                }
                if let Some(indices) = matched.get(&key) {
                    let selected = w.select(indices.iter().map(|&i| &events[i]));
                    if !selected.is_empty() {
                        let mut resp = response(covered, key.1);
                        resp.events = selected;
                        match send(&w.tx, resp, w.fragment, max_bytes) {
                            Ok(()) => {}
                            Err(SendFailure::Full) => continue,
                            Err(SendFailure::Closed) => {
                                inner.remove(key);
                                continue;
                            }
                        }
                    }
                }
                w.next_rev = covered + 1;
                progressed = true;
            }
            // Everything after `live_from` is queued for the synced watchers.
            if w.next_rev > live_from {
                if let Some(w) = inner.unsynced.remove(key) {
                    inner.synced.insert(key, w);
                }
                progressed = true;
            }
        }
        if inner.unsynced.is_empty() {
            Round::Idle
        } else if progressed {
            Round::Progressed
        } else {
            Round::Stuck
        }
    }
}

/// What a catch-up round achieved, which decides how soon the next one runs.
enum Round {
    /// No unsynced watcher is left.
    Idle,
    /// Some watcher moved on, or one needs an older read: run again at once.
    Progressed,
    /// None could (full streams, a failed read): wait a little.
    Stuck,
}

fn send(
    tx: &mpsc::Sender<WatchResponse>,
    resp: WatchResponse,
    fragment: bool,
    max_bytes: usize,
) -> Result<(), SendFailure> {
    let failure = |e: TrySendError<()>| match e {
        TrySendError::Full(_) => SendFailure::Full,
        TrySendError::Closed(_) => SendFailure::Closed,
    };
    if !fragment || resp.events.len() <= 1 || resp.encoded_len() <= max_bytes {
        return tx.try_send(resp).map_err(|e| match e {
            TrySendError::Full(_) => SendFailure::Full,
            TrySendError::Closed(_) => SendFailure::Closed,
        });
    }
    // Never more fragments than the stream can ever hold at once (they are queued together):
    // a huge revision gets fragments above the limit rather than never being sent.
    let max_bytes = max_bytes.max(resp.encoded_len().div_ceil((STREAM_BUFFER / 2).max(1)));
    let parts = fragments(resp, max_bytes);
    let permits = tx.try_reserve_many(parts.len()).map_err(failure)?;
    for (permit, part) in permits.zip(parts) {
        permit.send(part);
    }
    Ok(())
}

/// etcd's watch server reads an event's previous value at `mod_revision - 1`; a compacted one is
/// left out. Events that already carry one keep it.
fn fill_prev_kv(store: &Store, events: &mut [Event]) {
    for event in events {
        if event.prev_kv.is_some() {
            continue;
        }
        let Some(kv) = &event.kv else { continue };
        let req = RangeRequest {
            key: kv.key.clone(),
            revision: kv.mod_revision - 1,
            ..Default::default()
        };
        if let Ok(resp) = store.range(&req) {
            event.prev_kv = resp.kvs.into_iter().next();
        }
    }
}

/// One client watch stream: creates, cancels and progress requests. Dropping it removes its
/// watchers.
pub struct WatchStream {
    hub: Arc<WatchHub>,
    id: u64,
    tx: mpsc::Sender<WatchResponse>,
}

impl WatchStream {
    /// Creates a watcher and queues its `created` response ahead of any of its events.
    pub async fn create(&self, req: WatchCreateRequest) -> Result<(), WatchError> {
        let permit = self
            .tx
            .clone()
            .reserve_owned()
            .await
            .map_err(|_| WatchError::Closed)?;
        self.hub.create(self.id, req, permit, self.tx.clone());
        Ok(())
    }

    /// Queues a response made outside the hub (a create refused before it reached the hub).
    pub async fn send(&self, resp: WatchResponse) -> Result<(), WatchError> {
        self.tx.send(resp).await.map_err(|_| WatchError::Closed)
    }

    /// Cancels a watcher of this stream; an unknown id is ignored, as etcd does.
    pub async fn cancel(&self, watch_id: i64) -> Result<(), WatchError> {
        let permit = self
            .tx
            .clone()
            .reserve_owned()
            .await
            .map_err(|_| WatchError::Closed)?;
        self.hub.cancel(self.id, watch_id, permit);
        Ok(())
    }

    /// Answers a WatchProgressRequest: a response for every watcher of the stream
    /// (`watch_id` -1) at the revision up to which all of them have been sent everything.
    pub async fn request_progress(&self) -> Result<(), WatchError> {
        let permit = self
            .tx
            .clone()
            .reserve_owned()
            .await
            .map_err(|_| WatchError::Closed)?;
        // Under the hub's lock, which dispatch holds for a whole revision: the response is
        // queued after every event it speaks for.
        let inner = self.hub.inner.lock();
        let notified = self.hub.queue.lock().notified_rev;
        if let Some(rev) = WatchHub::stream_progress(&inner, self.id, notified) {
            permit.send(response(rev, PROGRESS_ALL_WATCHERS));
        }
        Ok(())
    }

    /// The periodic progress notification: an empty response to every synced watcher created
    /// with `progress_notify`, at the revision up to which it has been sent everything (so not
    /// past revisions still queued for dispatch). Skipped for watchers whose stream is full.
    pub fn progress_notify(&self) {
        let inner = self.hub.inner.lock();
        let notified = self.hub.queue.lock().notified_rev;
        let Some(stream) = inner.streams.get(&self.id) else {
            return;
        };
        for id in &stream.ids {
            let key = (self.id, *id);
            if let Some(w) = inner.synced.get(&key) {
                if w.progress_notify {
                    let rev = inner.progress(&key, notified).unwrap_or(notified);
                    let _ = w.tx.try_send(response(rev, *id));
                }
            }
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.hub.close_stream(self.id);
    }
}

#[cfg(test)]
mod tests;
