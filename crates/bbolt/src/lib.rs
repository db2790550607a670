//! bbolt files as etcd uses them: etcd's backend database, and so its snapshots.
//!
//! Owns: a reader ([`Db`]: both metas checked, pages read on demand, buckets iterated in key
//! order, bbolt's consistency check), a streaming writer ([`Writer`]: buckets in key order in,
//! a bbolt file out, memory about a page per tree level), the SHA-256 trailer etcd's Snapshot
//! RPC appends ([`trailer`]), etcd's bucket layout and encodings ([`etcd_schema`]) and the
//! figures `etcdctl snapshot status` prints ([`status`]).
//!
//! Covers the subset of bbolt's format etcd's files use: meta pages (FNV-1a checksums),
//! branch, leaf and overflow pages, top-level buckets stored inline or in their own pages, a
//! synced freelist or none (`NoFreelistSync`). bbolt writes integers in native order; this crate
//! reads and writes little-endian files, those of every platform etcd ships for.
//!
//! Must not depend on: storage engines, mvcc, raft, gRPC services. It knows files, not servers.

pub mod etcd_schema;
mod page;
mod reader;
pub mod status;
pub mod trailer;
mod writer;

#[cfg(test)]
mod tests;

pub use page::{fnv1a64, Meta, NO_FREELIST};
pub use reader::{Bucket, Cursor, Db, Entry, ReadAt};
pub use writer::{emit, plan, Layout, Writer, Written, DEFAULT_PAGE_SIZE};

/// Errors reading or writing a bbolt file or an etcd snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the file failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a bbolt database (magic or version).
    #[error("not a bbolt database: {0}")]
    NotBbolt(String),
    /// The file is shorter than its metas say.
    #[error("truncated bbolt database: {0}")]
    Truncated(String),
    /// A checksum, page or element that does not hold together.
    #[error("corrupt bbolt database: {0}")]
    Corrupt(String),
    /// Input the writer cannot store (unsorted or empty keys, sizes over bbolt's limits).
    #[error("cannot write bbolt database: {0}")]
    Invalid(String),
    /// The SHA-256 trailer does not match the database (etcd's wording).
    #[error("expected sha256 {expected}, got {got}")]
    HashMismatch {
        /// The trailer, as Go prints bytes (`[1 170 …]`).
        expected: String,
        /// The SHA-256 of the database, as Go prints bytes.
        got: String,
    },
    /// The file has no trailer and the caller asked for it to be checked (etcd's wording).
    #[error("snapshot missing hash but --skip-hash-check=false")]
    MissingHash,
    /// A valid bbolt database that is not etcd's backend, or holds values etcd would not write.
    #[error("not an etcd backend: {0}")]
    NotEtcd(String),
}

/// Whether `prefix` (the first [`DETECT_BYTES`] bytes of a file or more) starts like a bbolt
/// database: a meta page header followed by bbolt's magic number and version.
pub fn looks_like_bbolt(prefix: &[u8]) -> bool {
    prefix.len() >= DETECT_BYTES
        && u16::from_le_bytes([prefix[8], prefix[9]]) == page::META_PAGE
        && prefix[16..20] == page::MAGIC.to_le_bytes()
        && prefix[20..24] == page::VERSION.to_le_bytes()
}

/// Bytes [`looks_like_bbolt`] needs.
pub const DETECT_BYTES: usize = 24;

impl Error {
    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Self::Corrupt(msg.into())
    }
}
