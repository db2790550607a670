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

//! The Snapshot RPC's stream, and reading snapshot files back.
//!
//! What the client receives (and `etcdctl snapshot save` writes to its file) is what etcd sends:
//! etcd's backend database, a bbolt file with etcd's buckets and encodings, followed by the
//! SHA-256 of its bytes. So `etcdctl snapshot status` and `snapshot restore` take it, and real etcd
//! serves the restored directory. MetaStore's buckets already hold etcd's encodings, except the
//! membership, which the file carries as etcd 3.4 writes it ([`ETCD_BUCKETS`]).
//!
//! The database is written on a blocking thread from one consistent backend view, twice: the
//! first pass ([`metastore_bbolt::plan`]) only lays the pages out, so the first message can carry
//! the metas (which name the root page and the page count) and every message an exact
//! `remaining_bytes`; the second ([`metastore_bbolt::emit`]) sends the pages, in order, through
//! a bounded channel. Memory stays a few messages plus the writer's pages being filled (about one
//! per tree level), whatever the data size.
//!
//! Files saved before issue 21 hold MetaStore's own format (`storage::snapshot_format` export,
//! zero padding to 512 bytes, SHA-256); [`import_file`] and [`status`] still read them.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use metastore_bbolt::etcd_schema;
use metastore_proto::etcdserverpb::SnapshotResponse;
use metastore_storage::{Backend, ReadView, ScanRange, StorageError, Visit};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::Status;

/// Bytes per streamed message (etcd's `snapshotSendBufferSize`).
pub const CHUNK_BYTES: usize = 32 * 1024;
/// The content plus padding of a file in MetaStore's own format is a multiple of this.
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
    /// An etcd file (bbolt database) that is damaged, or not etcd's backend.
    #[error(transparent)]
    Etcd(#[from] metastore_bbolt::Error),
}

/// Why a snapshot could not be streamed.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    File(#[from] metastore_bbolt::Error),
    #[error("undecodable record in bucket {bucket}: {reason}")]
    BadRecord {
        bucket: &'static str,
        reason: String,
    },
}

impl From<std::io::Error> for ExportError {
    fn from(e: std::io::Error) -> Self {
        Self::File(e.into())
    }
}

/// Where an etcd bucket's content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// MetaStore's bucket of the same name, whose encoding is etcd's: copied pair for pair.
    Same(&'static str),
    /// The membership table (id 8-byte big-endian → `metastorepb.Member`), as etcd's JSON
    /// keyed by hex id.
    Members,
    /// Removed member ids (8-byte big-endian), keyed by hex id.
    MembersRemoved,
    /// Nothing: etcd's `cluster` bucket, left without a `clusterVersion`, as etcd's is until
    /// its members agree on one. etcd 3.5+ takes a stored version as the cluster's and refuses
    /// to start below it: MetaStore's API level (3.6) would keep etcd 3.5 from serving the
    /// restored file, while without one every etcd decides it from its own members.
    Empty,
}

/// etcd 3.4's buckets in bbolt's order (by name), and where each one's content comes from.
const ETCD_BUCKETS: [(&str, Source); 10] = [
    ("alarm", Source::Same(metastore_alarm::ALARM_BUCKET)),
    ("auth", Source::Same(metastore_auth::AUTH_BUCKET)),
    ("authRoles", Source::Same(metastore_auth::AUTH_ROLES_BUCKET)),
    ("authUsers", Source::Same(metastore_auth::AUTH_USERS_BUCKET)),
    ("cluster", Source::Empty),
    ("key", Source::Same(metastore_mvcc::KEY_BUCKET)),
    ("lease", Source::Same(metastore_lease::LEASE_BUCKET)),
    ("members", Source::Members),
    ("members_removed", Source::MembersRemoved),
    ("meta", Source::Same(metastore_mvcc::META_BUCKET)),
];

/// Start streaming a consistent snapshot of `backend` (the state machine's buckets) as etcd's
/// database. As etcd 3.6's, the messages carry no header and every one names the storage
/// `version`; the receiver ends after the SHA-256 message, or after an error.
pub fn stream(
    backend: Arc<dyn Backend>,
    version: &'static str,
) -> mpsc::Receiver<Result<SnapshotResponse, Status>> {
    let (tx, rx) = mpsc::channel(CHANNEL_MESSAGES);
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        match export(&*backend, version, &tx) {
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

/// Zero bytes that pad `content_bytes` to a multiple of [`ALIGN_BYTES`] (MetaStore's own format).
#[cfg(test)]
fn padding_for(content_bytes: u64) -> u64 {
    (ALIGN_BYTES - content_bytes % ALIGN_BYTES) % ALIGN_BYTES
}

/// Puts every pair of MetaStore's `bucket` into the current bucket of `w`.
fn copy_bucket(
    view: &dyn ReadView,
    bucket: &str,
    w: &mut metastore_bbolt::Writer<&mut dyn Write>,
) -> Result<(), ExportError> {
    let mut failed = None;
    view.scan(bucket, ScanRange::all(), &mut |k, v| match w.put(k, v) {
        Ok(()) => Visit::Continue,
        Err(e) => {
            failed = Some(e);
            Visit::Stop
        }
    })?;
    failed.map_or(Ok(()), |e| Err(e.into()))
}

/// The pairs of a membership bucket, keyed by etcd's hex ids, in etcd's key order. Membership
/// tables are small: they are read whole.
fn member_pairs(
    view: &dyn ReadView,
    source: Source,
) -> Result<Vec<(String, Vec<u8>)>, ExportError> {
    let bucket = if source == Source::Members {
        metastore_state_machine::MEMBERS_BUCKET
    } else {
        metastore_state_machine::MEMBERS_REMOVED_BUCKET
    };
    let mut pairs = Vec::new();
    for (key, value) in view.collect(bucket, ScanRange::all())? {
        let bad = |reason: String| ExportError::BadRecord { bucket, reason };
        let id = <[u8; 8]>::try_from(key.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| bad(format!("a key of {} bytes is not a member id", key.len())))?;
        let value = if source == Source::Members {
            let m = metastore_proto::metastorepb::Member::decode(value.as_slice())
                .map_err(|e| bad(e.to_string()))?;
            etcd_schema::Member {
                id,
                peer_urls: &m.peer_urls,
                is_learner: m.is_learner,
                name: &m.name,
                client_urls: &m.client_urls,
            }
            .to_json()
        } else {
            etcd_schema::MEMBER_REMOVED_VALUE.to_vec()
        };
        pairs.push((etcd_schema::member_key(id), value));
    }
    pairs.sort_unstable();
    Ok(pairs)
}

/// Writes etcd's buckets from `view` (one pass of the two).
fn fill_etcd_buckets(
    view: &dyn ReadView,
    w: &mut metastore_bbolt::Writer<&mut dyn Write>,
) -> Result<(), ExportError> {
    for (name, source) in ETCD_BUCKETS {
        w.bucket(name.as_bytes())?;
        match source {
            Source::Same(bucket) => copy_bucket(view, bucket, w)?,
            Source::Members | Source::MembersRemoved => {
                for (key, value) in member_pairs(view, source)? {
                    w.put(key.as_bytes(), &value)?;
                }
            }
            Source::Empty => {}
        }
    }
    Ok(())
}

fn export(
    backend: &dyn Backend,
    version: &'static str,
    tx: &mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> Result<u64, ExportError> {
    let view: Arc<dyn ReadView> = backend.snapshot()?;
    let layout = metastore_bbolt::plan(metastore_bbolt::DEFAULT_PAGE_SIZE, |w| {
        fill_etcd_buckets(&*view, w)
    })?;
    let mut out = ChunkSender {
        tx,
        version,
        buf: Vec::with_capacity(CHUNK_BYTES),
        sha: Sha256::new(),
        total: layout.size_bytes(),
        sent: 0,
    };
    metastore_bbolt::emit(&mut out, layout, |w| fill_etcd_buckets(&*view, w))?;
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

/// Whether `file` is etcd's format (a bbolt database, as the Snapshot RPC sends now) rather than
/// MetaStore's own (files saved before issue 21).
pub fn is_etcd_file(file: &Path) -> Result<bool, SnapshotFileError> {
    let mut prefix = Vec::with_capacity(metastore_bbolt::DETECT_BYTES);
    File::open(file)?
        .take(metastore_bbolt::DETECT_BYTES as u64)
        .read_to_end(&mut prefix)?;
    Ok(metastore_bbolt::looks_like_bbolt(&prefix))
}

/// An etcd backend read as a MetaStore storage view: the buckets MetaStore shares with etcd
/// have the same names and encodings (revision keys and `mvccpb.KeyValue`, `leasepb.Lease`,
/// authpb users and roles, the meta keys), so such a bucket is copied pair for pair, but for
/// [`SOURCE_ONLY_META_KEYS`].
struct EtcdView(metastore_bbolt::Db<File>);

/// `meta` keys of etcd 3.5+ that describe the cluster the file came from, not its data: the raft
/// term of the applied index and the raft configuration (3.5), the schema version (3.6).
/// MetaStore keeps none of them (its raft state is its own), so an import leaves them out:
/// kept, they would name the old cluster's term and voters beside the new cluster's applied
/// index, and go out again in MetaStore's snapshots. etcd's restore writes its own term.
const SOURCE_ONLY_META_KEYS: [&[u8]; 3] = [
    etcd_schema::meta_key::TERM,
    etcd_schema::meta_key::CONF_STATE,
    etcd_schema::meta_key::STORAGE_VERSION,
];

impl EtcdView {
    fn pairs(
        &self,
        bucket: &str,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> Visit,
    ) -> metastore_storage::Result<usize> {
        let bad = |e: metastore_bbolt::Error| StorageError::BadSnapshot(e.to_string());
        let Some(b) = self.0.bucket(bucket.as_bytes()).map_err(bad)? else {
            return Ok(0);
        };
        let mut visited = 0;
        for entry in self.0.iter(&b) {
            let entry = entry.map_err(bad)?;
            if entry.is_bucket
                || (bucket.as_bytes() == etcd_schema::bucket::META
                    && SOURCE_ONLY_META_KEYS.contains(&entry.key.as_slice()))
            {
                continue;
            }
            visited += 1;
            if visit(&entry.key, &entry.value) == Visit::Stop {
                break;
            }
        }
        Ok(visited)
    }
}

impl ReadView for EtcdView {
    fn get(&self, bucket: &str, key: &[u8]) -> metastore_storage::Result<Option<Vec<u8>>> {
        let mut found = None;
        self.pairs(bucket, &mut |k, v| {
            if k == key {
                found = Some(v.to_vec());
                Visit::Stop
            } else {
                Visit::Continue
            }
        })?;
        Ok(found)
    }

    /// Only what an export needs: every pair, ascending.
    fn scan(
        &self,
        bucket: &str,
        range: ScanRange<'_>,
        visitor: &mut dyn FnMut(&[u8], &[u8]) -> Visit,
    ) -> metastore_storage::Result<usize> {
        let all = ScanRange::all();
        if range.start != all.start
            || range.end.is_some()
            || range.limit != 0
            || range.direction != all.direction
        {
            return Err(StorageError::BadSnapshot(
                "an etcd snapshot is read whole, in key order".into(),
            ));
        }
        self.pairs(bucket, visitor)
    }
}

/// Imports an etcd snapshot (saved from MetaStore or from etcd, or a copied `member/snap/db`
/// with `skip_hash_check`) into `backend`, replacing what it holds: the trailer checked as
/// etcdctl does, the database checked as bbolt's `tx.Check`, then every bucket MetaStore keeps
/// but the membership and alarms (which name the old cluster's members; a restore writes its
/// own), copied through MetaStore's snapshot stream (a temporary file in `scratch_dir`, so
/// memory stays flat).
pub fn import_etcd_file(
    backend: &dyn Backend,
    file: &Path,
    scratch_dir: &Path,
    skip_hash_check: bool,
) -> Result<(), SnapshotFileError> {
    let mut f = File::open(file)?;
    metastore_bbolt::trailer::verify(&mut f, skip_hash_check)?;
    let db = metastore_bbolt::Db::open(file)?;
    db.check()?;
    if !etcd_schema::is_etcd_backend(&db)? {
        return Err(metastore_bbolt::Error::NotEtcd(
            "a bbolt database, but not etcd's backend (no key and meta buckets)".into(),
        )
        .into());
    }
    etcd_schema::check_revisions(&db, &etcd_schema::read_meta(&db)?)?;
    let carried: Vec<&'static str> = metastore_state_machine::buckets()
        .into_iter()
        .filter(|b| {
            ![
                metastore_state_machine::MEMBERS_BUCKET,
                metastore_state_machine::MEMBERS_REMOVED_BUCKET,
                metastore_alarm::ALARM_BUCKET,
            ]
            .contains(b)
        })
        .collect();
    let stream_path = scratch_dir.join("etcd-import.tmp");
    let result = (|| -> Result<(), SnapshotFileError> {
        let mut out = std::io::BufWriter::new(File::create(&stream_path)?);
        metastore_storage::snapshot_format::write_stream(&EtcdView(db), &carried, &mut out)?;
        out.flush()?;
        drop(out);
        let mut input = BufReader::new(File::open(&stream_path)?);
        backend.import(&mut input)?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&stream_path);
    result
}

/// Check a file in MetaStore's own format: its size and trailing SHA-256; returns the length of
/// content + padding.
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

/// Verify a file in MetaStore's own format (saved before issue 21) and import its content into
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

/// Verify a file in MetaStore's own format and describe it, in constant memory (one pass per
/// bucket).
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
    use metastore_bbolt::etcd_schema::{KeyBucketKey, Revision};
    use metastore_proto::metastorepb::Member;
    use metastore_storage::WriteBatch;
    use metastore_storage_mem::MemBackend;

    #[test]
    fn padding_aligns() {
        assert_eq!(padding_for(0), 0);
        assert_eq!(padding_for(1), 511);
        assert_eq!(padding_for(512), 0);
        assert_eq!(padding_for(513), 511);
    }

    #[test]
    fn every_bucket_of_the_state_machine_goes_into_the_file_in_bbolts_order() {
        let mut exported: Vec<&str> = ETCD_BUCKETS
            .iter()
            .filter_map(|(_, source)| match source {
                Source::Same(b) => Some(*b),
                Source::Members => Some(metastore_state_machine::MEMBERS_BUCKET),
                Source::MembersRemoved => Some(metastore_state_machine::MEMBERS_REMOVED_BUCKET),
                Source::Empty => None,
            })
            .collect();
        exported.sort_unstable();
        let mut kept = metastore_state_machine::buckets();
        kept.sort_unstable();
        assert_eq!(exported, kept);
        let names: Vec<&str> = ETCD_BUCKETS.iter().map(|(n, _)| *n).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }

    /// A backend with history (a key bucket of 4000 revisions, values up to 9 KB so some
    /// span overflow pages, a tombstone), the meta marks, a lease, auth and two members.
    fn sample_backend() -> Arc<MemBackend> {
        let backend = Arc::new(MemBackend::new(&metastore_state_machine::buckets()));
        let mut batch = WriteBatch::new();
        for main in 2..4002i64 {
            let key = KeyBucketKey {
                revision: Revision { main, sub: 0 },
                tombstone: main == 4001,
            };
            let kv = metastore_proto::mvccpb::KeyValue {
                key: format!("k{}", main % 300).into_bytes(),
                value: vec![b'v'; (main as usize * 37) % 9000],
                mod_revision: main,
                ..Default::default()
            };
            batch.put("key", key.encode(), kv.encode_to_vec());
        }
        batch.put(
            "meta",
            b"consistent_index".to_vec(),
            77u64.to_be_bytes().to_vec(),
        );
        batch.put(
            "meta",
            b"finishedCompactRev".to_vec(),
            Revision { main: 5, sub: 0 }.to_bytes().to_vec(),
        );
        batch.put("lease", 9u64.to_be_bytes().to_vec(), vec![8, 9, 16, 60]);
        batch.put("auth", b"authEnabled".to_vec(), vec![1]);
        for (id, name) in [(0x10u64, "a"), (0xf, "")] {
            let member = Member {
                id,
                name: name.into(),
                peer_urls: vec![format!("http://127.0.0.1:{id}")],
                client_urls: vec![],
                is_learner: name.is_empty(),
            };
            batch.put("members", id.to_be_bytes().to_vec(), member.encode_to_vec());
        }
        batch.put("members_removed", 0x2au64.to_be_bytes().to_vec(), vec![]);
        backend.write(batch).unwrap();
        backend
    }

    /// Receives a whole stream: the database and the trailer message.
    async fn receive(backend: Arc<MemBackend>) -> (Vec<SnapshotResponse>, Vec<u8>) {
        let mut rx = stream(backend, "3.6.0");
        let mut messages = Vec::new();
        while let Some(msg) = rx.recv().await {
            messages.push(msg.expect("snapshot message"));
        }
        let db: Vec<u8> = messages[..messages.len() - 1]
            .iter()
            .flat_map(|m| m.blob.clone())
            .collect();
        (messages, db)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stream_is_etcds_database_and_its_sha256() {
        let source = sample_backend();
        let (messages, db) = receive(source.clone()).await;
        assert!(messages.len() > 3, "several chunks");
        // Each message's remaining_bytes counts what follows it (the hash excluded).
        let mut seen = 0u64;
        for m in &messages[..messages.len() - 1] {
            seen += m.blob.len() as u64;
            assert!(m.blob.len() <= CHUNK_BYTES);
            assert_eq!(m.remaining_bytes, db.len() as u64 - seen);
        }
        let last = messages.last().unwrap();
        assert_eq!(last.blob.as_slice(), Sha256::digest(&db).as_slice());

        let file = metastore_bbolt::Db::from_bytes(db.clone()).unwrap();
        file.check().unwrap();
        let names: Vec<Vec<u8>> = file
            .buckets()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let expected: Vec<Vec<u8>> = ETCD_BUCKETS
            .iter()
            .map(|(n, _)| n.as_bytes().to_vec())
            .collect();
        assert_eq!(names, expected);
        let pairs = |name: &str| -> Vec<(Vec<u8>, Vec<u8>)> {
            let b = file.bucket(name.as_bytes()).unwrap().unwrap();
            file.iter(&b)
                .map(|e| e.map(|e| (e.key, e.value)).unwrap())
                .collect()
        };
        let view = source.snapshot().unwrap();
        for bucket in ["key", "meta", "lease", "auth", "authUsers", "alarm"] {
            assert_eq!(
                pairs(bucket),
                view.collect(bucket, ScanRange::all()).unwrap(),
                "{bucket}"
            );
        }
        assert_eq!(pairs("key").len(), 4000);
        // etcd 3.4's membership: hex ids in string order, JSON values
        assert_eq!(
            pairs("members"),
            vec![
                (
                    b"10".to_vec(),
                    br#"{"id":16,"peerURLs":["http://127.0.0.1:16"],"name":"a"}"#.to_vec()
                ),
                (
                    b"f".to_vec(),
                    br#"{"id":15,"peerURLs":["http://127.0.0.1:15"],"isLearner":true}"#.to_vec()
                ),
            ]
        );
        assert_eq!(
            pairs("members_removed"),
            vec![(b"2a".to_vec(), b"removed".to_vec())]
        );
        assert_eq!(pairs("cluster"), vec![]);
        let status = metastore_bbolt::status::snapshot_status(&file).unwrap();
        assert_eq!(status.revision, 4001);
        assert_eq!(status.total_size, db.len() as u64);

        // The file imports back into a backend: what MetaStore restores from it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.db");
        let mut bytes = db.clone();
        bytes.extend_from_slice(&last.blob);
        std::fs::write(&path, &bytes).unwrap();
        assert!(is_etcd_file(&path).unwrap());
        let target = MemBackend::new(&metastore_state_machine::buckets());
        import_etcd_file(&target, &path, dir.path(), false).unwrap();
        let restored = target.snapshot().unwrap();
        for bucket in ["key", "meta", "lease", "auth"] {
            assert_eq!(
                restored.collect(bucket, ScanRange::all()).unwrap(),
                view.collect(bucket, ScanRange::all()).unwrap(),
                "{bucket}"
            );
        }

        // A flipped byte is caught by the trailer.
        bytes[5000] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = import_etcd_file(&target, &path, dir.path(), false).unwrap_err();
        assert!(err.to_string().starts_with("expected sha256 ["), "{err}");
    }

    /// etcd 3.5+ files carry the source cluster's raft term and configuration (and 3.6 its
    /// schema version) in `meta`; an import keeps the data's meta keys but not those.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_import_leaves_out_the_source_clusters_raft_meta_keys() {
        let source = sample_backend();
        let mut batch = WriteBatch::new();
        batch.put("meta", b"term".to_vec(), 9u64.to_be_bytes().to_vec());
        batch.put(
            "meta",
            b"confState".to_vec(),
            br#"{"voters":[13668033151171901709],"auto_leave":false}"#.to_vec(),
        );
        batch.put("meta", b"storageVersion".to_vec(), b"3.6".to_vec());
        source.write(batch).unwrap();
        let (messages, mut bytes) = receive(source).await;
        bytes.extend_from_slice(&messages.last().unwrap().blob);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.db");
        std::fs::write(&path, &bytes).unwrap();

        let target = MemBackend::new(&metastore_state_machine::buckets());
        import_etcd_file(&target, &path, dir.path(), false).unwrap();
        let meta_keys: Vec<Vec<u8>> = target
            .snapshot()
            .unwrap()
            .collect("meta", ScanRange::all())
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            meta_keys,
            vec![b"consistent_index".to_vec(), b"finishedCompactRev".to_vec()]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_state_streams_the_same_bytes_on_both_engines() {
        let mem = sample_backend();
        let dir = tempfile::tempdir().unwrap();
        let rocks = Arc::new(
            metastore_storage_rocks::RocksBackend::open(
                &dir.path().join("db"),
                &metastore_state_machine::buckets(),
            )
            .unwrap(),
        );
        let mut batch = WriteBatch::new();
        let view = mem.snapshot().unwrap();
        for bucket in metastore_state_machine::buckets() {
            for (k, v) in view.collect(bucket, ScanRange::all()).unwrap() {
                batch.put(bucket, k, v);
            }
        }
        rocks.write(batch).unwrap();
        let (_, from_mem) = receive(mem).await;
        let mut rx = stream(rocks, "3.6.0");
        let mut from_rocks = Vec::new();
        while let Some(msg) = rx.recv().await {
            from_rocks.push(msg.unwrap());
        }
        from_rocks.pop();
        let from_rocks: Vec<u8> = from_rocks.into_iter().flat_map(|m| m.blob).collect();
        assert!(from_mem == from_rocks, "same state, same file");
    }

    #[test]
    fn a_file_in_the_format_before_issue_21_still_imports() {
        let buckets = metastore_state_machine::buckets();
        let source = MemBackend::new(&buckets);
        let mut batch = WriteBatch::new();
        for i in 0..5000u32 {
            batch.put("key", i.to_be_bytes().to_vec(), vec![b'v'; 100]);
        }
        batch.put("meta", b"m".to_vec(), b"1".to_vec());
        source.write(batch).unwrap();
        let mut file_bytes = Vec::new();
        let content = metastore_storage::export_snapshot(
            &*source.snapshot().unwrap(),
            &buckets,
            &mut file_bytes,
        )
        .unwrap();
        file_bytes.resize((content + padding_for(content)) as usize, 0);
        let digest = Sha256::digest(&file_bytes);
        file_bytes.extend_from_slice(&digest);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        std::fs::write(&path, &file_bytes).unwrap();
        assert!(!is_etcd_file(&path).unwrap());
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
        assert_eq!(st.hash, crate::backend_hash(&source).unwrap());
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
