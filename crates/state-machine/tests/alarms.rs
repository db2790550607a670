//! Alarms as the state machine applies them: persisted with the applied index, reloaded on
//! open, and the refusals etcd's capped, corrupt and quota appliers make.

use std::sync::Arc;

use metastore_proto::etcdserverpb::alarm_request::AlarmAction;
use metastore_proto::etcdserverpb::{
    AlarmRequest, AlarmType, CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest,
};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_raft_node::StateMachine;
use metastore_state_machine::{buckets, encode_request, ApplyError, KvStateMachine, Output};
use metastore_storage::Backend;
use metastore_storage_mem::MemBackend;

fn put(key: &str, value_bytes: usize) -> Request {
    Request::Put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: vec![b'v'; value_bytes],
        ..Default::default()
    })
}

fn alarm(action: AlarmAction, alarm: AlarmType) -> Request {
    Request::Alarm(AlarmRequest {
        action: action as i32,
        member_id: 7,
        alarm: alarm as i32,
    })
}

fn count(sm: &KvStateMachine, key: &str) -> i64 {
    let req = RangeRequest {
        key: key.as_bytes().to_vec(),
        count_only: true,
        ..Default::default()
    };
    sm.store().current().range(&req).unwrap().count
}

#[test]
fn nospace_refuses_puts_survives_reopen_and_clears() {
    let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&buckets()));
    let mut sm = KvStateMachine::open(backend.clone()).unwrap();
    assert!(sm.apply(1, 1, &encode_request(put("a", 10))).is_ok());
    match sm.apply(
        2,
        1,
        &encode_request(alarm(AlarmAction::Activate, AlarmType::Nospace)),
    ) {
        Ok(Output::Alarm(resp)) => assert_eq!(resp.alarms.len(), 1),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        sm.apply(3, 1, &encode_request(put("b", 10))),
        Err(ApplyError::NoSpace)
    ));
    assert_eq!(count(&sm, "b"), 0);
    // Deletes and compactions still work, so space can be freed.
    let delete = Request::DeleteRange(DeleteRangeRequest {
        key: b"a".to_vec(),
        ..Default::default()
    });
    assert!(sm.apply(4, 1, &encode_request(delete)).is_ok());
    let compact = Request::Compaction(CompactionRequest {
        revision: 3,
        physical: true,
    });
    assert!(sm.apply(5, 1, &encode_request(compact)).is_ok());

    // Persisted with the applied index: a reopened state machine has the alarm.
    drop(sm);
    let mut sm = KvStateMachine::open(backend.clone()).unwrap();
    assert_eq!(sm.applied_index(), 5);
    assert!(sm.alarms().is_active(AlarmType::Nospace));
    assert!(sm.apply(6, 1, &encode_request(put("b", 10))).is_err());

    let off = sm.apply(
        7,
        1,
        &encode_request(alarm(AlarmAction::Deactivate, AlarmType::Nospace)),
    );
    assert!(matches!(off, Ok(Output::Alarm(r)) if r.alarms.len() == 1));
    assert!(sm.apply(8, 1, &encode_request(put("b", 10))).is_ok());
    assert_eq!(count(&sm, "b"), 1);
}

#[test]
fn corrupt_refuses_every_kv_request() {
    let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&buckets()));
    let mut sm = KvStateMachine::open(backend).unwrap();
    sm.apply(
        1,
        1,
        &encode_request(alarm(AlarmAction::Activate, AlarmType::Corrupt)),
    )
    .unwrap();
    let delete = Request::DeleteRange(DeleteRangeRequest {
        key: b"a".to_vec(),
        ..Default::default()
    });
    for (index, request) in [(2, put("a", 1)), (3, delete)] {
        assert!(matches!(
            sm.apply(index, 1, &encode_request(request)),
            Err(ApplyError::Corrupt)
        ));
    }
    // Alarm requests still apply, so the alarm can be listed and cleared.
    let get = sm.apply(
        4,
        1,
        &encode_request(alarm(AlarmAction::Get, AlarmType::None)),
    );
    assert!(matches!(get, Ok(Output::Alarm(r)) if r.alarms.len() == 1));
    assert_eq!(sm.applied_index(), 4);
}

#[test]
fn quota_checked_at_apply_like_etcd() {
    let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&buckets()));
    let mut sm = KvStateMachine::open(backend)
        .unwrap()
        .with_quota_bytes(1000);
    // etcd applies a put that does not fit, then answers `database space exceeded`.
    assert!(matches!(
        sm.apply(1, 1, &encode_request(put("big", 2000))),
        Err(ApplyError::NoSpace)
    ));
    assert_eq!(count(&sm, "big"), 1);
    // Raising the alarm is the API's job; the table is untouched here.
    assert!(!sm.alarms().is_active(AlarmType::Nospace));
}
