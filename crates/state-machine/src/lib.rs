//! The replicated state machine.
//!
//! Owns: decoding committed raft entries (`metastorepb::InternalRaftRequest`) and applying them
//! deterministically — no wall clock, no local randomness — to the mvcc store; raft snapshots
//! (export/import of the backend) and the applied index, which mvcc persists atomically with every
//! change it makes (etcd's `consistent_index`).
//!
//! Exposes [`KvStateMachine`] (the `raft_node::StateMachine` implementation), [`StoreHandle`] (how
//! the read path reaches the current mvcc store, which a snapshot restore replaces) and
//! [`encode_request`].
//!
//! Must not depend on: gRPC services, the engine choice (it holds an `Arc<dyn Backend>`).

use std::io::{Read, Write};
use std::sync::Arc;

use metastore_mvcc::{Applied, LeaseLookup, MvccError, Store, WriteRequest};
use metastore_proto::metastorepb::{internal_raft_request::Request, InternalRaftRequest};
use metastore_raft_node::StateMachine;
use metastore_storage::{Backend, StorageError};
use parking_lot::RwLock;
use prost::Message;

/// Every bucket the server opens its backend with.
pub fn buckets() -> Vec<&'static str> {
    metastore_mvcc::BUCKETS.to_vec()
}

/// Why a committed entry produced no result. Deterministic: every member gets the same one.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The request was refused by mvcc (compacted revision, unknown lease, …).
    #[error(transparent)]
    Mvcc(#[from] MvccError),
    /// The entry is not a request this version understands.
    #[error("etcdserver: unsupported request in raft entry: {0}")]
    Unsupported(String),
}

/// What applying one entry gives its proposer.
pub type ApplyOutput = Result<Applied, ApplyError>;

/// Encode a request as the payload of a raft entry.
pub fn encode_request(request: Request) -> Vec<u8> {
    InternalRaftRequest {
        header: None,
        request: Some(request),
    }
    .encode_to_vec()
}

/// Shared access to the current mvcc store. A snapshot restore swaps in a new store; readers
/// always get a complete one.
#[derive(Clone)]
pub struct StoreHandle(Arc<RwLock<Arc<Store>>>);

impl StoreHandle {
    /// Wrap an opened store.
    pub fn new(store: Store) -> Self {
        StoreHandle(Arc::new(RwLock::new(Arc::new(store))))
    }
    /// The store to read from now.
    pub fn current(&self) -> Arc<Store> {
        self.0.read().clone()
    }
    fn replace(&self, store: Store) {
        *self.0.write() = Arc::new(store);
    }
}

/// No lease exists until the Lease service lands: a Put naming a lease is refused with etcd's
/// `requested lease not found`, exactly as etcd answers for an unknown lease.
struct NoLeases;

impl LeaseLookup for NoLeases {
    fn exists(&self, _lease_id: i64) -> bool {
        false
    }
}

/// The state machine that raft-node drives.
pub struct KvStateMachine {
    backend: Arc<dyn Backend>,
    store: StoreHandle,
}

impl KvStateMachine {
    /// Open the mvcc store on `backend` (which must hold [`buckets`]).
    pub fn open(backend: Arc<dyn Backend>) -> Result<Self, MvccError> {
        let store = Store::open(backend.clone())?;
        Ok(KvStateMachine {
            backend,
            store: StoreHandle::new(store),
        })
    }

    /// The handle the read path uses.
    pub fn store(&self) -> StoreHandle {
        self.store.clone()
    }

    fn apply_request(&mut self, index: u64, request: Request) -> ApplyOutput {
        let store = self.store.current();
        let write = match request {
            Request::Put(r) => WriteRequest::Put(r),
            Request::DeleteRange(r) => WriteRequest::DeleteRange(r),
            Request::Txn(r) => WriteRequest::Txn(r),
            Request::Compaction(r) => WriteRequest::Compact(r),
            other => return Err(ApplyError::Unsupported(format!("{other:?}"))),
        };
        Ok(store.apply_write(write, &NoLeases, index, Default::default())?)
    }
}

impl StateMachine for KvStateMachine {
    type Output = ApplyOutput;

    fn applied_index(&self) -> u64 {
        self.store.current().consistent_index()
    }

    fn apply(&mut self, index: u64, _term: u64, payload: &[u8]) -> ApplyOutput {
        let result = match InternalRaftRequest::decode(payload) {
            Ok(InternalRaftRequest {
                request: Some(request),
                ..
            }) => self.apply_request(index, request),
            Ok(_) => Err(ApplyError::Unsupported("empty request".into())),
            Err(e) => Err(ApplyError::Unsupported(format!("undecodable entry: {e}"))),
        };
        if result.is_err() {
            // A refused request changes no state, but the entry is applied all the same.
            if let Err(e) = self
                .store
                .current()
                .record_applied(index, Default::default())
            {
                tracing::error!(index, error = %e, "persisting the applied index failed");
            }
        }
        result
    }

    fn apply_noop(&mut self, _index: u64, _term: u64) {
        // Nothing to persist: replaying a no-op after a restart is harmless.
    }

    fn snapshot(&self) -> Box<dyn FnOnce(&mut dyn Write) -> std::io::Result<()> + Send> {
        let view = self.backend.snapshot();
        let buckets = buckets();
        Box::new(move |w: &mut dyn Write| {
            let view = view.map_err(std::io::Error::other)?;
            metastore_storage::export_snapshot(&*view, &buckets, w)
                .map_err(std::io::Error::other)?;
            Ok(())
        })
    }

    fn restore(&mut self, index: u64, _term: u64, reader: &mut dyn Read) -> std::io::Result<()> {
        self.backend.import(reader).map_err(std::io::Error::other)?;
        let store = Store::open(self.backend.clone()).map_err(std::io::Error::other)?;
        tracing::info!(
            index,
            revision = store.current_revision(),
            "restored state from raft snapshot"
        );
        self.store.replace(store);
        Ok(())
    }
}

impl From<StorageError> for ApplyError {
    fn from(e: StorageError) -> Self {
        ApplyError::Mvcc(MvccError::from(e))
    }
}
