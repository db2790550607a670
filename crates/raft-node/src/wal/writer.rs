//! The open WAL ([`Wal`]): appending a Ready's records to the last segment and syncing them,
//! preallocating the segment ahead of its records, cutting a new segment when it is full,
//! recording snapshot markers and releasing segments below a snapshot.
//!
//! Owns the open file and what the next segment must start with. It is driven only by the raft
//! loop; it must not interpret what it stores (that is the raft loop's and
//! [`super::replay`]'s business).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use raft::eraftpb::{Entry, HardState, SnapshotMetadata};

use super::record::{encode_message, RECORD_ENTRY, RECORD_HARD_STATE, RECORD_SNAPSHOT};
use super::replay::{replay_segment, Covering, WalContents};
use super::segment::{create_segment, list_segments, sync_dir, Segment};
use super::{io_err, WalError};

/// How far the last segment is extended with zeros at a time.
pub(super) const PREALLOCATE_BYTES: u64 = 4 * 1024 * 1024;

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
    /// Bytes of records written since the WAL was opened or created.
    appended_bytes: u64,
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
            appended_bytes: 0,
        })
    }

    /// Opens the WAL in `dir` and replays the whole log ([`Wal::open_covering`] with nothing
    /// covered).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn open(
        dir: &Path,
        segment_size_bytes: u64,
    ) -> Result<(Wal, WalContents), WalError> {
        Self::open_covering(dir, segment_size_bytes, Covering::default())
    }

    /// Opens the WAL in `dir` and replays it, dropping the entries at or below the newest marker
    /// `covering` covers as it goes (so a long log never sits in memory whole). A torn record at
    /// the end of the last segment is cut off (with a warning); any other bad record is an
    /// error.
    pub(crate) fn open_covering(
        dir: &Path,
        segment_size_bytes: u64,
        covering: Covering,
    ) -> Result<(Wal, WalContents), WalError> {
        let segments = list_segments(dir)?;
        let Some(last_segment) = segments.last().cloned() else {
            return Err(WalError::Io {
                op: "open",
                path: dir.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotFound, "no WAL segments"),
            });
        };
        let mut contents = WalContents::covering(covering);
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
        let last_index = contents.last_index().unwrap_or(latest_snapshot.index);
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
            appended_bytes: 0,
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
        crate::metrics::METRICS
            .wal_fsync_seconds
            .record(elapsed.as_secs_f64());
        if elapsed > std::time::Duration::from_secs(1) {
            tracing::warn!(
                path = %path.display(),
                took_ms = elapsed.as_millis() as u64,
                "slow WAL fsync"
            );
        }
        Ok(())
    }

    /// Takes out of the WAL the oldest segments whose entries all lie below `index` (a
    /// snapshot's index) while more than `keep` segments (at least 1) remain; the segment that
    /// contains `index` always stays. Returns their files, oldest first, for
    /// [`remove_segments`]: the WAL never reads or writes them again, and should a crash come
    /// before they are deleted, the next replay reads them and drops their entries.
    pub(crate) fn release_segments(&mut self, index: u64, keep: usize) -> Vec<PathBuf> {
        let mut releasable = 0;
        while releasable + 1 < self.segments.len()
            && self.segments[releasable + 1].first_index <= index
            && self.segments.len() - releasable > keep.max(1)
        {
            releasable += 1;
        }
        self.segments
            .drain(..releasable)
            .map(|segment| segment.path)
            .collect()
    }

    /// [`Wal::release_segments`] and [`remove_segments`] at once; the number removed.
    #[cfg(test)]
    pub(crate) fn release_to(&mut self, index: u64, keep: usize) -> Result<usize, WalError> {
        let released = self.release_segments(index, keep);
        remove_segments(&self.dir, &released)?;
        Ok(released.len())
    }

    /// The directory of the segment files.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Paths of the current segment files, oldest first.
    #[cfg(test)]
    pub(crate) fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    /// Where the records of the current segment end.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn records_end(&self) -> u64 {
        self.file_size
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
        self.appended_bytes += self.buf.len() as u64;
        Ok(())
    }

    /// Bytes of records written since the WAL was opened or created.
    pub(crate) fn appended_bytes(&self) -> u64 {
        self.appended_bytes
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

/// Deletes segment files [`Wal::release_segments`] released, oldest first, then syncs `dir`.
pub(crate) fn remove_segments(dir: &Path, paths: &[PathBuf]) -> Result<(), WalError> {
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed WAL segment"),
            // Removed already (by a release that ran before a crash).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", path)(e)),
        }
    }
    if !paths.is_empty() {
        sync_dir(dir)?;
    }
    Ok(())
}
