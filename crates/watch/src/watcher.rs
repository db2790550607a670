//! A watcher and the sets that hold them.
//!
//! Owns: [`Watcher`] (what it watches, its filters, its `next_rev` and its stream's sender) and
//! its view of a revision's events; [`StreamState`], the watch ids of one stream; and
//! [`WatcherSet`], watchers together with the [`KeyIndex`] of what they watch, through which
//! every insert and removal goes.

use std::mem;

use foldhash::{HashMap, HashMapExt, HashSet};
use metastore_proto::mvccpb::{event::EventType, Event};
use metastore_proto::watch_frame::{EncodedEvent, WatchFrame};
use smallvec::SmallVec;
use tokio::sync::mpsc;

use crate::index::KeyIndex;
use crate::response::Encodings;

pub(crate) type WatcherKey = (u64, i64);

/// The indices of a revision's events that concern one watcher (most often one).
pub(crate) type EventIndices = SmallVec<[usize; 2]>;

/// The watchers an event batch concerns, each with its events ([`WatcherSet::matching`]).
pub(crate) type Matched = HashMap<WatcherKey, EventIndices>;

pub(crate) struct Watcher {
    pub(crate) key: Vec<u8>,
    /// `None`: the single key; `Some(empty)`: every key from `key` on.
    pub(crate) range_end: Option<Vec<u8>>,
    /// The first revision this watcher has not been sent.
    pub(crate) next_rev: i64,
    pub(crate) prev_kv: bool,
    pub(crate) no_put: bool,
    pub(crate) no_delete: bool,
    pub(crate) fragment: bool,
    pub(crate) progress_notify: bool,
    pub(crate) tx: mpsc::Sender<WatchFrame>,
}

impl Watcher {
    fn matches(&self, key: &[u8]) -> bool {
        match &self.range_end {
            None => key == self.key.as_slice(),
            Some(end) => key >= self.key.as_slice() && (end.is_empty() || key < end.as_slice()),
        }
    }

    /// This watcher's view of `events[i]` for each `i` of `indices`: its range, its filters,
    /// `prev_kv` only if asked for; each event encoded once for all watchers (`encodings`).
    pub(crate) fn select(
        &self,
        indices: &[usize],
        events: &[Event],
        encodings: &mut Encodings,
    ) -> Vec<EncodedEvent> {
        indices
            .iter()
            .filter(|&&i| {
                let e = &events[i];
                let is_put = e.r#type == EventType::Put as i32;
                !(is_put && self.no_put || !is_put && self.no_delete)
                    && e.kv.as_ref().is_some_and(|kv| self.matches(&kv.key))
            })
            .map(|&i| encodings.get(events, i, self.prev_kv))
            .collect()
    }
}

pub(crate) struct StreamState {
    pub(crate) next_watch_id: i64,
    pub(crate) ids: HashSet<i64>,
}

/// Watchers together with a [`KeyIndex`] of what they watch. Every insert and removal goes
/// through it, so the index never disagrees with the map.
pub(crate) struct WatcherSet {
    pub(crate) watchers: HashMap<WatcherKey, Watcher>,
    pub(crate) index: KeyIndex<WatcherKey>,
}

impl WatcherSet {
    pub(crate) fn new() -> Self {
        WatcherSet {
            watchers: HashMap::new(),
            index: KeyIndex::new(),
        }
    }

    pub(crate) fn insert(&mut self, key: WatcherKey, w: Watcher) {
        if let Some(old) = self.watchers.remove(&key) {
            self.index.remove(key, &old.key, old.range_end.as_deref());
        }
        self.index.insert(key, &w.key, w.range_end.as_deref());
        self.watchers.insert(key, w);
    }

    pub(crate) fn remove(&mut self, key: WatcherKey) -> Option<Watcher> {
        let w = self.watchers.remove(&key)?;
        self.index.remove(key, &w.key, w.range_end.as_deref());
        Some(w)
    }

    pub(crate) fn take_all(&mut self) -> HashMap<WatcherKey, Watcher> {
        self.index.clear();
        mem::take(&mut self.watchers)
    }

    pub(crate) fn get(&self, key: &WatcherKey) -> Option<&Watcher> {
        self.watchers.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &WatcherKey) -> Option<&mut Watcher> {
        self.watchers.get_mut(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.watchers.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.watchers.is_empty()
    }

    /// For each event, the watchers of this set whose key or range contains its key: a map from
    /// watcher to the indices of its events, in order. Adds the index entries looked at to
    /// `visited`.
    pub(crate) fn matching(&self, events: &[Event], visited: &mut u64) -> Matched {
        let mut matched = Matched::new();
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
