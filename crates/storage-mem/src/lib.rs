//! The in-memory storage engine.
//!
//! Owns: [`MemBackend`], an implementation of [`Backend`] over persistent ordered maps whose
//! pairs are packed into blocks ([`packed::PackedMap`]): a snapshot is an O(1) clone that later
//! writes never touch, so readers and snapshot exports run while writes continue. Durability is not this crate's business: the raft WAL and snapshot files
//! rebuild the content on restart.
//!
//! Must not depend on: mvcc, raft, the RocksDB engine.

mod packed;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use metastore_storage::{
    snapshot_format, Backend, Direction, ReadView, Result, ScanRange, SizeInfo, StorageError,
    Visit, WriteBatch, WriteOp,
};
use packed::PackedMap;
use parking_lot::Mutex;

/// Bytes counted per stored pair on top of its key and value: its header and offset in a block,
/// and a share of the tree of blocks.
const PER_ENTRY_OVERHEAD: u64 = 16;

#[derive(Clone, Default)]
struct Buckets {
    maps: BTreeMap<&'static str, PackedMap>,
    live_bytes: u64,
    /// Bumped on every write; lets defragment detect that it raced with a writer.
    generation: u64,
}

impl Buckets {
    fn map(&self, bucket: &str) -> Result<&PackedMap> {
        self.maps
            .get(bucket)
            .ok_or_else(|| StorageError::UnknownBucket(bucket.to_string()))
    }
}

fn entry_size(key: &[u8], value: &[u8]) -> u64 {
    key.len() as u64 + value.len() as u64 + PER_ENTRY_OVERHEAD
}

/// The in-memory engine. Cheap to clone a view of; all methods are thread-safe.
pub struct MemBackend {
    state: Mutex<Buckets>,
}

impl MemBackend {
    /// An empty backend holding `buckets`.
    pub fn new(buckets: &[&'static str]) -> Self {
        let maps = buckets.iter().map(|b| (*b, PackedMap::default())).collect();
        MemBackend {
            state: Mutex::new(Buckets {
                maps,
                live_bytes: 0,
                generation: 0,
            }),
        }
    }

    fn current(&self) -> Buckets {
        self.state.lock().clone()
    }
}

struct MemView(Buckets);

impl ReadView for MemView {
    fn get(&self, bucket: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.0.map(bucket)?.get(key).map(|v| v.to_vec()))
    }

    fn get_shared(&self, bucket: &str, key: &[u8]) -> Result<Option<bytes::Bytes>> {
        Ok(self.0.map(bucket)?.get_shared(key))
    }

    fn get_shared_many(&self, bucket: &str, keys: &[&[u8]]) -> Result<Vec<Option<bytes::Bytes>>> {
        Ok(self.0.map(bucket)?.get_shared_many(keys))
    }

    fn scan(
        &self,
        bucket: &str,
        range: ScanRange<'_>,
        visitor: &mut dyn FnMut(&[u8], &[u8]) -> Visit,
    ) -> Result<usize> {
        let map = self.0.map(bucket)?;
        if range.end.is_some_and(|end| end <= range.start) {
            return Ok(0);
        }
        let mut visited = 0usize;
        let reverse = range.direction == Direction::Reverse;
        map.visit(range.start, range.end, reverse, &mut |k, v| {
            visited += 1;
            let go_on = visitor(k, v) == Visit::Continue;
            go_on && (range.limit == 0 || visited < range.limit)
        });
        Ok(visited)
    }
}

impl Backend for MemBackend {
    fn engine_name(&self) -> &'static str {
        "memory"
    }

    fn buckets(&self) -> Vec<&'static str> {
        self.state.lock().maps.keys().copied().collect()
    }

    fn values_in_memory(&self) -> bool {
        true
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut state = self.state.lock();
        // Check every bucket first so that a bad batch changes nothing.
        for op in batch.ops() {
            state.map(op.bucket())?;
        }
        let mut live = state.live_bytes;
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { bucket, key, value } => {
                    let added = entry_size(&key, &value);
                    let map = state.maps.get_mut(bucket).expect("bucket checked above");
                    if let Some(old_len) = map.insert(&key, &value) {
                        live -= entry_size(&key, &[]) + old_len as u64;
                    }
                    live += added;
                }
                WriteOp::Delete { bucket, key } => {
                    let map = state.maps.get_mut(bucket).expect("bucket checked above");
                    if let Some(old_len) = map.remove(&key) {
                        live -= entry_size(&key, &[]) + old_len as u64;
                    }
                }
                WriteOp::DeleteRange { bucket, start, end } => {
                    let map = state.maps.get_mut(bucket).expect("bucket checked above");
                    let mut keys = Vec::new();
                    if start < end {
                        map.visit(&start, Some(&end), false, &mut |k, _| {
                            keys.push(k.to_vec());
                            true
                        });
                    }
                    for key in keys {
                        if let Some(old_len) = map.remove(&key) {
                            live -= entry_size(&key, &[]) + old_len as u64;
                        }
                    }
                }
            }
        }
        state.live_bytes = live;
        state.generation += 1;
        Ok(())
    }

    fn snapshot(&self) -> Result<Arc<dyn ReadView>> {
        Ok(Arc::new(MemView(self.current())))
    }

    fn size(&self) -> Result<SizeInfo> {
        let live = self.state.lock().live_bytes;
        Ok(SizeInfo {
            size_bytes: live,
            size_in_use_bytes: live,
        })
    }

    /// Rebuilds every map from a snapshot so that blocks left sparse by deletes are packed again.
    /// The rebuild runs without the lock; if a write lands meanwhile the rebuild is retried, and
    /// after a few lost races the current maps are kept (they are correct, only less compact).
    fn defragment(&self) -> Result<()> {
        for _ in 0..3 {
            let snapshot = self.current();
            let rebuilt: BTreeMap<_, _> = snapshot
                .maps
                .iter()
                .map(|(name, map)| {
                    let mut packed = PackedMap::default();
                    map.visit(&[], None, false, &mut |k, v| {
                        packed.insert(k, v);
                        true
                    });
                    (*name, packed)
                })
                .collect();
            fail::fail_point!("storage::defragment::bucket_done");
            let mut state = self.state.lock();
            if state.generation == snapshot.generation {
                state.maps = rebuilt;
                return Ok(());
            }
        }
        Ok(())
    }

    fn import(&self, reader: &mut dyn Read) -> Result<()> {
        let names: Vec<&'static str> = self.buckets();
        let mut staged: BTreeMap<&'static str, PackedMap> =
            names.iter().map(|b| (*b, PackedMap::default())).collect();
        let mut live = 0u64;
        snapshot_format::read_stream(reader, &mut |bucket, key, value| {
            let map = staged
                .get_mut(bucket)
                .ok_or_else(|| StorageError::UnknownBucket(bucket.to_string()))?;
            live += entry_size(&key, &value);
            if let Some(old_len) = map.insert(&key, &value) {
                live -= entry_size(&key, &[]) + old_len as u64;
            }
            Ok(())
        })?;
        fail::fail_point!("storage::import::batch_written");
        let mut state = self.state.lock();
        state.maps = staged;
        state.live_bytes = live;
        state.generation += 1;
        Ok(())
    }
}
