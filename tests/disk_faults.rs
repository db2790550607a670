//! Disk faults: bytes flipped in the files a member keeps (a snapshot file, a RocksDB table)
//! and a full disk. A damaged file is never served: the member either recovers from the copies
//! it still has (and says which file it skipped) or refuses to start naming the file; a full
//! disk refuses writes with an error while the member stays up, and writes resume when space
//! returns. (WAL damage: `durability.rs`, torn tail and flipped record.)

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{DefragmentRequest, PutRequest};
use support::{Kind, Server};

async fn write_keys(server: &Server, from: usize, to: usize) {
    let mut kv = server.kv().await;
    for i in from..to {
        kv.put(PutRequest {
            key: format!("k{i:05}").into_bytes(),
            value: vec![b'v'; 100],
            ..Default::default()
        })
        .await
        .expect("put");
    }
}

/// The files under `dir` (recursively) whose name ends with `suffix`, sorted by name.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// Starts `kind` on `data_dir` with its log on stderr; waits (bounded) for it to exit and
/// returns its status and log, or `None` and the log so far if it still runs (then killed).
fn run_until_exit(kind: Kind, data_dir: &Path, timeout: Duration) -> (Option<ExitStatus>, String) {
    let log = data_dir.with_extension("log");
    let client = format!("http://127.0.0.1:{}", support::free_port());
    let peer = format!("http://127.0.0.1:{}", support::free_port());
    let mut child = kind
        .command()
        .args(["--name", "m1", "--log-format", "text"])
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("m1={peer}")])
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start metastore");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

/// Damaged snapshot files (memory engine, whose state is rebuilt from its snapshot files and
/// WAL) are skipped with a warning naming each; the member starts from the undamaged one
/// before them and the WAL, with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_file_is_skipped_and_nothing_is_lost() {
    let mut server = Server::start_with(
        Kind::Memory,
        &["--snapshot-count", "50", "--max-snapshots", "5"],
    )
    .await;
    write_keys(&server, 0, 300).await;
    server.kill();
    let snaps = files_ending(&server.data_dir, ".snap");
    assert!(snaps.len() >= 3, "snapshot files: {snaps:?}");
    // Every file but the oldest (the newest may be one a kill left unrecorded in the WAL,
    // which is ignored anyway): the newest recorded one is among them.
    for snap in &snaps[1..] {
        let len = std::fs::metadata(snap).unwrap().len() as usize;
        flip_byte(snap, len / 2);
    }

    // A first start, its log kept: it runs, and warns naming the file it skipped.
    let (status, log) = run_until_exit(Kind::Memory, &server.data_dir, Duration::from_secs(5));
    assert!(status.is_none(), "the member stopped: {log}");
    let named = |l: &str| {
        snaps[1..]
            .iter()
            .any(|s| l.contains(&*s.file_name().unwrap().to_string_lossy()))
    };
    assert!(
        log.lines()
            .any(|l| l.contains("skipping unusable snapshot") && named(l)),
        "no warning naming a damaged file:\n{log}"
    );
    server.restart().await;
    let resp = server.range(b"k", b"l").await;
    assert_eq!(resp.count, 300, "acknowledged writes lost");
    write_keys(&server, 300, 310).await;
}

/// A byte flipped inside a RocksDB table file: the member refuses to start (or to serve the
/// damaged block) with RocksDB's error, which names the file and the offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_rocksdb_table_is_refused_naming_file_and_offset() {
    let mut server = Server::start(Kind::Rocks).await;
    write_keys(&server, 0, 2000).await;
    // Defragment flushes the memtables and rewrites every table file.
    MaintenanceClient::connect(server.endpoint())
        .await
        .unwrap()
        .defragment(DefragmentRequest {})
        .await
        .expect("defragment");
    server.kill();
    let tables = files_ending(&server.data_dir, ".sst");
    let largest = tables
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a table file");
    let len = std::fs::metadata(largest).unwrap().len() as usize;
    // Inside the data blocks, not the footer.
    flip_byte(largest, len / 3);

    let (status, log) = run_until_exit(Kind::Rocks, &server.data_dir, Duration::from_secs(20));
    let name = largest.file_name().unwrap().to_string_lossy().to_string();
    let status = status.unwrap_or_else(|| panic!("the member serves a damaged table:\n{log}"));
    assert!(!status.success());
    assert!(log.contains(&name), "the error must name {name}:\n{log}");
    assert!(
        log.contains("offset"),
        "the error must give the offset:\n{log}"
    );
}
