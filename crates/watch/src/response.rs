//! Building and sending watch responses.
//!
//! Owns: the response skeleton ([`response`]), the shared encodings of events ([`Encodings`]),
//! fragmentation of large responses as etcd's `sendFragments` does ([`fragments`]), sending to
//! a stream's channel without waiting ([`send`], [`SendFailure`]), and reading the previous
//! values (`prev_kv`) of the events a watcher that asked for them is sent
//! ([`WatchHub::fill_wanted_prev_kv`]).

use metastore_mvcc::Store;
use metastore_proto::etcdserverpb::{RangeRequest, ResponseHeader, WatchResponse};
use metastore_proto::mvccpb::{event::EventType, Event};
use metastore_proto::watch_frame::{EncodedEvent, WatchFrame};
use prost::Message;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::watcher::{Matched, WatcherSet};
use crate::{WatchHub, STREAM_BUFFER};

pub(crate) enum SendFailure {
    Full,
    Closed,
}

/// A response's head (no events yet).
pub(crate) fn response(revision: i64, watch_id: i64) -> WatchResponse {
    WatchResponse {
        header: Some(ResponseHeader {
            revision,
            ..Default::default()
        }),
        watch_id,
        ..Default::default()
    }
}

/// The encodings of one revision's (or one catch-up read's) events, each made once, the first
/// time a watcher is sent it, and shared by every watcher sent it: with its previous value
/// (for watchers that asked for `prev_kv`) or without.
pub(crate) struct Encodings {
    plain: Vec<Option<EncodedEvent>>,
    with_prev: Vec<Option<EncodedEvent>>,
}

impl Encodings {
    pub(crate) fn new(events: usize) -> Self {
        Encodings {
            plain: vec![None; events],
            with_prev: vec![None; events],
        }
    }

    /// `events[i]` encoded, its previous value kept only if `prev_kv`.
    pub(crate) fn get(&mut self, events: &[Event], i: usize, prev_kv: bool) -> EncodedEvent {
        let event = &events[i];
        if prev_kv && event.prev_kv.is_some() {
            return self.with_prev[i]
                .get_or_insert_with(|| EncodedEvent::new(event))
                .clone();
        }
        self.plain[i]
            .get_or_insert_with(|| match &event.prev_kv {
                None => EncodedEvent::new(event),
                Some(_) => EncodedEvent::new(&Event {
                    r#type: event.r#type,
                    kv: event.kv.clone(),
                    prev_kv: None,
                }),
            })
            .clone()
    }
}

/// Splits a frame into fragments of at most `max_bytes` of events (at least one event each);
/// all but the last are marked `fragment`, as etcd's `sendFragments` does.
pub(crate) fn fragments(frame: WatchFrame, max_bytes: usize) -> Vec<WatchFrame> {
    let mut parts: Vec<Vec<EncodedEvent>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for event in frame.events {
        let len = event.len();
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
        .map(|(i, events)| WatchFrame {
            head: WatchResponse {
                fragment: i < last,
                ..frame.head.clone()
            },
            events,
        })
        .collect()
}

pub(crate) fn send(
    tx: &mpsc::Sender<WatchFrame>,
    frame: WatchFrame,
    fragment: bool,
    max_bytes: usize,
) -> Result<(), SendFailure> {
    let failure = |e: TrySendError<()>| match e {
        TrySendError::Full(_) => SendFailure::Full,
        TrySendError::Closed(_) => SendFailure::Closed,
    };
    if !fragment || frame.events.len() <= 1 || frame.encoded_len() <= max_bytes {
        return tx.try_send(frame).map_err(|e| match e {
            TrySendError::Full(_) => SendFailure::Full,
            TrySendError::Closed(_) => SendFailure::Closed,
        });
    }
    // Never more fragments than the stream can ever hold at once (they are queued together):
    // a huge revision gets fragments above the limit rather than never being sent.
    let max_bytes = max_bytes.max(frame.encoded_len().div_ceil((STREAM_BUFFER / 2).max(1)));
    let parts = fragments(frame, max_bytes);
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

impl WatchHub {
    /// Reads the previous value of each event that a matched watcher of `set` will be sent
    /// with `prev_kv` and that lacks one (the apply path reads a put's previous value only when
    /// the request needed it; history never has them). As etcd's watch server does: only for
    /// the events such a watcher is sent.
    pub(crate) fn fill_wanted_prev_kv(
        &self,
        set: &WatcherSet,
        matched: &Matched,
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
}
