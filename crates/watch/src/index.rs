//! Which watchers a key concerns, without looking at the others.
//!
//! etcd's `watcherGroup` keeps single-key watchers in a map and range watchers in an interval
//! tree; [`KeyIndex`] does the same. A lookup ([`KeyIndex::stab`]) costs one hash lookup plus
//! O(log n + k) for the ranges (k of them containing the key), so a write is matched against the
//! watchers it concerns, not against all of them.
//!
//! The interval tree is a treap (a binary search tree ordered by range start, heap-ordered by a
//! pseudo-random priority, so its expected depth is O(log n) whatever the insertion order), each
//! node augmented with the largest range end in its subtree so that a stabbing query skips every
//! subtree that ends at or before the key. No crate was taken for it: see the comment in
//! Cargo.toml.

use foldhash::{HashMap, HashMapExt, HashSet};
use std::cmp::Ordering;
use std::hash::Hash;
use std::sync::Arc;

/// The exclusive end of an indexed range; `Unbounded` sorts after every key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Arc<[u8]>),
    Unbounded,
}

impl End {
    /// Whether a range ending here still contains `key` (given that it starts at or before it).
    fn is_after(&self, key: &[u8]) -> bool {
        match self {
            End::Key(end) => key < &end[..],
            End::Unbounded => true,
        }
    }
}

struct Node<T> {
    start: Arc<[u8]>,
    id: T,
    end: End,
    /// The largest `end` in this subtree.
    max_end: End,
    priority: u64,
    left: Tree<T>,
    right: Tree<T>,
}

type Tree<T> = Option<Box<Node<T>>>;

impl<T: Ord> Node<T> {
    fn order(&self, start: &[u8], id: &T) -> Ordering {
        (&self.start[..], &self.id).cmp(&(start, id))
    }

    fn update(&mut self) {
        let mut max = &self.end;
        for child in [&self.left, &self.right].into_iter().flatten() {
            if child.max_end > *max {
                max = &child.max_end;
            }
        }
        if *max != self.max_end {
            self.max_end = max.clone();
        }
    }
}

/// Splits `tree` into the nodes ordered before `(start, id)` and the others.
fn split<T: Ord>(tree: Tree<T>, start: &[u8], id: &T) -> (Tree<T>, Tree<T>) {
    let Some(mut node) = tree else {
        return (None, None);
    };
    if node.order(start, id) == Ordering::Less {
        let (l, r) = split(node.right.take(), start, id);
        node.right = l;
        node.update();
        (Some(node), r)
    } else {
        let (l, r) = split(node.left.take(), start, id);
        node.left = r;
        node.update();
        (l, Some(node))
    }
}

/// Joins two treaps, every node of `a` ordered before every node of `b`.
fn merge<T: Ord>(a: Tree<T>, b: Tree<T>) -> Tree<T> {
    match (a, b) {
        (None, t) | (t, None) => t,
        (Some(mut a), Some(mut b)) => {
            if a.priority >= b.priority {
                a.right = merge(a.right.take(), Some(b));
                a.update();
                Some(a)
            } else {
                b.left = merge(Some(a), b.left.take());
                b.update();
                Some(b)
            }
        }
    }
}

fn insert<T: Ord>(tree: Tree<T>, mut new: Box<Node<T>>) -> Tree<T> {
    match tree {
        None => Some(new),
        Some(node) if new.priority > node.priority => {
            let (l, r) = split(Some(node), &new.start, &new.id);
            new.left = l;
            new.right = r;
            new.update();
            Some(new)
        }
        Some(mut node) => {
            if node.order(&new.start, &new.id) == Ordering::Greater {
                node.left = insert(node.left.take(), new);
            } else {
                node.right = insert(node.right.take(), new);
            }
            node.update();
            Some(node)
        }
    }
}

/// Removes the node `(start, id)`; returns the new tree and whether it was there.
fn remove<T: Ord>(tree: Tree<T>, start: &[u8], id: &T) -> (Tree<T>, bool) {
    let Some(mut node) = tree else {
        return (None, false);
    };
    let found = match node.order(start, id) {
        Ordering::Equal => return (merge(node.left.take(), node.right.take()), true),
        Ordering::Greater => {
            let (l, found) = remove(node.left.take(), start, id);
            node.left = l;
            found
        }
        Ordering::Less => {
            let (r, found) = remove(node.right.take(), start, id);
            node.right = r;
            found
        }
    };
    node.update();
    (Some(node), found)
}

/// Calls `f` for every range of `tree` containing `key`; returns the nodes visited.
fn stab<T: Copy>(tree: &Tree<T>, key: &[u8], f: &mut impl FnMut(T)) -> usize {
    let Some(node) = tree else { return 0 };
    if !node.max_end.is_after(key) {
        // Every range below ends at or before the key.
        return 1;
    }
    let mut visited = 1 + stab(&node.left, key, f);
    if &node.start[..] <= key {
        if node.end.is_after(key) {
            f(node.id);
        }
        // Right of a node that starts after the key, everything does.
        visited += stab(&node.right, key, f);
    }
    visited
}

/// An interval tree of half-open byte-string ranges `[start, end)` (`end` possibly unbounded),
/// each with a distinct id: dynamic insert and remove in O(log n) expected, and stabbing
/// queries.
pub(crate) struct IntervalTree<T> {
    root: Tree<T>,
    len: usize,
    /// splitmix64 state for node priorities.
    seed: u64,
}

impl<T: Copy + Ord> IntervalTree<T> {
    pub(crate) fn new() -> Self {
        IntervalTree {
            root: None,
            len: 0,
            seed: 0x853c_49e6_748f_ea9b,
        }
    }

    fn next_priority(&mut self) -> u64 {
        self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Adds `[start, end)` (`end` `None`: unbounded) under `id`, which must not be in the tree
    /// with the same start.
    pub(crate) fn insert(&mut self, id: T, start: &[u8], end: Option<&[u8]>) {
        let end = end.map_or(End::Unbounded, |e| End::Key(e.into()));
        let node = Box::new(Node {
            start: start.into(),
            id,
            max_end: end.clone(),
            end,
            priority: self.next_priority(),
            left: None,
            right: None,
        });
        self.root = insert(self.root.take(), node);
        self.len += 1;
    }

    /// Removes the range that `id` was inserted with at `start`.
    pub(crate) fn remove(&mut self, id: T, start: &[u8]) -> bool {
        let (root, found) = remove(self.root.take(), start, &id);
        self.root = root;
        if found {
            self.len -= 1;
        }
        found
    }

    /// Calls `f` with the id of every range containing `key`; returns how many tree nodes were
    /// looked at (O(log n + k) expected).
    pub(crate) fn stab(&self, key: &[u8], mut f: impl FnMut(T)) -> usize {
        stab(&self.root, key, &mut f)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl<T> Drop for IntervalTree<T> {
    /// Iterative, so that dropping a (however unlikely) deep tree cannot overflow the stack.
    fn drop(&mut self) {
        let mut stack: Vec<Box<Node<T>>> = self.root.take().into_iter().collect();
        while let Some(mut node) = stack.pop() {
            stack.extend(node.left.take());
            stack.extend(node.right.take());
        }
    }
}

/// Watchers indexed by what they watch: single keys in a map, ranges in an [`IntervalTree`].
pub(crate) struct KeyIndex<T> {
    single: HashMap<Arc<[u8]>, HashSet<T>>,
    ranges: IntervalTree<T>,
}

impl<T: Copy + Ord + Hash> KeyIndex<T> {
    pub(crate) fn new() -> Self {
        KeyIndex {
            single: HashMap::new(),
            ranges: IntervalTree::new(),
        }
    }

    /// Indexes `id` as watching `key` alone (`range_end` `None`), `[key, end)`
    /// (`Some(end)`), or every key from `key` on (`Some(empty)`).
    pub(crate) fn insert(&mut self, id: T, key: &[u8], range_end: Option<&[u8]>) {
        match range_end {
            None => {
                self.single.entry(key.into()).or_default().insert(id);
            }
            Some(end) => {
                let end = (!end.is_empty()).then_some(end);
                self.ranges.insert(id, key, end);
            }
        }
    }

    /// Forgets `id`, given what it was inserted with.
    pub(crate) fn remove(&mut self, id: T, key: &[u8], range_end: Option<&[u8]>) -> bool {
        match range_end {
            None => {
                let Some(ids) = self.single.get_mut(key) else {
                    return false;
                };
                let found = ids.remove(&id);
                if ids.is_empty() {
                    self.single.remove(key);
                }
                found
            }
            Some(_) => self.ranges.remove(id, key),
        }
    }

    /// Calls `f` with every id watching `key`; returns how many entries were looked at (the
    /// single-key bucket counts as one).
    pub(crate) fn stab(&self, key: &[u8], mut f: impl FnMut(T)) -> usize {
        if let Some(ids) = self.single.get(key) {
            ids.iter().copied().for_each(&mut f);
        }
        1 + self.ranges.stab(key, f)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.single.values().map(HashSet::len).sum::<usize>() + self.ranges.len()
    }

    pub(crate) fn clear(&mut self) {
        *self = KeyIndex::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so that failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        /// Keys over a small alphabet, so that ranges overlap and share starts.
        fn key(&mut self) -> Vec<u8> {
            let len = 1 + self.below(3) as usize;
            (0..len).map(|_| b'a' + self.below(4) as u8).collect()
        }
    }

    /// Checks the treap's order, heap and `max_end` invariants; returns (size, depth).
    fn check<T: Ord + Copy + std::fmt::Debug>(tree: &Tree<T>) -> (usize, usize) {
        let Some(node) = tree else { return (0, 0) };
        let mut max = node.end.clone();
        let (mut size, mut depth) = (1, 0);
        for (child, before) in [(&node.left, true), (&node.right, false)] {
            if let Some(c) = child {
                assert!(c.priority <= node.priority, "heap order");
                let ord = (&c.start[..], &c.id).cmp(&(&node.start[..], &node.id));
                assert_eq!(
                    ord,
                    if before {
                        Ordering::Less
                    } else {
                        Ordering::Greater
                    }
                );
                max = max.max(c.max_end.clone());
            }
            let (s, d) = check(child);
            size += s;
            depth = depth.max(d);
        }
        assert_eq!(node.max_end, max, "max_end of {:?}", node.id);
        (size, depth + 1)
    }

    fn stabbed(index: &KeyIndex<u32>, key: &[u8]) -> Vec<u32> {
        let mut ids = Vec::new();
        index.stab(key, |id| ids.push(id));
        ids.sort_unstable();
        ids
    }

    #[test]
    fn matches_a_brute_force_model_through_inserts_and_removes() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut index = KeyIndex::new();
        // id -> (key, range_end) as the hub would pass them.
        let mut model: HashMap<u32, (Vec<u8>, Option<Vec<u8>>)> = HashMap::new();
        for step in 0..4000u32 {
            if model.is_empty() || rng.below(3) > 0 {
                let key = rng.key();
                let range_end = match rng.below(4) {
                    0 => None,
                    1 => Some(Vec::new()),
                    _ => {
                        let mut end = rng.key();
                        if end <= key {
                            end = key.clone();
                            end.push(b'b');
                        }
                        Some(end)
                    }
                };
                index.insert(step, &key, range_end.as_deref());
                model.insert(step, (key, range_end));
            } else {
                let ids: Vec<u32> = model.keys().copied().collect();
                let id = ids[rng.below(ids.len() as u64) as usize];
                let (key, range_end) = model.remove(&id).unwrap();
                assert!(index.remove(id, &key, range_end.as_deref()));
                assert!(
                    !index.remove(id, &key, range_end.as_deref()),
                    "removed twice"
                );
            }
            assert_eq!(index.len(), model.len());
            if step % 97 == 0 {
                check(&index.ranges.root);
            }
            let probe = rng.key();
            let mut expected: Vec<u32> = model
                .iter()
                .filter(|(_, (key, end))| match end {
                    None => probe == *key,
                    Some(end) => {
                        probe >= *key && (end.is_empty() || probe.as_slice() < end.as_slice())
                    }
                })
                .map(|(id, _)| *id)
                .collect();
            expected.sort_unstable();
            assert_eq!(
                stabbed(&index, &probe),
                expected,
                "step {step} key {probe:?}"
            );
        }
    }

    #[test]
    fn sorted_inserts_stay_shallow_and_disjoint_prefixes_are_stabbed_in_logarithmic_visits() {
        // Kubernetes-style prefix watchers on distinct prefixes, inserted in key order (the worst
        // case for an unbalanced tree).
        let n = 10_000u32;
        let mut tree = IntervalTree::new();
        let prefix = |i: u32| format!("/registry/pods/ns{i:05}/").into_bytes();
        let prefix_end = |i: u32| format!("/registry/pods/ns{i:05}0").into_bytes();
        for i in 0..n {
            tree.insert(i, &prefix(i), Some(&prefix_end(i)));
        }
        let (size, depth) = check(&tree.root);
        assert_eq!(size, n as usize);
        // A treap's expected depth is about 2 ln n (18 here); 60 leaves a wide margin while still
        // failing for anything list-like.
        assert!(depth < 60, "depth {depth}");
        for i in [0, 1, 4999, 9998, 9999] {
            let mut key = prefix(i);
            key.extend_from_slice(b"pod-a");
            let mut hits = Vec::new();
            let visited = tree.stab(&key, |id| hits.push(id));
            assert_eq!(hits, vec![i]);
            assert!(
                visited <= 3 * depth,
                "visited {visited} of {n} (depth {depth})"
            );
        }
        for i in (0..n).step_by(2) {
            assert!(tree.remove(i, &prefix(i)));
        }
        assert!(!tree.remove(0, &prefix(0)));
        check(&tree.root);
        let mut hits = Vec::new();
        tree.stab(&prefix(4), |id| hits.push(id));
        assert!(hits.is_empty());
        tree.stab(&prefix(5), |id| hits.push(id));
        assert_eq!(hits, vec![5]);
    }

    #[test]
    fn unbounded_and_single_key_entries() {
        let mut index = KeyIndex::new();
        index.insert(1, b"b", Some(b"")); // every key from "b" on
        index.insert(2, b"b", None); // "b" alone
        index.insert(3, b"a", Some(b"b")); // [a, b)
        index.insert(4, b"b", None);
        assert_eq!(stabbed(&index, b"a"), vec![3]);
        assert_eq!(stabbed(&index, b"azzz"), vec![3]);
        assert_eq!(stabbed(&index, b"b"), vec![1, 2, 4]);
        assert_eq!(stabbed(&index, b"\xff\xff"), vec![1]);
        assert!(index.remove(2, b"b", None));
        assert!(!index.remove(2, b"b", None));
        assert!(!index.remove(1, b"c", Some(b"")), "wrong start");
        assert_eq!(stabbed(&index, b"b"), vec![1, 4]);
        index.clear();
        assert_eq!(index.len(), 0);
        assert!(stabbed(&index, b"b").is_empty());
    }
}
