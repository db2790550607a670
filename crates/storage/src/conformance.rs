//! The conformance kit: behaviour every [`Backend`](crate::Backend) must show.
//!
//! An engine's test suite calls [`backend_conformance!`](crate::backend_conformance) with a factory
//! that opens a fresh, empty backend holding the given buckets; the macro expands to one `#[test]`
//! per check so that a failure names the behaviour that broke.

use std::sync::Arc;

use crate::{Backend, ScanRange, StorageError, Visit, WriteBatch};

/// Buckets every check opens its backend with.
pub const BUCKETS: &[&str] = &["alpha", "beta"];
const A: &str = "alpha";
const B: &str = "beta";

/// Opens a fresh, empty backend with [`BUCKETS`]. The second value keeps temporary files alive.
pub type Factory<'a> = &'a dyn Fn() -> (Arc<dyn Backend>, Box<dyn std::any::Any>);

fn put(be: &dyn Backend, bucket: &'static str, k: &[u8], v: &[u8]) {
    let mut b = WriteBatch::new();
    b.put(bucket, k, v);
    be.write(b).expect("write");
}

fn keys(be: &dyn Backend, bucket: &str, range: ScanRange<'_>) -> Vec<Vec<u8>> {
    let view = be.snapshot().expect("snapshot");
    view.collect(bucket, range)
        .expect("scan")
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// Puts, gets, overwrites and deletes are visible in the right bucket only.
pub fn basic_put_get_delete(open: Factory<'_>) {
    let (be, _g) = open();
    put(&*be, A, b"k1", b"v1");
    put(&*be, B, b"k1", b"other");
    let view = be.snapshot().unwrap();
    assert_eq!(view.get(A, b"k1").unwrap().as_deref(), Some(&b"v1"[..]));
    assert_eq!(view.get(B, b"k1").unwrap().as_deref(), Some(&b"other"[..]));
    assert_eq!(view.get(A, b"missing").unwrap(), None);
    put(&*be, A, b"k1", b"v2");
    let mut del = WriteBatch::new();
    del.delete(B, b"k1");
    del.delete(B, b"never-there");
    be.write(del).unwrap();
    let view = be.snapshot().unwrap();
    assert_eq!(view.get(A, b"k1").unwrap().as_deref(), Some(&b"v2"[..]));
    assert_eq!(view.get(B, b"k1").unwrap(), None);
    // empty keys and values are ordinary data
    put(&*be, A, b"", b"");
    assert_eq!(
        be.snapshot().unwrap().get(A, b"").unwrap().as_deref(),
        Some(&b""[..])
    );
}

/// A shared value is the value `get` answers, and keeps it after the view is dropped and the
/// pair is overwritten, deleted, or its neighbours rewritten.
pub fn shared_values_outlive_their_view_and_later_writes(open: Factory<'_>) {
    let (be, _g) = open();
    let value = |i: usize| format!("value {i} ").repeat(1 + i % 300).into_bytes();
    let mut batch = WriteBatch::new();
    for i in 0..200 {
        batch.put(A, format!("k{i:03}").as_bytes(), value(i));
    }
    be.write(batch).unwrap();
    let view = be.snapshot().unwrap();
    let shared: Vec<_> = (0..200)
        .map(|i| {
            let key = format!("k{i:03}");
            let got = view.get_shared(A, key.as_bytes()).unwrap().unwrap();
            assert_eq!(Some(got.to_vec()), view.get(A, key.as_bytes()).unwrap());
            got
        })
        .collect();
    assert_eq!(view.get_shared(A, b"missing").unwrap(), None);
    assert_eq!(view.get_shared(B, b"k000").unwrap(), None);
    drop(view);
    let mut batch = WriteBatch::new();
    for i in 0..200 {
        let key = format!("k{i:03}");
        match i % 3 {
            0 => batch.put(A, key.as_bytes(), b"overwritten"),
            1 => batch.delete(A, key.as_bytes()),
            _ => batch.put(A, format!("{key}/next").as_bytes(), value(i + 1)),
        }
    }
    be.write(batch).unwrap();
    be.defragment().unwrap();
    for (i, got) in shared.iter().enumerate() {
        assert_eq!(got[..], value(i)[..], "k{i:03}");
    }
}

/// Many values read at once are each key's value at the view, in the order asked, whatever
/// that order (repeats and missing keys included), and outlive the view and later writes.
pub fn many_shared_values_are_each_keys_value_at_the_view(open: Factory<'_>) {
    let (be, _g) = open();
    // Values of several sizes, so that the memory engine's blocks hold one or many.
    let value = |i: usize| {
        format!("value {i} ")
            .repeat(1 + (i * 37) % 900)
            .into_bytes()
    };
    let mut batch = WriteBatch::new();
    for i in 0..300 {
        batch.put(A, format!("k{i:03}").as_bytes(), value(i));
        batch.put(B, format!("k{i:03}").as_bytes(), b"other bucket");
    }
    be.write(batch).unwrap();
    let view = be.snapshot().unwrap();
    // Written after the view was taken: invisible to it.
    let mut later = WriteBatch::new();
    for i in (0..300).step_by(7) {
        later.put(A, format!("k{i:03}").as_bytes(), b"later");
    }
    later.put(A, b"k150a", b"later too");
    be.write(later).unwrap();
    let expected = |key: &str| view.get(A, key.as_bytes()).unwrap();
    let ascending: Vec<String> = (0..300).map(|i| format!("k{i:03}")).collect();
    let mixed: Vec<String> = [
        "k299", "k000", "k150a", "k150", "k150", "missing", "k001", "", "k000", "k298", "k002",
    ]
    .iter()
    .map(|k| k.to_string())
    .chain((0..300).rev().step_by(3).map(|i| format!("k{i:03}")))
    .collect();
    let mut kept = Vec::new();
    for keys in [&ascending, &mixed, &Vec::new()] {
        let asked: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let got = view.get_shared_many(A, &asked).unwrap();
        assert_eq!(got.len(), keys.len());
        for (key, got) in keys.iter().zip(&got) {
            assert_eq!(got.as_ref().map(|v| v.to_vec()), expected(key), "{key:?}");
        }
        kept.push((keys.clone(), got));
    }
    assert!(view.get_shared_many("no-such-bucket", &[b"k000"]).is_err());
    let expected: Vec<Vec<Option<Vec<u8>>>> = kept
        .iter()
        .map(|(keys, _)| keys.iter().map(|k| expected(k)).collect())
        .collect();
    drop(view);
    let mut batch = WriteBatch::new();
    for i in 0..300 {
        match i % 2 {
            0 => batch.delete(A, format!("k{i:03}").as_bytes()),
            _ => batch.put(A, format!("k{i:03}").as_bytes(), b"overwritten"),
        }
    }
    be.write(batch).unwrap();
    be.defragment().unwrap();
    for ((keys, got), expected) in kept.iter().zip(expected) {
        let got: Vec<Option<Vec<u8>>> =
            got.iter().map(|v| v.as_ref().map(|v| v.to_vec())).collect();
        assert_eq!(got, expected, "{keys:?}");
    }
}

/// A bucket the backend was not opened with is an error, never a silent no-op.
pub fn unknown_bucket_is_an_error(open: Factory<'_>) {
    let (be, _g) = open();
    let mut b = WriteBatch::new();
    b.put("gamma", b"k", b"v");
    assert!(matches!(be.write(b), Err(StorageError::UnknownBucket(_))));
    let view = be.snapshot().unwrap();
    assert!(matches!(
        view.get("gamma", b"k"),
        Err(StorageError::UnknownBucket(_))
    ));
    let mut buckets = be.buckets();
    buckets.sort();
    assert_eq!(buckets, BUCKETS.to_vec());
}

/// A batch applies across buckets as one; inside a batch the last change to a key wins; a batch
/// with an unknown bucket applies nothing.
pub fn batch_is_atomic_across_buckets(open: Factory<'_>) {
    let (be, _g) = open();
    let mut b = WriteBatch::new();
    b.put(A, b"x", b"1");
    b.put(B, b"y", b"2");
    b.put(A, b"x", b"3");
    b.put(A, b"z", b"4");
    b.delete(A, b"z");
    be.write(b).unwrap();
    let view = be.snapshot().unwrap();
    assert_eq!(view.get(A, b"x").unwrap().as_deref(), Some(&b"3"[..]));
    assert_eq!(view.get(B, b"y").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(view.get(A, b"z").unwrap(), None);

    let mut bad = WriteBatch::new();
    bad.put(A, b"new", b"1");
    bad.put("nope", b"k", b"v");
    assert!(be.write(bad).is_err());
    assert_eq!(be.snapshot().unwrap().get(A, b"new").unwrap(), None);
}

/// A snapshot taken before a batch does not see it, and keeps its view while writes go on.
pub fn snapshot_is_isolated_from_later_writes(open: Factory<'_>) {
    let (be, _g) = open();
    put(&*be, A, b"a", b"old");
    put(&*be, A, b"b", b"old");
    let before = be.snapshot().unwrap();
    let mut b = WriteBatch::new();
    b.put(A, b"a", b"new");
    b.delete(A, b"b");
    b.put(A, b"c", b"new");
    b.put(B, b"d", b"new");
    be.write(b).unwrap();
    assert_eq!(before.get(A, b"a").unwrap().as_deref(), Some(&b"old"[..]));
    assert_eq!(before.get(A, b"b").unwrap().as_deref(), Some(&b"old"[..]));
    assert_eq!(before.get(A, b"c").unwrap(), None);
    assert_eq!(before.get(B, b"d").unwrap(), None);
    let scanned = before.collect(A, ScanRange::all()).unwrap();
    assert_eq!(
        scanned,
        vec![
            (b"a".to_vec(), b"old".to_vec()),
            (b"b".to_vec(), b"old".to_vec())
        ]
    );
    let after = be.snapshot().unwrap();
    assert_eq!(after.get(A, b"a").unwrap().as_deref(), Some(&b"new"[..]));
    assert_eq!(after.get(A, b"b").unwrap(), None);
}

/// A snapshot stays stable while another thread keeps writing.
pub fn snapshot_stable_under_concurrent_writes(open: Factory<'_>) {
    let (be, _g) = open();
    for i in 0..100u32 {
        put(&*be, A, &i.to_be_bytes(), b"v0");
    }
    let view = be.snapshot().unwrap();
    let writer = {
        let be = be.clone();
        std::thread::spawn(move || {
            for round in 1..=20u32 {
                let mut b = WriteBatch::new();
                for i in 0..100u32 {
                    b.put(
                        A,
                        i.to_be_bytes().to_vec(),
                        format!("v{round}").into_bytes(),
                    );
                }
                b.put(A, (1000 + round).to_be_bytes().to_vec(), b"extra".to_vec());
                be.write(b).unwrap();
            }
        })
    };
    for _ in 0..20 {
        let pairs = view.collect(A, ScanRange::all()).unwrap();
        assert_eq!(pairs.len(), 100);
        assert!(pairs.iter().all(|(_, v)| v == b"v0"));
    }
    writer.join().unwrap();
    let latest = be.snapshot().unwrap().collect(A, ScanRange::all()).unwrap();
    assert_eq!(latest.len(), 120);
    assert!(latest[..100].iter().all(|(_, v)| v == b"v20"));
}

/// Forward and reverse scans honour bounds, open ends and limits; the visitor can stop early.
pub fn range_scans(open: Factory<'_>) {
    let (be, _g) = open();
    let mut b = WriteBatch::new();
    for k in ["a", "b", "ba", "bb", "c", "d"] {
        b.put(A, k.as_bytes(), k.as_bytes());
    }
    b.put(B, b"b", b"not in alpha");
    be.write(b).unwrap();
    let s = |v: Vec<Vec<u8>>| {
        v.into_iter()
            .map(|k| String::from_utf8(k).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        s(keys(&*be, A, ScanRange::all())),
        ["a", "b", "ba", "bb", "c", "d"]
    );
    assert_eq!(
        s(keys(&*be, A, ScanRange::between(b"b", Some(b"c")))),
        ["b", "ba", "bb"]
    );
    assert_eq!(
        s(keys(
            &*be,
            A,
            ScanRange::between(b"b", Some(b"c")).reverse()
        )),
        ["bb", "ba", "b"]
    );
    assert_eq!(
        s(keys(&*be, A, ScanRange::between(b"b", None).limit(2))),
        ["b", "ba"]
    );
    assert_eq!(
        s(keys(
            &*be,
            A,
            ScanRange::between(b"b", None).reverse().limit(2)
        )),
        ["d", "c"]
    );
    assert_eq!(
        s(keys(&*be, A, ScanRange::all().reverse())),
        ["d", "c", "bb", "ba", "b", "a"]
    );
    assert_eq!(
        s(keys(&*be, A, ScanRange::between(b"bz", Some(b"c")))),
        Vec::<String>::new()
    );
    assert_eq!(
        s(keys(&*be, A, ScanRange::between(b"c", Some(b"b")))),
        Vec::<String>::new()
    );
    assert_eq!(
        s(keys(&*be, A, ScanRange::between(b"c", Some(b"c")))),
        Vec::<String>::new()
    );
    // the end bound is exclusive in reverse too
    assert_eq!(
        s(keys(
            &*be,
            A,
            ScanRange::between(b"a", Some(b"bb")).reverse()
        )),
        ["ba", "b", "a"]
    );

    let view = be.snapshot().unwrap();
    let mut seen = Vec::new();
    let visited = view
        .scan(A, ScanRange::all(), &mut |k, _| {
            seen.push(k.to_vec());
            if seen.len() == 3 {
                Visit::Stop
            } else {
                Visit::Continue
            }
        })
        .unwrap();
    assert_eq!(visited, 3);
    assert_eq!(seen.len(), 3);
}

/// Export then import into another backend gives byte-for-byte the same stream; the import
/// replaces what the target held.
pub fn export_import_round_trip(open: Factory<'_>) {
    let (src, _g1) = open();
    let mut b = WriteBatch::new();
    for i in 0..500u32 {
        b.put(
            A,
            format!("key-{i:05}").into_bytes(),
            vec![(i % 251) as u8; (i % 64) as usize],
        );
    }
    b.put(B, b"meta", b"value");
    b.put(B, b"", b"empty key");
    src.write(b).unwrap();
    let mut stream = Vec::new();
    let written = crate::export_snapshot(&*src.snapshot().unwrap(), BUCKETS, &mut stream).unwrap();
    assert_eq!(written as usize, stream.len());

    let (dst, _g2) = open();
    put(&*dst, A, b"stale", b"must disappear");
    put(&*dst, B, b"zzz", b"must disappear");
    dst.import(&mut &stream[..]).unwrap();
    let mut again = Vec::new();
    crate::export_snapshot(&*dst.snapshot().unwrap(), BUCKETS, &mut again).unwrap();
    assert_eq!(stream, again);
    let view = dst.snapshot().unwrap();
    assert_eq!(view.get(A, b"stale").unwrap(), None);
    assert_eq!(view.get(B, b"zzz").unwrap(), None);
    assert_eq!(
        view.get(B, b"").unwrap().as_deref(),
        Some(&b"empty key"[..])
    );
    assert_eq!(view.collect(A, ScanRange::all()).unwrap().len(), 500);
}

/// A damaged or truncated stream is refused and the previous content stays.
pub fn bad_import_keeps_previous_content(open: Factory<'_>) {
    let (src, _g1) = open();
    for i in 0..50u32 {
        put(&*src, A, &i.to_be_bytes(), b"from source");
    }
    let mut stream = Vec::new();
    crate::export_snapshot(&*src.snapshot().unwrap(), BUCKETS, &mut stream).unwrap();

    let (dst, _g2) = open();
    put(&*dst, A, b"keep", b"me");
    let mut flipped = stream.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    assert!(dst.import(&mut &flipped[..]).is_err());
    let truncated = &stream[..stream.len() - 3];
    assert!(dst.import(&mut &truncated[..]).is_err());
    assert!(dst.import(&mut &b"garbage"[..]).is_err());
    let view = dst.snapshot().unwrap();
    assert_eq!(
        view.collect(A, ScanRange::all()).unwrap(),
        vec![(b"keep".to_vec(), b"me".to_vec())]
    );
}

/// Size figures are consistent and follow the data: in use never exceeds the total, both grow
/// with writes, and deleting most data then defragmenting makes the in-use figure drop while the
/// remaining data stays readable.
pub fn sizes_and_defragment(open: Factory<'_>) {
    let (be, _g) = open();
    let empty = be.size().unwrap();
    assert!(empty.size_in_use_bytes <= empty.size_bytes);
    let value = vec![0x5au8; 1024];
    for chunk in 0..8u32 {
        let mut b = WriteBatch::new();
        for i in 0..512u32 {
            b.put(A, format!("k{chunk:02}-{i:04}").into_bytes(), value.clone());
        }
        be.write(b).unwrap();
    }
    let full = be.size().unwrap();
    assert!(full.size_in_use_bytes <= full.size_bytes, "{full:?}");
    assert!(
        full.size_in_use_bytes >= 2 * 1024 * 1024,
        "4 MiB written, in use {full:?}"
    );
    for chunk in 0..8u32 {
        let mut b = WriteBatch::new();
        for i in 0..512u32 {
            if !(chunk == 0 && i < 16) {
                b.delete(A, format!("k{chunk:02}-{i:04}").into_bytes());
            }
        }
        be.write(b).unwrap();
    }
    be.defragment().unwrap();
    let after = be.size().unwrap();
    assert!(after.size_in_use_bytes <= after.size_bytes, "{after:?}");
    assert!(
        after.size_in_use_bytes < full.size_in_use_bytes / 4,
        "in use before {full:?}, after delete+defragment {after:?}"
    );
    let left = be.snapshot().unwrap().collect(A, ScanRange::all()).unwrap();
    assert_eq!(left.len(), 16);
    assert!(left.iter().all(|(_, v)| v == &value));
}

/// Defragmenting while another thread writes and reads loses nothing.
pub fn defragment_while_writing(open: Factory<'_>) {
    let (be, _g) = open();
    let writer = {
        let be = be.clone();
        std::thread::spawn(move || {
            for i in 0..2000u32 {
                let mut b = WriteBatch::new();
                b.put(A, i.to_be_bytes().to_vec(), vec![1u8; 100]);
                if i % 2 == 1 {
                    b.delete(A, (i - 1).to_be_bytes().to_vec());
                }
                be.write(b).unwrap();
            }
        })
    };
    for _ in 0..3 {
        be.defragment().unwrap();
    }
    writer.join().unwrap();
    be.defragment().unwrap();
    let left = be.snapshot().unwrap().collect(A, ScanRange::all()).unwrap();
    assert_eq!(left.len(), 1000);
    assert!(left
        .iter()
        .all(|(k, _)| u32::from_be_bytes(k[..4].try_into().unwrap()) % 2 == 1));
}

/// A range deletion removes the keys in `[start, end)` of its bucket and nothing else, is
/// atomic with the rest of its batch, leaves earlier snapshots whole, and later puts into the
/// range are visible; an empty or inverted range removes nothing; sizes account for it.
pub fn delete_range_removes_exactly_the_range(open: Factory<'_>) {
    let (be, _g) = open();
    let mut fill = WriteBatch::new();
    for i in 0u32..2_000 {
        fill.put(A, i.to_be_bytes().to_vec(), vec![b'v'; 100]);
        fill.put(B, i.to_be_bytes().to_vec(), b"b".to_vec());
    }
    be.write(fill).unwrap();
    let before = be.snapshot().unwrap();
    let size_before = be.size().unwrap().size_in_use_bytes;

    let mut batch = WriteBatch::new();
    batch.delete_range(A, 100u32.to_be_bytes(), 1_900u32.to_be_bytes());
    batch.put(A, 500u32.to_be_bytes(), b"after".to_vec());
    batch.delete_range(A, 10u32.to_be_bytes(), 10u32.to_be_bytes());
    batch.delete_range(A, 20u32.to_be_bytes(), 5u32.to_be_bytes());
    batch.put(B, b"marker".to_vec(), b"m".to_vec());
    be.write(batch).unwrap();

    let left: Vec<u32> = keys(&*be, A, ScanRange::all())
        .iter()
        .map(|k| u32::from_be_bytes(k[..4].try_into().unwrap()))
        .collect();
    let expected: Vec<u32> = (0..100).chain([500]).chain(1_900..2_000).collect();
    assert_eq!(left, expected);
    let view = be.snapshot().unwrap();
    assert_eq!(
        view.get(A, &500u32.to_be_bytes()).unwrap().as_deref(),
        Some(&b"after"[..])
    );
    assert_eq!(keys(&*be, B, ScanRange::all()).len(), 2_001);
    assert_eq!(before.collect(A, ScanRange::all()).unwrap().len(), 2_000);
    if be.engine_name() == "memory" {
        // The memory engine counts its live bytes exactly; RocksDB estimates from its files.
        assert!(be.size().unwrap().size_in_use_bytes < size_before);
    }

    // A bad bucket anywhere in the batch fails it whole.
    let mut bad = WriteBatch::new();
    bad.delete_range(A, Vec::new(), vec![0xff; 8]);
    bad.delete_range("nope", Vec::new(), vec![0xff]);
    assert!(be.write(bad).is_err());
    assert_eq!(keys(&*be, A, ScanRange::all()).len(), expected.len());
}

/// Every check above, in one call.
pub fn run_all(open: Factory<'_>) {
    basic_put_get_delete(open);
    shared_values_outlive_their_view_and_later_writes(open);
    many_shared_values_are_each_keys_value_at_the_view(open);
    unknown_bucket_is_an_error(open);
    batch_is_atomic_across_buckets(open);
    snapshot_is_isolated_from_later_writes(open);
    snapshot_stable_under_concurrent_writes(open);
    range_scans(open);
    export_import_round_trip(open);
    bad_import_keeps_previous_content(open);
    sizes_and_defragment(open);
    defragment_while_writing(open);
    delete_range_removes_exactly_the_range(open);
}

/// Expands to one `#[test]` per conformance check, each opening backends with `$factory`
/// (an expression of type `fn() -> (Arc<dyn Backend>, Box<dyn Any>)`).
#[macro_export]
macro_rules! backend_conformance {
    ($factory:expr) => {
        $crate::backend_conformance!(@tests $factory;
            basic_put_get_delete, shared_values_outlive_their_view_and_later_writes,
            many_shared_values_are_each_keys_value_at_the_view, unknown_bucket_is_an_error,
            batch_is_atomic_across_buckets,
            snapshot_is_isolated_from_later_writes, snapshot_stable_under_concurrent_writes,
            range_scans, export_import_round_trip, bad_import_keeps_previous_content,
            sizes_and_defragment, defragment_while_writing,
            delete_range_removes_exactly_the_range);
    };
    (@tests $factory:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                $crate::conformance::$name(&$factory);
            }
        )*
    };
}
