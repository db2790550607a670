//! Revisions and their on-disk encoding (etcd's `revision.go`).

/// Length of an encoded revision: 8-byte main, `_`, 8-byte sub.
pub const REVISION_BYTES_LEN: usize = 17;
/// Length of an encoded tombstone revision: a revision plus the `t` mark.
const MARKED_REVISION_BYTES_LEN: usize = REVISION_BYTES_LEN + 1;
/// The byte etcd appends to a revision key that records a deletion.
const TOMBSTONE_MARK: u8 = b't';

/// A point in the store's history: `main` is bumped once per write request, `sub` numbers the
/// changes inside it (a txn's first change is sub 0, the next sub 1, …).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    /// The main revision: the store revision a write produced.
    pub main: i64,
    /// The change's position inside its main revision.
    pub sub: i64,
}

impl Revision {
    /// A revision from its two parts.
    pub const fn new(main: i64, sub: i64) -> Self {
        Revision { main, sub }
    }

    /// The key under which etcd stores this revision in the `key` bucket: 8-byte big-endian main,
    /// `_`, 8-byte big-endian sub, plus a trailing `t` when the change is a deletion.
    pub fn to_key(self, tombstone: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(MARKED_REVISION_BYTES_LEN);
        self.write_key(tombstone, &mut out);
        out
    }

    /// [`Revision::to_key`], appended to `out`: many keys in one buffer, no allocation each.
    pub(crate) fn write_key(self, tombstone: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.main as u64).to_be_bytes());
        out.push(b'_');
        out.extend_from_slice(&(self.sub as u64).to_be_bytes());
        if tombstone {
            out.push(TOMBSTONE_MARK);
        }
    }

    /// Parse a `key` bucket key into its revision and whether it marks a deletion. `None` when the
    /// bytes are not a revision key.
    pub fn from_key(key: &[u8]) -> Option<(Revision, bool)> {
        let tombstone = match key.len() {
            REVISION_BYTES_LEN => false,
            MARKED_REVISION_BYTES_LEN if key[REVISION_BYTES_LEN] == TOMBSTONE_MARK => true,
            _ => return None,
        };
        if key[8] != b'_' {
            return None;
        }
        let main = u64::from_be_bytes(key[0..8].try_into().ok()?) as i64;
        let sub = u64::from_be_bytes(key[9..17].try_into().ok()?) as i64;
        Some((Revision { main, sub }, tombstone))
    }
}

/// The 8-byte big-endian prefix that sorts before every revision key of `main` and after every
/// revision key of smaller main revisions.
pub(crate) fn main_prefix(main: i64) -> [u8; 8] {
    (main as u64).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_etcd() {
        let key = Revision::new(5, 2).to_key(false);
        assert_eq!(key, [0, 0, 0, 0, 0, 0, 0, 5, b'_', 0, 0, 0, 0, 0, 0, 0, 2]);
        let tomb = Revision::new(0x0102, 0).to_key(true);
        assert_eq!(tomb.len(), 18);
        assert_eq!(&tomb[..8], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(tomb[17], b't');
    }

    #[test]
    fn round_trips_and_rejects_garbage() {
        let r = Revision::new(123_456, 7);
        assert_eq!(Revision::from_key(&r.to_key(false)), Some((r, false)));
        assert_eq!(Revision::from_key(&r.to_key(true)), Some((r, true)));
        assert_eq!(Revision::from_key(b"short"), None);
        let mut bad = r.to_key(false);
        bad[8] = b'-';
        assert_eq!(Revision::from_key(&bad), None);
        let mut bad_mark = r.to_key(true);
        bad_mark[17] = b'x';
        assert_eq!(Revision::from_key(&bad_mark), None);
    }

    #[test]
    fn byte_order_is_revision_order() {
        let a = Revision::new(1, 300).to_key(false);
        let b = Revision::new(2, 0).to_key(true);
        let c = Revision::new(256, 0).to_key(false);
        assert!(a < b && b < c);
        assert!(main_prefix(2).as_slice() < b.as_slice());
        assert!(main_prefix(3).as_slice() > b.as_slice());
    }
}
