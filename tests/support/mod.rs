//! Test support: start real servers (MetaStore's binary, or Debian's etcd) on free loopback ports
//! in temporary directories, wait until they answer, and kill them when dropped.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::{DeleteRangeRequest, RangeRequest, RangeResponse};
use tonic::transport::Channel;

pub mod cluster;
pub mod tls;

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .unwrap()
        .port()
}

/// Which server a test talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// MetaStore with the memory engine.
    Memory,
    /// MetaStore with the RocksDB engine.
    Rocks,
    /// Real etcd from Debian's etcd-server package.
    Etcd,
}

impl Kind {
    /// The command that runs a server of this kind: Debian's etcd, or MetaStore's binary with
    /// its storage engine chosen.
    pub fn command(self) -> Command {
        match self {
            Kind::Etcd => Command::new("etcd"),
            Kind::Memory | Kind::Rocks => {
                let mut cmd = Command::new(metastore_bin());
                let engine = if self == Kind::Memory {
                    "memory"
                } else {
                    "rocksdb"
                };
                cmd.args(["--storage-engine", engine]);
                cmd
            }
        }
    }

    /// Spawns `cmd` (made by [`Kind::command`]), with a hint if the binary is missing.
    pub fn spawn(self, cmd: &mut Command) -> Child {
        cmd.spawn().unwrap_or_else(|e| {
            panic!("starting {self:?}: {e} (is etcd installed? `cargo xtask test` installs it)")
        })
    }
}

/// A running server process.
pub struct Server {
    pub kind: Kind,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Start a server of `kind` in a fresh temporary data dir.
    pub async fn start(kind: Kind) -> Server {
        Server::start_with(kind, &[]).await
    }

    /// Start a server of `kind` in a fresh temporary data dir with extra flags.
    pub async fn start_with(kind: Kind, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // free_port() releases the port before the server binds it, so a concurrent test can
        // take it first; the server then exits, and we retry on other ports.
        for attempt in 0..5 {
            let data_dir = dir.path().join(format!("data{attempt}"));
            let (client_port, peer_port) = (free_port(), free_port());
            let child = spawn(kind, &data_dir, client_port, peer_port, &extra);
            let mut server = Server {
                kind,
                client_port,
                peer_port,
                data_dir,
                extra: extra.clone(),
                child: Some(child),
                _dir: None,
            };
            if server.wait_ready().await {
                server._dir = Some(dir);
                return server;
            }
        }
        panic!("{kind:?} server did not start in 5 attempts");
    }

    /// `http://127.0.0.1:<client port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A KV client from MetaStore's own generated protocol types.
    pub async fn kv(&self) -> KvClient<Channel> {
        KvClient::connect(self.endpoint()).await.expect("connect")
    }

    /// The keys in [`key`, `range_end`), read through a fresh [`Server::kv`] client.
    pub async fn range(&self, key: &[u8], range_end: &[u8]) -> RangeResponse {
        let req = RangeRequest {
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            ..Default::default()
        };
        let resp = self.kv().await.range(req).await;
        resp.unwrap_or_else(|e| panic!("range [{key:?}, {range_end:?}): {e}"))
            .into_inner()
    }

    /// Waits until this server answers a Range. False if its process exited first (e.g. its
    /// port was taken by another test's server, which must not be mistaken for this one).
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.exited() {
                return false;
            }
            if let Ok(mut kv) = KvClient::connect(self.endpoint()).await {
                let req = RangeRequest {
                    key: b"ready-probe".to_vec(),
                    ..Default::default()
                };
                // With auth enabled an anonymous read is refused, which still shows the server
                // is up.
                let answered = match kv.range(req).await {
                    Ok(_) => true,
                    Err(status) => status.message().contains("user name is empty"),
                };
                if answered {
                    // Answered: make sure it was our process that answered.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return !self.exited();
                }
            }
            assert!(
                Instant::now() < deadline,
                "{:?} server on port {} did not become ready",
                self.kind,
                self.client_port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL the process and wait for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill, then start again on the same data dir and ports.
    pub async fn restart(&mut self) {
        self.kill();
        let child = spawn(
            self.kind,
            &self.data_dir,
            self.client_port,
            self.peer_port,
            &self.extra,
        );
        self.child = Some(child);
        assert!(
            self.wait_ready().await,
            "{:?} server exited while restarting",
            self.kind
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A DeleteRange of [`key`, `range_end`) (`""`: the one key).
pub fn delete_req(key: &str, range_end: &str) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: key.into(),
        range_end: range_end.into(),
        ..Default::default()
    }
}

/// (client port, peer port) for each of `members` members of a cluster started by hand.
pub fn free_port_pairs(members: usize) -> Vec<(u16, u16)> {
    (0..members).map(|_| (free_port(), free_port())).collect()
}

/// `entry(i, item)` for every item, joined with commas: an `--initial-cluster` value or an
/// `--endpoints` list.
pub fn comma_list<T>(items: &[T], entry: impl Fn(usize, &T) -> String) -> String {
    let entries: Vec<String> = items.iter().enumerate().map(|(i, t)| entry(i, t)).collect();
    entries.join(",")
}

/// Asserts that a process exited successfully, showing its stderr otherwise.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills and reaps the processes it holds when dropped: a test that starts servers by hand
/// leaves none behind, even when it fails.
pub struct KillOnDrop(pub Vec<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The metastore binary built for these tests.
/// The `metastore` binary under test: Cargo's build of this package, or `METASTORE_BIN` (e.g. a
/// release build, for the `#[ignore]` measurement harnesses).
pub fn metastore_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("METASTORE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_metastore").into())
    })
}

fn spawn(kind: Kind, data_dir: &Path, client_port: u16, peer_port: u16, extra: &[String]) -> Child {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let cluster = format!("m1={peer}");
    let mut cmd = kind.command();
    cmd.args(["--name", "m1", "--data-dir"])
        .arg(data_dir)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args([
            "--initial-cluster",
            &cluster,
            "--initial-cluster-state",
            "new",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("METASTORE_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    kind.spawn(&mut cmd)
}

/// Lists the active alarms (`AlarmAction::Get`), as `etcdctl alarm list` does.
pub async fn alarm_list(
    client: &mut etcd_client::Client,
) -> Result<etcd_client::AlarmResponse, etcd_client::Error> {
    use etcd_client::{AlarmAction, AlarmType};
    client.alarm(AlarmAction::Get, AlarmType::None, None).await
}

/// Asserts that MetaStore printed the same lines as etcd, listing each line that differs
/// (`METASTORE_DIFF_DUMP=1` prints MetaStore's lines too).
pub fn assert_same_lines(etcd: &[String], metastore: &[String]) {
    if std::env::var_os("METASTORE_DIFF_DUMP").is_some() {
        eprintln!("{}", metastore.join("\n"));
    }
    let mismatches: Vec<String> = etcd
        .iter()
        .zip(metastore)
        .filter(|(e, g)| e != g)
        .map(|(e, g)| format!("etcd:      {e}\nmetastore: {g}"))
        .collect();
    assert!(
        mismatches.is_empty() && etcd.len() == metastore.len(),
        "{} of {} lines differ from etcd ({} against {} lines):\n{}\n\netcd: {etcd:#?}\nmetastore: {metastore:#?}",
        mismatches.len(),
        etcd.len(),
        etcd.len(),
        metastore.len(),
        mismatches.join("\n\n")
    );
}
