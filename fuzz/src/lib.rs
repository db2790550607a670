//! The bodies of MetaStore's fuzz targets, one function per target, each taking the fuzzer's
//! bytes. `fuzz_targets/<name>.rs` hands them to libFuzzer (`cargo xtask fuzz`); the stable test
//! `tests/corpus.rs` replays every file of `corpus/<name>/` through them, so CI builds and runs
//! them without nightly or cargo-fuzz. A body must not panic on any input; it panics (fails)
//! only when an invariant it checks does not hold.
//!
//! Inputs that carry several items use [`Input`]: a small framing (kind byte, length, bytes) that
//! a mutation keeps mostly intact, so the fuzzer can build sequences of valid messages from the
//! seeds. Checksums that would stop the fuzzer at the first byte changed are recomputed when the
//! input asks for it (a flag bit), so both the checksum check and what lies behind it are reached.

use std::io::Cursor;
use std::sync::Arc;

use metastore_auth::AuthInfo;
use metastore_bbolt::{etcd_schema, status, trailer, Db};

pub mod seeds;
use metastore_proto::etcdserverpb::{
    AlarmRequest, AuthDisableRequest, AuthEnableRequest, AuthRoleAddRequest, AuthRoleDeleteRequest,
    AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest, AuthUserAddRequest,
    AuthUserChangePasswordRequest, AuthUserDeleteRequest, AuthUserGrantRoleRequest,
    AuthUserRevokeRoleRequest, CompactionRequest, DeleteRangeRequest, LeaseGrantRequest,
    LeaseRevokeRequest, PutRequest, RangeRequest, TxnRequest,
};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::metastorepb::{
    AuthenticateInternal, MemberAttributes, MemberPeerUrls, RaftBatch,
};
use metastore_raft_node::fuzzing::{self as raft_fuzzing, RaftHarness};
use metastore_raft_node::StateMachine;
use metastore_state_machine::KvStateMachine;
use metastore_storage::Backend;
use metastore_storage_mem::MemBackend;
use prost::Message as _;
use raft::eraftpb::EntryType;

/// The largest single allocation an input may cause: the run aborts (libFuzzer saves the input
/// as a crash) on a larger one. AddressSanitizer's `-malloc_limit_mb` does the same, but only in
/// builds with a sanitizer; this holds in every build, including `--sanitizer none` campaigns and
/// the stable corpus replay. The same figure as `cargo xtask fuzz`'s `-malloc_limit_mb`.
pub const MAX_ALLOCATION: usize = 512 << 20;

/// The system allocator, refusing (by aborting) any allocation over [`MAX_ALLOCATION`]: a size
/// taken from untrusted input without a bound shows up even when the memory is never touched
/// (which `-rss_limit_mb` alone would miss).
struct BoundedAllocator;

// SAFETY: every call is forwarded unchanged to the system allocator, or the process aborts
// before anything is allocated.
unsafe impl std::alloc::GlobalAlloc for BoundedAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        check_size(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        check_size(layout.size());
        // SAFETY: as above.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        check_size(new_size);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

/// Aborts on an allocation over [`MAX_ALLOCATION`]. It may not unwind or allocate (it runs
/// inside the allocator), so the message is a fixed one written straight to stderr.
fn check_size(size: usize) {
    if size > MAX_ALLOCATION {
        let message = b"metastore-fuzz: an allocation over MAX_ALLOCATION (512 MiB)\n";
        use std::io::Write as _;
        let _ = std::io::stderr().lock().write_all(message);
        std::process::abort();
    }
}

#[global_allocator]
static ALLOCATOR: BoundedAllocator = BoundedAllocator;

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target: its name (the directory of its corpus) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("wal_record", wal_record),
    ("wal_open", wal_open),
    ("snapshot_metastore", snapshot_metastore),
    ("snapshot_bbolt", snapshot_bbolt),
    ("entry_apply", entry_apply),
    ("conf_change", conf_change),
    ("peer_message", peer_message),
    ("grpc_requests", grpc_requests),
];

/// Items of an input: `[kind u8][length u16 LE][bytes]`, repeated. A length beyond the end
/// takes what is left.
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    /// The items of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { rest: data }
    }

    /// Frames one item (for seeds).
    pub fn item(kind: u8, bytes: &[u8]) -> Vec<u8> {
        let len = u16::try_from(bytes.len()).expect("seed items are under 64 KiB");
        let mut out = vec![kind];
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(bytes);
        out
    }
}

impl<'a> Iterator for Input<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let (&kind, rest) = self.rest.split_first()?;
        let (len, rest) = match rest {
            [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
            _ => (rest.len(), &[][..]),
        };
        let (bytes, rest) = rest.split_at(len.min(rest.len()));
        self.rest = rest;
        Some((kind, bytes))
    }
}

/// A state machine on an empty memory engine, as a member starts with.
fn new_state_machine() -> KvStateMachine {
    let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&metastore_state_machine::buckets()));
    KvStateMachine::open(backend)
        .expect("a state machine opens on an empty memory engine")
        // No pause between compaction batches: dropping the store waits for its worker.
        .with_compaction_config(metastore_mvcc::CompactionConfig {
            batch_limit: 1000,
            sleep_interval: std::time::Duration::ZERO,
        })
}

/// The state machine's whole state as a snapshot stream, once the background compaction has
/// finished (it records its progress in the `meta` bucket whenever it gets to it).
fn export(sm: &KvStateMachine) -> Vec<u8> {
    let store = sm.store().current();
    if store.compact_revision() >= 0 {
        let _ = store.wait_compaction(store.compact_revision());
    }
    let mut out = Vec::new();
    sm.snapshot()(&mut out).expect("exporting a memory engine to memory cannot fail");
    out
}

/// The segment bytes of `data` after its flag byte: used as they are, or (flag bit 1) read as
/// items that become records, framed with a correct checksum (kinds 0-2: entry, hard state,
/// snapshot marker; any other kind: the bytes as they are).
fn wal_segment(flags: u8, data: &[u8]) -> Vec<u8> {
    if flags & 2 == 0 {
        return data.to_vec();
    }
    let mut segment = Vec::new();
    for (kind, bytes) in Input::new(data) {
        match raft_fuzzing::WAL_RECORD_TYPES.get(usize::from(kind)) {
            Some(record_type) => segment.extend(raft_fuzzing::wal_frame(*record_type, bytes)),
            None => segment.extend_from_slice(bytes),
        }
    }
    segment
}

/// WAL record decoding and the replay of one segment (`decode_record`, `WalContents::apply`,
/// torn-tail detection). First byte: bit 0 = the segment is the last one (a torn tail is cut
/// rather than refused); bit 1 = frame the rest as records ([`wal_segment`]).
///
/// Checks: the records end within the segment; after cutting the torn tail at that offset, the
/// replay finds the same log and no torn tail (a repaired WAL reopens as it was repaired).
pub fn wal_record(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let is_last = flags & 1 == 1;
    let segment = wal_segment(flags, rest);
    let Ok(summary) = raft_fuzzing::wal_replay(&segment, is_last) else {
        return;
    };
    assert!(summary.end as usize <= segment.len());
    assert!(
        !summary.torn || is_last,
        "a torn tail outside the last segment"
    );
    let repaired = raft_fuzzing::wal_replay(&segment[..summary.end as usize], is_last)
        .expect("the records before a torn tail replay again");
    assert_eq!(
        (
            repaired.entries,
            repaired.snapshots,
            repaired.commit,
            repaired.end,
            repaired.torn
        ),
        (
            summary.entries,
            summary.snapshots,
            summary.commit,
            summary.end,
            false
        ),
    );
}

/// Opening a WAL directory (`Wal::open`: segment names and order, replay, the torn-tail cut).
/// The input is segments separated by items of kind 0xff (each segment's items as in
/// [`wal_record`] with records framed; first byte: bit 0 = leave a gap in the sequence numbers
/// before the last segment). Written to a temporary directory, opened, then opened again.
///
/// Checks: a WAL that opened opens again with the same log (the cut tail stays cut).
pub fn wal_open(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut segments: Vec<Vec<u8>> = vec![Vec::new()];
    for (kind, bytes) in Input::new(rest) {
        if kind == 0xff {
            if segments.len() < 8 {
                segments.push(Vec::new());
            }
            continue;
        }
        let current = segments.last_mut().expect("there is always a segment");
        current.extend(wal_segment(2, &Input::item(kind, bytes)));
    }
    let Ok(dir) = tempfile::tempdir_in(temp_root()) else {
        return;
    };
    let count = segments.len();
    for (i, bytes) in segments.iter().enumerate() {
        let mut seq = i as u64;
        if flags & 1 == 1 && i + 1 == count && i > 0 {
            seq += 1;
        }
        let name = format!("{seq:016x}-{:016x}.wal", i as u64 * 10);
        std::fs::write(dir.path().join(name), bytes).expect("writing to a temporary directory");
    }
    let Ok(first) = raft_fuzzing::wal_open(dir.path()) else {
        return;
    };
    let again = raft_fuzzing::wal_open(dir.path()).expect("a WAL that opened opens again");
    assert_eq!(
        (again.entries, again.snapshots, again.commit, again.end),
        (first.entries, first.snapshots, first.commit, first.end)
    );
}

/// Where the WAL target writes: memory-backed when the machine has it.
fn temp_root() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// MetaStore's snapshot stream (`storage::snapshot_format`) restored into a state machine on
/// the memory engine, as a member installs a raft snapshot: import, then the mvcc store, alarms,
/// members, auth and leases loaded from what was imported. First byte: bit 0 = write the correct
/// CRC over the last 4 bytes of the stream.
///
/// Checks: a restored state exports a stream that restores to the same export (the import keeps
/// exactly what it accepted), and the restored store answers a range over every key.
pub fn snapshot_metastore(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut stream = rest.to_vec();
    if flags & 1 == 1 && stream.len() >= 4 {
        let body = stream.len() - 4;
        let crc = crc32fast::hash(&stream[..body]);
        stream[body..].copy_from_slice(&crc.to_be_bytes());
    }
    let mut sm = new_state_machine();
    if sm.restore(1, 1, &mut &stream[..]).is_err() {
        return;
    }
    let store = sm.store().current();
    let everything = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    };
    let _ = store.range(&everything);
    let exported = export(&sm);
    let mut again = new_state_machine();
    again
        .restore(2, 1, &mut &exported[..])
        .expect("an exported state restores");
    assert_eq!(
        export(&again),
        exported,
        "export, restore, export changed the state"
    );
}

/// etcd's snapshot files (bbolt, `crates/bbolt`): the SHA-256 trailer, the metas, `check`,
/// every bucket and nested bucket walked, etcd's encodings of keys, values, leases and meta, and
/// `snapshot status`.
pub fn snapshot_bbolt(data: &[u8]) {
    let _ = trailer::verify(&mut Cursor::new(data), false);
    let _ = metastore_bbolt::looks_like_bbolt(data);
    let Ok(db) = Db::from_bytes(data.to_vec()) else {
        return;
    };
    let _ = db.check();
    let _ = status::snapshot_status(&db);
    let _ = etcd_schema::is_etcd_backend(&db);
    let _ = etcd_schema::read_meta(&db);
    let Ok(buckets) = db.buckets() else {
        return;
    };
    let mut pending: Vec<(Vec<u8>, metastore_bbolt::Bucket, usize)> =
        buckets.into_iter().map(|(name, b)| (name, b, 0)).collect();
    while let Some((name, bucket, depth)) = pending.pop() {
        for entry in db.iter(&bucket) {
            let Ok(entry) = entry else { break };
            if entry.is_bucket {
                // Nested buckets are not part of etcd's layout; a few levels are enough to
                // reach the nested-bucket code.
                if depth < 4 {
                    if let Ok(nested) = metastore_bbolt::Bucket::from_value(&entry.value) {
                        pending.push((entry.key.clone(), nested, depth + 1));
                    }
                }
                continue;
            }
            match name.as_slice() {
                b"key" => {
                    let _ = etcd_schema::KeyBucketKey::decode(&entry.key);
                    let _ = etcd_schema::decode_key_value(&entry.value);
                }
                b"lease" => {
                    let _ = etcd_schema::decode_lease(&entry.value);
                }
                b"meta" => {
                    let _ = etcd_schema::decode_u64(&entry.value);
                }
                _ => {}
            }
        }
    }
}

/// Committed raft entry payloads (`InternalRaftRequest`) applied in order to a state machine on
/// the memory engine, as the raft loop applies them. Items: kind 0 = the bytes are a payload,
/// applied at the next index; kind 1 = a raft snapshot at the applied index: the state exported
/// and restored.
///
/// Checks: applying is deterministic (invariant 1): a second state machine given the same
/// entries ends with the same state, byte for byte; the applied index is the last entry's.
pub fn entry_apply(data: &[u8]) {
    let mut sms = [new_state_machine(), new_state_machine()];
    let mut index = 0;
    for (kind, bytes) in Input::new(data).take(64) {
        if kind != 1 {
            index += 1;
        }
        for sm in &mut sms {
            if kind == 1 {
                // A snapshot is taken at the applied index, which it carries.
                let state = export(sm);
                sm.restore(index, 1, &mut &state[..])
                    .expect("a state machine restores its own export");
            } else {
                let _ = sm.apply(index, 1, bytes);
            }
        }
    }
    let [a, b] = &sms;
    assert_eq!(a.applied_index(), index);
    assert_eq!(b.applied_index(), index);
    assert!(
        export(a) == export(b),
        "the same entries gave different states"
    );
}

/// Membership change entries (`ConfChange` and `ConfChangeV2`, with MetaStore's member payload
/// in their context) applied to raft and to the member table, as the raft loop applies a
/// committed one, on a member that leads a single-member cluster. Items: kind bit 0 selects the
/// entry type (0: `EntryConfChange`, 1: `EntryConfChangeV2`), the bytes are the entry's data.
///
/// Checks: the state machine's member table, raft's configuration and the applied index stay
/// in step.
pub fn conf_change(data: &[u8]) {
    let Ok(mut node) = RaftHarness::new(new_state_machine(), 1, &[1], &[1], 1) else {
        return;
    };
    if node.campaign().is_err() {
        return;
    }
    let first = node.applied_index() + 1;
    for (index, (kind, bytes)) in (first..).zip(Input::new(data).take(32)) {
        let entry_type = if kind & 1 == 0 {
            EntryType::EntryConfChange
        } else {
            EntryType::EntryConfChangeV2
        };
        let _ = node.apply_conf_change_entry(entry_type, bytes);
        assert_eq!(node.applied_index(), index);
    }
}

/// Peer messages (`metastorepb.Peer/Raft` batches): the batch decoded as the peer service
/// decodes it, each raft message decoded (`peer::decode_message`) and handed to a member's raft
/// node through the loop's guard, with its Readies handled as the loop does (log, hard state,
/// committed entries applied to a state machine on the memory engine, snapshots carried in the
/// message restored). First byte: the member's situation (follower of three voters with a log,
/// candidate, leader of a single-member cluster); the rest is one `RaftBatch`.
///
/// Checks: nothing panics (raft-rs panics on some messages a faulty or forged peer can send;
/// the guard must stop them), and the applied index never passes the log's last index.
pub fn peer_message(data: &[u8]) {
    let Some((&situation, rest)) = data.split_first() else {
        return;
    };
    let Ok(batch) = RaftBatch::decode(rest) else {
        return;
    };
    let (voters, terms, commit): (&[u64], &[u64], u64) = match situation % 3 {
        0 => (&[1, 2, 3], &[1, 1, 2, 2, 3], 2),
        1 => (&[1, 2, 3], &[1, 1], 1),
        _ => (&[1], &[1], 1),
    };
    let Ok(mut node) = RaftHarness::new(new_state_machine(), 1, voters, terms, commit) else {
        return;
    };
    if situation % 3 != 0 && node.campaign().is_err() {
        return;
    }
    for bytes in batch.messages.iter().take(64) {
        let Ok(msg) = metastore_peer::decode_message(bytes) else {
            return;
        };
        if node.step(msg).is_err() || node.tick().is_err() {
            // What would stop the raft loop with an error (not a panic).
            return;
        }
        assert!(node.applied_index() <= node.last_index());
    }
}

/// The largest txn the API accepts in these inputs (etcd's default `--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// Client requests of every type that changes state, decoded as tonic decodes a gRPC request,
/// checked as the API checks them before proposing (`mvcc::check_*`, the permissions of the
/// caller as the auth layer computes them), then applied at the next index to a state machine
/// on the memory engine; Range and read-only Txn are served from the store. Items: the kind
/// picks the request type, the bytes are the request. The first item names the caller (its
/// bytes, as a user name; empty = no user).
///
/// Checks: a request the API accepted is applied without panicking; the applied index follows
/// the entries.
pub fn grpc_requests(data: &[u8]) {
    let mut items = Input::new(data);
    let username = match items.next() {
        Some((_, name)) => String::from_utf8_lossy(name).into_owned(),
        None => return,
    };
    let mut sm = new_state_machine();
    let mut index = 0;
    for (kind, bytes) in items.take(48) {
        let auth = sm.auth();
        let who = AuthInfo {
            username: username.clone(),
            revision: auth.revision(),
        };
        let Some(request) = decode_request(kind, bytes) else {
            continue;
        };
        let store = sm.store().current();
        let write = match request {
            ClientRequest::Range(r) => {
                if metastore_mvcc::check_range(&r).is_ok()
                    && auth.check(&who, &metastore_auth::needs::range(&r)).is_ok()
                {
                    let _ = store.range(&r);
                }
                continue;
            }
            ClientRequest::Write(write) => write,
        };
        let accepted = match &write {
            Request::Put(r) => {
                metastore_mvcc::check_put(r).is_ok()
                    && auth.check(&who, &metastore_auth::needs::put(r)).is_ok()
            }
            Request::DeleteRange(r) => {
                metastore_mvcc::check_delete(r).is_ok()
                    && auth
                        .check(&who, &metastore_auth::needs::delete_range(r))
                        .is_ok()
            }
            Request::Txn(r) => {
                let valid = metastore_mvcc::check_txn(r, MAX_TXN_OPS).is_ok()
                    && auth.check(&who, &metastore_auth::needs::txn(r)).is_ok();
                if valid && metastore_mvcc::is_txn_read_only(r) {
                    // Served locally, as the KV service serves it.
                    let _ = store.txn_read_only(r);
                    continue;
                }
                valid
            }
            // Checked by the state machine against the auth store at apply.
            _ => true,
        };
        if !accepted {
            continue;
        }
        index += 1;
        let payload = metastore_state_machine::encode_request_as(write, &who);
        let _ = sm.apply(index, 1, &payload);
        assert_eq!(sm.applied_index(), index);
    }
}

/// A decoded client request: a read served locally or a write that goes through raft.
enum ClientRequest {
    Range(RangeRequest),
    Write(Request),
}

/// The request of `kind` decoded from `bytes` (as tonic's prost codec decodes a gRPC message).
/// Authenticate and the password changes reach the log with the receiving member's bcrypt hash,
/// which these inputs carry as the hash itself (hashing is too slow to fuzz).
fn decode_request(kind: u8, bytes: &[u8]) -> Option<ClientRequest> {
    fn write<M: prost::Message + Default>(
        bytes: &[u8],
        f: fn(M) -> Request,
    ) -> Option<ClientRequest> {
        M::decode(bytes).ok().map(|m| ClientRequest::Write(f(m)))
    }
    match kind % 22 {
        0 => RangeRequest::decode(bytes).ok().map(ClientRequest::Range),
        1 => write::<PutRequest>(bytes, Request::Put),
        2 => write::<DeleteRangeRequest>(bytes, Request::DeleteRange),
        3 => write::<TxnRequest>(bytes, Request::Txn),
        4 => write::<CompactionRequest>(bytes, Request::Compaction),
        5 => write::<LeaseGrantRequest>(bytes, Request::LeaseGrant),
        6 => write::<LeaseRevokeRequest>(bytes, Request::LeaseRevoke),
        7 => write::<AlarmRequest>(bytes, Request::Alarm),
        8 => write::<MemberAttributes>(bytes, Request::MemberAttributes),
        9 => write::<MemberPeerUrls>(bytes, Request::MemberPeerUrls),
        10 => write::<AuthEnableRequest>(bytes, Request::AuthEnable),
        11 => write::<AuthDisableRequest>(bytes, Request::AuthDisable),
        12 => write::<AuthenticateInternal>(bytes, Request::Authenticate),
        13 => write::<AuthUserAddRequest>(bytes, |mut r| {
            r.hashed_password = std::mem::take(&mut r.password);
            Request::UserAdd(r)
        }),
        14 => write::<AuthUserDeleteRequest>(bytes, Request::UserDelete),
        15 => write::<AuthUserChangePasswordRequest>(bytes, |mut r| {
            r.hashed_password = std::mem::take(&mut r.password);
            Request::UserChangePassword(r)
        }),
        16 => write::<AuthUserGrantRoleRequest>(bytes, Request::UserGrantRole),
        17 => write::<AuthUserRevokeRoleRequest>(bytes, Request::UserRevokeRole),
        18 => write::<AuthRoleAddRequest>(bytes, Request::RoleAdd),
        19 => write::<AuthRoleDeleteRequest>(bytes, Request::RoleDelete),
        20 => write::<AuthRoleGrantPermissionRequest>(bytes, Request::RoleGrantPermission),
        _ => write::<AuthRoleRevokePermissionRequest>(bytes, Request::RoleRevokePermission),
    }
}
