//! Snapshot files: `<term:016x>-<index:016x>.snap` in one directory.
//!
//! Layout of a file:
//!
//! ```text
//! [8-byte magic "MSSNAP01"][u32 metadata length LE][raft SnapshotMetadata, protobuf]
//! [state machine data ...]
//! [u64 data length LE][u32 CRC-32 LE of every byte before this trailer]
//! ```
//!
//! The data is streamed by the state machine, so the checksum and length trail it. A file is
//! written as `.snap.tmp`, synced, renamed and its directory synced, so a `.snap` file is always
//! complete; a loaded file is verified end to end before any of it is handed to the state
//! machine.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::SnapshotMetadata;

const MAGIC: &[u8; 8] = b"MSSNAP01";
const HEADER_LEN: u64 = 12;
const TRAILER_LEN: u64 = 12;
const SNAP_SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".snap.tmp";

/// Why a snapshot file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapError {
    /// A file system operation (or the state machine's serializer) failed.
    #[error("snap: {op} {}: {source}", path.display())]
    Io {
        /// What was being done (`create`, `write`, `fsync`, ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file is damaged or is not a snapshot file.
    #[error("snap: corrupt snapshot file {}: {reason}", path.display())]
    Corrupt {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A snapshot upload was refused before it was written.
    #[error("snap: refused a {size}-byte snapshot upload into {}: {reason}", dir.display())]
    Refused {
        /// The snapshot directory.
        dir: PathBuf,
        /// The size the sender advertised.
        size: u64,
        /// Why.
        reason: String,
    },
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
pub(crate) fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `stat` a valid statvfs to fill in.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapError + 'a {
    move |source| SnapError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A verified snapshot file.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotFile {
    /// Where it is.
    pub path: PathBuf,
    /// Raft's metadata: index, term and membership at that index.
    pub metadata: SnapshotMetadata,
    data_offset: u64,
    data_len: u64,
}

impl SnapshotFile {
    /// Length of the state machine's data in the file.
    pub(crate) fn data_len(&self) -> u64 {
        self.data_len
    }
}

/// Reads and writes the snapshot files of one directory.
#[derive(Debug)]
pub(crate) struct Snapshotter {
    dir: PathBuf,
}

fn snap_name(term: u64, index: u64) -> String {
    format!("{term:016x}-{index:016x}{SNAP_SUFFIX}")
}

/// (term, index) from a snapshot file name.
fn parse_snap_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(SNAP_SUFFIX)?;
    let (term, index) = stem.split_once('-')?;
    if term.len() != 16 || index.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(term, 16).ok()?,
        u64::from_str_radix(index, 16).ok()?,
    ))
}

/// Feeds everything written through it to a CRC and counts it.
struct ChecksumWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Write for ChecksumWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Dirty bytes a snapshot file may hold in the page cache before they are written out (RocksDB's
/// `bytes_per_sync` default).
const SYNC_EVERY: u64 = 1 << 20;

/// A file whose data is written out to the disk in steps of `SYNC_EVERY` bytes as it goes, as
/// RocksDB's `bytes_per_sync` does; the caller syncs it whole at the end. A snapshot of a large
/// keyspace is hundreds of MiB: written whole and synced once at the end, its writeback filled
/// the disk queue (and, on ext4 in ordered mode, the journal commit the WAL's fsync waits for)
/// and a put on that member waited up to 0.6 s. Each step is a range sync on Linux (the step's
/// pages only: no metadata, no journal commit), and small: on a disk writing 400 MB/s, a step of
/// 8 MiB queued a WAL fsync behind it for 20 ms, one of 1 MiB for 2.5 ms.
struct SyncEvery {
    file: File,
    /// Bytes written.
    written: u64,
    /// Bytes written out to the disk by the steps.
    synced: u64,
}

impl SyncEvery {
    fn new(file: File) -> Self {
        SyncEvery {
            file,
            written: 0,
            synced: 0,
        }
    }

    fn into_inner(self) -> File {
        self.file
    }

    /// Writes `len` bytes from `offset` out to the disk and waits for them.
    #[cfg(target_os = "linux")]
    fn sync_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let (offset, len) = (
            i64::try_from(offset).map_err(io::Error::other)?,
            i64::try_from(len).map_err(io::Error::other)?,
        );
        // SAFETY: plain integers and a file descriptor this struct owns.
        if unsafe { libc::sync_file_range(self.file.as_raw_fd(), offset, len, flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn sync_range(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Write for SyncEvery {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.synced >= SYNC_EVERY {
            self.sync_range(self.synced, self.written - self.synced)?;
            self.synced = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Snapshotter {
    /// Uses `dir` (created if missing) and removes snapshots whose writing was interrupted.
    pub(crate) fn new(dir: &Path) -> Result<Snapshotter, SnapError> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        for dir_entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
            let dir_entry = dir_entry.map_err(io_err("read directory", dir))?;
            if dir_entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(TMP_SUFFIX))
            {
                let path = dir_entry.path();
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(Snapshotter {
            dir: dir.to_path_buf(),
        })
    }

    /// Writes a snapshot whose data is produced by `write_data`, durably. Returns the file.
    pub(crate) fn save(
        &self,
        metadata: &SnapshotMetadata,
        write_data: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<SnapshotFile, SnapError> {
        let name = snap_name(metadata.term, metadata.index);
        let path = self.dir.join(&name);
        let tmp_path = self.dir.join(format!("{name}.tmp"));
        let result = self.write_tmp(&tmp_path, metadata, write_data);
        let (data_offset, data_len) = match result {
            Ok(lens) => lens,
            Err(e) => {
                // Best effort: a leftover temporary file is also removed on the next start.
                let _ = fs::remove_file(&tmp_path);
                return Err(e);
            }
        };
        fail::fail_point!("raft::snapshot::before_rename", |_| Err(SnapError::Io {
            op: "rename (failpoint)",
            path: tmp_path.clone(),
            source: io::Error::other("failpoint raft::snapshot::before_rename"),
        }));
        fs::rename(&tmp_path, &path).map_err(io_err("rename", &tmp_path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", &self.dir))?;
        fail::fail_point!("raft::snapshot::after_rename");
        Ok(SnapshotFile {
            path,
            metadata: metadata.clone(),
            data_offset,
            data_len,
        })
    }

    /// Writes the whole file under its temporary name; returns (data offset, data length).
    fn write_tmp(
        &self,
        tmp_path: &Path,
        metadata: &SnapshotMetadata,
        write_data: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(u64, u64), SnapError> {
        let meta_bytes = metadata.write_to_bytes().map_err(|e| SnapError::Corrupt {
            path: tmp_path.to_path_buf(),
            reason: format!("cannot encode metadata: {e}"),
        })?;
        let file = File::create(tmp_path).map_err(io_err("create", tmp_path))?;
        let mut writer = ChecksumWriter {
            inner: BufWriter::new(SyncEvery::new(file)),
            hasher: crc32fast::Hasher::new(),
            written: 0,
        };
        let meta_len = meta_bytes.len() as u32;
        writer
            .write_all(MAGIC)
            .and_then(|()| writer.write_all(&meta_len.to_le_bytes()))
            .and_then(|()| writer.write_all(&meta_bytes))
            .map_err(io_err("write", tmp_path))?;
        let data_offset = writer.written;
        write_data(&mut writer).map_err(io_err("write state machine data to", tmp_path))?;
        let data_len = writer.written - data_offset;
        let crc = writer.hasher.finalize();
        let mut inner = writer.inner;
        inner
            .write_all(&data_len.to_le_bytes())
            .and_then(|()| inner.write_all(&crc.to_le_bytes()))
            .and_then(|()| inner.flush())
            .map_err(io_err("write", tmp_path))?;
        let file = inner
            .into_inner()
            .map_err(|e| io_err("write", tmp_path)(e.into_error()))?
            .into_inner();
        file.sync_all().map_err(io_err("fsync", tmp_path))?;
        Ok((data_offset, data_len))
    }

    /// Where the snapshot file for (`term`, `index`) lives.
    pub(crate) fn path_of(&self, term: u64, index: u64) -> PathBuf {
        self.dir.join(snap_name(term, index))
    }

    /// Writes a whole snapshot file streamed from another member (its exact bytes), durably,
    /// and verifies it before it takes its final name. The file must describe `metadata` and
    /// be exactly `size` bytes long, as its sender advertised: an upload is refused before a
    /// byte is written when the disk has not that much room left (with the same again spare,
    /// so that the WAL can go on), and stopped as soon as it is longer.
    pub(crate) fn receive(
        &self,
        metadata: &SnapshotMetadata,
        size: u64,
        file: &mut dyn Read,
    ) -> Result<SnapshotFile, SnapError> {
        let refused = |reason: String| SnapError::Refused {
            dir: self.dir.clone(),
            size,
            reason,
        };
        if size < HEADER_LEN + TRAILER_LEN {
            return Err(refused("smaller than any snapshot file".into()));
        }
        let free = free_bytes(&self.dir).map_err(io_err("statvfs", &self.dir))?;
        if free < size.saturating_mul(2) {
            return Err(refused(format!("{free} bytes free, twice its size needed")));
        }
        let name = snap_name(metadata.term, metadata.index);
        let path = self.dir.join(&name);
        let tmp_path = self.dir.join(format!("{name}.recv{TMP_SUFFIX}"));
        let written = (|| {
            let mut out =
                SyncEvery::new(File::create(&tmp_path).map_err(io_err("create", &tmp_path))?);
            let copied =
                io::copy(&mut file.take(size + 1), &mut out).map_err(io_err("write", &tmp_path))?;
            let out = out.into_inner();
            if copied != size {
                return Err(refused(format!(
                    "the sender streamed {} bytes",
                    if copied > size {
                        "more".to_string()
                    } else {
                        copied.to_string()
                    }
                )));
            }
            out.sync_all().map_err(io_err("fsync", &tmp_path))?;
            // Verify under a name `load` accepts: structure, length, checksum, metadata.
            let verified = self.load_as(&tmp_path, &name)?;
            if verified.metadata.index != metadata.index || verified.metadata.term != metadata.term
            {
                return Err(SnapError::Corrupt {
                    path: tmp_path.clone(),
                    reason: "received file does not match the snapshot message".into(),
                });
            }
            Ok(verified)
        })();
        let verified = match written {
            Ok(verified) => verified,
            Err(e) => {
                let _ = fs::remove_file(&tmp_path);
                return Err(e);
            }
        };
        fs::rename(&tmp_path, &path).map_err(io_err("rename", &tmp_path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", &self.dir))?;
        Ok(SnapshotFile { path, ..verified })
    }

    /// Writes a snapshot received from the leader.
    pub(crate) fn save_bytes(
        &self,
        metadata: &SnapshotMetadata,
        data: &[u8],
    ) -> Result<SnapshotFile, SnapError> {
        self.save(metadata, |w| w.write_all(data))
    }

    /// Paths of the snapshot files with their (term, index), newest first.
    pub(crate) fn list(&self) -> Result<Vec<(u64, u64, PathBuf)>, SnapError> {
        let mut files = Vec::new();
        for dir_entry in fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))? {
            let dir_entry = dir_entry.map_err(io_err("read directory", &self.dir))?;
            let name = dir_entry.file_name();
            if let Some((term, index)) = name.to_str().and_then(parse_snap_name) {
                files.push((term, index, dir_entry.path()));
            }
        }
        files.sort_by_key(|(term, index, _)| std::cmp::Reverse((*index, *term)));
        Ok(files)
    }

    /// Opens and verifies a snapshot file: structure, length and checksum.
    pub(crate) fn load(&self, path: &Path) -> Result<SnapshotFile, SnapError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        self.load_as(path, &name)
    }

    /// [`Snapshotter::load`] for a file whose metadata must match the snapshot name `name`.
    fn load_as(&self, path: &Path, name: &str) -> Result<SnapshotFile, SnapError> {
        let corrupt = |reason: String| SnapError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(io_err("open", path))?;
        let file_len = file.metadata().map_err(io_err("stat", path))?.len();
        if file_len < HEADER_LEN + TRAILER_LEN {
            return Err(corrupt(format!("{file_len} bytes is too short")));
        }
        let mut reader = BufReader::new(file);
        let mut hasher = crc32fast::Hasher::new();
        let mut header = [0u8; HEADER_LEN as usize];
        reader
            .read_exact(&mut header)
            .map_err(io_err("read", path))?;
        if &header[..8] != MAGIC {
            return Err(corrupt("bad magic number".into()));
        }
        hasher.update(&header);
        let meta_len = u64::from(u32::from_le_bytes([
            header[8], header[9], header[10], header[11],
        ]));
        if HEADER_LEN + meta_len + TRAILER_LEN > file_len {
            return Err(corrupt(format!(
                "metadata length {meta_len} exceeds the file"
            )));
        }
        let mut meta_bytes = vec![0u8; meta_len as usize];
        reader
            .read_exact(&mut meta_bytes)
            .map_err(io_err("read", path))?;
        hasher.update(&meta_bytes);
        let data_offset = HEADER_LEN + meta_len;
        let data_len = file_len - data_offset - TRAILER_LEN;
        let mut remaining = data_len;
        let mut chunk = vec![0u8; 64 * 1024];
        while remaining > 0 {
            let n = remaining.min(chunk.len() as u64) as usize;
            reader
                .read_exact(&mut chunk[..n])
                .map_err(io_err("read", path))?;
            hasher.update(&chunk[..n]);
            remaining -= n as u64;
        }
        let mut trailer = [0u8; TRAILER_LEN as usize];
        reader
            .read_exact(&mut trailer)
            .map_err(io_err("read", path))?;
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&trailer[..8]);
        let recorded_len = u64::from_le_bytes(len_bytes);
        let recorded_crc = u32::from_le_bytes([trailer[8], trailer[9], trailer[10], trailer[11]]);
        if recorded_len != data_len {
            return Err(corrupt(format!(
                "data length {data_len} does not match the recorded {recorded_len}"
            )));
        }
        let crc = hasher.finalize();
        if crc != recorded_crc {
            return Err(corrupt(format!(
                "checksum mismatch: computed {crc:08x}, recorded {recorded_crc:08x}"
            )));
        }
        let metadata = SnapshotMetadata::parse_from_bytes(&meta_bytes)
            .map_err(|e| corrupt(format!("undecodable metadata: {e}")))?;
        let named = parse_snap_name(name);
        if named != Some((metadata.term, metadata.index)) {
            return Err(corrupt(format!(
                "metadata (term {}, index {}) does not match the file name",
                metadata.term, metadata.index
            )));
        }
        Ok(SnapshotFile {
            path: path.to_path_buf(),
            metadata,
            data_offset,
            data_len,
        })
    }

    /// A reader over a verified file's state machine data.
    pub(crate) fn open_data(&self, snapshot: &SnapshotFile) -> Result<impl Read, SnapError> {
        let mut file = File::open(&snapshot.path).map_err(io_err("open", &snapshot.path))?;
        file.seek(SeekFrom::Start(snapshot.data_offset))
            .map_err(io_err("seek", &snapshot.path))?;
        Ok(BufReader::new(file).take(snapshot.data_len))
    }

    /// A verified file's state machine data, in memory.
    #[cfg(test)]
    pub(crate) fn read_data(&self, snapshot: &SnapshotFile) -> Result<Vec<u8>, SnapError> {
        let mut data = Vec::with_capacity(usize::try_from(snapshot.data_len).unwrap_or(0));
        self.open_data(snapshot)?
            .read_to_end(&mut data)
            .map_err(io_err("read", &snapshot.path))?;
        if data.len() as u64 != snapshot.data_len {
            return Err(SnapError::Corrupt {
                path: snapshot.path.clone(),
                reason: "file shrank while being read".into(),
            });
        }
        Ok(data)
    }

    /// Deletes all but the newest `keep` snapshot files at or below `durable_index` (the
    /// snapshot this member now stands on). Returns how many were deleted.
    pub(crate) fn purge(&self, keep: usize, durable_index: u64) -> Result<usize, SnapError> {
        let files = self.list()?;
        let mut removed = 0;
        // Files above `durable_index` (an upload raft never installed) are neither counted nor
        // removed here: whatever their index, they must not displace the snapshots below.
        let below = files.iter().filter(|(_, index, _)| *index <= durable_index);
        for (_, _, path) in below.skip(keep) {
            fs::remove_file(path).map_err(io_err("remove", path))?;
            removed += 1;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::ConfState;

    fn metadata(index: u64, term: u64) -> SnapshotMetadata {
        SnapshotMetadata {
            index,
            term,
            conf_state: Some(ConfState::from((vec![1, 2, 3], vec![]))).into(),
            ..Default::default()
        }
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Snapshotter::new(dir.path()).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let saved = snapshotter
            .save(&metadata(42, 3), |w| w.write_all(&data))
            .unwrap();
        assert_eq!(
            saved.path.file_name().unwrap(),
            "0000000000000003-000000000000002a.snap"
        );
        let loaded = snapshotter.load(&saved.path).unwrap();
        assert_eq!(loaded.metadata, metadata(42, 3));
        assert_eq!(snapshotter.read_data(&loaded).unwrap(), data);
    }

    /// A snapshot larger than the sync step is written in synced steps and reads back whole.
    #[test]
    fn a_file_larger_than_the_sync_step_is_synced_as_it_goes_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut step = SyncEvery::new(File::create(dir.path().join("f")).unwrap());
        step.write_all(&vec![1u8; SYNC_EVERY as usize + 100])
            .unwrap();
        assert_eq!(step.synced, SYNC_EVERY + 100, "written out as it goes");

        let snapshotter = Snapshotter::new(dir.path()).unwrap();
        let data: Vec<u8> = (0..2 * SYNC_EVERY + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        let saved = snapshotter
            .save(&metadata(42, 3), |w| w.write_all(&data))
            .unwrap();
        let loaded = snapshotter.load(&saved.path).unwrap();
        assert_eq!(snapshotter.read_data(&loaded).unwrap(), data);
    }

    #[test]
    fn corrupted_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Snapshotter::new(dir.path()).unwrap();
        let saved = snapshotter.save_bytes(&metadata(7, 1), b"state").unwrap();
        let mut bytes = fs::read(&saved.path).unwrap();
        let n = bytes.len();
        bytes[n - TRAILER_LEN as usize - 2] ^= 0x01;
        fs::write(&saved.path, &bytes).unwrap();
        let err = snapshotter.load(&saved.path).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert!(
            err.to_string().contains(&saved.path.display().to_string()),
            "{err}"
        );

        fs::write(&saved.path, &bytes[..n - 1]).unwrap();
        assert!(snapshotter.load(&saved.path).is_err());
    }

    #[test]
    fn failed_writer_leaves_no_file_and_tmp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Snapshotter::new(dir.path()).unwrap();
        let err = snapshotter
            .save(&metadata(5, 1), |_| Err(io::Error::other("disk full")))
            .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(snapshotter.list().unwrap().is_empty());

        fs::write(
            dir.path()
                .join("0000000000000001-0000000000000009.snap.tmp"),
            b"x",
        )
        .unwrap();
        let _ = Snapshotter::new(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn list_is_newest_first_and_purge_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Snapshotter::new(dir.path()).unwrap();
        for (index, term) in [(10, 1), (30, 2), (20, 2), (40, 2)] {
            snapshotter
                .save_bytes(&metadata(index, term), b"x")
                .unwrap();
        }
        let indexes: Vec<u64> = snapshotter.list().unwrap().iter().map(|f| f.1).collect();
        assert_eq!(indexes, vec![40, 30, 20, 10]);
        assert_eq!(snapshotter.purge(2, 40).unwrap(), 2);
        let indexes: Vec<u64> = snapshotter.list().unwrap().iter().map(|f| f.1).collect();
        assert_eq!(indexes, vec![40, 30]);
    }

    /// Files above the snapshot just made durable (an upload never installed, whatever its
    /// index) do not count among the kept ones: they never make the purge delete the newest
    /// snapshot this member stands on.
    #[test]
    fn uploads_above_the_durable_snapshot_never_displace_it() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Snapshotter::new(dir.path()).unwrap();
        for (index, term) in [(10, 1), (20, 2), (30, 2), (1_000_000, 9)] {
            snapshotter
                .save_bytes(&metadata(index, term), b"x")
                .unwrap();
        }
        assert_eq!(snapshotter.purge(2, 30).unwrap(), 1);
        let indexes: Vec<u64> = snapshotter.list().unwrap().iter().map(|f| f.1).collect();
        assert_eq!(indexes, vec![1_000_000, 30, 20]);
    }

    /// An upload is exactly as long as its sender advertised, fits the disk twice over, or is
    /// refused, leaving nothing behind.
    #[test]
    fn receive_takes_exactly_the_advertised_size() {
        let source = tempfile::tempdir().unwrap();
        let made = Snapshotter::new(source.path())
            .unwrap()
            .save_bytes(&metadata(50, 3), &[7u8; 10_000])
            .unwrap();
        let bytes = fs::read(&made.path).unwrap();
        let len = bytes.len() as u64;
        let dir = tempfile::tempdir().unwrap();
        let receiver = Snapshotter::new(dir.path()).unwrap();
        for (advertised, why) in [
            (len - 1, "more"),
            (len + 1, "streamed"),
            (u64::MAX / 4, "bytes free"),
            (3, "smaller than any snapshot file"),
        ] {
            let refused = receiver
                .receive(&metadata(50, 3), advertised, &mut bytes.as_slice())
                .unwrap_err();
            assert!(
                matches!(&refused, SnapError::Refused { reason, .. } if reason.contains(why)),
                "{advertised}: {refused}"
            );
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "{advertised}");
        }
        let received = receiver
            .receive(&metadata(50, 3), len, &mut bytes.as_slice())
            .unwrap();
        assert_eq!(fs::read(&received.path).unwrap(), bytes);
    }
}
