//! Replaying the WAL: reading each segment's records in order into [`WalContents`] (resolving
//! overwritten entries and snapshot resets), where the records of a segment end (preallocated
//! zeros), and telling a torn write at the end of the last segment, which is cut off, from
//! corruption, which is an error.
//!
//! Runs only when the WAL is opened; it must not write anything but the truncation of a torn
//! tail.

use std::fs::{self, OpenOptions};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, SnapshotMetadata};

use super::record::{decode_record, DecodeError, RECORD_ENTRY, RECORD_HARD_STATE, RECORD_SNAPSHOT};
use super::segment::Segment;
use super::{io_err, WalError};

/// Which snapshot markers let a replay drop the entries at or below them: those of snapshots
/// recovery can start from (see `node::recovery`), which then never needs those entries. The
/// default covers none, and the replay keeps the whole log.
#[derive(Debug, Clone, Default)]
pub(crate) struct Covering {
    /// Markers at or below this index are covered in place: the state machine holds them.
    pub applied: u64,
    /// The (term, index) of a snapshot file already verified.
    pub file: Option<(u64, u64)>,
}

impl Covering {
    fn covers(&self, marker: &SnapshotMetadata) -> bool {
        marker.index > 0
            && (marker.index <= self.applied || self.file == Some((marker.term, marker.index)))
    }
}

/// The first entries of the replayed log, dropped because a covering snapshot holds them. Only
/// their terms are kept: later records are still checked and resolved against the whole log.
#[derive(Debug, Default)]
struct CoveredPrefix {
    /// (index, term) of the first entry of each term in the prefix, ascending; empty if none.
    runs: Vec<(u64, u64)>,
    /// Index of the prefix's last entry (meaningless when `runs` is empty).
    last: u64,
}

impl CoveredPrefix {
    fn first(&self) -> Option<u64> {
        self.runs.first().map(|run| run.0)
    }

    fn last(&self) -> Option<u64> {
        (!self.runs.is_empty()).then_some(self.last)
    }

    fn term(&self, index: u64) -> Option<u64> {
        let first = self.first()?;
        if index < first || index > self.last {
            return None;
        }
        let run = self.runs.partition_point(|run| run.0 <= index) - 1;
        Some(self.runs[run].1)
    }

    /// Appends the entry after the last one.
    fn push(&mut self, index: u64, term: u64) {
        if self.runs.last().map(|run| run.1) != Some(term) {
            self.runs.push((index, term));
        }
        self.last = index;
    }

    /// Keeps the entries before `index`.
    fn truncate(&mut self, index: u64) {
        self.runs
            .truncate(self.runs.partition_point(|run| run.0 < index));
        self.last = self.last.min(index.saturating_sub(1));
    }
}

/// Everything a replay of the WAL found.
#[derive(Debug, Default)]
pub(crate) struct WalContents {
    /// The last hard state written (default if none).
    pub hard_state: HardState,
    /// The surviving log: contiguous, conflicts and resets resolved; without the entries at or
    /// below the newest covering marker (all of them when nothing covers).
    pub entries: Vec<Entry>,
    /// Snapshot markers in the order they were written (including the bootstrap marker at
    /// index 0 that records the initial membership).
    pub snapshots: Vec<SnapshotMetadata>,
    /// Which markers let the replay drop entries.
    covering: Covering,
    /// Index of the newest covering marker read so far (0: none): every entry at or below it
    /// goes to `covered`, the others to `entries`.
    floor: u64,
    /// The dropped start of the log, just before `entries`.
    covered: CoveredPrefix,
}

impl WalContents {
    /// An empty replay that drops the entries under the markers `covering` covers.
    pub(crate) fn covering(covering: Covering) -> WalContents {
        WalContents {
            covering,
            ..WalContents::default()
        }
    }

    /// Index of the log's first entry, dropped or not.
    fn first_index(&self) -> Option<u64> {
        self.covered
            .first()
            .or_else(|| self.entries.first().map(|e| e.index))
    }

    /// Index of the log's last entry, dropped or not.
    pub(crate) fn last_index(&self) -> Option<u64> {
        self.entries
            .last()
            .map(|e| e.index)
            .or_else(|| self.covered.last())
    }

    /// The term of the log's entry at `index`, dropped or not.
    fn term(&self, index: u64) -> Option<u64> {
        if let Some(term) = self.covered.term(index) {
            return Some(term);
        }
        let first = self.entries.first()?.index;
        let at = usize::try_from(index.checked_sub(first)?).ok()?;
        self.entries.get(at).map(|e| e.term)
    }

    /// Removes the log's entries from `index` on.
    fn truncate(&mut self, index: u64) {
        match self.entries.first().map(|e| e.index) {
            Some(first) if index >= first => self.entries.truncate((index - first) as usize),
            _ => {
                self.entries.clear();
                self.covered.truncate(index);
            }
        }
    }

    /// Applies one decoded record; the error is the reason the record is invalid.
    fn apply(&mut self, record_type: u8, payload: &[u8]) -> Result<(), String> {
        match record_type {
            RECORD_ENTRY => {
                let entry = Entry::parse_from_bytes(payload)
                    .map_err(|e| format!("undecodable entry: {e}"))?;
                if let (Some(first), Some(last)) = (self.first_index(), self.last_index()) {
                    if entry.index > last + 1 {
                        return Err(format!(
                            "entry index {} does not follow the previous entry's index {last}",
                            entry.index
                        ));
                    }
                    // Conflict resolution: the later record wins, its suffix is gone (the whole
                    // log if it starts before it).
                    self.truncate(entry.index.max(first));
                }
                if entry.index <= self.floor {
                    self.covered.push(entry.index, entry.term);
                } else {
                    self.entries.push(entry);
                }
            }
            RECORD_HARD_STATE => {
                self.hard_state = HardState::parse_from_bytes(payload)
                    .map_err(|e| format!("undecodable hard state: {e}"))?;
            }
            RECORD_SNAPSHOT => {
                let marker = SnapshotMetadata::parse_from_bytes(payload)
                    .map_err(|e| format!("undecodable snapshot marker: {e}"))?;
                if let Some(first) = self.first_index() {
                    let log_holds_marker =
                        marker.index < first || self.term(marker.index) == Some(marker.term);
                    if !log_holds_marker {
                        // A received snapshot replaced the whole log.
                        self.truncate(first);
                    }
                }
                if self.covering.covers(&marker) && marker.index > self.floor {
                    self.floor = marker.index;
                    let below = self.entries.partition_point(|e| e.index <= marker.index);
                    for entry in self.entries.drain(..below) {
                        self.covered.push(entry.index, entry.term);
                    }
                }
                self.snapshots.push(marker);
            }
            other => return Err(format!("unknown record type {other}")),
        }
        Ok(())
    }
}

/// Sector size for torn-write detection (the smallest a disk writes atomically).
pub(super) const SECTOR_BYTES: usize = 512;

/// Whether `record`, which starts at byte `offset` of its file, has a piece within one disk
/// sector that is all zeros.
fn has_unwritten_sector(record: &[u8], offset: usize) -> bool {
    let mut at = 0;
    while at < record.len() {
        let in_sector = SECTOR_BYTES - (offset + at) % SECTOR_BYTES;
        let piece = &record[at..record.len().min(at + in_sector)];
        if piece.iter().all(|b| *b == 0) {
            return true;
        }
        at += piece.len();
    }
    false
}

/// Where the records of a segment's bytes end, as [`replay_records`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordsEnd {
    /// Offset after the last good record.
    pub offset: usize,
    /// Why the record at `offset` is a torn write, when it is one (to be cut off).
    pub torn: Option<String>,
}

/// Replays the records of one segment's bytes into `contents`, in order, without touching any
/// file: a torn record (only accepted at the end of the last segment, `is_last`) ends them.
/// Errors are (offset of the bad record, reason).
pub(crate) fn replay_records(
    data: &[u8],
    is_last: bool,
    contents: &mut WalContents,
) -> Result<RecordsEnd, (usize, String)> {
    let mut offset = 0;
    while offset < data.len() {
        if data[offset..].iter().all(|b| *b == 0) {
            // Preallocated space: the records end here.
            break;
        }
        match decode_record(&data[offset..]) {
            Ok((record_type, payload, len)) => {
                contents
                    .apply(record_type, payload)
                    .map_err(|reason| (offset, reason))?;
                offset += len;
            }
            Err(e) => {
                let rest = &data[offset..];
                let (torn, reason) = match e {
                    DecodeError::Incomplete => (true, "record is incomplete".to_string()),
                    // Torn if nothing was written after it (the file or the preallocated zeros
                    // end there), or if a disk sector of it never reached the disk: blocks
                    // written after the last sync reach the disk in any order (etcd's
                    // `isTornEntry`). An all-zero header is such a sector too: it reads as an
                    // empty record whose checksum cannot match.
                    DecodeError::Checksum { end } => (
                        rest[end..].iter().all(|b| *b == 0)
                            || has_unwritten_sector(&rest[..end], offset),
                        "checksum mismatch".to_string(),
                    ),
                };
                if !(is_last && torn) {
                    return Err((offset, reason));
                }
                return Ok(RecordsEnd {
                    offset,
                    torn: Some(reason),
                });
            }
        }
    }
    Ok(RecordsEnd { offset, torn: None })
}

/// Replays one segment into `contents`; in the last segment a torn tail is truncated away.
/// Returns where its records end.
pub(super) fn replay_segment(
    segment: &Segment,
    is_last: bool,
    contents: &mut WalContents,
) -> Result<u64, WalError> {
    let data = fs::read(&segment.path).map_err(io_err("read", &segment.path))?;
    let end =
        replay_records(&data, is_last, contents).map_err(|(offset, reason)| WalError::Corrupt {
            file: segment.path.clone(),
            offset: offset as u64,
            reason,
        })?;
    if let Some(reason) = end.torn {
        let offset = end.offset;
        tracing::warn!(
            path = %segment.path.display(),
            offset,
            dropped_bytes = data.len() - offset,
            "truncating torn record at the end of the WAL ({reason})"
        );
        let file = OpenOptions::new()
            .write(true)
            .open(&segment.path)
            .map_err(io_err("open", &segment.path))?;
        file.set_len(offset as u64)
            .map_err(io_err("truncate", &segment.path))?;
        file.sync_all().map_err(io_err("fsync", &segment.path))?;
    }
    Ok(end.offset as u64)
}
