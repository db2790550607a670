//! Reading stored key-values by revision, through a cache for engines whose reads copy.
//!
//! A revision's stored `mvccpb.KeyValue` never changes for the life of a [`crate::Store`]: apply
//! writes each revision once (a replay after a crash writes the same bytes again), compaction
//! only deletes revisions the index no longer points at (so no read asks for them again), and
//! a restore from a snapshot opens a new store with a new cache. So a revision can be answered
//! from memory without asking the engine whether it changed.
//!
//! On RocksDB every read of a value searches the memtables and table files and copies the value
//! out of them, and a Range answer holds its own copy until its client has taken it: a list of
//! 5,000 keys of 2 KiB spent most of its time in those searches, copies and their frees, and
//! 100 clients listing at once held 100 copies. The cache answers a value it has with a
//! reference to one shared copy. The memory engine already answers that way
//! ([`Backend::values_in_memory`]), so it goes without.

use metastore_storage::{Backend, ReadView};
use prost::bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::revision::{Revision, REVISION_BYTES_LEN};
use crate::{MvccError, KEY_BUCKET};

/// Bytes of values (and per-entry overhead) the cache keeps at most.
const CACHE_BYTES: u64 = 64 << 20;
/// What an entry costs besides its value's bytes, counted high: the key and the `Bytes` handle
/// (48), the table's slot and the eviction policy's bookkeeping, the header `Bytes` allocates
/// once the value is shared, and the allocator's rounding of the value.
const ENTRY_OVERHEAD: u64 = 128;
/// Entries the cache is sized for at first (it grows to what [`CACHE_BYTES`] admits).
const ESTIMATED_ENTRIES: usize = 16 * 1024;

#[derive(Clone)]
struct Weight;

impl Weighter<Revision, Bytes> for Weight {
    fn weight(&self, _rev: &Revision, value: &Bytes) -> u64 {
        value.len() as u64 + ENTRY_OVERHEAD
    }
}

/// Stored key-values by revision, shared by every read of a store (S3-FIFO eviction: one
/// sweep over more revisions than fit does not push out the ones read again and again).
pub(crate) struct ValueCache(Cache<Revision, Bytes, Weight>);

impl ValueCache {
    /// A cache for `backend`, or none when the engine's own reads already share its memory.
    pub(crate) fn for_backend(backend: &dyn Backend) -> Option<ValueCache> {
        (!backend.values_in_memory()).then(|| ValueCache::with_capacity(CACHE_BYTES))
    }

    fn with_capacity(bytes: u64) -> ValueCache {
        ValueCache(Cache::with_weighter(
            ESTIMATED_ENTRIES.min((bytes / 256).max(1) as usize),
            bytes,
            Weight,
        ))
    }
}

/// The stored key-values of one view, through the store's cache when it has one.
#[derive(Clone, Copy)]
pub(crate) struct Values<'a> {
    view: &'a dyn ReadView,
    cache: Option<&'a ValueCache>,
}

impl<'a> Values<'a> {
    pub(crate) fn new(view: &'a dyn ReadView, cache: Option<&'a ValueCache>) -> Self {
        Values { view, cache }
    }

    /// The stored encodings of the key-values written at `revs` (which the index points at), in
    /// their order. What the cache lacks is asked of the engine in one call, in revision order:
    /// revisions written together are stored together.
    pub(crate) fn stored_many(&self, revs: &[Revision]) -> Result<Vec<Bytes>, MvccError> {
        let mut found: Vec<Option<Bytes>> = match self.cache {
            Some(cache) => revs.iter().map(|rev| cache.0.get(rev)).collect(),
            None => vec![None; revs.len()],
        };
        let mut missing: Vec<usize> = (0..revs.len()).filter(|&i| found[i].is_none()).collect();
        if !missing.is_empty() {
            if !missing.is_sorted_by_key(|&i| revs[i]) {
                missing.sort_unstable_by_key(|&i| revs[i]);
            }
            let mut keys = Vec::with_capacity(missing.len() * REVISION_BYTES_LEN);
            for &i in &missing {
                revs[i].write_key(false, &mut keys);
            }
            let keys: Vec<&[u8]> = keys.chunks_exact(REVISION_BYTES_LEN).collect();
            let values = self.view.get_shared_many(KEY_BUCKET, &keys)?;
            for (&i, value) in missing.iter().zip(values) {
                let value = value.ok_or_else(|| not_stored(revs[i]))?;
                if let Some(cache) = self.cache {
                    cache.0.insert(revs[i], value.clone());
                }
                found[i] = Some(value);
            }
        }
        Ok(found.into_iter().flatten().collect())
    }
}

/// The error for a revision the index points at and the engine does not hold.
pub(crate) fn not_stored(rev: Revision) -> MvccError {
    MvccError::Corrupt(format!(
        "revision {}_{} is indexed but not stored",
        rev.main, rev.sub
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_storage::WriteBatch;
    use metastore_storage_mem::MemBackend;

    fn backend_with(revs: &[(Revision, &[u8])]) -> MemBackend {
        let backend = MemBackend::new(&[KEY_BUCKET]);
        let mut batch = WriteBatch::new();
        for (rev, value) in revs {
            batch.put(KEY_BUCKET, rev.to_key(false), value.to_vec());
        }
        backend.write(batch).unwrap();
        backend
    }

    #[test]
    fn a_cached_revision_is_answered_without_the_engine() {
        let r1 = Revision::new(2, 0);
        let backend = backend_with(&[(r1, b"one")]);
        let cache = ValueCache::with_capacity(1 << 20);
        let view = backend.snapshot().unwrap();
        assert_eq!(
            Values::new(&*view, Some(&cache))
                .stored_many(&[r1])
                .unwrap(),
            vec![Bytes::from_static(b"one")]
        );
        // Gone from the engine, still answered: the cache is what answered.
        let mut batch = WriteBatch::new();
        batch.delete(KEY_BUCKET, r1.to_key(false));
        backend.write(batch).unwrap();
        let view = backend.snapshot().unwrap();
        assert_eq!(
            Values::new(&*view, Some(&cache))
                .stored_many(&[r1])
                .unwrap(),
            vec![Bytes::from_static(b"one")]
        );
        // Without the cache the same read finds nothing, and says so.
        let err = Values::new(&*view, None).stored_many(&[r1]).unwrap_err();
        assert!(
            matches!(&err, MvccError::Corrupt(m) if m.contains("2_0 is indexed but not stored")),
            "{err:?}"
        );
    }

    #[test]
    fn revisions_are_answered_in_the_order_asked_whatever_the_cache_holds() {
        let revs: Vec<(Revision, Vec<u8>)> = (1..=40)
            .map(|main| {
                (
                    Revision::new(main, main % 3),
                    format!("v{main}").into_bytes(),
                )
            })
            .collect();
        let pairs: Vec<(Revision, &[u8])> = revs.iter().map(|(r, v)| (*r, &v[..])).collect();
        let backend = backend_with(&pairs);
        let value = |main: i64| format!("v{main}").into_bytes();
        let cache = ValueCache::with_capacity(1 << 20);
        let view = backend.snapshot().unwrap();
        for cache in [None, Some(&cache)] {
            let values = Values::new(&*view, cache);
            // Cached or not (the second pass with the cache finds some of them in it).
            for asked in [
                vec![7, 3, 3, 40, 1],
                vec![1, 2, 3, 4, 5, 6, 7, 8],
                vec![40, 12, 7, 39],
            ] {
                let revs: Vec<Revision> = asked.iter().map(|&m| Revision::new(m, m % 3)).collect();
                let got = values.stored_many(&revs).unwrap();
                let want: Vec<Vec<u8>> = asked.iter().map(|&m| value(m)).collect();
                assert_eq!(got.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), want);
            }
            assert!(values.stored_many(&[]).unwrap().is_empty());
            // One revision not stored fails the whole read.
            let err = values
                .stored_many(&[Revision::new(5, 2), Revision::new(41, 0)])
                .unwrap_err();
            assert!(
                matches!(&err, MvccError::Corrupt(m) if m.contains("41_0")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn the_cache_keeps_to_its_budget() {
        let revs: Vec<(Revision, Vec<u8>)> = (1..=200)
            .map(|main| (Revision::new(main, 0), vec![main as u8; 1000]))
            .collect();
        let pairs: Vec<(Revision, &[u8])> = revs.iter().map(|(r, v)| (*r, &v[..])).collect();
        let backend = backend_with(&pairs);
        let budget = 50 * (1000 + ENTRY_OVERHEAD);
        let cache = ValueCache::with_capacity(budget);
        let view = backend.snapshot().unwrap();
        let values = Values::new(&*view, Some(&cache));
        for (rev, value) in &revs {
            assert_eq!(values.stored_many(&[*rev]).unwrap(), vec![value.clone()]);
        }
        assert!(
            cache.0.weight() <= budget,
            "{} > {budget}",
            cache.0.weight()
        );
        assert!(
            cache.0.len() <= 50 && !cache.0.is_empty(),
            "{}",
            cache.0.len()
        );
    }

    #[test]
    fn only_engines_whose_reads_copy_get_a_cache() {
        let memory = MemBackend::new(&[KEY_BUCKET]);
        assert!(ValueCache::for_backend(&memory).is_none());
    }
}
