//! Crash points (compiled in with the `failpoints` feature, which `cargo xtask test` turns on):
//! a member is started with `FAILPOINTS` arming one point to panic, and a panic aborts the
//! process right there, as a crash at that instant would. It is then started again without the
//! point armed, and must have lost nothing it acknowledged, keep the history it had, and (in a
//! cluster) converge with the others, HashKV included.
//!
//! The points: before and after the WAL fsync, between the WAL and apply, inside a snapshot save
//! (the memory engine writes a file; RocksDB persists in place and writes a WAL marker), inside a
//! snapshot install from the leader (before the restore, after an engine batch), inside
//! compaction (after a batch) and inside defragment (after a bucket).

use crate::support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{
    CompactionRequest, DefragmentRequest, HashKvRequest, PutRequest, RangeRequest,
};
use support::cluster::Cluster;
use support::Kind;
use tonic::transport::Channel;

/// Bound of one call.
const CALL: Duration = Duration::from_secs(5);
/// Bound of the wait for an armed member to reach its crash point and exit.
const CRASH: Duration = Duration::from_secs(60);
/// Most writes made while waiting for a crash point.
const MAX_WRITES: usize = 20_000;

per_engine!(
    crash_around_the_wal_fsync,
    crash_between_the_wal_and_apply,
    crash_while_saving_a_snapshot,
    crash_while_installing_a_snapshot,
    crash_during_compaction,
    crash_during_defragment,
);

/// Before and after the fsync of a batch of entries: every acknowledged put survives.
async fn crash_around_the_wal_fsync(kind: Kind) {
    for point in ["raft::wal::before_fsync", "raft::wal::after_fsync"] {
        writes_survive_a_crash_at(kind, point, "40*off->panic", &[]).await;
    }
}

/// Entries committed and durable in the WAL but not applied: the restart applies them.
async fn crash_between_the_wal_and_apply(kind: Kind) {
    writes_survive_a_crash_at(kind, "raft::before_apply", "40*off->panic", &[]).await;
}

/// Inside the second snapshot of a member taking one every 50 entries. The memory engine
/// writes a snapshot file (temporary name, rename, WAL marker); RocksDB flushes its state in
/// place, then writes the WAL marker.
async fn crash_while_saving_a_snapshot(kind: Kind) {
    let points: &[&str] = match kind {
        Kind::Memory => &[
            "raft::snapshot::before_rename",
            "raft::snapshot::after_rename",
            "raft::snapshot::after_marker",
        ],
        _ => &["raft::snapshot::persisted", "raft::snapshot::after_marker"],
    };
    for point in points {
        writes_survive_a_crash_at(kind, point, "1*off->panic", &["--snapshot-count", "50"]).await;
    }
}

/// One member of one, `point` armed with `spec`: writes until it crashes there, then a restart
/// without the point must show every acknowledged put, and take writes again.
async fn writes_survive_a_crash_at(kind: Kind, point: &str, spec: &str, extra: &[&str]) {
    eprintln!("crash point {point}");
    let mut c = Cluster::start(kind, 1, extra).await;
    c.set_failpoints(0, Some(&format!("{point}={spec}")));
    c.restart(0).await;
    let acked = write_until_exit(&mut c, 0, 0).await;
    assert_crashed_at(&mut c, 0, point).await;
    c.set_failpoints(0, None);
    c.restart(0).await;
    assert_has(&c, 0, &acked).await;
    // It goes on: more writes, through more snapshots where they are on.
    let mut kv = c.kv(0).await;
    for n in 0..120 {
        put(&mut kv, &format!("after/{n:03}"), "v")
            .await
            .unwrap_or_else(|e| panic!("put after the restart ({point}): {e}"));
    }
}

/// A follower behind the leader's log catches up by snapshot, and crashes while installing
/// it: before the state machine restores it, or after the engine wrote a batch of it. Started
/// again, it installs the snapshot and converges with the others.
async fn crash_while_installing_a_snapshot(kind: Kind) {
    for point in [
        "raft::snapshot::before_install",
        "storage::import::batch_written",
    ] {
        eprintln!("crash point {point}");
        let mut c = Cluster::start(kind, 3, &["--snapshot-count", "100"]).await;
        let leader = c.wait_leader().await;
        let follower = (leader + 1) % 3;
        c.kill(follower);
        // Past the 5,000 entries a leader keeps for slow followers: only a snapshot will do.
        put_many(&c, leader, 5_600).await;
        c.set_failpoints(follower, Some(&format!("{point}=panic")));
        let status = c.restart_expecting_exit(follower, CRASH).await;
        assert!(!status.success(), "{point}: exited with {status}");
        assert_log_names(&c, follower, point);
        let crashed_log = c.log(follower).len();
        c.set_failpoints(follower, None);
        c.restart(follower).await;
        c.assert_converged().await;
        // The snapshot is either installed again from the leader, or (once the file and its WAL
        // record were durable before the crash) restored from the file at start.
        let log = c.log(follower);
        let since_crash = &log[crashed_log..];
        assert!(
            since_crash.contains("installed snapshot from the leader")
                || since_crash.contains("restored state machine from snapshot"),
            "{point}: the follower caught up without a snapshot:\n{since_crash}"
        );
    }
}

/// A compaction in batches of 100 keys crashes after its second batch. Started again, the
/// member keeps the compaction mark, serves the kept history unchanged, and finishes the
/// compaction (HashKV reports the mark).
async fn crash_during_compaction(kind: Kind) {
    let point = "mvcc::compaction::batch_committed";
    let mut c = Cluster::start(kind, 1, &["--experimental-compaction-batch-limit", "100"]).await;
    let mut kv = c.kv(0).await;
    for round in 0..20 {
        for key in 0..50 {
            put(&mut kv, &format!("k/{key:02}"), &format!("v{round}"))
                .await
                .expect("put");
        }
    }
    let latest = all_keys(&mut kv, 0).await;
    let compact_rev = 601;
    let kept = all_keys(&mut kv, compact_rev).await;
    c.set_failpoints(0, Some(&format!("{point}=1*off->panic")));
    c.restart(0).await;
    let mut kv = c.kv(0).await;
    // The call may be answered before the background batches run, or fail as the member goes.
    let _ = tokio::time::timeout(
        CALL,
        kv.compact(CompactionRequest {
            revision: compact_rev,
            physical: true,
        }),
    )
    .await;
    assert_crashed_at(&mut c, 0, point).await;
    c.set_failpoints(0, None);
    c.restart(0).await;
    let mut kv = c.kv(0).await;
    assert_eq!(all_keys(&mut kv, 0).await, latest, "latest keys changed");
    assert_eq!(
        all_keys(&mut kv, compact_rev).await,
        kept,
        "the keys at the compaction revision changed"
    );
    let refused = kv
        .range(RangeRequest {
            key: b"k/".to_vec(),
            range_end: b"k0".to_vec(),
            revision: compact_rev - 1,
            ..Default::default()
        })
        .await
        .expect_err("a revision below the mark is compacted");
    assert_eq!(
        refused.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    let mut maintenance = MaintenanceClient::new(c.channel(0).await.expect("connect"));
    let hash = maintenance
        .hash_kv(HashKvRequest { revision: 0 })
        .await
        .expect("hashkv")
        .into_inner();
    assert_eq!(hash.compact_revision, compact_rev);
}

/// Defragment crashes after its first bucket. Started again, the member serves the same keys
/// and HashKV, and a defragment then completes.
async fn crash_during_defragment(kind: Kind) {
    let point = "storage::defragment::bucket_done";
    let mut c = Cluster::start(kind, 1, &[]).await;
    let mut kv = c.kv(0).await;
    for n in 0..300 {
        put(&mut kv, &format!("d/{n:03}"), &"x".repeat(200))
            .await
            .expect("put");
    }
    for n in (0..300).step_by(2) {
        kv.delete_range(support::delete_req(&format!("d/{n:03}"), ""))
            .await
            .expect("delete");
    }
    let before = all_keys(&mut kv, 0).await;
    let hash_before = hash_kv(&c, 0).await;
    c.set_failpoints(0, Some(&format!("{point}=panic")));
    c.restart(0).await;
    let mut maintenance = MaintenanceClient::new(c.channel(0).await.expect("connect"));
    let _ = tokio::time::timeout(CALL, maintenance.defragment(DefragmentRequest {})).await;
    assert_crashed_at(&mut c, 0, point).await;
    c.set_failpoints(0, None);
    c.restart(0).await;
    let mut kv = c.kv(0).await;
    assert_eq!(all_keys(&mut kv, 0).await, before);
    assert_eq!(hash_kv(&c, 0).await, hash_before);
    let mut maintenance = MaintenanceClient::new(c.channel(0).await.expect("connect"));
    maintenance
        .defragment(DefragmentRequest {})
        .await
        .expect("defragment after the restart");
}

/// Puts `crash/NNNNN` through member `through` until member `armed` exits (or
/// [`MAX_WRITES`]); returns the acknowledged keys and values.
async fn write_until_exit(
    c: &mut Cluster,
    through: usize,
    armed: usize,
) -> BTreeMap<String, String> {
    let mut kv = c.kv(through).await;
    let mut acked = BTreeMap::new();
    for n in 0..MAX_WRITES {
        let (key, value) = (format!("crash/{n:05}"), format!("value-{n}"));
        match put(&mut kv, &key, &value).await {
            Ok(_) => {
                acked.insert(key, value);
            }
            Err(_) if !c.live().contains(&armed) => break,
            // A put refused while the member still runs (e.g. during its restart) is retried
            // under the next key: its outcome is unknown, and it is not counted.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        if n % 64 == 0 && !c.live().contains(&armed) {
            break;
        }
    }
    assert!(!acked.is_empty(), "no put was acknowledged");
    acked
}

/// Member `i` exits on its own (bounded by [`CRASH`]) and its log names the crash point.
async fn assert_crashed_at(c: &mut Cluster, i: usize, point: &str) {
    let status = c.wait_crash(i, CRASH).await;
    assert!(!status.success(), "{point}: exited with {status}");
    assert_log_names(c, i, point);
}

fn assert_log_names(c: &Cluster, i: usize, point: &str) {
    let log = c.log(i);
    assert!(
        log.contains(&format!("failpoint {point} panic")),
        "m{} did not stop at {point}; its log:\n{log}",
        i + 1
    );
}

/// Every key of `acked` has its value on member `i` (linearizable reads).
async fn assert_has(c: &Cluster, i: usize, acked: &BTreeMap<String, String>) {
    let mut kv = c.kv(i).await;
    let found: BTreeMap<String, String> = all_keys(&mut kv, 0)
        .await
        .into_iter()
        .filter(|(k, _)| k.starts_with("crash/"))
        .collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|(k, v)| found.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged puts lost, first {:?}",
        lost.len(),
        acked.len(),
        lost.first()
    );
}

async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) -> Result<i64, String> {
    let req = PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    };
    match tokio::time::timeout(CALL, kv.put(req)).await {
        Ok(Ok(resp)) => Ok(resp.into_inner().header.map_or(0, |h| h.revision)),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err(format!("no answer within {CALL:?}")),
    }
}

/// `count` puts over 500 keys through member `i`, 32 at a time, all acknowledged.
async fn put_many(c: &Cluster, i: usize, count: usize) {
    let kv = c.kv(i).await;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let mut kv = kv.clone();
        tasks.spawn(async move {
            let mut n = worker;
            while n < count {
                put(
                    &mut kv,
                    &format!("bulk/{:03}", n % 500),
                    &format!("value-{n}"),
                )
                .await
                .unwrap_or_else(|e| panic!("put {n}: {e}"));
                n += 32;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("writer task");
    }
}

/// Every key and value (at `revision`, 0 for the latest), linearizable.
async fn all_keys(kv: &mut KvClient<Channel>, revision: i64) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let req = RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision,
            ..Default::default()
        };
        match tokio::time::timeout(CALL, kv.range(req)).await {
            Ok(Ok(resp)) => {
                return resp
                    .into_inner()
                    .kvs
                    .into_iter()
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(&kv.key).into_owned(),
                            String::from_utf8_lossy(&kv.value).into_owned(),
                        )
                    })
                    .collect()
            }
            // Right after a restart the member may still be electing itself.
            other => {
                assert!(Instant::now() < deadline, "range failed: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// HashKV of the latest revision on member `i`: (revision, hash).
async fn hash_kv(c: &Cluster, i: usize) -> (i64, u32) {
    let mut maintenance = MaintenanceClient::new(c.channel(i).await.expect("connect"));
    let resp = maintenance
        .hash_kv(HashKvRequest { revision: 0 })
        .await
        .expect("hashkv")
        .into_inner();
    (resp.header.map_or(0, |h| h.revision), resp.hash)
}
