//! The seed corpus: a few valid inputs per target, made from MetaStore's own encoders so that
//! the fuzzer starts from inputs that reach deep into each target. `tests/corpus.rs` checks that
//! `corpus/<target>/seed-*` are these bytes, and writes them with `METASTORE_WRITE_SEEDS=1`.

use std::io::Cursor;

use metastore_bbolt::{etcd_schema, trailer, Writer};
use metastore_proto::authpb::{permission::Type as PermissionType, Permission};
use metastore_proto::etcdserverpb::alarm_request::AlarmAction;
use metastore_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use metastore_proto::etcdserverpb::{
    request_op, AlarmRequest, AlarmType, AuthEnableRequest, AuthRoleAddRequest,
    AuthRoleGrantPermissionRequest, AuthUserAddRequest, AuthUserGrantRoleRequest,
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::metastorepb::{AuthenticateInternal, Member, MemberAttributes, RaftBatch};
use metastore_proto::mvccpb::KeyValue;
use metastore_raft_node::StateMachine;
use prost::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
    Entry, HardState, Message, MessageType, Snapshot, SnapshotMetadata,
};

use crate::Input;

/// The seeds of every target, by target name.
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("wal_record", wal_record()),
        ("wal_open", wal_open()),
        ("snapshot_metastore", snapshot_metastore()),
        ("snapshot_bbolt", snapshot_bbolt()),
        ("entry_apply", entry_apply()),
        ("conf_change", conf_change()),
        ("peer_message", peer_message()),
        ("grpc_requests", grpc_requests()),
    ]
}

fn pb(msg: &dyn protobuf::Message) -> Vec<u8> {
    msg.write_to_bytes().expect("raft messages encode")
}

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

fn marker(index: u64, term: u64) -> SnapshotMetadata {
    SnapshotMetadata {
        index,
        term,
        conf_state: Some(ConfState::from((vec![1], vec![]))).into(),
        ..Default::default()
    }
}

/// A normal entry's data as the raft loop proposes it: request id, then the payload.
fn with_request_id(request_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut data = request_id.to_be_bytes().to_vec();
    data.extend_from_slice(payload);
    data
}

fn put(key: &str, value: &str, lease: i64) -> Request {
    Request::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        lease,
        prev_kv: true,
        ..Default::default()
    })
}

/// A representative history: keys, a lease with a key attached, a txn, a delete, a
/// compaction, an alarm, members and auth records.
fn requests() -> Vec<Request> {
    let txn = TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Version as i32,
            key: b"a".to_vec(),
            target_union: Some(TargetUnion::Version(1)),
            ..Default::default()
        }],
        success: vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"b".to_vec(),
                    value: b"2".to_vec(),
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: b"a".to_vec(),
                    range_end: b"z".to_vec(),
                    ..Default::default()
                })),
            },
        ],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: b"a".to_vec(),
                    ..Default::default()
                },
            )),
        }],
    };
    vec![
        put("a", "1", 0),
        Request::LeaseGrant(LeaseGrantRequest { ttl: 60, id: 7 }),
        put("leased", "x", 7),
        Request::Txn(txn),
        put("a", "3", 0),
        Request::DeleteRange(DeleteRangeRequest {
            key: b"b".to_vec(),
            range_end: b"c".to_vec(),
            prev_kv: true,
        }),
        Request::Compaction(CompactionRequest {
            revision: 3,
            physical: false,
        }),
        Request::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: 1,
            alarm: AlarmType::Nospace as i32,
        }),
        Request::Alarm(AlarmRequest {
            action: AlarmAction::Deactivate as i32,
            member_id: 1,
            alarm: AlarmType::Nospace as i32,
        }),
        Request::MemberAttributes(MemberAttributes {
            id: 1,
            name: "m1".into(),
            client_urls: vec!["http://127.0.0.1:2379".into()],
        }),
        Request::UserAdd(AuthUserAddRequest {
            name: "root".into(),
            hashed_password: "$2b$04$seedseedseedseedseedsOqBeuXKzZzCQN6xJp0FSp6rZQAa9Nzy".into(),
            ..Default::default()
        }),
        Request::UserGrantRole(AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        }),
        Request::RoleAdd(AuthRoleAddRequest { name: "r".into() }),
        Request::RoleGrantPermission(AuthRoleGrantPermissionRequest {
            name: "r".into(),
            perm: Some(Permission {
                perm_type: PermissionType::Readwrite as i32,
                key: b"a".to_vec(),
                range_end: b"b".to_vec(),
            }),
        }),
        Request::AuthEnable(AuthEnableRequest {}),
        Request::Authenticate(AuthenticateInternal {
            name: "root".into(),
            simple_token_prefix: "seed".into(),
        }),
        Request::LeaseRevoke(LeaseRevokeRequest { id: 7 }),
    ]
}

fn payloads() -> Vec<Vec<u8>> {
    requests()
        .into_iter()
        .map(metastore_state_machine::encode_request)
        .collect()
}

/// A state machine's export after [`requests`].
fn state_export() -> Vec<u8> {
    let mut sm = crate::new_state_machine();
    for (payload, index) in payloads().iter().zip(1u64..) {
        let _ = sm.apply(index, 1, payload);
    }
    crate::export(&sm)
}

fn wal_items(with_conflict: bool) -> Vec<u8> {
    let mut items = Vec::new();
    items.extend(Input::item(2, &pb(&marker(0, 0))));
    for (index, payload) in (1u64..).zip(payloads().iter().take(4)) {
        items.extend(Input::item(
            0,
            &pb(&entry(index, 1, &with_request_id(index, payload))),
        ));
    }
    if with_conflict {
        // A new leader overwrote the last two entries.
        items.extend(Input::item(0, &pb(&entry(3, 2, b""))));
    }
    let hard_state = HardState {
        term: 2,
        vote: 1,
        commit: 3,
        ..Default::default()
    };
    items.extend(Input::item(1, &pb(&hard_state)));
    items
}

fn wal_record() -> Vec<Vec<u8>> {
    let framed = crate::wal_segment(2, &wal_items(true));
    let mut torn = vec![1u8];
    torn.extend(&framed);
    // A record cut short by a crash.
    torn.extend(&crate::wal_segment(2, &Input::item(0, &pb(&entry(4, 2, b"torn"))))[..12]);
    let mut preallocated = vec![0u8];
    preallocated.extend(&framed);
    preallocated.extend(vec![0u8; 64]);
    let mut items = vec![3u8];
    items.extend(wal_items(false));
    vec![items, torn, preallocated]
}

fn wal_open() -> Vec<Vec<u8>> {
    let mut two = vec![0u8];
    two.extend(wal_items(false));
    two.extend(Input::item(0xff, b""));
    two.extend(Input::item(2, &pb(&marker(2, 1))));
    two.extend(Input::item(0, &pb(&entry(5, 1, b""))));
    let mut torn = vec![0u8];
    torn.extend(wal_items(true));
    // kind 3: bytes as they are; an incomplete record at the end of the last segment
    torn.extend(Input::item(3, &[9, 0, 0, 0, 1, 2]));
    vec![two, torn]
}

fn snapshot_metastore() -> Vec<Vec<u8>> {
    let export = state_export();
    let mut as_is = vec![0u8];
    as_is.extend(&export);
    let mut crc_fixed = vec![1u8];
    crc_fixed.extend(&export);
    vec![as_is, crc_fixed]
}

fn snapshot_bbolt() -> Vec<Vec<u8>> {
    let mut w = Writer::new(Cursor::new(Vec::new()), 1024).expect("valid page size");
    let bucket = |w: &mut Writer<Cursor<Vec<u8>>>, name: &[u8], items: &[(Vec<u8>, Vec<u8>)]| {
        w.bucket(name).expect("buckets in order");
        for (k, v) in items {
            w.put(k, v).expect("keys in order");
        }
    };
    let kv = |key: &str, rev: i64| KeyValue {
        key: key.into(),
        create_revision: 2,
        mod_revision: rev,
        version: 1,
        value: b"value".to_vec(),
        lease: 0,
    };
    let key_items: Vec<(Vec<u8>, Vec<u8>)> = (2..6)
        .map(|rev| {
            let key = etcd_schema::KeyBucketKey {
                revision: etcd_schema::Revision { main: rev, sub: 0 },
                tombstone: false,
            };
            (key.encode(), kv(&format!("k{rev}"), rev).encode_to_vec())
        })
        .collect();
    let lease = etcd_schema::Lease {
        id: 7,
        ttl: 60,
        remaining_ttl: 0,
    };
    bucket(&mut w, b"key", &key_items);
    bucket(
        &mut w,
        b"lease",
        &[(etcd_schema::lease_key(7).to_vec(), lease.encode_to_vec())],
    );
    bucket(
        &mut w,
        b"meta",
        &[
            (b"consistent_index".to_vec(), 9u64.to_be_bytes().to_vec()),
            (b"term".to_vec(), 2u64.to_be_bytes().to_vec()),
        ],
    );
    let (out, _) = w.finish().expect("the writer finishes");
    let plain = out.into_inner();
    let mut with_trailer = Cursor::new(plain.clone());
    trailer::append(&mut with_trailer).expect("appending to memory");
    vec![plain, with_trailer.into_inner()]
}

fn entry_apply() -> Vec<Vec<u8>> {
    let mut history = Vec::new();
    for payload in payloads() {
        history.extend(Input::item(0, &payload));
    }
    let mut with_snapshot = Vec::new();
    for (i, payload) in payloads().iter().enumerate() {
        if i == 5 {
            with_snapshot.extend(Input::item(1, b""));
        }
        with_snapshot.extend(Input::item(0, payload));
    }
    vec![history, with_snapshot]
}

fn member_context(id: u64, name: &str) -> Vec<u8> {
    let member = Member {
        id,
        name: name.into(),
        peer_urls: vec![format!("http://127.0.0.{id}:2380")],
        ..Default::default()
    };
    with_request_id(42, &member.encode_to_vec())
}

fn conf_change() -> Vec<Vec<u8>> {
    let mut v1 = ConfChange {
        node_id: 2,
        context: member_context(2, "m2").into(),
        ..Default::default()
    };
    v1.set_change_type(ConfChangeType::AddNode);
    let single = |change_type, node_id| {
        let mut c = ConfChangeSingle {
            node_id,
            ..Default::default()
        };
        c.set_change_type(change_type);
        c
    };
    let learner = ConfChangeV2 {
        changes: vec![single(ConfChangeType::AddLearnerNode, 3)].into(),
        context: member_context(3, "m3").into(),
        ..Default::default()
    };
    let mut joint = ConfChangeV2 {
        changes: vec![
            single(ConfChangeType::AddNode, 3),
            single(ConfChangeType::RemoveNode, 2),
        ]
        .into(),
        ..Default::default()
    };
    joint.set_transition(ConfChangeTransition::Explicit);
    let leave = ConfChangeV2::default();
    let mut remove = ConfChange {
        node_id: 2,
        ..Default::default()
    };
    remove.set_change_type(ConfChangeType::RemoveNode);
    let mut seq = Vec::new();
    seq.extend(Input::item(0, &pb(&v1)));
    seq.extend(Input::item(1, &pb(&learner)));
    seq.extend(Input::item(0, &pb(&remove)));
    let mut joint_seq = Vec::new();
    joint_seq.extend(Input::item(0, &pb(&v1)));
    joint_seq.extend(Input::item(1, &pb(&joint)));
    joint_seq.extend(Input::item(1, &pb(&leave)));
    vec![seq, joint_seq]
}

fn raft_message(kind: MessageType, from: u64, term: u64) -> Message {
    let mut msg = Message {
        from,
        to: 1,
        term,
        ..Default::default()
    };
    msg.set_msg_type(kind);
    msg
}

fn batch(situation: u8, messages: &[Message]) -> Vec<u8> {
    let batch = RaftBatch {
        cluster_id: 1,
        from: 2,
        to: 1,
        messages: messages.iter().map(|m| pb(m)).collect(),
    };
    let mut out = vec![situation];
    out.extend(batch.encode_to_vec());
    out
}

fn peer_message() -> Vec<Vec<u8>> {
    // Follower (log terms 1 1 2 2 3): the leader of term 3 appends two requests and commits.
    let mut append = raft_message(MessageType::MsgAppend, 2, 3);
    append.index = 5;
    append.log_term = 3;
    append.commit = 7;
    let payloads = payloads();
    append.entries = vec![
        entry(6, 3, &with_request_id(6, &payloads[0])),
        entry(7, 3, &with_request_id(7, &payloads[1])),
    ]
    .into();
    let mut heartbeat = raft_message(MessageType::MsgHeartbeat, 2, 3);
    heartbeat.commit = 7;
    let mut vote = raft_message(MessageType::MsgRequestVote, 3, 4);
    vote.index = 7;
    vote.log_term = 3;
    let follower = batch(0, &[append, heartbeat, vote]);
    // Candidate of term 2: wins with member 2's vote, then hears from its followers.
    let mut granted = raft_message(MessageType::MsgRequestVoteResponse, 2, 2);
    granted.index = 2;
    let mut ack = raft_message(MessageType::MsgAppendResponse, 2, 2);
    ack.index = 3;
    let heartbeat_ack = raft_message(MessageType::MsgHeartbeatResponse, 3, 2);
    let mut pre_vote = raft_message(MessageType::MsgRequestPreVoteResponse, 2, 2);
    pre_vote.index = 2;
    let candidate = batch(1, &[pre_vote, granted, ack, heartbeat_ack]);
    // A snapshot carrying its data, from a leader of a later term.
    let mut snapshot = raft_message(MessageType::MsgSnapshot, 2, 5);
    let mut snap = Snapshot::default();
    snap.set_data(state_export().into());
    snap.set_metadata(SnapshotMetadata {
        index: 20,
        term: 5,
        conf_state: Some(ConfState::from((vec![1, 2, 3], vec![]))).into(),
        ..Default::default()
    });
    snapshot.set_snapshot(snap);
    let snapshot = batch(0, &[snapshot]);
    vec![follower, candidate, snapshot]
}

fn grpc_requests() -> Vec<Vec<u8>> {
    let mut out = Input::item(0, b"");
    let kind_of = |r: &Request| -> u8 {
        match r {
            Request::Put(_) => 1,
            Request::DeleteRange(_) => 2,
            Request::Txn(_) => 3,
            Request::Compaction(_) => 4,
            Request::LeaseGrant(_) => 5,
            Request::LeaseRevoke(_) => 6,
            Request::Alarm(_) => 7,
            Request::MemberAttributes(_) => 8,
            Request::MemberPeerUrls(_) => 9,
            Request::AuthEnable(_) => 10,
            Request::AuthDisable(_) => 11,
            Request::Authenticate(_) => 12,
            Request::UserAdd(_) => 13,
            Request::UserDelete(_) => 14,
            Request::UserChangePassword(_) => 15,
            Request::UserGrantRole(_) => 16,
            Request::UserRevokeRole(_) => 17,
            Request::RoleAdd(_) => 18,
            Request::RoleDelete(_) => 19,
            Request::RoleGrantPermission(_) => 20,
            Request::RoleRevokePermission(_) => 21,
        }
    };
    for request in requests() {
        let kind = kind_of(&request);
        let bytes = match request {
            Request::Put(r) => r.encode_to_vec(),
            Request::DeleteRange(r) => r.encode_to_vec(),
            Request::Txn(r) => r.encode_to_vec(),
            Request::Compaction(r) => r.encode_to_vec(),
            Request::LeaseGrant(r) => r.encode_to_vec(),
            Request::LeaseRevoke(r) => r.encode_to_vec(),
            Request::Alarm(r) => r.encode_to_vec(),
            Request::MemberAttributes(r) => r.encode_to_vec(),
            Request::MemberPeerUrls(r) => r.encode_to_vec(),
            Request::AuthEnable(r) => r.encode_to_vec(),
            Request::AuthDisable(r) => r.encode_to_vec(),
            Request::Authenticate(r) => r.encode_to_vec(),
            Request::UserAdd(mut r) => {
                r.password = std::mem::take(&mut r.hashed_password);
                r.encode_to_vec()
            }
            Request::UserDelete(r) => r.encode_to_vec(),
            Request::UserChangePassword(r) => r.encode_to_vec(),
            Request::UserGrantRole(r) => r.encode_to_vec(),
            Request::UserRevokeRole(r) => r.encode_to_vec(),
            Request::RoleAdd(r) => r.encode_to_vec(),
            Request::RoleDelete(r) => r.encode_to_vec(),
            Request::RoleGrantPermission(r) => r.encode_to_vec(),
            Request::RoleRevokePermission(r) => r.encode_to_vec(),
        };
        out.extend(Input::item(kind, &bytes));
        let range = RangeRequest {
            key: b"a".to_vec(),
            range_end: vec![0],
            ..Default::default()
        };
        out.extend(Input::item(0, &range.encode_to_vec()));
    }
    let mut as_root = Input::item(0, b"root");
    as_root.extend(Input::item(
        1,
        &PutRequest {
            key: b"a".to_vec(),
            value: b"as root".to_vec(),
            ..Default::default()
        }
        .encode_to_vec(),
    ));
    vec![out, as_root]
}
