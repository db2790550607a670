//! What `etcdctl snapshot status` (3.4) prints for a database: computed the same way.
//!
//! etcd checks the file (`tx.Check()`), then hashes with CRC-32 Castagnoli every top-level bucket
//! name followed by each of its keys and values in order; the revision is the main revision of the
//! last key of the `key` bucket, the key count the number of entries in all buckets, and the size
//! bbolt's `tx.Size()`.

use crate::etcd_schema::{bucket, Revision};
use crate::{Db, Error, ReadAt};

/// The figures of `etcdctl snapshot status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStatus {
    /// CRC-32C over bucket names, keys and values.
    pub hash: u32,
    /// Main revision of the last entry of the `key` bucket (0 if it is empty or absent).
    pub revision: i64,
    /// Entries in all buckets.
    pub total_key: u64,
    /// Size of the database in bytes.
    pub total_size: u64,
}

/// Checks `db` and computes its status, reading every page once.
pub fn snapshot_status<S: ReadAt>(db: &Db<S>) -> Result<SnapshotStatus, Error> {
    db.check()?;
    let mut status = SnapshotStatus {
        hash: 0,
        revision: 0,
        total_key: 0,
        total_size: db.size_bytes(),
    };
    for (name, b) in db.buckets()? {
        status.hash = crc32c::crc32c_append(status.hash, &name);
        let is_key_bucket = name == bucket::KEY;
        for entry in db.iter(&b) {
            let entry = entry?;
            status.hash = crc32c::crc32c_append(status.hash, &entry.key);
            if !entry.is_bucket {
                status.hash = crc32c::crc32c_append(status.hash, &entry.value);
            }
            if is_key_bucket {
                status.revision = Revision::from_bytes(&entry.key)?.main;
            }
            status.total_key += 1;
        }
    }
    Ok(status)
}
