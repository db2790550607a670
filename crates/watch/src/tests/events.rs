//! What a watcher is sent: live events (a txn's in one response, filters, `prev_kv`), history
//! replay and the compaction cancel, a slow stream falling back to history, fragments, and
//! previous values on both paths.

use super::*;
use prost::Message;

#[tokio::test]
async fn live_events_txn_in_one_response_filters_and_prev_kv() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    stream.create(with_prev_kv(range("a", b"b"))).await.unwrap();
    stream
        .create(WatchCreateRequest {
            watch_id: 7,
            filters: vec![FilterType::Noput as i32],
            ..single("a1")
        })
        .await
        .unwrap();
    let created = next(&mut rx).await;
    assert!(created.created && created.watch_id == 0);
    let created = next(&mut rx).await;
    assert!(created.created && created.watch_id == 7);
    stream
        .create(WatchCreateRequest {
            watch_id: 7,
            ..single("x")
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
        .create(from_revision(3, with_prev_kv(single("k"))))
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
    stream.create(from_revision(2, single("k"))).await.unwrap();
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
    stream.create(single("k")).await.unwrap();
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
    let whole = resp.clone();
    let parts = fragments(resp.into(), 300);
    assert!(parts.len() > 1);
    assert!(
        parts.iter().all(|p| p.encoded_len() <= 300 + 30),
        "{parts:?}"
    );
    assert!(parts[..parts.len() - 1].iter().all(|p| p.head.fragment));
    assert!(!parts.last().unwrap().head.fragment);
    let events: Vec<Event> = parts
        .into_iter()
        .flat_map(|p| p.into_response().unwrap().events)
        .collect();
    assert_eq!(events, whole.events, "every event once, in order");
}

#[tokio::test]
async fn prev_kv_survives_the_queue_and_the_history_path() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let live = watch(&stream, &mut rx, with_prev_kv(single("k"))).await;
    put(&store, &hub, "k", "v1");
    let first = next(&mut rx).await;
    assert_eq!((first.watch_id, revisions(&first)), (live, vec![2]));
    assert!(first.events[0].prev_kv.is_none(), "k was created");
    pause_dispatch(&hub);
    put(&store, &hub, "k", "v2");
    put(&store, &hub, "k", "v3");
    let replay = watch(
        &stream,
        &mut rx,
        from_revision(2, with_prev_kv(single("k"))),
    )
    .await;
    resume_dispatch(&hub);
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
