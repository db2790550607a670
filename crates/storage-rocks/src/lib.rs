//! The RocksDB storage engine.
//!
//! Owns: [`RocksBackend`], an implementation of [`Backend`] over one RocksDB database with a
//! column family per bucket. Every write batch is one atomic RocksDB write batch across column
//! families, logged in the WAL and fsynced before `write` returns, so it survives a crash whole
//! or not at all; or, with [`RocksBackend::with_sync_writes`] off, kept in the memtables until a
//! flush, atomic across column families, makes a prefix of whole batches durable. Read views own
//! a RocksDB snapshot; size figures come from RocksDB's own
//! properties; defragmentation is a flush plus a full manual compaction, which runs beside
//! readers and writers.
//!
//! Import (a raft snapshot install) replaces every bucket in bounded batches, so it is not one
//! RocksDB write. It is made crash-safe by a marker file, [`IMPORT_MARKER`], created and fsynced
//! before the first change and removed only once the new content is durable: a database opened
//! with the marker present holds an unknown mix of old and new content, so
//! [`RocksBackend::open`] empties every bucket (applied index 0) and removes the marker. The raft
//! layer then restores the state machine again from the snapshot file its WAL records, which it
//! saved before the install started.
//!
//! Must not depend on: mvcc, raft, the memory engine. Nothing above `metastore-storage` may know
//! that this engine is RocksDB.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use metastore_storage::{
    snapshot_format, Backend, Direction, ReadView, Result, ScanRange, SizeInfo, StorageError,
    Visit, WriteBatch, WriteOp,
};
use parking_lot::RwLock;
use rocksdb::properties::{CUR_SIZE_ALL_MEM_TABLES, ESTIMATE_LIVE_DATA_SIZE, TOTAL_SST_FILES_SIZE};
use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamily,
    ColumnFamilyDescriptor, CompactOptions, DBCompressionType, DBWithThreadMode, FlushOptions,
    Options, ReadOptions, SingleThreaded, SnapshotWithThreadMode, WriteOptions,
};

/// Column families are created once at open and never dropped, so the single-threaded mode (plain
/// `&ColumnFamily` handles) is enough. Named explicitly rather than `rocksdb::DB` so that a
/// feature enabled elsewhere in the workspace cannot change the handle type under us.
type Db = DBWithThreadMode<SingleThreaded>;

/// Key and value bytes per RocksDB write batch when importing a snapshot: bounds the memory an
/// import holds while keeping the number of fsyncs small.
const IMPORT_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The file, in the database directory, whose presence says an import began and did not
/// finish: the buckets may hold part of the old content and part of the new.
pub const IMPORT_MARKER: &str = "IMPORT-IN-PROGRESS";

/// A point in [`RocksBackend::import`] where a crash can land: what the crash tests stop at.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportStep {
    /// The stream is verified and spooled; nothing is changed yet.
    Verified,
    /// The marker file is durable; no bucket is changed yet.
    MarkerWritten,
    /// Write batch `n` (1-based; the first one also clears every bucket) went to RocksDB.
    BatchWritten(usize),
    /// The new content is durable; the marker is still there.
    Synced,
    /// The marker is gone: the import is complete.
    Done,
}

/// Fsyncs directory `dir`, making the creation or removal of a file in it durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn engine_error(e: rocksdb::Error) -> StorageError {
    StorageError::Engine(e.into_string())
}

/// The buckets a backend was opened with, shared with its read views.
struct BucketSet(Vec<&'static str>);

impl BucketSet {
    /// The column family of `bucket`, or [`StorageError::UnknownBucket`]. Column families that
    /// exist in the database but are not buckets of this backend (left by an earlier open) are
    /// not reachable through here.
    fn cf<'db>(&self, db: &'db Db, bucket: &str) -> Result<&'db ColumnFamily> {
        let unknown = || StorageError::UnknownBucket(bucket.to_string());
        if !self.0.contains(&bucket) {
            return Err(unknown());
        }
        db.cf_handle(bucket).ok_or_else(unknown)
    }
}

/// The RocksDB engine. All methods are thread-safe and may block on disk.
pub struct RocksBackend {
    db: Arc<Db>,
    buckets: Arc<BucketSet>,
    /// Every column family the database holds: the buckets, `default`, and any left by an
    /// earlier open with other buckets. Size figures cover them all.
    all_cfs: Vec<String>,
    /// The database directory; import spools its stream to a temporary file in here.
    path: PathBuf,
    /// Writes take it shared, the replace step of an import takes it exclusive, so that no write
    /// lands between an import's clear and its last batch.
    import_gate: RwLock<()>,
    /// Whether `write` fsyncs RocksDB's WAL before returning (the default). When off, writes
    /// skip RocksDB's WAL and are durable once [`Backend::sync`] has flushed the memtables.
    sync_writes: bool,
}

/// Size of one memtable of one column family.
const MEMTABLE_BYTES: usize = 16 << 20;
/// All memtables together: past it RocksDB flushes the largest.
const MEMTABLE_BUDGET_BYTES: usize = 32 << 20;
/// The block cache shared by every column family (data, index and filter blocks).
const BLOCK_CACHE_BYTES: usize = 16 << 20;
/// Size of one partition of a table file's index.
const METADATA_BLOCK_BYTES: usize = 4 << 10;

impl RocksBackend {
    /// Open (creating if missing) the database at `path` with a column family per bucket.
    /// Missing column families are created; column families already in the database that are
    /// not in `buckets` are opened too (RocksDB requires it) but stay unreachable.
    pub fn open(path: &Path, buckets: &[&'static str]) -> Result<RocksBackend> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Only these two codecs are compiled in: the fast one for the upper levels, the dense one
        // for the bottommost level, where most data ends up.
        opts.set_compression_type(DBCompressionType::Lz4);
        opts.set_bottommost_compression_type(DBCompressionType::Zstd);
        // Memory: RocksDB's defaults give every column family two 64 MiB memtables and keep
        // index and filter blocks outside any budget. MetaStore's raft WAL already holds recent
        // writes, so small memtables under one shared budget cost little, and index/filter
        // blocks share one bounded block cache with the data blocks.
        opts.set_write_buffer_size(MEMTABLE_BYTES);
        opts.set_max_write_buffer_number(2);
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
        // Every flush, RocksDB's own or `sync`'s, writes the memtables of all column families
        // together: with writes that skip RocksDB's WAL, the files on disk then always hold the
        // same whole batches in every column family, a cut that a crash cannot tear.
        opts.set_atomic_flush(true);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(BLOCK_CACHE_BYTES));
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        // A partitioned index: each file's index is cut into 4 KiB partitions under a small
        // top level, pinned in the cache. A lookup whose partition is not cached reads and
        // decompresses 4 KiB. With one index block per file, those blocks (200–300 KB per
        // bottom-level file, several MB after a defragment) stopped fitting in the cache
        // past a few million keys: a third of the point reads at 10M keys re-read and
        // ZSTD-decompressed one, and after a defragment every read did (p99 9–11 ms and
        // 210–230 ms instead of 3.5 ms; profile in bench/results/2026-12-06-range-profile.md).
        table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_metadata_block_size(METADATA_BLOCK_BYTES);
        table.set_pin_top_level_index_and_filter(true);
        opts.set_block_based_table_factory(&table);

        let mut names: Vec<String> = match Db::list_cf(&opts, path) {
            Ok(existing) => existing,
            // No database here yet: `list_cf` fails because there is nothing to list.
            Err(_) if !path.join("CURRENT").exists() => Vec::new(),
            Err(e) => return Err(engine_error(e)),
        };
        for bucket in buckets {
            if !names.iter().any(|n| n == bucket) {
                names.push(bucket.to_string());
            }
        }
        let descriptors = names
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, opts.clone()));
        let db = Db::open_cf_descriptors(&opts, path, descriptors).map_err(engine_error)?;
        let mut all_cfs = names;
        if !all_cfs
            .iter()
            .any(|n| n == rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
        {
            all_cfs.push(rocksdb::DEFAULT_COLUMN_FAMILY_NAME.to_string());
        }

        let mut bucket_list = buckets.to_vec();
        bucket_list.sort_unstable();
        bucket_list.dedup();
        let backend = RocksBackend {
            db: Arc::new(db),
            buckets: Arc::new(BucketSet(bucket_list)),
            all_cfs,
            path: path.to_path_buf(),
            import_gate: RwLock::new(()),
            sync_writes: true,
        };
        if path.join(IMPORT_MARKER).exists() {
            backend.discard_interrupted_import()?;
        }
        Ok(backend)
    }

    /// An import was cut short (crash, I/O error): the buckets hold an unknown mix of old and
    /// new content. Empties them all, durably, then removes the marker. A crash in here leaves
    /// the marker, and the next open does it again.
    fn discard_interrupted_import(&self) -> Result<()> {
        tracing::warn!(
            path = %self.path.display(),
            "found an interrupted snapshot import: emptying every bucket (applied index 0); \
             the snapshot must be installed again"
        );
        let mut batch = rocksdb::WriteBatch::default();
        self.queue_clear(&mut batch)?;
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(engine_error)?;
        self.flush_memtables()?;
        self.remove_import_marker()
    }

    /// Creates the import marker and makes it durable (file and directory entry).
    fn write_import_marker(&self) -> Result<()> {
        let marker = File::create(self.path.join(IMPORT_MARKER))?;
        marker.sync_all()?;
        sync_dir(&self.path)?;
        Ok(())
    }

    /// Removes the import marker, durably.
    fn remove_import_marker(&self) -> Result<()> {
        std::fs::remove_file(self.path.join(IMPORT_MARKER))?;
        sync_dir(&self.path)?;
        Ok(())
    }

    /// [`Backend::import`] with the batch size as a parameter and `step` called at each point
    /// where a crash can land, for the crash tests; `import` passes [`IMPORT_BATCH_BYTES`] and
    /// a no-op.
    #[doc(hidden)]
    pub fn import_stepwise(
        &self,
        reader: &mut dyn Read,
        batch_bytes: usize,
        step: &mut dyn FnMut(ImportStep),
    ) -> Result<()> {
        let mut tee = TeeReader {
            inner: reader,
            copy: BufWriter::new(tempfile::tempfile_in(&self.path)?),
        };
        snapshot_format::read_stream(&mut tee, &mut |bucket, _key, _value| {
            self.cf(bucket).map(|_| ())
        })?;
        let mut spool = tee
            .copy
            .into_inner()
            .map_err(|e| StorageError::Io(e.into_error()))?;
        spool.seek(SeekFrom::Start(0))?;
        step(ImportStep::Verified);

        let _gate = self.import_gate.write();
        // From here until the marker is removed, a crash leaves a marked database that the next
        // open empties; so does an error, which leaves the marker in place.
        self.write_import_marker()?;
        step(ImportStep::MarkerWritten);
        let mut batch = rocksdb::WriteBatch::default();
        self.queue_clear(&mut batch)?;
        let mut pending_bytes = 0usize;
        let mut batches_written = 0usize;
        let mut write_batch = |batch: rocksdb::WriteBatch| -> Result<()> {
            self.write_rocks(batch)?;
            batches_written += 1;
            fail::fail_point!("storage::import::batch_written");
            step(ImportStep::BatchWritten(batches_written));
            Ok(())
        };
        snapshot_format::read_stream(&mut BufReader::new(spool), &mut |bucket, key, value| {
            pending_bytes += key.len() + value.len();
            batch.put_cf(self.cf(bucket)?, key, value);
            if pending_bytes >= batch_bytes {
                write_batch(std::mem::take(&mut batch))?;
                pending_bytes = 0;
            }
            Ok(())
        })?;
        write_batch(batch)?;
        // The new content is durable before the marker goes, in either write mode: with
        // `sync_writes` every batch was fsynced in RocksDB's WAL; without, this flushes them.
        self.sync()?;
        step(ImportStep::Synced);
        self.remove_import_marker()?;
        step(ImportStep::Done);
        Ok(())
    }

    /// Whether `write` is durable when it returns (default: yes, through RocksDB's WAL, fsynced).
    /// A caller whose changes are already durable elsewhere turns it off: MetaStore's raft WAL is
    /// fsynced before an entry is applied and replays every entry after the applied index that
    /// the backend persisted, so logging each batch a second time, in RocksDB's WAL, buys
    /// nothing. Writes then go to the memtables only and become durable when a flush writes
    /// them to table files: RocksDB's own when a memtable fills, or [`Backend::sync`]'s. A
    /// process killed, or a power loss, loses the batches written since the last flush, a
    /// suffix of whole batches (flushes are atomic across column families), which the raft WAL
    /// brings back. This is the design etcd's bbolt backend has too: a batch is durable at the
    /// periodic commit, and the WAL replays what came after.
    pub fn with_sync_writes(mut self, sync_writes: bool) -> Self {
        self.sync_writes = sync_writes;
        self
    }

    fn cf(&self, bucket: &str) -> Result<&ColumnFamily> {
        self.buckets.cf(&self.db, bucket)
    }

    /// Write `batch`: through the WAL, fsynced, or (without `sync_writes`) to the memtables only.
    fn write_rocks(&self, batch: rocksdb::WriteBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        if self.sync_writes {
            opts.set_sync(true);
        } else {
            opts.disable_wal(true);
        }
        self.db.write_opt(batch, &opts).map_err(engine_error)
    }

    /// Every column family's handle, buckets or not.
    fn all_cf_handles(&self) -> Result<Vec<&ColumnFamily>> {
        self.all_cfs
            .iter()
            .map(|name| {
                self.db
                    .cf_handle(name)
                    .ok_or_else(|| StorageError::Engine(format!("column family {name:?} vanished")))
            })
            .collect()
    }

    /// Writes the memtables of every column family to table files (one atomic flush), waiting
    /// until they are durable.
    fn flush_memtables(&self) -> Result<()> {
        let cfs = self.all_cf_handles()?;
        let mut flush = FlushOptions::default();
        flush.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &flush).map_err(engine_error)
    }

    /// Sum an integer property over every column family.
    fn property_sum(&self, property: &rocksdb::properties::PropName) -> Result<u64> {
        let mut total = 0u64;
        for name in &self.all_cfs {
            let cf = self
                .db
                .cf_handle(name)
                .ok_or_else(|| StorageError::Engine(format!("column family {name:?} vanished")))?;
            let value = self
                .db
                .property_int_value_cf(cf, property)
                .map_err(engine_error)?
                .ok_or_else(|| {
                    StorageError::Engine(format!(
                        "property {property} unavailable for column family {name:?}"
                    ))
                })?;
            total = total.saturating_add(value);
        }
        Ok(total)
    }

    /// Queue, into `batch`, the deletion of every key of every bucket: a range deletion up to the
    /// last key plus a point deletion of the last key (a range end is exclusive and no byte
    /// string sorts after every key).
    fn queue_clear(&self, batch: &mut rocksdb::WriteBatch) -> Result<()> {
        for bucket in &self.buckets.0 {
            let cf = self.cf(bucket)?;
            let mut iter = self.db.raw_iterator_cf(cf);
            iter.seek_to_last();
            iter.status().map_err(engine_error)?;
            if let Some(last) = iter.key() {
                batch.delete_range_cf(cf, &[][..], last);
                batch.delete_cf(cf, last);
            }
        }
        Ok(())
    }
}

/// A consistent view of every bucket, owning a RocksDB snapshot.
struct RocksView {
    // Field order matters: fields drop in declaration order, so the snapshot is released while
    // the database it refers to is still open.
    /// Really borrows `*db`; see [`RocksBackend::snapshot`] for why `'static` is sound.
    snapshot: SnapshotWithThreadMode<'static, Db>,
    db: Arc<Db>,
    buckets: Arc<BucketSet>,
}

impl ReadView for RocksView {
    fn get(&self, bucket: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let cf = self.buckets.cf(&self.db, bucket)?;
        self.snapshot
            .get_cf_opt(cf, key, ReadOptions::default())
            .map_err(engine_error)
    }

    fn get_shared_many(&self, bucket: &str, keys: &[&[u8]]) -> Result<Vec<Option<bytes::Bytes>>> {
        let cf = self.buckets.cf(&self.db, bucket)?;
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&self.snapshot);
        // Sorted keys let RocksDB read each block once for all the keys in it.
        let sorted = keys.is_sorted();
        self.db
            .batched_multi_get_cf_opt(cf, keys, sorted, &opts)
            .into_iter()
            .map(|got| {
                got.map(|value| value.map(|v| bytes::Bytes::copy_from_slice(&v)))
                    .map_err(engine_error)
            })
            .collect()
    }

    fn scan(
        &self,
        bucket: &str,
        range: ScanRange<'_>,
        visitor: &mut dyn FnMut(&[u8], &[u8]) -> Visit,
    ) -> Result<usize> {
        let cf = self.buckets.cf(&self.db, bucket)?;
        if range.end.is_some_and(|end| end <= range.start) {
            return Ok(0);
        }
        // The bounds keep the iterator from reading past the range in either direction.
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(range.start);
        if let Some(end) = range.end {
            opts.set_iterate_upper_bound(end);
        }
        let mut iter = self.snapshot.raw_iterator_cf_opt(cf, opts);
        match range.direction {
            Direction::Forward => iter.seek(range.start),
            Direction::Reverse => iter.seek_to_last(),
        }
        let mut visited = 0usize;
        while let Some((key, value)) = iter.item() {
            visited += 1;
            if visitor(key, value) == Visit::Stop || (range.limit != 0 && visited >= range.limit) {
                break;
            }
            match range.direction {
                Direction::Forward => iter.next(),
                Direction::Reverse => iter.prev(),
            }
        }
        // An invalid iterator means either the end of the range or a read error; tell them apart.
        iter.status().map_err(engine_error)?;
        Ok(visited)
    }
}

/// Copies everything read from `inner` into `copy`: lets import verify a stream in one pass
/// while keeping its bytes for the second.
struct TeeReader<'a> {
    inner: &'a mut dyn Read,
    copy: BufWriter<File>,
}

impl Read for TeeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

impl Backend for RocksBackend {
    fn engine_name(&self) -> &'static str {
        "rocksdb"
    }

    fn buckets(&self) -> Vec<&'static str> {
        self.buckets.0.clone()
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        // Resolving every bucket before the write means a batch naming an unknown bucket fails
        // with nothing written.
        let mut rocks_batch = rocksdb::WriteBatch::default();
        for op in batch.ops() {
            match op {
                WriteOp::Put { bucket, key, value } => {
                    rocks_batch.put_cf(self.cf(bucket)?, key, value)
                }
                WriteOp::Delete { bucket, key } => rocks_batch.delete_cf(self.cf(bucket)?, key),
                // RocksDB wants `start < end`; an empty range removes nothing.
                WriteOp::DeleteRange { bucket, start, end } => {
                    let cf = self.cf(bucket)?;
                    if start < end {
                        rocks_batch.delete_range_cf(cf, start, end);
                    }
                }
            }
        }
        let _gate = self.import_gate.read();
        self.write_rocks(rocks_batch)
    }

    fn durable(&self) -> bool {
        true
    }

    /// With `sync_writes` every write is durable already; without, the memtables are flushed.
    fn sync(&self) -> Result<()> {
        if self.sync_writes {
            return Ok(());
        }
        self.flush_memtables()
    }

    /// The view keeps the database open until it is dropped, even after the backend is.
    fn snapshot(&self) -> Result<Arc<dyn ReadView>> {
        let db = Arc::clone(&self.db);
        let snapshot = db.snapshot();
        // SAFETY: the snapshot borrows the `Db` inside the `Arc`'s heap allocation, which never
        // moves. `RocksView` keeps that `Arc` alive for as long as it holds the snapshot and drops
        // the snapshot first (field order), so the borrow never dangles. The `'static` snapshot is
        // never handed out of the view; iterators made from it live inside `scan` only.
        let snapshot = unsafe {
            std::mem::transmute::<SnapshotWithThreadMode<'_, Db>, SnapshotWithThreadMode<'static, Db>>(
                snapshot,
            )
        };
        Ok(Arc::new(RocksView {
            snapshot,
            db,
            buckets: Arc::clone(&self.buckets),
        }))
    }

    /// `size_bytes`: SST files plus memtables. `size_in_use_bytes`: RocksDB's estimate of live
    /// data in SST files plus memtables, never more than `size_bytes`. Write-ahead log files are
    /// not counted. Deleted data stops counting once a compaction drops it (see `defragment`).
    fn size(&self) -> Result<SizeInfo> {
        let memtables = self.property_sum(CUR_SIZE_ALL_MEM_TABLES)?;
        let size_bytes = self
            .property_sum(TOTAL_SST_FILES_SIZE)?
            .saturating_add(memtables);
        let live = self
            .property_sum(ESTIMATE_LIVE_DATA_SIZE)?
            .saturating_add(memtables);
        Ok(SizeInfo {
            size_bytes,
            size_in_use_bytes: live.min(size_bytes),
        })
    }

    /// Flushes the memtables, then compacts every column family over its whole key range,
    /// bottommost level included, so that deleted and overwritten data and their tombstones are
    /// dropped. RocksDB runs both beside concurrent reads and writes; no lock is held here.
    fn defragment(&self) -> Result<()> {
        self.flush_memtables()?;
        let cfs = self.all_cf_handles()?;
        let mut compact = CompactOptions::default();
        compact.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        // Let automatic compactions go on meanwhile instead of pausing them.
        compact.set_exclusive_manual_compaction(false);
        for cf in cfs {
            self.db
                .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &compact);
            fail::fail_point!("storage::defragment::bucket_done");
        }
        Ok(())
    }

    /// First spools the stream to an unnamed temporary file in the database directory while
    /// verifying it completely (format, checksum, buckets): a bad or truncated stream fails here
    /// with the previous content untouched. Then replaces the content in batches of bounded
    /// size, the first of which also deletes every existing key; writes wait meanwhile.
    ///
    /// The replace step is bracketed by [`IMPORT_MARKER`]: created and fsynced before the first
    /// batch, removed (and the removal fsynced) only after the new content is durable. A crash
    /// or an error in between leaves the marker, and the next [`RocksBackend::open`] empties
    /// every bucket rather than serve a mix of old and new content. The caller, the raft layer,
    /// counts a snapshot as applied only once `import` returns `Ok`, and after a restart finds
    /// an applied index of 0 below the snapshot its WAL records, so it imports that snapshot
    /// again.
    fn import(&self, reader: &mut dyn Read) -> Result<()> {
        self.import_stepwise(reader, IMPORT_BATCH_BYTES, &mut |_| {})
    }
}
