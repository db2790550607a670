//! The storage boundary of MetaStore.
//!
//! Owns: the [`Backend`] trait — named buckets of ordered byte keys, atomic write batches across
//! buckets, consistent read snapshots isolated from later writes, forward and reverse range scans
//! with limits, size figures, defragmentation, and export/import of a consistent snapshot as a byte
//! stream (the format in [`snapshot_format`]). Also the [`conformance`] kit every engine runs.
//!
//! Must not depend on: any engine, mvcc, raft. Nothing above this crate knows which engine runs;
//! everything holds an `Arc<dyn Backend>`.

pub mod conformance;
pub mod snapshot_format;

use std::io::{Read, Write};
use std::sync::Arc;

/// Errors a backend reports. Engines map their own failures into these.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A bucket that the backend was not opened with.
    #[error("storage: unknown bucket {0:?}")]
    UnknownBucket(String),
    /// An I/O failure of the engine or of a snapshot stream.
    #[error("storage: i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A snapshot stream that is not in MetaStore's format or fails its checksum.
    #[error("storage: bad snapshot stream: {0}")]
    BadSnapshot(String),
    /// Any other engine failure, with the engine's message.
    #[error("storage: engine: {0}")]
    Engine(String),
}

/// Result alias for storage operations.
pub type Result<T> = std::result::Result<T, StorageError>;

/// One change inside a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Set `key` to `value` in `bucket`.
    Put {
        /// One of the buckets the backend was opened with.
        bucket: &'static str,
        /// The key, compared bytewise.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// Remove `key` from `bucket` (no error when absent).
    Delete {
        /// One of the buckets the backend was opened with.
        bucket: &'static str,
        /// The key, compared bytewise.
        key: Vec<u8>,
    },
    /// Remove every key in `[start, end)` from `bucket` (none when `end <= start`). RocksDB
    /// records one range tombstone instead of a tombstone per key: background compaction
    /// deletes runs of superseded revisions this way.
    DeleteRange {
        /// One of the buckets the backend was opened with.
        bucket: &'static str,
        /// First key removed.
        start: Vec<u8>,
        /// First key kept after the range.
        end: Vec<u8>,
    },
}

impl WriteOp {
    /// The bucket the change is in.
    pub fn bucket(&self) -> &'static str {
        match self {
            WriteOp::Put { bucket, .. }
            | WriteOp::Delete { bucket, .. }
            | WriteOp::DeleteRange { bucket, .. } => bucket,
        }
    }
}

/// Changes applied atomically: after a crash either all of them are visible or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }
    /// Queue a put.
    pub fn put(
        &mut self,
        bucket: &'static str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) {
        self.ops.push(WriteOp::Put {
            bucket,
            key: key.into(),
            value: value.into(),
        });
    }
    /// Queue a delete.
    pub fn delete(&mut self, bucket: &'static str, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete {
            bucket,
            key: key.into(),
        });
    }
    /// Queue the removal of every key in `[start, end)`.
    pub fn delete_range(
        &mut self,
        bucket: &'static str,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) {
        self.ops.push(WriteOp::DeleteRange {
            bucket,
            start: start.into(),
            end: end.into(),
        });
    }
    /// The queued changes, in order; a later change to the same key wins.
    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }
    /// Consume the batch into its changes.
    pub fn into_ops(self) -> Vec<WriteOp> {
        self.ops
    }
    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Number of queued changes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// Which way a range scan walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Ascending key order.
    Forward,
    /// Descending key order.
    Reverse,
}

/// A range scan request: keys in `[start, end)` (`end = None`: to the end of the bucket).
#[derive(Debug, Clone, Copy)]
pub struct ScanRange<'a> {
    /// First key included.
    pub start: &'a [u8],
    /// First key excluded; `None` means no upper bound.
    pub end: Option<&'a [u8]>,
    /// Walk order.
    pub direction: Direction,
    /// At most this many pairs are visited; 0 means no limit.
    pub limit: usize,
}

impl<'a> ScanRange<'a> {
    /// All keys of a bucket, ascending.
    pub fn all() -> Self {
        ScanRange {
            start: &[],
            end: None,
            direction: Direction::Forward,
            limit: 0,
        }
    }
    /// Keys in `[start, end)`, ascending, no limit.
    pub fn between(start: &'a [u8], end: Option<&'a [u8]>) -> Self {
        ScanRange {
            start,
            end,
            direction: Direction::Forward,
            limit: 0,
        }
    }
    /// Same range, walked in reverse.
    pub fn reverse(mut self) -> Self {
        self.direction = Direction::Reverse;
        self
    }
    /// Same range, at most `limit` pairs (0 = no limit).
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
    /// Whether `key` falls inside `[start, end)`.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start && self.end.is_none_or(|end| key < end)
    }
}

/// What a scan visitor tells the scan to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// Go on with the next pair.
    Continue,
    /// Stop the scan here.
    Stop,
}

/// A consistent, read-only view of every bucket at one point in time. Writes made after it was
/// taken are invisible to it.
pub trait ReadView: Send + Sync {
    /// The value stored under `key`, if any.
    fn get(&self, bucket: &str, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// [`ReadView::get`], as bytes that may share the engine's own memory: an engine that
    /// keeps its pairs in memory answers without copying the value. For a value that outlives
    /// the read, such as a key-value of a Range answer waiting for its client's window.
    fn get_shared(&self, bucket: &str, key: &[u8]) -> Result<Option<bytes::Bytes>> {
        Ok(self.get(bucket, key)?.map(bytes::Bytes::from))
    }

    /// [`ReadView::get_shared`] of each of `keys`, answered in their order. An engine may answer
    /// many keys at once more cheaply than one at a time (RocksDB's batched MultiGet; the memory
    /// engine shares one handle on a block among the values found in it); keys in ascending
    /// order go fastest. Repeated keys are answered each time.
    fn get_shared_many(&self, bucket: &str, keys: &[&[u8]]) -> Result<Vec<Option<bytes::Bytes>>> {
        keys.iter().map(|k| self.get_shared(bucket, k)).collect()
    }

    /// Visit pairs of `bucket` inside `range` in its direction, up to its limit, until the
    /// visitor answers [`Visit::Stop`]. Returns how many pairs were visited.
    fn scan(
        &self,
        bucket: &str,
        range: ScanRange<'_>,
        visitor: &mut dyn FnMut(&[u8], &[u8]) -> Visit,
    ) -> Result<usize>;

    /// Pairs of `bucket` inside `range`, collected. Convenience over [`ReadView::scan`].
    fn collect(&self, bucket: &str, range: ScanRange<'_>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        self.scan(bucket, range, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Visit::Continue
        })?;
        Ok(out)
    }
}

/// Size figures of a backend, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SizeInfo {
    /// Space the engine holds (etcd's `dbSize`).
    pub size_bytes: u64,
    /// Space taken by live data (etcd's `dbSizeInUse`); never more than `size_bytes`.
    pub size_in_use_bytes: u64,
}

/// A storage engine: named buckets of ordered byte keys.
///
/// Both engines must pass [`conformance::run_all`]. Implementations are shared across threads as
/// `Arc<dyn Backend>`; every method may block on disk and belongs on a blocking thread, never
/// directly on an async runtime worker.
pub trait Backend: Send + Sync {
    /// A short engine name for logs and metrics (`"memory"`, `"rocksdb"`).
    fn engine_name(&self) -> &'static str;

    /// The buckets this backend was opened with.
    fn buckets(&self) -> Vec<&'static str>;

    /// Apply every change of `batch` atomically, durably where the engine is durable (see
    /// [`Backend::sync`] for an engine opened to defer durability).
    fn write(&self, batch: WriteBatch) -> Result<()>;

    /// Whether this engine keeps its data on disk, so that [`Backend::sync`] makes it durable.
    /// The default (an engine whose data lives only in memory) is false.
    fn durable(&self) -> bool {
        false
    }

    /// Makes every write so far durable, for a [`Backend::durable`] engine; does nothing for
    /// one whose data lives only in memory (the default). An engine opened for a caller that
    /// replays its own log after a crash (MetaStore's raft WAL) may keep writes in memory only
    /// until this call: a crash before it loses a suffix of whole batches, never part of one.
    /// Writes may go on from other threads while it runs; what they add may or may not be
    /// made durable by it.
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// Whether [`ReadView::get_shared`] answers from memory the engine holds anyway, without
    /// copying: then a cache of values kept above the engine would only duplicate it. The
    /// default (an engine whose reads copy out of its pages or files) is false.
    fn values_in_memory(&self) -> bool {
        false
    }

    /// A consistent view of all buckets as of now.
    fn snapshot(&self) -> Result<Arc<dyn ReadView>>;

    /// Current size figures.
    fn size(&self) -> Result<SizeInfo>;

    /// Reclaim space held by deleted and overwritten data without blocking readers or writers.
    fn defragment(&self) -> Result<()>;

    /// Replace the whole content of every bucket with what `reader` holds (a stream written by
    /// [`export_snapshot`]). A stream that fails its checksum or is cut short leaves the previous
    /// content in place.
    fn import(&self, reader: &mut dyn Read) -> Result<()>;
}

/// Write `view` to `writer` in MetaStore's snapshot stream format, in constant memory.
/// Returns the number of bytes written.
pub fn export_snapshot(
    view: &dyn ReadView,
    buckets: &[&'static str],
    writer: &mut dyn Write,
) -> Result<u64> {
    snapshot_format::write_stream(view, buckets, writer)
}
