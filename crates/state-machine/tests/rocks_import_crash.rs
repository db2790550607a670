//! A snapshot install on RocksDB cut short at any batch never opens as applied (issue 22,
//! item 5): the state machine opened on the database afterwards reports applied index 0 with
//! no keys and no leases, not the snapshot's index over a partial content, so the raft layer
//! installs the snapshot again; and that install gives the whole state.

mod common;
use common::count;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use metastore_proto::etcdserverpb::{LeaseGrantRequest, PutRequest};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_raft_node::StateMachine;
use metastore_state_machine::{buckets, encode_request, KvStateMachine};
use metastore_storage::Backend;
use metastore_storage_mem::MemBackend;
use metastore_storage_rocks::{ImportStep, RocksBackend};

/// Applied index of the snapshot the leader sends.
const SNAPSHOT_INDEX: u64 = 42;
/// Small batches, so that the snapshot needs several.
const BATCH_BYTES: usize = 512;

fn put(key: &str, value: &str, lease: i64) -> Vec<u8> {
    encode_request(Request::Put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        lease,
        ..Default::default()
    }))
}

/// The leader's state: a lease with keys attached and plain keys, applied up to
/// [`SNAPSHOT_INDEX`]; returns its snapshot stream.
fn leader_snapshot() -> Vec<u8> {
    let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&buckets()));
    let mut sm = KvStateMachine::open(backend).unwrap();
    let grant = encode_request(Request::LeaseGrant(LeaseGrantRequest { id: 7, ttl: 600 }));
    sm.apply(1, 1, &grant).unwrap();
    for i in 0..30u64 {
        let lease = if i % 2 == 0 { 7 } else { 0 };
        let value = format!("value {i} ").repeat(8);
        sm.apply(2 + i, 1, &put(&format!("new/{i:02}"), &value, lease))
            .unwrap();
    }
    sm.apply(SNAPSHOT_INDEX, 1, &put("new/last", "x", 0))
        .unwrap();
    let mut stream = Vec::new();
    sm.snapshot()(&mut stream).unwrap();
    stream
}

/// The follower's state before the install: one key, applied index 3, durable. Built on the
/// memory engine and imported, so that no state machine (whose watch hub keeps a handle to the
/// store) holds the RocksDB database open when the test reopens it.
fn follower_before(dir: &Path) {
    let mut sm = KvStateMachine::open(Arc::new(MemBackend::new(&buckets()))).unwrap();
    for index in 1..=3 {
        sm.apply(index, 1, &put("old", &index.to_string(), 0))
            .unwrap();
    }
    let mut stream = Vec::new();
    sm.snapshot()(&mut stream).unwrap();
    let backend = RocksBackend::open(dir, &buckets()).unwrap();
    backend.import(&mut &stream[..]).unwrap();
}

#[test]
fn install_cut_at_any_batch_opens_as_not_applied_and_installs_again() {
    let stream = leader_snapshot();
    let batches = {
        let dir = tempfile::tempdir().unwrap();
        follower_before(dir.path());
        let backend = RocksBackend::open(dir.path(), &buckets()).unwrap();
        let mut batches = 0;
        backend
            .import_stepwise(&mut &stream[..], BATCH_BYTES, &mut |step| {
                if let ImportStep::BatchWritten(n) = step {
                    batches = n;
                }
            })
            .unwrap();
        batches
    };
    assert!(batches >= 4, "only {batches} batches: too few to test");

    for cut in 1..=batches {
        let dir = tempfile::tempdir().unwrap();
        follower_before(dir.path());
        {
            let backend = RocksBackend::open(dir.path(), &buckets()).unwrap();
            // The crash: RocksDB flushes what the batches so far wrote (the worst case), then
            // the import stops there; closing the database flushes again, as a RocksDB flush
            // before a kill -9 would have.
            let crashed = catch_unwind(AssertUnwindSafe(|| {
                backend.import_stepwise(&mut &stream[..], BATCH_BYTES, &mut |step| {
                    if step == ImportStep::BatchWritten(cut) {
                        backend.sync().unwrap();
                        panic!("simulated crash after batch {cut}");
                    }
                })
            }));
            assert!(crashed.is_err(), "the import did not stop at batch {cut}");
        }

        let backend = Arc::new(RocksBackend::open(dir.path(), &buckets()).unwrap());
        let mut sm = KvStateMachine::open(backend.clone()).unwrap();
        assert_eq!(sm.applied_index(), 0, "cut after batch {cut}");
        assert_eq!(
            count(&sm, "\0", "\0"),
            0,
            "cut after batch {cut}: keys left"
        );
        assert!(sm.lessor().leases().is_empty(), "cut after batch {cut}");

        // The raft layer restores the state machine from the recorded snapshot file again.
        sm.restore(SNAPSHOT_INDEX, 1, &mut &stream[..]).unwrap();
        drop(sm);
        let sm = KvStateMachine::open(backend).unwrap();
        assert_eq!(sm.applied_index(), SNAPSHOT_INDEX, "cut after batch {cut}");
        assert_eq!(count(&sm, "new/", "new0"), 31, "cut after batch {cut}");
        assert_eq!(count(&sm, "old", "old\0"), 0, "cut after batch {cut}");
        assert_eq!(sm.lessor().leases(), vec![7], "cut after batch {cut}");
        assert_eq!(sm.lessor().attached_keys(7).unwrap().len(), 15);
    }
}
