//! What the RocksDB engine keeps across close and reopen, and how its views outlive it.

use metastore_storage::{Backend, ScanRange, StorageError, WriteBatch};
use metastore_storage_rocks::RocksBackend;

const BUCKETS: &[&str] = &["alpha", "beta"];

#[test]
fn data_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
        let mut b = WriteBatch::new();
        for i in 0..100u32 {
            b.put(
                "alpha",
                format!("k{i:03}").into_bytes(),
                i.to_be_bytes().to_vec(),
            );
        }
        b.put("beta", b"meta", b"value");
        be.write(b).unwrap();
        let mut b = WriteBatch::new();
        b.delete("alpha", b"k000");
        b.put("alpha", b"k001", b"overwritten");
        be.write(b).unwrap();
    }
    let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
    let view = be.snapshot().unwrap();
    assert_eq!(view.get("alpha", b"k000").unwrap(), None);
    assert_eq!(
        view.get("alpha", b"k001").unwrap().as_deref(),
        Some(&b"overwritten"[..])
    );
    assert_eq!(
        view.get("alpha", b"k099").unwrap(),
        Some(99u32.to_be_bytes().to_vec())
    );
    assert_eq!(
        view.get("beta", b"meta").unwrap().as_deref(),
        Some(&b"value"[..])
    );
    assert_eq!(view.collect("alpha", ScanRange::all()).unwrap().len(), 99);
}

#[test]
fn data_survives_defragment_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
        let mut b = WriteBatch::new();
        b.put("alpha", b"flushed", b"to an sst file");
        be.write(b).unwrap();
        be.defragment().unwrap();
        let mut b = WriteBatch::new();
        b.put("beta", b"unflushed", b"in the wal only");
        be.write(b).unwrap();
    }
    let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
    let view = be.snapshot().unwrap();
    assert_eq!(
        view.get("alpha", b"flushed").unwrap().as_deref(),
        Some(&b"to an sst file"[..])
    );
    assert_eq!(
        view.get("beta", b"unflushed").unwrap().as_deref(),
        Some(&b"in the wal only"[..])
    );
}

#[test]
fn reopen_with_other_buckets() {
    let dir = tempfile::tempdir().unwrap();
    {
        let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
        let mut b = WriteBatch::new();
        b.put("alpha", b"a", b"1");
        b.put("beta", b"b", b"2");
        be.write(b).unwrap();
    }
    // A new bucket is created; a bucket left out stays on disk but is not reachable.
    {
        let be = RocksBackend::open(dir.path(), &["alpha", "gamma"]).unwrap();
        assert_eq!(be.buckets(), vec!["alpha", "gamma"]);
        let mut b = WriteBatch::new();
        b.put("gamma", b"c", b"3");
        be.write(b).unwrap();
        let view = be.snapshot().unwrap();
        assert_eq!(view.get("alpha", b"a").unwrap().as_deref(), Some(&b"1"[..]));
        assert!(matches!(
            view.get("beta", b"b"),
            Err(StorageError::UnknownBucket(_))
        ));
    }
    let be = RocksBackend::open(dir.path(), &["alpha", "beta", "gamma"]).unwrap();
    let view = be.snapshot().unwrap();
    assert_eq!(view.get("beta", b"b").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(view.get("gamma", b"c").unwrap().as_deref(), Some(&b"3"[..]));
}

#[test]
fn view_outlives_backend() {
    let dir = tempfile::tempdir().unwrap();
    let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
    let mut b = WriteBatch::new();
    b.put("alpha", b"k", b"v");
    be.write(b).unwrap();
    let view = be.snapshot().unwrap();
    drop(be);
    assert_eq!(view.get("alpha", b"k").unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(view.collect("alpha", ScanRange::all()).unwrap().len(), 1);
    drop(view);
    // The last view closed the database, so it opens again.
    let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
    assert_eq!(
        be.snapshot()
            .unwrap()
            .get("alpha", b"k")
            .unwrap()
            .as_deref(),
        Some(&b"v"[..])
    );
}

#[test]
fn import_survives_reopen_and_leaves_no_spool_file() {
    let src_dir = tempfile::tempdir().unwrap();
    let src = RocksBackend::open(src_dir.path(), BUCKETS).unwrap();
    let mut b = WriteBatch::new();
    // Large enough to span several import batches.
    for i in 0..3000u32 {
        b.put(
            "alpha",
            format!("key-{i:05}").into_bytes(),
            vec![(i % 251) as u8; 4096],
        );
    }
    src.write(b).unwrap();
    let mut stream = Vec::new();
    metastore_storage::export_snapshot(&*src.snapshot().unwrap(), BUCKETS, &mut stream).unwrap();

    let dir = tempfile::tempdir().unwrap();
    {
        let dst = RocksBackend::open(dir.path(), BUCKETS).unwrap();
        let mut b = WriteBatch::new();
        b.put("beta", b"stale", b"gone after import");
        dst.write(b).unwrap();
        dst.import(&mut &stream[..]).unwrap();
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "spool files left behind: {leftovers:?}"
    );
    let dst = RocksBackend::open(dir.path(), BUCKETS).unwrap();
    let mut again = Vec::new();
    metastore_storage::export_snapshot(&*dst.snapshot().unwrap(), BUCKETS, &mut again).unwrap();
    assert!(
        again == stream,
        "imported content differs from the source after reopen"
    );
}
