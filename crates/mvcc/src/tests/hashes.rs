//! `HashKV`: etcd's golden values by revision and at the last revision, the same hash across a
//! compaction, and what changes it.

use super::*;

/// A store fed the same ops as etcd's `TestHashByRevValue`.
fn pick_key(i: i64) -> &'static str {
    const CYCLE: i64 = 71;
    if i % (CYCLE * 2) == 30 {
        return "zenek";
    }
    if i % CYCLE == 30 {
        return "xavery";
    }
    [
        "alice",
        "bob",
        "celine",
        "dominik",
        "eve",
        "frederica",
        "gorge",
    ][(i % 7) as usize]
}

fn put_kvs(h: &mut Harness, rev: i64, count: i64) {
    for i in rev..=rev + count {
        h.put(pick_key(i), &i.to_string());
    }
}

#[test]
fn hash_by_rev_matches_etcd_golden_values() {
    // Expected values from etcd v3.5 server/mvcc/hash_test.go (TestHashByRevValue).
    let expected: [(u32, i64, i64); 19] = [
        (4082599214, -1, 35),
        (2279933401, 35, 106),
        (3284231217, 106, 177),
        (126286495, 177, 248),
        (900108730, 248, 319),
        (2475485232, 319, 390),
        (1226296507, 390, 461),
        (2503661030, 461, 532),
        (4155130747, 532, 603),
        (106915399, 603, 674),
        (406914006, 674, 745),
        (1882211381, 745, 816),
        (806177088, 816, 887),
        (664311366, 887, 958),
        (1496914449, 958, 1029),
        (2434525091, 1029, 1100),
        (3988652253, 1100, 1171),
        (1122462288, 1171, 1242),
        (724436716, 1242, 1883),
    ];
    let mut h = Harness::new();
    let mut got = Vec::new();
    let mut hash_then_compact = |h: &mut Harness, rev: i64| {
        let hash = h.store.hash_kv(rev).unwrap();
        got.push((hash.hash, hash.compact_revision, hash.hash_revision));
        h.compact(rev).unwrap();
    };
    let mut rev = 0;
    while rev < 1210 {
        put_kvs(&mut h, rev, 71);
        hash_then_compact(&mut h, rev + 71 / 2);
        rev += 71;
    }
    put_kvs(&mut h, rev, 1210);
    hash_then_compact(&mut h, rev + 1210 / 2);
    assert_eq!(got, expected);
}

#[test]
fn hash_at_last_revision_matches_etcd_golden_values() {
    // Expected values from etcd v3.5 (TestHashByRevValueLastRevision).
    let expected: [(u32, i64, i64); 19] = [
        (1913897190, -1, 73),
        (224860069, 73, 145),
        (1565167519, 145, 217),
        (1566261620, 217, 289),
        (2037173024, 289, 361),
        (691659396, 361, 433),
        (2713730748, 433, 505),
        (3919322507, 505, 577),
        (769967540, 577, 649),
        (2909194793, 649, 721),
        (1576921157, 721, 793),
        (4067701532, 793, 865),
        (2226384237, 865, 937),
        (2923408134, 937, 1009),
        (2680329256, 1009, 1081),
        (1546717673, 1081, 1153),
        (2713657846, 1153, 1225),
        (1046575299, 1225, 1297),
        (2017735779, 1297, 2508),
    ];
    let mut h = Harness::new();
    let mut got = Vec::new();
    let mut rev = 0;
    let mut step = |h: &mut Harness| {
        let hash = h.store.hash_kv(0).unwrap();
        got.push((hash.hash, hash.compact_revision, hash.hash_revision));
        h.compact(hash.hash_revision).unwrap();
    };
    while rev < 1210 {
        put_kvs(&mut h, rev, 71);
        step(&mut h);
        rev += 71;
    }
    put_kvs(&mut h, rev, 1210);
    step(&mut h);
    assert_eq!(got, expected);
}

#[test]
fn hash_is_the_same_before_and_after_compaction() {
    // etcd's testutil.TestCompactionHash, deletions included.
    let mut h = Harness::new();
    let check = |h: &mut Harness, start: i64, stop: i64| {
        for i in start..=stop {
            if i % 67 == 0 {
                h.del(pick_key(i + 83), "");
            } else {
                h.put(pick_key(i), &i.to_string());
            }
        }
        let before = h.store.hash_kv(stop).unwrap();
        h.compact(stop).unwrap();
        let after = h.store.hash_kv(stop).unwrap();
        assert_eq!(before, after, "rev {stop}");
    };
    let mut rev = 0;
    while rev < 1210 {
        check(&mut h, rev, rev + 71);
        rev += 71;
    }
    check(&mut h, rev, rev + 1210);
}

#[test]
fn hash_kv_layout_identity_changes_and_errors() {
    let mut a = Harness::new();
    let mut b = Harness::new();
    for h in [&mut a, &mut b] {
        h.put("a", "1"); // 2
    }
    // One revision, computed by hand: seed "key", revision key, marshalled KeyValue.
    let kv_bytes = [0x0a, 1, b'a', 0x10, 2, 0x18, 2, 0x20, 1, 0x2a, 1, b'1'];
    let mut expected = crc32c::crc32c(b"key");
    expected = crc32c::crc32c_append(expected, &Revision::new(2, 0).to_key(false));
    expected = crc32c::crc32c_append(expected, &kv_bytes);
    let ha = a.store.hash_kv(0).unwrap();
    assert_eq!(
        ha,
        HashKv {
            hash: expected,
            compact_revision: -1,
            hash_revision: 2,
            current_revision: 2
        }
    );
    assert_eq!(a.store.hash_kv(1).unwrap().hash, crc32c::crc32c(b"key"));

    for h in [&mut a, &mut b] {
        h.put("b", "2"); // 3
        h.del("a", ""); // 4
        h.put("c", "3"); // 5
    }
    assert_eq!(a.store.hash_kv(0).unwrap(), b.store.hash_kv(0).unwrap());
    assert_eq!(a.store.hash_kv(3).unwrap(), b.store.hash_kv(3).unwrap());
    assert_ne!(
        a.store.hash_kv(3).unwrap().hash,
        a.store.hash_kv(4).unwrap().hash
    );

    a.compact(4).unwrap();
    b.compact(4).unwrap();
    assert_eq!(a.store.hash_kv(0).unwrap(), b.store.hash_kv(0).unwrap());
    assert_eq!(a.store.hash_kv(0).unwrap().compact_revision, 4);
    assert!(matches!(a.store.hash_kv(3), Err(MvccError::Compacted)));
    assert!(matches!(a.store.hash_kv(6), Err(MvccError::FutureRev)));

    // Content changes change the hash; the same change on both restores agreement.
    a.put("c", "x");
    assert_ne!(
        a.store.hash_kv(0).unwrap().hash,
        b.store.hash_kv(5).unwrap().hash
    );
    b.put("c", "y");
    assert_ne!(
        a.store.hash_kv(0).unwrap().hash,
        b.store.hash_kv(0).unwrap().hash
    );
    assert_eq!(a.store.hash_kv(5).unwrap(), b.store.hash_kv(5).unwrap());
}
