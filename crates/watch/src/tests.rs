use std::collections::HashMap;
use std::sync::Arc;

use metastore_mvcc::{Store, WriteRequest};
use metastore_proto::etcdserverpb::{
    request_op, CompactionRequest, PutRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchResponse,
};
use metastore_storage::WriteBatch;
use metastore_storage_mem::MemBackend;
use tokio::sync::mpsc::Receiver;

use super::*;

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

async fn next(rx: &mut Receiver<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a response within 5s")
        .expect("stream open")
}

fn revisions(resp: &WatchResponse) -> Vec<i64> {
    resp.events
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect()
}

#[tokio::test]
async fn live_events_txn_in_one_response_filters_and_prev_kv() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    stream
        .create(WatchCreateRequest {
            key: b"a".to_vec(),
            range_end: b"b".to_vec(),
            prev_kv: true,
            ..Default::default()
        })
        .await
        .unwrap();
    stream
        .create(WatchCreateRequest {
            key: b"a1".to_vec(),
            watch_id: 7,
            filters: vec![FilterType::Noput as i32],
            ..Default::default()
        })
        .await
        .unwrap();
    let created = next(&mut rx).await;
    assert!(created.created && created.watch_id == 0);
    let created = next(&mut rx).await;
    assert!(created.created && created.watch_id == 7);
    stream
        .create(WatchCreateRequest {
            key: b"x".to_vec(),
            watch_id: 7,
            ..Default::default()
        })
        .await
        .unwrap();
    let dup = next(&mut rx).await;
    assert!(dup.canceled && dup.watch_id == -1);
    assert_eq!(dup.cancel_reason, DUPLICATE_ID);

    put(&store, &hub, "a1", "v1");
    let op = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.into(),
            value: b"v2".to_vec(),
            ..Default::default()
        })),
    };
    write(
        &store,
        &hub,
        WriteRequest::Txn(TxnRequest {
            success: vec![op("a1"), op("a2"), op("zz")],
            ..Default::default()
        }),
    );
    let first = next(&mut rx).await;
    assert_eq!((first.watch_id, revisions(&first)), (0, vec![2]));
    let txn = next(&mut rx).await;
    assert_eq!((txn.watch_id, revisions(&txn)), (0, vec![3, 3]));
    assert_eq!(txn.events[0].prev_kv.as_ref().unwrap().value, b"v1");
    assert!(rx.try_recv().is_err(), "watcher 7 filters puts out");

    stream.cancel(0).await.unwrap();
    let canceled = next(&mut rx).await;
    assert!(canceled.canceled && canceled.watch_id == 0);
    put(&store, &hub, "a1", "v3");
    // Progress speaks only for dispatched revisions (see progress_never_claims_a_queued_revision).
    hub.flush();
    stream.request_progress().await.unwrap();
    let progress = next(&mut rx).await;
    assert_eq!(progress.watch_id, PROGRESS_ALL_WATCHERS);
    assert_eq!(progress.header.unwrap().revision, 4);
}

#[tokio::test]
async fn history_replay_and_compaction_cancel() {
    let (store, hub) = setup();
    for i in 0..5 {
        put(&store, &hub, "k", &format!("v{i}"));
    }
    let (stream, mut rx) = hub.open_stream();
    stream
        .create(WatchCreateRequest {
            key: b"k".to_vec(),
            start_revision: 3,
            prev_kv: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(next(&mut rx).await.created);
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let resp = next(&mut rx).await;
        if seen.is_empty() {
            assert_eq!(resp.events[0].prev_kv.as_ref().unwrap().value, b"v0");
        }
        seen.extend(revisions(&resp));
    }
    assert_eq!(seen, vec![3, 4, 5, 6]);
    put(&store, &hub, "k", "live");
    assert_eq!(revisions(&next(&mut rx).await), vec![7]);

    write(
        &store,
        &hub,
        WriteRequest::Compact(CompactionRequest {
            revision: 5,
            physical: false,
        }),
    );
    stream
        .create(WatchCreateRequest {
            key: b"k".to_vec(),
            start_revision: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let created = next(&mut rx).await;
    assert!(created.created && !created.canceled);
    let canceled = next(&mut rx).await;
    assert!(canceled.canceled);
    assert_eq!(
        (canceled.watch_id, canceled.compact_revision),
        (created.watch_id, 5)
    );
}

#[tokio::test]
async fn slow_stream_falls_back_to_history_without_loss_or_duplicates() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    stream
        .create(WatchCreateRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(next(&mut rx).await.created);
    let writes = STREAM_BUFFER as i64 * 3;
    for i in 0..writes {
        put(&store, &hub, "k", &i.to_string());
    }
    hub.flush();
    assert!(
        hub.watcher_counts().1 == 1 || rx.len() == STREAM_BUFFER,
        "the watcher fell behind"
    );
    let mut seen = Vec::new();
    while seen.len() < writes as usize {
        seen.extend(revisions(&next(&mut rx).await));
    }
    assert_eq!(seen, (2..2 + writes).collect::<Vec<_>>());
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_err());
    assert_eq!(hub.watcher_counts(), (1, 0));
}

#[test]
fn fragments_split_events_and_mark_all_but_the_last() {
    let mut resp = response(9, 1);
    resp.events = (0..10)
        .map(|i| Event {
            kv: Some(metastore_proto::mvccpb::KeyValue {
                key: vec![i],
                value: vec![0; 100],
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let parts = fragments(resp, 300);
    assert!(parts.len() > 1);
    assert_eq!(parts.iter().map(|p| p.events.len()).sum::<usize>(), 10);
    assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
    assert!(!parts.last().unwrap().fragment);
}

/// Creates a watcher and returns its id (from the `created` response).
async fn watch(
    stream: &WatchStream,
    rx: &mut Receiver<WatchResponse>,
    req: WatchCreateRequest,
) -> i64 {
    stream.create(req).await.unwrap();
    let created = next(rx).await;
    assert!(created.created && !created.canceled, "{created:?}");
    created.watch_id
}

fn single(key: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.into(),
        ..Default::default()
    }
}

fn range(key: &str, end: &[u8]) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.into(),
        range_end: end.to_vec(),
        ..Default::default()
    }
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

#[tokio::test]
async fn a_write_examines_only_the_watchers_it_concerns() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    for i in 0..10_000 {
        watch(&stream, &mut rx, single(&format!("/other/{i}"))).await;
    }
    for i in 0..1_000 {
        let prefix = format!("/prefix/{i:04}/");
        let mut end = prefix.clone().into_bytes();
        *end.last_mut().unwrap() += 1;
        watch(&stream, &mut rx, range(&prefix, &end)).await;
    }
    let key_watcher = watch(&stream, &mut rx, single("/prefix/0500/x")).await;
    let from_key = watch(&stream, &mut rx, range("/prefix/0500/", &[0])).await;
    assert_eq!(hub.watcher_counts(), (11_002, 0));
    assert_indexed(&hub);

    let before = hub.stats();
    put(&store, &hub, "/a/unwatched", "v");
    hub.flush();
    let after = hub.stats();
    assert_eq!(
        after.examined, before.examined,
        "nobody watches /a/unwatched"
    );
    assert!(
        after.index_visits - before.index_visits < 100,
        "a miss looks at O(log n) index entries, not 11,002: {}",
        after.index_visits - before.index_visits
    );

    put(&store, &hub, "/prefix/0500/x", "v");
    hub.flush();
    let hit = hub.stats();
    assert_eq!(
        hit.examined - after.examined,
        3,
        "the key watcher, its prefix watcher and the from-key watcher"
    );
    assert!(hit.index_visits - after.index_visits < 100);
    let mut got = Vec::new();
    for _ in 0..3 {
        let resp = next(&mut rx).await;
        assert_eq!(revisions(&resp), vec![3]);
        got.push(resp.watch_id);
    }
    got.sort_unstable();
    assert_eq!(got, vec![10_500, key_watcher, from_key]);
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn range_prefix_and_from_key_watchers_get_exactly_their_keys() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let key = watch(&stream, &mut rx, single("b")).await;
    let ab = watch(&stream, &mut rx, range("a", b"b")).await;
    let prefix_b = watch(&stream, &mut rx, range("b", b"c")).await;
    let from_b = watch(&stream, &mut rx, range("b", &[0])).await;
    let everything = watch(&stream, &mut rx, range("\0", &[0])).await;
    write(
        &store,
        &hub,
        WriteRequest::Txn(TxnRequest {
            success: ["a", "az", "b", "b1", "c", "zz"]
                .iter()
                .map(|k| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: k.as_bytes().to_vec(),
                        value: b"v".to_vec(),
                        ..Default::default()
                    })),
                })
                .collect(),
            ..Default::default()
        }),
    );
    let mut by_watcher = HashMap::new();
    for _ in 0..5 {
        let resp = next(&mut rx).await;
        let keys: Vec<String> = resp
            .events
            .iter()
            .map(|e| String::from_utf8(e.kv.as_ref().unwrap().key.clone()).unwrap())
            .collect();
        assert!(
            by_watcher.insert(resp.watch_id, keys).is_none(),
            "one response each"
        );
    }
    let keys = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
    assert_eq!(by_watcher[&key], keys(&["b"]));
    assert_eq!(by_watcher[&ab], keys(&["a", "az"]));
    assert_eq!(by_watcher[&prefix_b], keys(&["b", "b1"]));
    assert_eq!(by_watcher[&from_b], keys(&["b", "b1", "c", "zz"]));
    assert_eq!(
        by_watcher[&everything],
        keys(&["a", "az", "b", "b1", "c", "zz"])
    );
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn cancel_and_close_take_watchers_out_of_the_index() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let (other, mut other_rx) = hub.open_stream();
    let canceled = watch(&stream, &mut rx, single("k")).await;
    let kept = watch(&stream, &mut rx, range("k", &[0])).await;
    for _ in 0..3 {
        watch(&other, &mut other_rx, range("a", b"z")).await;
    }
    assert_eq!(hub.inner.lock().synced.index.len(), 5);

    stream.cancel(canceled).await.unwrap();
    assert!(next(&mut rx).await.canceled);
    drop(other);
    assert_eq!(hub.watcher_counts(), (1, 0));
    assert_indexed(&hub);
    assert_eq!(hub.inner.lock().synced.index.len(), 1);

    let before = hub.stats();
    put(&store, &hub, "k", "v");
    hub.flush();
    assert_eq!(
        hub.stats().examined - before.examined,
        1,
        "only the kept watcher"
    );
    let resp = next(&mut rx).await;
    assert_eq!((resp.watch_id, revisions(&resp)), (kept, vec![2]));
    assert!(rx.try_recv().is_err());
}

/// Drains `rx` until `count` events arrived; returns (watch_id, revision, value) per event.
async fn collect(rx: &mut Receiver<WatchResponse>, count: usize) -> Vec<(i64, i64, Vec<u8>)> {
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

#[tokio::test]
async fn notify_only_queues_and_the_dispatcher_thread_delivers() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let id = watch(&stream, &mut rx, single("k")).await;
    {
        // Holding the hub's lock: nothing can be dispatched, yet notify returns.
        let _inner = hub.inner.lock();
        put(&store, &hub, "k", "v");
        let queue = hub.queue.lock();
        assert_eq!(queue.notified_rev, 2);
        assert_eq!(queue.revisions.len(), 1);
        assert!(rx.try_recv().is_err(), "notify delivered nothing itself");
    }
    // Nothing else is called here: the dispatcher thread delivers.
    let resp = next(&mut rx).await;
    assert_eq!((resp.watch_id, revisions(&resp)), (id, vec![2]));
    assert_eq!(hub.stats().queued_revisions, 0);
}

#[tokio::test]
async fn progress_never_claims_a_queued_revision_and_new_watchers_start_where_they_ask() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let early = watch(
        &stream,
        &mut rx,
        WatchCreateRequest {
            key: b"k".to_vec(),
            progress_notify: true,
            ..Default::default()
        },
    )
    .await;
    hub.dispatch_paused
        .store(true, std::sync::atomic::Ordering::SeqCst);
    put(&store, &hub, "k", "v2");
    assert_eq!(hub.stats().queued_revisions, 1);

    // Revision 2 is applied but not dispatched: progress says 1, for the stream and for the
    // watcher.
    stream.request_progress().await.unwrap();
    let progress = next(&mut rx).await;
    assert_eq!(progress.watch_id, PROGRESS_ALL_WATCHERS);
    assert_eq!(progress.header.unwrap().revision, 1);
    stream.progress_notify();
    let notify = next(&mut rx).await;
    assert!(notify.events.is_empty());
    assert_eq!(
        (notify.watch_id, notify.header.unwrap().revision),
        (early, 1)
    );

    // Created while revision 2 is queued: from now on, from revision 2 (served by the queue),
    // and from revision 1 (served by history).
    let from_now = watch(&stream, &mut rx, single("k")).await;
    let queued_start = watch(
        &stream,
        &mut rx,
        WatchCreateRequest {
            key: b"k".to_vec(),
            start_revision: 2,
            prev_kv: true,
            ..Default::default()
        },
    )
    .await;
    let history_start = watch(
        &stream,
        &mut rx,
        WatchCreateRequest {
            key: b"k".to_vec(),
            start_revision: 1,
            ..Default::default()
        },
    )
    .await;
    {
        // The two that need nothing dispatched yet wait in the synced set for the queue (the
        // third may already have been caught up from history by now).
        let inner = hub.inner.lock();
        assert!(inner.synced.get(&(0, from_now)).is_some());
        assert!(inner.synced.get(&(0, queued_start)).is_some());
    }

    hub.dispatch_paused
        .store(false, std::sync::atomic::Ordering::SeqCst);
    hub.wake_dispatcher();
    let mut seen = collect(&mut rx, 3).await;
    put(&store, &hub, "k", "v3");
    seen.extend(collect(&mut rx, 4).await);
    assert_eq!(revisions_of(&seen, early), vec![2, 3]);
    assert_eq!(revisions_of(&seen, from_now), vec![3]);
    assert_eq!(revisions_of(&seen, queued_start), vec![2, 3]);
    assert_eq!(revisions_of(&seen, history_start), vec![2, 3]);
    hub.flush();
    assert!(rx.try_recv().is_err(), "nothing twice");
    stream.request_progress().await.unwrap();
    assert_eq!(next(&mut rx).await.header.unwrap().revision, 3);
}

#[tokio::test]
async fn an_overflowing_queue_falls_back_to_history_without_loss_or_duplicates() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let prefix = watch(
        &stream,
        &mut rx,
        WatchCreateRequest {
            key: b"p/".to_vec(),
            range_end: b"p0".to_vec(),
            prev_kv: true,
            ..Default::default()
        },
    )
    .await;
    let key = watch(&stream, &mut rx, single("p/3")).await;
    // Room for a few revisions only.
    hub.set_max_queued_bytes(5 * queued_bytes(&[Event::default()]) + 400);
    hub.dispatch_paused
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let writes = 40;
    for i in 0..writes {
        put(&store, &hub, &format!("p/{}", i % 5), &format!("v{i}"));
    }
    let stats = hub.stats();
    assert!(stats.overflows > 0, "{stats:?}");
    assert!(stats.queued_revisions < 10, "{stats:?}");
    hub.dispatch_paused
        .store(false, std::sync::atomic::Ordering::SeqCst);
    hub.wake_dispatcher();

    let seen = collect(&mut rx, writes + writes / 5).await;
    assert_eq!(
        revisions_of(&seen, prefix),
        (2..2 + writes as i64).collect::<Vec<_>>()
    );
    assert_eq!(
        revisions_of(&seen, key),
        (0..writes as i64)
            .filter(|i| i % 5 == 3)
            .map(|i| i + 2)
            .collect::<Vec<_>>()
    );
    hub.flush();
    assert!(rx.try_recv().is_err(), "nothing twice");
    // Everyone ends up synced again, and live.
    put(&store, &hub, "p/3", "live");
    let live = collect(&mut rx, 2).await;
    assert!(live
        .iter()
        .all(|(_, rev, v)| *rev == 2 + writes as i64 && v == b"live"));
    assert_eq!(hub.watcher_counts(), (2, 0));
}

#[tokio::test]
async fn prev_kv_survives_the_queue_and_the_history_path() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let live = watch(
        &stream,
        &mut rx,
        WatchCreateRequest {
            key: b"k".to_vec(),
            prev_kv: true,
            ..Default::default()
        },
    )
    .await;
    put(&store, &hub, "k", "v1");
    let first = next(&mut rx).await;
    assert_eq!((first.watch_id, revisions(&first)), (live, vec![2]));
    assert!(first.events[0].prev_kv.is_none(), "k was created");
    hub.dispatch_paused
        .store(true, std::sync::atomic::Ordering::SeqCst);
    put(&store, &hub, "k", "v2");
    put(&store, &hub, "k", "v3");
    let replay = watch(
        &stream,
        &mut rx,
        WatchCreateRequest {
            key: b"k".to_vec(),
            start_revision: 2,
            prev_kv: true,
            ..Default::default()
        },
    )
    .await;
    hub.dispatch_paused
        .store(false, std::sync::atomic::Ordering::SeqCst);
    hub.wake_dispatcher();
    // watch id -> (revision, previous value) per event
    type Prevs = HashMap<i64, Vec<(i64, Option<Vec<u8>>)>>;
    let mut prevs = Prevs::new();
    let mut got = 0;
    while got < 5 {
        let resp = next(&mut rx).await;
        for e in resp.events {
            got += 1;
            prevs
                .entry(resp.watch_id)
                .or_default()
                .push((e.kv.unwrap().mod_revision, e.prev_kv.map(|kv| kv.value)));
        }
    }
    let expected = vec![(3, Some(b"v1".to_vec())), (4, Some(b"v2".to_vec()))];
    assert_eq!(prevs[&live], expected);
    let mut replayed = vec![(2, None)];
    replayed.extend(expected);
    assert_eq!(prevs[&replay], replayed);
}

#[tokio::test]
async fn reset_drops_the_queue_and_every_watcher_catches_up_from_history() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let id = watch(&stream, &mut rx, range("a", b"z")).await;
    put(&store, &hub, "b", "1");
    assert_eq!(collect(&mut rx, 1).await[0].1, 2);
    hub.dispatch_paused
        .store(true, std::sync::atomic::Ordering::SeqCst);
    put(&store, &hub, "c", "2");
    put(&store, &hub, "d", "3");
    hub.reset(store.current_revision());
    assert_eq!(hub.stats().queued_revisions, 0);
    // The watcher catches up from history (the dispatcher is still held back).
    let seen = collect(&mut rx, 2).await;
    assert_eq!(revisions_of(&seen, id), vec![3, 4]);
    hub.dispatch_paused
        .store(false, std::sync::atomic::Ordering::SeqCst);
    put(&store, &hub, "e", "4");
    assert_eq!(revisions_of(&collect(&mut rx, 1).await, id), vec![5]);
    hub.flush();
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn many_unsynced_watchers_catch_up_with_exactly_their_events() {
    let (store, hub) = setup();
    let keys = 300;
    let writes = 3 * CATCH_UP_BATCH as i64;
    for i in 0..writes {
        put(&store, &hub, &format!("k{:03}", i % keys), &i.to_string());
    }
    let (stream, mut rx) = hub.open_stream();
    // Created from another task: their catch-up starts at once, interleaved with the created
    // responses, and the stream's buffer must be drained meanwhile. Ids are given in order.
    let creating = tokio::spawn(async move {
        for k in 0..keys {
            stream
                .create(WatchCreateRequest {
                    key: format!("k{k:03}").into_bytes(),
                    start_revision: 1,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        stream
            .create(WatchCreateRequest {
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                start_revision: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        stream
    });
    let ids: Vec<i64> = (0..keys).collect();
    let all = keys;
    let seen = collect(&mut rx, 2 * writes as usize).await;
    for (k, id) in ids.iter().enumerate() {
        let expected: Vec<i64> = (0..writes)
            .filter(|i| i % keys == k as i64)
            .map(|i| i + 2)
            .collect();
        assert_eq!(revisions_of(&seen, *id), expected, "watcher of k{k:03}");
    }
    assert_eq!(
        revisions_of(&seen, all),
        (2..2 + writes).collect::<Vec<_>>()
    );
    assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv())
        .await
        .is_err());
    assert_eq!(hub.watcher_counts(), (keys as usize + 1, 0));
    drop(creating.await.unwrap());
    assert_eq!(hub.watcher_counts(), (0, 0));
}

/// Measurements, not checks of speed (run with `cargo test --release -p metastore-watch --
/// --ignored --nocapture`): the apply path's cost per put with idle watchers on other keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_put_cost_with_idle_watchers() {
    for watchers in [0usize, 20_000, 100_000] {
        let (store, hub) = setup();
        let (stream, mut rx) = hub.open_stream();
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        for i in 0..watchers {
            stream.create(single(&format!("/idle/{i}"))).await.unwrap();
        }
        let puts = 3000u32;
        let start = std::time::Instant::now();
        for i in 0..puts {
            put(&store, &hub, &format!("/busy/{}", i % 100), "v");
        }
        let elapsed = start.elapsed();
        hub.flush();
        assert_eq!(hub.stats().examined, 0);
        eprintln!(
            "{watchers} idle watchers: {puts} puts (apply + notify) in {elapsed:?}, {:?} each",
            elapsed / puts
        );
        drop(stream);
        drain.abort();
    }
}

/// Measurement: 10,000 watchers starting at revision 1 catch up 100,000 revisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_catch_up_of_many_watchers() {
    let (store, hub) = setup();
    let (revs, keys, streams) = (100_000usize, 10_000usize, 100usize);
    for i in 0..revs {
        put(&store, &hub, &format!("/k/{:05}", i % keys), "v");
    }
    let per_stream = keys / streams;
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (stream, mut rx) = hub.open_stream();
        tasks.push(tokio::spawn(async move {
            // Created while the stream is drained, or a full buffer would hold creation back.
            let creator = tokio::spawn(async move {
                for w in 0..per_stream {
                    let key = format!("/k/{:05}", s * per_stream + w).into_bytes();
                    stream
                        .create(WatchCreateRequest {
                            key,
                            start_revision: 1,
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                }
                stream
            });
            let mut events = 0;
            while events < per_stream * (revs / keys) {
                events += next(&mut rx).await.events.len();
            }
            assert_eq!(events, per_stream * (revs / keys));
            drop(creator.await.unwrap());
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    eprintln!(
        "{keys} watchers caught up {revs} revisions in {:?}",
        start.elapsed()
    );
}
