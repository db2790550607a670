//! The Maintenance service through real clients (`etcdctl`, the `etcd-client` crate and
//! MetaStore's generated gRPC client) on both engines, and HashKV compared with real etcd for the
//! same scripted history.

use crate::support;

use std::process::{Command, Output};
use std::time::Duration;

use metastore_proto::etcdserverpb::alarm_request::AlarmAction;
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::request_op::Request as Op;
use metastore_proto::etcdserverpb::{
    AlarmRequest, AlarmType, CompactionRequest, Compare, DeleteRangeRequest, HashKvRequest,
    HashRequest, MoveLeaderRequest, PutRequest, RangeRequest, RequestOp, StatusRequest,
    StatusResponse, TxnRequest,
};
use support::{metastore_bin, Kind, Server};
use tonic::transport::Channel;
use tonic::Code;

const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

/// etcdctl with the endpoint as etcd's documentation writes it, `http://127.0.0.1:PORT` (for the
/// per-endpoint commands, `endpoint status`, `defrag`, `snapshot save`, …, etcdctl 3.4 sends that
/// string as the HTTP/2 `:authority`).
fn etcdctl_run(server: &Server, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", server.endpoint()))
        .args(args)
        .output()
        .expect("etcdctl (installed by `cargo xtask test`)")
}

fn etcdctl(server: &Server, args: &[&str]) -> String {
    let out = etcdctl_run(server, args);
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The unsigned number after `"field":` in etcdctl's JSON output.
fn json_u64(json: &str, field: &str) -> u64 {
    let tag = format!("\"{field}\":");
    let start = json
        .find(&tag)
        .unwrap_or_else(|| panic!("{field} missing in {json}"))
        + tag.len();
    json[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("{field} is not a number in {json}"))
}

async fn maintenance(server: &Server) -> MaintenanceClient<Channel> {
    MaintenanceClient::connect(server.endpoint())
        .await
        .expect("connect")
}

/// The server's Status answer.
async fn status(server: &Server) -> StatusResponse {
    let answer = maintenance(server).await.status(StatusRequest {}).await;
    answer.expect("status").into_inner()
}

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn all_keys() -> RangeRequest {
    RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    }
}

async fn endpoint_status(kind: Kind) {
    let server = Server::start(kind).await;
    etcdctl(&server, &["put", "a", "1"]);
    let json = etcdctl(&server, &["endpoint", "status", "-w", "json"]);
    assert!(json.contains("\"version\":\"3.6.0\""), "{json}");
    let member_id = json_u64(&json, "member_id");
    assert_eq!(json_u64(&json, "leader"), member_id, "{json}");
    assert!(json_u64(&json, "raftTerm") >= 1);
    let applied = json_u64(&json, "raftAppliedIndex");
    assert!(applied >= 2, "a no-op and the put: {json}");
    assert!(json_u64(&json, "raftIndex") >= applied);
    let db_size = json_u64(&json, "dbSize");
    assert!(db_size > 0, "{json}");
    assert!(json_u64(&json, "dbSizeInUse") <= db_size, "{json}");
    assert!(!json.contains("errors"), "no errors expected: {json}");

    // Fields newer than etcdctl 3.4 knows, through the generated client.
    let status = status(&server).await;
    assert_eq!(status.db_size_quota, 2 * 1024 * 1024 * 1024);
    assert!(!status.is_learner);
    assert!(status.errors.is_empty());
    assert_eq!(status.leader, member_id);
    assert_eq!(status.header.unwrap().revision, 2);
}

per_engine!(endpoint_status);

/// What HashKV answered at one revision: `(hash, compact_revision, header revision)` or the
/// error's code and message.
type HashAnswer = Result<(u32, i64, i64), (Code, String)>;

/// One scripted history with two physical compactions, then HashKV at every revision around it.
async fn scripted_hashes(server: &Server) -> Vec<(i64, HashAnswer)> {
    let mut kv: KvClient<Channel> = server.kv().await;
    for i in 0..30 {
        kv.put(put(&format!("k{}", i % 7), &format!("v{i}")))
            .await
            .unwrap();
    }
    kv.delete_range(support::delete_req("k3", ""))
        .await
        .unwrap();
    let op = |r: Op| RequestOp { request: Some(r) };
    kv.txn(TxnRequest {
        compare: vec![Compare {
            key: b"k1".to_vec(),
            target: 0, // version
            result: 1, // greater
            ..Default::default()
        }],
        success: vec![
            op(Op::RequestPut(put("k8", "txn"))),
            op(Op::RequestDeleteRange(DeleteRangeRequest {
                key: b"k2".to_vec(),
                ..Default::default()
            })),
        ],
        failure: vec![],
    })
    .await
    .unwrap();
    kv.compact(CompactionRequest {
        revision: 20,
        physical: true,
    })
    .await
    .unwrap();
    for i in 0..10 {
        kv.put(put(&format!("j{}", i % 3), "w")).await.unwrap();
    }
    kv.delete_range(support::delete_req("k", "l"))
        .await
        .unwrap();
    let resp = kv
        .compact(CompactionRequest {
            revision: 36,
            physical: true,
        })
        .await
        .unwrap();
    let current = resp.into_inner().header.unwrap().revision;
    kv.put(put("after", "compaction")).await.unwrap();

    let mut maint = maintenance(server).await;
    let mut answers = Vec::new();
    let revisions = [0, 1, 19, 20, 35].into_iter().chain(36..=current + 2);
    for rev in revisions {
        let answer = match maint.hash_kv(HashKvRequest { revision: rev }).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok((r.hash, r.compact_revision, r.header.unwrap().revision))
            }
            Err(s) => Err((s.code(), s.message().to_string())),
        };
        answers.push((rev, answer));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashkv_equal_on_both_engines_and_real_etcd() {
    let memory = Server::start(Kind::Memory).await;
    let rocks = Server::start(Kind::Rocks).await;
    let etcd = Server::start(Kind::Etcd).await;
    let on_memory = scripted_hashes(&memory).await;
    let on_rocks = scripted_hashes(&rocks).await;
    let on_etcd = scripted_hashes(&etcd).await;
    assert_eq!(on_memory, on_rocks, "memory vs rocksdb");
    // At a revision a compaction ran at, MetaStore answers as etcd 3.6 does (the hash that
    // compaction stored, with the compact revision before it; etcd 3.6 also accepts
    // rev == compact revision), while Debian's etcd 3.4 answers `compacted`. Everywhere else the
    // answers are the same, byte for byte.
    let at = |answers: &[(i64, HashAnswer)], rev: i64| {
        answers.iter().find(|(r, _)| *r == rev).unwrap().1.clone()
    };
    assert_eq!(at(&on_memory, 20).map(|(_, c, _)| c), Ok(-1));
    assert_eq!(at(&on_memory, 36).map(|(_, c, _)| c), Ok(20));
    let comparable = |answers: &[(i64, HashAnswer)]| {
        answers
            .iter()
            .filter(|(rev, _)| *rev != 20 && *rev != 36)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        comparable(&on_memory),
        comparable(&on_etcd),
        "metastore vs etcd"
    );
    // Both out-of-range answers were exercised.
    for expected in [
        "etcdserver: mvcc: required revision has been compacted",
        "etcdserver: mvcc: required revision is a future revision",
    ] {
        assert!(
            on_memory
                .iter()
                .any(|(_, a)| matches!(a, Err((Code::OutOfRange, m)) if m == expected)),
            "{expected}: {on_memory:?}"
        );
    }

    // etcdctl's view of the current hash agrees too.
    let hash_of = |s: &Server| json_u64(&etcdctl(s, &["endpoint", "hashkv", "-w", "json"]), "hash");
    assert_eq!(hash_of(&memory), hash_of(&rocks));
    assert_eq!(hash_of(&memory), hash_of(&etcd));

    // The whole-backend Hash covers the membership table too, so two single-member clusters
    // never agree on it; tests/cluster.rs compares it across the members of one cluster, whose
    // members run different engines.
}

async fn nospace_alarm(kind: Kind) {
    let mut server = Server::start_with(kind, &["--quota-backend-bytes", "262144"]).await;
    let mut kv = server.kv().await;
    let value = "x".repeat(8 * 1024);
    let mut refused = None;
    for i in 0..200 {
        if let Err(status) = kv.put(put(&format!("big/{i:03}"), &value)).await {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("a 256 KiB quota must refuse 1.6 MB of puts");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(refused.message(), NO_SPACE);

    let alarms = etcdctl(&server, &["alarm", "list"]);
    assert!(alarms.contains("alarm:NOSPACE"), "{alarms}");
    let json = etcdctl(&server, &["endpoint", "status", "-w", "json"]);
    assert!(json.contains("alarm:NOSPACE"), "{json}");

    let blocked = etcdctl_run(&server, &["put", "small", "v"]);
    assert!(!blocked.status.success());
    assert!(String::from_utf8_lossy(&blocked.stderr).contains("database space exceeded"));
    let txn = kv
        .txn(TxnRequest {
            success: vec![RequestOp {
                request: Some(Op::RequestPut(put("small", "v"))),
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (txn.code(), txn.message()),
        (Code::ResourceExhausted, NO_SPACE)
    );
    // New leases are refused too.
    let grant = etcdctl_run(&server, &["lease", "grant", "60"]);
    assert!(!grant.status.success());
    assert!(String::from_utf8_lossy(&grant.stderr).contains("database space exceeded"));
    // Reads still work.
    assert_eq!(
        etcdctl(&server, &["get", "big/000", "--print-value-only"]).len(),
        value.len() + 1
    );

    // The alarm is persisted: it is still there after a restart.
    server.restart().await;
    let alarms = etcdctl(&server, &["alarm", "list"]);
    assert!(alarms.contains("alarm:NOSPACE"), "{alarms}");
    assert!(!etcdctl_run(&server, &["put", "small", "v"])
        .status
        .success());

    // Free space: delete, compact, defragment, then disarm.
    etcdctl(&server, &["del", "big/", "--prefix"]);
    let json = etcdctl(&server, &["endpoint", "status", "-w", "json"]);
    let revision = json_u64(&json, "revision");
    etcdctl(
        &server,
        &["compaction", "--physical", &revision.to_string()],
    );
    assert!(etcdctl(&server, &["defrag"]).contains("Finished defragmenting"));
    // Space is back, but writes stay refused until the alarm is disarmed.
    assert!(!etcdctl_run(&server, &["put", "small", "v"])
        .status
        .success());
    let disarmed = etcdctl(&server, &["alarm", "disarm"]);
    assert!(disarmed.contains("alarm:NOSPACE"), "{disarmed}");
    assert_eq!(etcdctl(&server, &["alarm", "list"]), "");
    assert_eq!(etcdctl(&server, &["put", "small", "v"]), "OK\n");
}

per_engine!(nospace_alarm);

async fn corrupt_alarm(kind: Kind) {
    let server = Server::start(kind).await;
    let mut kv = server.kv().await;
    kv.put(put("k", "v")).await.unwrap();
    let member_id = status(&server).await.header.unwrap().member_id;
    let mut maint = maintenance(&server).await;
    let alarm = |action: AlarmAction| AlarmRequest {
        action: action as i32,
        member_id,
        alarm: AlarmType::Corrupt as i32,
    };
    let on = maint.alarm(alarm(AlarmAction::Activate)).await.unwrap();
    assert_eq!(on.into_inner().alarms.len(), 1);

    let refused = kv.put(put("k", "w")).await.unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (Code::DataLoss, "etcdserver: corrupt cluster")
    );
    let got = kv
        .range(put("k", "").into_range())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs[0].value, b"v");
    let alarms = etcdctl(&server, &["alarm", "list"]);
    assert!(alarms.contains("alarm:CORRUPT"), "{alarms}");

    let off = maint.alarm(alarm(AlarmAction::Deactivate)).await.unwrap();
    assert_eq!(off.into_inner().alarms.len(), 1);
    kv.put(put("k", "w")).await.unwrap();
}

trait IntoRange {
    fn into_range(self) -> RangeRequest;
}

impl IntoRange for PutRequest {
    fn into_range(self) -> RangeRequest {
        RangeRequest {
            key: self.key,
            ..Default::default()
        }
    }
}

per_engine!(corrupt_alarm);

async fn defrag_while_writing(kind: Kind) {
    let server = Server::start(kind).await;
    let mut kv = server.kv().await;
    for i in 0..300 {
        kv.put(put(&format!("d/{}", i % 20), &"v".repeat(512)))
            .await
            .unwrap();
    }
    let revision = kv.range(all_keys()).await.unwrap().into_inner();
    kv.compact(CompactionRequest {
        revision: revision.header.unwrap().revision,
        physical: true,
    })
    .await
    .unwrap();

    let endpoint = server.endpoint();
    let writer = tokio::spawn(async move {
        let mut kv = KvClient::connect(endpoint).await.unwrap();
        for i in 0..100 {
            kv.put(put(&format!("w/{i}"), "during defrag"))
                .await
                .unwrap();
        }
    });
    assert!(etcdctl(&server, &["defrag"]).contains("Finished defragmenting etcd member"));
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("writes go on during defragmentation")
        .unwrap();
    let count = kv
        .range(RangeRequest {
            key: b"w/".to_vec(),
            range_end: b"w0".to_vec(),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 100);
}

per_engine!(defrag_while_writing);

async fn snapshot_save(kind: Kind) {
    let server = Server::start(kind).await;
    let mut kv = server.kv().await;
    for i in 0..600 {
        kv.put(put(
            &format!("s/{:04}", i % 400),
            &format!("value-{i}-{}", "p".repeat(200)),
        ))
        .await
        .unwrap();
    }
    kv.delete_range(support::delete_req("s/0100", "s/0150"))
        .await
        .unwrap();
    kv.compact(CompactionRequest {
        revision: 300,
        physical: true,
    })
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup.db");
    let path_str = path.to_str().unwrap();
    let out = etcdctl_run(&server, &["snapshot", "save", path_str]);
    assert!(
        out.status.success(),
        "snapshot save: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size = std::fs::metadata(&path).unwrap().len();
    assert_eq!(size % 512, 32, "etcdctl's own check");

    // Import the file into a fresh backend: same keys, values and HashKV as the server.
    let backend = std::sync::Arc::new(metastore_storage_mem::MemBackend::new(
        &metastore_state_machine::buckets(),
    ));
    assert!(metastore_maintenance_api::snapshot::is_etcd_file(&path).unwrap());
    metastore_maintenance_api::snapshot::import_etcd_file(&*backend, &path, dir.path(), false)
        .unwrap();
    let restored = metastore_mvcc::Store::open(backend).unwrap();
    let served = kv.range(all_keys()).await.unwrap().into_inner();
    let local = restored.range(&all_keys()).unwrap();
    assert_eq!(local.kvs, served.kvs);
    assert_eq!(local.count, 350);
    let served_hash = maintenance(&server)
        .await
        .hash_kv(HashKvRequest { revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let local_hash = restored.hash_kv(0).unwrap();
    assert_eq!(
        (local_hash.hash, local_hash.compact_revision),
        (served_hash.hash, served_hash.compact_revision)
    );

    // `etcdctl snapshot status` reads the file (its hash is a CRC over the file's buckets,
    // not HashKV) and `metastore snapshot status` says the same, at the server's revision.
    let theirs = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json", path_str])
        .output()
        .unwrap();
    support::assert_success(&theirs);
    let out = Command::new(support::metastore_bin())
        .args(["snapshot", "status", "-w", "json", path_str])
        .output()
        .unwrap();
    support::assert_success(&out);
    assert_eq!(out.stdout, theirs.stdout);
    let json = String::from_utf8(out.stdout).unwrap();
    let served_revision = served.header.unwrap().revision as u64;
    assert_eq!(json_u64(&json, "revision"), served_revision, "{json}");
    assert_eq!(json_u64(&json, "totalSize") + 32, size);
}

per_engine!(snapshot_save);

/// `metastore snapshot status` of a snapshot etcd saved prints what etcdctl prints, in each of
/// etcdctl's formats, and refuses a damaged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_status_of_an_etcd_file_is_etcdctls() {
    let etcd = Server::start(Kind::Etcd).await;
    for i in 0..300 {
        etcdctl(&etcd, &["put", &format!("k{i:03}"), &"v".repeat(i)]);
    }
    etcdctl(&etcd, &["del", "k1", "--prefix"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcd.db");
    let path = file.to_str().unwrap();
    etcdctl(&etcd, &["snapshot", "save", path]);
    drop(etcd);
    let status = |program: &str, args: &[&str]| {
        let out = Command::new(program)
            .env("ETCDCTL_API", "3")
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8(out.stdout).unwrap())
    };
    for format in ["simple", "json", "table", "fields"] {
        let args = ["snapshot", "status", "-w", format, path];
        let (ok, theirs) = status("etcdctl", &args);
        assert!(ok, "etcdctl -w {format}");
        assert_eq!(
            status(metastore_bin(), &args),
            (true, theirs),
            "-w {format}"
        );
    }

    // both metas damaged (their root page changed): both refuse the file
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[16 + 16] ^= 0x40;
    bytes[4096 + 16 + 16] ^= 0x40;
    let damaged = dir.path().join("damaged.db");
    std::fs::write(&damaged, bytes).unwrap();
    let args = ["snapshot", "status", damaged.to_str().unwrap()];
    assert!(!status("etcdctl", &args).0);
    assert!(!status(metastore_bin(), &args).0);
}

/// The fields a protobuf message carries on the wire, as `number` for top-level fields and
/// `number.number` inside an embedded message (proto3 omits a scalar at its default value and an
/// absent message, so this is what a client sees as present).
fn present_fields(encoded: &[u8], nested: &[u32]) -> std::collections::BTreeSet<String> {
    fn varint(buf: &mut &[u8]) -> u64 {
        let mut value = 0;
        for shift in (0..64).step_by(7) {
            let (byte, rest) = buf.split_first().expect("truncated varint");
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        value
    }
    let mut fields = std::collections::BTreeSet::new();
    let mut buf = encoded;
    while !buf.is_empty() {
        let key = varint(&mut buf);
        let number = (key >> 3) as u32;
        fields.insert(number.to_string());
        match key & 7 {
            0 => drop(varint(&mut buf)),
            1 => buf = &buf[8..],
            5 => buf = &buf[4..],
            2 => {
                let len = varint(&mut buf) as usize;
                if nested.contains(&number) {
                    let inner = present_fields(&buf[..len], &[]);
                    fields.extend(inner.iter().map(|f| format!("{number}.{f}")));
                }
                buf = &buf[len..];
            }
            other => panic!("wire type {other} in a Maintenance answer"),
        }
    }
    fields
}

/// Every Maintenance RPC's answer on a single member, as the set of fields present in it (the
/// header's fields included), or the error; the Snapshot stream as its first and last messages.
async fn maintenance_field_sets(
    server: &Server,
) -> Vec<(&'static str, Result<Vec<String>, String>)> {
    use prost::Message;
    fn fields<M: Message>(
        answer: Result<tonic::Response<M>, tonic::Status>,
    ) -> Result<Vec<String>, String> {
        match answer {
            Ok(resp) => Ok(present_fields(&resp.into_inner().encode_to_vec(), &[1])
                .into_iter()
                .collect()),
            Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
        }
    }
    let mut kv = KvClient::connect(server.endpoint()).await.unwrap();
    // The large value makes the snapshot longer than one message on both.
    let large = "x".repeat(100_000);
    for (key, value) in [
        ("a", "1"),
        ("b", "2"),
        ("a", "3"),
        ("large", large.as_str()),
    ] {
        kv.put(put(key, value)).await.unwrap();
    }
    // A compaction, so that HashKV's compact_revision is set on both.
    kv.compact(CompactionRequest {
        revision: 2,
        physical: true,
    })
    .await
    .unwrap();
    let mut m = maintenance(server).await;
    let me = m
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .leader;
    let get_alarms = AlarmRequest {
        action: AlarmAction::Get as i32,
        member_id: 0,
        alarm: 0,
    };
    let mut snapshot = m
        .snapshot(metastore_proto::etcdserverpb::SnapshotRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(msg) = snapshot.message().await.unwrap() {
        messages.push(msg);
    }
    assert!(messages.len() > 2, "a snapshot of several messages");
    let (first, last) = (
        messages.first().unwrap().clone(),
        messages.last().unwrap().clone(),
    );
    vec![
        ("Status", fields(m.status(StatusRequest {}).await)),
        ("Alarm(GET)", fields(m.alarm(get_alarms).await)),
        ("Hash", fields(m.hash(HashRequest {}).await)),
        (
            "HashKV(0)",
            fields(m.hash_kv(HashKvRequest { revision: 0 }).await),
        ),
        (
            "HashKV(3)",
            fields(m.hash_kv(HashKvRequest { revision: 3 }).await),
        ),
        (
            "HashKV(1)",
            fields(m.hash_kv(HashKvRequest { revision: 1 }).await),
        ),
        (
            "Defragment",
            fields(
                m.defragment(metastore_proto::etcdserverpb::DefragmentRequest {})
                    .await,
            ),
        ),
        ("Snapshot first", fields(Ok(tonic::Response::new(first)))),
        ("Snapshot last", fields(Ok(tonic::Response::new(last)))),
        (
            "MoveLeader(self)",
            fields(m.move_leader(MoveLeaderRequest { target_id: me }).await),
        ),
        (
            "MoveLeader(stranger)",
            fields(m.move_leader(MoveLeaderRequest { target_id: me ^ 1 }).await),
        ),
    ]
}

/// Clients assert on the presence of a field, not only its value: every Maintenance answer
/// carries the fields etcd's carries, no more and no fewer (etcd answers Defragment, MoveLeader
/// and Snapshot without a header). Debian's etcd is 3.4, so the fields etcd added in 3.5/3.6
/// (MetaStore serves 3.6's API) are the one expected difference, listed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_fields_present_as_in_etcd() {
    let newer_than_3_4: &[(&str, &[&str])] = &[
        // storage_version, db_size_quota, downgrade_info
        ("Status", &["11", "12", "13"]),
        // 3.4 sends the alarm list without a header; 3.5 added it
        ("Alarm(GET)", &["1", "1.1", "1.2", "1.3", "1.4"]),
        // hash_revision
        ("HashKV(0)", &["4"]),
        ("HashKV(3)", &["4"]),
        // version (the storage version of the member that made the snapshot)
        ("Snapshot first", &["4"]),
        ("Snapshot last", &["4"]),
    ];
    let etcd = maintenance_field_sets(&Server::start(Kind::Etcd).await).await;
    for kind in [Kind::Memory, Kind::Rocks] {
        let ours = maintenance_field_sets(&Server::start(kind).await).await;
        let mut differences = Vec::new();
        for ((rpc, on_etcd), (_, on_metastore)) in etcd.iter().zip(&ours) {
            let newer = newer_than_3_4
                .iter()
                .find(|(r, _)| r == rpc)
                .map_or(&[][..], |(_, f)| f);
            let on_metastore = on_metastore.clone().map(|fields| {
                fields
                    .into_iter()
                    .filter(|f| !newer.contains(&f.as_str()))
                    .collect::<Vec<_>>()
            });
            if &on_metastore != on_etcd {
                differences.push(format!(
                    "{rpc}: etcd {on_etcd:?}, metastore {on_metastore:?}"
                ));
            }
        }
        assert!(
            differences.is_empty(),
            "on {kind:?}:\n{}",
            differences.join("\n")
        );
        // The 3.6 fields are there.
        let status = &ours[0].1.as_ref().unwrap();
        assert!(
            ["11", "12", "13"]
                .iter()
                .all(|f| status.contains(&f.to_string())),
            "{status:?}"
        );
    }
}

/// The third-party `etcd-client` crate's maintenance calls.
async fn etcd_client_maintenance(kind: Kind) {
    let server = Server::start(kind).await;
    let mut client = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("connect");
    client.put("k", "v", None).await.unwrap();

    let status = client.status().await.unwrap();
    assert_eq!(status.version(), "3.6.0");
    assert_eq!(status.db_size_quota(), 2 * 1024 * 1024 * 1024);
    assert!(status.errors().is_empty());
    let me = status.leader();
    assert_eq!(status.header().unwrap().member_id(), me);

    let hash = client.hash_kv(0).await.unwrap();
    assert_eq!(hash.hash_revision(), 2);
    let alarms = support::alarm_list(&mut client).await.unwrap();
    assert!(alarms.alarms().is_empty());
    client.defragment().await.unwrap();
    client.move_leader(me).await.unwrap();

    // The stream: chunks whose remaining_bytes count down to 0, then the SHA-256.
    let mut stream = client.snapshot().await.unwrap();
    let mut bytes = Vec::new();
    let mut last_remaining = u64::MAX;
    while let Some(msg) = stream.message().await.unwrap() {
        assert!(msg.remaining_bytes() <= last_remaining);
        last_remaining = msg.remaining_bytes();
        bytes.extend_from_slice(msg.blob());
    }
    assert_eq!(last_remaining, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.db");
    std::fs::write(&path, &bytes).unwrap();
    metastore_maintenance_api::snapshot::verify_file(&path).expect("trailing SHA-256 matches");
}

per_engine!(etcd_client_maintenance);

/// `metastore snapshot restore`: a snapshot of a single member (MetaStore's own file, or etcd's
/// bbolt database saved from real etcd) becomes a new 3-member cluster whose members run
/// different engines; the data, leases, HashKV and revision carry over, the membership is the
/// new one, and the cluster takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_creates_a_new_cluster() {
    restore_into_a_new_cluster(Kind::Rocks).await;
}

/// The same from a snapshot real etcd saved: MetaStore takes etcd's data in one command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_of_an_etcd_snapshot_creates_a_new_cluster() {
    restore_into_a_new_cluster(Kind::Etcd).await;
}

async fn restore_into_a_new_cluster(source_kind: Kind) {
    use std::process::Stdio;
    let source = Server::start(source_kind).await;
    for i in 0..50 {
        etcdctl(&source, &["put", &format!("key{i}"), &format!("value{i}")]);
    }
    etcdctl(&source, &["del", "key1", "--prefix"]);
    // A compaction, whose mark the restored cluster keeps.
    etcdctl(&source, &["compact", "20", "--physical"]);
    // A lease with a key, which the restored cluster keeps.
    let granted = etcdctl(&source, &["lease", "grant", "600"]);
    let lease_id = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    etcdctl(
        &source,
        &["put", "leased", "v", &format!("--lease={lease_id}")],
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.db");
    // The snapshot is taken while a client keeps writing.
    let mut kv = source.kv().await;
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = acknowledged.clone();
    let writer = tokio::spawn(async move {
        for i in 0..u64::MAX {
            let req = PutRequest {
                key: format!("load{}", i % 200).into_bytes(),
                value: vec![b'w'; 512],
                ..Default::default()
            };
            if kv.put(req).await.is_err() {
                break;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcdctl(&source, &["snapshot", "save", file.to_str().unwrap()]);
    // The writer goes on until puts acknowledged after the save has returned exist; on a busy
    // machine the save may finish between two of its puts.
    let at_save = acknowledged.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acknowledged.load(std::sync::atomic::Ordering::SeqCst) < at_save + 3
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writer.abort();
    // The revision the file holds, and the source's HashKV at that revision.
    let described = Command::new(metastore_bin())
        .args(["snapshot", "status", file.to_str().unwrap(), "-w", "json"])
        .output()
        .unwrap();
    let source_rev = json_u64(&String::from_utf8(described.stdout).unwrap(), "revision");
    let rev = source_rev.to_string();
    let source_hash = json_u64(
        &etcdctl(
            &source,
            &["endpoint", "hashkv", "--rev", &rev, "-w", "json"],
        ),
        "hash",
    );
    let source_latest = json_u64(
        &etcdctl(&source, &["endpoint", "status", "-w", "json"]),
        "revision",
    );
    assert!(
        source_latest > source_rev,
        "the writes did not continue past the snapshot"
    );
    drop(source);

    // Refuses a damaged file (its header, or the SHA-256 at its end), writing no member.
    let original = std::fs::read(&file).unwrap();
    for at in [20, original.len() - 1] {
        let damaged = dir.path().join("damaged.db");
        let mut bytes = original.clone();
        bytes[at] ^= 0xff;
        std::fs::write(&damaged, bytes).unwrap();
        let never = dir.path().join("never");
        let refused = Command::new(metastore_bin())
            .args([
                "snapshot",
                "restore",
                damaged.to_str().unwrap(),
                "--data-dir",
            ])
            .arg(&never)
            .output()
            .unwrap();
        assert!(!refused.status.success(), "byte {at}");
        assert!(!never.join("member").exists(), "byte {at}");
    }

    let ports = support::free_port_pairs(3);
    let cluster = support::comma_list(&ports, |i, (_, peer)| {
        format!("r{i}=http://127.0.0.1:{peer}")
    });
    let engines = ["memory", "rocksdb", "memory"];
    let mut children = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let data_dir = dir.path().join(format!("r{i}"));
        let peer_url = format!("http://127.0.0.1:{peer}");
        let client_url = format!("http://127.0.0.1:{client}");
        let restored = Command::new(metastore_bin())
            .args(["snapshot", "restore", file.to_str().unwrap()])
            .args(["--name", &format!("r{i}"), "--initial-cluster", &cluster])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--storage-engine", engines[i], "--data-dir"])
            .arg(&data_dir)
            .output()
            .unwrap();
        support::assert_success(&restored);
        children.push(
            Command::new(metastore_bin())
                .args(["--name", &format!("r{i}"), "--initial-cluster", &cluster])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--storage-engine", engines[i], "--data-dir"])
                .arg(&data_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let _children = support::KillOnDrop(children);
    let endpoints = support::comma_list(&ports, |_, (client, _)| format!("127.0.0.1:{client}"));
    let ctl = |args: &[&str]| {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .args(args)
            .output()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ctl(&["put", "after-restore", "1"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "restored cluster never took a write"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = String::from_utf8(ctl(&["endpoint", "status", "-w", "json"]).stdout).unwrap();
    // One more revision than the source: the write above.
    assert_eq!(json_u64(&status, "revision"), source_rev + 1, "{status}");
    let hashes = String::from_utf8(
        ctl(&[
            "endpoint",
            "hashkv",
            "--rev",
            &source_rev.to_string(),
            "-w",
            "json",
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(
        hashes.matches(&format!("\"hash\":{source_hash}")).count(),
        3,
        "{hashes}"
    );
    let members = String::from_utf8(ctl(&["member", "list"]).stdout).unwrap();
    for i in 0..3 {
        assert!(members.contains(&format!(", started, r{i}, ")), "{members}");
    }
    let got = String::from_utf8(ctl(&["get", "key42", "--print-value-only"]).stdout).unwrap();
    assert_eq!(got.trim(), "value42");
    let gone = String::from_utf8(ctl(&["get", "key1", "--prefix", "--keys-only"]).stdout).unwrap();
    assert!(gone.trim().is_empty(), "{gone}");
    let lease =
        String::from_utf8(ctl(&["lease", "timetolive", &lease_id, "--keys"]).stdout).unwrap();
    assert!(lease.contains("attached keys([leased])"), "{lease}");
    let compacted = ctl(&["get", "key5", "--rev", "10"]);
    assert!(
        String::from_utf8_lossy(&compacted.stderr).contains("required revision has been compacted"),
        "{compacted:?}"
    );
}

/// Downgrade answers with etcd's rules and errors: MetaStore has no older release to
/// downgrade to, so every target is refused and there is never a job to cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_refuses_with_etcds_errors() {
    use metastore_proto::etcdserverpb::downgrade_request::DowngradeAction;
    use metastore_proto::etcdserverpb::DowngradeRequest;
    let server = Server::start(Kind::Memory).await;
    let mut m = maintenance(&server).await;
    let call = |action: DowngradeAction, version: &str| DowngradeRequest {
        action: action as i32,
        version: version.to_string(),
    };
    for (action, version, code, message) in [
        (
            DowngradeAction::Validate,
            "3.5",
            Code::InvalidArgument,
            "etcdserver: invalid downgrade target version",
        ),
        (
            DowngradeAction::Enable,
            "3.5.0",
            Code::InvalidArgument,
            "etcdserver: invalid downgrade target version",
        ),
        (
            DowngradeAction::Validate,
            "three",
            Code::InvalidArgument,
            "etcdserver: wrong downgrade target version format",
        ),
        (
            DowngradeAction::Cancel,
            "",
            Code::FailedPrecondition,
            "etcdserver: no inflight downgrade job",
        ),
    ] {
        let err = m.downgrade(call(action, version)).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (code, message),
            "{action:?} {version}"
        );
    }
    // Nothing changed: Status reports no downgrade.
    let status = m.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(!status.downgrade_info.unwrap().enabled);
}

/// Auth moves with an etcd snapshot: users (their bcrypt hashes), roles, permissions and the
/// enabled flag. A member restored from etcd's file refuses a caller without credentials, lets
/// root in with etcd's password, and keeps alice's read-only role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_snapshot_restores_its_users_and_roles() {
    use std::process::Stdio;
    let etcd = Server::start(Kind::Etcd).await;
    for args in [
        &["put", "k", "v"][..],
        &["user", "add", "root:rootpw"],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "reader"],
        &["role", "grant-permission", "reader", "read", "k"],
        &["user", "add", "alice:alicepw"],
        &["user", "grant-role", "alice", "reader"],
        &["auth", "enable"],
    ] {
        etcdctl(&etcd, args);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcd.db");
    etcdctl(
        &etcd,
        &[
            "--user",
            "root:rootpw",
            "snapshot",
            "save",
            file.to_str().unwrap(),
        ],
    );
    drop(etcd);

    let ports = support::free_port_pairs(1);
    let (client, peer) = ports[0];
    let peer_url = format!("http://127.0.0.1:{peer}");
    let client_url = format!("http://127.0.0.1:{client}");
    let member = |command: &mut Command| {
        command
            .args([
                "--name",
                "r0",
                "--initial-cluster",
                &format!("r0={peer_url}"),
            ])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--storage-engine", "rocksdb", "--data-dir"])
            .arg(dir.path().join("r0"));
    };
    let mut restore = Command::new(metastore_bin());
    restore.args(["snapshot", "restore", file.to_str().unwrap()]);
    member(&mut restore);
    support::assert_success(&restore.output().unwrap());
    let mut serve = Command::new(metastore_bin());
    serve
        .args(["--listen-peer-urls", &peer_url])
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url]);
    member(&mut serve);
    let _server = support::KillOnDrop(vec![serve
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()]);
    let ctl = |args: &[&str]| {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={client_url}"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ctl(&["--user", "root:rootpw", "get", "k"]).0 {
        assert!(std::time::Instant::now() < deadline, "root never got in");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        ctl(&["--user", "root:rootpw", "get", "k", "--print-value-only"]),
        (true, "v\n".into())
    );
    assert!(
        !ctl(&["get", "k"]).0,
        "a caller without credentials was let in"
    );
    assert!(
        !ctl(&["--user", "root:wrong", "get", "k"]).0,
        "a wrong password was taken"
    );
    assert_eq!(
        ctl(&["--user", "alice:alicepw", "get", "k", "--print-value-only"]),
        (true, "v\n".into())
    );
    assert!(
        !ctl(&["--user", "alice:alicepw", "put", "k", "w"]).0,
        "alice's role is read-only"
    );
    let users = ctl(&["--user", "root:rootpw", "user", "list"]).1;
    assert_eq!(users, "alice\nroot\n");
}

/// `metastore snapshot restore` of a bbolt file that is not etcd's backend, or whose history
/// misses a revision above its compaction mark, is refused with a clear error, and no member
/// directory is written.
#[test]
fn a_restore_refuses_a_foreign_database_and_a_history_with_a_gap() {
    use metastore_bbolt::etcd_schema::{KeyBucketKey, Revision};
    let dir = tempfile::tempdir().unwrap();
    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;
    let write = |name: &str, buckets: &[(&str, Pairs)]| {
        let path = dir.path().join(name);
        let file = std::fs::File::create(&path).unwrap();
        let mut w = metastore_bbolt::Writer::new(file, metastore_bbolt::DEFAULT_PAGE_SIZE).unwrap();
        for (bucket, pairs) in buckets {
            w.bucket(bucket.as_bytes()).unwrap();
            for (k, v) in pairs {
                w.put(k, v).unwrap();
            }
        }
        w.finish().unwrap();
        path
    };
    let revision = |main| {
        KeyBucketKey {
            revision: Revision { main, sub: 0 },
            tombstone: false,
        }
        .encode()
    };
    let foreign = write(
        "foreign.db",
        &[("foo", vec![(b"k".to_vec(), b"v".to_vec())])],
    );
    let gap = write(
        "gap.db",
        &[
            (
                "key",
                [2, 3, 5]
                    .into_iter()
                    .map(|main| (revision(main), b"v".to_vec()))
                    .collect(),
            ),
            ("meta", vec![]),
        ],
    );
    for (file, expected) in [
        (foreign, "not etcd's backend"),
        (gap, "revision 4 is missing"),
    ] {
        let never = dir.path().join("never");
        let refused = Command::new(metastore_bin())
            .args(["snapshot", "restore", file.to_str().unwrap()])
            .args(["--skip-hash-check", "--data-dir"])
            .arg(&never)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{file:?} restored");
        assert!(stderr.contains(expected), "{file:?}: {stderr}");
        assert!(!never.join("member").exists(), "{file:?} left a member");
    }
}
