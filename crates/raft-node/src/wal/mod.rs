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
//! The last segment is extended with zeros [`PREALLOCATE_BYTES`] at a time ahead of the records
//! (etcd preallocates its segments too): overwriting blocks that already exist makes each
//! `fdatasync` flush only data, not the file size and block allocation as well, which costs about
//! a third less CPU and time per sync. Zeros after the last record are the end of the data (no
//! record is all zeros: its checksum covers the type byte); a finished segment is trimmed to its
//! records when the next one starts. Blocks written after the last sync may reach the disk in any
//! order, so in the last segment a record that fails its checksum and has a disk sector of zeros
//! (an all-zero header included) is a torn write: it and everything after it are cut off on open, as
//! etcd does. The price, shared with etcd: a synced sector of the last segment that the disk
//! later zeroes loses the records from there on instead of stopping the member.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, SnapshotMetadata};

/// Size at which a new segment is started (etcd's `SegmentSizeBytes`).
pub(crate) const DEFAULT_SEGMENT_SIZE_BYTES: u64 = 64 * 1024 * 1024;

const RECORD_HEADER_LEN: usize = 9;
/// How far the last segment is extended with zeros at a time.
pub(crate) const PREALLOCATE_BYTES: u64 = 4 * 1024 * 1024;
const RECORD_ENTRY: u8 = 1;
const RECORD_HARD_STATE: u8 = 2;
const RECORD_SNAPSHOT: u8 = 3;
const SEGMENT_SUFFIX: &str = ".wal";
const TMP_SUFFIX: &str = ".tmp";

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

/// Everything a replay of the WAL found.
#[derive(Debug, Default)]
pub(crate) struct WalContents {
    /// The last hard state written (default if none).
    pub hard_state: HardState,
    /// The surviving log: contiguous, conflicts and resets resolved.
    pub entries: Vec<Entry>,
    /// Snapshot markers in the order they were written (including the bootstrap marker at
    /// index 0 that records the initial membership).
    pub snapshots: Vec<SnapshotMetadata>,
}

impl WalContents {
    /// Applies one decoded record; the error is the reason the record is invalid.
    fn apply(&mut self, record_type: u8, payload: &[u8]) -> Result<(), String> {
        match record_type {
            RECORD_ENTRY => {
                let entry = Entry::parse_from_bytes(payload)
                    .map_err(|e| format!("undecodable entry: {e}"))?;
                if let (Some(first), Some(last)) = (self.entries.first(), self.entries.last()) {
                    let (first, last) = (first.index, last.index);
                    if entry.index > last + 1 {
                        return Err(format!(
                            "entry index {} does not follow the previous entry's index {last}",
                            entry.index
                        ));
                    }
                    if entry.index < first {
                        self.entries.clear();
                    } else {
                        // Conflict resolution: the later record wins, its suffix is gone.
                        self.entries.truncate((entry.index - first) as usize);
                    }
                }
                self.entries.push(entry);
            }
            RECORD_HARD_STATE => {
                self.hard_state = HardState::parse_from_bytes(payload)
                    .map_err(|e| format!("undecodable hard state: {e}"))?;
            }
            RECORD_SNAPSHOT => {
                let marker = SnapshotMetadata::parse_from_bytes(payload)
                    .map_err(|e| format!("undecodable snapshot marker: {e}"))?;
                if let Some(first) = self.entries.first().map(|e| e.index) {
                    let log_holds_marker = marker.index < first
                        || self
                            .entries
                            .get((marker.index - first) as usize)
                            .is_some_and(|e| e.term == marker.term);
                    if !log_holds_marker {
                        // A received snapshot replaced the whole log.
                        self.entries.clear();
                    }
                }
                self.snapshots.push(marker);
            }
            other => return Err(format!("unknown record type {other}")),
        }
        Ok(())
    }
}

/// One segment file.
#[derive(Debug, Clone)]
struct Segment {
    seq: u64,
    first_index: u64,
    path: PathBuf,
}

fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    let (seq, first_index) = stem.split_once('-')?;
    if seq.len() != 16 || first_index.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(seq, 16).ok()?,
        u64::from_str_radix(first_index, 16).ok()?,
    ))
}

/// Lists the segments of `dir` by sequence number and removes leftover temporary files.
fn list_segments(dir: &Path) -> Result<Vec<Segment>, WalError> {
    let read_dir = match fs::read_dir(dir) {
        Ok(read_dir) => read_dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read directory", dir)(e)),
    };
    let mut segments = Vec::new();
    for dir_entry in read_dir {
        let dir_entry = dir_entry.map_err(io_err("read directory", dir))?;
        let name = dir_entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(TMP_SUFFIX) {
            // A segment whose creation was interrupted; it never held acknowledged data.
            let path = dir_entry.path();
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            continue;
        }
        if let Some((seq, first_index)) = parse_segment_name(name) {
            segments.push(Segment {
                seq,
                first_index,
                path: dir_entry.path(),
            });
        }
    }
    segments.sort_by_key(|s| s.seq);
    for pair in segments.windows(2) {
        if pair[1].seq != pair[0].seq + 1 {
            return Err(WalError::Corrupt {
                file: pair[1].path.clone(),
                offset: 0,
                reason: format!(
                    "segment sequence gap: expected sequence {:016x} before it",
                    pair[0].seq + 1
                ),
            });
        }
    }
    Ok(segments)
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn encode_record(
    buf: &mut Vec<u8>,
    record_type: u8,
    what: &'static str,
    payload: &[u8],
) -> Result<(), WalError> {
    let len = u32::try_from(payload.len()).map_err(|_| WalError::Encode {
        what,
        reason: format!("{} bytes exceed the 4 GiB record limit", payload.len()),
    })?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[record_type]);
    hasher.update(payload);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&hasher.finalize().to_le_bytes());
    buf.push(record_type);
    buf.extend_from_slice(payload);
    Ok(())
}

fn encode_message(
    buf: &mut Vec<u8>,
    record_type: u8,
    what: &'static str,
    msg: &dyn protobuf::Message,
) -> Result<(), WalError> {
    let payload = msg.write_to_bytes().map_err(|e| WalError::Encode {
        what,
        reason: e.to_string(),
    })?;
    encode_record(buf, record_type, what, &payload)
}

/// Why a record could not be decoded.
enum DecodeError {
    /// The record runs past the end of the file.
    Incomplete,
    /// The checksum does not match; `end` is where the record would end.
    Checksum { end: usize },
}

/// Decodes the record at the start of `data`: (type, payload, record length).
fn decode_record(data: &[u8]) -> Result<(u8, &[u8], usize), DecodeError> {
    if data.len() < RECORD_HEADER_LEN {
        return Err(DecodeError::Incomplete);
    }
    let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let crc = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
    let end = RECORD_HEADER_LEN
        .checked_add(len)
        .ok_or(DecodeError::Incomplete)?;
    if data.len() < end {
        return Err(DecodeError::Incomplete);
    }
    let record_type = data[8];
    let payload = &data[RECORD_HEADER_LEN..end];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[record_type]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Err(DecodeError::Checksum { end });
    }
    Ok((record_type, payload, end))
}

/// An open write-ahead log, appending to its last segment.
pub(crate) struct Wal {
    dir: PathBuf,
    segment_size_bytes: u64,
    segments: Vec<Segment>,
    file: File,
    /// Where the records of the current segment end (the next record's offset).
    file_size: u64,
    /// The current segment's length on disk: `file_size` plus preallocated zeros.
    allocated: u64,
    /// Index of the last entry written (or of the snapshot that reset the log).
    last_index: u64,
    hard_state: HardState,
    latest_snapshot: SnapshotMetadata,
    buf: Vec<u8>,
}

impl Wal {
    /// Whether `dir` holds a WAL (at least one segment).
    pub(crate) fn exists(dir: &Path) -> Result<bool, WalError> {
        Ok(!list_segments(dir)?.is_empty())
    }

    /// Creates a new WAL in `dir` whose first record is `bootstrap`, a snapshot marker at index 0
    /// carrying the initial membership. Durable when this returns.
    pub(crate) fn create(
        dir: &Path,
        segment_size_bytes: u64,
        bootstrap: &SnapshotMetadata,
    ) -> Result<Wal, WalError> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let hard_state = HardState::default();
        let (file, segment, file_size) =
            create_segment(dir, 0, bootstrap.index + 1, bootstrap, &hard_state)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            segment_size_bytes,
            segments: vec![segment],
            file,
            file_size,
            allocated: file_size,
            last_index: bootstrap.index,
            hard_state,
            latest_snapshot: bootstrap.clone(),
            buf: Vec::new(),
        })
    }

    /// Opens the WAL in `dir` and replays it. A torn record at the end of the last segment is cut
    /// off (with a warning); any other bad record is an error.
    pub(crate) fn open(
        dir: &Path,
        segment_size_bytes: u64,
    ) -> Result<(Wal, WalContents), WalError> {
        let segments = list_segments(dir)?;
        let Some(last_segment) = segments.last().cloned() else {
            return Err(WalError::Io {
                op: "open",
                path: dir.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotFound, "no WAL segments"),
            });
        };
        let mut contents = WalContents::default();
        let mut file_size = 0;
        for (i, segment) in segments.iter().enumerate() {
            let is_last = i + 1 == segments.len();
            file_size = replay_segment(segment, is_last, &mut contents)?;
        }
        let file = OpenOptions::new()
            .write(true)
            .open(&last_segment.path)
            .map_err(io_err("open", &last_segment.path))?;
        let allocated = file
            .metadata()
            .map_err(io_err("stat", &last_segment.path))?
            .len();
        let latest_snapshot = contents.snapshots.last().cloned().unwrap_or_default();
        let last_index = contents
            .entries
            .last()
            .map_or(latest_snapshot.index, |e| e.index);
        let wal = Wal {
            dir: dir.to_path_buf(),
            segment_size_bytes,
            segments,
            file,
            file_size,
            allocated,
            last_index,
            hard_state: contents.hard_state.clone(),
            latest_snapshot,
            buf: Vec::new(),
        };
        Ok((wal, contents))
    }

    /// Writes one Ready's worth of state: a snapshot received from the leader (it resets the
    /// log), new entries and a new hard state. Not durable until [`Wal::sync`].
    pub(crate) fn save(
        &mut self,
        received_snapshot: Option<&SnapshotMetadata>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), WalError> {
        self.buf.clear();
        if let Some(snapshot) = received_snapshot {
            encode_message(&mut self.buf, RECORD_SNAPSHOT, "snapshot marker", snapshot)?;
        }
        for entry in entries {
            encode_message(&mut self.buf, RECORD_ENTRY, "entry", entry)?;
        }
        if let Some(hard_state) = hard_state {
            encode_message(&mut self.buf, RECORD_HARD_STATE, "hard state", hard_state)?;
        }
        self.write_buf()?;
        if let Some(snapshot) = received_snapshot {
            self.latest_snapshot = snapshot.clone();
            self.last_index = snapshot.index;
        }
        if let Some(last) = entries.last() {
            self.last_index = last.index;
        }
        if let Some(hard_state) = hard_state {
            self.hard_state = hard_state.clone();
        }
        if self.file_size >= self.segment_size_bytes {
            self.cut()?;
        }
        Ok(())
    }

    /// Records that a snapshot of this member's own applied state exists at `snapshot.index`.
    /// Not durable until [`Wal::sync`].
    pub(crate) fn save_snapshot_marker(
        &mut self,
        snapshot: &SnapshotMetadata,
    ) -> Result<(), WalError> {
        self.buf.clear();
        encode_message(&mut self.buf, RECORD_SNAPSHOT, "snapshot marker", snapshot)?;
        self.write_buf()?;
        self.latest_snapshot = snapshot.clone();
        Ok(())
    }

    /// Makes everything written so far durable (one `fdatasync`).
    pub(crate) fn sync(&mut self) -> Result<(), WalError> {
        let started = std::time::Instant::now();
        let path = self.current_path().to_path_buf();
        self.file.sync_data().map_err(io_err("fsync", &path))?;
        let elapsed = started.elapsed();
        if elapsed > std::time::Duration::from_secs(1) {
            tracing::warn!(
                path = %path.display(),
                took_ms = elapsed.as_millis() as u64,
                "slow WAL fsync"
            );
        }
        Ok(())
    }

    /// Deletes the segments whose entries all lie below `index` (a snapshot's index), keeping the
    /// segment that contains it. Returns how many were deleted.
    pub(crate) fn release_to(&mut self, index: u64) -> Result<usize, WalError> {
        let mut releasable = 0;
        while releasable + 1 < self.segments.len()
            && self.segments[releasable + 1].first_index <= index
        {
            releasable += 1;
        }
        for segment in self.segments.drain(..releasable) {
            fs::remove_file(&segment.path).map_err(io_err("remove", &segment.path))?;
            tracing::debug!(path = %segment.path.display(), "removed WAL segment");
        }
        if releasable > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(releasable)
    }

    /// Paths of the current segment files, oldest first.
    #[cfg(test)]
    pub(crate) fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    fn current_path(&self) -> &Path {
        self.segments
            .last()
            .map_or(self.dir.as_path(), |s| s.path.as_path())
    }

    fn write_buf(&mut self) -> Result<(), WalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = self.current_path().to_path_buf();
        let end = self.file_size + self.buf.len() as u64;
        if end > self.allocated {
            self.preallocate(end + PREALLOCATE_BYTES)
                .map_err(io_err("preallocate", &path))?;
        }
        self.file
            .write_all_at(&self.buf, self.file_size)
            .map_err(io_err("write", &path))?;
        self.file_size = end;
        Ok(())
    }

    /// Extends the current segment with zeros up to `len` bytes. Durable with the next sync.
    fn preallocate(&mut self, len: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut at = self.allocated;
        while at < len {
            let n = (len - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        self.allocated = len;
        Ok(())
    }

    /// Finishes the current segment and starts the next one.
    fn cut(&mut self) -> Result<(), WalError> {
        // The finished segment keeps only its records.
        let path = self.current_path().to_path_buf();
        self.file
            .set_len(self.file_size)
            .map_err(io_err("truncate", &path))?;
        self.file.sync_all().map_err(io_err("fsync", &path))?;
        let seq = self.segments.last().map_or(0, |s| s.seq + 1);
        let (file, segment, file_size) = create_segment(
            &self.dir,
            seq,
            self.last_index + 1,
            &self.latest_snapshot,
            &self.hard_state,
        )?;
        self.file = file;
        self.file_size = file_size;
        self.allocated = file_size;
        self.segments.push(segment);
        Ok(())
    }
}

/// Creates segment `seq` starting with `snapshot` and `hard_state`, durably: written under a
/// temporary name, synced, renamed, directory synced. Returns the file opened for appending.
fn create_segment(
    dir: &Path,
    seq: u64,
    first_index: u64,
    snapshot: &SnapshotMetadata,
    hard_state: &HardState,
) -> Result<(File, Segment, u64), WalError> {
    let name = segment_name(seq, first_index);
    let path = dir.join(&name);
    let tmp_path = dir.join(format!("{name}{TMP_SUFFIX}"));
    let mut head = Vec::new();
    encode_message(&mut head, RECORD_SNAPSHOT, "snapshot marker", snapshot)?;
    if *hard_state != HardState::default() {
        encode_message(&mut head, RECORD_HARD_STATE, "hard state", hard_state)?;
    }
    let mut file = File::create(&tmp_path).map_err(io_err("create", &tmp_path))?;
    file.write_all(&head).map_err(io_err("write", &tmp_path))?;
    file.sync_all().map_err(io_err("fsync", &tmp_path))?;
    drop(file);
    fs::rename(&tmp_path, &path).map_err(io_err("rename", &tmp_path))?;
    sync_dir(dir)?;
    let file = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    tracing::debug!(seq, first_index, "started WAL segment");
    Ok((
        file,
        Segment {
            seq,
            first_index,
            path,
        },
        head.len() as u64,
    ))
}

/// Sector size for torn-write detection (the smallest a disk writes atomically).
const SECTOR_BYTES: usize = 512;

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

/// Replays one segment into `contents`; in the last segment a torn tail is truncated away.
/// Returns where its records end.
fn replay_segment(
    segment: &Segment,
    is_last: bool,
    contents: &mut WalContents,
) -> Result<u64, WalError> {
    let data = fs::read(&segment.path).map_err(io_err("read", &segment.path))?;
    let corrupt = |offset: usize, reason: String| WalError::Corrupt {
        file: segment.path.clone(),
        offset: offset as u64,
        reason,
    };
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
                    .map_err(|reason| corrupt(offset, reason))?;
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
                    return Err(corrupt(offset, reason));
                }
                tracing::warn!(
                    path = %segment.path.display(),
                    offset,
                    dropped_bytes = rest.len(),
                    "truncating torn record at the end of the WAL ({reason})"
                );
                let file = OpenOptions::new()
                    .write(true)
                    .open(&segment.path)
                    .map_err(io_err("open", &segment.path))?;
                file.set_len(offset as u64)
                    .map_err(io_err("truncate", &segment.path))?;
                file.sync_all().map_err(io_err("fsync", &segment.path))?;
                break;
            }
        }
    }
    Ok(offset as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::ConfState;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }

    fn marker(index: u64, term: u64) -> SnapshotMetadata {
        SnapshotMetadata {
            index,
            term,
            conf_state: Some(ConfState::from((vec![1], vec![]))).into(),
            ..Default::default()
        }
    }

    fn bootstrap() -> SnapshotMetadata {
        let mut m = SnapshotMetadata::default();
        m.set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        m
    }

    fn indexes_terms(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn round_trip_and_conflicting_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
        let first: Vec<Entry> = (1..=10).map(|i| entry(i, 1, b"a")).collect();
        wal.save(None, &first, Some(&hard_state(1, 1, 5))).unwrap();
        // A new leader overwrites 6..=10 with 6..=7 at term 2.
        let second = vec![entry(6, 2, b"b"), entry(7, 2, b"c")];
        wal.save(None, &second, Some(&hard_state(2, 2, 7))).unwrap();
        wal.sync().unwrap();
        drop(wal);

        let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
        let mut expected: Vec<(u64, u64)> = (1..=5).map(|i| (i, 1)).collect();
        expected.extend([(6, 2), (7, 2)]);
        assert_eq!(indexes_terms(&contents.entries), expected);
        assert_eq!(&contents.entries[6].data[..], b"c");
        assert_eq!(contents.hard_state, hard_state(2, 2, 7));
        assert_eq!(contents.snapshots.len(), 1);
        assert_eq!(contents.snapshots[0].get_conf_state().voters, vec![1, 2, 3]);
    }

    #[test]
    fn torn_tail_is_truncated_and_next_append_works() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
        let entries: Vec<Entry> = (1..=3).map(|i| entry(i, 1, b"payload")).collect();
        wal.save(None, &entries, Some(&hard_state(1, 1, 3)))
            .unwrap();
        wal.sync().unwrap();
        let path = wal.segment_paths()[0].clone();
        let good_len = wal.file_size;
        drop(wal);
        assert!(
            fs::metadata(&path).unwrap().len() > good_len,
            "preallocated"
        );

        // A crash in the middle of writing entry 4: only part of its record reached the disk.
        let mut torn = Vec::new();
        encode_message(&mut torn, RECORD_ENTRY, "entry", &entry(4, 1, b"lost")).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&torn[..torn.len() - 3], good_len)
            .unwrap();
        drop(file);

        let (mut wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
        assert_eq!(
            indexes_terms(&contents.entries),
            vec![(1, 1), (2, 1), (3, 1)]
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), good_len);

        wal.save(None, &[entry(4, 1, b"again")], None).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
        assert_eq!(contents.entries.len(), 4);
        assert_eq!(&contents.entries[3].data[..], b"again");
    }

    #[test]
    fn torn_tail_with_bad_checksum_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
        wal.save(None, &[entry(1, 1, b"one"), entry(2, 1, b"two")], None)
            .unwrap();
        wal.sync().unwrap();
        let path = wal.segment_paths()[0].clone();
        let end = wal.file_size as usize;
        drop(wal);
        // The last record's payload was only partly overwritten on disk.
        let mut data = fs::read(&path).unwrap();
        data[end - 1] ^= 0xff;
        fs::write(&path, &data).unwrap();

        let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
        assert_eq!(indexes_terms(&contents.entries), vec![(1, 1)]);
    }

    #[test]
    fn a_record_with_a_sector_that_never_reached_the_disk_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
        wal.save(None, &[entry(1, 1, b"one")], None).unwrap();
        wal.sync().unwrap();
        let start = wal.file_size as usize;
        // Entry 2 spans several sectors; entry 3 follows it.
        let records = [entry(2, 1, &[7u8; 2000]), entry(3, 1, b"three")];
        wal.save(None, &records, None).unwrap();
        let path = wal.segment_paths()[0].clone();
        drop(wal);

        // The crash lost one sector in the middle of entry 2 but kept entry 3.
        let mut data = fs::read(&path).unwrap();
        let hole = (start / SECTOR_BYTES + 2) * SECTOR_BYTES;
        data[hole..hole + SECTOR_BYTES].fill(0);
        fs::write(&path, &data).unwrap();
        let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
        assert_eq!(indexes_terms(&contents.entries), vec![(1, 1)]);
        assert_eq!(fs::metadata(&path).unwrap().len(), start as u64);

        // A flipped byte without a zeroed sector is corruption, not a torn write.
        let mut wal = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap().0;
        wal.save(None, &records, None).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let mut data = fs::read(&path).unwrap();
        data[start + 1000] ^= 0xff;
        fs::write(&path, &data).unwrap();
        let err = match Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES) {
            Ok(_) => panic!("a corrupt record must stop the open"),
            Err(e) => e,
        };
        assert!(matches!(err, WalError::Corrupt { offset, .. } if offset == start as u64));
    }

    #[test]
    fn preallocated_zeros_end_the_records_and_appends_continue_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
        wal.save(None, &[entry(1, 1, b"one")], None).unwrap();
        wal.sync().unwrap();
        let path = wal.segment_paths()[0].clone();
        let first_end = wal.file_size;
        drop(wal);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            first_end + PREALLOCATE_BYTES
        );

        // Reopened, it writes after its records, inside the preallocated space.
        let (mut wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
        assert_eq!(indexes_terms(&contents.entries), vec![(1, 1)]);
        assert_eq!(wal.file_size, first_end);
        wal.save(None, &[entry(2, 1, b"two")], None).unwrap();
        wal.sync().unwrap();
        let end = wal.file_size;
        drop(wal);
        let len = fs::metadata(&path).unwrap().len();
        assert_eq!(
            len,
            first_end + PREALLOCATE_BYTES,
            "written in place, not extended"
        );

        // A crash left a block written after a hole that never reached the disk: the hole ends
        // the records and what follows it is cut off, so it can never be read back later.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"stale block", end + 4096).unwrap();
        drop(file);
        let (mut wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
        assert_eq!(indexes_terms(&contents.entries), vec![(1, 1), (2, 1)]);
        assert_eq!(fs::metadata(&path).unwrap().len(), end);
        wal.save(None, &[entry(3, 1, b"three")], None).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
        assert_eq!(
            indexes_terms(&contents.entries),
            vec![(1, 1), (2, 1), (3, 1)]
        );
    }

    #[test]
    fn corrupt_middle_record_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
        let path = wal.segment_paths()[0].clone();
        let offset_of_first_entry = fs::metadata(&path).unwrap().len();
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1, b"value")).collect();
        wal.save(None, &entries, None).unwrap();
        wal.sync().unwrap();
        drop(wal);

        let mut data = fs::read(&path).unwrap();
        // Flip a payload byte of the first entry record; valid records follow it.
        data[offset_of_first_entry as usize + RECORD_HEADER_LEN + 2] ^= 0x55;
        fs::write(&path, &data).unwrap();

        let err = match Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES) {
            Err(err) => err,
            Ok(_) => panic!("a corrupt middle record must not open"),
        };
        match &err {
            WalError::Corrupt { file, offset, .. } => {
                assert_eq!(file, &path);
                assert_eq!(*offset, offset_of_first_entry);
            }
            other => panic!("unexpected error {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(
            message.contains(&format!("byte offset {offset_of_first_entry}")),
            "{message}"
        );
        // The file was not "repaired" behind the operator's back.
        assert_eq!(fs::read(&path).unwrap(), data);
    }

    #[test]
    fn corrupt_record_in_older_segment_is_an_error_even_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 200, &bootstrap()).unwrap();
        for i in 1..=20 {
            wal.save(None, &[entry(i, 1, &[7; 40])], None).unwrap();
        }
        wal.sync().unwrap();
        let segments = wal.segment_paths();
        assert!(segments.len() > 2, "{segments:?}");
        drop(wal);
        let first = &segments[0];
        let mut data = fs::read(first).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        fs::write(first, &data).unwrap();
        let err = Wal::open(dir.path(), 200).err().expect("must fail");
        assert!(
            matches!(&err, WalError::Corrupt { file, .. } if file == first),
            "{err}"
        );
    }

    #[test]
    fn rotation_release_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 512, &bootstrap()).unwrap();
        for i in 1..=100 {
            wal.save(None, &[entry(i, 1, &[1; 32])], Some(&hard_state(1, 1, i)))
                .unwrap();
        }
        wal.sync().unwrap();
        let before = wal.segment_paths();
        assert!(before.len() > 5, "{} segments", before.len());

        wal.save_snapshot_marker(&marker(60, 1)).unwrap();
        wal.sync().unwrap();
        let released = wal.release_to(60).unwrap();
        assert!(released > 0);
        let after = wal.segment_paths();
        assert_eq!(after.len(), before.len() - released);
        for removed in &before[..released] {
            assert!(!removed.exists());
        }
        // The oldest kept segment still holds entry 60.
        let (_, first_kept) =
            parse_segment_name(after[0].file_name().unwrap().to_str().unwrap()).unwrap();
        assert!(first_kept <= 60);
        drop(wal);

        let (_wal, contents) = Wal::open(dir.path(), 512).unwrap();
        assert!(contents.entries.first().unwrap().index <= 60);
        assert_eq!(contents.entries.last().unwrap().index, 100);
        assert_eq!(contents.hard_state, hard_state(1, 1, 100));
        assert_eq!(
            contents.snapshots.last().map(|m| (m.index, m.term)),
            Some((60, 1))
        );
    }

    #[test]
    fn received_snapshot_marker_resets_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1, b"x")).collect();
        wal.save(None, &entries, None).unwrap();
        // A local snapshot of the log's own entry 3 keeps the log.
        wal.save_snapshot_marker(&marker(3, 1)).unwrap();
        // A snapshot received from a leader at index 50 replaces it.
        wal.save(
            Some(&marker(50, 4)),
            &[entry(51, 4, b"y")],
            Some(&hard_state(4, 0, 50)),
        )
        .unwrap();
        wal.sync().unwrap();
        drop(wal);

        let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
        assert_eq!(indexes_terms(&contents.entries), vec![(51, 4)]);
        let markers: Vec<(u64, u64)> = contents
            .snapshots
            .iter()
            .map(|m| (m.index, m.term))
            .collect();
        assert_eq!(markers, vec![(0, 0), (3, 1), (50, 4)]);
    }

    #[test]
    fn gap_in_entries_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
        wal.save(None, &[entry(1, 1, b"a"), entry(3, 1, b"c")], None)
            .unwrap();
        wal.sync().unwrap();
        drop(wal);
        let err = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES)
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("does not follow"), "{err}");
    }

    #[test]
    fn missing_segment_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 200, &bootstrap()).unwrap();
        for i in 1..=20 {
            wal.save(None, &[entry(i, 1, &[7; 40])], None).unwrap();
        }
        wal.sync().unwrap();
        let segments = wal.segment_paths();
        drop(wal);
        fs::remove_file(&segments[1]).unwrap();
        let err = Wal::open(dir.path(), 200).err().expect("must fail");
        assert!(err.to_string().contains("sequence gap"), "{err}");
    }
}
