//! The dispatch queue: `notify` only queues and the dispatcher thread delivers; progress never
//! claims a queued revision; an overflowing queue and a reset fall back to history without
//! loss or duplicates.

use super::*;

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

/// What the KV state machine does: `queue` per applied revision, `wake` once per applied batch.
#[tokio::test]
async fn queue_wakes_nobody_and_one_wake_delivers_the_whole_batch() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let id = watch(&stream, &mut rx, single("k")).await;
    let woken = || hub.wakeups.load(std::sync::atomic::Ordering::SeqCst);
    let before = woken();
    for value in ["a", "b", "c", "d", "e"] {
        let applied = store
            .apply_write(
                WriteRequest::Put(PutRequest {
                    key: "k".into(),
                    value: value.into(),
                    ..Default::default()
                }),
                &|_| false,
                0,
                WriteBatch::new(),
            )
            .unwrap();
        hub.queue(applied.revision, &applied.events);
    }
    assert_eq!(woken(), before, "queue woke the dispatcher");
    hub.wake();
    assert_eq!(woken(), before + 1, "one wake-up for the batch");
    let seen = collect(&mut rx, 5).await;
    assert_eq!(revisions_of(&seen, id), vec![2, 3, 4, 5, 6]);
    hub.wake();
    assert_eq!(woken(), before + 1, "nothing queued: no wake-up");
}

#[tokio::test]
async fn progress_never_claims_a_queued_revision_and_new_watchers_start_where_they_ask() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let early = watch(
        &stream,
        &mut rx,
        WatchCreateRequest {
            progress_notify: true,
            ..single("k")
        },
    )
    .await;
    pause_dispatch(&hub);
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
        from_revision(2, with_prev_kv(single("k"))),
    )
    .await;
    let history_start = watch(&stream, &mut rx, from_revision(1, single("k"))).await;
    {
        // The two that need nothing dispatched yet wait in the synced set for the queue (the
        // third may already have been caught up from history by now).
        let inner = hub.inner.lock();
        assert!(inner.synced.get(&(0, from_now)).is_some());
        assert!(inner.synced.get(&(0, queued_start)).is_some());
    }

    resume_dispatch(&hub);
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
    let prefix = watch(&stream, &mut rx, with_prev_kv(range("p/", b"p0"))).await;
    let key = watch(&stream, &mut rx, single("p/3")).await;
    // Room for a few revisions only.
    hub.set_max_queued_bytes(5 * queued_bytes(&[Event::default()]) + 400);
    pause_dispatch(&hub);
    let writes = 40;
    for i in 0..writes {
        put(&store, &hub, &format!("p/{}", i % 5), &format!("v{i}"));
    }
    let stats = hub.stats();
    assert!(stats.overflows > 0, "{stats:?}");
    assert!(stats.queued_revisions < 10, "{stats:?}");
    resume_dispatch(&hub);

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
async fn reset_drops_the_queue_and_every_watcher_catches_up_from_history() {
    let (store, hub) = setup();
    let (stream, mut rx) = hub.open_stream();
    let id = watch(&stream, &mut rx, range("a", b"z")).await;
    put(&store, &hub, "b", "1");
    assert_eq!(collect(&mut rx, 1).await[0].1, 2);
    pause_dispatch(&hub);
    put(&store, &hub, "c", "2");
    put(&store, &hub, "d", "3");
    hub.reset(store.current_revision());
    assert_eq!(hub.stats().queued_revisions, 0);
    // The watcher catches up from history (the dispatcher is still held back).
    let seen = collect(&mut rx, 2).await;
    assert_eq!(revisions_of(&seen, id), vec![3, 4]);
    resume_dispatch(&hub);
    put(&store, &hub, "e", "4");
    assert_eq!(revisions_of(&collect(&mut rx, 1).await, id), vec![5]);
    hub.flush();
    assert!(rx.try_recv().is_err());
}
