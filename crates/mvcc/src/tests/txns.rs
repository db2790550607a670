//! Transactions: compares on every target, ranges of keys, one revision per txn, nested txns,
//! errors that write nothing, and read-only txns served without applying.

use super::*;

#[test]
fn txn_compares_every_target_and_result() {
    use compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let mut h = Harness::new();
    h.put("k", "m"); // 2
    h.apply(WriteRequest::Put(PutRequest {
        lease: 7,
        ..put_req("k", "m")
    }))
    .unwrap(); // 3: v2, lease 7
    let cases = [
        (T::Version, U::Version(2), R::Equal, true),
        (T::Version, U::Version(1), R::Greater, true),
        (T::Version, U::Version(2), R::Less, false),
        (T::Version, U::Version(3), R::NotEqual, true),
        (T::Create, U::CreateRevision(2), R::Equal, true),
        (T::Create, U::CreateRevision(3), R::Less, true),
        (T::Create, U::CreateRevision(2), R::Greater, false),
        (T::Mod, U::ModRevision(3), R::Equal, true),
        (T::Mod, U::ModRevision(2), R::Greater, true),
        (T::Mod, U::ModRevision(3), R::NotEqual, false),
        (T::Value, U::Value(b"m".to_vec()), R::Equal, true),
        (T::Value, U::Value(b"a".to_vec()), R::Greater, true),
        (T::Value, U::Value(b"z".to_vec()), R::Less, true),
        (T::Value, U::Value(b"m".to_vec()), R::NotEqual, false),
        (T::Lease, U::Lease(7), R::Equal, true),
        (T::Lease, U::Lease(8), R::Less, true),
        (T::Lease, U::Lease(0), R::Greater, true),
    ];
    for (target, value, result, expect) in cases {
        let t = TxnRequest {
            compare: vec![cmp("k", "", target, result, value.clone())],
            success: vec![],
            failure: vec![],
        };
        let (resp, applied) = h.txn(t).unwrap();
        assert_eq!(resp.succeeded, expect, "{target:?} {result:?} {value:?}");
        assert_eq!(
            applied.revision, 3,
            "a txn without writes keeps the revision"
        );
    }
    // A missing key compares as a zero KeyValue, except for VALUE which always fails.
    let missing = |target, value| TxnRequest {
        compare: vec![cmp("nope", "", target, R::Equal, value)],
        success: vec![],
        failure: vec![],
    };
    assert!(
        h.txn(missing(T::Version, U::Version(0)))
            .unwrap()
            .0
            .succeeded
    );
    assert!(
        h.txn(missing(T::Create, U::CreateRevision(0)))
            .unwrap()
            .0
            .succeeded
    );
    assert!(
        !h.txn(missing(T::Value, U::Value(vec![])))
            .unwrap()
            .0
            .succeeded
    );
}

#[test]
fn txn_compare_over_a_range_requires_every_key() {
    use compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let mut h = Harness::new();
    h.put("p/a", "1");
    h.put("p/b", "1");
    h.put("p/b", "1"); // p/b version 2
    let all_v1 = TxnRequest {
        compare: vec![cmp("p/", "p0", T::Version, R::Equal, U::Version(1))],
        success: vec![op_put("yes", "")],
        failure: vec![op_put("no", "")],
    };
    let (resp, _) = h.txn(all_v1).unwrap();
    assert!(!resp.succeeded);
    assert!(h.get("no").is_some() && h.get("yes").is_none());
    let all_pos = TxnRequest {
        compare: vec![cmp("p/", "p0", T::Version, R::Greater, U::Version(0))],
        success: vec![],
        failure: vec![],
    };
    assert!(h.txn(all_pos).unwrap().0.succeeded);
}

#[test]
fn txn_is_one_revision_and_ranges_see_earlier_writes() {
    let mut h = Harness::new();
    h.put("a", "old"); // 2
    h.put("gone", "x"); // 3
    let t = TxnRequest {
        compare: vec![],
        success: vec![
            op_get("a", ""),
            op_put("a", "new"),
            op_put("b", "1"),
            op_get("a", "c"),
            op_del("gone", ""),
            op_get("\0", "\0"),
        ],
        failure: vec![],
    };
    let (resp, applied) = h.txn(t).unwrap();
    assert!(resp.succeeded);
    assert!(resp.header.is_none());
    assert_eq!(applied.revision, 4);
    assert_eq!(h.store.current_revision(), 4);

    let before = range_resp(&resp, 0);
    assert_eq!(before.kvs[0].value, b"old");
    assert_eq!(before.header.as_ref().unwrap().revision, 3);
    let during = range_resp(&resp, 3);
    assert_eq!(keys(during), ["a", "b"]);
    assert_eq!(during.kvs[0].value, b"new");
    assert_eq!(during.kvs[0].version, 2);
    assert_eq!(during.header.as_ref().unwrap().revision, 4);
    assert_eq!(keys(range_resp(&resp, 5)), ["a", "b"]);
    match &resp.responses[1].response {
        Some(response_op::Response::ResponsePut(p)) => {
            assert_eq!(p.header.as_ref().unwrap().revision, 4)
        }
        other => panic!("{other:?}"),
    }
    match &resp.responses[4].response {
        Some(response_op::Response::ResponseDeleteRange(d)) => assert_eq!(d.deleted, 1),
        other => panic!("{other:?}"),
    }

    assert_eq!(
        h.stored_revisions(),
        vec![
            (2, 0, false),
            (3, 0, false),
            (4, 0, false),
            (4, 1, false),
            (4, 2, true)
        ]
    );
    let types: Vec<_> = applied.events.iter().map(|e| e.r#type).collect();
    assert_eq!(
        types,
        [
            EventType::Put as i32,
            EventType::Put as i32,
            EventType::Delete as i32
        ]
    );
    // A put that did not ask for its previous value does not read it: create revision and
    // version come from the index. The delete's event carries the deleted value.
    let put_a = &applied.events[0];
    assert_eq!(put_a.prev_kv, None);
    let kv = put_a.kv.as_ref().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 4, 2));
    let put_b = applied.events[1].kv.as_ref().unwrap();
    assert_eq!((put_b.create_revision, put_b.version), (4, 1));
    assert_eq!(applied.events[2].prev_kv.as_ref().unwrap().value, b"x");
    assert_eq!(h.get("b").unwrap().mod_revision, 4);
}

#[test]
fn nested_txn_follows_its_own_compares_against_the_state_before() {
    use compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let mut h = Harness::new();
    h.put("x", "1"); // 2
    let inner = TxnRequest {
        // Evaluated before the outer txn's writes: x is still "1".
        compare: vec![cmp("x", "", T::Value, R::Equal, U::Value(b"1".to_vec()))],
        success: vec![op_put("inner", "then"), op_get("x", "")],
        failure: vec![op_put("inner", "else")],
    };
    let outer = TxnRequest {
        compare: vec![cmp("x", "", T::Version, R::Equal, U::Version(1))],
        success: vec![op_put("x", "2"), op_txn(inner)],
        failure: vec![],
    };
    let (resp, applied) = h.txn(outer).unwrap();
    assert!(resp.succeeded);
    assert_eq!(applied.revision, 3);
    assert_eq!(h.get("inner").unwrap().value, b"then");
    match &resp.responses[1].response {
        Some(response_op::Response::ResponseTxn(n)) => {
            assert!(n.succeeded);
            assert_eq!(n.header, Some(Default::default()));
            assert_eq!(
                range_resp(n, 1).kvs[0].value,
                b"2",
                "ranges see earlier writes"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        h.stored_revisions(),
        vec![(2, 0, false), (3, 0, false), (3, 1, false)]
    );
}

#[test]
fn txn_errors_write_nothing() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    let before = h.stored_revisions();
    // Each after a put that must not stay written either.
    let cases = [
        (
            op_put_req(PutRequest {
                lease: 42,
                ..put_req("c", "")
            }),
            "etcdserver: requested lease not found",
        ),
        (
            op_put_req(PutRequest {
                ignore_value: true,
                ..put_req("c", "")
            }),
            "etcdserver: key not found",
        ),
        (
            op_range(RangeRequest {
                revision: 3,
                ..all("a", "")
            }),
            "etcdserver: mvcc: required revision is a future revision",
        ),
    ];
    for (failing, message) in cases {
        let t = TxnRequest {
            compare: vec![],
            success: vec![op_put("b", "1"), failing],
            failure: vec![],
        };
        let err = h.txn(t).unwrap_err();
        assert_eq!(err.etcd_message(), message);
    }
    assert_eq!(h.stored_revisions(), before);
    assert_eq!(h.store.current_revision(), 2);
    assert_eq!(h.store.consistent_index(), 1);
    assert_eq!(h.get("b"), None);
    // A failing branch that is not taken does not matter.
    let t = TxnRequest {
        compare: vec![],
        success: vec![op_put("b", "1")],
        failure: vec![op_put_req(PutRequest {
            lease: 42,
            ..put_req("c", "")
        })],
    };
    assert_eq!(h.txn(t).unwrap().1.revision, 3);
}

#[test]
fn read_only_txn_is_served_without_applying() {
    let mut h = Harness::new();
    h.put("a", "1");
    let t = TxnRequest {
        compare: vec![],
        success: vec![op_get("a", "")],
        failure: vec![],
    };
    assert!(is_txn_read_only(&t));
    let (resp, rev) = h.store.txn_read_only(&t).unwrap();
    assert_eq!(rev, 2);
    assert_eq!(range_resp(&resp, 0).kvs[0].value, b"1");
    let w = TxnRequest {
        compare: vec![],
        success: vec![],
        failure: vec![op_txn(TxnRequest {
            compare: vec![],
            success: vec![op_del("a", "")],
            failure: vec![],
        })],
    };
    assert!(!is_txn_read_only(&w));
    let nested_read = TxnRequest {
        compare: vec![],
        success: vec![op_txn(t.clone())],
        failure: vec![],
    };
    assert!(
        !is_txn_read_only(&nested_read),
        "etcd treats any nested txn as a write"
    );
    assert!(matches!(
        h.store.txn_read_only(&w),
        Err(MvccError::NotReadOnly)
    ));
}
