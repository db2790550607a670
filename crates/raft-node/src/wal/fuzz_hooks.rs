//! What the fuzz targets reach of the WAL (the `fuzzing` feature): framing records, replaying a
//! segment's bytes, opening a WAL directory.

use std::path::Path;

use super::record::{encode_record, RECORD_ENTRY, RECORD_HARD_STATE, RECORD_SNAPSHOT};
use super::replay::{replay_records, WalContents};
use super::{Wal, WalError, DEFAULT_SEGMENT_SIZE_BYTES};

/// The record types, in the order of their numbers (1, 2, 3).
pub(crate) const RECORD_TYPES: [u8; 3] = [RECORD_ENTRY, RECORD_HARD_STATE, RECORD_SNAPSHOT];

/// What a replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalSummary {
    /// Entries in the surviving log.
    pub entries: usize,
    /// Snapshot markers read.
    pub snapshots: usize,
    /// The last hard state's commit index.
    pub commit: u64,
    /// Where the records end (the next record's offset).
    pub end: u64,
    /// Whether a torn tail was found (and, on open, cut off).
    pub torn: bool,
}

fn summary(contents: &WalContents, end: u64, torn: bool) -> WalSummary {
    WalSummary {
        entries: contents.entries.len(),
        snapshots: contents.snapshots.len(),
        commit: contents.hard_state.commit,
        end,
        torn,
    }
}

/// A record of `record_type` carrying `payload`, framed with its length and checksum.
pub(crate) fn frame(record_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(payload.len() + super::record::RECORD_HEADER_LEN);
    // Only a payload over 4 GiB fails to frame; the fuzz inputs are far smaller.
    let _ = encode_record(&mut buf, record_type, "fuzz record", payload);
    buf
}

/// Replays the bytes of one segment (the last one when `is_last`) as opening the WAL does.
pub(crate) fn replay(data: &[u8], is_last: bool) -> Result<WalSummary, String> {
    let mut contents = WalContents::default();
    let end = replay_records(data, is_last, &mut contents)
        .map_err(|(offset, reason)| format!("corrupt record at byte offset {offset}: {reason}"))?;
    Ok(summary(&contents, end.offset as u64, end.torn.is_some()))
}

/// Opens the WAL in `dir` (cutting off a torn tail) and replays it.
pub(crate) fn open(dir: &Path) -> Result<WalSummary, WalError> {
    let (wal, contents) = Wal::open(dir, DEFAULT_SEGMENT_SIZE_BYTES)?;
    Ok(summary(&contents, wal.records_end(), false))
}
