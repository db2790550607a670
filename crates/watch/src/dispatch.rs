//! The dispatch queue and the dispatcher thread.
//!
//! Owns: [`Queue`], the revisions applied but not yet handed to the watchers, behind its own
//! lock; [`WatchHub::notify`], which only appends to it and wakes the dispatcher; the
//! `watch-dispatch` thread, which hands each queued revision to the synced watchers it concerns
//! (one revision per hold of the hub's lock); and the overflow gap, whose lagging watchers move
//! to the unsynced set.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::thread::Thread;
use std::time::Duration;

use metastore_proto::mvccpb::Event;
use metastore_proto::watch_frame::WatchFrame;
use prost::Message;

use crate::response::{response, send, Encodings, SendFailure};
use crate::watcher::WatcherKey;
use crate::{HubInner, WatchHub};

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
pub(crate) struct Queue {
    /// The newest revision handed to [`WatchHub::notify`].
    pub(crate) notified_rev: i64,
    pub(crate) revisions: VecDeque<Pending>,
    pub(crate) bytes: usize,
    pub(crate) max_bytes: usize,
    /// Revisions up to this one were dropped from the queue (an overflow): whoever still needs
    /// them reads history. Every revision after `max(dispatched_rev, gap_through)` that had
    /// events is in `revisions`.
    pub(crate) gap_through: i64,
    pub(crate) overflows: u64,
}

pub(crate) struct Pending {
    revision: i64,
    events: Vec<Event>,
    bytes: usize,
}

/// What queueing `events` costs, roughly: their encoding plus bookkeeping.
pub(crate) fn queued_bytes(events: &[Event]) -> usize {
    64 + events.iter().map(|e| e.encoded_len() + 64).sum::<usize>()
}

impl WatchHub {
    /// Called by the apply path after `events` were applied at `revision`. Only queues them
    /// and wakes the dispatcher thread, which hands them to the watchers: the apply path never
    /// waits for the hub's lock, a client, or work per watcher (only for copying the events).
    pub fn notify(&self, revision: i64, events: &[Event]) {
        self.queue(revision, events);
        self.wake();
    }

    /// [`WatchHub::notify`] without the wake-up, for an apply path that applies revisions in
    /// batches and calls [`WatchHub::wake`] once after each batch: one wake-up per revision
    /// cost a context switch per write even with no watcher at all. (The dispatcher also looks
    /// every 100 ms on its own, so a missed wake-up delays events, never loses them.)
    pub fn queue(&self, revision: i64, events: &[Event]) {
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
        self.unwoken.store(true, Ordering::Release);
        // Started here, not at the first wake-up, so that its periodic look covers a caller
        // that never wakes it.
        self.dispatcher.get_or_init(|| self.spawn_dispatcher());
    }

    /// Wakes the dispatcher for what [`WatchHub::queue`] left since it was last woken.
    pub fn wake(&self) {
        if self.unwoken.swap(false, Ordering::AcqRel) {
            self.wake_dispatcher();
        }
    }

    pub(crate) fn wake_dispatcher(&self) {
        #[cfg(test)]
        self.wakeups.fetch_add(1, Ordering::SeqCst);
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
    pub(crate) fn flush(&self) {
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
        let mut encodings = Encodings::new(events.len());
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
            let selected = w.select(&indices, events, &mut encodings);
            if !selected.is_empty() {
                let frame = WatchFrame {
                    head: response(revision, key.1),
                    events: selected,
                };
                match send(&w.tx, frame, w.fragment, max_bytes) {
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
}
