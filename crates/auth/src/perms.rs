//! Key permissions as intervals, and the question "does the union of a user's permissions cover
//! this key or range?" (etcd's merged interval tree in `auth/range_perm_cache.go`).
//!
//! A permission or request `(key, range_end)` means: `range_end` empty, the single key; `range_end`
//! = `"\0"`, every key from `key` on; otherwise the half-open range `[key, range_end)`.

/// A half-open interval of keys; `end == None` is unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    /// The interval etcd means by `(key, range_end)`.
    pub(crate) fn of(key: &[u8], range_end: &[u8]) -> Interval {
        if range_end.is_empty() {
            // The single key: [key, key + "\0").
            let mut end = key.to_vec();
            end.push(0);
            Interval {
                start: key.to_vec(),
                end: Some(end),
            }
        } else if range_end == [0] {
            Interval {
                start: key.to_vec(),
                end: None,
            }
        } else {
            Interval {
                start: key.to_vec(),
                end: Some(range_end.to_vec()),
            }
        }
    }

    fn is_empty(&self) -> bool {
        matches!(&self.end, Some(end) if end.as_slice() <= self.start.as_slice())
    }
}

/// Whether `wanted` lies inside the union of `granted`.
pub(crate) fn covered(wanted: &Interval, granted: &[Interval]) -> bool {
    if wanted.is_empty() {
        // An empty range reads or writes nothing; etcd still asks for its start key.
        return covered(&Interval::of(&wanted.start, &[]), granted);
    }
    // Sweep from the start: repeatedly jump to the furthest end of a granted interval that
    // contains the current point, until the wanted end is passed.
    let mut at = wanted.start.clone();
    loop {
        let mut furthest: Option<Option<&Vec<u8>>> = None;
        for g in granted {
            let contains = g.start.as_slice() <= at.as_slice()
                && g.end
                    .as_ref()
                    .is_none_or(|end| at.as_slice() < end.as_slice());
            if !contains {
                continue;
            }
            furthest = Some(match (furthest, g.end.as_ref()) {
                (None, end) => end,
                (Some(None), _) | (_, None) => None,
                (Some(Some(a)), Some(b)) => Some(if b > a { b } else { a }),
            });
        }
        match furthest {
            None => return false,
            Some(None) => return true,
            Some(Some(end)) => {
                match &wanted.end {
                    Some(w) if end.as_slice() >= w.as_slice() => return true,
                    _ => {}
                }
                at = end.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(k: &str, e: &str) -> Interval {
        Interval::of(k.as_bytes(), e.as_bytes())
    }

    #[test]
    fn single_keys_and_ranges() {
        let granted = vec![iv("/a/", "/a0"), iv("k", "")];
        assert!(covered(&iv("/a/x", ""), &granted));
        assert!(covered(&iv("/a/", "/a0"), &granted));
        assert!(covered(&iv("/a/b", "/a/c"), &granted));
        assert!(!covered(&iv("/a/", "/b"), &granted));
        assert!(!covered(&iv("/a", ""), &granted));
        assert!(covered(&iv("k", ""), &granted));
        assert!(!covered(&iv("k", "l"), &granted));
        assert!(!covered(&iv("k0", ""), &granted));
    }

    #[test]
    fn adjacent_intervals_merge_and_from_key_is_unbounded() {
        let granted = vec![iv("a", "c"), iv("c", "e"), iv("x", "\0")];
        assert!(covered(&iv("a", "e"), &granted));
        assert!(!covered(&iv("a", "f"), &granted));
        assert!(covered(&iv("y", "\0"), &granted));
        assert!(covered(&iv("x", "zzz"), &granted));
        assert!(!covered(&iv("w", "\0"), &granted));
        // Every key: only an unbounded grant from the empty key covers it.
        assert!(!covered(&iv("\0", "\0"), &granted));
        assert!(covered(&iv("\0", "\0"), &[iv("", "\0")]));
    }
}
