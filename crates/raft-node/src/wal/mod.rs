//! Write-ahead log: the durable copy of raft's log, hard state and snapshot markers.
//!
//! The log is a sequence of segment files `<seq:016x>-<first_index:016x>.wal` in one directory.
//! `first_index` is the index the segment's first new entry was expected to have. Each file is a
//! sequence of records:
//!
//! ```text
//! [u32 payload length LE][u32 CRC-32 LE of type byte and payload][u8 type][payload]
//! ```
//!
//! with payloads that are protobuf-encoded raft `Entry`, `HardState` or `SnapshotMetadata`
//! (a snapshot marker). Replay rules, in file order:
//! - an entry whose index is at or below the last one replaces it and everything after it (a
//!   leader overwrote conflicting entries);
//! - a snapshot marker whose (index, term) is not in the log replayed so far resets the log to the
//!   snapshot (a follower received a snapshot); a marker for an entry the log holds (a local
//!   snapshot) leaves the log alone;
//! - the last hard state wins.
//!
//! Every new segment starts with the latest snapshot marker and hard state, so segments wholly
//! below a snapshot can be deleted. Only the last segment is written to; a record torn by a crash
//! at its end is cut off on open. Any other unreadable record is [`WalError::Corrupt`].
//!
//! The last segment is extended with zeros [`PREALLOCATE_BYTES`](writer::PREALLOCATE_BYTES) at a time ahead of the records
//! (etcd preallocates its segments too): overwriting blocks that already exist makes each
//! `fdatasync` flush only data, not the file size and block allocation as well, which costs about
//! a third less CPU and time per sync. Zeros after the last record are the end of the data (no
//! record is all zeros: its checksum covers the type byte); a finished segment is trimmed to its
//! records when the next one starts. Blocks written after the last sync may reach the disk in any
//! order, so in the last segment a record that fails its checksum and has a disk sector of zeros
//! (an all-zero header included) is a torn write: it and everything after it are cut off on open, as
//! etcd does. The price, shared with etcd: a synced sector of the last segment that the disk
//! later zeroes loses the records from there on instead of stopping the member.
//!
//! Modules, one concern each: [`record`] (the record framing), [`segment`] (segment files and
//! their names), [`replay`] (reading the log back, torn tails), [`writer`] (the open [`Wal`]).

use std::io;
use std::path::{Path, PathBuf};

mod record;
mod replay;
mod segment;
mod writer;

#[cfg(test)]
mod tests;

#[cfg(feature = "fuzzing")]
pub(crate) mod fuzz_hooks;

pub(crate) use replay::Covering;
pub(crate) use writer::{remove_segments, Wal};

/// Size at which a new segment is started (etcd's `SegmentSizeBytes`).
pub(crate) const DEFAULT_SEGMENT_SIZE_BYTES: u64 = 64 * 1024 * 1024;

/// Why the write-ahead log could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// A file system operation failed.
    #[error("wal: {op} {}: {source}", path.display())]
    Io {
        /// What was being done (`open`, `write`, `fsync`, ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A record other than a torn tail could not be read. The member must not start from this
    /// log: restore the member from a backup or remove it and add it back to the cluster.
    #[error("wal: corrupt record in {} at byte offset {offset}: {reason}", file.display())]
    Corrupt {
        /// The segment file holding the bad record.
        file: PathBuf,
        /// Byte offset of the bad record's start within `file`.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A raft structure could not be encoded.
    #[error("wal: encode {what}: {reason}")]
    Encode {
        /// The structure (`entry`, `hard state`, `snapshot marker`).
        what: &'static str,
        /// The encoder's error.
        reason: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WalError + 'a {
    move |source| WalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
