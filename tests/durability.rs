//! Durability under SIGKILL: concurrent clients write, the server is killed at random moments and
//! restarted, several times. Every acknowledged write must be there afterwards, and no
//! unacknowledged write may appear half-applied (each write is a two-key transaction).

use crate::support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use metastore_proto::etcdserverpb::request_op::Request as Op;
use metastore_proto::etcdserverpb::{PutRequest, RequestOp, TxnRequest};
use parking_lot::Mutex;
use rand::Rng;
use support::{Kind, Server};

const WRITERS: usize = 8;
const ROUNDS: usize = 4;

fn pair_txn(id: u64) -> TxnRequest {
    let put = |suffix: &str| RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: format!("w/{id:08}/{suffix}").into_bytes(),
            value: format!("value-{id}").into_bytes(),
            ..Default::default()
        })),
    };
    TxnRequest {
        compare: vec![],
        success: vec![put("a"), put("b")],
        failure: vec![],
    }
}

async fn kill_during_writes(kind: Kind, extra: &[&str]) -> Server {
    let mut server = Server::start_with(kind, extra).await;
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let mut next_id = 0u64;
    let mut last_revision = 0i64;

    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let endpoint = server.endpoint();
            let acked = acked.clone();
            let base = next_id + (w as u64) * 1_000_000;
            tasks.push(tokio::spawn(async move {
                let Ok(mut kv) =
                    metastore_proto::etcdserverpb::kv_client::KvClient::connect(endpoint).await
                else {
                    return;
                };
                for i in 0..100_000u64 {
                    let id = base + i;
                    match kv.txn(pair_txn(id)).await {
                        Ok(_) => {
                            acked.lock().insert(id);
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        next_id += (WRITERS as u64) * 1_000_000;
        // Let some writes land, then kill at a random moment.
        let target = acked.lock().len() + 200 + rand::rng().random_range(0..2000);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while acked.lock().len() < target && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..30))).await;
        server.kill();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        server.restart().await;

        let resp = server.range(b"w/", b"w0").await;
        let revision = resp.header.as_ref().map(|h| h.revision).unwrap_or_default();
        assert!(
            revision >= last_revision,
            "round {round}: revision went back from {last_revision} to {revision}"
        );
        last_revision = revision;
        let mut halves: std::collections::BTreeMap<u64, usize> = Default::default();
        for kv in &resp.kvs {
            let key = String::from_utf8(kv.key.clone()).unwrap();
            let id: u64 = key[2..10].parse().unwrap();
            assert_eq!(kv.value, format!("value-{id}").into_bytes());
            *halves.entry(id).or_default() += 1;
        }
        let half_applied: Vec<_> = halves.iter().filter(|(_, n)| **n != 2).collect();
        assert!(
            half_applied.is_empty(),
            "round {round}: half-applied transactions {half_applied:?}"
        );
        let acked = acked.lock();
        let lost: Vec<_> = acked
            .iter()
            .filter(|id| !halves.contains_key(id))
            .take(10)
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged writes lost after SIGKILL: {lost:?} (of {})",
            acked.len()
        );
        assert!(!acked.is_empty());
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_write_memory_engine() {
    kill_during_writes(Kind::Memory, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_write_rocksdb_engine() {
    kill_during_writes(Kind::Rocks, &[]).await;
}

/// With frequent raft snapshots the restart goes through snapshot files and log compaction too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_frequent_snapshots_memory_engine() {
    kill_during_writes(Kind::Memory, &["--snapshot-count", "100"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_frequent_snapshots_rocksdb_engine() {
    kill_during_writes(Kind::Rocks, &["--snapshot-count", "100"]).await;
}

/// `--wal-dir` (the WAL on its own disk) with `--max-snapshots`: the memory engine, whose data
/// lives only in the WAL and snapshots, survives SIGKILL with its log in the other directory;
/// nothing is written to `<data-dir>/member/wal`, and no more snapshot files are kept than asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_the_wal_in_its_own_directory() {
    let disk = tempfile::tempdir().unwrap();
    let wal_dir = disk.path().join("wal");
    let server = kill_during_writes(
        Kind::Memory,
        &[
            "--wal-dir",
            wal_dir.to_str().unwrap(),
            "--snapshot-count",
            "100",
            "--max-snapshots",
            "1",
        ],
    )
    .await;
    let files = |dir: &std::path::Path, suffix: &str| -> usize {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(suffix)
                })
                .count()
            })
            .unwrap_or(0)
    };
    assert!(
        files(&wal_dir, ".wal") > 0,
        "no WAL in {}",
        wal_dir.display()
    );
    let member = server.data_dir.join("member");
    assert!(!member.join("wal").exists());
    assert_eq!(files(&member.join("snap"), ".snap"), 1);
}

/// Runs the metastore binary on `data_dir` until it exits or `timeout` passes; returns whether it
/// exited (and how) and what it wrote to stderr.
fn run_until_exit(
    data_dir: &std::path::Path,
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    use std::io::Read;
    let client = format!("http://127.0.0.1:{}", support::free_port());
    let mut child = std::process::Command::new(support::metastore_bin())
        .args([
            "--name",
            "m1",
            "--log-format",
            "text",
            "--listen-client-urls",
            &client,
            "--data-dir",
        ])
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start metastore");
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

async fn write_some(server: &Server, n: usize) {
    let mut kv = server.kv().await;
    for i in 0..n {
        kv.put(PutRequest {
            key: format!("k{i:04}").into_bytes(),
            value: vec![b'v'; 100],
            ..Default::default()
        })
        .await
        .expect("put");
    }
}

/// A memory-engine server killed after `n` acknowledged writes, and its last WAL segment.
async fn killed_after_writes(n: usize) -> (Server, std::path::PathBuf) {
    let mut server = Server::start(Kind::Memory).await;
    write_some(&server, n).await;
    server.kill();
    let last = wal_segments(&server.data_dir).pop().expect("a wal segment");
    (server, last)
}

fn wal_segments(data_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut segs: Vec<_> = std::fs::read_dir(data_dir.join("member/wal"))
        .expect("wal dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    segs
}

/// A record corrupted in the middle of the WAL stops the member with an error naming the file
/// and the byte offset, instead of serving from a damaged log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_wal_record_stops_the_server_with_file_and_offset() {
    let (server, seg) = killed_after_writes(200).await;
    let mut bytes = std::fs::read(&seg).unwrap();
    // Inside the records, not in the zeros preallocated after them.
    let records_end = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
    let mid = records_end / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();

    let (status, stderr) = run_until_exit(&server.data_dir, Duration::from_secs(20));
    let status = status.expect("the server must refuse to start, not run");
    assert!(!status.success());
    let name = seg.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        stderr.contains(&name),
        "error must name the file {name}: {stderr}"
    );
    assert!(
        stderr.contains("offset"),
        "error must give the offset: {stderr}"
    );
}

/// A record torn at the end of the last segment (a crash in the middle of an append) is cut
/// off at start, and every acknowledged write is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_wal_tail_is_repaired_at_start() {
    let (mut server, seg) = killed_after_writes(50).await;
    let mut file = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    // The start of a record header promising more bytes than follow.
    std::io::Write::write_all(&mut file, &[0, 0, 1, 0, 0xde, 0xad]).unwrap();
    drop(file);

    server.restart().await;
    let resp = server.range(b"k", b"l").await;
    assert_eq!(resp.count, 50);
    write_some(&server, 1).await;
}
