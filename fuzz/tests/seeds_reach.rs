//! The seeds get past each target's first checks (checksums, framing, raft's term and index
//! checks), so fuzzing starts deep in the code rather than at its entrance.

use std::sync::Arc;

use metastore_bbolt::{status, Db};
use metastore_fuzz::{seeds, Input};
use metastore_proto::metastorepb::RaftBatch;
use metastore_raft_node::fuzzing::{wal_frame, wal_replay, RaftHarness, WAL_RECORD_TYPES};
use metastore_raft_node::StateMachine;
use metastore_state_machine::KvStateMachine;
use metastore_storage::Backend;
use metastore_storage_mem::MemBackend;
use prost::Message as _;

fn seeds_of(target: &str) -> Vec<Vec<u8>> {
    seeds::all()
        .into_iter()
        .find(|(name, _)| *name == target)
        .unwrap()
        .1
}

fn state_machine() -> KvStateMachine {
    let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&metastore_state_machine::buckets()));
    KvStateMachine::open(backend).unwrap()
}

#[test]
fn the_wal_seed_replays_its_entries() {
    let seed = &seeds_of("wal_record")[0];
    let mut segment = Vec::new();
    for (kind, bytes) in Input::new(&seed[1..]) {
        segment.extend(wal_frame(WAL_RECORD_TYPES[usize::from(kind)], bytes));
    }
    let replay = wal_replay(&segment, true).unwrap();
    assert_eq!((replay.entries, replay.snapshots, replay.commit), (4, 1, 3));
    assert!(!replay.torn);
    let torn = &seeds_of("wal_record")[1];
    let replay = wal_replay(&torn[1..], true).unwrap();
    assert!(replay.torn);
    assert_eq!(replay.entries, 3, "the overwrite left entries 1-3");
}

#[test]
fn the_metastore_snapshot_seed_restores() {
    let seed = &seeds_of("snapshot_metastore")[0];
    let mut sm = state_machine();
    sm.restore(1, 1, &mut &seed[1..]).unwrap();
    assert!(sm.store().current().current_revision() > 1);
    assert!(sm.auth().is_enabled());
}

#[test]
fn the_bbolt_seeds_are_etcd_snapshots() {
    let seeds = seeds_of("snapshot_bbolt");
    let db = Db::from_bytes(seeds[0].clone()).unwrap();
    let status = status::snapshot_status(&db).unwrap();
    assert_eq!((status.revision, status.total_key), (5, 7));
    assert_eq!(
        metastore_bbolt::trailer::verify(&mut std::io::Cursor::new(&seeds[1]), false).unwrap(),
        seeds[0].len() as u64
    );
}

#[test]
fn the_entry_seed_applies_every_request() {
    let seed = &seeds_of("entry_apply")[0];
    let mut sm = state_machine();
    let mut index = 0;
    for (_, payload) in Input::new(seed) {
        index += 1;
        let output = sm.apply(index, 1, payload);
        assert!(output.is_ok(), "entry {index}: {output:?}");
    }
    assert_eq!(index, 17);
}

#[test]
fn the_peer_seeds_reach_the_state_machine() {
    let seeds = seeds_of("peer_message");
    // The follower applies the two entries its leader appended and committed.
    let batch = RaftBatch::decode(&seeds[0][1..]).unwrap();
    let mut node = RaftHarness::new(state_machine(), 1, &[1, 2, 3], &[1, 1, 2, 2, 3], 2).unwrap();
    node.step(metastore_peer::decode_message(&batch.messages[0]).unwrap())
        .unwrap();
    assert_eq!(node.applied_index(), 7);
    assert_eq!(node.state_machine().store().current().current_revision(), 2);
    // The candidate wins the election with member 2's votes.
    let batch = RaftBatch::decode(&seeds[1][1..]).unwrap();
    let mut node = RaftHarness::new(state_machine(), 1, &[1, 2, 3], &[1, 1], 1).unwrap();
    node.campaign().unwrap();
    for bytes in &batch.messages[..2] {
        node.step(metastore_peer::decode_message(bytes).unwrap())
            .unwrap();
    }
    assert!(node.is_leader());
    // The snapshot carried in the message is installed.
    let batch = RaftBatch::decode(&seeds[2][1..]).unwrap();
    let mut node = RaftHarness::new(state_machine(), 1, &[1, 2, 3], &[1, 1, 2, 2, 3], 2).unwrap();
    node.step(metastore_peer::decode_message(&batch.messages[0]).unwrap())
        .unwrap();
    assert_eq!(node.applied_index(), 20);
    assert!(node.state_machine().auth().is_enabled());
}
