//! What survives: compaction removing superseded revisions, reopening a store (revision,
//! compaction, index, consistent index), and extra ops sharing the apply's batch.

use super::*;

#[test]
fn compaction_removes_superseded_revisions() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.put("a", "2"); // 3
    h.put("b", "1"); // 4
    h.del("b", ""); // 5
    h.put("c", "1"); // 6
    h.del("c", ""); // 7
    h.put("a", "3"); // 8

    assert!(matches!(h.compact(9), Err(MvccError::FutureRev)));
    let applied = h.compact(7).unwrap();
    assert_eq!(applied.revision, 8);
    assert!(applied.events.is_empty());
    assert_eq!(h.store.compact_revision(), 7);
    assert_eq!(h.store.current_revision(), 8);
    // a@3 is live at 7 and stays; a@2, b's history and c@6 go; the deletion at exactly the compact
    // revision stays until the next compaction (etcd keeps it for watchers starting there).
    assert_eq!(
        h.stored_revisions(),
        vec![(3, 0, false), (7, 0, true), (8, 0, false)]
    );

    assert!(matches!(h.get_at("a", 6), Err(MvccError::Compacted)));
    assert_eq!(h.get_at("a", 7).unwrap().unwrap().value, b"2");
    let kv = h.get("a").unwrap();
    assert_eq!((kv.version, kv.create_revision), (3, 2));
    assert_eq!(h.get_at("c", 7).unwrap(), None);

    let err = h.compact(7).unwrap_err();
    assert_eq!(
        err.etcd_message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert!(matches!(h.compact(3), Err(MvccError::Compacted)));

    h.compact(8).unwrap();
    assert_eq!(h.stored_revisions(), vec![(8, 0, false)]);
    assert_eq!(h.get("a").unwrap().version, 3);
    h.put("a", "4");
    assert_eq!(h.get("a").unwrap().version, 4);

    let meta = h.backend.snapshot().unwrap();
    assert_eq!(
        meta.get("meta", b"finishedCompactRev").unwrap(),
        Some(Revision::new(8, 0).to_key(false))
    );
    assert_eq!(
        meta.get("meta", b"scheduledCompactRev").unwrap(),
        Some(Revision::new(8, 0).to_key(false))
    );
}

#[test]
fn reopen_restores_revision_compaction_index_and_consistent_index() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.put("a", "2"); // 3
    h.put("b", "1"); // 4
    h.del("b", ""); // 5
    h.compact(4).unwrap();
    h.put("c", "1"); // 6
    h.del("c", ""); // 7

    let store = h.reopen();
    assert_eq!(store.current_revision(), 7);
    assert_eq!(store.compact_revision(), 4);
    assert_eq!(store.consistent_index(), 7);
    let range = |rev| {
        store.range(&RangeRequest {
            key: b"\0".to_vec(),
            range_end: vec![0],
            revision: rev,
            ..Default::default()
        })
    };
    assert!(matches!(range(3), Err(MvccError::Compacted)));
    let at4 = range(4).unwrap();
    assert_eq!(keys(&at4), ["a", "b"]);
    assert_eq!(keys(&range(6).unwrap()), ["a", "c"]);
    assert_eq!(keys(&range(7).unwrap()), ["a"]);
    assert_eq!(
        h.store.hash_kv(0).unwrap().hash,
        store.hash_kv(0).unwrap().hash
    );

    // Writes continue where the old store stopped.
    let mut h2 = Harness {
        backend: h.backend.clone(),
        store,
        applied_index: 7,
    };
    assert_eq!(h2.put("a", "3").revision, 8);
    let kv = h2.get("a").unwrap();
    assert_eq!((kv.version, kv.create_revision), (3, 2));
    assert_eq!(h2.put("c", "2").revision, 9);
    assert_eq!(h2.get("c").unwrap().version, 1);

    // A store whose latest revisions were all compacted away keeps its revision.
    let mut h3 = Harness::new();
    h3.put("x", "1"); // 2
    h3.del("x", ""); // 3
    h3.compact(3).unwrap();
    h3.put("y", "1"); // 4
    h3.compact(4).unwrap();
    h3.del("y", ""); // 5
    h3.compact(5).unwrap();
    assert_eq!(h3.stored_revisions(), vec![(5, 0, true)]);
    let reopened = h3.reopen();
    assert_eq!(
        (reopened.current_revision(), reopened.compact_revision()),
        (5, 5)
    );
    let mut h4 = Harness {
        backend: h3.backend.clone(),
        store: reopened,
        applied_index: 10,
    };
    h4.compact(5).unwrap_err();
    assert_eq!(h4.put("y", "2").revision, 6);
    assert_eq!(h4.get("y").unwrap().version, 1);
    h4.compact(6).unwrap();
    assert_eq!(h4.stored_revisions(), vec![(6, 0, false)]);
}

#[test]
fn extra_ops_and_consistent_index_share_the_batch() {
    let h = Harness::new();
    let mut extra = WriteBatch::new();
    extra.put("app", b"lease/7".to_vec(), b"ttl".to_vec());
    let applied = h
        .store
        .apply_write(WriteRequest::Put(put_req("k", "v")), &leases, 41, extra)
        .unwrap();
    assert_eq!(applied.revision, 2);
    let view = h.backend.snapshot().unwrap();
    assert_eq!(view.get("app", b"lease/7").unwrap(), Some(b"ttl".to_vec()));
    assert_eq!(
        view.get("meta", b"consistent_index").unwrap(),
        Some(41u64.to_be_bytes().to_vec())
    );

    // A failed request writes neither the extra ops nor the index.
    let mut extra = WriteBatch::new();
    extra.put("app", b"other".to_vec(), b"x".to_vec());
    let bad = PutRequest {
        ignore_value: true,
        ..put_req("missing", "")
    };
    assert!(h
        .store
        .apply_write(WriteRequest::Put(bad), &leases, 42, extra)
        .is_err());
    let view = h.backend.snapshot().unwrap();
    assert_eq!(view.get("app", b"other").unwrap(), None);
    assert_eq!(h.store.consistent_index(), 41);
    assert_eq!(h.reopen().consistent_index(), 41);

    // The caller records a refused entry's index itself, with its own ops.
    let mut extra = WriteBatch::new();
    extra.put("app", b"refused".to_vec(), b"42".to_vec());
    h.store.record_applied(42, extra).unwrap();
    assert_eq!(h.store.consistent_index(), 42);
    assert_eq!(h.store.current_revision(), 2);
    let reopened = h.reopen();
    assert_eq!(
        (reopened.consistent_index(), reopened.current_revision()),
        (42, 2)
    );
    let view = h.backend.snapshot().unwrap();
    assert_eq!(view.get("app", b"refused").unwrap(), Some(b"42".to_vec()));
}

/// A damaged or forged store whose revisions are out of range is refused at open, not counted on
/// from (the compactor panicked on `rev + 1` overflowing after a snapshot carrying a scheduled
/// compaction at i64::MAX was restored; found by the snapshot_metastore fuzz target).
#[test]
fn revisions_out_of_range_are_refused_at_open() {
    for (name, rev) in [
        (SCHEDULED_COMPACT_KEY, i64::MAX),
        (FINISHED_COMPACT_KEY, i64::MAX),
        (SCHEDULED_COMPACT_KEY, -5),
    ] {
        let mut h = Harness::new();
        h.put("a", "1");
        let mut batch = WriteBatch::new();
        batch.put("meta", name, Revision::new(rev, 0).to_key(false));
        h.backend.write(batch).unwrap();
        let err = Store::open(h.backend.clone()).expect_err("refused");
        assert!(
            matches!(&err, MvccError::Corrupt(m) if m.contains("not a revision")),
            "{err:?}"
        );
    }
    // A key-bucket revision with its top bit set reads as negative; one above MAX_REVISION
    // leaves no room to count on.
    for main in [i64::MIN + 3, crate::store::MAX_REVISION + 1] {
        let h = Harness::new();
        let mut batch = WriteBatch::new();
        let kv = KeyValue {
            key: b"k".to_vec(),
            create_revision: main,
            mod_revision: main,
            version: 1,
            ..Default::default()
        };
        batch.put(
            "key",
            Revision::new(main, 0).to_key(false),
            kv.encode_to_vec(),
        );
        h.backend.write(batch).unwrap();
        let err = Store::open(h.backend.clone()).expect_err("refused");
        assert!(
            matches!(&err, MvccError::Corrupt(m) if m.contains("out of range")),
            "{err:?}"
        );
    }
    // The largest allowed revision opens, and a compaction there runs.
    let h = Harness::new();
    let mut batch = WriteBatch::new();
    batch.put(
        "meta",
        SCHEDULED_COMPACT_KEY,
        Revision::new(crate::store::MAX_REVISION, 0).to_key(false),
    );
    h.backend.write(batch).unwrap();
    let store = Store::open(h.backend.clone()).expect("opens");
    assert_eq!(store.compact_revision(), crate::store::MAX_REVISION);
}

/// Reopening reads the key bucket on one thread and builds the index on another, in batches of
/// a few thousand revisions: a history spanning several batches reopens to the same state, and a
/// bad revision in a later batch is refused whichever side meets it.
#[test]
fn reopen_across_many_batches_rebuilds_the_same_state() {
    let mut h = Harness::new();
    for i in 0..12_000u32 {
        let key = format!("k{:05}", (i * 7919) % 3_001);
        match i % 13 {
            0 => {
                h.del(&key, "");
            }
            1 | 2 => {
                h.apply(WriteRequest::Put(PutRequest {
                    lease: 7 + i64::from(i % 2),
                    ..put_req(&key, "leased")
                }))
                .expect("put with a lease");
            }
            _ => {
                h.put(&key, &i.to_string());
            }
        }
        if i == 6_000 {
            h.compact(3_000).unwrap();
        }
    }
    let all = |rev| RangeRequest {
        key: b"\0".to_vec(),
        range_end: vec![0],
        revision: rev,
        ..Default::default()
    };
    let store = h.reopen();
    assert_eq!(store.current_revision(), h.store.current_revision());
    assert_eq!(store.live_keys(), h.store.live_keys());
    for rev in [3_000, 5_000, 9_999, 0] {
        assert_eq!(
            store.range(&all(rev)).unwrap(),
            h.store.range(&all(rev)).unwrap(),
            "at {rev}"
        );
    }
    assert_eq!(store.hash_kv(0).unwrap(), h.store.hash_kv(0).unwrap());
    let mut leased = store.take_leased_keys();
    leased.sort();
    let expected: Vec<_> = h
        .store
        .range(&all(0))
        .unwrap()
        .kvs
        .into_iter()
        .filter(|kv| kv.lease != 0)
        .map(|kv| (kv.key, kv.lease))
        .collect();
    assert!(expected.len() > 100, "{} leased keys", expected.len());
    assert_eq!(leased, expected);

    // A revision stored twice (as a put, then as a tombstone) is refused by the builder; an
    // undecodable value by the reader. Both come far past the first batch.
    let next = h.store.current_revision() + 1;
    let stored = KeyValue {
        key: b"k00001".to_vec(),
        create_revision: next,
        mod_revision: next,
        version: 1,
        ..Default::default()
    };
    for (tombstone, value, expected) in [
        (true, stored.encode_to_vec(), "does not follow"),
        (false, vec![0x0a, 0x05, b'k'], "undecodable KeyValue"),
    ] {
        let h2 = Harness::new();
        let mut copy = WriteBatch::new();
        for (k, v) in h
            .backend
            .snapshot()
            .unwrap()
            .collect("key", ScanRange::all())
            .unwrap()
        {
            copy.put("key", k, v);
        }
        copy.put(
            "key",
            Revision::new(next, 0).to_key(false),
            stored.encode_to_vec(),
        );
        copy.put("key", Revision::new(next, 0).to_key(tombstone), value);
        h2.backend.write(copy).unwrap();
        let err = Store::open(h2.backend.clone()).expect_err("refused");
        assert!(
            matches!(&err, MvccError::Corrupt(m) if m.contains(expected)),
            "{err:?}"
        );
    }
}
