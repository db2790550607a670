//! Revisions, versions and reads of the past: a fresh store, put/delete/re-put, range at an old
//! revision, and history listed as events.

use super::*;

#[test]
fn empty_store_starts_at_revision_one() {
    let h = Harness::new();
    assert_eq!(h.store.current_revision(), 1);
    assert_eq!(h.store.compact_revision(), -1);
    assert_eq!(h.store.consistent_index(), 0);
    let resp = h.range(RangeRequest {
        key: b"\0".to_vec(),
        range_end: b"\0".to_vec(),
        ..Default::default()
    });
    assert_eq!(resp.count, 0);
    assert!(resp.kvs.is_empty());
}

#[test]
fn revisions_and_versions_across_put_delete_reput() {
    let mut h = Harness::new();
    let a = h.put("a", "1");
    assert_eq!(a.revision, 2);
    assert_eq!(
        h.get("a"),
        Some(KeyValue {
            key: b"a".to_vec(),
            value: b"1".to_vec(),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            lease: 0
        })
    );
    assert_eq!(h.put("a", "2").revision, 3);
    let kv = h.get("a").unwrap();
    assert_eq!(
        (
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.value.as_slice()
        ),
        (2, 3, 2, b"2".as_slice())
    );
    assert_eq!(h.put("b", "x").revision, 4);

    let d = h.del("a", "");
    assert_eq!(d.revision, 5);
    match &d.response {
        WriteResponse::DeleteRange(r) => {
            assert_eq!(r.deleted, 1);
            assert!(r.header.is_none());
            assert_eq!(r.prev_kvs.len(), 1);
            assert_eq!(r.prev_kvs[0].value, b"2");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.get("a"), None);

    // Deleting nothing does not bump the revision but still records the applied index.
    let none = h.del("a", "");
    assert_eq!(none.revision, 5);
    assert!(none.events.is_empty());
    assert_eq!(h.store.current_revision(), 5);
    assert_eq!(h.store.consistent_index(), 5);

    // Re-creating starts a new generation: version 1, new create revision.
    assert_eq!(h.put("a", "3").revision, 6);
    let kv = h.get("a").unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (6, 6, 1));

    assert_eq!(
        h.stored_revisions(),
        vec![
            (2, 0, false),
            (3, 0, false),
            (4, 0, false),
            (5, 0, true),
            (6, 0, false)
        ]
    );
}

#[test]
fn history_reads_at_old_revisions() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.put("a", "2"); // 3
    h.del("a", ""); // 4
    h.put("a", "3"); // 5
    assert_eq!(h.get_at("a", 1).unwrap(), None);
    assert_eq!(h.get_at("a", 2).unwrap().unwrap().value, b"1");
    let at3 = h.get_at("a", 3).unwrap().unwrap();
    assert_eq!(
        (at3.value.as_slice(), at3.version, at3.mod_revision),
        (b"2".as_slice(), 2, 3)
    );
    assert_eq!(h.get_at("a", 4).unwrap(), None);
    assert_eq!(h.get_at("a", 5).unwrap().unwrap().value, b"3");
    assert!(matches!(h.get_at("a", 6), Err(MvccError::FutureRev)));
    // The header revision is the store's, not the requested one.
    let (resp, rev) = h
        .store
        .range_with_revision(&RangeRequest {
            key: b"a".to_vec(),
            revision: 2,
            ..Default::default()
        })
        .unwrap();
    assert_eq!((resp.count, rev), (1, 5));
    assert!(resp.header.is_none());
}

#[test]
fn history_lists_changes_as_events() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.txn(TxnRequest {
        compare: vec![],
        success: vec![op_put("b", "1"), op_del("a", "")],
        failure: vec![],
    })
    .unwrap(); // 3
    h.put("c", "1"); // 4
    let events = h.store.history(3, 100, 0).unwrap();
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                e.r#type,
                String::from_utf8(kv.key.clone()).unwrap(),
                kv.mod_revision,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (EventType::Put as i32, "b".to_string(), 3),
            (EventType::Delete as i32, "a".to_string(), 3),
            (EventType::Put as i32, "c".to_string(), 4)
        ]
    );
    // A limit never splits a revision.
    assert_eq!(h.store.history(2, 4, 2).unwrap().len(), 3);
    assert_eq!(h.store.history(2, 4, 1).unwrap().len(), 1);
    h.compact(3).unwrap();
    assert!(matches!(
        h.store.history(2, 4, 0),
        Err(MvccError::Compacted)
    ));
    assert_eq!(
        h.store.history(3, 4, 0).unwrap().len(),
        3,
        "the deletion at the compact revision survives"
    );
}
