//! A snapshot saved from MetaStore is etcd's: `etcdctl snapshot status` and `snapshot restore`
//! (3.4) take it, and real etcd 3.4 started on the restored directory serves the same history,
//! HashKV, leases and auth as the MetaStore member it came from. Also the figures of
//! `snapshot save` against a large keyspace (an ignored test, run by hand).

use crate::support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest, PutRequest};
use serde_json::Value;
use support::{Kind, Server};

pub(crate) const ROOT: &str = "root:rootpw";

/// etcdctl 3.4 against `endpoints`, as `user` if given.
pub(crate) fn etcdctl_as(endpoints: &str, user: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"));
    if let Some(user) = user {
        cmd.args(["--user", user]);
    }
    cmd.args(args).output().expect("etcdctl")
}

/// etcdctl as root; panics unless it succeeds; its stdout.
pub(crate) fn root_ctl(endpoints: &str, args: &[&str]) -> String {
    let out = etcdctl_as(endpoints, Some(ROOT), args);
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

pub(crate) fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The source of the test's snapshot: history (several puts per key), deletions, a physical
/// compaction, a lease with keys, and auth enabled (root, alice with a read-only role).
/// Returns the lease id in hex.
pub(crate) async fn fill(endpoint: &str) -> String {
    let mut kv = KvClient::connect(endpoint.to_string())
        .await
        .expect("connect");
    for i in 0..200u32 {
        let put = PutRequest {
            key: format!("k{:02}", i % 40).into_bytes(),
            value: format!("v{i}-{}", "x".repeat((i as usize * 13) % 300)).into_bytes(),
            ..Default::default()
        };
        kv.put(put).await.unwrap();
    }
    kv.delete_range(DeleteRangeRequest {
        key: b"k10".to_vec(),
        range_end: b"k15".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    kv.compact(CompactionRequest {
        revision: 120,
        physical: true,
    })
    .await
    .unwrap();
    for i in 0..30u32 {
        let put = PutRequest {
            key: format!("k{:02}", i % 20).into_bytes(),
            value: format!("after-compaction-{i}").into_bytes(),
            ..Default::default()
        };
        kv.put(put).await.unwrap();
    }
    kv.delete_range(DeleteRangeRequest {
        key: b"k03".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();

    let granted = root_ctl(endpoint, &["lease", "grant", "600", "-w", "json"]);
    let lease_id = format!("{:x}", json(&granted)["ID"].as_i64().expect("lease id"));
    for key in ["leased/a", "leased/b"] {
        root_ctl(endpoint, &["put", key, "v", &format!("--lease={lease_id}")]);
    }
    for args in [
        &["user", "add", ROOT][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "reader"],
        &["role", "grant-permission", "reader", "read", "k", "l"],
        &["user", "add", "alice:alicepw"],
        &["user", "grant-role", "alice", "reader"],
        &["auth", "enable"],
    ] {
        root_ctl(endpoint, args);
    }
    lease_id
}

/// Every key and value at the latest revision, as etcdctl's JSON gives them (base64).
pub(crate) fn all_kvs(endpoint: &str) -> Value {
    let got = json(&root_ctl(
        endpoint,
        &["get", "", "--from-key", "-w", "json"],
    ));
    assert!(got["count"].as_u64().unwrap() > 30, "{got}");
    got["kvs"].clone()
}

/// HashKV at `revision` and the compact revision it saw.
pub(crate) fn hashkv(endpoint: &str, revision: u64) -> (u64, u64) {
    let out = root_ctl(
        endpoint,
        &[
            "endpoint",
            "hashkv",
            "--rev",
            &revision.to_string(),
            "-w",
            "json",
        ],
    );
    let answer = &json(&out)[0]["HashKV"];
    (
        answer["hash"].as_u64().expect("hash"),
        answer["compact_revision"]
            .as_u64()
            .expect("compact revision"),
    )
}

async fn restored_into_etcd(kind: Kind) {
    let source = Server::start(kind).await;
    let endpoint = source.endpoint();
    let lease_id = fill(&endpoint).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metastore.db");
    let path = file.to_str().unwrap();
    root_ctl(&endpoint, &["snapshot", "save", path]);

    let status = json(&root_ctl(&endpoint, &["endpoint", "status", "-w", "json"]));
    let revision = status[0]["Status"]["header"]["revision"].as_u64().unwrap();
    let source_hash = hashkv(&endpoint, revision);
    assert_eq!(source_hash.1, 120, "the compaction");
    let source_kvs = all_kvs(&endpoint);
    drop(source);

    // etcdctl reads the file: the source's revision; its hash is a CRC over the file's buckets,
    // not HashKV, and `metastore snapshot status` computes the same.
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json", path])
        .output()
        .unwrap();
    support::assert_success(&out);
    let file_status = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(file_status["revision"].as_u64(), Some(revision));
    // Revisions since the compaction (and the one each live key keeps), leases, users, roles,
    // members and meta: more pairs than live keys.
    assert!(
        file_status["totalKey"].as_u64().unwrap() > 40,
        "{file_status}"
    );
    let ours = Command::new(support::metastore_bin())
        .args(["snapshot", "status", "-w", "json", path])
        .output()
        .unwrap();
    support::assert_success(&ours);
    assert_eq!(ours.stdout, out.stdout);

    // etcdctl restores it and etcd 3.4 serves it.
    let (client, peer) = support::free_port_pairs(1)[0];
    let peer_url = format!("http://127.0.0.1:{peer}");
    let client_url = format!("http://127.0.0.1:{client}");
    let data_dir = dir.path().join("etcd");
    let restored = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore", path, "--name", "m1", "--data-dir"])
        .arg(&data_dir)
        .args(["--initial-cluster", &format!("m1={peer_url}")])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .output()
        .unwrap();
    support::assert_success(&restored);
    let etcd = Command::new("etcd")
        .args(["--name", "m1", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("m1={peer_url}")])
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd");
    let _etcd = support::KillOnDrop(vec![etcd]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcdctl_as(&client_url, Some(ROOT), &["get", "k00"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "restored etcd never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let source = Source {
        revision,
        hash: source_hash,
        kvs: source_kvs,
        lease_id,
    };
    assert_serves(&client_url, &source);
}

/// What a restored member must serve: the source's state when its snapshot was saved.
pub(crate) struct Source {
    /// The revision in the file.
    pub revision: u64,
    /// HashKV at that revision and the compact revision (120, [`fill`]'s compaction).
    pub hash: (u64, u64),
    /// [`all_kvs`] of the source.
    pub kvs: Value,
    /// [`fill`]'s lease, in hex.
    pub lease_id: String,
}

/// Checks that the member at `client_url`, restored from a snapshot of a store [`fill`]ed,
/// serves `source`: HashKV, revision, keys, the compaction, the lease with its keys, and auth.
pub(crate) fn assert_serves(client_url: &str, source: &Source) {
    let (revision, source_hash, source_kvs, lease_id) =
        (source.revision, source.hash, &source.kvs, &source.lease_id);
    assert_eq!(hashkv(client_url, revision), source_hash);
    let status = json(&root_ctl(client_url, &["endpoint", "status", "-w", "json"]));
    assert_eq!(
        status[0]["Status"]["header"]["revision"].as_u64(),
        Some(revision)
    );
    assert_eq!(&all_kvs(client_url), source_kvs);
    let compacted = etcdctl_as(client_url, Some(ROOT), &["get", "k01", "--rev", "100"]);
    assert!(
        String::from_utf8_lossy(&compacted.stderr).contains("required revision has been compacted"),
        "{compacted:?}"
    );

    // The lease, its TTL and its keys.
    let ttl = json(&root_ctl(
        client_url,
        &["lease", "timetolive", lease_id, "--keys", "-w", "json"],
    ));
    assert_eq!(ttl["granted-ttl"].as_i64(), Some(600), "{ttl}");
    assert!(ttl["ttl"].as_i64().unwrap() > 0, "{ttl}");
    assert_eq!(ttl["keys"].as_array().map(Vec::len), Some(2), "{ttl}");

    // Auth is on: no user, no answer; alice reads with her password but may not write.
    let anonymous = etcdctl_as(client_url, None, &["get", "k00"]);
    assert!(!anonymous.status.success(), "{anonymous:?}");
    let read = etcdctl_as(client_url, Some("alice:alicepw"), &["get", "k00"]);
    support::assert_success(&read);
    assert!(String::from_utf8_lossy(&read.stdout).contains("after-compaction"));
    let wrong = etcdctl_as(client_url, Some("alice:wrong"), &["get", "k00"]);
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("authentication failed"),
        "{wrong:?}"
    );
    let write = etcdctl_as(client_url, Some("alice:alicepw"), &["put", "k00", "x"]);
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("permission denied"),
        "{write:?}"
    );
}

per_engine!(restored_into_etcd);

/// Resident memory of a process, from `/proc/PID/status`: (anonymous, file-backed) in KiB.
/// etcd's database is a file it maps, so its pages count as file-backed memory.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("RssAnon:")?, field("RssFile:")?))
}

/// Loads `keys` keys of `value_bytes` each with 64 concurrent writers.
async fn load(server: &Server, keys: u32, value_bytes: usize) {
    let writers = 64u32;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut kv = server.kv().await;
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < keys {
                let put = PutRequest {
                    key: format!("load/{i:08}").into_bytes(),
                    value: vec![b'a' + (i % 26) as u8; value_bytes],
                    ..Default::default()
                };
                kv.put(put).await.expect("put");
                i += writers;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// `snapshot save` figures against a large keyspace, for MetaStore's two engines and etcd:
/// resident memory before and at its peak during the save, time and throughput. Run by hand
/// (`cargo nextest run --run-ignored only -E 'test(snapshot_save_figures)' --no-capture`);
/// `SNAPSHOT_FIGURES_KEYS` (default 262144) keys of `SNAPSHOT_FIGURES_VALUE_BYTES` (4096).
/// Prints the figures, asserts nothing about them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: minutes of loading, a GiB of data per server"]
async fn snapshot_save_figures() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let keys = env("SNAPSHOT_FIGURES_KEYS", 262_144) as u32;
    let value_bytes = env("SNAPSHOT_FIGURES_VALUE_BYTES", 4096) as usize;
    for kind in [Kind::Memory, Kind::Rocks, Kind::Etcd] {
        // No raft snapshot file of the whole keyspace while loading (memory engine).
        let server = Server::start_with(
            kind,
            &[
                "--quota-backend-bytes",
                "8589934592",
                "--snapshot-count",
                "10000000",
            ],
        )
        .await;
        let started = Instant::now();
        load(&server, keys, value_bytes).await;
        let loaded_secs = started.elapsed().as_secs_f64();
        let pid = server.pid().expect("running");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = rss_kib(pid).expect("rss");

        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = dir.path().join("figures.db");
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut peak = (0, 0);
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Some((anon, file)) = rss_kib(pid) {
                        peak = (peak.0.max(anon), peak.1.max(file));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                peak
            })
        };
        let started = Instant::now();
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", server.endpoint()))
            .args(["snapshot", "save"])
            .arg(&file)
            .output()
            .unwrap();
        let save_secs = started.elapsed().as_secs_f64();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let peak = sampler.join().unwrap();
        support::assert_success(&out);
        let size = std::fs::metadata(&file).unwrap().len();
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "{kind:?}: {keys} keys x {value_bytes} B loaded in {loaded_secs:.0} s; snapshot \
             {:.0} MiB in {save_secs:.1} s = {:.0} MiB/s; RSS anon {:.0} -> peak {:.0} MiB \
             (+{:.0}), file-backed {:.0} -> peak {:.0} MiB (+{:.0})",
            size as f64 / 1048576.0,
            size as f64 / 1048576.0 / save_secs,
            mib(idle.0),
            mib(peak.0),
            mib(peak.0.saturating_sub(idle.0)),
            mib(idle.1),
            mib(peak.1),
            mib(peak.1.saturating_sub(idle.1)),
        );
    }
}
