//! Puts and deletes: previous values, leases and the ignore flags, tombstones and their events,
//! and readers seeing whole writes while the apply thread runs.

use super::*;

#[test]
fn put_prev_kv_lease_and_ignore_flags() {
    let mut h = Harness::new();
    // Unknown lease.
    let err = h
        .apply(WriteRequest::Put(PutRequest {
            lease: 99,
            ..put_req("k", "v")
        }))
        .unwrap_err();
    assert!(matches!(err, MvccError::LeaseNotFound));
    assert_eq!(err.etcd_message(), "etcdserver: requested lease not found");
    // ignore_value / ignore_lease on a missing key.
    for req in [
        PutRequest {
            ignore_value: true,
            ..put_req("k", "")
        },
        PutRequest {
            ignore_lease: true,
            ..put_req("k", "v")
        },
    ] {
        let err = h.apply(WriteRequest::Put(req)).unwrap_err();
        assert!(matches!(err, MvccError::KeyNotFound));
        assert_eq!(err.etcd_message(), "etcdserver: key not found");
    }
    assert_eq!(h.store.current_revision(), 1);
    assert!(h.stored_revisions().is_empty());
    assert_eq!(
        h.store.consistent_index(),
        0,
        "failed requests write nothing"
    );

    let first = h
        .apply(WriteRequest::Put(PutRequest {
            lease: 7,
            prev_kv: true,
            ..put_req("k", "v1")
        }))
        .unwrap();
    match &first.response {
        WriteResponse::Put(r) => assert_eq!(r.prev_kv, None),
        other => panic!("{other:?}"),
    }
    assert_eq!(first.events.len(), 1);
    assert_eq!(first.events[0].r#type, EventType::Put as i32);
    assert_eq!(first.events[0].prev_kv, None);
    assert_eq!(first.events[0].kv.as_ref().unwrap().lease, 7);

    // ignore_value keeps the value and takes the new lease.
    let second = h
        .apply(WriteRequest::Put(PutRequest {
            ignore_value: true,
            lease: 8,
            prev_kv: true,
            ..put_req("k", "")
        }))
        .unwrap();
    let kv = h.get("k").unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.lease, kv.version),
        (b"v1".as_slice(), 8, 2)
    );
    match &second.response {
        WriteResponse::Put(r) => {
            let prev = r.prev_kv.as_ref().unwrap();
            assert_eq!(
                (prev.value.as_slice(), prev.lease, prev.mod_revision),
                (b"v1".as_slice(), 7, 2)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(second.events[0].prev_kv.as_ref().unwrap().lease, 7);

    // ignore_lease keeps the lease and takes the new value.
    h.apply(WriteRequest::Put(PutRequest {
        ignore_lease: true,
        ..put_req("k", "v2")
    }))
    .unwrap();
    let kv = h.get("k").unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.lease, kv.version),
        (b"v2".as_slice(), 8, 3)
    );
}

#[test]
fn delete_range_tombstones_and_events() {
    let mut h = range_fixture();
    let d = h.del("b", "e");
    assert_eq!(d.revision, 11);
    match &d.response {
        WriteResponse::DeleteRange(r) => {
            assert_eq!(r.deleted, 3);
            let prev: Vec<_> = r.prev_kvs.iter().map(|kv| kv.key.clone()).collect();
            assert_eq!(prev, [b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.events.len(), 3);
    let ev = &d.events[2];
    assert_eq!(ev.r#type, EventType::Delete as i32);
    assert_eq!(
        ev.kv,
        Some(KeyValue {
            key: b"d".to_vec(),
            mod_revision: 11,
            ..Default::default()
        })
    );
    assert_eq!(ev.prev_kv.as_ref().unwrap().version, 3);
    let tail: Vec<_> = h.stored_revisions().into_iter().rev().take(3).collect();
    assert_eq!(tail, [(11, 2, true), (11, 1, true), (11, 0, true)]);
    assert_eq!(keys(&h.range(all("a", "\0"))), ["a", "e", "zz"]);
    // A delete without prev_kv answers no previous values.
    let r = h
        .apply(WriteRequest::DeleteRange(DeleteRangeRequest {
            key: b"a".to_vec(),
            range_end: vec![0],
            prev_kv: false,
        }))
        .unwrap();
    match r.response {
        WriteResponse::DeleteRange(r) => assert_eq!((r.deleted, r.prev_kvs.len()), (3, 0)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn readers_see_whole_writes_while_the_apply_thread_runs() {
    let h = Harness::new();
    let store = Arc::new(h.store);
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..300u64 {
                let v = i.to_string();
                let t = TxnRequest {
                    compare: vec![],
                    success: vec![op_put("x", &v), op_put("y", &v)],
                    failure: vec![],
                };
                store
                    .apply_write(WriteRequest::Txn(t), &leases, i + 1, WriteBatch::new())
                    .unwrap();
                if i % 50 == 49 {
                    let rev = store.current_revision();
                    store
                        .apply_write(
                            WriteRequest::Compact(CompactionRequest {
                                revision: rev - 10,
                                physical: false,
                            }),
                            &leases,
                            i + 1,
                            WriteBatch::new(),
                        )
                        .unwrap();
                }
            }
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut seen = 0;
                while seen < 300 {
                    let (resp, rev) = store
                        .range_with_revision(&RangeRequest {
                            key: b"x".to_vec(),
                            range_end: b"z".to_vec(),
                            ..Default::default()
                        })
                        .unwrap();
                    if resp.kvs.len() == 2 {
                        assert_eq!(resp.kvs[0].value, resp.kvs[1].value);
                        assert_eq!(resp.kvs[0].mod_revision, rev);
                        seen = resp.kvs[0]
                            .value
                            .iter()
                            .fold(0, |n, d| n * 10 + (d - b'0') as i32)
                            + 1;
                    } else {
                        assert!(resp.kvs.is_empty());
                    }
                }
            })
        })
        .collect();
    writer.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(store.current_revision(), 301);
}
