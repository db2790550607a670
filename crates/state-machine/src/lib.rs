//! The replicated state machine.
//!
//! Owns: decoding committed raft entries (`metastorepb::InternalRaftRequest`) and applying them
//! deterministically — no wall clock, no local randomness — to the mvcc store and the alarm table
//! (with etcd's apply-time refusals while an alarm is active and its apply-time quota check) and
//! the lease table (grants; revokes, which delete the attached keys in one revision; key
//! attachments, rebuilt from the key index on open); publishing every applied revision's events to
//! the watch hub; raft snapshots (export/import of the backend) and the applied index, which mvcc
//! persists atomically with every change it makes (etcd's `consistent_index`).
//!
//! Threads: raft-node calls [`KvStateMachine`] on its raft thread. Applying a Compaction there
//! only schedules it; the mvcc store's own compaction worker deletes the history in the
//! background, paced by [`KvStateMachine::with_compaction_config`]. A snapshot restore stops the
//! old store's worker before the backend's content is replaced, and the new store resumes a
//! compaction the snapshot recorded as unfinished.
//!
//! Exposes [`KvStateMachine`] (the `raft_node::StateMachine` implementation), [`StoreHandle`] (how
//! the read path reaches the current mvcc store, which a snapshot restore replaces) and
//! [`encode_request`].
//!
//! Must not depend on: gRPC services, the engine choice (it holds an `Arc<dyn Backend>`).

mod members;

use std::io::{Read, Write};
use std::sync::Arc;

pub use members::{MemberTable, MEMBERS_BUCKET, MEMBERS_REMOVED_BUCKET};

use metastore_alarm::{AlarmError, AlarmTable, Quota};
use metastore_auth::{AuthError, AuthInfo, AuthStore, Need};
use metastore_lease::{LeaseError, Lessor};
use metastore_mvcc::{Applied, CompactionConfig, MvccError, Store, WriteRequest};
use metastore_proto::etcdserverpb::alarm_request::AlarmAction;
use metastore_proto::etcdserverpb::{
    request_op, AlarmResponse, AlarmType, DeleteRangeRequest, LeaseGrantRequest, RequestOp,
    TxnRequest,
};
use metastore_proto::metastorepb::Member;
use metastore_proto::metastorepb::{
    internal_raft_request::Request, InternalRaftRequest, RequestHeader,
};
use metastore_proto::mvccpb::KeyValue;
use metastore_raft_node::{MembershipChange, PersistJob, StateMachine};
use metastore_storage::{Backend, StorageError, WriteBatch};
use metastore_watch::{StoreSource, WatchHub};
use parking_lot::RwLock;
use prost::Message;

/// Every bucket the server opens its backend with.
pub fn buckets() -> Vec<&'static str> {
    let mut buckets = metastore_mvcc::BUCKETS.to_vec();
    buckets.push(metastore_alarm::ALARM_BUCKET);
    buckets.push(metastore_lease::LEASE_BUCKET);
    buckets.push(MEMBERS_BUCKET);
    buckets.push(MEMBERS_REMOVED_BUCKET);
    buckets.extend(metastore_auth::BUCKETS);
    buckets
}

/// Prepares a backend that holds a restored snapshot to start a new cluster: replaces the
/// membership table with `members`, clears the alarms (they named the old cluster's members)
/// and records `applied_index` as the index the state corresponds to. Used by
/// `metastore snapshot restore`.
pub fn reset_for_restore(
    backend: Arc<dyn Backend>,
    members: &[Member],
    applied_index: u64,
) -> Result<(), MvccError> {
    let view = backend.snapshot()?;
    let mut batch = WriteBatch::new();
    for bucket in [
        MEMBERS_BUCKET,
        MEMBERS_REMOVED_BUCKET,
        metastore_alarm::ALARM_BUCKET,
    ] {
        for (key, _) in view.collect(bucket, metastore_storage::ScanRange::all())? {
            batch.delete(bucket, key);
        }
    }
    for member in members {
        batch.put(
            MEMBERS_BUCKET,
            member.id.to_be_bytes().to_vec(),
            member.encode_to_vec(),
        );
    }
    let store = Store::open(backend)?;
    store.record_applied(applied_index, batch)
}

/// Why a committed entry produced no result. Deterministic: every member gets the same one.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The request was refused by mvcc (compacted revision, unknown lease, …).
    #[error(transparent)]
    Mvcc(#[from] MvccError),
    /// The entry is not a request this version understands.
    #[error("etcdserver: unsupported request in raft entry: {0}")]
    Unsupported(String),
    /// A write refused because the NOSPACE alarm is active, or a put/txn applied past the
    /// backend quota (etcd applies it and still answers this error).
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// A request refused because the CORRUPT alarm is active.
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    /// The alarm table could not be changed.
    #[error(transparent)]
    Alarm(#[from] AlarmError),
    /// A lease grant or revoke was refused (unknown lease, id in use, TTL too large).
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// Raft refused a membership change (e.g. another change is still in progress).
    #[error("etcdserver: membership change refused: {0}")]
    MembershipRefused(String),
    /// A member-update request named a member that is not in the cluster.
    #[error("etcdserver: member not found")]
    MemberNotFound,
    /// The auth store refused the request (permissions as of this log position, or an auth
    /// management rule).
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// The result of an applied entry, by kind of request.
#[derive(Debug)]
pub enum Output {
    /// A KV write (Put, DeleteRange, Txn, Compaction).
    Kv(Applied),
    /// An alarm request.
    Alarm(AlarmResponse),
    /// A lease grant: the TTL granted (at least the minimum TTL).
    LeaseGrant {
        /// The lease id.
        id: i64,
        /// The TTL granted, in seconds.
        ttl_secs: i64,
    },
    /// A lease revoke; its attached keys were deleted at `revision`.
    LeaseRevoke {
        /// The store revision after the revoke.
        revision: i64,
    },
    /// A membership change or member update: the members afterwards.
    Members(Vec<Member>),
    /// An auth management change; the auth revision afterwards.
    Auth {
        /// The auth revision after the change.
        revision: u64,
    },
    /// An applied Authenticate: the simple token issued (none for JWT, which the receiving
    /// member signs) and the auth revision.
    Authenticated {
        /// The simple token, when one was asked for.
        token: Option<String>,
        /// The auth revision the token is valid for.
        revision: u64,
    },
}

/// What applying one entry gives its proposer.
pub type ApplyOutput = Result<Output, ApplyError>;

/// Encode a request the server issues itself (lease expiry, alarms, publish) as the payload of
/// a raft entry: not subject to permissions.
pub fn encode_request(request: Request) -> Vec<u8> {
    InternalRaftRequest {
        header: Some(RequestHeader {
            internal: true,
            ..Default::default()
        }),
        request: Some(request),
    }
    .encode_to_vec()
}

/// Encode a client's request, made by `who`, as the payload of a raft entry: the apply step
/// checks its permissions again as of its log position.
pub fn encode_request_as(request: Request, who: &AuthInfo) -> Vec<u8> {
    InternalRaftRequest {
        header: Some(RequestHeader {
            username: who.username.clone(),
            auth_revision: who.revision,
            ..Default::default()
        }),
        request: Some(request),
    }
    .encode_to_vec()
}

/// Shared access to the current mvcc store. A snapshot restore swaps in a new store; readers
/// always get a complete one.
#[derive(Clone)]
pub struct StoreHandle(Arc<RwLock<Arc<Store>>>);

impl StoreHandle {
    /// Wrap an opened store.
    pub fn new(store: Store) -> Self {
        StoreHandle(Arc::new(RwLock::new(Arc::new(store))))
    }
    /// The store to read from now.
    pub fn current(&self) -> Arc<Store> {
        self.0.read().clone()
    }
    fn replace(&self, store: Store) {
        *self.0.write() = Arc::new(store);
    }
}

/// The state machine that raft-node drives.
pub struct KvStateMachine {
    backend: Arc<dyn Backend>,
    store: StoreHandle,
    alarms: AlarmTable,
    quota: Quota,
    lessor: Arc<Lessor>,
    watch: Arc<WatchHub>,
    members: MemberTable,
    auth: AuthStore,
    compaction: CompactionConfig,
}

impl StoreSource for StoreHandle {
    fn store(&self) -> Arc<Store> {
        self.current()
    }
}

/// Rebuilds the lease table from the backend and the store's live keys (attachments are not
/// stored separately: each key's `lease` field says it). The store found the leased keys while
/// it rebuilt its index ([`Store::take_leased_keys`]), so no key is read twice.
fn recover_leases(lessor: &Lessor, backend: &dyn Backend, store: &Store) -> Result<(), MvccError> {
    let keys = store
        .take_leased_keys()
        .into_iter()
        .map(|(key, lease)| KeyValue {
            key,
            lease,
            ..Default::default()
        });
    lessor
        .recover(&*backend.snapshot()?, keys)
        .map_err(|e| MvccError::Corrupt(e.to_string()))
}

impl KvStateMachine {
    /// Open the mvcc store on `backend` (which must hold [`buckets`]).
    pub fn open(backend: Arc<dyn Backend>) -> Result<Self, MvccError> {
        let store = Store::open(backend.clone())?;
        let alarms = AlarmTable::new();
        alarms
            .load(&*backend.snapshot()?)
            .map_err(|e| MvccError::Corrupt(e.to_string()))?;
        let lessor = Arc::new(Lessor::new());
        recover_leases(&lessor, &*backend, &store)?;
        let members = MemberTable::default();
        members
            .load(&*backend.snapshot()?)
            .map_err(|e| MvccError::Corrupt(e.to_string()))?;
        let auth = AuthStore::new();
        auth.load(&*backend.snapshot()?)
            .map_err(|e| MvccError::Corrupt(e.to_string()))?;
        let store = StoreHandle::new(store);
        Ok(KvStateMachine {
            auth,
            quota: Quota::new(backend.clone(), 0),
            backend,
            watch: WatchHub::new(Arc::new(store.clone())),
            store,
            alarms,
            lessor,
            members,
            compaction: CompactionConfig::default(),
        })
    }

    /// Pace background compaction by `config` (etcd's `--experimental-compaction-batch-limit`
    /// and `--experimental-compaction-sleep-interval`), for this store and those that snapshot
    /// restores open later.
    pub fn with_compaction_config(mut self, config: CompactionConfig) -> Self {
        self.compaction = config;
        self.store.current().set_compaction_config(config);
        self
    }

    /// The membership table this state machine maintains.
    pub fn members(&self) -> MemberTable {
        self.members.clone()
    }

    /// The auth store this state machine maintains (the API checks callers against it).
    pub fn auth(&self) -> AuthStore {
        self.auth.clone()
    }

    /// Use `quota_bytes` (`--quota-backend-bytes`; 0 = etcd's default 2 GiB) for the
    /// apply-time quota check.
    pub fn with_quota_bytes(mut self, quota_bytes: u64) -> Self {
        self.quota = Quota::new(self.backend.clone(), quota_bytes);
        self
    }

    /// The alarm table this state machine maintains (for the API's reads).
    pub fn alarms(&self) -> AlarmTable {
        self.alarms.clone()
    }

    /// The handle the read path uses.
    pub fn store(&self) -> StoreHandle {
        self.store.clone()
    }

    /// The lease table this state machine maintains (the Lease service reads and renews it).
    pub fn lessor(&self) -> Arc<Lessor> {
        self.lessor.clone()
    }

    /// The watchers, fed with every applied revision's events.
    pub fn watch_hub(&self) -> Arc<WatchHub> {
        self.watch.clone()
    }

    fn apply_lease_grant(&self, index: u64, store: &Store, r: &LeaseGrantRequest) -> ApplyOutput {
        if self.alarms.is_active(AlarmType::Nospace) {
            return Err(ApplyError::NoSpace);
        }
        let mut batch = WriteBatch::new();
        let ttl_secs = self.lessor.grant(r.id, r.ttl, &mut batch)?;
        store.record_applied(index, batch)?;
        Ok(Output::LeaseGrant { id: r.id, ttl_secs })
    }

    /// A revoke deletes every attached key in one revision (one txn), as etcd does.
    fn apply_lease_revoke(&self, index: u64, store: &Store, lease_id: i64) -> ApplyOutput {
        let mut batch = WriteBatch::new();
        let keys = self.lessor.revoke(lease_id, &mut batch)?;
        if keys.is_empty() {
            store.record_applied(index, batch)?;
            self.lessor.forget(lease_id);
            return Ok(Output::LeaseRevoke {
                revision: store.current_revision(),
            });
        }
        let deletes = keys
            .into_iter()
            .map(|key| RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key,
                        ..Default::default()
                    },
                )),
            })
            .collect();
        let txn = WriteRequest::Txn(TxnRequest {
            success: deletes,
            ..Default::default()
        });
        let applied = store.apply_write(txn, &*self.lessor, index, batch)?;
        self.lessor.forget(lease_id);
        self.publish(&applied);
        Ok(Output::LeaseRevoke {
            revision: applied.revision,
        })
    }

    /// Keeps lease attachments in step with the key space and hands the events to watchers.
    fn publish(&self, applied: &Applied) {
        self.lessor.apply_events(&applied.events);
        // The dispatcher is woken once per applied batch (`applied_batch`).
        self.watch.queue(applied.revision, &applied.events);
    }

    /// etcd's auth applier: a client's request is checked against the auth store as of this
    /// log position (the same on every member), with the user and auth revision the proposing
    /// member established.
    fn check_auth(&self, header: &RequestHeader, request: &Request) -> Result<(), ApplyError> {
        if header.internal || !self.auth.is_enabled() {
            return Ok(());
        }
        let who = AuthInfo {
            username: header.username.clone(),
            revision: header.auth_revision,
        };
        let keys;
        let needs: Vec<Need<'_>> = match request {
            Request::Put(r) => {
                // etcd's checkLeasePuts: attaching a lease needs write permission on the keys
                // it already holds (whoever may not write them could not revoke it).
                keys = self.lessor.attached_keys(r.lease).unwrap_or_default();
                let mut needs = metastore_auth::needs::put(r);
                needs.extend(keys.iter().map(|k| Need::Write(k, &[])));
                needs
            }
            Request::DeleteRange(r) => metastore_auth::needs::delete_range(r),
            Request::Txn(r) => metastore_auth::needs::txn(r),
            Request::LeaseGrant(_) => vec![Need::Authenticated],
            Request::Alarm(r) if r.action == AlarmAction::Get as i32 => vec![Need::Authenticated],
            Request::LeaseRevoke(r) => {
                keys = self.lessor.attached_keys(r.id).unwrap_or_default();
                keys.iter().map(|k| Need::Write(k, &[])).collect()
            }
            // Checked with the password by the receiving member; the user must still exist.
            Request::Authenticate(_) => return Ok(()),
            _ => vec![Need::Admin],
        };
        self.auth.check(&who, &needs)?;
        Ok(())
    }

    fn apply_auth(&self, index: u64, store: &Store, request: &Request) -> Option<ApplyOutput> {
        let auth = &self.auth;
        let mut batch = WriteBatch::new();
        let result = match request {
            Request::Authenticate(r) => {
                // Issuing a token changes nothing durable, but the entry is applied all the
                // same: the applied index must cover it, or a snapshot in place taken at this
                // index would not count as covered on restart.
                let issued = auth.apply_authenticate(&r.name, &r.simple_token_prefix, index);
                return Some(match issued {
                    Ok((token, revision)) => store
                        .record_applied(index, batch)
                        .map(|()| Output::Authenticated { token, revision })
                        .map_err(ApplyError::from),
                    Err(e) => Err(e.into()),
                });
            }
            Request::AuthEnable(_) => auth.apply_enable(&mut batch),
            Request::AuthDisable(_) => auth.apply_disable(&mut batch),
            Request::UserAdd(r) => auth.apply_user_add(r, &mut batch),
            Request::UserDelete(r) => auth.apply_user_delete(&r.name, &mut batch),
            Request::UserChangePassword(r) => {
                auth.apply_user_change_password(&r.name, &r.hashed_password, &mut batch)
            }
            Request::UserGrantRole(r) => auth.apply_user_grant_role(&r.user, &r.role, &mut batch),
            Request::UserRevokeRole(r) => auth.apply_user_revoke_role(&r.name, &r.role, &mut batch),
            Request::RoleAdd(r) => auth.apply_role_add(&r.name, &mut batch),
            Request::RoleDelete(r) => auth.apply_role_delete(&r.role, &mut batch),
            Request::RoleGrantPermission(r) => auth.apply_role_grant_permission(r, &mut batch),
            Request::RoleRevokePermission(r) => auth.apply_role_revoke_permission(r, &mut batch),
            _ => return None,
        };
        Some(match result {
            Ok(()) => match store.record_applied(index, batch) {
                Ok(()) => Ok(Output::Auth {
                    revision: auth.revision(),
                }),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        })
    }

    fn apply_request(
        &mut self,
        index: u64,
        header: RequestHeader,
        request: Request,
    ) -> ApplyOutput {
        self.check_auth(&header, &request)?;
        let store = self.store.current();
        if let Some(output) = self.apply_auth(index, &store, &request) {
            return output;
        }
        match &request {
            Request::Alarm(r) => {
                let resp = self
                    .alarms
                    .apply(r, |batch| store.record_applied(index, batch))?;
                let alarm = AlarmType::try_from(r.alarm)
                    .map(|a| a.as_str_name())
                    .unwrap_or("UNKNOWN");
                let member_id = format!("{:x}", r.member_id);
                if r.action == AlarmAction::Activate as i32 {
                    tracing::warn!(member_id, alarm, "alarm raised");
                } else if r.action == AlarmAction::Deactivate as i32 {
                    tracing::info!(member_id, alarm, "alarm cleared");
                }
                return Ok(Output::Alarm(resp));
            }
            Request::MemberAttributes(r) => {
                let mut batch = WriteBatch::new();
                self.members
                    .publish(r.id, &r.name, &r.client_urls, &mut batch);
                store.record_applied(index, batch)?;
                return Ok(Output::Members(self.members.list()));
            }
            Request::MemberPeerUrls(r) => {
                let mut batch = WriteBatch::new();
                if !self
                    .members
                    .update_peer_urls(r.id, &r.peer_urls, &mut batch)
                {
                    return Err(ApplyError::MemberNotFound);
                }
                store.record_applied(index, batch)?;
                return Ok(Output::Members(self.members.list()));
            }
            _ => {}
        }
        // etcd's corrupt and capped appliers: decided from the replicated alarm table only.
        let cost = match &request {
            Request::Put(r) => metastore_alarm::put_cost(r),
            Request::Txn(r) => metastore_alarm::txn_cost(r),
            _ => 0,
        };
        if self.alarms.is_active(AlarmType::Corrupt) {
            return Err(ApplyError::Corrupt);
        }
        if cost > 0 && self.alarms.is_active(AlarmType::Nospace) {
            return Err(ApplyError::NoSpace);
        }
        match &request {
            Request::LeaseGrant(r) => return self.apply_lease_grant(index, &store, r),
            Request::LeaseRevoke(r) => return self.apply_lease_revoke(index, &store, r.id),
            _ => {}
        }
        // etcd's quota applier: checked before applying, reported after.
        let fits = self.quota.available(cost);
        let write = match request {
            Request::Put(r) => WriteRequest::Put(r),
            Request::DeleteRange(r) => WriteRequest::DeleteRange(r),
            Request::Txn(r) => WriteRequest::Txn(r),
            Request::Compaction(r) => WriteRequest::Compact(r),
            other => return Err(ApplyError::Unsupported(format!("{other:?}"))),
        };
        let applied = store.apply_write(write, &*self.lessor, index, Default::default())?;
        self.publish(&applied);
        if !fits {
            return Err(ApplyError::NoSpace);
        }
        Ok(Output::Kv(applied))
    }
}

impl StateMachine for KvStateMachine {
    type Output = ApplyOutput;

    fn applied_index(&self) -> u64 {
        self.store.current().consistent_index()
    }

    fn apply(&mut self, index: u64, _term: u64, payload: &[u8]) -> ApplyOutput {
        let result = match InternalRaftRequest::decode(payload) {
            Ok(InternalRaftRequest {
                request: Some(request),
                header,
            }) => self.apply_request(index, header.unwrap_or_default(), request),
            Ok(_) => Err(ApplyError::Unsupported("empty request".into())),
            Err(e) => Err(ApplyError::Unsupported(format!("undecodable entry: {e}"))),
        };
        if result.is_err() {
            // A refused request changes no state, but the entry is applied all the same.
            if let Err(e) = self
                .store
                .current()
                .record_applied(index, Default::default())
            {
                tracing::error!(index, error = %e, "persisting the applied index failed");
            }
        }
        result
    }

    fn applied_batch(&mut self) {
        self.watch.wake();
    }

    fn recovered(&mut self, last_index: u64) {
        // Tokens issued by a previous run die with it (the Authenticate entries it applied are
        // replayed by the memory engine, but their tokens were for that run's clients).
        self.auth.simple_tokens().skip_until(last_index);
    }

    fn apply_noop(&mut self, index: u64, _term: u64) {
        // The applied index must cover the no-op (a new leader's first entry): raft-node takes a
        // snapshot in place at its applied index and, on restart, counts it only if the
        // engine's applied index reaches it.
        if let Err(e) = self
            .store
            .current()
            .record_applied(index, Default::default())
        {
            tracing::error!(index, error = %e, "persisting the applied index failed");
        }
    }

    fn persist(&mut self) -> Option<PersistJob> {
        if !self.backend.durable() {
            return None;
        }
        let backend = Arc::clone(&self.backend);
        Some(Box::new(move || {
            backend.sync().map_err(std::io::Error::other)
        }))
    }

    fn apply_membership(
        &mut self,
        index: u64,
        _term: u64,
        change: &MembershipChange<'_>,
    ) -> ApplyOutput {
        let store = self.store.current();
        let mut batch = WriteBatch::new();
        let result = match &change.outcome {
            Ok(membership) => {
                self.members
                    .apply_change(&change.changes, change.payload, membership, &mut batch);
                tracing::info!(
                    index,
                    voters = ?membership.voters.iter().map(|id| format!("{id:x}")).collect::<Vec<_>>(),
                    learners = ?membership.learners.iter().map(|id| format!("{id:x}")).collect::<Vec<_>>(),
                    "membership changed"
                );
                Ok(Output::Members(self.members.list()))
            }
            Err(reason) => Err(ApplyError::MembershipRefused(reason.clone())),
        };
        store.record_applied(index, batch)?;
        result
    }

    fn snapshot(&self) -> Box<dyn FnOnce(&mut dyn Write) -> std::io::Result<()> + Send> {
        let view = self.backend.snapshot();
        let buckets = buckets();
        Box::new(move |w: &mut dyn Write| {
            let view = view.map_err(std::io::Error::other)?;
            metastore_storage::export_snapshot(&*view, &buckets, w)
                .map_err(std::io::Error::other)?;
            Ok(())
        })
    }

    fn restore(&mut self, index: u64, _term: u64, reader: &mut dyn Read) -> std::io::Result<()> {
        // The old store's compaction worker must not delete from, or mark, the imported content.
        self.store.current().stop_compaction();
        if let Err(e) = self.backend.import(reader) {
            // A stream refused before the replace began leaves the previous content in place: a
            // store reopened on it resumes what the stopped worker left undone. An error during
            // the replace (RocksDB) leaves a mix; the raft loop stops on this error, and the
            // engine's next open finds its import marker and empties the database.
            if let Ok(store) = Store::open_with(self.backend.clone(), self.compaction) {
                self.store.replace(store);
            }
            return Err(std::io::Error::other(e));
        }
        let store = Store::open_with(self.backend.clone(), self.compaction)
            .map_err(std::io::Error::other)?;
        let view = self.backend.snapshot().map_err(std::io::Error::other)?;
        self.alarms.load(&*view).map_err(std::io::Error::other)?;
        self.members.load(&*view).map_err(std::io::Error::other)?;
        self.auth.load(&*view).map_err(std::io::Error::other)?;
        recover_leases(&self.lessor, &*self.backend, &store).map_err(std::io::Error::other)?;
        self.watch.reset(store.current_revision());
        tracing::info!(
            index,
            revision = store.current_revision(),
            "restored state from raft snapshot"
        );
        self.store.replace(store);
        Ok(())
    }
}

impl From<StorageError> for ApplyError {
    fn from(e: StorageError) -> Self {
        ApplyError::Mvcc(MvccError::from(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::{LeaseGrantRequest, PutRequest};
    use metastore_proto::metastorepb::internal_raft_request::Request;
    use metastore_raft_node::StateMachine;
    use metastore_storage_mem::MemBackend;

    /// Found by the entry_apply fuzz target: an Authenticate left the applied index behind.
    #[test]
    fn every_applied_entry_advances_the_applied_index() {
        let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&buckets()));
        let mut sm = KvStateMachine::open(backend).unwrap();
        let user_add = Request::UserAdd(metastore_proto::etcdserverpb::AuthUserAddRequest {
            name: "root".into(),
            hashed_password: "hash".into(),
            ..Default::default()
        });
        let grant =
            Request::UserGrantRole(metastore_proto::etcdserverpb::AuthUserGrantRoleRequest {
                user: "root".into(),
                role: "root".into(),
            });
        let enable = Request::AuthEnable(Default::default());
        for (index, request) in (1..).zip([user_add, grant, enable]) {
            sm.apply(index, 1, &encode_request(request)).unwrap();
            assert_eq!(sm.applied_index(), index);
        }
        let authenticate =
            Request::Authenticate(metastore_proto::metastorepb::AuthenticateInternal {
                name: "root".into(),
                simple_token_prefix: "p".into(),
            });
        match sm.apply(4, 1, &encode_request(authenticate)).unwrap() {
            Output::Authenticated { token, .. } => assert_eq!(token.as_deref(), Some("p.4")),
            other => panic!("unexpected output {other:?}"),
        }
        assert_eq!(sm.applied_index(), 4);
        sm.apply_noop(5, 2);
        assert_eq!(sm.applied_index(), 5);
    }

    #[test]
    fn lease_recovery_attaches_each_live_keys_last_lease() {
        let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&buckets()));
        let mut sm = KvStateMachine::open(backend.clone()).unwrap();
        let mut index = 0;
        let mut apply = |sm: &mut KvStateMachine, req| {
            index += 1;
            sm.apply(index, 1, &encode_request(req)).unwrap();
        };
        for id in [1, 2] {
            apply(
                &mut sm,
                Request::LeaseGrant(LeaseGrantRequest { id, ttl: 60 }),
            );
        }
        // Leased keys first and last, a lease taken away by a later put, a leased key deleted,
        // another moved from one lease to the other.
        let keys = [
            ("a", 1),
            ("b", 0),
            ("c", 2),
            ("d", 1),
            ("e", 0),
            ("f", 0),
            ("g", 2),
        ];
        for (key, lease) in keys {
            apply(
                &mut sm,
                Request::Put(PutRequest {
                    key: key.into(),
                    value: b"v".to_vec(),
                    lease,
                    ..Default::default()
                }),
            );
        }
        apply(
            &mut sm,
            Request::Put(PutRequest {
                key: b"c".to_vec(),
                value: b"v2".to_vec(),
                ..Default::default()
            }),
        );
        apply(
            &mut sm,
            Request::DeleteRange(DeleteRangeRequest {
                key: b"d".to_vec(),
                ..Default::default()
            }),
        );
        apply(
            &mut sm,
            Request::Put(PutRequest {
                key: b"e".to_vec(),
                value: b"v2".to_vec(),
                lease: 1,
                ..Default::default()
            }),
        );
        apply(
            &mut sm,
            Request::Put(PutRequest {
                key: b"a".to_vec(),
                value: b"v2".to_vec(),
                lease: 2,
                ..Default::default()
            }),
        );
        let expected = (
            vec!["e".to_string()],
            vec!["a".to_string(), "g".to_string()],
        );
        let attached = |sm: &KvStateMachine| {
            let as_strings = |id| {
                let keys = sm.lessor.attached_keys(id).unwrap();
                keys.into_iter()
                    .map(|k| String::from_utf8(k).unwrap())
                    .collect::<Vec<_>>()
            };
            (as_strings(1), as_strings(2))
        };
        assert_eq!(attached(&sm), expected, "as applied");
        drop(sm);
        // Opened again on the same backend: the same attachments, found while the index was
        // rebuilt.
        let reopened = KvStateMachine::open(backend.clone()).unwrap();
        assert_eq!(attached(&reopened), expected, "after reopening");
        // Taken once: the store does not keep them.
        assert!(reopened.store().current().take_leased_keys().is_empty());
    }
}
