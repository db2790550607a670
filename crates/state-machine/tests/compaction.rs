//! Compaction as the state machine applies it: scheduled on the raft thread, carried out by the
//! store's worker, and carried through raft snapshots taken while it runs.

use std::sync::Arc;
use std::time::Duration;

use metastore_mvcc::{CompactionConfig, MvccError, Store};
use metastore_proto::etcdserverpb::{CompactionRequest, PutRequest, RangeRequest};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_raft_node::StateMachine;
use metastore_state_machine::{buckets, encode_request, ApplyError, KvStateMachine, Output};
use metastore_storage::{Backend, ScanRange};
use metastore_storage_mem::MemBackend;

const SMALL: CompactionConfig = CompactionConfig {
    batch_limit: 64,
    sleep_interval: Duration::ZERO,
};

struct Member {
    backend: Arc<dyn Backend>,
    sm: KvStateMachine,
    index: u64,
}

impl Member {
    fn new() -> Self {
        let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&buckets()));
        let sm = KvStateMachine::open(backend.clone())
            .unwrap()
            .with_compaction_config(SMALL);
        Member {
            backend,
            sm,
            index: 0,
        }
    }

    fn apply(&mut self, request: Request) -> Result<Output, ApplyError> {
        self.index += 1;
        self.sm.apply(self.index, 1, &encode_request(request))
    }

    /// `rounds` puts to each of 50 keys; returns the revision after them.
    fn history(&mut self, prefix: &str, rounds: usize) -> i64 {
        for round in 0..rounds {
            for k in 0..50 {
                self.apply(Request::Put(PutRequest {
                    key: format!("{prefix}{k:02}").into_bytes(),
                    value: format!("{round}").into_bytes(),
                    ..Default::default()
                }))
                .unwrap();
            }
        }
        self.store().current_revision()
    }

    fn compact(&mut self, revision: i64) {
        let compact = Request::Compaction(CompactionRequest {
            revision,
            physical: false,
        });
        assert!(matches!(self.apply(compact), Ok(Output::Kv(_))));
    }

    fn store(&self) -> Arc<Store> {
        self.sm.store().current()
    }

    fn key_bucket(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let view = self.backend.snapshot().unwrap();
        view.collect("key", ScanRange::all()).unwrap()
    }

    fn everything(&self) -> String {
        let store = self.store();
        let all = RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        };
        format!(
            "{:?} {:?} {}",
            store.range(&all).unwrap(),
            store.hash_kv(0).unwrap(),
            self.sm.applied_index()
        )
    }
}

#[test]
fn applying_a_compaction_schedules_it_and_the_store_finishes_it() {
    let mut m = Member::new();
    let c = m.history("k", 20) - 25;
    let stored = m.key_bucket().len();
    m.store().pause_compaction(true);
    m.compact(c);

    // Applied: in force for reads at once, nothing deleted yet.
    assert_eq!(m.key_bucket().len(), stored);
    assert_eq!(m.store().compact_revision(), c);
    let old = m.store().range(&RangeRequest {
        key: b"k00".to_vec(),
        revision: c - 1,
        ..Default::default()
    });
    assert!(matches!(old, Err(MvccError::Compacted)));
    // The raft thread goes on applying.
    m.history("after", 1);

    m.store().pause_compaction(false);
    assert!(m.store().wait_compaction(c).unwrap());
    // 50 keys' values at c survive (25 of them written at or before c by the last round), plus
    // everything after c.
    let after_c = 25 + 50;
    assert_eq!(m.key_bucket().len(), 50 + after_c);
}

#[test]
fn a_snapshot_taken_mid_compaction_restores_a_member_that_finishes_it() {
    let mut leader = Member::new();
    let c = leader.history("k", 20) - 10;
    leader.store().pause_compaction(true);
    leader.compact(c);
    let snapshot_index = leader.index;
    let mut data = Vec::new();
    (leader.sm.snapshot())(&mut data).unwrap();
    leader.store().pause_compaction(false);
    assert!(leader.store().wait_compaction(c).unwrap());

    // The follower runs a compaction of its own when the snapshot arrives; its worker must not
    // touch the imported data.
    let mut follower = Member::new();
    let own = follower.history("x", 5) - 50;
    let before = follower.store();
    before.pause_compaction(true);
    follower.compact(own);
    follower
        .sm
        .restore(snapshot_index, 1, &mut data.as_slice())
        .unwrap();
    follower.index = snapshot_index;
    before.pause_compaction(false);
    assert!(
        !before.wait_compaction(own).unwrap(),
        "stopped by the restore"
    );
    drop(before);

    let restored = follower.store();
    assert_eq!(restored.compact_revision(), c);
    assert!(restored.wait_compaction(c).unwrap());
    assert_eq!(follower.key_bucket(), leader.key_bucket());
    assert_eq!(follower.everything(), leader.everything());
}
