//! The in-memory key index: for every key, the revisions that changed it, grouped into
//! generations (etcd's `key_index.go` and `index.go`).
//!
//! A generation runs from a key's creation to its deletion: its last revision is the tombstone,
//! except in the last generation, which is still live (or empty after a deletion). Reads at a past
//! revision find the generation alive then and the newest revision not after it.

use std::collections::HashSet;
use std::ops::Bound;

use smallvec::SmallVec;

use crate::leaf_map::LeafMap;
use crate::revision::Revision;
use crate::MvccError;

/// One life of a key, from creation to deletion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Generation {
    /// Version of the key at the last revision of this generation.
    ver: i64,
    /// Revision that created the key in this generation.
    created: Revision,
    /// Revisions that changed the key, ascending; for a finished generation the last is the tombstone.
    revs: Vec<Revision>,
}

impl Generation {
    fn is_empty(&self) -> bool {
        self.revs.is_empty()
    }

    /// Position of the newest revision whose main revision is not after `at_rev`.
    fn newest_at(&self, at_rev: i64) -> Option<usize> {
        self.revs.iter().rposition(|r| r.main <= at_rev)
    }
}

/// What a key looked like at a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyAt {
    /// The revision that wrote the visible value.
    pub modified: Revision,
    /// The revision that created the key in its current generation.
    pub created: Revision,
    /// The key's version at that point.
    pub version: i64,
}

/// The history of one key.
///
/// Memory: most keys are written once and never deleted (a registry entry, a config blob), so
/// that case is a bare revision with no heap allocation; a key's first update or deletion moves
/// its history to the general form. At a million keys this saves about 100 bytes per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyIndex {
    /// Created at this revision (version 1) and not changed since.
    One(Revision),
    /// Any other history.
    Many(Box<Full>),
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex::Many(Box::default())
    }
}

impl KeyIndex {
    fn full_mut(&mut self) -> &mut Full {
        if let KeyIndex::One(rev) = *self {
            *self = KeyIndex::Many(Box::new(Full::restore(rev, rev, 1)));
        }
        match self {
            KeyIndex::Many(full) => full,
            KeyIndex::One(_) => unreachable!("just expanded"),
        }
    }

    fn put(&mut self, rev: Revision) {
        self.full_mut().put(rev);
    }

    /// The last revision that changed the key.
    fn modified(&self) -> Revision {
        match self {
            KeyIndex::One(rev) => *rev,
            KeyIndex::Many(full) => full.modified,
        }
    }

    fn restore(created: Revision, modified: Revision, ver: i64) -> Self {
        if created == modified && ver == 1 {
            KeyIndex::One(modified)
        } else {
            KeyIndex::Many(Box::new(Full::restore(created, modified, ver)))
        }
    }

    fn restore_tombstone(rev: Revision) -> Self {
        KeyIndex::Many(Box::new(Full::restore_tombstone(rev)))
    }

    fn tombstone(&mut self, rev: Revision) -> bool {
        self.full_mut().tombstone(rev)
    }

    /// Whether the key exists now (its last generation is not empty).
    fn is_live(&self) -> bool {
        match self {
            KeyIndex::One(_) => true,
            KeyIndex::Many(full) => full.generations.last().is_some_and(|g| !g.is_empty()),
        }
    }

    /// The key as it was at `at_rev`, if it existed then.
    pub(crate) fn get(&self, at_rev: i64) -> Option<KeyAt> {
        match self {
            KeyIndex::One(rev) => (rev.main <= at_rev).then_some(KeyAt {
                modified: *rev,
                created: *rev,
                version: 1,
            }),
            KeyIndex::Many(full) => full.get(at_rev),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            KeyIndex::One(_) => false,
            KeyIndex::Many(full) => full.is_empty(),
        }
    }

    fn do_compact(&self, at_rev: i64, available: &mut HashSet<Revision>) {
        match self {
            // One live generation: keeps its revision once it is not after `at_rev`.
            KeyIndex::One(rev) => {
                if rev.main <= at_rev {
                    available.insert(*rev);
                }
            }
            KeyIndex::Many(full) => {
                full.do_compact(at_rev, available);
            }
        }
    }

    fn compact(&mut self, at_rev: i64, available: &mut HashSet<Revision>) {
        match self {
            KeyIndex::One(_) => self.do_compact(at_rev, available),
            KeyIndex::Many(full) => full.compact(at_rev, available),
        }
    }

    fn keep(&self, at_rev: i64, available: &mut HashSet<Revision>) {
        match self {
            // A live key's revision is never a tombstone.
            KeyIndex::One(_) => self.do_compact(at_rev, available),
            KeyIndex::Many(full) => full.keep(at_rev, available),
        }
    }
}

/// The general history of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Full {
    /// The last revision that changed the key.
    modified: Revision,
    generations: Vec<Generation>,
}

impl Full {
    /// Record a put at `rev`. Revisions must arrive in increasing order.
    fn put(&mut self, rev: Revision) {
        debug_assert!(rev > self.modified, "put with a smaller revision");
        // Memory: most keys have one generation and few revisions, so the first allocation of
        // each list is exact (a `Vec` would start at 4 elements: 192 + 64 bytes per key).
        if self.generations.is_empty() {
            self.generations.reserve_exact(1);
            self.generations.push(Generation::default());
        }
        let g = self
            .generations
            .last_mut()
            .expect("at least one generation");
        if g.revs.is_empty() {
            g.created = rev;
        }
        if g.revs.capacity() == 0 {
            g.revs.reserve_exact(1);
        }
        g.revs.push(rev);
        g.ver += 1;
        self.modified = rev;
    }

    /// Rebuild from the first surviving revision of a live key found on disk.
    fn restore(created: Revision, modified: Revision, ver: i64) -> Self {
        Full {
            modified,
            generations: vec![Generation {
                ver,
                created,
                revs: vec![modified],
            }],
        }
    }

    /// Rebuild from a tombstone that is the first surviving revision of a key on disk.
    fn restore_tombstone(rev: Revision) -> Self {
        let mut ki = Full::restore(Revision::default(), rev, 1);
        ki.generations.push(Generation::default());
        ki
    }

    /// Record a deletion at `rev`. Returns false when the key is not live (nothing to delete).
    fn tombstone(&mut self, rev: Revision) -> bool {
        match self.generations.last() {
            Some(g) if !g.is_empty() => {}
            _ => return false,
        }
        self.put(rev);
        self.generations.push(Generation::default());
        true
    }

    /// The key as it was at `at_rev`, if it existed then.
    pub(crate) fn get(&self, at_rev: i64) -> Option<KeyAt> {
        let g = self.find_generation(at_rev)?;
        let n = g.newest_at(at_rev)?;
        Some(KeyAt {
            modified: g.revs[n],
            created: g.created,
            version: g.ver - (g.revs.len() - n - 1) as i64,
        })
    }

    /// The generation alive at `rev`, if any.
    fn find_generation(&self, rev: i64) -> Option<&Generation> {
        let last = self.generations.len().checked_sub(1)?;
        for (i, g) in self.generations.iter().enumerate().rev() {
            let Some(first) = g.revs.first() else {
                continue;
            };
            if i != last {
                let tomb = g.revs[g.revs.len() - 1].main;
                if tomb <= rev {
                    return None;
                }
            }
            if first.main <= rev {
                return Some(g);
            }
        }
        None
    }

    fn is_empty(&self) -> bool {
        self.generations.len() == 1 && self.generations[0].is_empty()
    }

    /// The generation and revision position a compaction at `at_rev` keeps, adding the kept
    /// revision to `available` (etcd's `doCompact`).
    fn do_compact(&self, at_rev: i64, available: &mut HashSet<Revision>) -> (usize, Option<usize>) {
        let mut gen_idx = 0;
        while gen_idx < self.generations.len() - 1 {
            let g = &self.generations[gen_idx];
            if g.revs[g.revs.len() - 1].main >= at_rev {
                break;
            }
            gen_idx += 1;
        }
        let g = &self.generations[gen_idx];
        let rev_idx = g.newest_at(at_rev);
        if let Some(i) = rev_idx {
            available.insert(g.revs[i]);
        }
        (gen_idx, rev_idx)
    }

    /// Drop every revision a compaction at `at_rev` supersedes; adds the revisions to keep on disk
    /// to `available`. A tombstone at exactly `at_rev` stays (as in etcd) so that watchers starting
    /// at the compact revision still see the deletion; the next compaction removes it.
    fn compact(&mut self, at_rev: i64, available: &mut HashSet<Revision>) {
        let (gen_idx, rev_idx) = self.do_compact(at_rev, available);
        if let Some(i) = rev_idx {
            self.generations[gen_idx].revs.drain(..i);
        }
        self.generations.drain(..gen_idx);
    }

    /// Add to `available` the revision a compaction at `at_rev` would keep for this key, unless
    /// it is a tombstone (etcd's `keep`, used by HashKV).
    fn keep(&self, at_rev: i64, available: &mut HashSet<Revision>) {
        if self.is_empty() {
            return;
        }
        let (gen_idx, rev_idx) = self.do_compact(at_rev, available);
        let g = &self.generations[gen_idx];
        if let Some(i) = rev_idx {
            if i == g.revs.len() - 1 && gen_idx != self.generations.len() - 1 {
                available.remove(&g.revs[i]);
            }
        }
    }
}

/// Lower and upper bounds of a key range, as `BTreeMap::range` takes them.
pub(crate) type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// The bounds of a key range: a single key, or `[start, end)` with `end = None` meaning every key
/// from `start` on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyRange<'a> {
    /// Exactly one key.
    Single(&'a [u8]),
    /// Keys in `[start, end)`; no upper bound when `end` is `None`.
    Span(&'a [u8], Option<&'a [u8]>),
}

impl<'a> KeyRange<'a> {
    /// etcd's interpretation of a request's `key` / `range_end`: empty end = the single key,
    /// `"\0"` = every key from `key` on, otherwise `[key, range_end)`.
    pub(crate) fn from_request(key: &'a [u8], range_end: &'a [u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key),
            [0] => KeyRange::Span(key, None),
            end => KeyRange::Span(key, Some(end)),
        }
    }

    /// Bounds for a `BTreeMap` range; `None` when the range is empty (end not after start).
    pub(crate) fn bounds(&self) -> Option<KeyBounds<'a>> {
        match *self {
            KeyRange::Single(k) => Some((Bound::Included(k), Bound::Included(k))),
            KeyRange::Span(start, None) => Some((Bound::Included(start), Bound::Unbounded)),
            KeyRange::Span(start, Some(end)) if end > start => {
                Some((Bound::Included(start), Bound::Excluded(end)))
            }
            KeyRange::Span(..) => None,
        }
    }
}

/// A key as the index stores it: up to 16 bytes inline, longer ones on the heap. The same size
/// as a `Vec<u8>`, and ordered the same way (as byte strings).
pub(crate) type IndexKey = SmallVec<[u8; 16]>;
const _: () = assert!(std::mem::size_of::<IndexKey>() == std::mem::size_of::<Vec<u8>>());

/// Every key's history, ordered by key.
#[derive(Debug, Clone, Default)]
pub(crate) struct Index {
    /// Packed in full leaves where keys come in order ([`LeafMap`]).
    keys: LeafMap<KeyIndex>,
    /// How many keys are live, kept as puts and deletions come (etcd's `keysGauge`), so that
    /// reading it never walks the index.
    live: usize,
}

impl Index {
    /// Record a put of `key` at `rev`.
    pub(crate) fn put(&mut self, key: &[u8], rev: Revision) {
        match self.keys.get_mut(key) {
            Some(ki) => {
                if !ki.is_live() {
                    self.live += 1;
                }
                ki.put(rev);
            }
            None => {
                self.keys
                    .insert(IndexKey::from_slice(key), KeyIndex::One(rev));
                self.live += 1;
            }
        }
    }

    /// Record a deletion of `key` at `rev`. False when the key is not live.
    pub(crate) fn tombstone(&mut self, key: &[u8], rev: Revision) -> bool {
        let deleted = self.keys.get_mut(key).is_some_and(|ki| ki.tombstone(rev));
        if deleted {
            self.live -= 1;
        }
        deleted
    }

    /// How many keys are live (put and not deleted since).
    pub(crate) fn live_keys(&self) -> usize {
        self.live
    }

    /// Replay one revision found on disk while rebuilding the index in revision order.
    /// `created`/`version` come from the stored value and matter only for a key's first revision.
    pub(crate) fn restore(
        &mut self,
        key: &[u8],
        rev: Revision,
        tombstone: bool,
        created: i64,
        version: i64,
    ) -> Result<(), MvccError> {
        match self.keys.get_mut(key) {
            // The key bucket is read in revision order, so each key's revisions increase; a
            // damaged or forged snapshot may break that (the same revision as a put and as a
            // tombstone), which the index must refuse rather than record out of order.
            Some(ki) if rev <= ki.modified() => {
                return Err(MvccError::Corrupt(format!(
                    "key bucket: revision {}_{} of key {key:02x?} does not follow its revision \
                     {}_{}",
                    rev.main,
                    rev.sub,
                    ki.modified().main,
                    ki.modified().sub
                )));
            }
            Some(ki) if tombstone => {
                // A tombstone of a key that is not live is a no-op, as in etcd's restore.
                if ki.tombstone(rev) {
                    self.live -= 1;
                }
            }
            Some(ki) => {
                if !ki.is_live() {
                    self.live += 1;
                }
                ki.put(rev);
            }
            None => {
                let ki = if tombstone {
                    KeyIndex::restore_tombstone(rev)
                } else {
                    self.live += 1;
                    KeyIndex::restore(Revision::new(created, 0), rev, version)
                };
                self.keys.insert(IndexKey::from_slice(key), ki);
            }
        }
        Ok(())
    }

    /// Every key of `range` with its history, in key order.
    pub(crate) fn iter_range<'s>(
        &'s self,
        range: KeyRange<'s>,
    ) -> impl Iterator<Item = (&'s [u8], &'s KeyIndex)> + 's {
        // A single key (every Put, most Ranges) is a plain lookup: a one-key `range` walks the
        // tree twice, once per bound.
        let (single, span) = match range {
            KeyRange::Single(key) => (self.keys.get_key_value(key), None),
            KeyRange::Span(..) => (None, range.bounds()),
        };
        single
            .into_iter()
            .chain(span.into_iter().flat_map(move |b| self.keys.range(b)))
            .map(|(k, v)| (k.as_slice(), v))
    }

    /// Compact every key at `at_rev`; returns the revisions to keep on disk (etcd's `Compact`).
    #[cfg(test)]
    pub(crate) fn compact(&mut self, at_rev: i64) -> HashSet<Revision> {
        let mut available = HashSet::new();
        self.keys.retain(|_, ki| {
            ki.compact(at_rev, &mut available);
            !ki.is_empty()
        });
        available
    }

    /// Compact at `at_rev` the first `limit` keys (at least one) after `after` (from the first
    /// key when `None`), adding the revisions to keep on disk to `available`, and drop the keys
    /// left without history. Returns the last key compacted, to pass as `after` next time, or
    /// `None` once every key is done. Calling it until it answers `None` is [`Index::compact`]
    /// in steps; puts and deletions in between (all after `at_rev`) do not change the outcome.
    pub(crate) fn compact_some(
        &mut self,
        at_rev: i64,
        after: Option<&[u8]>,
        limit: usize,
        available: &mut HashSet<Revision>,
    ) -> Option<IndexKey> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let limit = limit.max(1);
        let mut done = 0;
        let mut last = None;
        let mut emptied = Vec::new();
        for (key, ki) in self.keys.iter_mut_from(lower).take(limit) {
            ki.compact(at_rev, available);
            if ki.is_empty() {
                emptied.push(key.clone());
            }
            last = Some(key);
            done += 1;
        }
        let last = last.cloned();
        for key in emptied {
            self.keys.remove(key.as_slice());
        }
        if done < limit {
            None
        } else {
            last
        }
    }

    /// The revisions a compaction at `at_rev` would keep on disk, without changing anything.
    pub(crate) fn compaction_available(&self, at_rev: i64) -> HashSet<Revision> {
        let mut available = HashSet::new();
        for ki in self.keys.values() {
            ki.do_compact(at_rev, &mut available);
        }
        available
    }

    /// The live revisions at `at_rev` that a compaction there would keep (etcd's `Keep`).
    pub(crate) fn keep(&self, at_rev: i64) -> HashSet<Revision> {
        let mut available = HashSet::new();
        for ki in self.keys.values() {
            ki.keep(at_rev, &mut available);
        }
        available
    }

    /// Number of keys with any history in the index.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64, sub: i64) -> Revision {
        Revision::new(main, sub)
    }

    /// The history etcd's key_index_test uses: puts at 2, 4, tombstone 6; puts 8, 10, tombstone
    /// 12; puts 14, 14.1, tombstone 16; then an empty generation.
    fn sample() -> KeyIndex {
        let mut ki = KeyIndex::default();
        ki.put(r(2, 0));
        ki.put(r(4, 0));
        assert!(ki.tombstone(r(6, 0)));
        ki.put(r(8, 0));
        ki.put(r(10, 0));
        assert!(ki.tombstone(r(12, 0)));
        ki.put(r(14, 0));
        ki.put(r(14, 1));
        assert!(ki.tombstone(r(16, 0)));
        ki
    }

    #[test]
    fn get_walks_generations() {
        let ki = sample();
        assert_eq!(ki.get(1), None);
        assert_eq!(
            ki.get(2),
            Some(KeyAt {
                modified: r(2, 0),
                created: r(2, 0),
                version: 1
            })
        );
        assert_eq!(
            ki.get(5),
            Some(KeyAt {
                modified: r(4, 0),
                created: r(2, 0),
                version: 2
            })
        );
        assert_eq!(ki.get(6), None);
        assert_eq!(ki.get(7), None);
        assert_eq!(
            ki.get(9),
            Some(KeyAt {
                modified: r(8, 0),
                created: r(8, 0),
                version: 1
            })
        );
        assert_eq!(
            ki.get(11),
            Some(KeyAt {
                modified: r(10, 0),
                created: r(8, 0),
                version: 2
            })
        );
        assert_eq!(
            ki.get(14),
            Some(KeyAt {
                modified: r(14, 1),
                created: r(14, 0),
                version: 2
            })
        );
        assert_eq!(ki.get(16), None);
        assert_eq!(ki.get(100), None);
    }

    #[test]
    fn tombstone_of_deleted_key_is_refused() {
        let mut ki = sample();
        assert!(!ki.tombstone(r(17, 0)));
    }

    #[test]
    fn compact_keeps_latest_and_tombstone_at_compact_revision() {
        let mut ki = sample();
        let mut available = HashSet::new();
        ki.compact(5, &mut available);
        assert_eq!(available, HashSet::from([r(4, 0)]));
        assert_eq!(ki.get(5).map(|k| k.modified), Some(r(4, 0)));

        let mut available = HashSet::new();
        ki.compact(12, &mut available);
        // The tombstone at exactly the compact revision stays.
        assert_eq!(available, HashSet::from([r(12, 0)]));
        assert_eq!(ki.get(12), None);
        assert_eq!(ki.get(14).map(|k| k.version), Some(2));

        let mut available = HashSet::new();
        ki.compact(13, &mut available);
        assert!(available.is_empty());

        let mut available = HashSet::new();
        ki.compact(16, &mut available);
        assert_eq!(available, HashSet::from([r(16, 0)]));
        assert!(!ki.is_empty());
        let mut available = HashSet::new();
        ki.compact(17, &mut available);
        assert!(available.is_empty());
        assert!(ki.is_empty());
    }

    #[test]
    fn keep_excludes_tombstones() {
        let ki = sample();
        let mut available = HashSet::new();
        ki.keep(12, &mut available);
        assert!(available.is_empty());
        ki.keep(11, &mut available);
        assert_eq!(available, HashSet::from([r(10, 0)]));
    }

    #[test]
    fn index_compaction_drops_dead_keys() {
        let mut idx = Index::default();
        idx.put(b"a", r(2, 0));
        idx.put(b"b", r(3, 0));
        assert!(idx.tombstone(b"a", r(4, 0)));
        idx.put(b"b", r(5, 0));
        let available = idx.compact(5);
        assert_eq!(available, HashSet::from([r(5, 0)]));
        assert_eq!(idx.len(), 1);
        assert!(!idx.tombstone(b"zz", r(6, 0)));
    }

    #[test]
    fn compaction_in_steps_equals_one_pass() {
        let build = || {
            let mut idx = Index::default();
            let mut main = 2;
            for round in 0..4 {
                for k in 0..10u8 {
                    let key = [b'k', k];
                    if round == 3 && k == 0 {
                        continue; // stays deleted: the compaction drops it from the index
                    }
                    if round == 2 && k % 3 == 0 {
                        assert!(idx.tombstone(&key, r(main, 0)));
                    } else {
                        idx.put(&key, r(main, 0));
                    }
                    main += 1;
                }
            }
            idx
        };
        let mut whole = build();
        let expected = whole.compact(31);
        for limit in [1, 3, 10, 11] {
            let mut idx = build();
            let mut available = HashSet::new();
            let mut after = None;
            let mut steps = 0;
            loop {
                steps += 1;
                match idx.compact_some(31, after.as_deref(), limit, &mut available) {
                    Some(last) => after = Some(last),
                    None => break,
                }
            }
            assert_eq!(available, expected, "limit {limit}");
            assert_eq!(idx.keys, whole.keys, "limit {limit}");
            assert_eq!(steps, 10 / limit + 1, "limit {limit}");
            assert!(idx.keys.get(&b"k\0"[..]).is_none());
        }
    }

    #[test]
    fn live_keys_follow_puts_deletions_restores_and_compactions() {
        let mut idx = Index::default();
        idx.put(b"a", r(2, 0));
        idx.put(b"b", r(3, 0));
        idx.put(b"a", r(4, 0));
        assert_eq!(idx.live_keys(), 2);
        assert!(idx.tombstone(b"a", r(5, 0)));
        assert!(!idx.tombstone(b"a", r(6, 0)));
        assert!(!idx.tombstone(b"never", r(6, 0)));
        assert_eq!(idx.live_keys(), 1);
        idx.put(b"a", r(7, 0));
        assert_eq!(idx.live_keys(), 2);
        assert!(idx.tombstone(b"b", r(8, 0)));
        let mut available = HashSet::new();
        let mut after = None;
        while let Some(last) = idx.compact_some(8, after.as_deref(), 1, &mut available) {
            after = Some(last);
        }
        assert_eq!(idx.live_keys(), 1);

        // Rebuilt from disk in revision order: a key whose first surviving revision is a
        // tombstone is not live; one put again after it is.
        let mut restored = Index::default();
        restored.restore(b"x", r(10, 0), true, 0, 0).unwrap();
        assert_eq!(restored.live_keys(), 0);
        restored.restore(b"y", r(11, 0), false, 11, 1).unwrap();
        restored.restore(b"x", r(12, 0), false, 12, 1).unwrap();
        restored.restore(b"y", r(13, 0), true, 0, 0).unwrap();
        restored.restore(b"y", r(14, 0), true, 0, 0).unwrap();
        assert_eq!(restored.live_keys(), 1);
    }

    /// Found by the snapshot_metastore fuzz target: a snapshot whose key bucket held one
    /// revision both as a put and as a tombstone of the same key hit a debug assertion (and
    /// recorded the history out of order without it).
    #[test]
    fn a_restore_out_of_revision_order_is_refused() {
        let mut idx = Index::default();
        idx.restore(b"k", r(5, 0), false, 5, 1).unwrap();
        let err = idx.restore(b"k", r(5, 0), true, 0, 0).unwrap_err();
        assert!(matches!(err, MvccError::Corrupt(_)), "{err:?}");
        assert!(idx.restore(b"k", r(4, 0), false, 4, 1).is_err());
        idx.restore(b"k", r(6, 0), true, 0, 0).unwrap();
        assert_eq!(idx.live_keys(), 0);
        assert!(idx.restore(b"k", r(6, 0), false, 6, 1).is_err());
        idx.restore(b"k", r(7, 0), false, 7, 1).unwrap();
        assert_eq!(idx.live_keys(), 1);
    }

    #[test]
    fn key_ranges() {
        assert!(matches!(
            KeyRange::from_request(b"a", b""),
            KeyRange::Single(b"a")
        ));
        assert!(matches!(
            KeyRange::from_request(b"a", b"\0"),
            KeyRange::Span(b"a", None)
        ));
        assert!(KeyRange::from_request(b"b", b"a").bounds().is_none());
        assert!(KeyRange::from_request(b"a", b"a").bounds().is_none());
        assert!(KeyRange::from_request(b"a", b"c").bounds().is_some());
    }
}
