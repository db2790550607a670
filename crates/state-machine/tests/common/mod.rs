//! Helpers shared by the state machine's integration tests.

use metastore_proto::etcdserverpb::RangeRequest;
use metastore_state_machine::KvStateMachine;

/// How many keys of `[key, end)` the state machine's store holds.
pub fn count(sm: &KvStateMachine, key: &str, end: &str) -> i64 {
    let req = RangeRequest {
        key: key.as_bytes().to_vec(),
        range_end: end.as_bytes().to_vec(),
        count_only: true,
        ..Default::default()
    };
    sm.store().current().range(&req).unwrap().count
}
