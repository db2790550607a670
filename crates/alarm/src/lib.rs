//! Alarms and the backend quota.
//!
//! Owns: the alarm table — which member raised which alarm (`NOSPACE`, `CORRUPT`) — kept in memory
//! and persisted in bucket [`ALARM_BUCKET`] exactly as etcd does (key: the marshalled
//! `AlarmMember`, empty value); the deterministic application of `AlarmRequest`s
//! ([`AlarmTable::apply`]); and the backend quota ([`Quota`]): etcd's request costs and the check
//! "backend size + cost < quota" made before proposing and again when applying.
//!
//! Must not depend on: raft, gRPC services, the engine choice (it sees an `Arc<dyn Backend>`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::alarm_request::AlarmAction;
use metastore_proto::etcdserverpb::{
    request_op, AlarmMember, AlarmRequest, AlarmResponse, AlarmType, PutRequest, TxnRequest,
};
use metastore_storage::{Backend, ReadView, ScanRange, StorageError, Visit, WriteBatch};
use parking_lot::{Mutex, RwLock};
use prost::Message;

/// Name of the bucket holding active alarms (etcd's `alarm` bucket).
pub const ALARM_BUCKET: &str = "alarm";

/// etcd's default `--quota-backend-bytes`: 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// What etcd charges a put on top of its key and value (`kvOverhead`).
const KV_OVERHEAD_BYTES: u64 = 256;
/// What etcd charges a lease grant (`leaseOverhead`).
const LEASE_OVERHEAD_BYTES: u64 = 64;

/// Errors of the alarm table.
#[derive(Debug, thiserror::Error)]
pub enum AlarmError {
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A key of the `alarm` bucket that is not a marshalled `AlarmMember`.
    #[error("alarm: corrupt entry in bucket {ALARM_BUCKET:?}: {0}")]
    Corrupt(String),
}

/// One active alarm: `(member_id, alarm type as etcd's enum number)`. Ordered, so listings are
/// deterministic.
type Entry = (u64, i32);

/// The active alarms of the cluster, shared between the apply thread (which changes it) and the
/// API (which reads it). Cheap to clone.
#[derive(Clone, Default)]
pub struct AlarmTable {
    active: Arc<RwLock<BTreeSet<Entry>>>,
}

impl std::fmt::Debug for AlarmTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.active.read().iter()).finish()
    }
}

fn member(entry: &Entry) -> AlarmMember {
    AlarmMember {
        member_id: entry.0,
        alarm: entry.1,
    }
}

fn entry_key(entry: &Entry) -> Vec<u8> {
    member(entry).encode_to_vec()
}

impl AlarmTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace the table's content with the alarms persisted in `view` (at start and after a
    /// snapshot restore).
    pub fn load(&self, view: &dyn ReadView) -> Result<(), AlarmError> {
        let mut loaded = BTreeSet::new();
        let mut failure = None;
        view.scan(
            ALARM_BUCKET,
            ScanRange::all(),
            &mut |k, _| match AlarmMember::decode(k) {
                Ok(m) => {
                    loaded.insert((m.member_id, m.alarm));
                    Visit::Continue
                }
                Err(e) => {
                    failure = Some(AlarmError::Corrupt(e.to_string()));
                    Visit::Stop
                }
            },
        )?;
        if let Some(e) = failure {
            return Err(e);
        }
        *self.active.write() = loaded;
        Ok(())
    }

    /// Active alarms of type `alarm` (every alarm for [`AlarmType::None`]), ordered by member
    /// then type.
    pub fn get(&self, alarm: AlarmType) -> Vec<AlarmMember> {
        self.active
            .read()
            .iter()
            .filter(|e| alarm == AlarmType::None || e.1 == alarm as i32)
            .map(member)
            .collect()
    }

    /// Whether any member has raised `alarm`.
    pub fn is_active(&self, alarm: AlarmType) -> bool {
        self.active.read().iter().any(|e| e.1 == alarm as i32)
    }

    /// Apply a committed `AlarmRequest` with etcd's semantics: GET lists the alarms of a type
    /// (all for NONE); ACTIVATE adds one (not NONE) and answers it, also when it was already
    /// active; DEACTIVATE removes one and answers it, or answers nothing when it was not active.
    ///
    /// The change is first handed to `persist` as a write batch on the alarm bucket (to be
    /// written atomically with the applied index); the in-memory table changes only when that
    /// succeeded. Deterministic: the same requests give the same table on every member.
    pub fn apply<E>(
        &self,
        req: &AlarmRequest,
        persist: impl FnOnce(WriteBatch) -> Result<(), E>,
    ) -> Result<AlarmResponse, E> {
        let mut resp = AlarmResponse::default();
        let entry = (req.member_id, req.alarm);
        let mut batch = WriteBatch::new();
        let mut change: Option<bool> = None;
        match AlarmAction::try_from(req.action) {
            Ok(AlarmAction::Get) => {
                let alarm = AlarmType::try_from(req.alarm).unwrap_or(AlarmType::None);
                resp.alarms = self.get(alarm);
            }
            Ok(AlarmAction::Activate) => {
                if req.alarm != AlarmType::None as i32 {
                    if !self.active.read().contains(&entry) {
                        batch.put(ALARM_BUCKET, entry_key(&entry), Vec::new());
                        change = Some(true);
                    }
                    resp.alarms.push(member(&entry));
                }
            }
            Ok(AlarmAction::Deactivate) => {
                if self.active.read().contains(&entry) {
                    batch.delete(ALARM_BUCKET, entry_key(&entry));
                    change = Some(false);
                    resp.alarms.push(member(&entry));
                }
            }
            // An action this version does not know changes nothing, as in etcd.
            Err(_) => {}
        }
        persist(batch)?;
        match change {
            Some(true) => {
                self.active.write().insert(entry);
            }
            Some(false) => {
                self.active.write().remove(&entry);
            }
            None => {}
        }
        Ok(resp)
    }
}

/// etcd's text form of an active alarm, as Status lists it in `errors`
/// (`memberID:<id> alarm:<TYPE> `).
pub fn alarm_text(m: &AlarmMember) -> String {
    let name = AlarmType::try_from(m.alarm)
        .map(|a| a.as_str_name().to_string())
        .unwrap_or_else(|_| m.alarm.to_string());
    format!("memberID:{} alarm:{} ", m.member_id, name)
}

/// How long a measured backend size answers quota checks. Reading RocksDB's size queries
/// several properties of every column family: once per write (at the API and again at apply)
/// showed in the write path, while the size moves little in a few milliseconds.
const SIZE_REFRESH: Duration = Duration::from_millis(20);

/// The backend space quota (`--quota-backend-bytes`). Cheap to clone; clones share the cached
/// backend size.
#[derive(Clone)]
pub struct Quota {
    backend: Arc<dyn Backend>,
    quota_bytes: u64,
    /// The last measured backend size and when it was measured.
    size: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl std::fmt::Debug for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quota")
            .field("quota_bytes", &self.quota_bytes)
            .finish()
    }
}

impl Quota {
    /// A quota of `quota_bytes` over `backend`; 0 means etcd's default of 2 GiB.
    pub fn new(backend: Arc<dyn Backend>, quota_bytes: u64) -> Self {
        let quota_bytes = if quota_bytes == 0 {
            DEFAULT_QUOTA_BYTES
        } else {
            quota_bytes
        };
        Quota {
            backend,
            quota_bytes,
            size: Arc::new(Mutex::new(None)),
        }
    }

    /// The quota in bytes (Status's `dbSizeQuota`).
    pub fn quota_bytes(&self) -> u64 {
        self.quota_bytes
    }

    /// Whether a request costing `cost_bytes` fits: requests that write nothing always pass,
    /// others pass while backend size + cost stays below the quota (etcd's
    /// `BackendQuota.Available`). A backend whose size cannot be read lets the request pass: the
    /// write itself will report the engine failure.
    pub fn available(&self, cost_bytes: u64) -> bool {
        if cost_bytes == 0 {
            return true;
        }
        match self.backend_size() {
            Some(size) => size.saturating_add(cost_bytes) < self.quota_bytes,
            None => true,
        }
    }

    /// The backend size, measured at most every [`SIZE_REFRESH`].
    fn backend_size(&self) -> Option<u64> {
        let mut cached = self.size.lock();
        if let Some((at, bytes)) = *cached {
            if at.elapsed() < SIZE_REFRESH {
                return Some(bytes);
            }
        }
        let bytes = self.backend.size().ok()?.size_bytes;
        *cached = Some((Instant::now(), bytes));
        Some(bytes)
    }
}

/// What etcd charges a put: key + value + 256 bytes.
pub fn put_cost(req: &PutRequest) -> u64 {
    KV_OVERHEAD_BYTES + req.key.len() as u64 + req.value.len() as u64
}

/// What etcd charges a txn: the puts of its more expensive branch (top level only, as etcd).
pub fn txn_cost(req: &TxnRequest) -> u64 {
    let branch = |ops: &[metastore_proto::etcdserverpb::RequestOp]| -> u64 {
        ops.iter()
            .map(|op| match &op.request {
                Some(request_op::Request::RequestPut(p)) => put_cost(p),
                _ => 0,
            })
            .sum()
    };
    branch(&req.success).max(branch(&req.failure))
}

/// What etcd charges a lease grant: 64 bytes.
pub fn lease_grant_cost() -> u64 {
    LEASE_OVERHEAD_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_storage_mem::MemBackend;

    fn request(action: AlarmAction, member_id: u64, alarm: AlarmType) -> AlarmRequest {
        AlarmRequest {
            action: action as i32,
            member_id,
            alarm: alarm as i32,
        }
    }

    fn apply(table: &AlarmTable, backend: &MemBackend, req: AlarmRequest) -> AlarmResponse {
        table
            .apply(&req, |b| backend.write(b))
            .expect("apply alarm")
    }

    #[test]
    fn activate_get_deactivate_like_etcd() {
        let backend = MemBackend::new(&[ALARM_BUCKET]);
        let table = AlarmTable::new();
        let nospace = request(AlarmAction::Activate, 7, AlarmType::Nospace);
        assert_eq!(apply(&table, &backend, nospace).alarms.len(), 1);
        // Activating again answers the alarm and changes nothing.
        assert_eq!(apply(&table, &backend, nospace).alarms.len(), 1);
        // NONE cannot be activated.
        let none = request(AlarmAction::Activate, 7, AlarmType::None);
        assert!(apply(&table, &backend, none).alarms.is_empty());
        apply(
            &table,
            &backend,
            request(AlarmAction::Activate, 3, AlarmType::Corrupt),
        );
        let all = apply(
            &table,
            &backend,
            request(AlarmAction::Get, 0, AlarmType::None),
        );
        assert_eq!(
            all.alarms
                .iter()
                .map(|m| (m.member_id, m.alarm))
                .collect::<Vec<_>>(),
            vec![(3, 2), (7, 1)]
        );
        assert!(table.is_active(AlarmType::Nospace));

        // The alarms survive a reload from the backend.
        let reloaded = AlarmTable::new();
        reloaded.load(&*backend.snapshot().unwrap()).unwrap();
        assert_eq!(reloaded.get(AlarmType::None), table.get(AlarmType::None));

        let off = request(AlarmAction::Deactivate, 7, AlarmType::Nospace);
        assert_eq!(apply(&table, &backend, off).alarms.len(), 1);
        assert!(apply(&table, &backend, off).alarms.is_empty());
        assert!(!table.is_active(AlarmType::Nospace));
        assert_eq!(table.get(AlarmType::Corrupt).len(), 1);
        reloaded.load(&*backend.snapshot().unwrap()).unwrap();
        assert_eq!(reloaded.get(AlarmType::None), table.get(AlarmType::None));
    }

    #[test]
    fn failed_persist_leaves_table_unchanged() {
        let table = AlarmTable::new();
        let req = request(AlarmAction::Activate, 1, AlarmType::Nospace);
        let res: Result<_, &str> = table.apply(&req, |_| Err("disk full"));
        assert!(res.is_err());
        assert!(!table.is_active(AlarmType::Nospace));
    }

    #[test]
    fn costs_and_quota_like_etcd() {
        let put = PutRequest {
            key: b"k".to_vec(),
            value: vec![0; 10],
            ..Default::default()
        };
        assert_eq!(put_cost(&put), 267);
        let op = |p: &PutRequest| metastore_proto::etcdserverpb::RequestOp {
            request: Some(request_op::Request::RequestPut(p.clone())),
        };
        let txn = TxnRequest {
            compare: vec![],
            success: vec![op(&put)],
            failure: vec![op(&put), op(&put)],
        };
        assert_eq!(txn_cost(&txn), 534);
        assert_eq!(txn_cost(&TxnRequest::default()), 0);

        let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&[ALARM_BUCKET]));
        assert_eq!(
            Quota::new(backend.clone(), 0).quota_bytes(),
            DEFAULT_QUOTA_BYTES
        );
        let quota = Quota::new(backend.clone(), 300);
        assert!(quota.available(0));
        assert!(quota.available(267));
        let mut batch = WriteBatch::new();
        batch.put(ALARM_BUCKET, vec![1; 50], vec![2; 50]);
        backend.write(batch).unwrap();
        // A quota measures the size at most every SIZE_REFRESH; a fresh one measures now.
        let quota = Quota::new(backend.clone(), 300);
        assert!(!quota.available(267));
        assert!(quota.available(0));
    }

    #[test]
    fn alarm_text_matches_etcd() {
        let m = AlarmMember {
            member_id: 42,
            alarm: AlarmType::Nospace as i32,
        };
        assert_eq!(alarm_text(&m), "memberID:42 alarm:NOSPACE ");
    }
}
