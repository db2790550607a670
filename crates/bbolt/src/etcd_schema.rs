//! etcd's backend schema: the buckets of its bbolt database and how keys and values are encoded
//! in them (etcd 3.4's `mvcc/backend`, `mvcc/kvstore.go`, `lease/lessor.go`, `auth/store.go`;
//! the same in 3.5+'s `server/storage/schema`).

use prost::Message;

use crate::{Db, Error, ReadAt};

pub use metastore_proto::authpb::{Role, User};
pub use metastore_proto::mvccpb::KeyValue;

/// Bucket names.
pub mod bucket {
    /// MVCC history: revision → marshalled `mvccpb.KeyValue`.
    pub const KEY: &[u8] = b"key";
    /// Backend metadata: consistent index, compaction marks (3.5+: term, confState, storage version).
    pub const META: &[u8] = b"meta";
    /// Leases: id (8 bytes big-endian) → marshalled `leasepb.Lease`.
    pub const LEASE: &[u8] = b"lease";
    /// Alarms: marshalled `etcdserverpb.AlarmMember` → empty.
    pub const ALARM: &[u8] = b"alarm";
    /// Members: id in hex → JSON of the member.
    pub const MEMBERS: &[u8] = b"members";
    /// Removed members: id in hex → `removed`.
    pub const MEMBERS_REMOVED: &[u8] = b"members_removed";
    /// Cluster: `clusterVersion` (3.5+: `downgrade`).
    pub const CLUSTER: &[u8] = b"cluster";
    /// Auth: `authEnabled`, `authRevision`.
    pub const AUTH: &[u8] = b"auth";
    /// Users: name → marshalled `authpb.User`.
    pub const AUTH_USERS: &[u8] = b"authUsers";
    /// Roles: name → marshalled `authpb.Role`.
    pub const AUTH_ROLES: &[u8] = b"authRoles";
}

/// Keys of the `meta` bucket.
pub mod meta_key {
    /// Raft index of the last entry applied to the backend: 8 bytes big-endian.
    pub const CONSISTENT_INDEX: &[u8] = b"consistent_index";
    /// Raft term of that entry (3.5+): 8 bytes big-endian.
    pub const TERM: &[u8] = b"term";
    /// Compaction revision proposed: a 17-byte revision (main, sub 0).
    pub const SCHEDULED_COMPACT_REV: &[u8] = b"scheduledCompactRev";
    /// Compaction revision completed: a 17-byte revision (main, sub 0).
    pub const FINISHED_COMPACT_REV: &[u8] = b"finishedCompactRev";
    /// Raft configuration (3.5+): JSON.
    pub const CONF_STATE: &[u8] = b"confState";
    /// Storage version (3.6+): a version string.
    pub const STORAGE_VERSION: &[u8] = b"storageVersion";
}

/// Keys of the `auth` bucket.
pub mod auth_key {
    /// Whether auth is enabled: one byte, 1 or 0.
    pub const ENABLED: &[u8] = b"authEnabled";
    /// The auth store's revision: 8 bytes big-endian.
    pub const REVISION: &[u8] = b"authRevision";
}

/// Key of the `cluster` bucket holding the cluster version (`3.4.0`).
pub const CLUSTER_VERSION_KEY: &[u8] = b"clusterVersion";

/// The key of a member in the `members` and `members_removed` buckets: its id in lowercase hex,
/// unpadded (etcd's `types.ID.String()`).
pub fn member_key(id: u64) -> String {
    format!("{id:x}")
}

/// The value of a member in the `members_removed` bucket.
pub const MEMBER_REMOVED_VALUE: &[u8] = b"removed";

/// A member as etcd 3.4 stores it in the `members` bucket (`membership.Member`, JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member<'a> {
    /// The member id.
    pub id: u64,
    /// Its peer URLs.
    pub peer_urls: &'a [String],
    /// Whether it is a learner (left out when false).
    pub is_learner: bool,
    /// Its name, once it has published it (left out when empty).
    pub name: &'a str,
    /// Its client URLs, once it has published them (left out when empty).
    pub client_urls: &'a [String],
}

impl Member<'_> {
    /// etcd's JSON: `{"id":…,"peerURLs":[…],"isLearner":true,"name":"…","clientURLs":[…]}`, the
    /// fields in Go's declaration order, the optional ones (`omitempty`) only when set.
    pub fn to_json(&self) -> Vec<u8> {
        let strings = |list: &[String]| serde_json::Value::from(list.to_vec()).to_string();
        let mut json = format!(
            "{{\"id\":{},\"peerURLs\":{}",
            self.id,
            strings(self.peer_urls)
        );
        if self.is_learner {
            json.push_str(",\"isLearner\":true");
        }
        if !self.name.is_empty() {
            json.push_str(",\"name\":");
            json.push_str(&serde_json::Value::from(self.name).to_string());
        }
        if !self.client_urls.is_empty() {
            json.push_str(",\"clientURLs\":");
            json.push_str(&strings(self.client_urls));
        }
        json.push('}');
        json.into_bytes()
    }
}

/// A lease as etcd stores it (`leasepb.Lease`, etcd's `server/lease/leasepb/lease.proto`).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Lease {
    /// The lease id.
    #[prost(int64, tag = "1")]
    pub id: i64,
    /// The granted TTL in seconds.
    #[prost(int64, tag = "2")]
    pub ttl: i64,
    /// The TTL left at the last checkpoint (3.5+ with lease checkpointing), else 0.
    #[prost(int64, tag = "3")]
    pub remaining_ttl: i64,
}

/// The key of a lease in the `lease` bucket.
pub fn lease_key(id: i64) -> [u8; 8] {
    (id as u64).to_be_bytes()
}

/// Size of an encoded revision.
pub const REVISION_SIZE: usize = 17;
/// The byte after a revision that marks a deletion in the `key` bucket.
pub const TOMBSTONE_MARK: u8 = b't';

/// An MVCC revision: the transaction's main revision and the change's index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    /// The store revision of the transaction.
    pub main: i64,
    /// The index of the change within the transaction.
    pub sub: i64,
}

impl Revision {
    /// `main` big-endian, `_`, `sub` big-endian: etcd's `revToBytes`. Byte order is revision order.
    pub fn to_bytes(self) -> [u8; REVISION_SIZE] {
        let mut b = [0u8; REVISION_SIZE];
        b[..8].copy_from_slice(&(self.main as u64).to_be_bytes());
        b[8] = b'_';
        b[9..].copy_from_slice(&(self.sub as u64).to_be_bytes());
        b
    }

    /// Decodes the first 17 bytes of `b` (etcd's `bytesToRev`), checking the separator.
    pub fn from_bytes(b: &[u8]) -> Result<Self, Error> {
        if b.len() < REVISION_SIZE || b[8] != b'_' {
            return Err(Error::NotEtcd(format!(
                "{} bytes are not a revision",
                b.len()
            )));
        }
        let main = u64::from_be_bytes(b[..8].try_into().unwrap_or_default()) as i64;
        let sub = u64::from_be_bytes(b[9..17].try_into().unwrap_or_default()) as i64;
        Ok(Self { main, sub })
    }
}

/// A key of the `key` bucket: a revision, with a mark when the change deleted the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyBucketKey {
    /// The revision of the change.
    pub revision: Revision,
    /// Whether the change is a deletion (its value holds only the key).
    pub tombstone: bool,
}

impl KeyBucketKey {
    /// The bucket key: 17 bytes, or 18 ending in `t` for a tombstone.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.revision.to_bytes().to_vec();
        if self.tombstone {
            b.push(TOMBSTONE_MARK);
        }
        b
    }

    /// Decodes a key of the `key` bucket.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let tombstone = match b.len() {
            REVISION_SIZE => false,
            18 if b[17] == TOMBSTONE_MARK => true,
            _ => {
                return Err(Error::NotEtcd(format!(
                    "key bucket key of {} bytes is not a revision",
                    b.len()
                )))
            }
        };
        Ok(Self {
            revision: Revision::from_bytes(b)?,
            tombstone,
        })
    }
}

/// Decodes an 8-byte big-endian integer (consistent index, term, auth revision).
pub fn decode_u64(b: &[u8]) -> Result<u64, Error> {
    let b: [u8; 8] = b
        .try_into()
        .map_err(|_| Error::NotEtcd(format!("{} bytes are not an 8-byte integer", b.len())))?;
    Ok(u64::from_be_bytes(b))
}

/// What the `meta` bucket of an etcd backend says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendMeta {
    /// `consistent_index`.
    pub consistent_index: Option<u64>,
    /// `term` (etcd 3.5+).
    pub term: Option<u64>,
    /// `scheduledCompactRev`: main revision.
    pub scheduled_compact_revision: Option<i64>,
    /// `finishedCompactRev`: main revision.
    pub finished_compact_revision: Option<i64>,
    /// `storageVersion` (etcd 3.6+).
    pub storage_version: Option<String>,
}

/// Whether `db` is an etcd backend: it has the `key` and `meta` buckets etcd's MVCC store creates
/// when it opens a backend.
pub fn is_etcd_backend<S: ReadAt>(db: &Db<S>) -> Result<bool, Error> {
    let names: Vec<Vec<u8>> = db.buckets()?.into_iter().map(|(n, _)| n).collect();
    Ok(names.iter().any(|n| n == bucket::KEY) && names.iter().any(|n| n == bucket::META))
}

/// Checks that the history above the compaction mark is whole: every main revision from the
/// mark (or 2, etcd's first write, without one) to the newest has at least one change in the
/// `key` bucket. A compaction removes revisions at or below its mark only, and every revision
/// is made by a change, so a gap above it is a damaged or truncated file. Returns the newest
/// main revision (0 for an empty history).
pub fn check_revisions<S: ReadAt>(db: &Db<S>, meta: &BackendMeta) -> Result<i64, Error> {
    let mark = meta
        .scheduled_compact_revision
        .into_iter()
        .chain(meta.finished_compact_revision)
        .max()
        .unwrap_or(0);
    let Some(keys) = db.bucket(bucket::KEY)? else {
        return Ok(0);
    };
    let mut last: Option<i64> = None;
    let mut last_above_mark: Option<i64> = None;
    for entry in db.iter(&keys) {
        let entry = entry?;
        let main = KeyBucketKey::decode(&entry.key)?.revision.main;
        if let Some(prev) = last {
            if main < prev {
                return Err(Error::NotEtcd(format!(
                    "key bucket out of order: revision {main} after {prev}"
                )));
            }
        }
        last = Some(main);
        if main <= mark || last_above_mark == Some(main) {
            continue;
        }
        let needed = last_above_mark.map_or((mark + 1).max(2), |prev| prev + 1);
        if main > needed {
            return Err(Error::NotEtcd(format!(
                "revision {needed} is missing from the key bucket (the next is {main}), above \
                 the compaction mark {mark}: the history is not whole"
            )));
        }
        last_above_mark = Some(main);
    }
    Ok(last.unwrap_or(0))
}

/// Reads and decodes the `meta` bucket.
pub fn read_meta<S: ReadAt>(db: &Db<S>) -> Result<BackendMeta, Error> {
    let meta_bucket = db
        .bucket(bucket::META)?
        .ok_or_else(|| Error::NotEtcd("no meta bucket".into()))?;
    let mut meta = BackendMeta::default();
    for entry in db.iter(&meta_bucket) {
        let entry = entry?;
        match entry.key.as_slice() {
            meta_key::CONSISTENT_INDEX => meta.consistent_index = Some(decode_u64(&entry.value)?),
            meta_key::TERM => meta.term = Some(decode_u64(&entry.value)?),
            meta_key::SCHEDULED_COMPACT_REV => {
                meta.scheduled_compact_revision = Some(Revision::from_bytes(&entry.value)?.main)
            }
            meta_key::FINISHED_COMPACT_REV => {
                meta.finished_compact_revision = Some(Revision::from_bytes(&entry.value)?.main)
            }
            meta_key::STORAGE_VERSION => {
                meta.storage_version = Some(String::from_utf8_lossy(&entry.value).into_owned())
            }
            _ => {}
        }
    }
    Ok(meta)
}

/// Decodes a value of the `key` bucket.
pub fn decode_key_value(value: &[u8]) -> Result<KeyValue, Error> {
    KeyValue::decode(value).map_err(|e| Error::NotEtcd(format!("key bucket value: {e}")))
}

/// Decodes a value of the `lease` bucket.
pub fn decode_lease(value: &[u8]) -> Result<Lease, Error> {
    Lease::decode(value).map_err(|e| Error::NotEtcd(format!("lease bucket value: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_encode_big_endian_with_a_separator_and_sort_as_bytes() {
        let r = Revision {
            main: 0x0102,
            sub: 3,
        };
        assert_eq!(
            r.to_bytes(),
            [0, 0, 0, 0, 0, 0, 1, 2, b'_', 0, 0, 0, 0, 0, 0, 0, 3]
        );
        assert_eq!(Revision::from_bytes(&r.to_bytes()).unwrap(), r);
        let later = Revision {
            main: 0x0103,
            sub: 0,
        };
        assert!(r.to_bytes() < later.to_bytes());
    }

    #[test]
    fn members_are_keyed_and_written_as_etcd_3_4_writes_them() {
        // Both from the `members` bucket of a snapshot etcd 3.4 saved.
        let peers = vec!["http://127.0.0.1:23801".to_string()];
        let clients = vec!["http://127.0.0.1:23791".to_string()];
        let started = Member {
            id: 13668033151171901709,
            peer_urls: &peers,
            is_learner: false,
            name: "default",
            client_urls: &clients,
        };
        assert_eq!(member_key(started.id), "bdae9bbc11dd390d");
        assert_eq!(
            String::from_utf8(started.to_json()).unwrap(),
            r#"{"id":13668033151171901709,"peerURLs":["http://127.0.0.1:23801"],"name":"default","clientURLs":["http://127.0.0.1:23791"]}"#
        );
        let unstarted = Member {
            id: 0x0aab,
            peer_urls: &peers,
            is_learner: true,
            name: "",
            client_urls: &[],
        };
        assert_eq!(member_key(unstarted.id), "aab");
        assert_eq!(
            String::from_utf8(unstarted.to_json()).unwrap(),
            r#"{"id":2731,"peerURLs":["http://127.0.0.1:23801"],"isLearner":true}"#
        );
    }

    #[test]
    fn tombstones_carry_a_trailing_t_and_other_lengths_are_refused() {
        let k = KeyBucketKey {
            revision: Revision { main: 9, sub: 0 },
            tombstone: true,
        };
        let b = k.encode();
        assert_eq!(b.len(), 18);
        assert_eq!(b[17], b't');
        assert_eq!(KeyBucketKey::decode(&b).unwrap(), k);
        assert!(KeyBucketKey::decode(&b[..16]).is_err());
        let mut wrong = b.clone();
        wrong[17] = b'x';
        assert!(KeyBucketKey::decode(&wrong).is_err());
    }
}
