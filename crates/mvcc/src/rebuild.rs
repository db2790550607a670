//! Rebuilding the key index when a store opens: every revision of the `key` bucket, in revision
//! order, replayed into an [`Index`] (etcd's `restore`/`restoreIntoIndex`).
//!
//! Two threads share the work, because neither half is small: the caller's thread walks the
//! bucket and decodes each stored `KeyValue` (on RocksDB that is reading and decompressing every
//! block, values included), and a builder thread replays what it read into the index. The
//! revisions go from one to the other in batches, their keys packed in one buffer, so a batch
//! costs no allocation per revision and used batches are handed back to be filled again. Both
//! threads see the revisions in the same order, so the index is the one a single pass builds.
//!
//! Profile that led here (10M keys of 16 bytes with 256-byte values on RocksDB, one member,
//! `perf`): the single-threaded rebuild took 12.2 s, the whole restart 12.6 s; about 38% of it
//! was the index (its B-tree's searches and key comparisons), the rest reading, decompressing
//! and decoding the bucket, with `prost` copying every value it did not need.

use std::collections::HashMap;
use std::sync::mpsc;

use metastore_storage::{ReadView, ScanRange, StorageError, Visit};

use crate::key_index::Index;
use crate::revision::Revision;
use crate::store::{bad_revision_key, MAX_REVISION};
use crate::{MvccError, KEY_BUCKET};

/// Revisions per batch: large enough that handing a batch over is rare, small enough that the
/// builder starts at once and the batches in flight stay a few hundred KiB.
const BATCH: usize = 4096;

/// Batches read ahead of the builder, at most.
const BATCHES_AHEAD: usize = 4;

/// What the key bucket held, replayed.
pub(crate) struct Rebuilt {
    pub index: Index,
    /// Live keys with a lease, and the lease (what the lessor's recovery needs).
    pub leased: HashMap<Vec<u8>, i64>,
    /// The main revision of the last revision stored (1 when none is).
    pub last_revision: i64,
    /// How many revisions were read.
    pub revisions: usize,
}

/// One stored revision, its key in the batch's buffer.
struct Record {
    /// Where the key ends in [`Batch::keys`] (it starts where the previous record's ends).
    key_end: usize,
    rev: Revision,
    tombstone: bool,
    created: i64,
    version: i64,
    lease: i64,
}

#[derive(Default)]
struct Batch {
    keys: Vec<u8>,
    records: Vec<Record>,
}

impl Batch {
    /// Decode one pair of the key bucket into the batch; returns its main revision.
    fn push(&mut self, k: &[u8], v: &[u8]) -> Result<i64, MvccError> {
        let (rev, tombstone) = Revision::from_key(k).ok_or_else(|| bad_revision_key(k))?;
        if !(0..=MAX_REVISION).contains(&rev.main) || rev.sub < 0 {
            return Err(MvccError::Corrupt(format!(
                "key bucket: revision {}_{} is out of range (0 to {MAX_REVISION})",
                rev.main, rev.sub
            )));
        }
        let fields = IndexFields::decode(v)?;
        self.keys.extend_from_slice(fields.key);
        self.records.push(Record {
            key_end: self.keys.len(),
            rev,
            tombstone,
            created: fields.create_revision,
            version: fields.version,
            lease: fields.lease,
        });
        Ok(rev.main)
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.records.clear();
    }
}

/// Replay every revision of `view`'s key bucket into a new index.
pub(crate) fn rebuild_index(view: &dyn ReadView) -> Result<Rebuilt, MvccError> {
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = mpsc::sync_channel::<Batch>(BATCHES_AHEAD);
        let (empty_tx, empty_rx) = mpsc::channel::<Batch>();
        let builder = std::thread::Builder::new()
            .name("mvcc-index-rebuild".into())
            .spawn_scoped(scope, move || build(full_rx, empty_tx))
            .map_err(StorageError::Io)?;

        let mut batch = Batch::default();
        let mut last_revision = 1;
        let mut failure = None;
        let scanned = view.scan(KEY_BUCKET, ScanRange::all(), &mut |k, v| {
            match batch.push(k, v) {
                Ok(main) => last_revision = main,
                Err(e) => {
                    failure = Some(e);
                    return Visit::Stop;
                }
            }
            if batch.records.len() == BATCH {
                let next = empty_rx.try_recv().unwrap_or_default();
                // The builder hung up: it met a revision it refuses, which it reports.
                if full_tx.send(std::mem::replace(&mut batch, next)).is_err() {
                    return Visit::Stop;
                }
            }
            Visit::Continue
        });
        // A builder that hung up has its error; the last batch then has nobody to go to.
        let _ = full_tx.send(batch);
        drop(full_tx);
        let (index, leased) = match builder.join() {
            Ok(built) => built?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        // The builder's error is about an earlier revision than the reader's failure.
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(Rebuilt {
            index,
            leased,
            last_revision,
            revisions: scanned?,
        })
    })
}

/// The builder's half: replay batches until the reader is done, keeping each live key's lease
/// (the bucket is read in revision order, so a key's last record decides).
fn build(
    full: mpsc::Receiver<Batch>,
    empty: mpsc::Sender<Batch>,
) -> Result<(Index, HashMap<Vec<u8>, i64>), MvccError> {
    let mut index = Index::default();
    let mut leased = HashMap::new();
    for mut batch in full {
        let mut start = 0;
        for r in &batch.records {
            let key = &batch.keys[start..r.key_end];
            start = r.key_end;
            index.restore(key, r.rev, r.tombstone, r.created, r.version)?;
            if r.tombstone || r.lease == 0 {
                if !leased.is_empty() {
                    leased.remove(key);
                }
            } else {
                leased.insert(key.to_vec(), r.lease);
            }
        }
        batch.clear();
        // The reader may be done and gone.
        let _ = empty.send(batch);
    }
    Ok((index, leased))
}

/// The fields of a stored `mvccpb.KeyValue` the index is rebuilt from, read in place: decoding
/// the whole message with `prost` copied every value only to drop it.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct IndexFields<'a> {
    pub key: &'a [u8],
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl<'a> IndexFields<'a> {
    /// Reads `bytes` as protobuf: refuses whatever `prost` refuses when decoding a `KeyValue`
    /// (truncation, a bad varint or tag, a field of `KeyValue` with another wire type), and also
    /// groups, which no `KeyValue` encoding holds.
    pub(crate) fn decode(mut bytes: &'a [u8]) -> Result<IndexFields<'a>, MvccError> {
        let mut fields = IndexFields::default();
        while !bytes.is_empty() {
            let tag = varint(&mut bytes)?;
            let (number, wire) = (tag >> 3, tag & 7);
            if number == 0 || tag > u64::from(u32::MAX) {
                return Err(undecodable("invalid tag"));
            }
            // KeyValue: 1 key (bytes), 2 create_revision, 3 mod_revision, 4 version (int64),
            // 5 value (bytes), 6 lease (int64).
            let expected = match number {
                1 | 5 => Some(2),
                2..=4 | 6 => Some(0),
                _ => None,
            };
            if expected.is_some_and(|e| e != wire) {
                return Err(undecodable("invalid wire type"));
            }
            match wire {
                0 => {
                    // int64 fields take the varint's bits as they are, as prost does.
                    let n = varint(&mut bytes)? as i64;
                    match number {
                        2 => fields.create_revision = n,
                        4 => fields.version = n,
                        6 => fields.lease = n,
                        _ => {}
                    }
                }
                2 => {
                    let len = usize::try_from(varint(&mut bytes)?)
                        .ok()
                        .filter(|len| *len <= bytes.len())
                        .ok_or_else(|| undecodable("buffer underflow"))?;
                    let (data, rest) = bytes.split_at(len);
                    if number == 1 {
                        fields.key = data;
                    }
                    bytes = rest;
                }
                1 | 5 => {
                    let len = if wire == 1 { 8 } else { 4 };
                    bytes = bytes
                        .get(len..)
                        .ok_or_else(|| undecodable("buffer underflow"))?;
                }
                _ => return Err(undecodable("invalid wire type")),
            }
        }
        Ok(fields)
    }
}

/// A protobuf varint: at most ten bytes, the tenth at most 1.
fn varint(bytes: &mut &[u8]) -> Result<u64, MvccError> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        if i == 9 && b > 1 {
            break;
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            *bytes = &bytes[i + 1..];
            return Ok(value);
        }
    }
    Err(undecodable("invalid varint"))
}

fn undecodable(what: &str) -> MvccError {
    MvccError::Corrupt(format!("undecodable KeyValue: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::mvccpb::KeyValue;
    use prost::Message;

    fn agrees_with_prost(bytes: &[u8]) {
        let ours = IndexFields::decode(bytes);
        match KeyValue::decode(bytes) {
            Ok(kv) => {
                let ours = ours.unwrap_or_else(|e| panic!("{bytes:02x?}: prost reads it, we: {e}"));
                assert_eq!(ours.key, kv.key.as_slice());
                assert_eq!(ours.create_revision, kv.create_revision);
                assert_eq!(ours.version, kv.version);
                assert_eq!(ours.lease, kv.lease);
            }
            // Groups are the one thing prost takes and we refuse; no test input holds one.
            Err(e) => assert!(
                ours.is_err(),
                "{bytes:02x?}: prost refuses it ({e}), we read {ours:?}"
            ),
        }
    }

    fn samples() -> Vec<KeyValue> {
        vec![
            KeyValue::default(),
            KeyValue {
                key: b"a".to_vec(),
                ..Default::default()
            },
            KeyValue {
                key: b"/registry/pods/default/web-0".to_vec(),
                create_revision: 5,
                mod_revision: 1 << 40,
                version: 3,
                value: vec![7; 300],
                lease: -1,
            },
            KeyValue {
                key: vec![0xff; 17],
                create_revision: i64::MAX,
                mod_revision: i64::MIN,
                version: 1,
                value: Default::default(),
                lease: 0x7fff_ffff_ffff,
            },
        ]
    }

    #[test]
    fn reads_what_prost_reads_and_refuses_what_it_refuses() {
        for kv in samples() {
            let bytes = kv.encode_to_vec();
            let fields = IndexFields::decode(&bytes).unwrap();
            assert_eq!(
                (
                    fields.key,
                    fields.create_revision,
                    fields.version,
                    fields.lease
                ),
                (kv.key.as_slice(), kv.create_revision, kv.version, kv.lease)
            );
            // Every truncation, and every byte changed to a few telling values.
            for end in 0..bytes.len() {
                agrees_with_prost(&bytes[..end]);
            }
            for i in 0..bytes.len() {
                for b in [
                    0x00, 0x01, 0x02, 0x05, 0x07, 0x08, 0x0a, 0x30, 0x7f, 0x80, 0xff,
                ] {
                    let mut changed = bytes.clone();
                    changed[i] = b;
                    agrees_with_prost(&changed);
                }
            }
        }
    }

    #[test]
    fn unknown_fields_are_skipped_and_repeated_ones_keep_the_last() {
        let mut bytes = KeyValue {
            key: b"first".to_vec(),
            version: 1,
            ..Default::default()
        }
        .encode_to_vec();
        // Field 9 as varint, 64-bit, length-delimited and 32-bit, then key and version again.
        bytes.extend_from_slice(&[0x48, 0x96, 0x01]);
        bytes.extend_from_slice(&[0x49, 1, 2, 3, 4, 5, 6, 7, 8]);
        bytes.extend_from_slice(&[0x4a, 2, 9, 9]);
        bytes.extend_from_slice(&[0x4d, 1, 2, 3, 4]);
        bytes.extend_from_slice(&[0x0a, 4, b'l', b'a', b's', b't', 0x20, 9]);
        agrees_with_prost(&bytes);
        let fields = IndexFields::decode(&bytes).unwrap();
        assert_eq!((fields.key, fields.version), (&b"last"[..], 9));
        // A ten-byte varint may end with 1, not more.
        assert_eq!(
            IndexFields::decode(&[
                0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ])
            .unwrap()
            .create_revision,
            -1
        );
        agrees_with_prost(&[
            0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
        ]);
        assert!(IndexFields::decode(&[
            0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02
        ])
        .is_err());
    }
}
