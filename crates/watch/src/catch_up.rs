//! The catch-up thread.
//!
//! Owns: the `watch-sync` thread ([`WatchHub::start_sync_thread`]) and its rounds
//! ([`WatchHub::sync_round`]): one history read per round, shared by every unsynced watcher,
//! each handed its part through the unsynced set's index; the cancellation of watchers whose
//! start revision was compacted; and the move back to the synced set once a watcher is past
//! everything the dispatch queue does not hold.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use metastore_mvcc::MvccError;
use metastore_proto::watch_frame::WatchFrame;
use tokio::sync::mpsc::error::TrySendError;

use crate::response::{response, send, Encodings, SendFailure};
use crate::watcher::{Watcher, WatcherKey};
use crate::{WatchHub, CATCH_UP_BATCH};

impl WatchHub {
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

    pub(crate) fn wake_sync(&self) {
        if let Some(t) = self.sync_thread.get() {
            t.unpark();
        }
    }

    /// One catch-up round: reads the history the most lagging watcher needs (one read shared by
    /// every unsynced watcher, outside the lock), then hands each watcher its part, found
    /// through the unsynced set's index (a round costs O(watchers + events × log watchers +
    /// matches), not O(watchers × events)).
    fn sync_round(&self) -> Round {
        let (min_rev, notified) = {
            let inner = self.inner.lock();
            if inner.unsynced.is_empty() {
                return Round::Idle;
            }
            // Only watchers whose stream can take a response are served this round: a client
            // that stopped reading costs a look at its watchers, not a history read and the
            // matching of every event against them.
            let Some(min_rev) = inner
                .unsynced
                .watchers
                .values()
                .filter(|w| has_room(w))
                .map(|w| w.next_rev)
                .min()
            else {
                return Round::Stuck;
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
            indices.retain(|&mut i| {
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
        let mut encodings = Encodings::new(events.len());
        let mut progressed = false;
        let keys: Vec<WatcherKey> = inner.unsynced.watchers.keys().copied().collect();
        for key in keys {
            let Some(w) = inner.unsynced.get_mut(&key) else {
                continue;
            };
            if !has_room(w) {
                // Its stream is full: nothing would fit (and the read may not cover it).
                continue;
            }
            if w.next_rev < compact_rev {
                // etcd's compaction notice carries no revision in its header.
                let mut resp = response(0, key.1);
                resp.compact_revision = compact_rev;
                resp.canceled = true;
                match w.tx.try_send(resp.into()) {
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
                if let Some(indices) = matched.get(&key) {
                    let selected = w.select(indices, &events, &mut encodings);
                    if !selected.is_empty() {
                        let frame = WatchFrame {
                            head: response(covered, key.1),
                            events: selected,
                        };
                        match send(&w.tx, frame, w.fragment, max_bytes) {
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

/// Whether `w`'s stream can take a response now (a closed one is removed when tried).
fn has_room(w: &Watcher) -> bool {
    w.tx.capacity() > 0 || w.tx.is_closed()
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
