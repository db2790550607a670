//! Differential test: one scripted sequence of KV operations — every option and the errors —
//! runs against real etcd and against MetaStore on each engine; the responses must match field by
//! field, apart from the cluster id, member id and raft term in headers.

use crate::support;

use metastore_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use metastore_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use metastore_proto::etcdserverpb::request_op::Request as Op;
use metastore_proto::etcdserverpb::response_op::Response as OpResp;
use metastore_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    ResponseHeader, TxnRequest,
};
use support::Server;

/// One step of the script.
#[derive(Clone, Debug)]
enum Step {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
}

fn put(k: &str, v: &str) -> Step {
    Step::Put(PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    })
}
fn put_prev(k: &str, v: &str) -> Step {
    Step::Put(PutRequest {
        key: k.into(),
        value: v.into(),
        prev_kv: true,
        ..Default::default()
    })
}
fn get(k: &str) -> RangeRequest {
    range(k, b"")
}
fn range(k: &str, end: &[u8]) -> RangeRequest {
    RangeRequest {
        key: k.into(),
        range_end: end.to_vec(),
        ..Default::default()
    }
}
/// Every key, with the options `with` sets.
fn all(with: impl FnOnce(&mut RangeRequest)) -> Step {
    let mut r = range("\0", b"\0");
    with(&mut r);
    Step::Range(r)
}
fn all_sorted(order: SortOrder, target: SortTarget) -> Step {
    all(|r| {
        r.sort_order = order as i32;
        r.sort_target = target as i32;
    })
}
fn all_at(revision: i64) -> Step {
    all(|r| r.revision = revision)
}
fn compact(revision: i64, physical: bool) -> Step {
    Step::Compact(CompactionRequest { revision, physical })
}
fn op_put(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    }
}
fn op_range(r: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestRange(r)),
    }
}
fn op_delete(k: &str, end: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key: k.into(),
            range_end: end.to_vec(),
            prev_kv: true,
        })),
    }
}
fn cmp(
    k: &str,
    end: &[u8],
    target: CompareTarget,
    result: CompareResult,
    value: TargetUnion,
) -> Compare {
    Compare {
        key: k.into(),
        range_end: end.to_vec(),
        target: target as i32,
        result: result as i32,
        target_union: Some(value),
    }
}

fn script() -> Vec<Step> {
    use CompareResult::*;
    use CompareTarget as T;
    let mut s = vec![
        put("a", "1"),
        put_prev("b", "2"),
        put_prev("a", "3"),
        put("c", "4"),
        put("a/x", "5"),
        put("a/y", "6"),
        put("d", "0"),
        Step::Range(get("a")),
        Step::Range(get("missing")),
        Step::Range(range("a", b"c")),
        Step::Range(range("a/", b"a0")),
        Step::Range(range("\0", b"\0")),
        Step::Range(range("b", b"\0")),
        all(|r| r.limit = 2),
        all(|r| r.limit = 10),
        all_sorted(SortOrder::Descend, SortTarget::Key),
        all(|r| {
            r.sort_order = SortOrder::Ascend as i32;
            r.sort_target = SortTarget::Value as i32;
            r.limit = 3;
        }),
        all_sorted(SortOrder::Descend, SortTarget::Create),
        all_sorted(SortOrder::Ascend, SortTarget::Mod),
        all_sorted(SortOrder::Descend, SortTarget::Version),
        all_sorted(SortOrder::None, SortTarget::Key),
        Step::Range(RangeRequest {
            keys_only: true,
            ..range("a", b"b")
        }),
        Step::Range(RangeRequest {
            count_only: true,
            ..range("a", b"b")
        }),
        all_at(2),
        Step::Range(RangeRequest {
            revision: 3,
            ..get("a")
        }),
        all(|r| r.min_mod_revision = 4),
        all(|r| r.max_mod_revision = 3),
        all(|r| {
            r.min_create_revision = 3;
            r.max_create_revision = 5;
        }),
        Step::Range(RangeRequest {
            serializable: true,
            ..get("a")
        }),
        Step::Range(RangeRequest {
            revision: 1000,
            ..get("a")
        }),
        // errors
        Step::Range(get("")),
        put("", "x"),
        Step::Delete(DeleteRangeRequest {
            key: vec![],
            ..Default::default()
        }),
        Step::Put(PutRequest {
            key: "nokey".into(),
            ignore_value: true,
            ..Default::default()
        }),
        Step::Put(PutRequest {
            key: "nokey".into(),
            ignore_lease: true,
            ..Default::default()
        }),
        Step::Put(PutRequest {
            key: "a".into(),
            value: "v".into(),
            ignore_value: true,
            ..Default::default()
        }),
        Step::Put(PutRequest {
            key: "a".into(),
            lease: 7,
            ignore_lease: true,
            ..Default::default()
        }),
        Step::Put(PutRequest {
            key: "a".into(),
            value: "v".into(),
            lease: 12345,
            ..Default::default()
        }),
        Step::Put(PutRequest {
            key: "big".into(),
            value: vec![b'x'; 1700 * 1024],
            ..Default::default()
        }),
        // ignore_value keeps the value
        Step::Put(PutRequest {
            key: "a".into(),
            ignore_value: true,
            prev_kv: true,
            ..Default::default()
        }),
        Step::Range(get("a")),
        // deletes
        Step::Delete(DeleteRangeRequest {
            key: "b".into(),
            prev_kv: true,
            ..Default::default()
        }),
        Step::Delete(DeleteRangeRequest {
            key: "a/".into(),
            range_end: b"a0".to_vec(),
            prev_kv: true,
        }),
        Step::Delete(DeleteRangeRequest {
            key: "zzz".into(),
            ..Default::default()
        }),
        Step::Range(range("\0", b"\0")),
        // re-create after delete: version restarts, new create revision
        put_prev("b", "again"),
        Step::Range(get("b")),
    ];
    // transactions
    s.extend([
        Step::Txn(TxnRequest {
            compare: vec![cmp("a", b"", T::Version, Equal, TargetUnion::Version(3))],
            success: vec![
                op_put("t1", "yes"),
                op_range(get("t1")),
                op_delete("c", b""),
            ],
            failure: vec![op_put("t1", "no")],
        }),
        Step::Txn(TxnRequest {
            compare: vec![cmp(
                "a",
                b"",
                T::Value,
                Equal,
                TargetUnion::Value(b"nope".to_vec()),
            )],
            success: vec![op_put("t2", "yes")],
            failure: vec![op_put("t2", "no"), op_range(range("t", b"u"))],
        }),
        Step::Txn(TxnRequest {
            compare: vec![
                cmp("a", b"", T::Create, Less, TargetUnion::CreateRevision(100)),
                cmp("a", b"", T::Mod, Greater, TargetUnion::ModRevision(1)),
                cmp("t", b"u", T::Version, Greater, TargetUnion::Version(0)),
                cmp("a", b"", T::Lease, Equal, TargetUnion::Lease(0)),
                cmp(
                    "a",
                    b"",
                    T::Value,
                    NotEqual,
                    TargetUnion::Value(b"zzz".to_vec()),
                ),
            ],
            success: vec![RequestOp {
                request: Some(Op::RequestTxn(TxnRequest {
                    compare: vec![cmp(
                        "missing",
                        b"",
                        T::Version,
                        Equal,
                        TargetUnion::Version(0),
                    )],
                    success: vec![op_put("nested", "1"), op_range(get("nested"))],
                    failure: vec![],
                })),
            }],
            failure: vec![],
        }),
        Step::Txn(TxnRequest {
            compare: vec![],
            success: vec![op_range(get("a"))],
            failure: vec![],
        }),
        Step::Txn(TxnRequest::default()),
        Step::Txn(TxnRequest {
            compare: vec![],
            success: vec![op_put("dup", "1"), op_put("dup", "2")],
            failure: vec![],
        }),
        Step::Txn(TxnRequest {
            compare: vec![],
            success: vec![op_put("dup/a", "1"), op_delete("dup/", b"dup0")],
            failure: vec![],
        }),
        Step::Txn(TxnRequest {
            compare: vec![],
            success: (0..129).map(|i| op_put(&format!("many{i}"), "v")).collect(),
            failure: vec![],
        }),
        Step::Range(range("\0", b"\0")),
    ]);
    // compaction and history
    s.extend([
        compact(1000, false),
        compact(5, true),
        compact(5, false),
        compact(3, false),
        all_at(4),
        all_at(5),
        all_at(9),
        put_prev("a", "after-compact"),
        Step::Range(range("\0", b"\0")),
    ]);
    // answers of many pieces (MetaStore writes a Range answer 64 KiB at a time)
    s.extend((0..300).map(|i| put(&format!("big/{i:03}"), &format!("{i:03}").repeat(1400))));
    s.extend([
        Step::Range(range("big/", b"big0")),
        all(|r| r.limit = 250),
        Step::Range(RangeRequest {
            count_only: true,
            ..range("big/", b"big0")
        }),
    ]);
    s
}

/// Zero the ids that legitimately differ between servers.
fn scrub(h: &mut Option<ResponseHeader>) {
    if let Some(h) = h {
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
    }
}

fn scrub_ops(ops: &mut [metastore_proto::etcdserverpb::ResponseOp]) {
    for op in ops {
        match &mut op.response {
            Some(OpResp::ResponseRange(r)) => scrub(&mut r.header),
            Some(OpResp::ResponsePut(r)) => scrub(&mut r.header),
            Some(OpResp::ResponseDeleteRange(r)) => scrub(&mut r.header),
            Some(OpResp::ResponseTxn(r)) => {
                scrub(&mut r.header);
                scrub_ops(&mut r.responses);
            }
            None => {}
        }
    }
}

async fn run(server: &Server) -> Vec<String> {
    let mut kv = server.kv().await;
    let mut out = Vec::new();
    for (i, step) in script().into_iter().enumerate() {
        // The answer's Debug form with etcd's and MetaStore's own ids scrubbed from the header.
        macro_rules! scrubbed {
            ($call:expr $(, |$r:ident| $extra:expr)?) => {
                $call.await.map(|r| {
                    let mut r = r.into_inner();
                    scrub(&mut r.header);
                    $( let $r = &mut r; $extra; )?
                    format!("{r:?}")
                })
            };
        }
        let res = match step.clone() {
            Step::Range(r) => scrubbed!(kv.range(r)),
            Step::Put(r) => scrubbed!(kv.put(r)),
            Step::Delete(r) => scrubbed!(kv.delete_range(r)),
            Step::Txn(r) => scrubbed!(kv.txn(r), |t| scrub_ops(&mut t.responses)),
            Step::Compact(r) => scrubbed!(kv.compact(r)),
        };
        let line = match res {
            Ok(s) => s,
            Err(status) => format!("ERROR {:?}: {}", status.code(), status.message()),
        };
        let summary: String = format!("{step:?}").chars().take(160).collect();
        out.push(format!("#{i} {summary}\n  => {line}"));
    }
    out
}

differential!(run);
