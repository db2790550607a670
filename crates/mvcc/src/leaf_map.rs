//! [`LeafMap`]: the key index's ordered map, byte-string keys to `V`, with the pairs in sorted
//! leaves of up to [`LEAF`] entries under a `BTreeMap` of the leaves.
//!
//! Why not a plain `BTreeMap<IndexKey, V>`: std's B-tree splits a full node in the middle, so
//! keys written in ascending order (sequential names, Kubernetes' keys under one prefix, a
//! restore reading keys in order) leave every node about 60% full. At a million 16-byte keys the
//! heap profile showed 89 bytes per key in the index for 48 bytes of entry
//! (`bench/results/2026-12-06-memory-profile.md`). Here an insertion past the end of a full leaf
//! starts a new leaf, so ascending writes fill their leaves completely; an insertion into the
//! upper half of a full leaf splits it there (so ascending runs inside a leaf fill it too), one
//! into the lower half splits it in the middle, as a B-tree does. The `BTreeMap` above holds one entry
//! per leaf: a sixty-fourth of the keys.
//!
//! Each leaf is filed under a separator: a key not after its first entry and after every entry
//! of the leaf before it. A key belongs to the leaf with the greatest separator not after it (or
//! to the first leaf when it is before every separator, which then takes it as its separator).
//! Removing a leaf's first entry leaves the separator as it is; an emptied leaf is dropped.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::key_index::IndexKey;

/// Most entries in a leaf: 64 entries of 48 bytes (the key index's) are a 3 KiB allocation, and
/// an insertion in the middle moves at most that much.
pub(crate) const LEAF: usize = 64;

type Leaf<V> = Vec<(IndexKey, V)>;

/// An ordered map from byte strings to `V`, packed in leaves (see the module's documentation).
#[derive(Debug, Clone)]
pub(crate) struct LeafMap<V> {
    leaves: BTreeMap<IndexKey, Leaf<V>>,
    len: usize,
}

impl<V> Default for LeafMap<V> {
    fn default() -> Self {
        LeafMap {
            leaves: BTreeMap::new(),
            len: 0,
        }
    }
}

/// Equal entries, however they are laid out in leaves.
impl<V: PartialEq> PartialEq for LeafMap<V> {
    fn eq(&self, other: &Self) -> bool {
        let all = (Bound::Unbounded, Bound::Unbounded);
        self.len == other.len && self.range(all).eq(other.range(all))
    }
}

/// Position of `key` in a leaf: `Ok` where it is, `Err` where it would go.
fn search<V>(leaf: &Leaf<V>, key: &[u8]) -> Result<usize, usize> {
    leaf.binary_search_by(|(k, _)| k.as_slice().cmp(key))
}

/// Inserts into a leaf that is not full, its room doubling but never past [`LEAF`]: a leaf
/// split off with 40 entries would otherwise grow to room for 80 and never use the last 16
/// (12 MB at a million keys).
fn insert_into<V>(leaf: &mut Leaf<V>, i: usize, entry: (IndexKey, V)) {
    debug_assert!(leaf.len() < LEAF);
    if leaf.len() == leaf.capacity() {
        leaf.reserve_exact(leaf.len().clamp(1, LEAF - leaf.len()));
    }
    leaf.insert(i, entry);
}

/// Where entries at or after `lower` start in a leaf.
fn start_in<V>(leaf: &Leaf<V>, lower: Bound<&[u8]>) -> usize {
    match lower {
        Bound::Unbounded => 0,
        Bound::Included(k) => leaf.partition_point(|(key, _)| key.as_slice() < k),
        Bound::Excluded(k) => leaf.partition_point(|(key, _)| key.as_slice() <= k),
    }
}

fn below(key: &[u8], upper: Bound<&[u8]>) -> bool {
    match upper {
        Bound::Unbounded => true,
        Bound::Included(u) => key <= u,
        Bound::Excluded(u) => key < u,
    }
}

impl<V> LeafMap<V> {
    /// Number of entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The separator of the leaf `key` belongs to, if any leaf's separator is not after it.
    fn leaf_of(&self, key: &[u8]) -> Option<(&IndexKey, &Leaf<V>)> {
        self.leaves
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
    }

    /// The separator of the leaf entries at or after `lower` start in (`None`: the first leaf).
    fn start_separator(&self, lower: Bound<&[u8]>) -> Option<&IndexKey> {
        match lower {
            Bound::Unbounded => None,
            Bound::Included(k) | Bound::Excluded(k) => self.leaf_of(k).map(|(s, _)| s),
        }
    }

    pub(crate) fn get_key_value(&self, key: &[u8]) -> Option<(&IndexKey, &V)> {
        let (_, leaf) = self.leaf_of(key)?;
        let i = search(leaf, key).ok()?;
        let (k, v) = &leaf[i];
        Some((k, v))
    }

    #[cfg(test)]
    pub(crate) fn get(&self, key: &[u8]) -> Option<&V> {
        self.get_key_value(key).map(|(_, v)| v)
    }

    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let (_, leaf) = self
            .leaves
            .range_mut::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()?;
        let i = search(leaf, key).ok()?;
        Some(&mut leaf[i].1)
    }

    /// Inserts `value` under `key`; returns the value it replaced.
    pub(crate) fn insert(&mut self, key: IndexKey, value: V) -> Option<V> {
        let Some((_, leaf)) = self
            .leaves
            .range_mut::<[u8], _>((Bound::Unbounded, Bound::Included(key.as_slice())))
            .next_back()
        else {
            return self.insert_first(key, value);
        };
        let i = match search(leaf, &key) {
            Ok(i) => return Some(std::mem::replace(&mut leaf[i].1, value)),
            Err(i) => i,
        };
        self.len += 1;
        if leaf.len() < LEAF {
            insert_into(leaf, i, (key, value));
            return None;
        }
        if i == leaf.len() {
            // Past the end of a full leaf: a new leaf, and this one stays full.
            self.leaves.insert(key.clone(), vec![(key, value)]);
            return None;
        }
        // In the upper half: split where the key goes, the key ending the left leaf. Keys
        // ascending under several prefixes at once append this way at the end of their own
        // run inside a leaf; a split in the middle would leave that run's leaves half full.
        // In the lower half: in the middle, as a B-tree, so that no leaf is left nearly empty.
        let at = i.max(LEAF / 2);
        let right = leaf.split_off(at);
        if i < at {
            leaf.insert(i, (key, value));
        } else {
            leaf.push((key, value));
        }
        self.leaves.insert(right[0].0.clone(), right);
        None
    }

    /// Inserts a key before every separator (or into an empty map).
    fn insert_first(&mut self, key: IndexKey, value: V) -> Option<V> {
        self.len += 1;
        match self.leaves.first_entry() {
            Some(first) if first.get().len() < LEAF => {
                let mut leaf = first.remove();
                insert_into(&mut leaf, 0, (key.clone(), value));
                self.leaves.insert(key, leaf);
            }
            // A full first leaf (or none): a new leaf before it, which descending insertions
            // fill as ascending ones fill a leaf at the end.
            _ => {
                self.leaves.insert(key.clone(), vec![(key, value)]);
            }
        }
        None
    }

    /// Removes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<V> {
        let (separator, leaf) = self
            .leaves
            .range_mut::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()?;
        let i = search(leaf, key).ok()?;
        let (_, value) = leaf.remove(i);
        self.len -= 1;
        if leaf.is_empty() {
            let separator = separator.clone();
            self.leaves.remove(separator.as_slice());
        } else if leaf.len() * 4 < leaf.capacity() && leaf.capacity() > 8 {
            // Compaction empties leaves: give most of the room back.
            leaf.shrink_to(leaf.len() * 2);
        }
        Some(value)
    }

    /// Entries from `lower` to `upper`, in key order.
    pub(crate) fn range<'a>(
        &'a self,
        (lower, upper): (Bound<&'a [u8]>, Bound<&'a [u8]>),
    ) -> impl Iterator<Item = (&'a IndexKey, &'a V)> + 'a {
        let leaves = match self.start_separator(lower) {
            Some(s) => self
                .leaves
                .range::<[u8], _>((Bound::Included(s.as_slice()), Bound::Unbounded)),
            None => self.leaves.range::<[u8], _>(..),
        };
        leaves
            .flat_map(move |(_, leaf)| leaf[start_in(leaf, lower)..].iter())
            .take_while(move |(k, _)| below(k, upper))
            .map(|(k, v)| (k, v))
    }

    /// Entries after `lower`, in key order, their values writable.
    pub(crate) fn iter_mut_from<'a>(
        &'a mut self,
        lower: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a IndexKey, &'a mut V)> + 'a {
        let first = self.start_separator(lower).cloned();
        let leaves = match first {
            Some(s) => self
                .leaves
                .range_mut::<[u8], _>((Bound::Included(s.as_slice()), Bound::Unbounded)),
            None => self.leaves.range_mut::<[u8], _>(..),
        };
        leaves.flat_map(move |(_, leaf)| {
            let from = start_in(leaf, lower);
            leaf[from..].iter_mut().map(|(k, v)| (&*k, v))
        })
    }

    /// Every value, in key order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.leaves
            .values()
            .flat_map(|leaf| leaf.iter().map(|(_, v)| v))
    }

    /// Keeps the entries `keep` says yes to.
    #[cfg(test)]
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&IndexKey, &mut V) -> bool) {
        for leaf in self.leaves.values_mut() {
            leaf.retain_mut(|(k, v)| keep(k, v));
        }
        self.leaves.retain(|_, leaf| !leaf.is_empty());
        self.len = self.leaves.values().map(Vec::len).sum();
    }

    /// Bytes of entries reserved over bytes of entries held: how full the leaves are.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.leaves.values().map(Vec::capacity).sum()
    }

    /// Checks the invariants (tests).
    #[cfg(test)]
    fn check(&self) {
        let mut previous: Option<&IndexKey> = None;
        let mut count = 0;
        for (separator, leaf) in &self.leaves {
            assert!(!leaf.is_empty(), "an empty leaf under {separator:?}");
            assert!(leaf.len() <= LEAF);
            assert!(
                leaf.capacity() <= LEAF,
                "room for {} entries",
                leaf.capacity()
            );
            assert!(
                separator <= &leaf[0].0,
                "separator after the leaf's first key"
            );
            if let Some(p) = previous {
                assert!(
                    p < separator,
                    "a leaf's keys reach its successor's separator"
                );
            }
            for pair in leaf.windows(2) {
                assert!(pair[0].0 < pair[1].0, "a leaf out of order");
            }
            previous = leaf.last().map(|(k, _)| k);
            count += leaf.len();
        }
        assert_eq!(count, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> IndexKey {
        IndexKey::from_slice(format!("{n:08}").as_bytes())
    }

    /// A small deterministic generator (xorshift), so failures replay.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn bound(b: Bound<&IndexKey>) -> Bound<&[u8]> {
        match b {
            Bound::Included(k) => Bound::Included(k.as_slice()),
            Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
            Bound::Unbounded => Bound::Unbounded,
        }
    }

    /// Random inserts, replacements, removals, lookups and ranges against std's `BTreeMap`.
    #[test]
    fn behaves_as_a_btreemap() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut map = LeafMap::default();
            let mut model = BTreeMap::new();
            // Small key spaces collide often; large ones grow many leaves.
            let space = [50, 500, 5000][seed as usize % 3];
            for step in 0..4000u64 {
                let k = key(rng.next() % space);
                match rng.next() % 10 {
                    0..=4 => assert_eq!(map.insert(k.clone(), step), model.insert(k.clone(), step)),
                    5..=6 => assert_eq!(map.remove(&k), model.remove(&k)),
                    7 => {
                        if let Some(v) = map.get_mut(&k) {
                            *v += 1;
                        }
                        if let Some(v) = model.get_mut(&k) {
                            *v += 1;
                        }
                    }
                    _ => {
                        let other = key(rng.next() % space);
                        let (lo, hi) = if k <= other {
                            (k.clone(), other)
                        } else {
                            (other, k.clone())
                        };
                        let bounds = match rng.next() % 5 {
                            0 => (Bound::Included(&lo), Bound::Excluded(&hi)),
                            1 => (Bound::Excluded(&lo), Bound::Included(&hi)),
                            2 => (Bound::Included(&lo), Bound::Unbounded),
                            3 => (Bound::Unbounded, Bound::Excluded(&hi)),
                            _ => (Bound::Included(&lo), Bound::Included(&hi)),
                        };
                        if matches!(bounds, (Bound::Excluded(a), Bound::Included(b)) if a == b) {
                            continue; // BTreeMap panics on this empty range
                        }
                        let ours: Vec<_> = map.range((bound(bounds.0), bound(bounds.1))).collect();
                        let theirs: Vec<_> = model.range::<IndexKey, _>(bounds).collect();
                        assert_eq!(ours, theirs, "seed {seed} step {step}");
                        let mutable: Vec<_> = map
                            .iter_mut_from(bound(bounds.0))
                            .map(|(k, v)| (k.clone(), *v))
                            .collect();
                        let expected: Vec<_> = model
                            .range::<IndexKey, _>((bounds.0, Bound::Unbounded))
                            .map(|(k, v)| (k.clone(), *v))
                            .collect();
                        assert_eq!(mutable, expected, "seed {seed} step {step}");
                    }
                }
                assert_eq!(map.get(&k), model.get(&k));
                assert_eq!(map.len(), model.len());
            }
            map.check();
            assert!(map.values().eq(model.values()));
            map.retain(|_, v| *v % 3 != 0);
            model.retain(|_, v| *v % 3 != 0);
            map.check();
            assert!(map
                .range((Bound::Unbounded, Bound::Unbounded))
                .eq(model.iter()));
        }
    }

    /// Ascending and descending writes fill their leaves; std's B-tree leaves them ~60% full.
    #[test]
    fn ordered_writes_fill_the_leaves() {
        for descending in [false, true] {
            let mut map = LeafMap::default();
            for n in 0..10_000u64 {
                let n = if descending { 10_000 - n } else { n };
                map.insert(key(n), n);
            }
            map.check();
            assert_eq!(map.len(), 10_000);
            assert!(
                map.leaves.len() <= 10_000 / LEAF + 2,
                "{} leaves (descending: {descending})",
                map.leaves.len()
            );
            assert!(map.capacity() <= 10_000 + 2 * LEAF, "{}", map.capacity());
        }
    }

    /// Keys written in ascending order under several prefixes at once (Kubernetes' resources)
    /// fill their leaves too: each prefix appends past the end of its own leaf.
    #[test]
    fn interleaved_ascending_prefixes_fill_the_leaves() {
        let mut map = LeafMap::default();
        for n in 0..5_000u64 {
            for prefix in ["/registry/events/", "/registry/pods/", "/registry/leases/"] {
                map.insert(
                    IndexKey::from_slice(format!("{prefix}{n:08}").as_bytes()),
                    n,
                );
            }
        }
        map.check();
        assert!(
            map.leaves.len() <= 15_000 / LEAF * 11 / 10 + 6,
            "{}",
            map.leaves.len()
        );
        assert!(
            map.capacity() <= 15_000 * 11 / 10 + 6 * LEAF,
            "{}",
            map.capacity()
        );
    }

    /// Removing most entries frees their room.
    #[test]
    fn removals_give_room_back() {
        let mut map = LeafMap::default();
        for n in 0..10_000u64 {
            map.insert(key(n), n);
        }
        for n in 0..10_000u64 {
            if n % 16 != 0 {
                assert_eq!(map.remove(&key(n)), Some(n));
            }
        }
        map.check();
        assert_eq!(map.len(), 625);
        assert!(map.capacity() <= 4 * 625, "{}", map.capacity());
        for n in (0..10_000u64).step_by(16) {
            assert_eq!(map.get(&key(n)), Some(&n));
        }
    }
}
