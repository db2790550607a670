//! [`PackedMap`]: a persistent ordered map of byte strings whose pairs are packed into blocks.
//!
//! Why not a plain `imbl::OrdMap<Bytes, Bytes>`: every pair then costs two heap allocations (the
//! key's and the value's, each rounded up to an allocator size class) plus its share of a tree
//! node, and `imbl` splits a full node in the middle, so the append-only pattern of MVCC revision
//! keys leaves every node half empty. At a million 256-byte values that was about 190 bytes of
//! overhead per pair, on top of the pair itself. Here pairs live back to back in blocks of about
//! [`BLOCK_BYTES`]; an append to the last block that does not fit starts a new block, so
//! appended data fills its blocks completely, and the overhead is 12 bytes per pair plus a
//! block's share of the (small) tree of blocks.
//!
//! Persistence is the tree's and the blocks' (`Arc`): a clone is O(1) and later writes copy
//! only the block they change, and only when a clone still shares it.

use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;
use imbl::OrdMap;

/// Target size of a block's pair data. A block holds more only when one pair alone is larger.
pub(crate) const BLOCK_BYTES: usize = 8 * 1024;
/// Each pair's header in a block: key length and value length, 4 bytes each.
const HEADER: usize = 8;

/// Pairs in key order, stored back to back as `key_len | value_len | key | value`.
struct Block {
    data: Vec<u8>,
    /// Where each pair starts in `data`.
    starts: Vec<u32>,
}

impl Clone for Block {
    /// A copy is exactly as large as its pairs; an append to it grows it to [`BLOCK_BYTES`] in
    /// one step ([`Block::insert_at`]), not by doubling.
    fn clone(&self) -> Self {
        Block {
            data: self.data.clone(),
            starts: self.starts.clone(),
        }
    }
}

/// A whole block's data, kept alive with it: a value read without copying is a slice of one
/// ([`PackedMap::get_shared`]), and the values found in one block by
/// [`PackedMap::get_shared_many`] are slices of the same handle.
struct SharedBlock(Arc<Block>);

impl AsRef<[u8]> for SharedBlock {
    fn as_ref(&self) -> &[u8] {
        &self.0.data
    }
}

fn pair_bytes(key: &[u8], value: &[u8]) -> usize {
    HEADER + key.len() + value.len()
}

impl Block {
    /// A block of one pair. One that takes more than half a block will be alone in it (the
    /// next append does not fit), so it gets exactly its size: a 4 KiB value in an 8 KiB block
    /// wasted half the memory engine's RSS.
    fn with_pair(key: &[u8], value: &[u8]) -> Block {
        let size = pair_bytes(key, value);
        let capacity = if size > BLOCK_BYTES / 2 {
            size
        } else {
            BLOCK_BYTES
        };
        let mut block = Block {
            data: Vec::with_capacity(capacity),
            starts: Vec::new(),
        };
        block.insert_at(0, key, value);
        block
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    fn bounds(&self, i: usize) -> (usize, usize) {
        let start = self.starts[i] as usize;
        let end = self
            .starts
            .get(i + 1)
            .map_or(self.data.len(), |s| *s as usize);
        (start, end)
    }

    fn pair(&self, i: usize) -> (&[u8], &[u8]) {
        let (start, end) = self.bounds(i);
        let d = &self.data[start..end];
        let key_len = u32::from_le_bytes(d[0..4].try_into().expect("4 bytes")) as usize;
        (&d[HEADER..HEADER + key_len], &d[HEADER + key_len..])
    }

    fn key(&self, i: usize) -> &[u8] {
        self.pair(i).0
    }

    /// Where pair `i`'s value is in `data`.
    fn value_bounds(&self, i: usize) -> std::ops::Range<usize> {
        let (start, end) = self.bounds(i);
        start + HEADER + self.key(i).len()..end
    }

    /// `Ok(position)` of `key`, or `Err(position)` where it would go.
    fn find(&self, key: &[u8]) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.key(mid).cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    fn insert_at(&mut self, i: usize, key: &[u8], value: &[u8]) {
        let at = if i == self.len() {
            self.data.len()
        } else {
            self.starts[i] as usize
        };
        let size = pair_bytes(key, value);
        let parts = [
            &(key.len() as u32).to_le_bytes()[..],
            &(value.len() as u32).to_le_bytes()[..],
            key,
            value,
        ];
        if at == self.data.len() {
            // An append (every MVCC revision key): no temporary copy, no tail to move. A block
            // that must grow grows to a whole block at once (or exactly, past one).
            if self.data.capacity() - self.data.len() < size {
                let want = (self.data.len() + size).max(BLOCK_BYTES);
                self.data.reserve_exact(want - self.data.len());
            }
            for part in parts {
                self.data.extend_from_slice(part);
            }
        } else {
            self.data.splice(at..at, parts.concat());
        }
        for s in &mut self.starts[i..] {
            *s += size as u32;
        }
        self.starts.insert(i, at as u32);
    }

    /// Removes pair `i`; returns its value's length.
    fn remove_at(&mut self, i: usize) -> usize {
        let (start, end) = self.bounds(i);
        let value_len = self.pair(i).1.len();
        self.data.drain(start..end);
        self.starts.remove(i);
        for s in &mut self.starts[i..] {
            *s -= (end - start) as u32;
        }
        value_len
    }

    /// Moves pairs `at..` into a new block.
    fn split_off(&mut self, at: usize) -> Block {
        let cut = self.starts[at] as usize;
        let data = self.data.split_off(cut);
        let starts = self.starts.split_off(at);
        let starts = starts.into_iter().map(|s| s - cut as u32).collect();
        self.data.shrink_to_fit();
        self.starts.shrink_to_fit();
        Block { data, starts }
    }
}

/// Puts the pair into `block`, which it belongs to; returns the length of the value replaced
/// and a block split off to the right, if `block` grew too large.
fn put_into(block: &mut Block, key: &[u8], value: &[u8]) -> (Option<usize>, Option<Block>) {
    let (replaced, at) = match block.find(key) {
        Ok(i) => (Some(block.remove_at(i)), i),
        Err(i) => (None, i),
    };
    let appended_past_full = at == block.len()
        && block.len() > 0
        && block.data.len() + pair_bytes(key, value) > BLOCK_BYTES;
    if appended_past_full {
        // Appends fill a block and then start the next one.
        return (replaced, Some(Block::with_pair(key, value)));
    }
    block.insert_at(at, key, value);
    let split = (block.data.len() > BLOCK_BYTES && block.len() > 1)
        .then(|| block.split_off(block.len() / 2));
    (replaced, split)
}

/// A persistent ordered map from byte strings to byte strings (see the module comment).
///
/// Invariant: every key of a block is at least the block's key in `blocks` and below the next
/// block's key; no block is empty.
#[derive(Clone, Default)]
pub(crate) struct PackedMap {
    blocks: OrdMap<Bytes, Arc<Block>>,
}

impl PackedMap {
    pub(crate) fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let (_, block) = self.blocks.get_prev(key)?;
        let i = block.find(key).ok()?;
        Some(block.pair(i).1)
    }

    /// The value under `key`, sharing its block: no copy, and the block lives as long as the
    /// value does (a later write to it copies it first, as for any clone of the map).
    pub(crate) fn get_shared(&self, key: &[u8]) -> Option<Bytes> {
        let (_, block) = self.blocks.get_prev(key)?;
        let i = block.find(key).ok()?;
        Some(Bytes::from_owner(SharedBlock(block.clone())).slice(block.value_bounds(i)))
    }

    /// [`PackedMap::get_shared`] of each of `keys`. Values found in the block of the key before
    /// are found there without a search of the tree, and share one handle on the block: no
    /// allocation per value. Keys in ascending order find most of their neighbours that way.
    pub(crate) fn get_shared_many(&self, keys: &[&[u8]]) -> Vec<Option<Bytes>> {
        let mut last: Option<(&Arc<Block>, Bytes)> = None;
        keys.iter()
            .map(|key| {
                if let Some((block, data)) = &last {
                    // A key is in one block only: found here, it is nowhere else.
                    if let Ok(i) = block.find(key) {
                        return Some(data.slice(block.value_bounds(i)));
                    }
                }
                let (_, block) = self.blocks.get_prev(*key)?;
                let i = block.find(key).ok()?;
                let data = Bytes::from_owner(SharedBlock(block.clone()));
                let value = data.slice(block.value_bounds(i));
                last = Some((block, data));
                Some(value)
            })
            .collect()
    }

    /// Inserts or replaces; returns the length of the value replaced.
    pub(crate) fn insert(&mut self, key: &[u8], value: &[u8]) -> Option<usize> {
        let below_all = self
            .blocks
            .get_min()
            .is_none_or(|(first, _)| key < first.as_ref());
        if below_all {
            // The first block takes it under a lower key (or it starts the first block).
            let first = self.blocks.get_min().map(|(k, _)| k.clone());
            let Some(mut block) = first.and_then(|k| self.blocks.remove(&k)) else {
                self.insert_block(Arc::new(Block::with_pair(key, value)));
                return None;
            };
            let (replaced, split) = put_into(Arc::make_mut(&mut block), key, value);
            self.insert_block(block);
            if let Some(right) = split {
                self.insert_block(Arc::new(right));
            }
            return replaced;
        }
        let (_, slot) = self
            .blocks
            .get_prev_mut(key)
            .expect("a block starts at or below key");
        let (replaced, split) = put_into(Arc::make_mut(slot), key, value);
        if let Some(right) = split {
            self.insert_block(Arc::new(right));
        }
        replaced
    }

    /// Removes `key`; returns the length of its value.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<usize> {
        let (first, slot) = self.blocks.get_prev_mut(key)?;
        let i = slot.find(key).ok()?;
        let first = first.clone();
        let block = Arc::make_mut(slot);
        let value_len = block.remove_at(i);
        if block.len() == 0 {
            self.blocks.remove(&first);
        }
        Some(value_len)
    }

    fn insert_block(&mut self, block: Arc<Block>) {
        let first = Bytes::copy_from_slice(block.key(0));
        self.blocks.insert(first, block);
    }

    /// Calls `visit` with the pairs whose key is in `[lower, upper)` (no upper bound when
    /// `None`), in key order or reversed, until it returns `false`.
    pub(crate) fn visit(
        &self,
        lower: &[u8],
        upper: Option<&[u8]>,
        reverse: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) {
        let below_upper = |k: &[u8]| upper.is_none_or(|u| k < u);
        if !reverse {
            let from = match self.blocks.get_prev(lower) {
                Some((k, _)) => Bound::Included(k.clone()),
                None => Bound::Unbounded,
            };
            for (_, block) in self.blocks.range((from, Bound::Unbounded)) {
                let start = block.find(lower).unwrap_or_else(|i| i);
                for i in start..block.len() {
                    let (k, v) = block.pair(i);
                    if !below_upper(k) || !visit(k, v) {
                        return;
                    }
                }
            }
        } else {
            let to = match upper {
                Some(u) => Bound::Excluded(Bytes::copy_from_slice(u)),
                None => Bound::Unbounded,
            };
            for (_, block) in self.blocks.range((Bound::Unbounded, to)).rev() {
                let end = match upper {
                    Some(u) => block.find(u).unwrap_or_else(|i| i),
                    None => block.len(),
                };
                for i in (0..end).rev() {
                    let (k, v) = block.pair(i);
                    if k < lower || !visit(k, v) {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A small deterministic generator (no dependency needed for a test).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    fn collect(m: &PackedMap, lower: &[u8], upper: Option<&[u8]>, reverse: bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        m.visit(lower, upper, reverse, &mut |k, _| {
            out.push(k.to_vec());
            true
        });
        out
    }

    type Model = BTreeMap<Vec<u8>, Vec<u8>>;

    fn model_range(
        model: &Model,
        lower: &[u8],
        upper: Option<&[u8]>,
        reverse: bool,
    ) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = model
            .keys()
            .filter(|k| k.as_slice() >= lower && upper.is_none_or(|u| k.as_slice() < u))
            .cloned()
            .collect();
        if reverse {
            keys.reverse();
        }
        keys
    }

    #[test]
    fn matches_an_ordered_map_under_random_operations_and_clones_stay_frozen() {
        let mut rng = Lcg(7);
        let mut map = PackedMap::default();
        let mut model = BTreeMap::new();
        let mut frozen: Vec<(PackedMap, Model)> = Vec::new();
        for step in 0..20_000 {
            let key = format!("k{:04}", rng.next() % 3000).into_bytes();
            match rng.next() % 10 {
                0..=5 => {
                    // Values from empty to larger than a block.
                    let len = match rng.next() % 50 {
                        0 => BLOCK_BYTES + 100,
                        n => (n * 37) as usize,
                    };
                    let value = vec![(step % 251) as u8; len];
                    let expected = model.insert(key.clone(), value.clone()).map(|v| v.len());
                    assert_eq!(map.insert(&key, &value), expected);
                }
                _ => {
                    let expected = model.remove(&key).map(|v| v.len());
                    assert_eq!(map.remove(&key), expected);
                }
            }
            if step % 2000 == 0 {
                frozen.push((map.clone(), model.clone()));
            }
        }
        frozen.push((map, model));
        for (map, model) in &frozen {
            for (k, v) in model {
                assert_eq!(map.get(k), Some(v.as_slice()));
            }
            assert_eq!(map.get(b"absent"), None);
            for (lower, upper) in [
                (&b""[..], None),
                (&b"k0100"[..], Some(&b"k0200"[..])),
                (&b"k0150x"[..], Some(&b"k2999z"[..])),
                (&b"k3"[..], None),
                (&b"k05"[..], Some(&b"k05"[..])),
            ] {
                for reverse in [false, true] {
                    assert_eq!(
                        collect(map, lower, upper, reverse),
                        model_range(model, lower, upper, reverse),
                        "{lower:?}..{upper:?} reverse {reverse}"
                    );
                }
            }
        }
    }

    #[test]
    fn appended_pairs_fill_their_blocks() {
        let mut map = PackedMap::default();
        let value = [7u8; 300];
        for i in 0..10_000u64 {
            map.insert(&i.to_be_bytes(), &value);
        }
        let per_block = BLOCK_BYTES / pair_bytes(&[0; 8], &value);
        assert_eq!(map.blocks.len(), 10_000usize.div_ceil(per_block));
        for (_, block) in map.blocks.iter() {
            assert!(
                block.data.capacity() <= BLOCK_BYTES,
                "{}",
                block.data.capacity()
            );
        }
    }

    #[test]
    fn large_pairs_take_their_size_not_a_whole_block() {
        let mut map = PackedMap::default();
        let value = [7u8; 4200];
        for i in 0..1_000u64 {
            map.insert(&i.to_be_bytes(), &value);
        }
        let data: usize = map.blocks.iter().map(|(_, b)| b.data.len()).sum();
        let capacity: usize = map.blocks.iter().map(|(_, b)| b.data.capacity()).sum();
        assert_eq!(data, 1_000 * pair_bytes(&[0; 8], &value));
        assert!(
            capacity <= data + data / 20,
            "{capacity} bytes allocated for {data} bytes of pairs"
        );
        // A copy of a shared block is exact too, and an append grows it to one block.
        let mut copy = map.clone();
        copy.insert(&1_000u64.to_be_bytes(), b"small");
        for (_, block) in copy.blocks.iter() {
            assert!(
                block.data.capacity() <= BLOCK_BYTES,
                "{}",
                block.data.capacity()
            );
        }
    }

    #[test]
    fn a_key_below_every_block_rekeys_the_first_block() {
        let mut map = PackedMap::default();
        map.insert(b"m", b"1");
        map.insert(b"a", b"2");
        assert_eq!(map.get(b"a"), Some(&b"2"[..]));
        assert_eq!(
            collect(&map, b"", None, false),
            vec![b"a".to_vec(), b"m".to_vec()]
        );
        assert_eq!(map.remove(b"a"), Some(1));
        assert_eq!(map.remove(b"m"), Some(1));
        assert_eq!(map.blocks.len(), 0);
        assert_eq!(collect(&map, b"", None, true), Vec::<Vec<u8>>::new());
    }
}
