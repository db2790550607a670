//! etcd's multi-version key-value model over the storage [`Backend`](metastore_storage::Backend).
//!
//! Owns: the [`Store`] — revisions, the in-memory key index with generations, Range / Put /
//! DeleteRange / Txn / Compact with etcd 3.5's exact semantics, HashKV, and the on-disk layout
//! (identical to etcd's, so hashes match etcd's byte for byte):
//!
//! * bucket `key`: revision key (8-byte big-endian main revision, `_`, 8-byte big-endian sub
//!   revision, plus a trailing `t` for a deletion) → protobuf `mvccpb.KeyValue` (a deletion stores
//!   a `KeyValue` with only `key` set);
//! * bucket `meta`: `consistent_index` (8-byte big-endian raft applied index, written in the same
//!   batch as every applied request), `scheduledCompactRev` and `finishedCompactRev` (encoded as
//!   revision keys with sub revision 0).
//!
//! Threads: any number of readers; one apply thread calling [`Store::apply_write`] /
//! [`Store::record_applied`]; and per store one compaction worker it owns, which deletes what a
//! compaction supersedes in bounded batches in the background (module `compactor`; applying a
//! Compact only schedules it).
//!
//! Also exposes etcd's request validation ([`check_range`], [`check_put`], [`check_delete`],
//! [`check_txn`]) and the error strings etcd clients match on ([`MvccError::etcd_message`]).
//!
//! Must not depend on: raft, gRPC servers, any storage engine. Leases are consulted through
//! [`LeaseLookup`], implemented by the caller.

mod check;
mod compactor;
mod hash;
mod key_index;
mod leaf_map;
mod metrics;
mod rebuild;
mod revision;
mod store;
mod txn;
mod values;

pub use check::{check_delete, check_put, check_range, check_txn};
pub use compactor::CompactionConfig;
pub use hash::HashKv;
pub use revision::{Revision, REVISION_BYTES_LEN};
pub use store::{Applied, Store, WriteRequest, WriteResponse};
pub use txn::is_txn_read_only;

use metastore_storage::StorageError;

/// Name of the bucket holding every revision of every key.
pub const KEY_BUCKET: &str = "key";
/// Name of the bucket holding the consistent index and compaction marks.
pub const META_BUCKET: &str = "meta";
/// The buckets this crate needs; the server opens its backend with these plus its own.
pub const BUCKETS: &[&str] = &[KEY_BUCKET, META_BUCKET];

/// `meta` key of the raft applied index, 8-byte big-endian (etcd's `consistent_index`).
pub const CONSISTENT_INDEX_KEY: &[u8] = b"consistent_index";
/// `meta` key of the compact revision whose compaction was scheduled.
pub const SCHEDULED_COMPACT_KEY: &[u8] = b"scheduledCompactRev";
/// `meta` key of the compact revision whose compaction finished.
pub const FINISHED_COMPACT_KEY: &[u8] = b"finishedCompactRev";

/// Tells the store whether a lease exists; implemented by the lease owner.
pub trait LeaseLookup {
    /// Whether `lease_id` names a live lease.
    fn exists(&self, lease_id: i64) -> bool;
}

impl<F: Fn(i64) -> bool> LeaseLookup for F {
    fn exists(&self, lease_id: i64) -> bool {
        self(lease_id)
    }
}

/// Errors of the mvcc layer. [`MvccError::etcd_message`] gives the string etcd sends to clients
/// and [`MvccError::grpc_code`] the gRPC status code it uses.
#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    /// The requested revision is older than the compact revision.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// The requested revision is newer than the current revision.
    #[error("mvcc: required revision is a future revision")]
    FutureRev,
    /// A put names a lease that does not exist.
    #[error("lease not found")]
    LeaseNotFound,
    /// `ignore_value` / `ignore_lease` on a key that does not exist, or an empty txn operation.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A request without a key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// A put with `ignore_value` that also carries a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// A put with `ignore_lease` that also carries a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A txn that writes the same key twice along one path.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// A txn with more operations than allowed.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// [`Store::txn_read_only`] was given a txn that writes.
    #[error("mvcc: txn with writes must be applied, not read")]
    NotReadOnly,
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Data on disk that cannot be decoded or contradicts the index.
    #[error("mvcc: corrupt data: {0}")]
    Corrupt(String),
}

impl MvccError {
    /// The full message etcd's gRPC layer sends for this error, which clients match on. Storage
    /// failures and corrupt data have no etcd counterpart (etcd panics); they answer
    /// `etcdserver: storage failure` and `etcdserver: corrupt cluster`.
    pub fn etcd_message(&self) -> &'static str {
        match self {
            MvccError::Compacted => "etcdserver: mvcc: required revision has been compacted",
            MvccError::FutureRev => "etcdserver: mvcc: required revision is a future revision",
            MvccError::LeaseNotFound => "etcdserver: requested lease not found",
            MvccError::KeyNotFound => "etcdserver: key not found",
            MvccError::EmptyKey => "etcdserver: key is not provided",
            MvccError::ValueProvided => "etcdserver: value is provided",
            MvccError::LeaseProvided => "etcdserver: lease is provided",
            MvccError::DuplicateKey => "etcdserver: duplicate key given in txn request",
            MvccError::TooManyOps => "etcdserver: too many operations in txn request",
            MvccError::NotReadOnly => "etcdserver: txn with writes must go through consensus",
            MvccError::Storage(_) => "etcdserver: storage failure",
            MvccError::Corrupt(_) => "etcdserver: corrupt cluster",
        }
    }

    /// The numeric gRPC status code etcd uses for this error (`tonic::Code::from(code)`):
    /// OutOfRange (11) for compacted / future revisions, NotFound (5) for a missing lease,
    /// InvalidArgument (3) for invalid requests, DataLoss (15) for corrupt data, Internal (13)
    /// otherwise.
    pub fn grpc_code(&self) -> i32 {
        match self {
            MvccError::Compacted | MvccError::FutureRev => 11,
            MvccError::LeaseNotFound => 5,
            MvccError::KeyNotFound
            | MvccError::EmptyKey
            | MvccError::ValueProvided
            | MvccError::LeaseProvided
            | MvccError::DuplicateKey
            | MvccError::TooManyOps => 3,
            MvccError::Corrupt(_) => 15,
            MvccError::NotReadOnly | MvccError::Storage(_) => 13,
        }
    }
}

#[cfg(test)]
mod tests;
