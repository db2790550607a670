//! Snapshots across etcd 3.5 (issue 21), whose backend layout differs from 3.4's: its `meta`
//! bucket also holds the raft `term` and `confState`. A snapshot etcd 3.5 saved restores into
//! MetaStore (`metastore snapshot restore`), and one MetaStore saved restores into etcd 3.5
//! (`etcdutl snapshot restore`); either way the restored member serves the source's history,
//! HashKV, compaction, lease and auth ([`snapshot_export::assert_serves`]).
//!
//! etcd 3.5 is not the system's etcd (Debian bookworm has 3.4): `cargo xtask test` downloads
//! Debian trixie's packages into the target directory and names it in `METASTORE_ETCD35_DIR`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metastore_bbolt::etcd_schema;

use crate::snapshot_export::{
    all_kvs, assert_serves, etcdctl_as, fill, hashkv, json, root_ctl, Source, ROOT,
};
use crate::support::{self, KillOnDrop, Kind, Server};

/// The directory of etcd 3.5's `etcd`, `etcdctl` and `etcdutl`.
fn etcd35_dir() -> PathBuf {
    let dir = std::env::var_os("METASTORE_ETCD35_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "METASTORE_ETCD35_DIR is not set: run the tests with `cargo xtask test`, which \
             downloads etcd 3.5 (or set METASTORE_ETCD35_DIR=$(cargo xtask etcd35))"
            )
        });
    let out = Command::new(dir.join("etcd"))
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{}/etcd: {e}; `cargo xtask test` fetches it", dir.display()));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("etcd Version: 3.5."),
        "{}/etcd is not etcd 3.5: {out:?}",
        dir.display()
    );
    dir
}

/// Starts etcd 3.5 as the single member `m1` on `data_dir` (a new one, or one etcdutl restored
/// for `peer_url`); its client URL once it answers.
async fn start_etcd35(data_dir: &Path, ports: Option<(u16, u16)>) -> (KillOnDrop, String) {
    let (client, peer) = ports.unwrap_or_else(|| support::free_port_pairs(1)[0]);
    let peer_url = format!("http://127.0.0.1:{peer}");
    let client_url = format!("http://127.0.0.1:{client}");
    let child = Command::new(etcd35_dir().join("etcd"))
        .args(["--name", "m1", "--data-dir"])
        .arg(data_dir)
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("m1={peer_url}")])
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd 3.5");
    let guard = KillOnDrop(vec![child]);
    wait_answers(&client_url, "etcd 3.5").await;
    (guard, client_url)
}

/// Polls until the server at `client_url` answers a linearizable read (as root once auth is on).
async fn wait_answers(client_url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let anonymous = etcdctl_as(client_url, None, &["get", "k00"]);
        if anonymous.status.success()
            || etcdctl_as(client_url, Some(ROOT), &["get", "k00"])
                .status
                .success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{what} never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Saves a snapshot of the [`fill`]ed server at `endpoint` into `file`: what a member restored
/// from it must serve.
fn save(endpoint: &str, file: &Path, lease_id: String) -> Source {
    root_ctl(endpoint, &["snapshot", "save", file.to_str().unwrap()]);
    let status = json(&root_ctl(endpoint, &["endpoint", "status", "-w", "json"]));
    let revision = status[0]["Status"]["header"]["revision"].as_u64().unwrap();
    let hash = hashkv(endpoint, revision);
    assert_eq!(hash.1, 120, "the compaction");
    Source {
        revision,
        hash,
        kvs: all_kvs(endpoint),
        lease_id,
    }
}

/// The keys of the `meta` bucket of the snapshot `file`.
fn meta_keys(file: &Path) -> Vec<String> {
    let db = metastore_bbolt::Db::open(file).expect("a bbolt file");
    let meta = db
        .bucket(etcd_schema::bucket::META)
        .unwrap()
        .expect("meta bucket");
    db.iter(&meta)
        .map(|e| String::from_utf8_lossy(&e.unwrap().key).into_owned())
        .collect()
}

/// MetaStore (`kind`'s engine) on a directory `metastore snapshot restore` made.
fn start_metastore(kind: Kind, data_dir: &Path, client: u16, peer: u16) -> Child {
    let peer_url = format!("http://127.0.0.1:{peer}");
    let client_url = format!("http://127.0.0.1:{client}");
    let mut cmd = kind.command();
    cmd.args(["--name", "m1", "--data-dir"])
        .arg(data_dir)
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("m1={peer_url}")])
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    kind.spawn(&mut cmd)
}

/// etcd 3.5 → `metastore snapshot restore` → MetaStore serves etcd's state; a snapshot of that
/// MetaStore no longer carries etcd's raft keys.
async fn from_etcd35(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcd35.db");
    let source = {
        let (_etcd, endpoint) = start_etcd35(&dir.path().join("etcd"), None).await;
        let lease_id = fill(&endpoint).await;
        save(&endpoint, &file, lease_id)
    };
    // 3.5's layout: the raft term and configuration beside the consistent index.
    let keys = meta_keys(&file);
    for key in [
        "consistent_index",
        "confState",
        "term",
        "finishedCompactRev",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
    }

    // `metastore snapshot status` reads it as etcdutl 3.5 does: revision, pairs, size and the
    // CRC over the buckets.
    let status = |program: PathBuf| {
        let out = Command::new(program)
            .args(["snapshot", "status", "-w", "json"])
            .arg(&file)
            .output()
            .unwrap();
        support::assert_success(&out);
        json(&String::from_utf8_lossy(&out.stdout))
    };
    let etcds = status(etcd35_dir().join("etcdutl"));
    assert_eq!(etcds["revision"].as_u64(), Some(source.revision), "{etcds}");
    assert_eq!(status(PathBuf::from(support::metastore_bin())), etcds);

    let engine = if kind == Kind::Rocks {
        "rocksdb"
    } else {
        "memory"
    };
    let (client, peer) = support::free_port_pairs(1)[0];
    let data_dir = dir.path().join("metastore");
    let restored = Command::new(support::metastore_bin())
        .args([
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--name",
            "m1",
        ])
        .args(["--initial-cluster", &format!("m1=http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args(["--storage-engine", engine, "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    support::assert_success(&restored);
    let _metastore = KillOnDrop(vec![start_metastore(kind, &data_dir, client, peer)]);
    let client_url = format!("http://127.0.0.1:{client}");
    wait_answers(&client_url, "the restored MetaStore").await;
    assert_serves(&client_url, &source);

    // What MetaStore saves now holds its own meta keys, not the old cluster's raft state.
    let again = dir.path().join("again.db");
    root_ctl(&client_url, &["snapshot", "save", again.to_str().unwrap()]);
    assert_eq!(
        meta_keys(&again),
        [
            "consistent_index",
            "finishedCompactRev",
            "scheduledCompactRev"
        ]
    );
}

/// MetaStore (`kind`) → `etcdutl snapshot restore` (3.5) → etcd 3.5 serves MetaStore's state.
async fn into_etcd35(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metastore.db");
    let source = {
        let server = Server::start(kind).await;
        let endpoint = server.endpoint();
        let lease_id = fill(&endpoint).await;
        save(&endpoint, &file, lease_id)
    };
    // etcdutl 3.5 reads the file as it reads etcd's own.
    let status = Command::new(etcd35_dir().join("etcdutl"))
        .args(["snapshot", "status", "-w", "json"])
        .arg(&file)
        .output()
        .unwrap();
    support::assert_success(&status);
    let status = json(&String::from_utf8_lossy(&status.stdout));
    assert_eq!(
        status["revision"].as_u64(),
        Some(source.revision),
        "{status}"
    );

    let (client, peer) = support::free_port_pairs(1)[0];
    let peer_url = format!("http://127.0.0.1:{peer}");
    let data_dir = dir.path().join("etcd");
    let restored = Command::new(etcd35_dir().join("etcdutl"))
        .args(["snapshot", "restore"])
        .arg(&file)
        .args(["--name", "m1", "--data-dir"])
        .arg(&data_dir)
        .args(["--initial-cluster", &format!("m1={peer_url}")])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .output()
        .unwrap();
    support::assert_success(&restored);
    let (_etcd, client_url) = start_etcd35(&data_dir, Some((client, peer))).await;
    assert_serves(&client_url, &source);
    // The restored etcd 3.5 takes writes: a working member, not only a readable one.
    root_ctl(&client_url, &["put", "after-restore", "v"]);
    let status = json(&root_ctl(
        &client_url,
        &["endpoint", "status", "-w", "json"],
    ));
    assert_eq!(
        status[0]["Status"]["header"]["revision"].as_u64(),
        Some(source.revision + 1)
    );
    let version = status[0]["Status"]["version"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.5."), "{status}");
}

per_engine!(from_etcd35, into_etcd35);
