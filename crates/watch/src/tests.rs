//! Hub tests over a store on the in-memory engine.
//!
//! Owns what the tests share: a hub over a fixed store with its catch-up thread ([`setup`]),
//! writes that notify it, and helpers to create watchers and read their responses. The tests
//! are in the submodules, one topic each.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metastore_mvcc::{Store, WriteRequest};
use metastore_proto::etcdserverpb::{
    request_op, watch_create_request::FilterType, CompactionRequest, PutRequest, RequestOp,
    TxnRequest, WatchCreateRequest, WatchResponse,
};
use metastore_proto::mvccpb::Event;
use metastore_proto::watch_frame::WatchFrame;
use metastore_storage::WriteBatch;
use metastore_storage_mem::MemBackend;
use tokio::sync::mpsc::Receiver;

use super::*;
use crate::dispatch::queued_bytes;
use crate::response::{fragments, response};

mod events;
mod matching;
mod measure;
mod queue;

struct Fixed(Arc<Store>);

impl StoreSource for Fixed {
    fn store(&self) -> Arc<Store> {
        self.0.clone()
    }
}

fn setup() -> (Arc<Store>, Arc<WatchHub>) {
    let backend = Arc::new(MemBackend::new(metastore_mvcc::BUCKETS));
    let store = Arc::new(Store::open(backend).unwrap());
    let hub = WatchHub::new(Arc::new(Fixed(store.clone())));
    hub.start_sync_thread().unwrap();
    (store, hub)
}

fn write(store: &Store, hub: &WatchHub, req: WriteRequest) {
    let applied = store
        .apply_write(req, &|_| false, 0, WriteBatch::new())
        .unwrap();
    hub.notify(applied.revision, &applied.events);
}

fn put(store: &Store, hub: &WatchHub, key: &str, value: &str) {
    write(
        store,
        hub,
        WriteRequest::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
    );
}

async fn next(rx: &mut Receiver<WatchFrame>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a response within 5s")
        .expect("stream open")
        .into_response()
        .expect("a frame decodes")
}

fn revisions(resp: &WatchResponse) -> Vec<i64> {
    resp.events
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect()
}

/// Creates a watcher and returns its id (from the `created` response).
async fn watch(
    stream: &WatchStream,
    rx: &mut Receiver<WatchFrame>,
    req: WatchCreateRequest,
) -> i64 {
    stream.create(req).await.unwrap();
    let created = next(rx).await;
    assert!(created.created && !created.canceled, "{created:?}");
    created.watch_id
}

fn single(key: &str) -> WatchCreateRequest {
    range(key, b"")
}

fn range(key: &str, end: &[u8]) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.into(),
        range_end: end.to_vec(),
        ..Default::default()
    }
}

/// `req`, also sending previous values.
fn with_prev_kv(mut req: WatchCreateRequest) -> WatchCreateRequest {
    req.prev_kv = true;
    req
}

/// `req`, replaying history from `start_revision`.
fn from_revision(start_revision: i64, mut req: WatchCreateRequest) -> WatchCreateRequest {
    req.start_revision = start_revision;
    req
}

/// Holds the dispatcher thread back: notified revisions stay queued.
fn pause_dispatch(hub: &WatchHub) {
    hub.dispatch_paused
        .store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Lets the dispatcher thread deliver again, and wakes it.
fn resume_dispatch(hub: &WatchHub) {
    hub.dispatch_paused
        .store(false, std::sync::atomic::Ordering::SeqCst);
    hub.wake_dispatcher();
}

/// Both watcher sets agree with their indexes.
fn assert_indexed(hub: &WatchHub) {
    let inner = hub.inner.lock();
    for set in [&inner.synced, &inner.unsynced] {
        assert_eq!(set.index.len(), set.watchers.len());
        for (key, w) in &set.watchers {
            let mut found = false;
            set.index.stab(&w.key, |k| found |= k == *key);
            assert!(found, "watcher {key:?} is indexed under its key");
        }
    }
}

/// Drains `rx` until `count` events arrived; returns (watch_id, revision, value) per event.
async fn collect(rx: &mut Receiver<WatchFrame>, count: usize) -> Vec<(i64, i64, Vec<u8>)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let resp = next(rx).await;
        assert!(!resp.canceled, "unexpected cancel {resp:?}");
        for e in &resp.events {
            let kv = e.kv.as_ref().unwrap();
            seen.push((resp.watch_id, kv.mod_revision, kv.value.clone()));
        }
    }
    seen
}

fn revisions_of(seen: &[(i64, i64, Vec<u8>)], watch_id: i64) -> Vec<i64> {
    seen.iter()
        .filter(|(id, _, _)| *id == watch_id)
        .map(|(_, rev, _)| *rev)
        .collect()
}
