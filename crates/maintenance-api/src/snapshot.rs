//! The Snapshot RPC's stream and the file it produces.
//!
//! Layout of what the client receives (and `etcdctl snapshot save` writes to its file):
//! ```text
//! content  the backend export in storage's engine-neutral format (`storage::snapshot_format`,
//!          which ends with its own end record and CRC), every bucket of the state machine
//! padding  0x00 bytes up to a multiple of 512 bytes (etcdctl checks size % 512 == 32)
//! sha256   32 bytes: SHA-256 of content + padding
//! ```
//! The export reader stops at the export's end record, so the padding needs no length field:
//! [`import_file`] checks the trailing SHA-256 and imports the rest, padding ignored.
//!
//! The export runs on a blocking thread from one consistent backend view, twice: once to count
//! its bytes (so every message carries an exact `remaining_bytes`), once to send them. Chunks go
//! through a bounded channel, so memory stays a few chunks whatever the data size.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use metastore_proto::etcdserverpb::SnapshotResponse;
use metastore_storage::{Backend, ReadView, StorageError};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::Status;

/// Bytes per streamed message (etcd's `snapshotSendBufferSize`).
pub const CHUNK_BYTES: usize = 32 * 1024;
/// The content plus padding is a multiple of this (bbolt's page-aligned file size).
pub const ALIGN_BYTES: u64 = 512;
/// Length of the trailing SHA-256.
pub const SHA256_BYTES: usize = 32;
/// Messages buffered between the export thread and the gRPC stream.
const CHANNEL_MESSAGES: usize = 4;

/// Problems with a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// The file could not be read.
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    /// The file is shorter than its trailing hash, or not aligned as the stream is.
    #[error("snapshot file: {0} bytes is not a MetaStore snapshot (expected a multiple of {ALIGN_BYTES} plus {SHA256_BYTES})")]
    BadSize(u64),
    /// The trailing SHA-256 does not match the content.
    #[error("snapshot file: SHA-256 mismatch (the file is damaged or truncated)")]
    HashMismatch,
    /// The backend refused the content.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Start streaming a consistent snapshot of `buckets` of `backend`. As etcd 3.6's, the messages
/// carry no header and every one names the storage `version`; the receiver ends after the
/// SHA-256 message, or after an error.
pub fn stream(
    backend: Arc<dyn Backend>,
    buckets: Vec<&'static str>,
    version: &'static str,
) -> mpsc::Receiver<Result<SnapshotResponse, Status>> {
    let (tx, rx) = mpsc::channel(CHANNEL_MESSAGES);
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        match export(&*backend, &buckets, version, &tx) {
            Ok(total) => tracing::info!(
                total_bytes = total,
                took_ms = started.elapsed().as_millis() as u64,
                "sent snapshot"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "snapshot stream failed");
                // The client may be gone already; nothing more to do then.
                let _ = tx.blocking_send(Err(Status::internal(format!(
                    "etcdserver: snapshot failed: {e}"
                ))));
            }
        }
    });
    rx
}

/// Counts bytes, discards them.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Cuts what is written into [`CHUNK_BYTES`] messages, hashing them, and sends them.
struct ChunkSender<'a> {
    tx: &'a mpsc::Sender<Result<SnapshotResponse, Status>>,
    version: &'static str,
    buf: Vec<u8>,
    sha: Sha256,
    total: u64,
    sent: u64,
}

impl ChunkSender<'_> {
    fn send_buffered(&mut self) -> std::io::Result<()> {
        let blob = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.sha.update(&blob);
        self.sent += blob.len() as u64;
        self.send(SnapshotResponse {
            header: None,
            remaining_bytes: self.total.saturating_sub(self.sent),
            blob,
            version: self.version.to_string(),
        })
    }

    fn send(&self, msg: SnapshotResponse) -> std::io::Result<()> {
        self.tx.blocking_send(Ok(msg)).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the client stopped reading the snapshot",
            )
        })
    }
}

impl Write for ChunkSender<'_> {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let len = data.len();
        while !data.is_empty() {
            let take = (CHUNK_BYTES - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK_BYTES {
                self.send_buffered()?;
            }
        }
        Ok(len)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Zero bytes that pad `content_bytes` to a multiple of [`ALIGN_BYTES`].
fn padding_for(content_bytes: u64) -> u64 {
    (ALIGN_BYTES - content_bytes % ALIGN_BYTES) % ALIGN_BYTES
}

fn export(
    backend: &dyn Backend,
    buckets: &[&'static str],
    version: &'static str,
    tx: &mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> Result<u64, StorageError> {
    let view: Arc<dyn ReadView> = backend.snapshot()?;
    let content = metastore_storage::export_snapshot(&*view, buckets, &mut Counter(0))?;
    let padding = padding_for(content);
    let mut out = ChunkSender {
        tx,
        version,
        buf: Vec::with_capacity(CHUNK_BYTES),
        sha: Sha256::new(),
        total: content + padding,
        sent: 0,
    };
    let written = metastore_storage::export_snapshot(&*view, buckets, &mut out)?;
    if written != content {
        return Err(StorageError::BadSnapshot(format!(
            "export gave {written} bytes, then {content} bytes, from the same view"
        )));
    }
    out.write_all(&vec![0; padding as usize])?;
    if !out.buf.is_empty() {
        out.send_buffered()?;
    }
    let digest = out.sha.clone().finalize().to_vec();
    out.send(SnapshotResponse {
        header: None,
        remaining_bytes: 0,
        blob: digest,
        version: version.to_string(),
    })?;
    Ok(out.total + SHA256_BYTES as u64)
}

/// Check a snapshot file's size and trailing SHA-256; returns the length of content + padding.
pub fn verify_file(path: &Path) -> Result<u64, SnapshotFileError> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    if size < SHA256_BYTES as u64 || !(size - SHA256_BYTES as u64).is_multiple_of(ALIGN_BYTES) {
        return Err(SnapshotFileError::BadSize(size));
    }
    let body = size - SHA256_BYTES as u64;
    let mut sha = Sha256::new();
    let mut reader = BufReader::new((&mut file).take(body));
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    let mut expected = [0u8; SHA256_BYTES];
    file.seek(SeekFrom::Start(body))?;
    file.read_exact(&mut expected)?;
    if sha.finalize().as_slice() != expected {
        return Err(SnapshotFileError::HashMismatch);
    }
    Ok(body)
}

/// Verify a snapshot file written from the Snapshot stream and import its content into
/// `backend` (replacing what it holds).
pub fn import_file(backend: &dyn Backend, path: &Path) -> Result<(), SnapshotFileError> {
    let body = verify_file(path)?;
    let mut reader = BufReader::new(File::open(path)?.take(body));
    backend.import(&mut reader)?;
    Ok(())
}

/// What `metastore snapshot status` reports about a snapshot file (etcdutl's columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStatus {
    /// The Maintenance Hash of the state the file holds (see [`crate::backend_hash`]).
    pub hash: u32,
    /// The highest main revision stored.
    pub revision: i64,
    /// Pairs stored, all buckets together.
    pub total_keys: u64,
    /// Size of the file in bytes.
    pub total_size_bytes: u64,
}

/// Verify a snapshot file and describe it, in constant memory (one pass per bucket).
pub fn status(path: &Path) -> Result<SnapshotStatus, SnapshotFileError> {
    let body = verify_file(path)?;
    let total_size_bytes = body + SHA256_BYTES as u64;
    let open =
        || -> Result<_, SnapshotFileError> { Ok(BufReader::new(File::open(path)?.take(body))) };

    let mut revision = 0i64;
    let total_keys =
        metastore_storage::snapshot_format::read_stream(&mut open()?, &mut |bucket, key, _| {
            if bucket == metastore_mvcc::KEY_BUCKET {
                if let Some(main) = key.get(..8) {
                    let mut be = [0u8; 8];
                    be.copy_from_slice(main);
                    revision = revision.max(i64::from_be_bytes(be));
                }
            }
            Ok(())
        })?;

    // The same bytes, in the same order, as the Hash RPC feeds: buckets by name.
    let mut buckets = metastore_state_machine::buckets();
    buckets.sort_unstable();
    let mut crc = 0;
    for bucket in buckets {
        crc = crc32c::crc32c_append(crc, bucket.as_bytes());
        metastore_storage::snapshot_format::read_stream(&mut open()?, &mut |b, k, v| {
            if b == bucket && !crate::hash_ignores(b, &k) {
                crc = crc32c::crc32c_append(crc, &k);
                crc = crc32c::crc32c_append(crc, &v);
            }
            Ok(())
        })?;
    }
    Ok(SnapshotStatus {
        hash: crc,
        revision,
        total_keys,
        total_size_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_storage::{ScanRange, WriteBatch};
    use metastore_storage_mem::MemBackend;

    #[test]
    fn padding_aligns() {
        assert_eq!(padding_for(0), 0);
        assert_eq!(padding_for(1), 511);
        assert_eq!(padding_for(512), 0);
        assert_eq!(padding_for(513), 511);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_round_trips_through_a_file() {
        let buckets = metastore_state_machine::buckets();
        let source = Arc::new(MemBackend::new(&buckets));
        let mut batch = WriteBatch::new();
        for i in 0..5000u32 {
            batch.put("key", i.to_be_bytes().to_vec(), vec![b'v'; 100]);
        }
        batch.put("meta", b"m".to_vec(), b"1".to_vec());
        source.write(batch).unwrap();

        let mut rx = stream(source.clone(), buckets.clone(), "3.6.0");
        let mut messages = Vec::new();
        while let Some(msg) = rx.recv().await {
            messages.push(msg.expect("snapshot message"));
        }
        assert!(messages.len() > 3, "several chunks");
        let data: Vec<u8> = messages[..messages.len() - 1]
            .iter()
            .flat_map(|m| m.blob.clone())
            .collect();
        // Each message's remaining_bytes counts what follows it (the hash excluded).
        let mut seen = 0u64;
        for m in &messages[..messages.len() - 1] {
            seen += m.blob.len() as u64;
            assert!(m.blob.len() <= CHUNK_BYTES);
            assert_eq!(m.remaining_bytes, data.len() as u64 - seen);
        }
        let last = messages.last().unwrap();
        assert_eq!(last.blob.as_slice(), Sha256::digest(&data).as_slice());
        assert_eq!((data.len() as u64 + 32) % 512, 32);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.db");
        let mut file_bytes = data.clone();
        file_bytes.extend_from_slice(&last.blob);
        std::fs::write(&path, &file_bytes).unwrap();
        let target = MemBackend::new(&buckets);
        import_file(&target, &path).unwrap();
        for bucket in &buckets {
            assert_eq!(
                target
                    .snapshot()
                    .unwrap()
                    .collect(bucket, ScanRange::all())
                    .unwrap(),
                source
                    .snapshot()
                    .unwrap()
                    .collect(bucket, ScanRange::all())
                    .unwrap()
            );
        }

        let st = status(&path).unwrap();
        assert_eq!(st.hash, crate::backend_hash(&*source).unwrap());
        assert_eq!(st.total_keys, 5001);
        assert_eq!(st.total_size_bytes, file_bytes.len() as u64);

        // A flipped byte is caught by the trailing hash.
        file_bytes[10] ^= 1;
        std::fs::write(&path, &file_bytes).unwrap();
        assert!(matches!(
            verify_file(&path),
            Err(SnapshotFileError::HashMismatch)
        ));
    }
}
