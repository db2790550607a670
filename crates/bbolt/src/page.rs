//! bbolt's on-disk layout: page headers, page elements and the meta page.
//!
//! Every page starts with a 16-byte header (`id` u64, `flags` u16, `count` u16, `overflow` u32); a
//! page with `overflow = n` spans `n + 1` consecutive pages. Integers are little-endian (bbolt
//! writes native byte order; every platform etcd ships for is little-endian).

use crate::Error;

/// Size of a page header.
pub const PAGE_HEADER_SIZE: usize = 16;
/// Size of a branch page element (`pos` u32, `ksize` u32, `pgid` u64).
pub const BRANCH_ELEMENT_SIZE: usize = 16;
/// Size of a leaf page element (`flags` u32, `pos` u32, `ksize` u32, `vsize` u32).
pub const LEAF_ELEMENT_SIZE: usize = 16;
/// Size of a bucket header (`root` pgid u64, `sequence` u64) at the start of a bucket's value.
pub const BUCKET_HEADER_SIZE: usize = 16;

/// Page flag: branch page.
pub const BRANCH_PAGE: u16 = 0x01;
/// Page flag: leaf page.
pub const LEAF_PAGE: u16 = 0x02;
/// Page flag: meta page.
pub const META_PAGE: u16 = 0x04;
/// Page flag: freelist page.
pub const FREELIST_PAGE: u16 = 0x10;
/// Leaf element flag: the value is a nested bucket.
pub const BUCKET_LEAF_FLAG: u32 = 0x01;

/// bbolt's magic number.
pub const MAGIC: u32 = 0xED0C_DAED;
/// The only data file version bbolt has written.
pub const VERSION: u32 = 2;
/// `meta.freelist` when the freelist is not synced to disk (etcd 3.4+ sets `NoFreelistSync`).
pub const NO_FREELIST: u64 = u64::MAX;
/// A freelist page whose `count` is this holds the real count in its first u64.
pub const FREELIST_COUNT_OVERFLOW: u16 = 0xFFFF;
/// Size of the meta structure that follows a meta page's header.
pub const META_SIZE: usize = 64;
/// Offset of the checksum within the meta structure: the FNV-1a sum covers the bytes before it.
const META_CHECKSUM_OFFSET: usize = 56;

/// bbolt's largest key.
pub const MAX_KEY_SIZE: usize = 32768;
/// bbolt's largest value.
pub const MAX_VALUE_SIZE: usize = (1 << 31) - 2;
/// Smallest page size accepted: a meta page must hold its header and meta.
pub const MIN_PAGE_SIZE: usize = 1024;
/// Largest page size accepted (bbolt takes the OS page size; 64 KiB covers every platform).
pub const MAX_PAGE_SIZE: usize = 65536;

/// A page header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    /// The page's id (its offset divided by the page size).
    pub id: u64,
    /// `BRANCH_PAGE`, `LEAF_PAGE`, `META_PAGE` or `FREELIST_PAGE`.
    pub flags: u16,
    /// Number of elements.
    pub count: u16,
    /// Number of further pages this page spans.
    pub overflow: u32,
}

impl PageHeader {
    /// Decodes the header at the start of `buf` (at least [`PAGE_HEADER_SIZE`] bytes).
    pub fn decode(buf: &[u8]) -> Result<Self, Error> {
        if buf.len() < PAGE_HEADER_SIZE {
            return Err(Error::corrupt("page header truncated"));
        }
        Ok(Self {
            id: u64_at(buf, 0),
            flags: u16::from_le_bytes([buf[8], buf[9]]),
            count: u16::from_le_bytes([buf[10], buf[11]]),
            overflow: u32_at(buf, 12),
        })
    }

    /// Writes the header into the first [`PAGE_HEADER_SIZE`] bytes of `buf`.
    pub fn encode(&self, buf: &mut [u8]) {
        buf[0..8].copy_from_slice(&self.id.to_le_bytes());
        buf[8..10].copy_from_slice(&self.flags.to_le_bytes());
        buf[10..12].copy_from_slice(&self.count.to_le_bytes());
        buf[12..16].copy_from_slice(&self.overflow.to_le_bytes());
    }
}

/// The meta structure of pages 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Page size of the file.
    pub page_size: u32,
    /// Meta flags (unused by bbolt, 0).
    pub flags: u32,
    /// Page of the root bucket (whose keys are the top-level bucket names).
    pub root: u64,
    /// Sequence of the root bucket.
    pub root_sequence: u64,
    /// Page of the freelist, or [`NO_FREELIST`].
    pub freelist: u64,
    /// High-water mark: the number of pages the database uses.
    pub pgid: u64,
    /// Id of the transaction that wrote this meta.
    pub txid: u64,
}

impl Meta {
    /// Decodes and validates (magic, version, checksum) the meta of a meta page.
    pub fn decode(page: &[u8]) -> Result<Self, Error> {
        if page.len() < PAGE_HEADER_SIZE + META_SIZE {
            return Err(Error::corrupt("meta page truncated"));
        }
        let m = &page[PAGE_HEADER_SIZE..PAGE_HEADER_SIZE + META_SIZE];
        if u32_at(m, 0) != MAGIC {
            return Err(Error::NotBbolt("invalid magic number".into()));
        }
        if u32_at(m, 4) != VERSION {
            return Err(Error::NotBbolt(format!(
                "unsupported version {}",
                u32_at(m, 4)
            )));
        }
        if u64_at(m, META_CHECKSUM_OFFSET) != fnv1a64(&m[..META_CHECKSUM_OFFSET]) {
            return Err(Error::corrupt("meta checksum mismatch"));
        }
        Ok(Self {
            page_size: u32_at(m, 8),
            flags: u32_at(m, 12),
            root: u64_at(m, 16),
            root_sequence: u64_at(m, 24),
            freelist: u64_at(m, 32),
            pgid: u64_at(m, 40),
            txid: u64_at(m, 48),
        })
    }

    /// The meta structure with its checksum, as it follows a meta page's header.
    pub fn encode(&self) -> [u8; META_SIZE] {
        let mut m = [0u8; META_SIZE];
        m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        m[4..8].copy_from_slice(&VERSION.to_le_bytes());
        m[8..12].copy_from_slice(&self.page_size.to_le_bytes());
        m[12..16].copy_from_slice(&self.flags.to_le_bytes());
        m[16..24].copy_from_slice(&self.root.to_le_bytes());
        m[24..32].copy_from_slice(&self.root_sequence.to_le_bytes());
        m[32..40].copy_from_slice(&self.freelist.to_le_bytes());
        m[40..48].copy_from_slice(&self.pgid.to_le_bytes());
        m[48..56].copy_from_slice(&self.txid.to_le_bytes());
        let sum = fnv1a64(&m[..META_CHECKSUM_OFFSET]);
        m[56..64].copy_from_slice(&sum.to_le_bytes());
        m
    }
}

/// 64-bit FNV-1a, bbolt's meta checksum.
pub fn fnv1a64(data: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    data.iter()
        .fold(OFFSET_BASIS, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

pub(crate) fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

pub(crate) fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn meta_round_trips_and_rejects_a_flipped_bit() {
        let meta = Meta {
            page_size: 4096,
            flags: 0,
            root: 7,
            root_sequence: 0,
            freelist: NO_FREELIST,
            pgid: 9,
            txid: 42,
        };
        let mut page = vec![0u8; 4096];
        page[PAGE_HEADER_SIZE..PAGE_HEADER_SIZE + META_SIZE].copy_from_slice(&meta.encode());
        assert_eq!(Meta::decode(&page).unwrap(), meta);
        page[PAGE_HEADER_SIZE + 40] ^= 1;
        assert!(matches!(Meta::decode(&page), Err(Error::Corrupt(_))));
        page[PAGE_HEADER_SIZE] ^= 1;
        assert!(matches!(Meta::decode(&page), Err(Error::NotBbolt(_))));
    }
}
