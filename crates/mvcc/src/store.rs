//! The [`Store`]: committed state, reads, the write path and the apply-time half of
//! compaction (the background half is in [`crate::compactor`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;

use metastore_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};
use metastore_proto::range_frame::RangeFrame;
use metastore_storage::{Backend, ReadView, ScanRange, StorageError, Visit, WriteBatch, WriteOp};
use parking_lot::{Mutex, RwLock, RwLockUpgradableReadGuard};

use crate::compactor::{self, CompactionConfig, Compactor, Job};
use crate::hash::{HashKv, KvHasher};
use crate::key_index::{Index, KeyRange};
use crate::metrics::OpCounts;
use crate::rebuild::{rebuild_index, Rebuilt};
use crate::revision::{main_prefix, Revision};
use crate::txn::{
    decode_kv, fetch, fetch_encoded, finish_range, is_txn_read_only, plan_range, select,
    takes_stored_encodings, Selected, Tx,
};
use crate::values::{ValueCache, Values};
use crate::{
    LeaseLookup, MvccError, CONSISTENT_INDEX_KEY, FINISHED_COMPACT_KEY, KEY_BUCKET, META_BUCKET,
    SCHEDULED_COMPACT_KEY,
};

/// How many compaction hashes are remembered for HashKV (etcd's `hashStorageMaxSize`).
const MAX_COMPACTION_HASHES: usize = 10;

/// A request that goes through consensus and changes the store.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteRequest {
    /// Put one key.
    Put(PutRequest),
    /// Delete a key or a range of keys.
    DeleteRange(DeleteRangeRequest),
    /// A transaction; its writes share one revision.
    Txn(TxnRequest),
    /// Compact history up to a revision.
    Compact(CompactionRequest),
}

/// The response to a [`WriteRequest`], header left `None` for the caller to fill.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteResponse {
    /// Answer to [`WriteRequest::Put`].
    Put(PutResponse),
    /// Answer to [`WriteRequest::DeleteRange`].
    DeleteRange(DeleteRangeResponse),
    /// Answer to [`WriteRequest::Txn`]. Responses nested inside carry etcd's partial headers
    /// (only `revision` set; empty for nested txns).
    Txn(TxnResponse),
    /// Answer to [`WriteRequest::Compact`].
    Compact(CompactionResponse),
}

impl WriteResponse {
    fn clear_header(&mut self) {
        match self {
            WriteResponse::Put(r) => r.header = None,
            WriteResponse::DeleteRange(r) => r.header = None,
            WriteResponse::Txn(r) => r.header = None,
            WriteResponse::Compact(r) => r.header = None,
        }
    }
}

/// The outcome of [`Store::apply_write`].
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The response, header `None`.
    pub response: WriteResponse,
    /// The changes in sub-revision order. A deletion's `kv` holds only `key` and `mod_revision`,
    /// as etcd's watch events do, and its `prev_kv` the deleted value. A put's `prev_kv` is the
    /// previous value only when the request read it (`prev_kv`, `ignore_value`, `ignore_lease`);
    /// otherwise `None`, and a consumer that needs it reads the key at `mod_revision - 1`.
    pub events: Vec<Event>,
    /// The store revision after the request: what etcd puts in the response header. Unchanged
    /// when the request changed nothing.
    pub revision: i64,
}

pub(crate) struct State {
    pub(crate) index: Index,
    current_rev: i64,
    /// The revision of the last compaction applied (scheduled): reads below it fail, whether or
    /// not the background job finished deleting.
    compact_rev: i64,
    consistent_index: u64,
}

/// What the store shares with its compaction worker.
pub(crate) struct Inner {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) state: RwLock<State>,
    /// Stored key-values by revision, for an engine whose reads copy (module `values`).
    values: Option<ValueCache>,
    /// Hashes computed by compactions, answered by HashKV at their revision (etcd's hash storage).
    compaction_hashes: Mutex<Vec<HashKv>>,
    pub(crate) compactor: Compactor,
}

impl Inner {
    /// The stored key-values of `view`, through the store's cache.
    pub(crate) fn values<'a>(&'a self, view: &'a dyn ReadView) -> Values<'a> {
        Values::new(view, self.values.as_ref())
    }

    /// Keep the hash a compaction at `rev` computed (with `prev` the compact revision before).
    pub(crate) fn record_hash(&self, prev: i64, rev: i64, hash: u32) {
        let mut hashes = self.compaction_hashes.lock();
        hashes.push(HashKv {
            hash,
            compact_revision: prev,
            hash_revision: rev,
            current_revision: 0,
        });
        hashes.sort_by_key(|h| h.hash_revision);
        let excess = hashes.len().saturating_sub(MAX_COMPACTION_HASHES);
        hashes.drain(..excess);
    }
}

/// What [`Store::select_range`] returns: the selected revisions, the keys in range, the view
/// to read them from, the store's revision.
type SelectedRange = (Vec<Selected>, usize, Option<Arc<dyn ReadView>>, i64);

/// etcd's MVCC key-value store over a [`Backend`].
///
/// Reads ([`Store::range`], [`Store::hash_kv`], …) may run on any number of threads while the
/// single apply thread calls [`Store::apply_write`]. A reader sees the state after some whole
/// write, never part of one: the index and the revision are published under a lock after the
/// backend holds the write, and readers take their backend snapshot under the same lock.
///
/// Compaction runs on a worker thread the store owns (module `compactor`): applying a
/// Compact only schedules it. The worker stops when the store is dropped or
/// [`Store::stop_compaction`] is called; a compaction it left unfinished is resumed by the next
/// [`Store::open`] of the backend.
pub struct Store {
    inner: Arc<Inner>,
    /// The compaction worker, once a compaction was scheduled.
    worker: Mutex<Option<JoinHandle<()>>>,
    /// The live keys that had a lease when the store was opened, found while rebuilding the
    /// index, until [`Store::take_leased_keys`] takes them.
    leased_at_open: Mutex<HashMap<Vec<u8>, i64>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop_compaction();
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.state.read();
        f.debug_struct("Store")
            .field("engine", &self.inner.backend.engine_name())
            .field("current_revision", &st.current_rev)
            .field("compact_revision", &st.compact_rev)
            .field("consistent_index", &st.consistent_index)
            .finish()
    }
}

impl Store {
    /// Open the store kept in `backend` (which must hold the [`crate::BUCKETS`]): rebuild the key
    /// index from the `key` bucket and restore the current revision (the highest main revision
    /// stored, at least the compact revision; 1 for an empty store, as in etcd), the compact
    /// revision and the consistent index. A compaction recorded as scheduled but not finished is
    /// resumed in the background (its revision is the compact revision at once), with the
    /// default [`CompactionConfig`].
    pub fn open(backend: Arc<dyn Backend>) -> Result<Store, MvccError> {
        Store::open_with(backend, CompactionConfig::default())
    }

    /// [`Store::open`] with background compaction paced by `config`.
    pub fn open_with(
        backend: Arc<dyn Backend>,
        config: CompactionConfig,
    ) -> Result<Store, MvccError> {
        let view = backend.snapshot()?;
        let consistent_index = match view.get(META_BUCKET, CONSISTENT_INDEX_KEY)? {
            None => 0,
            Some(bytes) => u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| {
                MvccError::Corrupt(format!("consistent_index has {} bytes, not 8", bytes.len()))
            })?),
        };
        let finished = read_compact_mark(&*view, FINISHED_COMPACT_KEY)?;
        let scheduled = read_compact_mark(&*view, SCHEDULED_COMPACT_KEY)?;
        let finished = finished.unwrap_or(-1);
        let resume = scheduled.filter(|s| *s > finished);
        let compact_rev = resume.unwrap_or(finished);

        let started = std::time::Instant::now();
        let Rebuilt {
            index,
            leased,
            last_revision,
            revisions,
        } = rebuild_index(&*view)?;
        let current_rev = last_revision.max(compact_rev).max(scheduled.unwrap_or(0));
        drop(view);
        tracing::info!(
            live_keys = index.live_keys(),
            revisions,
            current_revision = current_rev,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "rebuilt the key index"
        );

        let store = Store {
            inner: Arc::new(Inner {
                values: ValueCache::for_backend(&*backend),
                backend,
                state: RwLock::new(State {
                    index,
                    current_rev,
                    compact_rev,
                    consistent_index,
                }),
                compaction_hashes: Mutex::new(Vec::new()),
                compactor: Compactor::new(finished, config),
            }),
            worker: Mutex::new(None),
            leased_at_open: Mutex::new(leased),
        };
        if let Some(rev) = resume {
            // etcd resumes an interrupted compaction on start and does not keep its hash: part
            // of the history it covers may be gone already.
            store.ensure_worker()?;
            store.inner.compactor.enqueue(Job {
                rev,
                prev: finished,
                record_hash: false,
            });
        }
        Ok(store)
    }

    /// The live keys that had a lease (key, lease id) when the store was opened; later calls
    /// get none. Read in the pass that rebuilds the index (as etcd's `restoreIntoIndex` does),
    /// so that recovering the lessor does not read every key again: it paged through them with
    /// ranges, each counting the keys after it, which took 108 s at 10M keys.
    pub fn take_leased_keys(&self) -> Vec<(Vec<u8>, i64)> {
        std::mem::take(&mut *self.leased_at_open.lock())
            .into_iter()
            .collect()
    }

    /// Pace background compaction by `config` from its next step on.
    pub fn set_compaction_config(&self, config: CompactionConfig) {
        self.inner.compactor.set_config(config);
    }

    /// Stop the compaction worker after its current step and wait for it; compactions applied
    /// later are not run by this store. What was left undone stays scheduled in the backend, so
    /// the next [`Store::open`] of it resumes. Call before replacing the backend's content (a
    /// snapshot restore): the worker must not write into it. Also done on drop.
    pub fn stop_compaction(&self) {
        self.inner.compactor.stop();
        if let Some(worker) = self.worker.lock().take() {
            // A panicking worker has nothing left to clean up.
            let _ = worker.join();
        }
    }

    /// Block until the compaction at `revision` (or a later one) has deleted everything it
    /// supersedes: what etcd's Compact with `physical` waits for. `Ok(true)` once it has;
    /// `Ok(false)` when this store will not run it (none at or above `revision` was applied, or
    /// the worker was stopped: a store being replaced, whose successor resumes the compaction);
    /// an error when the compaction failed. Never call it on the apply thread.
    pub fn wait_compaction(&self, revision: i64) -> Result<bool, MvccError> {
        self.inner.compactor.wait_finished(revision)
    }

    /// The revision of the last compaction that finished deleting (-1 when none): at most
    /// [`Store::compact_revision`], lower while a compaction runs in the background.
    pub fn finished_compact_revision(&self) -> i64 {
        self.inner.compactor.finished()
    }

    /// Test hook: hold the compaction worker before its next step (`true`) or let it go on.
    #[doc(hidden)]
    pub fn pause_compaction(&self, paused: bool) {
        self.inner.compactor.set_paused(paused);
    }

    /// Start the compaction worker unless it runs or was stopped.
    fn ensure_worker(&self) -> Result<(), MvccError> {
        let mut worker = self.worker.lock();
        if worker.is_none() && !self.inner.compactor.is_stopped() {
            let inner = Arc::clone(&self.inner);
            let handle = std::thread::Builder::new()
                .name("mvcc-compactor".into())
                .spawn(move || compactor::run(inner))
                .map_err(StorageError::Io)?;
            *worker = Some(handle);
        }
        Ok(())
    }

    /// The revision of the last write (1 for a store that never had one).
    pub fn current_revision(&self) -> i64 {
        self.inner.state.read().current_rev
    }

    /// The revision history was compacted at; -1 when it never was (etcd's value, which HashKV
    /// reports).
    pub fn compact_revision(&self) -> i64 {
        self.inner.state.read().compact_rev
    }

    /// The raft index of the last applied entry, as persisted with it (0 when none was).
    pub fn consistent_index(&self) -> u64 {
        self.inner.state.read().consistent_index
    }

    /// How many keys are live now (`etcd_debugging_mvcc_keys_total`); O(1), kept as writes
    /// apply.
    pub fn live_keys(&self) -> usize {
        self.inner.state.read().index.live_keys()
    }

    /// A Range request at a consistent point, with every option computed as etcd 3.5 does. The
    /// header is left `None`; callers that fill it should use [`Store::range_with_revision`] to
    /// learn the revision the read saw.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        Ok(self.range_with_revision(req)?.0)
    }

    /// Like [`Store::range`], also returning the store revision the read saw: what etcd puts in
    /// the response header (clients start watches after it, so it must match the data).
    pub fn range_with_revision(
        &self,
        req: &RangeRequest,
    ) -> Result<(RangeResponse, i64), MvccError> {
        let (selected, total, view, cur) = self.select_range(req)?;
        let kvs = match view {
            Some(view) => fetch(self.inner.values(&*view), selected)?,
            None => Vec::new(),
        };
        Ok((finish_range(req, kvs, total), cur))
    }

    /// Like [`Store::range_with_revision`], for the wire: when the request takes the key-values
    /// as they are stored (no sorting but by key, no revision filters, values wanted), the
    /// answer carries their stored encodings, neither decoded nor copied again
    /// ([`RangeFrame`]); any other request is answered decoded. Both encode to the same bytes.
    pub fn range_frame_with_revision(
        &self,
        req: &RangeRequest,
    ) -> Result<(RangeFrame, i64), MvccError> {
        if !takes_stored_encodings(req) {
            let (resp, revision) = self.range_with_revision(req)?;
            return Ok((resp.into(), revision));
        }
        let (selected, total, view, cur) = self.select_range(req)?;
        let mut encoded = match view {
            Some(view) => fetch_encoded(self.inner.values(&*view), selected)?,
            None => Vec::new(),
        };
        // As `finish_range` does for such a request: only the limit applies.
        let mut more = false;
        if req.limit > 0 && encoded.len() as i64 > req.limit {
            encoded.truncate(req.limit as usize);
            more = true;
        }
        let head = RangeResponse {
            header: None,
            kvs: Vec::new(),
            more,
            count: total as i64,
        };
        Ok((RangeFrame { head, encoded }, cur))
    }

    /// The revisions a range reads, how many keys it covers, the view to read them from (none
    /// for `count_only`), and the store's revision.
    fn select_range(&self, req: &RangeRequest) -> Result<SelectedRange, MvccError> {
        let no_pending = BTreeMap::new();
        let range = KeyRange::from_request(&req.key, &req.range_end);
        let selected = {
            let st = self.inner.state.read();
            let cur = st.current_rev;
            let plan = plan_range(req, cur, st.compact_rev)?;
            let limit = if req.count_only { 1 } else { plan.fetch_limit };
            let (selected, total) = select(&st.index, &no_pending, cur, range, plan.at_rev, limit);
            // Taken under the lock: a compaction cannot delete what the index points at before
            // the snapshot exists.
            let view = if req.count_only {
                None
            } else {
                Some(self.inner.backend.snapshot()?)
            };
            (selected, total, view, cur)
        };
        crate::metrics::record_ops(OpCounts {
            ranges: 1,
            ..OpCounts::default()
        });
        Ok(selected)
    }

    /// Evaluate a txn that has no writes (see [`crate::is_txn_read_only`]) at a consistent point,
    /// without consensus, as etcd serves read-only txns. Returns the response (header `None`) and
    /// the revision it saw. A txn with writes fails with [`MvccError::NotReadOnly`].
    pub fn txn_read_only(&self, req: &TxnRequest) -> Result<(TxnResponse, i64), MvccError> {
        if !is_txn_read_only(req) {
            return Err(MvccError::NotReadOnly);
        }
        let st = self.inner.state.read();
        let view = self.inner.backend.snapshot()?;
        let mut tx = Tx::new(
            &st.index,
            self.inner.values(&*view),
            st.current_rev,
            st.compact_rev,
        );
        let no_leases = |_: i64| false;
        let mut resp = tx.apply_txn(req, &no_leases)?;
        crate::metrics::record_ops(tx.ops);
        resp.header = None;
        Ok((resp, st.current_rev))
    }

    /// Apply one request that went through consensus, as ONE main revision: a txn's changes get
    /// sub revisions 0, 1, 2, …; a request that changes nothing keeps the revision. Commits one
    /// backend batch holding the mvcc changes, `consistent_index` and the caller's `extra` ops
    /// (applied last, so they may also update the state machine's own buckets atomically).
    ///
    /// Errors are etcd's: a put with an unknown lease ([`MvccError::LeaseNotFound`]),
    /// `ignore_value`/`ignore_lease` on a missing key ([`MvccError::KeyNotFound`]), a txn range at
    /// a compacted or future revision, a compaction at or below the compact revision or above the
    /// current one. On error nothing is written, not even `consistent_index`.
    ///
    /// A compaction is only scheduled here, in O(1): the batch records `scheduledCompactRev`,
    /// reads below the revision fail from now on, and the store's worker deletes what it
    /// supersedes in the background (module `compactor`; [`Store::wait_compaction`] waits
    /// for it). As in etcd, a deletion at exactly the compact revision stays stored until the
    /// next compaction, so watchers starting there still see it.
    ///
    /// Must be called from one thread at a time (the apply thread); concurrent calls are
    /// serialised.
    pub fn apply_write(
        &self,
        req: WriteRequest,
        leases: &dyn LeaseLookup,
        consistent_index: u64,
        extra: WriteBatch,
    ) -> Result<Applied, MvccError> {
        let state = self.inner.state.upgradable_read();
        if let WriteRequest::Compact(c) = &req {
            return self.compact(state, c.revision, consistent_index, extra);
        }
        let view = self.inner.backend.snapshot()?;
        let mut tx = Tx::new(
            &state.index,
            self.inner.values(&*view),
            state.current_rev,
            state.compact_rev,
        );
        let mut response = match &req {
            WriteRequest::Put(p) => {
                tx.ops.puts = 1;
                WriteResponse::Put(tx.apply_put(p, leases, true)?)
            }
            WriteRequest::DeleteRange(d) => {
                tx.ops.deletes = 1;
                WriteResponse::DeleteRange(tx.apply_delete(d)?)
            }
            WriteRequest::Txn(t) => WriteResponse::Txn(tx.apply_txn(t, leases)?),
            WriteRequest::Compact(_) => unreachable!("handled above"),
        };
        let ops = tx.ops;
        response.clear_header();
        let revision = tx.cur_rev();
        let (changes, events) = tx.into_parts();
        drop(view);

        let mut batch = WriteBatch::new();
        let mut index_ops = Vec::with_capacity(changes.len());
        for change in changes {
            batch.put(
                KEY_BUCKET,
                change.rev.to_key(change.tombstone),
                change.value,
            );
            index_ops.push((change.key, change.rev, change.tombstone));
        }
        put_consistent_index(&mut batch, consistent_index);
        append(&mut batch, extra);
        // Readers keep reading the previous state meanwhile: new revisions only add keys.
        crate::metrics::commit(self.inner.backend.as_ref(), batch)?;

        let mut st = RwLockUpgradableReadGuard::upgrade(state);
        for (key, rev, tombstone) in index_ops {
            if tombstone {
                let was_live = st.index.tombstone(&key, rev);
                debug_assert!(was_live, "tombstone of a key that is not live");
            } else {
                st.index.put(&key, rev);
            }
        }
        st.current_rev = revision;
        st.consistent_index = consistent_index;
        drop(st);
        crate::metrics::record_ops(ops);
        Ok(Applied {
            response,
            events,
            revision,
        })
    }

    /// Persist `consistent_index` (and the caller's `extra` ops) in one batch without changing
    /// the key space: for entries that are refused or carry no mvcc request, so the applied index
    /// still advances atomically with whatever the state machine wrote. Serialised with
    /// [`Store::apply_write`].
    pub fn record_applied(
        &self,
        consistent_index: u64,
        extra: WriteBatch,
    ) -> Result<(), MvccError> {
        let state = self.inner.state.upgradable_read();
        let mut batch = WriteBatch::new();
        put_consistent_index(&mut batch, consistent_index);
        append(&mut batch, extra);
        crate::metrics::commit(self.inner.backend.as_ref(), batch)?;
        RwLockUpgradableReadGuard::upgrade(state).consistent_index = consistent_index;
        Ok(())
    }

    fn compact(
        &self,
        state: RwLockUpgradableReadGuard<'_, State>,
        rev: i64,
        consistent_index: u64,
        extra: WriteBatch,
    ) -> Result<Applied, MvccError> {
        if rev <= state.compact_rev {
            return Err(MvccError::Compacted);
        }
        if rev > state.current_rev {
            return Err(MvccError::FutureRev);
        }
        self.ensure_worker()?;
        let prev = state.compact_rev;
        let mut batch = WriteBatch::new();
        batch.put(
            META_BUCKET,
            SCHEDULED_COMPACT_KEY,
            Revision::new(rev, 0).to_key(false),
        );
        put_consistent_index(&mut batch, consistent_index);
        append(&mut batch, extra);
        crate::metrics::commit(self.inner.backend.as_ref(), batch)?;

        let mut st = RwLockUpgradableReadGuard::upgrade(state);
        st.compact_rev = rev;
        st.consistent_index = consistent_index;
        self.inner.compactor.enqueue(Job {
            rev,
            prev,
            record_hash: true,
        });
        Ok(Applied {
            response: WriteResponse::Compact(CompactionResponse { header: None }),
            events: Vec::new(),
            revision: st.current_rev,
        })
    }

    /// etcd 3.5's HashKV at `rev` (0 = current): CRC32-Castagnoli seeded with the bucket name
    /// `key`, then every revision key and value up to `rev` in revision order, skipping what
    /// compaction would drop. A revision a compaction ran at answers the hash that compaction
    /// computed (with the compact revision before it), as etcd does, so members agree whether or
    /// not they have compacted yet; while that compaction still runs in the background, the call
    /// waits for it. Other revisions hash what is stored as if the running compaction had
    /// finished, so the answer never depends on its progress. Fails for `rev` below the compact
    /// revision or above the current one.
    pub fn hash_kv(&self, rev: i64) -> Result<HashKv, MvccError> {
        if rev > 0 {
            self.inner.compactor.wait_for_hash(rev);
        }
        let stored = self
            .inner
            .compaction_hashes
            .lock()
            .iter()
            .find(|h| h.hash_revision == rev)
            .copied();
        if let Some(h) = stored {
            return Ok(HashKv {
                current_revision: self.current_revision(),
                ..h
            });
        }
        let (keep, compacting, view, compact_rev, current_rev, rev) = {
            let st = self.inner.state.read();
            if rev > 0 && rev < st.compact_rev {
                return Err(MvccError::Compacted);
            }
            if rev > 0 && rev > st.current_rev {
                return Err(MvccError::FutureRev);
            }
            let rev = if rev == 0 { st.current_rev } else { rev };
            // Under the state lock: a compaction still deleting at or below `compact_rev` is
            // known here, and one applied later deletes nothing before this view is taken.
            let running = self.inner.compactor.finished() < st.compact_rev;
            (
                st.index.keep(rev),
                running.then(|| st.index.compaction_available(st.compact_rev)),
                self.inner.backend.snapshot()?,
                st.compact_rev,
                st.current_rev,
                rev,
            )
        };
        let mut hasher = KvHasher::new(compact_rev, rev, &keep);
        if let Some(available) = &compacting {
            hasher = hasher.skipping_compacted(available);
        }
        let end = main_prefix(rev.saturating_add(1));
        let mut failure = None;
        view.scan(
            KEY_BUCKET,
            ScanRange::between(&[], Some(&end)),
            &mut |k, v| match Revision::from_key(k) {
                Some((r, tombstone)) => {
                    hasher.write(k, v, r, tombstone);
                    Visit::Continue
                }
                None => {
                    failure = Some(bad_revision_key(k));
                    Visit::Stop
                }
            },
        )?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(HashKv {
            hash: hasher.sum(),
            compact_revision: compact_rev,
            hash_revision: rev,
            current_revision: current_rev,
        })
    }

    /// The stored history as watch events: every change whose main revision lies in
    /// `[start_revision, end_revision]` (the end clamped to the current revision), in revision
    /// order. A put's `kv` is the stored value; a deletion's holds `key` and `mod_revision`.
    /// `prev_kv` is not filled (read it with a range at `mod_revision - 1`, as etcd's watch
    /// server does). With `limit > 0` the answer stops after the main revision at which it
    /// reached `limit` events, so a revision is never split. Fails with
    /// [`MvccError::Compacted`] when `start_revision` is below the compact revision.
    pub fn history(
        &self,
        start_revision: i64,
        end_revision: i64,
        limit: usize,
    ) -> Result<Vec<Event>, MvccError> {
        let (view, end) = {
            let st = self.inner.state.read();
            if start_revision < st.compact_rev {
                return Err(MvccError::Compacted);
            }
            (
                self.inner.backend.snapshot()?,
                end_revision.min(st.current_rev),
            )
        };
        let mut events = Vec::new();
        if end < start_revision {
            return Ok(events);
        }
        let start = main_prefix(start_revision.max(0));
        let stop = main_prefix(end + 1);
        let mut failure = None;
        let mut last_main = None;
        view.scan(
            KEY_BUCKET,
            ScanRange::between(&start, Some(&stop)),
            &mut |k, v| {
                let Some((r, tombstone)) = Revision::from_key(k) else {
                    failure = Some(bad_revision_key(k));
                    return Visit::Stop;
                };
                if limit > 0 && events.len() >= limit && last_main != Some(r.main) {
                    return Visit::Stop;
                }
                last_main = Some(r.main);
                match decode_kv(v) {
                    Ok(kv) if tombstone => {
                        let kv = KeyValue {
                            key: kv.key,
                            mod_revision: r.main,
                            ..Default::default()
                        };
                        events.push(Event {
                            r#type: EventType::Delete as i32,
                            kv: Some(kv),
                            prev_kv: None,
                        });
                    }
                    Ok(kv) => events.push(Event {
                        r#type: EventType::Put as i32,
                        kv: Some(kv),
                        prev_kv: None,
                    }),
                    Err(e) => {
                        failure = Some(e);
                        return Visit::Stop;
                    }
                }
                Visit::Continue
            },
        )?;
        match failure {
            Some(e) => Err(e),
            None => Ok(events),
        }
    }
}

fn append(batch: &mut WriteBatch, extra: WriteBatch) {
    for op in extra.into_ops() {
        match op {
            WriteOp::Put { bucket, key, value } => batch.put(bucket, key, value),
            WriteOp::Delete { bucket, key } => batch.delete(bucket, key),
            WriteOp::DeleteRange { bucket, start, end } => batch.delete_range(bucket, start, end),
        }
    }
}

pub(crate) fn bad_revision_key(k: &[u8]) -> MvccError {
    MvccError::Corrupt(format!("key bucket holds a non-revision key {k:02x?}"))
}

/// The largest main revision a store opens with. A store would need 2^62 writes to get there;
/// a larger one (or a negative one: the key's top bit set) is a damaged or forged file, and
/// counting on from it would overflow (the compactor's `rev + 1`, the next write's revision).
pub(crate) const MAX_REVISION: i64 = 1 << 62;

/// The compaction mark `name` of the `meta` bucket (`scheduledCompactRev`,
/// `finishedCompactRev`), if set; a mark that is not a revision in range is corruption.
fn read_compact_mark(view: &dyn ReadView, name: &[u8]) -> Result<Option<i64>, MvccError> {
    match view.get(META_BUCKET, name)? {
        None => Ok(None),
        Some(bytes) => match Revision::from_key(&bytes) {
            Some((rev, false)) if (0..=MAX_REVISION).contains(&rev.main) => Ok(Some(rev.main)),
            _ => Err(MvccError::Corrupt(format!(
                "meta {} is not a revision: {bytes:02x?}",
                String::from_utf8_lossy(name)
            ))),
        },
    }
}

/// Queue the applied raft index into `batch`: every batch mvcc writes carries it, so the index is
/// always persisted atomically with the state it produced.
fn put_consistent_index(batch: &mut WriteBatch, consistent_index: u64) {
    batch.put(
        META_BUCKET,
        CONSISTENT_INDEX_KEY,
        consistent_index.to_be_bytes().to_vec(),
    );
}
