//! etcd's watchers.
//!
//! Owns: the [`WatchHub`] — every watcher of every watch stream, split into *synced* watchers
//! (up to date: they get each applied revision's events straight from the apply path through
//! [`WatchHub::notify`]) and *unsynced* ones (starting in the past, or too slow to keep up), which a
//! background thread catches up from mvcc's history without holding up the apply path. Both
//! sets are indexed by what their watchers watch (a key map plus an interval tree, as etcd's
//! `watcherGroup`; see `index`), so an event is matched against the watchers it concerns only:
//! O(log n + matches), not O(watchers). Also owned: the
//! cancellation of watchers whose start revision was compacted; progress notifications; and
//! fragmentation of large responses.
//!
//! Each stream has one bounded channel of responses ([`WatchHub::open_stream`]). The apply path
//! never waits on it: a watcher whose events do not fit is moved to the unsynced set and later
//! caught up from history, so a slow client costs at most its channel's worth of memory. A
//! watcher's `next_rev` (the first revision it has not been sent) is the single source of truth,
//! checked under the hub's lock on both paths, so no event is lost or sent twice and every
//! revision's events (one Txn) travel in one response.
//!
//! Must not depend on: raft, gRPC services. It reads the store through [`StoreSource`]; response
//! headers carry only the revision (the gRPC layer fills in cluster, member and term).

#![warn(missing_docs)]

use std::collections::{HashMap, HashSet};
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
    /// Since the hub was made: watchers whose key or range matched a live event, each counted
    /// once per revision. Watchers on other keys are not looked at, so with no matches this
    /// stays put however many watchers there are.
    pub examined: u64,
    /// Since the hub was made: index entries (single-key buckets and interval-tree nodes)
    /// looked at to find those matches, O(log n) per event.
    pub index_visits: u64,
}

struct HubInner {
    /// The newest revision whose events were handed to [`WatchHub::notify`].
    notified_rev: i64,
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

    /// The revision up to which a watcher has been sent everything.
    fn progress(&self, key: &WatcherKey) -> Option<i64> {
        let sent = match (self.synced.get(key), self.unsynced.get(key)) {
            (Some(w), _) => (w.next_rev - 1).max(self.dispatched_rev),
            (None, Some(w)) => w.next_rev - 1,
            (None, None) => return None,
        };
        Some(sent.min(self.notified_rev))
    }
}

enum SendFailure {
    Full,
    Closed,
}

/// Every watcher of this member. Shared by the apply path, the Watch service and the catch-up
/// thread.
pub struct WatchHub {
    source: Arc<dyn StoreSource>,
    inner: Mutex<HubInner>,
    max_response_bytes: AtomicUsize,
    sync_thread: OnceLock<Thread>,
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
        Arc::new(WatchHub {
            source,
            inner: Mutex::new(HubInner {
                notified_rev,
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
        WatchStats {
            synced: inner.synced.len(),
            unsynced: inner.unsynced.len(),
            examined: inner.examined,
            index_visits: inner.index_visits,
        }
    }

    /// The state jumped to `revision` (a snapshot was restored): every watcher catches up from
    /// history.
    pub fn reset(&self, revision: i64) {
        let mut inner = self.inner.lock();
        let dispatched = inner.dispatched_rev;
        for (key, mut w) in inner.synced.take_all() {
            w.next_rev = w.next_rev.max(dispatched + 1);
            inner.unsynced.insert(key, w);
        }
        inner.notified_rev = revision;
        inner.dispatched_rev = revision;
        drop(inner);
        self.wake_sync();
    }

    /// Called by the apply path after `events` were applied at `revision`. Never blocks on a
    /// client: a watcher whose stream is full moves to the unsynced set.
    pub fn notify(&self, revision: i64, events: &[Event]) {
        let mut inner = self.inner.lock();
        if revision <= inner.notified_rev {
            return;
        }
        inner.notified_rev = revision;
        if !events.is_empty() && !inner.synced.is_empty() {
            let mut events = events.to_vec();
            self.dispatch(&mut inner, revision, &mut events);
        }
        inner.dispatched_rev = revision;
    }

    /// Returns once every revision notified before the call has been handed to the synced
    /// watchers (so far [`WatchHub::notify`] does that itself).
    #[cfg(test)]
    fn flush(&self) {}

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
        let now = inner.notified_rev;
        let live_from = inner.dispatched_rev;
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
        // Revisions after `live_from` are still to be handed to the synced watchers: one that
        // needs nothing older gets them there.
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
        let now = inner.notified_rev;
        if inner.remove((stream_id, watch_id)) {
            let mut resp = response(now, watch_id);
            resp.canceled = true;
            permit.send(resp);
        }
    }

    /// The revision up to which every watcher of the stream has been sent everything.
    fn stream_progress(inner: &HubInner, stream_id: u64) -> Option<i64> {
        let stream = inner.streams.get(&stream_id)?;
        let least = stream
            .ids
            .iter()
            .filter_map(|id| inner.progress(&(stream_id, *id)))
            .min();
        Some(least.unwrap_or(inner.notified_rev))
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
            (min_rev, inner.notified_rev)
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
        let live_from = inner.dispatched_rev;
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
            // Everything after `live_from` is still to be handed to the synced watchers.
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
        let inner = self.hub.inner.lock();
        if let Some(rev) = WatchHub::stream_progress(&inner, self.id) {
            permit.send(response(rev, PROGRESS_ALL_WATCHERS));
        }
        Ok(())
    }

    /// The periodic progress notification: an empty response to every synced watcher created
    /// with `progress_notify`. Skipped for watchers whose stream is full.
    pub fn progress_notify(&self) {
        let inner = self.hub.inner.lock();
        let Some(stream) = inner.streams.get(&self.id) else {
            return;
        };
        for id in &stream.ids {
            let key = (self.id, *id);
            if let Some(w) = inner.synced.get(&key) {
                if w.progress_notify {
                    let rev = inner.progress(&key).unwrap_or(inner.notified_rev);
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
