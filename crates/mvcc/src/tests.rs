//! Store tests on the in-memory engine.
//!
//! Owns what the tests share: the [`Harness`] (a store over a [`MemBackend`] seen through
//! [`Copying`], applying writes with their own applied index) and the request builders. The
//! tests are in the submodules, one topic each.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use metastore_proto::etcdserverpb::{
    compare, range_request, request_op, response_op, CompactionRequest, Compare,
    DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest,
    TxnResponse,
};
use metastore_proto::mvccpb::{event::EventType, KeyValue};
use metastore_storage::{Backend, ReadView, ScanRange, Visit, WriteBatch};
use metastore_storage_mem::MemBackend;
use prost::Message;

use crate::*;

/// Leases 7 and 8 exist.
fn leases(id: i64) -> bool {
    id == 7 || id == 8
}

mod compaction;
mod errors;
mod hashes;
mod persistence;
mod ranges;
mod revisions;
mod txns;
mod writes;

struct Harness {
    backend: Arc<dyn Backend>,
    store: Store,
    applied_index: u64,
}

/// The memory engine as an engine whose reads copy (as RocksDB's do), so that the store keeps
/// its cache of values over it and every store test goes through that cache; counts the values
/// read from the engine.
struct Copying {
    engine: MemBackend,
    value_reads: Arc<AtomicUsize>,
}

struct CopyingView {
    view: Arc<dyn ReadView>,
    value_reads: Arc<AtomicUsize>,
}

impl Copying {
    fn new() -> Self {
        Copying {
            engine: MemBackend::new(&["key", "meta", "app"]),
            value_reads: Arc::default(),
        }
    }
}

impl ReadView for CopyingView {
    fn get(&self, bucket: &str, key: &[u8]) -> metastore_storage::Result<Option<Vec<u8>>> {
        if bucket == KEY_BUCKET {
            self.value_reads.fetch_add(1, Ordering::Relaxed);
        }
        self.view.get(bucket, key)
    }

    fn scan(
        &self,
        bucket: &str,
        range: ScanRange<'_>,
        visitor: &mut dyn FnMut(&[u8], &[u8]) -> Visit,
    ) -> metastore_storage::Result<usize> {
        self.view.scan(bucket, range, visitor)
    }
}

impl Backend for Copying {
    fn engine_name(&self) -> &'static str {
        "copying-memory"
    }
    fn buckets(&self) -> Vec<&'static str> {
        self.engine.buckets()
    }
    fn write(&self, batch: WriteBatch) -> metastore_storage::Result<()> {
        self.engine.write(batch)
    }
    fn snapshot(&self) -> metastore_storage::Result<Arc<dyn ReadView>> {
        Ok(Arc::new(CopyingView {
            view: self.engine.snapshot()?,
            value_reads: self.value_reads.clone(),
        }))
    }
    fn size(&self) -> metastore_storage::Result<metastore_storage::SizeInfo> {
        self.engine.size()
    }
    fn defragment(&self) -> metastore_storage::Result<()> {
        self.engine.defragment()
    }
    fn import(&self, reader: &mut dyn std::io::Read) -> metastore_storage::Result<()> {
        self.engine.import(reader)
    }
}

impl Harness {
    fn new() -> Self {
        Harness::on(Arc::new(Copying::new()))
    }

    /// A harness over `backend`, opened with etcd's default compaction pacing.
    fn on(backend: Arc<dyn Backend>) -> Self {
        let store = Store::open(backend.clone()).expect("open empty store");
        Harness {
            backend,
            store,
            applied_index: 0,
        }
    }

    fn apply(&mut self, req: WriteRequest) -> Result<Applied, MvccError> {
        self.applied_index += 1;
        self.store
            .apply_write(req, &leases, self.applied_index, WriteBatch::new())
    }

    fn put(&mut self, key: &str, value: &str) -> Applied {
        self.apply(WriteRequest::Put(put_req(key, value)))
            .expect("put")
    }

    fn del(&mut self, key: &str, end: &str) -> Applied {
        self.apply(WriteRequest::DeleteRange(DeleteRangeRequest {
            prev_kv: true,
            ..del_req(key, end)
        }))
        .expect("delete")
    }

    fn txn(&mut self, txn: TxnRequest) -> Result<(TxnResponse, Applied), MvccError> {
        let applied = self.apply(WriteRequest::Txn(txn))?;
        match &applied.response {
            WriteResponse::Txn(t) => Ok((t.clone(), applied)),
            other => panic!("not a txn response: {other:?}"),
        }
    }

    /// A physical compaction: applied, then waited for until the worker finished deleting.
    fn compact(&mut self, revision: i64) -> Result<Applied, MvccError> {
        let applied = self.schedule_compaction(revision)?;
        assert!(self.store.wait_compaction(revision).expect("compaction"));
        Ok(applied)
    }

    /// Apply a Compact and return at once: the worker deletes in the background.
    fn schedule_compaction(&mut self, revision: i64) -> Result<Applied, MvccError> {
        self.apply(WriteRequest::Compact(CompactionRequest {
            revision,
            physical: false,
        }))
    }

    fn get_at(&self, key: &str, revision: i64) -> Result<Option<KeyValue>, MvccError> {
        let resp = self.store.range(&RangeRequest {
            key: key.into(),
            revision,
            ..Default::default()
        })?;
        Ok(resp.kvs.into_iter().next())
    }

    fn get(&self, key: &str) -> Option<KeyValue> {
        self.get_at(key, 0).expect("get")
    }

    /// A range, also read for the wire ([`Store::range_frame_with_revision`]): both must
    /// give the same answer and the same bytes.
    fn range(&self, req: RangeRequest) -> RangeResponse {
        let (resp, revision) = self.store.range_with_revision(&req).expect("range");
        let (frame, frame_revision) = self
            .store
            .range_frame_with_revision(&req)
            .expect("range for the wire");
        assert_eq!(frame_revision, revision, "{req:?}");
        assert_eq!(frame.encode_to_vec(), resp.encode_to_vec(), "{req:?}");
        assert_eq!(frame.into_response().unwrap(), resp, "{req:?}");
        resp
    }

    /// Every key of the `key` bucket as (main, sub, tombstone).
    fn stored_revisions(&self) -> Vec<(i64, i64, bool)> {
        let view = self.backend.snapshot().unwrap();
        view.collect("key", ScanRange::all())
            .unwrap()
            .into_iter()
            .map(|(k, _)| {
                let (r, t) = Revision::from_key(&k).unwrap();
                (r.main, r.sub, t)
            })
            .collect()
    }

    fn reopen(&self) -> Store {
        Store::open(self.backend.clone()).expect("reopen")
    }
}

fn put_req(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

fn op_put_req(req: PutRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(req)),
    }
}

fn op_put(key: &str, value: &str) -> RequestOp {
    op_put_req(put_req(key, value))
}

fn op_range(req: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(req)),
    }
}

fn op_get(key: &str, end: &str) -> RequestOp {
    op_range(all(key, end))
}

fn del_req(key: &str, end: &str) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: key.into(),
        range_end: end.into(),
        prev_kv: false,
    }
}

fn op_del(key: &str, end: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(del_req(key, end))),
    }
}

fn op_txn(t: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestTxn(t)),
    }
}

fn cmp(
    key: &str,
    end: &str,
    target: compare::CompareTarget,
    result: compare::CompareResult,
    value: compare::TargetUnion,
) -> Compare {
    Compare {
        key: key.into(),
        range_end: end.into(),
        target: target as i32,
        result: result as i32,
        target_union: Some(value),
    }
}

fn keys(resp: &RangeResponse) -> Vec<String> {
    resp.kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect()
}

fn range_resp(t: &TxnResponse, i: usize) -> &RangeResponse {
    match &t.responses[i].response {
        Some(response_op::Response::ResponseRange(r)) => r,
        other => panic!("not a range response: {other:?}"),
    }
}

/// Keys a..e written so that versions, create and mod revisions and values all differ.
fn range_fixture() -> Harness {
    let mut h = Harness::new();
    h.put("c", "3"); // 2
    h.put("a", "5"); // 3
    h.put("e", "1"); // 4
    h.put("b", "4"); // 5
    h.put("d", "2"); // 6
    h.put("a", "5"); // 7: a v2
    h.put("d", "2"); // 8: d v2
    h.put("d", "2"); // 9: d v3
    h.put("zz", "0"); // 10, outside most ranges
    h
}

fn all(key: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        range_end: end.into(),
        ..Default::default()
    }
}
