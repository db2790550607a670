//! Running MetaStore as etcd is run: auto-compaction (`--auto-compaction-mode`,
//! `--auto-compaction-retention`) and `--version`. Configuration by file and environment is in
//! `cluster.rs` (`configured_by_file_and_environment`).

use crate::support;

use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{HashKvRequest, PutRequest};
use support::cluster::Cluster;
use support::{Kind, Server};
use tonic::transport::Channel;

per_kind!(periodic_auto_compaction_keeps_a_time_window);
per_engine!(revision_auto_compaction_keeps_the_last_revisions_on_every_member);

async fn put(kv: &mut KvClient<Channel>, key: &str) -> i64 {
    kv.put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    })
    .await
    .expect("put")
    .into_inner()
    .header
    .expect("header")
    .revision
}

/// The compaction revision a member reports (HashKV's `compact_revision`).
async fn compacted(endpoint: String) -> i64 {
    let mut m = MaintenanceClient::connect(endpoint).await.expect("connect");
    m.hash_kv(HashKvRequest { revision: 0 })
        .await
        .expect("hashkv")
        .into_inner()
        .compact_revision
}

/// Periodic mode with a 2 s window, as etcd runs it: no compaction before the first window has
/// passed, then compactions that keep moving forward while writes go on, never past the
/// revision of a window ago.
async fn periodic_auto_compaction_keeps_a_time_window(kind: Kind) {
    // Before the process starts: its window counts from its own start.
    let started = Instant::now();
    let server = Server::start_with(
        kind,
        &[
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "2s",
        ],
    )
    .await;
    let mut kv = server.kv().await;
    // (time since start, revision written then)
    let mut written: Vec<(Duration, i64)> = Vec::new();
    let mut first_compaction = None;
    while started.elapsed() < Duration::from_secs(8) {
        written.push((started.elapsed(), put(&mut kv, "periodic").await));
        let compact = compacted(server.endpoint()).await;
        if compact > 0 {
            first_compaction.get_or_insert((started.elapsed(), compact));
            // Never beyond what was written a window ago (with a sampling step of slack).
            let window_ago = started
                .elapsed()
                .saturating_sub(Duration::from_millis(1700));
            let newest_allowed = written
                .iter()
                .filter(|(t, _)| *t <= window_ago)
                .map(|(_, r)| *r)
                .max()
                .unwrap_or(1);
            assert!(
                compact <= newest_allowed + 1,
                "compacted to {compact} at {:?}; revision of a window ago was {newest_allowed}",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (at, _) = first_compaction.expect("no auto compaction within 8 s of a 2 s window");
    assert!(
        at >= Duration::from_millis(1900),
        "compacted already at {at:?}"
    );
    let last = compacted(server.endpoint()).await;
    let (_, first) = first_compaction.unwrap();
    assert!(
        last > first,
        "compaction did not move on: {first} then {last}"
    );
}

/// Revision mode keeping 5 revisions on a 3-member cluster (the check every 200 ms instead of
/// etcd's 5 minutes, through a hidden test flag): the leader's compaction reaches every member.
async fn revision_auto_compaction_keeps_the_last_revisions_on_every_member(kind: Kind) {
    let c = Cluster::start(
        kind,
        3,
        &[
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=5",
            "--auto-compaction-revision-check-interval=200ms",
        ],
    )
    .await;
    let mut kv = c.kv(0).await;
    let mut last = 0;
    for i in 0..30 {
        last = put(&mut kv, &format!("k{i}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen = Vec::new();
        for i in 0..3 {
            seen.push(compacted(c.endpoint(i)).await);
        }
        if seen.iter().all(|r| *r == last - 5) {
            break;
        }
        assert!(
            seen.iter().all(|r| *r <= last - 5),
            "compacted past the retention: {seen:?}, last revision {last}"
        );
        assert!(
            Instant::now() < deadline,
            "members did not all compact to {}: {seen:?}",
            last - 5
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--version` prints what etcd prints there, with MetaStore's names.
#[test]
fn version_names_the_release_api_commit_and_compiler() {
    let out = std::process::Command::new(support::metastore_bin())
        .arg("--version")
        .output()
        .expect("run metastore --version");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let keys: Vec<&str> = text.lines().filter_map(|l| l.split(": ").next()).collect();
    assert_eq!(
        keys,
        [
            "MetaStore Version",
            "etcd API Version",
            "Git SHA",
            "Rust Version",
            "OS/Arch"
        ],
        "{text}"
    );
    assert!(text.contains(&format!(
        "MetaStore Version: {}\n",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(text.contains("Rust Version: rustc "), "{text}");
}
