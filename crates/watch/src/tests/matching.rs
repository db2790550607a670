//! Watchers indexed by what they watch: a write examines only the watchers it concerns; single
//! key, range, prefix and from-key watchers get exactly their keys; cancel and close leave the
//! index; many unsynced watchers catch up with exactly their events.

use super::*;

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
                .create(from_revision(1, single(&format!("k{k:03}"))))
                .await
                .unwrap();
        }
        stream
            .create(from_revision(1, range("k", b"l")))
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
