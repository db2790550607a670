//! Building and sending watch responses.
//!
//! Owns: the response skeleton ([`response`]), fragmentation of large responses as etcd's
//! `sendFragments` does ([`fragments`]), sending to a stream's channel without waiting
//! ([`send`], [`SendFailure`]), and reading the previous values (`prev_kv`) of the events a
//! watcher that asked for them is sent ([`WatchHub::fill_wanted_prev_kv`]).

use std::collections::HashMap;

use metastore_mvcc::Store;
use metastore_proto::etcdserverpb::{RangeRequest, ResponseHeader, WatchResponse};
use metastore_proto::mvccpb::{event::EventType, Event};
use prost::Message;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::watcher::{WatcherKey, WatcherSet};
use crate::{WatchHub, STREAM_BUFFER};

pub(crate) enum SendFailure {
    Full,
    Closed,
}

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

/// Splits a response into fragments of at most `max_bytes` (at least one event each); all but
/// the last are marked `fragment`, as etcd's `sendFragments` does.
pub(crate) fn fragments(resp: WatchResponse, max_bytes: usize) -> Vec<WatchResponse> {
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

pub(crate) fn send(
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

impl WatchHub {
    /// Reads the previous value of each event that a matched watcher of `set` will be sent
    /// with `prev_kv` and that lacks one (the apply path reads a put's previous value only when
    /// the request needed it; history never has them). As etcd's watch server does: only for
    /// the events such a watcher is sent.
    pub(crate) fn fill_wanted_prev_kv(
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
}
