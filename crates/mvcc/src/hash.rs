//! etcd's HashKV hasher (`hash.go`): CRC32-Castagnoli over the `key` bucket.

use std::collections::HashSet;

use crate::revision::Revision;
use crate::KEY_BUCKET;

/// The result of a HashKV computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashKv {
    /// CRC32-Castagnoli of the `key` bucket as etcd computes it.
    pub hash: u32,
    /// The compact revision the hash was computed against (-1 when never compacted), which is what
    /// etcd reports as `compact_revision`.
    pub compact_revision: i64,
    /// The revision the hash covers (etcd's `hash_revision`).
    pub hash_revision: i64,
    /// The store's current revision when the hash was answered (for the response header).
    pub current_revision: i64,
}

/// Feeds revision keys and values in bucket order, skipping what a compaction would drop.
pub(crate) struct KvHasher<'a> {
    crc: u32,
    compact_revision: i64,
    revision: i64,
    keep: &'a HashSet<Revision>,
    /// While a compaction at the compact revision is still deleting: the revisions at or below
    /// it that the compaction keeps. Any other is hashed as if already deleted.
    compacting: Option<&'a HashSet<Revision>>,
}

impl<'a> KvHasher<'a> {
    /// A hasher for the state at `revision`, given the compact revision and the revisions at or
    /// below it that survive compaction.
    pub(crate) fn new(compact_revision: i64, revision: i64, keep: &'a HashSet<Revision>) -> Self {
        KvHasher {
            crc: crc32c::crc32c_append(0, KEY_BUCKET.as_bytes()),
            compact_revision,
            revision,
            keep,
            compacting: None,
        }
    }

    /// Treat every revision at or below the compact revision that is not in `available` (what
    /// the compaction there keeps) as deleted, as it is once that compaction finished: the hash
    /// then does not depend on how far a background compaction got.
    pub(crate) fn skipping_compacted(mut self, available: &'a HashSet<Revision>) -> Self {
        self.compacting = Some(available);
        self
    }

    /// Account for one pair of the `key` bucket.
    pub(crate) fn write(&mut self, key: &[u8], value: &[u8], rev: Revision, tombstone: bool) {
        if rev.main > self.revision {
            return;
        }
        if rev.main <= self.compact_revision && self.compacting.is_some_and(|a| !a.contains(&rev)) {
            return;
        }
        // etcd only filters by `keep` when it is non-empty; reproduced for identical hashes.
        if rev.main <= self.compact_revision && !self.keep.is_empty() && !self.keep.contains(&rev) {
            return;
        }
        if rev.main == self.compact_revision && tombstone {
            return;
        }
        self.crc = crc32c::crc32c_append(self.crc, key);
        self.crc = crc32c::crc32c_append(self.crc, value);
    }

    /// The hash so far.
    pub(crate) fn sum(&self) -> u32 {
        self.crc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn castagnoli_matches_reference_vector() {
        // The standard CRC-32C check value.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // Incremental updates equal one pass, as with Go's hash.Hash32.
        let split = crc32c::crc32c_append(crc32c::crc32c(b"1234"), b"56789");
        assert_eq!(split, 0xE306_9283);
    }

    #[test]
    fn filters_like_etcd() {
        let keep = HashSet::from([Revision::new(2, 0)]);
        let mut h = KvHasher::new(3, 5, &keep);
        let empty = h.sum();
        assert_eq!(empty, crc32c::crc32c(b"key"));
        h.write(b"k1", b"v", Revision::new(1, 0), false); // compacted away, not kept
        h.write(b"k3", b"v", Revision::new(3, 0), true); // tombstone at the compact revision
        h.write(b"k6", b"v", Revision::new(6, 0), false); // after the hash revision
        assert_eq!(h.sum(), empty);
        h.write(b"k2", b"v", Revision::new(2, 0), false);
        h.write(b"k4", b"v", Revision::new(4, 0), true);
        let expected = [b"k2".as_slice(), b"v", b"k4", b"v"]
            .iter()
            .fold(crc32c::crc32c(b"key"), |c, part| {
                crc32c::crc32c_append(c, part)
            });
        assert_eq!(h.sum(), expected);
    }

    #[test]
    fn skipping_compacted_skips_what_the_compaction_deletes() {
        // etcd hashes everything stored when nothing is kept; a compaction still deleting must
        // not change that answer.
        let none = HashSet::new();
        let available = HashSet::from([Revision::new(2, 0)]);
        let mut after = KvHasher::new(3, 5, &none);
        after.write(b"k2", b"v", Revision::new(2, 0), false);
        let mut during = KvHasher::new(3, 5, &none).skipping_compacted(&available);
        during.write(b"k1", b"v", Revision::new(1, 0), false);
        during.write(b"k2", b"v", Revision::new(2, 0), false);
        assert_eq!(during.sum(), after.sum());
        assert_ne!(after.sum(), crc32c::crc32c(b"key"));
    }
}
