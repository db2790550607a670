//! Errors: their etcd messages and gRPC codes, and corrupt stored values failing the open.

use super::*;

#[test]
fn errors_map_to_etcd_messages_and_codes() {
    let cases: [(MvccError, &str, i32); 6] = [
        (
            MvccError::Compacted,
            "etcdserver: mvcc: required revision has been compacted",
            11,
        ),
        (
            MvccError::FutureRev,
            "etcdserver: mvcc: required revision is a future revision",
            11,
        ),
        (
            MvccError::LeaseNotFound,
            "etcdserver: requested lease not found",
            5,
        ),
        (MvccError::EmptyKey, "etcdserver: key is not provided", 3),
        (
            MvccError::TooManyOps,
            "etcdserver: too many operations in txn request",
            3,
        ),
        (
            MvccError::Corrupt("x".into()),
            "etcdserver: corrupt cluster",
            15,
        ),
    ];
    for (err, message, code) in cases {
        assert_eq!(err.etcd_message(), message);
        assert_eq!(err.grpc_code(), code);
    }
    assert_eq!(
        MvccError::Compacted.to_string(),
        "mvcc: required revision has been compacted"
    );
}

#[test]
fn corrupt_values_fail_open() {
    let backend = Arc::new(MemBackend::new(BUCKETS));
    let mut batch = WriteBatch::new();
    batch.put("key", Revision::new(2, 0).to_key(false), vec![0xff, 0xff]);
    backend.write(batch).unwrap();
    assert!(matches!(
        Store::open(backend.clone()),
        Err(MvccError::Corrupt(_))
    ));

    let backend = Arc::new(MemBackend::new(BUCKETS));
    let mut batch = WriteBatch::new();
    batch.put(
        "key",
        b"not-a-revision".to_vec(),
        KeyValue::default().encode_to_vec(),
    );
    backend.write(batch).unwrap();
    assert!(matches!(Store::open(backend), Err(MvccError::Corrupt(_))));
}
