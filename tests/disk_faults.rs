//! Disk faults: bytes flipped in the files a member keeps (a snapshot file, a RocksDB table)
//! and a full disk. A damaged file is never served: the member either recovers from the copies
//! it still has (and says which file it skipped) or refuses to start naming the file; a full
//! disk refuses writes with an error while the member stays up, and writes resume when space
//! returns. (WAL damage: `durability.rs`, torn tail and flipped record.)

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{DefragmentRequest, PutRequest, RangeRequest};
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

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (with the reason printed) where this process may not mount file systems.
    fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount(8)");
        if out.status.success() {
            return Some(Tmpfs { dir });
        }
        let err = String::from_utf8_lossy(&out.stderr);
        // Only a missing privilege excuses the test; anything else is a failure.
        assert!(
            err.contains("permission denied") || err.contains("must be superuser"),
            "mount failed: {err}"
        );
        eprintln!("SKIPPED: mounting a small file system needs root (CAP_SYS_ADMIN): {err}");
        None
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes available on it.
    fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A member process on `data_dir`, killed when dropped.
struct Member {
    child: std::process::Child,
    endpoint: String,
}

impl Member {
    async fn start(kind: Kind, data_dir: &Path, log: &Path, extra: &[&str]) -> Member {
        let client = format!("http://127.0.0.1:{}", support::free_port());
        let peer = format!("http://127.0.0.1:{}", support::free_port());
        let child = kind
            .command()
            .args(["--name", "m1", "--log-format", "text"])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("m1={peer}")])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .expect("start metastore");
        let mut member = Member {
            child,
            endpoint: client,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(member.runs(), "the member exited:\n{}", read(log));
            if let Ok(mut kv) = KvClient::connect(member.endpoint.clone()).await {
                let probe = RangeRequest {
                    key: b"probe".to_vec(),
                    ..Default::default()
                };
                if kv.range(probe).await.is_ok() {
                    return member;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the member did not start:\n{}",
                read(log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn runs(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    async fn kv(&self) -> KvClient<tonic::transport::Channel> {
        KvClient::connect(self.endpoint.clone())
            .await
            .expect("connect")
            .max_decoding_message_size(64 << 20)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

per_engine!(a_full_disk_refuses_writes_and_recovers_when_space_returns);

/// The data directory on a small file system filled up to a little above the member's disk
/// reserve: puts go on until the reserve is reached, then are refused with etcd's
/// `database space exceeded` (ResourceExhausted) while the member stays up and serves reads;
/// once the space is freed, puts are taken again, and every acknowledged one survives a
/// restart.
async fn a_full_disk_refuses_writes_and_recovers_when_space_returns(kind: Kind) {
    const RESERVE: u64 = 48 << 20;
    let Some(fs) = Tmpfs::mount(200) else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("m1.log");
    let data_dir = fs.path().join("data");
    let reserve = RESERVE.to_string();
    let flags = ["--disk-reserve-bytes", reserve.as_str()];
    let mut member = Member::start(kind, &data_dir, &log, &flags).await;
    // Leave 24 MiB above the reserve.
    let filler = fs.path().join("filler");
    let fill = fs.available() - RESERVE - (24 << 20);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();

    let mut kv = member.kv().await;
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let value = |n: usize| format!("{n:08}").repeat(100 * 1024 / 8);
    let mut refused = None;
    for n in 0..2_000 {
        let key = format!("full/{:02}", n % 50);
        let req = PutRequest {
            key: key.clone().into_bytes(),
            value: value(n).into_bytes(),
            ..Default::default()
        };
        match kv.put(req).await {
            Ok(_) => {
                acked.insert(key, value(n));
            }
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("2,000 puts of 100 KiB were all taken on a full disk");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(
        refused.message(),
        "etcdserver: mvcc: database space exceeded"
    );
    assert!(!acked.is_empty(), "refused from the first put");
    assert!(member.runs(), "the member stopped:\n{}", read(&log));
    // Reads go on.
    assert_eq!(all_values(&mut kv).await, acked);
    assert!(read(&log).contains("free disk space is below the reserve"));

    // Space returns: puts are taken again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let req = PutRequest {
            key: b"full/after".to_vec(),
            value: b"space".to_vec(),
            ..Default::default()
        };
        match kv.put(req).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert!(
                    Instant::now() < deadline,
                    "puts still refused after space returned"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    acked.insert("full/after".into(), "space".into());

    // Everything acknowledged survives a restart.
    drop(member);
    let member = Member::start(kind, &data_dir, &log, &flags).await;
    let mut kv = member.kv().await;
    assert_eq!(all_values(&mut kv).await, acked);
}

async fn all_values(kv: &mut KvClient<tonic::transport::Channel>) -> BTreeMap<String, String> {
    let resp = kv
        .range(RangeRequest {
            key: b"full/".to_vec(),
            range_end: b"full0".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    resp.kvs
        .into_iter()
        .map(|kv| {
            (
                String::from_utf8(kv.key).unwrap(),
                String::from_utf8(kv.value).unwrap(),
            )
        })
        .collect()
}
