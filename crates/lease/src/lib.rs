//! etcd's lease table.
//!
//! Owns: the leases (id → granted TTL, attached keys), their persistence in the backend bucket
//! [`LEASE_BUCKET`] (key: 8-byte big-endian lease id, value: etcd's `leasepb.Lease` encoding,
//! written in the same atomic batch as the rest of the applied entry), and the leader-side expiry
//! clock.
//!
//! The replicated part — which leases exist, their TTLs and attached keys — changes only through
//! [`Lessor::grant`], [`Lessor::remove`] and [`Lessor::apply_events`], called by the apply path in
//! log order: it is deterministic. Expiry deadlines are local and only kept while this member is
//! the primary (the raft leader, see [`Lessor::promote`]); the leader proposes a revoke for each
//! lease in [`Lessor::expired`], as etcd does. A newly promoted lessor restarts every lease's
//! countdown with the full TTL plus an extension, so a lease never expires early after a restart
//! or a leader change.
//!
//! Must not depend on: raft, gRPC, the storage engine choice.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use metastore_mvcc::LeaseLookup;
use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};
use metastore_storage::{ReadView, ScanRange, StorageError, Visit, WriteBatch};
use parking_lot::Mutex;
use prost::Message;

mod metrics;

/// Backend bucket holding one record per lease.
pub const LEASE_BUCKET: &str = "lease";
/// The largest TTL a lease may be granted with, in seconds (etcd's `MaxLeaseTTL`).
pub const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;

/// Errors of the lease table, with etcd's messages and codes.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// No lease with that id.
    #[error("etcdserver: requested lease not found")]
    NotFound,
    /// A grant names an id already in use.
    #[error("etcdserver: lease already exists")]
    Exists,
    /// A grant's TTL is above [`MAX_LEASE_TTL_SECS`].
    #[error("etcdserver: too large lease TTL")]
    TtlTooLarge,
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A lease record that cannot be decoded.
    #[error("lease: corrupt lease record: {0}")]
    Corrupt(String),
}

impl LeaseError {
    /// The numeric gRPC status code etcd answers with: NotFound (5), FailedPrecondition (9),
    /// OutOfRange (11), DataLoss (15), Internal (13).
    pub fn grpc_code(&self) -> i32 {
        match self {
            LeaseError::NotFound => 5,
            LeaseError::Exists => 9,
            LeaseError::TtlTooLarge => 11,
            LeaseError::Corrupt(_) => 15,
            LeaseError::Storage(_) => 13,
        }
    }
}

/// etcd's on-disk lease record (`leasepb.Lease`), so the bucket reads the same as etcd's.
#[derive(Clone, PartialEq, Message)]
struct LeaseRecord {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

struct Lease {
    ttl_secs: i64,
    keys: BTreeSet<Vec<u8>>,
    /// When the lease expires; `None` while this member is not the primary.
    expiry: Option<Instant>,
}

#[derive(Default)]
struct Table {
    leases: HashMap<i64, Lease>,
    /// The lease of every key that has one (etcd's `itemMap`): a put learns which lease a key
    /// leaves without reading the key's previous value.
    key_leases: HashMap<Vec<u8>, i64>,
    primary: bool,
}

/// What [`Lessor::time_to_live`] reports about a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseStatus {
    /// The TTL the lease was granted with, in seconds.
    pub granted_ttl_secs: i64,
    /// Seconds left (rounded up as etcd does); the granted TTL when this member is not primary.
    pub remaining_ttl_secs: i64,
    /// Keys attached to the lease, sorted.
    pub keys: Vec<Vec<u8>>,
}

/// The lease table shared by the apply path and the Lease service.
pub struct Lessor {
    min_ttl_secs: AtomicI64,
    table: Mutex<Table>,
}

impl Default for Lessor {
    fn default() -> Self {
        Lessor::new()
    }
}

/// When a countdown of `ttl_secs` started at `from` ends. The TTL is taken within
/// 1..=[`MAX_LEASE_TTL_SECS`] (see [`Lessor::recover`]), so no TTL overflows the clock.
fn deadline(from: Instant, ttl_secs: i64) -> Instant {
    let ttl = Duration::from_secs(ttl_secs.clamp(1, MAX_LEASE_TTL_SECS).unsigned_abs());
    from.checked_add(ttl)
        .unwrap_or_else(|| from + Duration::from_secs(365 * 24 * 3600))
}

fn lease_key(id: i64) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

impl Lessor {
    /// An empty table with a minimum TTL of 1 s.
    pub fn new() -> Self {
        Lessor {
            min_ttl_secs: AtomicI64::new(1),
            table: Mutex::new(Table::default()),
        }
    }

    /// Sets the minimum TTL a grant gets (etcd: 1.5 election timeouts, rounded up to seconds).
    /// Must be the same on every member, as it changes what grants apply.
    pub fn set_min_ttl_secs(&self, secs: i64) {
        self.min_ttl_secs.store(secs.max(1), Ordering::Relaxed);
    }

    /// The minimum TTL a grant gets.
    pub fn min_ttl_secs(&self) -> i64 {
        self.min_ttl_secs.load(Ordering::Relaxed)
    }

    /// Replaces the table with the leases stored in `view` and attaches `live_keys`
    /// (key, lease id) — the store's live keys, from which attachments are rebuilt.
    pub fn recover(
        &self,
        view: &dyn ReadView,
        live_keys: impl IntoIterator<Item = KeyValue>,
    ) -> Result<(), LeaseError> {
        let mut leases = HashMap::new();
        let mut failure = None;
        view.scan(LEASE_BUCKET, ScanRange::all(), &mut |_k, v| {
            match LeaseRecord::decode(v) {
                Ok(r) => {
                    // A grant never stores a TTL out of this range; a corrupt or forged record
                    // could, and must not stop leases from expiring.
                    let ttl_secs = r.ttl.clamp(1, MAX_LEASE_TTL_SECS);
                    if ttl_secs != r.ttl {
                        tracing::warn!(
                            lease_id = r.id,
                            ttl_secs = r.ttl,
                            "lease record with a TTL out of range; using {ttl_secs} s"
                        );
                    }
                    leases.insert(
                        r.id,
                        Lease {
                            ttl_secs,
                            keys: BTreeSet::new(),
                            expiry: None,
                        },
                    );
                }
                Err(e) => {
                    failure = Some(LeaseError::Corrupt(e.to_string()));
                    return Visit::Stop;
                }
            }
            Visit::Continue
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let mut key_leases = HashMap::new();
        for kv in live_keys {
            if let Some(l) = leases.get_mut(&kv.lease) {
                l.keys.insert(kv.key.clone());
                key_leases.insert(kv.key, kv.lease);
            }
        }
        let mut table = self.table.lock();
        let primary = table.primary;
        table.leases = leases;
        table.key_leases = key_leases;
        if primary {
            let now = Instant::now();
            for l in table.leases.values_mut() {
                l.expiry = Some(deadline(now, l.ttl_secs));
            }
        }
        Ok(())
    }

    /// Apply a grant: adds the lease and its record to `batch`. Returns the TTL granted (at least
    /// the minimum TTL).
    pub fn grant(&self, id: i64, ttl_secs: i64, batch: &mut WriteBatch) -> Result<i64, LeaseError> {
        if ttl_secs > MAX_LEASE_TTL_SECS {
            return Err(LeaseError::TtlTooLarge);
        }
        let mut table = self.table.lock();
        if id == 0 || table.leases.contains_key(&id) {
            return Err(LeaseError::Exists);
        }
        let ttl_secs = ttl_secs.max(self.min_ttl_secs());
        let record = LeaseRecord {
            id,
            ttl: ttl_secs,
            remaining_ttl: 0,
        };
        batch.put(LEASE_BUCKET, lease_key(id), record.encode_to_vec());
        let expiry = table.primary.then(|| deadline(Instant::now(), ttl_secs));
        table.leases.insert(
            id,
            Lease {
                ttl_secs,
                keys: BTreeSet::new(),
                expiry,
            },
        );
        metrics::granted(ttl_secs);
        Ok(ttl_secs)
    }

    /// The keys attached to lease `id`, sorted: what a revoke deletes.
    pub fn attached_keys(&self, id: i64) -> Result<Vec<Vec<u8>>, LeaseError> {
        let table = self.table.lock();
        let lease = table.leases.get(&id).ok_or(LeaseError::NotFound)?;
        Ok(lease.keys.iter().cloned().collect())
    }

    /// Apply a revoke, first half: adds the removal of the lease's record to `batch` and returns
    /// the attached keys (sorted), which the caller deletes in the same batch. The table is
    /// unchanged until [`Lessor::forget`], called once the batch is written.
    pub fn revoke(&self, id: i64, batch: &mut WriteBatch) -> Result<Vec<Vec<u8>>, LeaseError> {
        let keys = self.attached_keys(id)?;
        batch.delete(LEASE_BUCKET, lease_key(id));
        Ok(keys)
    }

    /// Apply a revoke, second half: the lease's removal is durable; drop it from the table.
    pub fn forget(&self, id: i64) {
        if self.table.lock().leases.remove(&id).is_some() {
            metrics::revoked();
        }
    }

    /// Follows applied changes: a key written with a lease is attached to it and detached from
    /// the lease it had before; a deleted key is detached. Events need not carry `prev_kv`.
    pub fn apply_events(&self, events: &[Event]) {
        let mut guard = self.table.lock();
        let table = &mut *guard;
        for event in events {
            let Some(kv) = &event.kv else { continue };
            let lease = if event.r#type == EventType::Put as i32 {
                kv.lease
            } else {
                0
            };
            let before = if lease != 0 {
                table.key_leases.insert(kv.key.clone(), lease)
            } else if table.key_leases.is_empty() {
                None
            } else {
                table.key_leases.remove(&kv.key)
            };
            if let Some(before) = before.filter(|b| *b != lease) {
                if let Some(l) = table.leases.get_mut(&before) {
                    l.keys.remove(&kv.key);
                }
            }
            if lease != 0 {
                if let Some(l) = table.leases.get_mut(&lease) {
                    l.keys.insert(kv.key.clone());
                }
            }
        }
    }

    /// Renews a lease's countdown (KeepAlive) and returns its TTL. Only the primary renews;
    /// an unknown or already expired lease is [`LeaseError::NotFound`].
    pub fn renew(&self, id: i64) -> Result<i64, LeaseError> {
        let mut table = self.table.lock();
        let primary = table.primary;
        let lease = table.leases.get_mut(&id).ok_or(LeaseError::NotFound)?;
        let now = Instant::now();
        if primary {
            if lease.expiry.is_some_and(|e| e <= now) {
                return Err(LeaseError::NotFound);
            }
            lease.expiry = Some(deadline(now, lease.ttl_secs));
        }
        // Counted also before this leader's lessor is promoted: the promotion then restarts
        // every countdown at the full TTL, so the renewal holds all the same.
        metrics::renewed();
        Ok(lease.ttl_secs)
    }

    /// A lease's TTLs and keys, or `None` when it does not exist.
    pub fn time_to_live(&self, id: i64) -> Option<LeaseStatus> {
        let table = self.table.lock();
        let lease = table.leases.get(&id)?;
        let remaining = match lease.expiry {
            Some(e) => {
                let left = e.saturating_duration_since(Instant::now());
                left.as_secs() as i64 + i64::from(left.subsec_nanos() > 0)
            }
            None => lease.ttl_secs,
        };
        Some(LeaseStatus {
            granted_ttl_secs: lease.ttl_secs,
            remaining_ttl_secs: remaining,
            keys: lease.keys.iter().cloned().collect(),
        })
    }

    /// Ids of every lease, sorted.
    pub fn leases(&self) -> Vec<i64> {
        let table = self.table.lock();
        let mut ids: Vec<i64> = table.leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Whether lease `id` exists.
    pub fn contains(&self, id: i64) -> bool {
        self.table.lock().leases.contains_key(&id)
    }

    /// This member became the leader: every lease's countdown restarts at its full TTL plus
    /// `extend` (etcd extends by the election timeout), so none expires early.
    pub fn promote(&self, extend: Duration) {
        let mut table = self.table.lock();
        table.primary = true;
        let now = Instant::now();
        for l in table.leases.values_mut() {
            l.expiry = Some(deadline(now + extend, l.ttl_secs));
        }
    }

    /// This member is no longer the leader: leases stop counting down here.
    pub fn demote(&self) {
        let mut table = self.table.lock();
        table.primary = false;
        for l in table.leases.values_mut() {
            l.expiry = None;
        }
    }

    /// Whether this lessor is the primary.
    pub fn is_primary(&self) -> bool {
        self.table.lock().primary
    }

    /// Up to `limit` leases whose deadline has passed, oldest first: the leader proposes a revoke
    /// for each.
    pub fn expired(&self, limit: usize) -> Vec<i64> {
        let table = self.table.lock();
        let now = Instant::now();
        let mut due: Vec<(Instant, i64)> = table
            .leases
            .iter()
            .filter_map(|(id, l)| l.expiry.filter(|e| *e <= now).map(|e| (e, *id)))
            .collect();
        due.sort_unstable();
        due.into_iter().take(limit).map(|(_, id)| id).collect()
    }
}

impl LeaseLookup for Lessor {
    fn exists(&self, lease_id: i64) -> bool {
        self.contains(lease_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_storage::Backend;
    use metastore_storage_mem::MemBackend;

    fn put_event(key: &[u8], lease: i64, prev_lease: Option<i64>) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: key.to_vec(),
                lease,
                ..Default::default()
            }),
            prev_kv: prev_lease.map(|lease| KeyValue {
                key: key.to_vec(),
                lease,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn grant_attach_revoke_and_recover() {
        let backend = MemBackend::new(&[LEASE_BUCKET]);
        let lessor = Lessor::new();
        lessor.set_min_ttl_secs(2);
        let mut batch = WriteBatch::new();
        assert_eq!(lessor.grant(7, 1, &mut batch).unwrap(), 2, "minimum TTL");
        assert_eq!(lessor.grant(8, 30, &mut batch).unwrap(), 30);
        backend.write(batch).unwrap();
        assert!(matches!(
            lessor.grant(7, 5, &mut WriteBatch::new()),
            Err(LeaseError::Exists)
        ));
        assert!(matches!(
            lessor.grant(9, MAX_LEASE_TTL_SECS + 1, &mut WriteBatch::new()),
            Err(LeaseError::TtlTooLarge)
        ));

        lessor.apply_events(&[put_event(b"a", 7, None), put_event(b"b", 7, None)]);
        lessor.apply_events(&[put_event(b"b", 8, Some(7))]);
        assert_eq!(lessor.attached_keys(7).unwrap(), vec![b"a".to_vec()]);
        assert_eq!(lessor.attached_keys(8).unwrap(), vec![b"b".to_vec()]);

        let mut batch = WriteBatch::new();
        assert_eq!(lessor.revoke(7, &mut batch).unwrap(), vec![b"a".to_vec()]);
        backend.write(batch).unwrap();
        lessor.forget(7);
        assert!(matches!(lessor.attached_keys(7), Err(LeaseError::NotFound)));

        let reopened = Lessor::new();
        let live = vec![KeyValue {
            key: b"b".to_vec(),
            lease: 8,
            ..Default::default()
        }];
        reopened
            .recover(&*backend.snapshot().unwrap(), live)
            .unwrap();
        assert_eq!(reopened.leases(), vec![8]);
        let status = reopened.time_to_live(8).unwrap();
        assert_eq!(status.granted_ttl_secs, 30);
        assert_eq!(status.keys, vec![b"b".to_vec()]);
    }

    impl Lessor {
        /// Moves every countdown `by` into the past, as if that much time went by.
        fn age_for_test(&self, by: Duration) {
            for l in self.table.lock().leases.values_mut() {
                l.expiry = l.expiry.map(|e| e - by);
            }
        }
    }

    /// A lease record with a negative (or absurd) TTL, as a corrupt or forged record could
    /// carry, is clamped when read: promotion, renewal and expiry never panic on it, and it
    /// still expires.
    #[test]
    fn records_with_out_of_range_ttls_never_panic() {
        let backend = MemBackend::new(&[LEASE_BUCKET]);
        let mut batch = WriteBatch::new();
        for (id, ttl) in [(1, -5), (2, i64::MIN), (3, i64::MAX), (4, 0)] {
            let record = LeaseRecord {
                id,
                ttl,
                remaining_ttl: 0,
            };
            batch.put(LEASE_BUCKET, lease_key(id), record.encode_to_vec());
        }
        backend.write(batch).unwrap();
        let lessor = Lessor::new();
        lessor.promote(Duration::ZERO);
        lessor
            .recover(&*backend.snapshot().unwrap(), Vec::new())
            .unwrap();
        lessor.demote();
        lessor.promote(Duration::ZERO);
        for id in 1..=4 {
            let ttl = lessor.renew(id).unwrap();
            assert!((1..=MAX_LEASE_TTL_SECS).contains(&ttl), "lease {id}: {ttl}");
            assert_eq!(lessor.time_to_live(id).unwrap().granted_ttl_secs, ttl);
        }
        assert_eq!(lessor.time_to_live(1).unwrap().granted_ttl_secs, 1);
        assert_eq!(
            lessor.time_to_live(3).unwrap().granted_ttl_secs,
            MAX_LEASE_TTL_SECS
        );
        // Leases still expire: a promotion that restarted countdowns long ago (as far as
        // the table can tell) leaves the short ones due.
        lessor.promote(Duration::ZERO);
        lessor.age_for_test(Duration::from_secs(2));
        assert_eq!(lessor.expired(10), vec![1, 2, 4]);
    }

    #[test]
    fn only_the_primary_expires_and_promotion_extends() {
        let lessor = Lessor::new();
        lessor.grant(1, 1, &mut WriteBatch::new()).unwrap();
        assert!(lessor.expired(10).is_empty(), "not primary: no countdown");
        lessor.promote(Duration::ZERO);
        assert_eq!(lessor.renew(1).unwrap(), 1);
        assert!(lessor.expired(10).is_empty());
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(lessor.expired(10), vec![1]);
        assert!(matches!(lessor.renew(1), Err(LeaseError::NotFound)));
        lessor.promote(Duration::from_secs(1));
        assert!(
            lessor.expired(10).is_empty(),
            "promotion restarts the countdown"
        );
        lessor.demote();
        assert_eq!(lessor.time_to_live(1).unwrap().remaining_ttl_secs, 1);
    }
}
