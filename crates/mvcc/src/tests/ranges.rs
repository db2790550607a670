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
    let h = range_fixture();
    let sorted = |target: SortTarget, order: SortOrder, limit: i64| {
        let r = h.range(RangeRequest {
            sort_target: target as i32,
            sort_order: order as i32,
            limit,
            ..all("a", "f")
        });
        (keys(&r), r.more, r.count)
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        sorted(SortTarget::Key, SortOrder::Descend, 2),
        (s(&["e", "d"]), true, 5)
    );
    assert_eq!(
        sorted(SortTarget::Key, SortOrder::Ascend, 0),
        (s(&["a", "b", "c", "d", "e"]), false, 5)
    );
    // Values: a=5 b=4 c=3 d=2 e=1.
    assert_eq!(
        sorted(SortTarget::Value, SortOrder::Ascend, 3),
        (s(&["e", "d", "c"]), true, 5)
    );
    assert_eq!(
        sorted(SortTarget::Value, SortOrder::Descend, 1),
        (s(&["a"]), true, 5)
    );
    // Create revisions: c=2 a=3 e=4 b=5 d=6.
    assert_eq!(
        sorted(SortTarget::Create, SortOrder::Ascend, 0),
        (s(&["c", "a", "e", "b", "d"]), false, 5)
    );
    assert_eq!(
        sorted(SortTarget::Create, SortOrder::Descend, 2),
        (s(&["d", "b"]), true, 5)
    );
    // Mod revisions: c=2 e=4 b=5 a=7 d=9; a target without an order sorts ascending.
    assert_eq!(
        sorted(SortTarget::Mod, SortOrder::None, 0),
        (s(&["c", "e", "b", "a", "d"]), false, 5)
    );
    assert_eq!(
        sorted(SortTarget::Mod, SortOrder::Descend, 0),
        (s(&["d", "a", "b", "e", "c"]), false, 5)
    );
    // Versions: d=3, a=2, others 1; ties stay in key order.
    assert_eq!(
        sorted(SortTarget::Version, SortOrder::Descend, 0),
        (s(&["d", "a", "b", "c", "e"]), false, 5)
    );
    assert_eq!(
        sorted(SortTarget::Version, SortOrder::Ascend, 2),
        (s(&["b", "c"]), true, 5)
    );
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
    // Filters disable the fetch limit, and `more` is judged after filtering.
    let r = h.range(RangeRequest {
        min_create_revision: 3,
        limit: 3,
        ..all("a", "f")
    });
    assert_eq!(
        (keys(&r), r.more),
        (vec!["a".to_string(), "b".into(), "d".into()], true)
    );
    let r = h.range(RangeRequest {
        max_create_revision: 3,
        limit: 2,
        ..all("a", "f")
    });
    assert_eq!(
        (keys(&r), r.more),
        (vec!["a".to_string(), "c".into()], false)
    );
}
