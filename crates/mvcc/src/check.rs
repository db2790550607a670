//! Request validation that etcd performs in its API layer (`v3rpc/key.go`) before proposing.

use std::collections::HashSet;

use metastore_proto::etcdserverpb::{
    request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use crate::MvccError;

/// etcd's `checkRangeRequest`: the key must not be empty.
pub fn check_range(req: &RangeRequest) -> Result<(), MvccError> {
    if req.key.is_empty() {
        return Err(MvccError::EmptyKey);
    }
    Ok(())
}

/// etcd's `checkPutRequest`: a key is required; `ignore_value` forbids a value and
/// `ignore_lease` forbids a lease.
pub fn check_put(req: &PutRequest) -> Result<(), MvccError> {
    if req.key.is_empty() {
        return Err(MvccError::EmptyKey);
    }
    if req.ignore_value && !req.value.is_empty() {
        return Err(MvccError::ValueProvided);
    }
    if req.ignore_lease && req.lease != 0 {
        return Err(MvccError::LeaseProvided);
    }
    Ok(())
}

/// etcd's `checkDeleteRequest`: the key must not be empty.
pub fn check_delete(req: &DeleteRangeRequest) -> Result<(), MvccError> {
    if req.key.is_empty() {
        return Err(MvccError::EmptyKey);
    }
    Ok(())
}

/// etcd's txn validation: the operation count limit (`etcdserver: too many operations in txn
/// request`, with nested txns sharing what their parent leaves), non-empty keys in compares and
/// operations, an operation in every `RequestOp`, then the overlap rules (`etcdserver: duplicate
/// key given in txn request`): no key put twice along one path, and no put inside a range deleted
/// in the same branch, nested txns included.
pub fn check_txn(req: &TxnRequest, max_txn_ops: usize) -> Result<(), MvccError> {
    check_txn_ops(req, max_txn_ops as i64)?;
    check_intervals(&req.success)?;
    check_intervals(&req.failure)?;
    Ok(())
}

fn check_txn_ops(req: &TxnRequest, max_txn_ops: i64) -> Result<(), MvccError> {
    let opc = req
        .compare
        .len()
        .max(req.success.len())
        .max(req.failure.len()) as i64;
    if opc > max_txn_ops {
        return Err(MvccError::TooManyOps);
    }
    if req.compare.iter().any(|c| c.key.is_empty()) {
        return Err(MvccError::EmptyKey);
    }
    for op in req.success.iter().chain(&req.failure) {
        check_request_op(op, max_txn_ops - opc)?;
    }
    Ok(())
}

fn check_request_op(op: &RequestOp, max_txn_ops: i64) -> Result<(), MvccError> {
    match &op.request {
        Some(request_op::Request::RequestRange(r)) => check_range(r),
        Some(request_op::Request::RequestPut(r)) => check_put(r),
        Some(request_op::Request::RequestDeleteRange(r)) => check_delete(r),
        Some(request_op::Request::RequestTxn(t)) => check_txn_ops(t, max_txn_ops),
        // etcd answers an empty operation with ErrGRPCKeyNotFound.
        None => Err(MvccError::KeyNotFound),
    }
}

/// A deleted interval: `[start, end)`, or the single key `start` when `end` is `None`.
struct Deleted {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Deleted {
    /// Whether the delete covers `key`. A `range_end` of `"\0"` is taken literally, as etcd's
    /// interval check does, so it covers nothing.
    fn covers(&self, key: &[u8]) -> bool {
        match &self.end {
            None => self.start == key,
            Some(end) => self.start.as_slice() <= key && key < end.as_slice(),
        }
    }
}

struct Dels(Vec<Deleted>);

impl Dels {
    fn intersects(&self, key: &[u8]) -> bool {
        self.0.iter().any(|d| d.covers(key))
    }
}

/// etcd's `checkIntervals`: returns the keys put and ranges deleted by `reqs`.
fn check_intervals(reqs: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Dels), MvccError> {
    let mut dels = Dels(Vec::new());
    for req in reqs {
        if let Some(request_op::Request::RequestDeleteRange(d)) = &req.request {
            let end = (!d.range_end.is_empty()).then(|| d.range_end.clone());
            dels.0.push(Deleted {
                start: d.key.clone(),
                end,
            });
        }
    }

    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for req in reqs {
        let Some(request_op::Request::RequestTxn(t)) = &req.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || dels.intersects(k) {
                return Err(MvccError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // The same key in both branches of one nested txn is fine: only one branch runs.
            if puts.contains(k) && !puts_then.contains(k) {
                return Err(MvccError::DuplicateKey);
            }
            if dels.intersects(k) {
                return Err(MvccError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.0.extend(dels_then.0);
        dels.0.extend(dels_else.0);
    }

    for req in reqs {
        let Some(request_op::Request::RequestPut(p)) = &req.request else {
            continue;
        };
        if puts.contains(&p.key) || dels.intersects(&p.key) {
            return Err(MvccError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::Compare;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: k.into(),
                    range_end: end.into(),
                    ..Default::default()
                },
            )),
        }
    }
    fn get(k: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }
    fn nested(t: TxnRequest) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestTxn(t)),
        }
    }
    fn msg(r: Result<(), MvccError>) -> &'static str {
        r.err().map(|e| e.etcd_message()).unwrap_or("ok")
    }

    #[test]
    fn single_requests() {
        assert_eq!(
            msg(check_range(&RangeRequest::default())),
            "etcdserver: key is not provided"
        );
        assert_eq!(
            msg(check_delete(&DeleteRangeRequest::default())),
            "etcdserver: key is not provided"
        );
        let mut p = PutRequest {
            key: b"k".to_vec(),
            ..Default::default()
        };
        assert_eq!(msg(check_put(&p)), "ok");
        p.ignore_value = true;
        p.value = b"v".to_vec();
        assert_eq!(msg(check_put(&p)), "etcdserver: value is provided");
        p.ignore_value = false;
        p.ignore_lease = true;
        p.lease = 7;
        assert_eq!(msg(check_put(&p)), "etcdserver: lease is provided");
        p.key.clear();
        assert_eq!(msg(check_put(&p)), "etcdserver: key is not provided");
    }

    #[test]
    fn duplicate_puts_and_overlapping_deletes() {
        let dup = "etcdserver: duplicate key given in txn request";
        assert_eq!(
            msg(check_txn(&txn(vec![put("a"), put("a")], vec![]), 128)),
            dup
        );
        assert_eq!(
            msg(check_txn(&txn(vec![put("a")], vec![put("a")]), 128)),
            "ok"
        );
        assert_eq!(
            msg(check_txn(&txn(vec![del("a", ""), put("a")], vec![]), 128)),
            dup
        );
        assert_eq!(
            msg(check_txn(&txn(vec![del("a", "c"), put("b")], vec![]), 128)),
            dup
        );
        assert_eq!(
            msg(check_txn(&txn(vec![del("a", "c"), put("c")], vec![]), 128)),
            "ok"
        );
        assert_eq!(
            msg(check_txn(
                &txn(vec![del("a", ""), del("a", "")], vec![]),
                128
            )),
            "ok"
        );
        assert_eq!(
            msg(check_txn(&txn(vec![get("a"), put("a")], vec![]), 128)),
            "ok"
        );
        // "\0" as range end is taken literally by etcd's interval check.
        assert_eq!(
            msg(check_txn(&txn(vec![del("a", "\0"), put("b")], vec![]), 128)),
            "ok"
        );
    }

    #[test]
    fn nested_txn_overlaps() {
        let dup = "etcdserver: duplicate key given in txn request";
        let inner = txn(vec![put("a")], vec![put("a")]);
        assert_eq!(
            msg(check_txn(&txn(vec![nested(inner.clone())], vec![]), 128)),
            "ok"
        );
        assert_eq!(
            msg(check_txn(
                &txn(vec![nested(inner.clone()), put("a")], vec![]),
                128
            )),
            dup
        );
        assert_eq!(
            msg(check_txn(
                &txn(vec![del("a", "b"), nested(inner.clone())], vec![]),
                128
            )),
            dup
        );
        let inner_del = txn(vec![del("x", "z")], vec![]);
        assert_eq!(
            msg(check_txn(
                &txn(vec![nested(inner_del), put("y")], vec![]),
                128
            )),
            dup
        );
        let bad_inner = txn(vec![put("q"), put("q")], vec![]);
        assert_eq!(
            msg(check_txn(&txn(vec![], vec![nested(bad_inner)]), 128)),
            dup
        );
    }

    #[test]
    fn op_limits_and_keys() {
        let many = "etcdserver: too many operations in txn request";
        let t = txn(vec![put("a"), put("b"), put("c")], vec![]);
        assert_eq!(msg(check_txn(&t, 3)), "ok");
        assert_eq!(msg(check_txn(&t, 2)), many);
        // A nested txn gets what its parent leaves: 3 - 2 = 1 < 2.
        let t = txn(
            vec![nested(txn(vec![put("x"), put("y")], vec![])), put("z")],
            vec![],
        );
        assert_eq!(msg(check_txn(&t, 3)), many);
        assert_eq!(msg(check_txn(&t, 4)), "ok");
        let mut t = txn(vec![], vec![]);
        t.compare.push(Compare::default());
        assert_eq!(msg(check_txn(&t, 8)), "etcdserver: key is not provided");
        let t = txn(vec![RequestOp { request: None }], vec![]);
        assert_eq!(msg(check_txn(&t, 8)), "etcdserver: key not found");
        let t = txn(vec![put("")], vec![]);
        assert_eq!(msg(check_txn(&t, 8)), "etcdserver: key is not provided");
    }
}
