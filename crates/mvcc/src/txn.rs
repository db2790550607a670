//! Executing requests against the index and a backend view (etcd's `kvstore_txn.go` and the
//! backend applier's Range / Put / DeleteRange / Txn).
//!
//! A [`Tx`] reads the committed state through the index and a backend snapshot, and keeps its own
//! writes in an overlay until the store commits them. Reads at the txn's own revision see the
//! overlay, so a Range inside a write txn sees the txn's earlier writes, as in etcd.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use metastore_proto::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};
use prost::bytes::Bytes;
use prost::Message;

use crate::key_index::{Index, KeyRange};
use crate::metrics::OpCounts;
use crate::revision::Revision;
use crate::values::{not_stored, Values};
use crate::{LeaseLookup, MvccError};

/// A key chosen by a range: either a stored revision or a value written earlier in this txn.
pub(crate) enum Selected {
    Stored(Revision),
    Pending(KeyValue),
}

/// Pick the keys of `range` that exist at `at_rev`: the first `limit` of them (all when `limit`
/// is 0) and how many there are in total. Keys written by the txn (`pending`) count only when
/// `at_rev` is past `base_rev`, i.e. at the txn's own revision.
pub(crate) fn select(
    index: &Index,
    pending: &BTreeMap<Vec<u8>, Option<KeyValue>>,
    base_rev: i64,
    range: KeyRange<'_>,
    at_rev: i64,
    limit: usize,
) -> (Vec<Selected>, usize) {
    let mut out = Vec::new();
    let mut total = 0usize;
    let mut take = |item: Option<Selected>| {
        if let Some(item) = item {
            total += 1;
            if limit == 0 || out.len() < limit {
                out.push(item);
            }
        }
    };
    let stored =
        |ki: &crate::key_index::KeyIndex| ki.get(at_rev).map(|k| Selected::Stored(k.modified));
    let overlay = |v: &Option<KeyValue>| v.clone().map(Selected::Pending);

    if at_rev <= base_rev || pending.is_empty() {
        for (_, ki) in index.iter_range(range) {
            take(stored(ki));
        }
        return (out, total);
    }

    let Some(bounds) = range.bounds() else {
        return (out, total);
    };
    let mut base = index.iter_range(range).peekable();
    let mut over = pending.range::<[u8], _>(bounds).peekable();
    loop {
        let order = match (base.peek(), over.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((bk, _)), Some((ok, _))) => (*bk).cmp(ok.as_slice()),
        };
        match order {
            Ordering::Less => {
                let (_, ki) = base.next().expect("peeked");
                take(stored(ki));
            }
            Ordering::Greater => {
                let (_, v) = over.next().expect("peeked");
                take(overlay(v));
            }
            Ordering::Equal => {
                base.next();
                let (_, v) = over.next().expect("peeked");
                take(overlay(v));
            }
        }
    }
    (out, total)
}

/// Read the values of selected keys.
pub(crate) fn fetch(
    values: Values<'_>,
    selected: Vec<Selected>,
) -> Result<Vec<KeyValue>, MvccError> {
    resolve(values, selected, Ok, |stored| decode_kv(&stored))
}

/// The stored encodings of `selected` (a pending key-value, which only a txn has, is encoded),
/// shared with the engine or the store's cache where they can be ([`Values::stored_many`]).
pub(crate) fn fetch_encoded(
    values: Values<'_>,
    selected: Vec<Selected>,
) -> Result<Vec<Bytes>, MvccError> {
    resolve(values, selected, |kv| Ok(kv.encode_to_vec().into()), Ok)
}

/// `selected` in order, each pending key-value through `pending` and each stored one, read in
/// one [`Values::stored_many`], through `stored`.
fn resolve<T>(
    values: Values<'_>,
    selected: Vec<Selected>,
    pending: impl Fn(KeyValue) -> Result<T, MvccError>,
    stored: impl Fn(Bytes) -> Result<T, MvccError>,
) -> Result<Vec<T>, MvccError> {
    let mut read = values
        .stored_many(&stored_revisions(&selected))?
        .into_iter();
    selected
        .into_iter()
        .map(|s| match s {
            Selected::Pending(kv) => pending(kv),
            Selected::Stored(rev) => stored(read.next().ok_or_else(|| not_stored(rev))?),
        })
        .collect()
}

fn stored_revisions(selected: &[Selected]) -> Vec<Revision> {
    selected
        .iter()
        .filter_map(|s| match s {
            Selected::Stored(rev) => Some(*rev),
            Selected::Pending(_) => None,
        })
        .collect()
}

/// Whether a range's answer is its key-values exactly as stored, in key order, cut at the
/// limit: what [`finish_range`] leaves unchanged but for the limit.
pub(crate) fn takes_stored_encodings(req: &RangeRequest) -> bool {
    req.sort_order == range_request::SortOrder::None as i32
        && req.sort_target == range_request::SortTarget::Key as i32
        && req.min_mod_revision == 0
        && req.max_mod_revision == 0
        && req.min_create_revision == 0
        && req.max_create_revision == 0
        && !req.keys_only
}

/// Decode a stored `mvccpb.KeyValue`.
pub(crate) fn decode_kv(bytes: &[u8]) -> Result<KeyValue, MvccError> {
    KeyValue::decode(bytes).map_err(|e| MvccError::Corrupt(format!("undecodable KeyValue: {e}")))
}

/// What a range request resolves to before touching the index.
pub(crate) struct RangePlan {
    /// The revision to read at.
    pub at_rev: i64,
    /// How many keys to fetch (0 = all): one more than the limit, to know about `more`, unless
    /// sorting or filtering needs every key first.
    pub fetch_limit: usize,
}

/// etcd's checks and limit arithmetic for a range read at `cur_rev`.
pub(crate) fn plan_range(
    req: &RangeRequest,
    cur_rev: i64,
    compact_rev: i64,
) -> Result<RangePlan, MvccError> {
    let mut limit = req.limit;
    if req.sort_order != range_request::SortOrder::None as i32
        || req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0
    {
        limit = 0;
    }
    let fetch_limit = if limit > 0 {
        usize::try_from(limit.saturating_add(1)).unwrap_or(0)
    } else {
        0
    };
    if req.revision > cur_rev {
        return Err(MvccError::FutureRev);
    }
    let at_rev = if req.revision <= 0 {
        cur_rev
    } else {
        req.revision
    };
    if at_rev < compact_rev {
        return Err(MvccError::Compacted);
    }
    Ok(RangePlan {
        at_rev,
        fetch_limit,
    })
}

/// etcd's post-processing of a range: min/max filters, sorting (then truncation to the limit,
/// setting `more`), `keys_only`, and the count of every key in range at the revision.
pub(crate) fn finish_range(
    req: &RangeRequest,
    mut kvs: Vec<KeyValue>,
    total: usize,
) -> RangeResponse {
    if req.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= req.max_mod_revision);
    }
    if req.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= req.min_mod_revision);
    }
    if req.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= req.max_create_revision);
    }
    if req.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= req.min_create_revision);
    }

    use range_request::{SortOrder, SortTarget};
    let mut order = req.sort_order;
    if req.sort_target != SortTarget::Key as i32 && order == SortOrder::None as i32 {
        order = SortOrder::Ascend as i32;
    }
    // Keys come out of the index ascending; a stable sort keeps equal elements in key order.
    let cmp: Option<fn(&KeyValue, &KeyValue) -> Ordering> =
        match SortTarget::try_from(req.sort_target) {
            Ok(SortTarget::Key) => Some(|a, b| a.key.cmp(&b.key)),
            Ok(SortTarget::Version) => Some(|a, b| a.version.cmp(&b.version)),
            Ok(SortTarget::Create) => Some(|a, b| a.create_revision.cmp(&b.create_revision)),
            Ok(SortTarget::Mod) => Some(|a, b| a.mod_revision.cmp(&b.mod_revision)),
            Ok(SortTarget::Value) => Some(|a, b| a.value.cmp(&b.value)),
            Err(_) => None,
        };
    if let Some(cmp) = cmp {
        if order == SortOrder::Ascend as i32 {
            kvs.sort_by(cmp);
        } else if order == SortOrder::Descend as i32 {
            kvs.sort_by(|a, b| cmp(b, a));
        }
    }

    let mut more = false;
    if req.limit > 0 && kvs.len() as i64 > req.limit {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    RangeResponse {
        header: None,
        kvs,
        more,
        count: total as i64,
    }
}

/// A header carrying only a revision, as etcd sets on responses nested in a txn.
fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// One change to write to the `key` bucket and replay into the index on commit.
pub(crate) struct Change {
    pub key: Vec<u8>,
    pub rev: Revision,
    pub tombstone: bool,
    pub value: Vec<u8>,
}

/// A transaction over the committed state plus its own pending writes.
pub(crate) struct Tx<'a> {
    index: &'a Index,
    values: Values<'a>,
    base_rev: i64,
    compact_rev: i64,
    /// Keys this txn changed: `Some` = put, `None` = deleted.
    pending: BTreeMap<Vec<u8>, Option<KeyValue>>,
    changes: Vec<Change>,
    events: Vec<Event>,
    /// The operations of the txn branches run so far (`etcd_mvcc_*_total`).
    pub(crate) ops: OpCounts,
}

impl<'a> Tx<'a> {
    /// A txn starting at committed revision `base_rev`.
    pub(crate) fn new(
        index: &'a Index,
        values: Values<'a>,
        base_rev: i64,
        compact_rev: i64,
    ) -> Self {
        Tx {
            index,
            values,
            base_rev,
            compact_rev,
            pending: BTreeMap::new(),
            changes: Vec::new(),
            events: Vec::new(),
            ops: OpCounts::default(),
        }
    }

    /// The revision reads inside the txn see: the base, or the txn's own revision once it wrote.
    pub(crate) fn cur_rev(&self) -> i64 {
        if self.changes.is_empty() {
            self.base_rev
        } else {
            self.base_rev + 1
        }
    }

    /// The changes and events produced, in sub-revision order.
    pub(crate) fn into_parts(self) -> (Vec<Change>, Vec<Event>) {
        (self.changes, self.events)
    }

    fn select(&self, range: KeyRange<'_>, at_rev: i64, limit: usize) -> (Vec<Selected>, usize) {
        select(
            self.index,
            &self.pending,
            self.base_rev,
            range,
            at_rev,
            limit,
        )
    }

    fn range_all(&self, range: KeyRange<'_>) -> Result<Vec<KeyValue>, MvccError> {
        let (selected, _) = self.select(range, self.cur_rev(), 0);
        fetch(self.values, selected)
    }

    fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, MvccError> {
        Ok(self.range_all(KeyRange::Single(key))?.pop())
    }

    /// A Range request; the response header carries the revision read at.
    pub(crate) fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        let cur = self.cur_rev();
        let plan = plan_range(req, cur, self.compact_rev)?;
        let range = KeyRange::from_request(&req.key, &req.range_end);
        let (kvs, total) = if req.count_only {
            (Vec::new(), self.select(range, plan.at_rev, 1).1)
        } else {
            let (selected, total) = self.select(range, plan.at_rev, plan.fetch_limit);
            (fetch(self.values, selected)?, total)
        };
        let mut resp = finish_range(req, kvs, total);
        resp.header = header(cur);
        Ok(resp)
    }

    /// The create revision and version of `key` as this txn sees it (its own writes included),
    /// from the index alone: no value is read.
    fn existing(&self, key: &[u8]) -> Option<(i64, i64)> {
        if let Some(written) = self.pending.get(key) {
            return written.as_ref().map(|kv| (kv.create_revision, kv.version));
        }
        let (_, ki) = self.index.iter_range(KeyRange::Single(key)).next()?;
        ki.get(self.base_rev)
            .map(|at| (at.created.main, at.version))
    }

    /// Writes `key`. `existing` is the key's (create revision, version) if it exists; `prev` its
    /// previous value when the request needed it (the event carries it then).
    fn put(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
        existing: Option<(i64, i64)>,
        prev: Option<KeyValue>,
    ) {
        let rev = Revision::new(self.base_rev + 1, self.changes.len() as i64);
        let (create_revision, version) = match existing {
            Some((created, version)) => (created, version + 1),
            None => (rev.main, 1),
        };
        let kv = KeyValue {
            key: key.clone(),
            create_revision,
            mod_revision: rev.main,
            version,
            value,
            lease,
        };
        self.changes.push(Change {
            key: key.clone(),
            rev,
            tombstone: false,
            value: kv.encode_to_vec(),
        });
        self.pending.insert(key, Some(kv.clone()));
        self.events.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: prev,
        });
    }

    fn delete(&mut self, prev: KeyValue) {
        let rev = Revision::new(self.base_rev + 1, self.changes.len() as i64);
        let key = prev.key.clone();
        let tombstone = KeyValue {
            key: key.clone(),
            ..Default::default()
        };
        self.changes.push(Change {
            key: key.clone(),
            rev,
            tombstone: true,
            value: tombstone.encode_to_vec(),
        });
        self.pending.insert(key.clone(), None);
        let kv = KeyValue {
            key,
            mod_revision: rev.main,
            ..Default::default()
        };
        self.events.push(Event {
            r#type: EventType::Delete as i32,
            kv: Some(kv),
            prev_kv: Some(prev),
        });
    }

    /// A Put request. At top level the lease is checked first, as etcd does before opening its
    /// write txn; inside a txn the checks already ran in [`Tx::check_put`].
    pub(crate) fn apply_put(
        &mut self,
        req: &PutRequest,
        leases: &dyn LeaseLookup,
        top_level: bool,
    ) -> Result<PutResponse, MvccError> {
        if top_level && req.lease != 0 && !leases.exists(req.lease) {
            return Err(MvccError::LeaseNotFound);
        }
        // The previous value is read only when the request needs it: a plain put learns the
        // key's create revision and version from the index, as etcd's does. (Watchers that
        // want previous values read them themselves; leases track their keys by key.)
        let needs_prev = req.prev_kv || req.ignore_value || req.ignore_lease;
        let prev = if needs_prev {
            self.get(&req.key)?
        } else {
            None
        };
        if (req.ignore_value || req.ignore_lease) && prev.is_none() {
            return Err(MvccError::KeyNotFound);
        }
        let existing = match &prev {
            Some(p) => Some((p.create_revision, p.version)),
            None if needs_prev => None,
            None => self.existing(&req.key),
        };
        let value = match (&prev, req.ignore_value) {
            (Some(p), true) => p.value.clone(),
            _ => req.value.clone(),
        };
        let lease = match (&prev, req.ignore_lease) {
            (Some(p), true) => p.lease,
            _ => req.lease,
        };
        let prev_kv = if req.prev_kv { prev.clone() } else { None };
        self.put(req.key.clone(), value, lease, existing, prev);
        Ok(PutResponse {
            header: header(self.base_rev + 1),
            prev_kv,
        })
    }

    /// A DeleteRange request: tombstones every key live in range at the txn's revision.
    pub(crate) fn apply_delete(
        &mut self,
        req: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, MvccError> {
        let prevs = self.range_all(KeyRange::from_request(&req.key, &req.range_end))?;
        for kv in &prevs {
            self.delete(kv.clone());
        }
        let deleted = prevs.len() as i64;
        Ok(DeleteRangeResponse {
            header: header(self.cur_rev()),
            deleted,
            prev_kvs: if req.prev_kv { prevs } else { Vec::new() },
        })
    }

    /// A Txn request: compares and per-branch checks against the state before the txn, then
    /// the chosen branches in order.
    pub(crate) fn apply_txn(
        &mut self,
        rt: &TxnRequest,
        leases: &dyn LeaseLookup,
    ) -> Result<TxnResponse, MvccError> {
        let mut path = Vec::new();
        self.compare_to_path(rt, &mut path)?;
        if !is_txn_read_only(rt) {
            self.check_requests(rt, &path, &mut 0, &mut |tx, op| tx.check_put(op, leases))?;
        }
        self.check_requests(rt, &path, &mut 0, &mut |tx, op| tx.check_range(op))?;
        let mut resp = self.run_txn(rt, &path, &mut 0, leases)?;
        resp.header = header(self.cur_rev());
        Ok(resp)
    }

    fn compare_to_path(&self, rt: &TxnRequest, path: &mut Vec<bool>) -> Result<(), MvccError> {
        let mut succeeded = true;
        for c in &rt.compare {
            if !self.compare(c)? {
                succeeded = false;
                break;
            }
        }
        path.push(succeeded);
        for op in branch(rt, succeeded) {
            if let Some(request_op::Request::RequestTxn(t)) = &op.request {
                self.compare_to_path(t, path)?;
            }
        }
        Ok(())
    }

    fn compare(&self, c: &Compare) -> Result<bool, MvccError> {
        let kvs = self.range_all(KeyRange::from_request(&c.key, &c.range_end))?;
        if kvs.is_empty() {
            if c.target == compare::CompareTarget::Value as i32 {
                return Ok(false);
            }
            return Ok(compare_kv(c, &KeyValue::default()));
        }
        Ok(kvs.iter().all(|kv| compare_kv(c, kv)))
    }

    fn check_requests(
        &self,
        rt: &TxnRequest,
        path: &[bool],
        pos: &mut usize,
        f: &mut dyn FnMut(&Self, &RequestOp) -> Result<(), MvccError>,
    ) -> Result<(), MvccError> {
        let succeeded = path[*pos];
        *pos += 1;
        for op in branch(rt, succeeded) {
            match &op.request {
                Some(request_op::Request::RequestTxn(t)) => self.check_requests(t, path, pos, f)?,
                _ => f(self, op)?,
            }
        }
        Ok(())
    }

    fn check_put(&self, op: &RequestOp, leases: &dyn LeaseLookup) -> Result<(), MvccError> {
        let Some(request_op::Request::RequestPut(req)) = &op.request else {
            return Ok(());
        };
        if (req.ignore_value || req.ignore_lease) && self.get(&req.key)?.is_none() {
            return Err(MvccError::KeyNotFound);
        }
        if req.lease != 0 && !leases.exists(req.lease) {
            return Err(MvccError::LeaseNotFound);
        }
        Ok(())
    }

    fn check_range(&self, op: &RequestOp) -> Result<(), MvccError> {
        let Some(request_op::Request::RequestRange(req)) = &op.request else {
            return Ok(());
        };
        if req.revision == 0 {
            Ok(())
        } else if req.revision > self.base_rev {
            Err(MvccError::FutureRev)
        } else if req.revision < self.compact_rev {
            Err(MvccError::Compacted)
        } else {
            Ok(())
        }
    }

    fn run_txn(
        &mut self,
        rt: &TxnRequest,
        path: &[bool],
        pos: &mut usize,
        leases: &dyn LeaseLookup,
    ) -> Result<TxnResponse, MvccError> {
        let succeeded = path[*pos];
        *pos += 1;
        let mut responses = Vec::new();
        for op in branch(rt, succeeded) {
            let response = match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    self.ops.ranges += 1;
                    Some(response_op::Response::ResponseRange(self.range(r)?))
                }
                Some(request_op::Request::RequestPut(r)) => {
                    self.ops.puts += 1;
                    Some(response_op::Response::ResponsePut(
                        self.apply_put(r, leases, false)?,
                    ))
                }
                Some(request_op::Request::RequestDeleteRange(r)) => {
                    self.ops.deletes += 1;
                    Some(response_op::Response::ResponseDeleteRange(
                        self.apply_delete(r)?,
                    ))
                }
                Some(request_op::Request::RequestTxn(t)) => {
                    let mut nested = self.run_txn(t, path, pos, leases)?;
                    // etcd leaves a nested txn's header empty.
                    nested.header = Some(ResponseHeader::default());
                    Some(response_op::Response::ResponseTxn(nested))
                }
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok(TxnResponse {
            header: None,
            succeeded,
            responses,
        })
    }
}

fn branch(rt: &TxnRequest, succeeded: bool) -> &[RequestOp] {
    if succeeded {
        &rt.success
    } else {
        &rt.failure
    }
}

/// Whether every operation of both branches is a Range (etcd's `isTxnReadonly`): such a txn
/// changes nothing and etcd serves it without consensus. As in etcd, a nested txn counts as a
/// write even when it only reads.
pub fn is_txn_read_only(rt: &TxnRequest) -> bool {
    rt.success
        .iter()
        .chain(&rt.failure)
        .all(|op| matches!(op.request, Some(request_op::Request::RequestRange(_))))
}

/// etcd's `compareKV`: compare one key's state with a compare's target value.
fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let result = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Value) => {
            let v: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(v)
        }
        Ok(CompareTarget::Create) => {
            let rev = match c.target_union {
                Some(TargetUnion::CreateRevision(r)) => r,
                _ => 0,
            };
            kv.create_revision.cmp(&rev)
        }
        Ok(CompareTarget::Mod) => {
            let rev = match c.target_union {
                Some(TargetUnion::ModRevision(r)) => r,
                _ => 0,
            };
            kv.mod_revision.cmp(&rev)
        }
        Ok(CompareTarget::Version) => {
            let v = match c.target_union {
                Some(TargetUnion::Version(v)) => v,
                _ => 0,
            };
            kv.version.cmp(&v)
        }
        Ok(CompareTarget::Lease) => {
            let l = match c.target_union {
                Some(TargetUnion::Lease(l)) => l,
                _ => 0,
            };
            kv.lease.cmp(&l)
        }
        Err(_) => Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => result == Ordering::Equal,
        Ok(CompareResult::NotEqual) => result != Ordering::Equal,
        Ok(CompareResult::Greater) => result == Ordering::Greater,
        Ok(CompareResult::Less) => result == Ordering::Less,
        Err(_) => true,
    }
}
