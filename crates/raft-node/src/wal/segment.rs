//! Segment files: their names (`<seq:016x>-<first_index:016x>.wal`), listing them in order
//! (a gap in the sequence is corruption, a leftover temporary file is removed), and creating a
//! new one durably, starting with the latest snapshot marker and hard state.
//!
//! Owns the directory layout; it must not read records back (see [`super::replay`]) nor decide
//! when a segment is cut or released (see [`super::writer`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use raft::eraftpb::{HardState, SnapshotMetadata};

use super::record::{encode_message, RECORD_HARD_STATE, RECORD_SNAPSHOT};
use super::{io_err, WalError};

const SEGMENT_SUFFIX: &str = ".wal";
const TMP_SUFFIX: &str = ".tmp";

/// One segment file.
#[derive(Debug, Clone)]
pub(super) struct Segment {
    pub(super) seq: u64,
    pub(super) first_index: u64,
    pub(super) path: PathBuf,
}

fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}{SEGMENT_SUFFIX}")
}

pub(super) fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
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
pub(super) fn list_segments(dir: &Path) -> Result<Vec<Segment>, WalError> {
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

pub(super) fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Creates segment `seq` starting with `snapshot` and `hard_state`, durably: written under a
/// temporary name, synced, renamed, directory synced. Returns the file opened for appending.
pub(super) fn create_segment(
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
