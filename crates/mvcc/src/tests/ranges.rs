//! Range requests: key ranges and prefixes, limits and counts, sorting, and revision filters.

use super::*;

#[test]
fn range_ends_and_prefixes() {
    let h = range_fixture();
    assert_eq!(keys(&h.range(all("b", ""))), ["b"]);
    assert_eq!(keys(&h.range(all("b", "d"))), ["b", "c"]);
    assert_eq!(keys(&h.range(all("c", "\0"))), ["c", "d", "e", "zz"]);
    assert_eq!(
        keys(&h.range(all("\0", "\0"))),
        ["a", "b", "c", "d", "e", "zz"]
    );
    assert_eq!(keys(&h.range(all("z", "{"))), ["zz"]); // prefix "z"
    assert_eq!(h.range(all("d", "b")).count, 0); // end before start
    assert_eq!(h.range(all("nope", "")).count, 0);
}

#[test]
fn range_limit_more_and_count() {
    let h = range_fixture();
    let r = h.range(RangeRequest {
        limit: 2,
        ..all("a", "f")
    });
    assert_eq!(keys(&r), ["a", "b"]);
    assert!(r.more);
    assert_eq!(r.count, 5);
    let r = h.range(RangeRequest {
        limit: 5,
        ..all("a", "f")
    });
    assert_eq!(keys(&r).len(), 5);
    assert!(!r.more);
    assert_eq!(r.count, 5);
    let r = h.range(RangeRequest {
        limit: 4,
        ..all("a", "f")
    });
    assert!(r.more);
    let r = h.range(RangeRequest {
        count_only: true,
        limit: 1,
        ..all("a", "f")
    });
    assert!(r.kvs.is_empty());
    assert_eq!(r.count, 5);
    assert!(!r.more);
    let r = h.range(RangeRequest {
        keys_only: true,
        ..all("a", "c")
    });
    assert_eq!(keys(&r), ["a", "b"]);
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
    assert_eq!(r.kvs[0].version, 2);
    // Count is of the keys at the requested revision.
    let r = h.range(RangeRequest {
        revision: 4,
        ..all("a", "f")
    });
    assert_eq!(
        (keys(&r), r.count),
        (vec!["a".to_string(), "c".into(), "e".into()], 3)
    );
}

#[test]
fn range_sorts_then_truncates() {
    use range_request::{SortOrder, SortTarget};
    use SortOrder::{Ascend, Descend};
    use SortTarget::*;
    let h = range_fixture();
    // (target, order, limit) -> the keys, in order, and whether more were cut; count is always 5.
    let cases: [(SortTarget, SortOrder, i64, &[&str], bool); 10] = [
        (Key, Descend, 2, &["e", "d"], true),
        (Key, Ascend, 0, &["a", "b", "c", "d", "e"], false),
        // Values: a=5 b=4 c=3 d=2 e=1.
        (Value, Ascend, 3, &["e", "d", "c"], true),
        (Value, Descend, 1, &["a"], true),
        // Create revisions: c=2 a=3 e=4 b=5 d=6.
        (Create, Ascend, 0, &["c", "a", "e", "b", "d"], false),
        (Create, Descend, 2, &["d", "b"], true),
        // Mod revisions: c=2 e=4 b=5 a=7 d=9; a target without an order sorts ascending.
        (Mod, SortOrder::None, 0, &["c", "e", "b", "a", "d"], false),
        (Mod, Descend, 0, &["d", "a", "b", "e", "c"], false),
        // Versions: d=3, a=2, others 1; ties stay in key order.
        (Version, Descend, 0, &["d", "a", "b", "c", "e"], false),
        (Version, Ascend, 2, &["b", "c"], true),
    ];
    for (target, order, limit, expected, more) in cases {
        let r = h.range(RangeRequest {
            sort_target: target as i32,
            sort_order: order as i32,
            limit,
            ..all("a", "f")
        });
        assert_eq!(
            (keys(&r), r.more, r.count),
            (expected.iter().map(|k| k.to_string()).collect(), more, 5),
            "sorted by {target:?} {order:?}, limit {limit}"
        );
    }
}

#[test]
fn range_revision_filters() {
    let h = range_fixture();
    let r = h.range(RangeRequest {
        min_mod_revision: 5,
        ..all("a", "f")
    });
    assert_eq!(keys(&r), ["a", "b", "d"]);
    assert_eq!(r.count, 5, "count is before filtering, as in etcd");
    let r = h.range(RangeRequest {
        max_mod_revision: 4,
        ..all("a", "f")
    });
    assert_eq!(keys(&r), ["c", "e"]);
    let r = h.range(RangeRequest {
        min_create_revision: 4,
        max_create_revision: 5,
        ..all("a", "f")
    });
    assert_eq!(keys(&r), ["b", "e"]);
    // Filters disable the fetch limit, and `more` is judged after filtering. (min create, max
    // create, limit) -> keys, more; 0 is no bound.
    let cases: [(i64, i64, i64, &[&str], bool); 2] = [
        (3, 0, 3, &["a", "b", "d"], true),
        (0, 3, 2, &["a", "c"], false),
    ];
    for (min_create_revision, max_create_revision, limit, expected, more) in cases {
        let r = h.range(RangeRequest {
            min_create_revision,
            max_create_revision,
            limit,
            ..all("a", "f")
        });
        assert_eq!(
            (keys(&r), r.more),
            (expected.iter().map(|k| k.to_string()).collect(), more),
            "create revisions [{min_create_revision}, {max_create_revision}], limit {limit}"
        );
    }
}

/// Every combination of the options that decide between stored encodings and decoded
/// key-values gives the same answer both ways (`Harness::range` compares them), and the plain
/// ones do take the stored encodings.
#[test]
fn the_wire_range_answers_what_the_decoded_range_answers() {
    use range_request::{SortOrder, SortTarget};
    let mut h = range_fixture();
    h.del("e", ""); // 11
    h.put("b", "44"); // 12
    let mut plain = 0;
    for (key, end) in [("a", ""), ("a", "e"), ("\0", "\0"), ("c", "\0"), ("x", "y")] {
        for limit in [0, 1, 2, 3, 10] {
            for revision in [0, 5, 9, 11] {
                for (sort_order, sort_target) in [
                    (SortOrder::None, SortTarget::Key),
                    (SortOrder::Ascend, SortTarget::Key),
                    (SortOrder::Descend, SortTarget::Key),
                    (SortOrder::None, SortTarget::Value),
                    (SortOrder::Descend, SortTarget::Mod),
                ] {
                    for (keys_only, count_only, min_mod_revision) in [
                        (false, false, 0),
                        (true, false, 0),
                        (false, true, 0),
                        (false, false, 6),
                    ] {
                        let req = RangeRequest {
                            limit,
                            revision,
                            sort_order: sort_order as i32,
                            sort_target: sort_target as i32,
                            keys_only,
                            count_only,
                            min_mod_revision,
                            ..all(key, end)
                        };
                        let resp = h.range(req.clone());
                        let (frame, _) = h.store.range_frame_with_revision(&req).unwrap();
                        if crate::txn::takes_stored_encodings(&req) {
                            plain += 1;
                            assert!(frame.head.kvs.is_empty(), "{req:?}");
                            assert_eq!(frame.encoded.len(), resp.kvs.len(), "{req:?}");
                        } else {
                            assert!(frame.encoded.is_empty(), "{req:?}");
                        }
                    }
                }
            }
        }
    }
    assert!(plain > 0);
}

/// Over an engine whose reads copy, a value is read from the engine once and then answered from
/// the store's cache, at any revision that sees it; a store opened again starts with none.
#[test]
fn values_read_again_are_answered_from_the_cache() {
    let copying = Copying::new();
    let reads = copying.value_reads.clone();
    let mut h = Harness::on(Arc::new(copying));
    for (k, v) in [("a", "1"), ("b", "2"), ("c", "3")] {
        h.put(k, v); // 2, 3, 4
    }
    let read = |h: &Harness, req: RangeRequest| {
        let before = reads.load(Ordering::Relaxed);
        let resp = h.range(req);
        (
            resp.kvs
                .iter()
                .map(|kv| kv.value.clone())
                .collect::<Vec<_>>(),
            reads.load(Ordering::Relaxed) - before,
        )
    };
    let values = |vs: &[&str]| vs.iter().map(|v| v.as_bytes().to_vec()).collect::<Vec<_>>();
    // `Harness::range` reads twice (decoded and for the wire): the second is the cache's.
    assert_eq!(read(&h, all("a", "z")), (values(&["1", "2", "3"]), 3));
    assert_eq!(read(&h, all("a", "z")), (values(&["1", "2", "3"]), 0));
    h.put("b", "22"); // 5
    assert_eq!(read(&h, all("a", "z")), (values(&["1", "22", "3"]), 1));
    let at_4 = RangeRequest {
        revision: 4,
        ..all("a", "z")
    };
    assert_eq!(read(&h, at_4), (values(&["1", "2", "3"]), 0));
    // A compaction removes revision 3 from the engine; no read at 5 or later asks for it.
    h.compact(5).unwrap();
    assert_eq!(read(&h, all("a", "z")), (values(&["1", "22", "3"]), 0));
    // Values read inside a write txn (here a put's previous key-value) go through it too.
    let prev = h
        .apply(WriteRequest::Put(PutRequest {
            prev_kv: true,
            ..put_req("c", "33")
        }))
        .unwrap();
    match prev.response {
        WriteResponse::Put(p) => assert_eq!(p.prev_kv.unwrap().value, b"3"),
        other => panic!("{other:?}"),
    }
    assert_eq!(reads.load(Ordering::Relaxed), 4);
    // A new store (as after a restore from a snapshot) reads from the engine again.
    h.store = h.reopen();
    assert_eq!(read(&h, all("a", "z")), (values(&["1", "22", "33"]), 3));
}
