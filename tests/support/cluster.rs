//! Multi-member clusters for scenario tests: n member processes (MetaStore on either engine, or
//! Debian's etcd) on loopback, started with etcd's bootstrap flags, and a byte-transparent TCP
//! proxy in front of every member's peer port so that a test can partition a member.
//!
//! Member `i` (0-based) is named `m{i+1}`. Each member listens for peers on a real port but
//! advertises a proxy port (`--initial-advertise-peer-urls` and `--initial-cluster`), so every
//! peer connection towards it passes the proxy, which runs on its own tokio runtime (a test that
//! blocks its thread, e.g. on `etcdctl`, does not stall raft traffic). [`Cluster::isolate`] cuts
//! a member off in both directions: every connection *to* its proxy and every connection its
//! own process opened to another member's proxy (found through `/proc`: the process owning the
//! connecting socket) is closed, and new ones are closed as soon as they are accepted, until
//! [`Cluster::heal`]. Both directions matter: etcd's rafthttp streams carry messages from the
//! member that *accepted* the connection to the one that dialed it. [`Cluster::partition`] cuts
//! the link between two members only, and [`Cluster::set_delay`] holds back every chunk entering
//! or leaving a member (the robustness suite's network faults).
//!
//! Every member logs to `<tempdir>/mK.log`; when a test panics, the tail of each log is printed.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::cluster_client::ClusterClient;
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{
    HashKvRequest, MemberListRequest, MemberListResponse, PutRequest, RangeRequest, StatusRequest,
    StatusResponse,
};
use tonic::transport::{Channel, Endpoint};

use super::{free_port, Kind};

/// How long one client call of the harness may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a start (every member answering and agreeing on a leader) may take.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `assert_converged` waits for the members to agree.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);
/// Start attempts per member when a process exits early (another test took its port).
const START_ATTEMPTS: usize = 5;

static CLUSTERS: AtomicU64 = AtomicU64::new(0);

/// Peer URLs use `https://` when set (per test process: nextest runs each test in its own).
static PEER_HTTPS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every cluster started later in this test process use `https://` peer URLs; the
/// caller passes the `--peer-*` TLS flags as extra flags.
pub fn use_https_peers() {
    PEER_HTTPS.store(true, Ordering::Relaxed);
}

fn peer_scheme() -> &'static str {
    if PEER_HTTPS.load(Ordering::Relaxed) {
        "https"
    } else {
        "http"
    }
}

/// One member: its ports, data dir, command-line state and process.
pub struct Member {
    /// `m1`, `m2`, … (or the name given to [`Cluster::reserve_member`]).
    pub name: String,
    pub client_port: u16,
    /// The port the member really listens on for peers (`--listen-peer-urls`).
    pub peer_port: u16,
    /// The member's proxy ports; the first is advertised at start
    /// (`--initial-advertise-peer-urls`), the others come from [`Cluster::add_peer_alias`].
    pub proxy_ports: Vec<u16>,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// The member id, once a Status answer told it.
    pub id: Option<u64>,
    initial_cluster: String,
    initial_state: &'static str,
    child: Option<Child>,
    started: bool,
    removed: bool,
    attempt: usize,
    /// `FAILPOINTS` for its next starts (binaries built with the `failpoints` feature).
    failpoints: Option<String>,
}

impl Member {
    /// `http://127.0.0.1:<client port>`
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The advertised peer URL (the first proxy).
    pub fn peer_url(&self) -> String {
        format!("{}://127.0.0.1:{}", peer_scheme(), self.proxy_ports[0])
    }

    fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// What a removed member did once its removal was committed.
#[derive(Debug)]
pub enum Removal {
    /// The process exited by itself.
    Exited(ExitStatus),
    /// The process still runs but a linearizable read through it fails with this error.
    Refuses(String),
}

/// A running cluster of member processes; killed (and its directory deleted) when dropped.
pub struct Cluster {
    pub kind: Kind,
    /// `--initial-cluster-token`, unique per cluster.
    pub token: String,
    members: Vec<Member>,
    /// Per-member engine overrides (MetaStore only): member i runs `engines[i]`.
    engines: Vec<Kind>,
    extra: Vec<String>,
    launch: Launch,
    net: Net,
    dir: tempfile::TempDir,
}

/// How members get their settings: etcd's three ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// Command-line flags.
    Flags,
    /// `ETCD_<FLAG>` environment variables only.
    Env,
    /// Even members a YAML `--config-file`, odd members `ETCD_*` variables.
    FileAndEnv,
}

impl Cluster {
    /// Starts `n` members `m1..mn` with `--initial-cluster-state new` and `extra` flags, and
    /// waits until every member answers Status, all agree on a leader, and every member's
    /// MemberList shows all members with their names and client URLs.
    pub async fn start(kind: Kind, n: usize, extra: &[&str]) -> Cluster {
        Cluster::start_with_engines(kind, n, extra, Vec::new(), Launch::Flags).await
    }

    /// Like [`Cluster::start`] with no extra flags, the members configured as `launch` says.
    pub async fn start_launched(kind: Kind, n: usize, launch: Launch) -> Cluster {
        Cluster::start_with_engines(kind, n, &[], Vec::new(), launch).await
    }

    /// A MetaStore cluster whose member i runs the engine of `engines[i]` (Memory or Rocks).
    pub async fn start_mixed(engines: &[Kind], extra: &[&str]) -> Cluster {
        assert!(engines.iter().all(|k| *k != Kind::Etcd));
        Cluster::start_with_engines(
            engines[0],
            engines.len(),
            extra,
            engines.to_vec(),
            Launch::Flags,
        )
        .await
    }

    async fn start_with_engines(
        kind: Kind,
        n: usize,
        extra: &[&str],
        engines: Vec<Kind>,
        launch: Launch,
    ) -> Cluster {
        assert!(n >= 1);
        let dir = tempfile::tempdir().expect("tempdir");
        let token = format!(
            "metastore-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut cluster = Cluster {
            kind,
            token,
            members: Vec::new(),
            engines,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            launch,
            net: Net::new(),
            dir,
        };
        for k in 0..n {
            cluster.reserve_member(&format!("m{}", k + 1));
        }
        let initial_cluster = cluster
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..n {
            cluster.members[i].initial_cluster = initial_cluster.clone();
            cluster.members[i].initial_state = "new";
            cluster.members[i].started = true;
            cluster.spawn(i);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // A member whose process exited lost a port race: start it again on other ports
            // in a fresh data dir (its peers only know its proxy, which stays).
            for i in 0..n {
                if cluster.members[i].exited() {
                    cluster.respawn_on_new_ports(i, true);
                }
            }
            if cluster.agreed_leader().await.is_some() && cluster.all_published(n).await {
                // Every member answered; make sure they were our processes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if (0..n).all(|i| !cluster.members[i].exited()) {
                    return cluster;
                }
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "{kind:?} cluster of {n} did not elect a leader within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether every live member lists `n` members, each with its name and client URLs (which
    /// a member publishes through raft once it runs).
    async fn all_published(&mut self, n: usize) -> bool {
        for i in self.live() {
            match self.member_list(i).await {
                Ok(list) => {
                    if list.members.len() != n
                        || list
                            .members
                            .iter()
                            .any(|m| m.name.is_empty() || m.client_ur_ls.is_empty())
                    {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Number of member slots (including killed, removed and not yet started ones).
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    pub fn member(&self, i: usize) -> &Member {
        &self.members[i]
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// Client URLs of every member of the cluster (started and not removed; killed ones too).
    pub fn endpoints(&self) -> Vec<String> {
        self.in_cluster().map(|i| self.endpoint(i)).collect()
    }

    /// Advertised peer URL of member `i`.
    pub fn peer_url(&self, i: usize) -> String {
        self.members[i].peer_url()
    }

    /// Indices of members that are started, not removed and whose process runs.
    pub fn live(&mut self) -> Vec<usize> {
        let candidates: Vec<usize> = self.in_cluster().collect();
        candidates
            .into_iter()
            .filter(|&i| !self.members[i].exited())
            .collect()
    }

    /// Indices of the members of the cluster: started and not removed (killed ones too).
    pub fn members_in_cluster(&self) -> Vec<usize> {
        self.in_cluster().collect()
    }

    fn in_cluster(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.members.len()).filter(|&i| self.members[i].started && !self.members[i].removed)
    }

    /// SIGKILL member `i` and wait for the process to end.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.net.set_pid(i, None);
    }

    /// Stop every member (SIGKILL).
    pub fn stop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Kill member `i` if it runs, then start it again with the same command line and data
    /// dir, and wait until it answers Status with a leader. (If its old ports were taken in
    /// between, it gets new client and peer ports; peers reach it through its proxy anyway.)
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.members[i].attempt = 0;
        self.spawn(i);
        self.wait_member_up(i).await;
    }

    /// Arms crash points in member `i` from its next start on (`FAILPOINTS`, the `fail` crate's
    /// syntax, e.g. `raft::wal::after_fsync=20*off->panic`); `None` disarms them.
    pub fn set_failpoints(&mut self, i: usize, failpoints: Option<&str>) {
        self.members[i].failpoints = failpoints.map(str::to_string);
    }

    /// Waits, bounded by `timeout`, for member `i` to exit on its own (a crash point), and
    /// returns its exit status.
    pub async fn wait_crash(&mut self, i: usize, timeout: Duration) -> ExitStatus {
        self.wait_exit(i, timeout, "while its crash point was armed")
            .await
    }

    /// Sends SIGTERM to member `i` and waits, bounded by `timeout`, for it to exit.
    pub async fn terminate(&mut self, i: usize, timeout: Duration) -> ExitStatus {
        let pid = self.members[i].pid().expect("member runs");
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        self.wait_exit(i, timeout, "after SIGTERM").await
    }

    /// Starts member `i` again (after [`Cluster::kill`]) where it must refuse to start: waits,
    /// bounded by `timeout`, for its process to exit, and returns its exit status. Panics if it
    /// is still running then.
    pub async fn restart_expecting_exit(&mut self, i: usize, timeout: Duration) -> ExitStatus {
        self.kill(i);
        self.spawn(i);
        self.wait_exit(i, timeout, "after its start").await
    }

    /// Waits, bounded by `timeout`, for member `i`'s process to exit; panics naming `when`.
    async fn wait_exit(&mut self, i: usize, timeout: Duration, when: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.members[i].child.as_mut().expect("spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.members[i].child = None;
                self.net.set_pid(i, None);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "m{} still runs {timeout:?} {when}; its log:\n{}",
                i + 1,
                self.log(i)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until all live members answer Status and agree on a live leader;
    /// returns its index.
    pub async fn wait_leader(&mut self) -> usize {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(leader) = self.agreed_leader().await {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {START_TIMEOUT:?}: {}",
                self.describe().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the member the live members name as leader, if they all answer and agree.
    pub async fn leader_index(&mut self) -> Option<usize> {
        self.agreed_leader().await
    }

    async fn agreed_leader(&mut self) -> Option<usize> {
        let live = self.live();
        if live.is_empty() {
            return None;
        }
        let mut leader = None;
        for &i in &live {
            let status = self.status(i).await.ok()?;
            if status.leader == 0 || leader.is_some_and(|l| l != status.leader) {
                return None;
            }
            leader = Some(status.leader);
        }
        let leader = leader?;
        live.into_iter()
            .find(|&i| self.members[i].id == Some(leader))
    }

    /// Maintenance.Status of member `i` (bounded); remembers the member's id.
    pub async fn status(&mut self, i: usize) -> Result<StatusResponse, String> {
        let mut client = MaintenanceClient::new(self.channel(i).await?);
        let status = timed(client.status(StatusRequest {})).await?;
        if let Some(header) = &status.header {
            self.members[i].id = Some(header.member_id);
        }
        Ok(status)
    }

    /// A channel to member `i`'s client port (connect bounded by [`CALL_TIMEOUT`]).
    pub async fn channel(&self, i: usize) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(self.endpoint(i))
            .map_err(|e| e.to_string())?
            .connect_timeout(CALL_TIMEOUT);
        match tokio::time::timeout(CALL_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(format!("connect to {}: {e}", self.endpoint(i))),
            Err(_) => Err(format!("connect to {}: timed out", self.endpoint(i))),
        }
    }

    /// A KV client of member `i`.
    pub async fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channel(i).await.expect("connect"))
    }

    /// A Maintenance client of member `i`.
    pub async fn maintenance(&self, i: usize) -> MaintenanceClient<Channel> {
        MaintenanceClient::new(self.channel(i).await.expect("connect"))
    }

    /// A Cluster client of member `i`.
    pub async fn cluster_client(&self, i: usize) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel(i).await.expect("connect"))
    }

    /// Put through member `i`, bounded by `timeout`; the revision it created.
    pub async fn put(
        &self,
        i: usize,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<i64, String> {
        let mut kv = KvClient::new(self.channel(i).await?);
        let req = PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            ..Default::default()
        };
        match tokio::time::timeout(timeout, kv.put(req)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner().header.map_or(0, |h| h.revision)),
            Ok(Err(status)) => Err(status_text(&status)),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Get `key` through member `i` (linearizable unless `serializable`), bounded by `timeout`.
    pub async fn get(
        &self,
        i: usize,
        key: &str,
        serializable: bool,
        timeout: Duration,
    ) -> Result<Option<String>, String> {
        let mut kv = KvClient::new(self.channel(i).await?);
        let req = RangeRequest {
            key: key.as_bytes().to_vec(),
            serializable,
            ..Default::default()
        };
        match tokio::time::timeout(timeout, kv.range(req)).await {
            Ok(Ok(resp)) => Ok(resp
                .into_inner()
                .kvs
                .first()
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())),
            Ok(Err(status)) => Err(status_text(&status)),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Cluster.MemberList through member `i` (bounded).
    pub async fn member_list(&self, i: usize) -> Result<MemberListResponse, String> {
        let mut client = ClusterClient::new(self.channel(i).await?);
        timed(client.member_list(MemberListRequest::default())).await
    }

    /// `etcdctl --endpoints=http://127.0.0.1:<client port of i> ARGS` with `ETCDCTL_API=3`.
    pub fn etcdctl(&self, i: usize, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.members[i].client_url()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("etcdctl (installed by `cargo xtask test`)")
    }

    /// [`Cluster::etcdctl`] that must succeed; its stdout.
    pub fn etcdctl_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.etcdctl(i, args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} through {} failed: {}{}",
            self.members[i].name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Hold member `i`'s process still (SIGSTOP) for `d`, then let it go on (SIGCONT): what a
    /// stalled disk or an overloaded machine does to a member.
    pub async fn pause(&self, i: usize, d: Duration) {
        let pid = self.members[i]
            .child
            .as_ref()
            .expect("a running member")
            .id();
        let signal = |name: &str| {
            let status = std::process::Command::new("kill")
                .args([name, &pid.to_string()])
                .status()
                .expect("kill");
            assert!(status.success(), "kill {name} {pid}");
        };
        signal("-STOP");
        tokio::time::sleep(d).await;
        signal("-CONT");
    }

    /// Cut member `i` off from its peers (both directions) until [`Cluster::heal`].
    pub fn isolate(&self, i: usize) {
        self.net.isolate(i, true);
    }

    /// Undo [`Cluster::isolate`].
    pub fn heal(&self, i: usize) {
        self.net.isolate(i, false);
    }

    /// Cut the link between members `a` and `b` only (both directions), until
    /// [`Cluster::unpartition`]; each still reaches the third member.
    pub fn partition(&self, a: usize, b: usize) {
        self.net.block(a, b, true);
    }

    /// Undo [`Cluster::partition`].
    pub fn unpartition(&self, a: usize, b: usize) {
        self.net.block(a, b, false);
    }

    /// Every byte that leaves or enters member `i` through the peer proxies waits `delay`
    /// (both directions; a link between two delayed members waits the sum). Zero removes it.
    pub fn set_delay(&self, i: usize, delay: Duration) {
        self.net.set_delay(i, delay);
    }

    /// SIGSTOP (`stop` true) or SIGCONT member `i`'s process, if it runs.
    pub fn signal_stop(&self, i: usize, stop: bool) {
        if let Some(pid) = self.members[i].pid() {
            let name = if stop { "-STOP" } else { "-CONT" };
            let status = Command::new("kill")
                .args([name, &pid.to_string()])
                .status()
                .expect("kill");
            assert!(status.success(), "kill {name} {pid}");
        }
    }

    /// Kills every member in `which`, starts them all again with the same data dirs, then
    /// waits until each answers Status with a leader ([`Cluster::restart`] one at a time
    /// cannot restart a majority: the first would wait for a leader that needs the others).
    pub async fn restart_many(&mut self, which: &[usize]) {
        for &i in which {
            self.kill(i);
        }
        for &i in which {
            self.members[i].attempt = 0;
            self.spawn(i);
        }
        for &i in which {
            self.wait_member_up(i).await;
        }
    }

    /// Whether member `i`'s process runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        !self.members[i].exited()
    }

    /// A new member slot named `name` (not started): ports, proxy and data dir. Its advertised
    /// peer URL ([`Cluster::peer_url`]) is what `etcdctl member add NAME --peer-urls=…` needs.
    pub fn reserve_member(&mut self, name: &str) -> usize {
        let i = self.members.len();
        let proxy_port = self.net.add_proxy(i);
        self.members.push(Member {
            name: name.to_string(),
            client_port: free_port(),
            peer_port: free_port(),
            proxy_ports: vec![proxy_port],
            data_dir: self.dir.path().join(format!("{name}-data0")),
            log_path: self.dir.path().join(format!("{name}.log")),
            id: None,
            initial_cluster: String::new(),
            initial_state: "existing",
            child: None,
            started: false,
            removed: false,
            attempt: 0,
            failpoints: None,
        });
        self.net.set_target(i, self.members[i].peer_port);
        i
    }

    /// Another proxy port for member `i` (a second peer URL that reaches the same member), e.g.
    /// for `etcdctl member update ID --peer-urls=<alias>`. Isolation covers it too.
    pub fn add_peer_alias(&mut self, i: usize) -> String {
        let port = self.net.add_proxy(i);
        self.members[i].proxy_ports.push(port);
        format!("http://127.0.0.1:{port}")
    }

    /// Starts the process of member `name` (reserved with [`Cluster::reserve_member`], or
    /// reserved now) to join the running cluster: `--initial-cluster-state existing` and an
    /// `--initial-cluster` built from Cluster.MemberList of a live member (the new member
    /// must already have been added, e.g. with `etcdctl member add`). Waits until it answers
    /// Status with a leader; returns its index.
    pub async fn add_member_process(&mut self, name: &str) -> usize {
        let i = match self.members.iter().position(|m| m.name == name) {
            Some(i) => i,
            None => self.reserve_member(name),
        };
        let mine = self.peer_url(i);
        let mut list = None;
        for j in self.live() {
            if let Ok(resp) = self.member_list(j).await {
                list = Some(resp);
                break;
            }
        }
        let list = list.expect("no live member answered MemberList");
        assert!(
            list.members.iter().any(|m| m.peer_ur_ls.contains(&mine)),
            "{name} ({mine}) is not a member yet: add it first ({list:?})"
        );
        let initial_cluster = list
            .members
            .iter()
            .flat_map(|m| {
                let member_name = if m.peer_ur_ls.contains(&mine) {
                    name.to_string()
                } else if m.name.is_empty() {
                    format!("{:x}", m.id)
                } else {
                    m.name.clone()
                };
                m.peer_ur_ls
                    .iter()
                    .map(move |url| format!("{member_name}={url}"))
            })
            .collect::<Vec<_>>()
            .join(",");
        let m = &mut self.members[i];
        m.initial_cluster = initial_cluster;
        m.initial_state = "existing";
        m.started = true;
        m.attempt = 0;
        self.spawn(i);
        self.wait_member_up(i).await;
        i
    }

    /// After `etcdctl member remove` of member `i`: waits (bounded) until its process exits or
    /// refuses a linearizable read, then kills it and leaves it out of the cluster's members.
    pub async fn wait_removed(&mut self, i: usize, timeout: Duration) -> Removal {
        let deadline = Instant::now() + timeout;
        let outcome = loop {
            if let Some(child) = self.members[i].child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    break Removal::Exited(status);
                }
            }
            if let Err(e) = self.get(i, "removal-probe", false, CALL_TIMEOUT).await {
                // Refusing might be a passing hiccup: it must still refuse after a while,
                // unless it exits meanwhile.
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Some(Ok(Some(status))) = self.members[i].child.as_mut().map(Child::try_wait)
                {
                    break Removal::Exited(status);
                }
                if self
                    .get(i, "removal-probe", false, CALL_TIMEOUT)
                    .await
                    .is_err()
                {
                    break Removal::Refuses(e);
                }
            }
            assert!(
                Instant::now() < deadline,
                "removed member {} still serves after {timeout:?}",
                self.members[i].name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        self.kill(i);
        self.members[i].removed = true;
        outcome
    }

    /// Waits (bounded) until every live member reports the same revision and the same keys
    /// (serializable Range of the whole keyspace), and every live voter the same HashKV at
    /// that revision. Panics with what differed otherwise.
    pub async fn assert_converged(&mut self) {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let differences = match self.compare().await {
                Ok(()) => return,
                Err(d) => d,
            };
            assert!(
                Instant::now() < deadline,
                "members did not converge within {CONVERGE_TIMEOUT:?}: {differences}\n{}",
                self.describe().await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One comparison round for [`Cluster::assert_converged`].
    async fn compare(&mut self) -> Result<(), String> {
        let live = self.live();
        let mut contents: Vec<(usize, i64, Vec<KvSummary>)> = Vec::new();
        let mut voters = Vec::new();
        for &i in &live {
            let status = self.status(i).await?;
            if !status.is_learner {
                voters.push(i);
            }
            let mut kv = KvClient::new(self.channel(i).await?);
            let resp = timed(kv.range(RangeRequest {
                key: vec![0],
                range_end: vec![0],
                serializable: true,
                ..Default::default()
            }))
            .await
            .map_err(|e| format!("{}: range: {e}", self.members[i].name))?;
            let revision = resp.header.map_or(0, |h| h.revision);
            let kvs = resp
                .kvs
                .into_iter()
                .map(|kv| KvSummary {
                    key: kv.key,
                    value: kv.value,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    version: kv.version,
                    lease: kv.lease,
                })
                .collect();
            contents.push((i, revision, kvs));
        }
        let (first, revision, kvs) = &contents[0];
        for (i, r, k) in &contents[1..] {
            if r != revision {
                return Err(format!(
                    "revision {revision} on {} but {r} on {}",
                    self.members[*first].name, self.members[*i].name
                ));
            }
            if k != kvs {
                return Err(format!(
                    "at revision {revision} {} holds {} keys and {} holds {} keys (or values differ)",
                    self.members[*first].name,
                    kvs.len(),
                    self.members[*i].name,
                    k.len()
                ));
            }
        }
        let mut hashes = Vec::new();
        for &i in &voters {
            let mut maintenance = MaintenanceClient::new(self.channel(i).await?);
            let resp = timed(maintenance.hash_kv(HashKvRequest {
                revision: *revision,
            }))
            .await
            .map_err(|e| format!("{}: HashKV: {e}", self.members[i].name))?;
            hashes.push((i, resp.hash, resp.compact_revision));
        }
        if let Some((h0, rest)) = hashes.split_first() {
            for h in rest {
                if (h.1, h.2) != (h0.1, h0.2) {
                    return Err(format!(
                        "HashKV at {revision}: {} says {:?}, {} says {:?}",
                        self.members[h0.0].name,
                        (h0.1, h0.2),
                        self.members[h.0].name,
                        (h.1, h.2)
                    ));
                }
            }
        }
        Ok(())
    }

    /// One line per member: process state and Status (for failure messages).
    pub async fn describe(&mut self) -> String {
        let mut out = String::new();
        for i in 0..self.members.len() {
            let running = !self.members[i].exited();
            let m = &self.members[i];
            let state = match (m.started, m.removed, running) {
                (false, _, _) => "not started".to_string(),
                (_, true, _) => "removed".to_string(),
                (_, _, false) => "not running".to_string(),
                _ => match self.status(i).await {
                    Ok(s) => format!(
                        "id {:x} leader {:x} term {} index {} applied {} revision {} learner {}",
                        s.header.as_ref().map_or(0, |h| h.member_id),
                        s.leader,
                        s.raft_term,
                        s.raft_index,
                        s.raft_applied_index,
                        s.header.as_ref().map_or(0, |h| h.revision),
                        s.is_learner
                    ),
                    Err(e) => format!("Status failed: {e}"),
                },
            };
            let m = &self.members[i];
            out.push_str(&format!(
                "  {} client {} peer {} (proxy {:?}): {state}\n",
                m.name, m.client_port, m.peer_port, m.proxy_ports
            ));
        }
        out
    }

    /// What member `i` logged so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log_path).unwrap_or_default()
    }

    /// Waits until member `i` answers Status with a leader; restarts it on new ports if it
    /// exits early (port taken).
    async fn wait_member_up(&mut self, i: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.members[i].exited() {
                self.respawn_on_new_ports(i, false);
            }
            if let Ok(status) = self.status(i).await {
                if status.leader != 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if !self.members[i].exited() {
                        return;
                    }
                }
            }
            if Instant::now() >= deadline {
                let name = self.members[i].name.clone();
                panic!(
                    "member {name} did not come up within {START_TIMEOUT:?}\n{}",
                    self.describe().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Member `i` exited early: start it again on other client and peer ports (in a fresh
    /// data dir if `fresh_dir`, for a member that never started).
    fn respawn_on_new_ports(&mut self, i: usize, fresh_dir: bool) {
        let m = &mut self.members[i];
        m.attempt += 1;
        let status = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        assert!(
            m.attempt < START_ATTEMPTS,
            "member {} exited {START_ATTEMPTS} times while starting (last: {status:?}); log:\n{}",
            m.name,
            tail(&m.log_path, 40)
        );
        m.client_port = free_port();
        m.peer_port = free_port();
        if fresh_dir {
            m.data_dir = self
                .dir
                .path()
                .join(format!("{}-data{}", m.name, m.attempt));
        }
        self.net.set_target(i, self.members[i].peer_port);
        self.spawn(i);
    }

    fn spawn(&mut self, i: usize) {
        let kind = self.engines.get(i).copied().unwrap_or(self.kind);
        let m = &self.members[i];
        let client = m.client_url();
        let listen_peer = format!("{}://127.0.0.1:{}", peer_scheme(), m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .expect("member log file");
        let mut cmd = match kind {
            Kind::Etcd => Command::new("etcd"),
            Kind::Memory | Kind::Rocks => Command::new(super::metastore_bin()),
        };
        let mut settings: Vec<(&str, String)> = vec![
            ("name", m.name.clone()),
            ("data-dir", m.data_dir.display().to_string()),
            ("listen-client-urls", client.clone()),
            ("advertise-client-urls", client),
            ("listen-peer-urls", listen_peer),
            ("initial-advertise-peer-urls", m.peer_url()),
            ("initial-cluster", m.initial_cluster.clone()),
            ("initial-cluster-state", m.initial_state.to_string()),
            ("initial-cluster-token", self.token.clone()),
        ];
        for (flag, default) in [("heartbeat-interval", "100"), ("election-timeout", "1000")] {
            let given =
                |e: &String| e == &format!("--{flag}") || e.starts_with(&format!("--{flag}="));
            if !self.extra.iter().any(given) {
                settings.push((flag, default.to_string()));
            }
        }
        match kind {
            Kind::Memory => settings.push(("storage-engine", "memory".into())),
            Kind::Rocks => settings.push(("storage-engine", "rocksdb".into())),
            Kind::Etcd => {}
        }
        // Even members read a config file, odd ones ETCD_* variables, under Launch::FileAndEnv.
        let launch = match self.launch {
            Launch::FileAndEnv if i.is_multiple_of(2) => Launch::FileAndEnv,
            Launch::FileAndEnv => Launch::Env,
            other => other,
        };
        match launch {
            Launch::Flags => {
                for (flag, value) in &settings {
                    cmd.arg(format!("--{flag}")).arg(value);
                }
            }
            Launch::Env => {
                for (flag, value) in &settings {
                    cmd.env(
                        format!("ETCD_{}", flag.to_uppercase().replace('-', "_")),
                        value,
                    );
                }
            }
            Launch::FileAndEnv => {
                let yaml: String = settings
                    .iter()
                    // etcd decodes the YAML into typed fields: numbers must be YAML numbers.
                    .map(|(flag, value)| match value.parse::<u64>() {
                        Ok(n) => format!("{flag}: {n}\n"),
                        Err(_) => format!("{flag}: '{value}'\n"),
                    })
                    .collect();
                let path = self.dir.path().join(format!("{}.yml", m.name));
                std::fs::write(&path, yaml).expect("config file");
                cmd.arg("--config-file").arg(path);
            }
        }
        assert!(
            self.extra.is_empty() || launch == Launch::Flags,
            "extra flags go with Launch::Flags only"
        );
        cmd.args(&self.extra);
        if let Some(failpoints) = &self.members[i].failpoints {
            cmd.env("FAILPOINTS", failpoints);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        let child = kind.spawn(&mut cmd);
        self.net.set_pid(i, Some(child.id()));
        self.members[i].child = Some(child);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            for m in &self.members {
                if m.started {
                    eprintln!(
                        "----- last lines of {} ({}) -----\n{}",
                        m.name,
                        m.log_path.display(),
                        tail(&m.log_path, 30)
                    );
                }
            }
        }
        if let Some(rt) = self.net.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The fields of a key that members must agree on.
#[derive(Debug, PartialEq, Eq)]
struct KvSummary {
    key: Vec<u8>,
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: i64,
}

/// Awaits a unary call bounded by [`CALL_TIMEOUT`].
async fn timed<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(status_text(&status)),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

/// `Code: message` of a gRPC status.
pub fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The peer proxies.

/// The proxies of every member, on a runtime of their own.
struct Net {
    rt: Option<tokio::runtime::Runtime>,
    state: Arc<Mutex<NetState>>,
}

#[derive(Default)]
struct NetState {
    /// Per member: the real peer port its proxies forward to.
    targets: Vec<u16>,
    /// Per member: the pid of its process, to attribute connections to it.
    pids: Vec<Option<u32>>,
    isolated: Vec<bool>,
    /// Per member: latency added to every chunk entering or leaving it.
    delays: Vec<Duration>,
    /// Pairs of members (lower index first) whose link is cut.
    blocked: std::collections::BTreeSet<(usize, usize)>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
}

struct Conn {
    /// The member whose proxy accepted the connection.
    to: usize,
    /// The member whose process opened it, if found.
    from: Option<usize>,
    abort: tokio::task::AbortHandle,
}

impl NetState {
    fn grow(&mut self, i: usize) {
        if self.targets.len() <= i {
            self.targets.resize(i + 1, 0);
            self.pids.resize(i + 1, None);
            self.isolated.resize(i + 1, false);
            self.delays.resize(i + 1, Duration::ZERO);
        }
    }

    fn cut(&self, to: usize, from: Option<usize>) -> bool {
        self.isolated[to]
            || from
                .is_some_and(|f| self.isolated[f] || self.blocked.contains(&(f.min(to), f.max(to))))
    }

    fn delay(&self, to: usize, from: Option<usize>) -> Duration {
        self.delays[to] + from.map_or(Duration::ZERO, |f| self.delays[f])
    }
}

impl Net {
    fn new() -> Net {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("peer-proxy")
            .enable_all()
            .build()
            .expect("proxy runtime");
        Net {
            rt: Some(rt),
            state: Arc::new(Mutex::new(NetState::default())),
        }
    }

    fn set_target(&self, i: usize, port: u16) {
        let mut state = self.state.lock().unwrap();
        state.grow(i);
        state.targets[i] = port;
    }

    fn set_pid(&self, i: usize, pid: Option<u32>) {
        let mut state = self.state.lock().unwrap();
        state.grow(i);
        state.pids[i] = pid;
    }

    fn isolate(&self, i: usize, isolated: bool) {
        let mut state = self.state.lock().unwrap();
        state.grow(i);
        state.isolated[i] = isolated;
        if isolated {
            for conn in state.conns.values() {
                if conn.to == i || conn.from == Some(i) {
                    conn.abort.abort();
                }
            }
        }
    }

    fn block(&self, a: usize, b: usize, blocked: bool) {
        let mut state = self.state.lock().unwrap();
        state.grow(a.max(b));
        let pair = (a.min(b), a.max(b));
        if blocked {
            state.blocked.insert(pair);
            for conn in state.conns.values() {
                if conn
                    .from
                    .is_some_and(|f| (f.min(conn.to), f.max(conn.to)) == pair)
                {
                    conn.abort.abort();
                }
            }
        } else {
            state.blocked.remove(&pair);
        }
    }

    fn set_delay(&self, i: usize, delay: Duration) {
        let mut state = self.state.lock().unwrap();
        state.grow(i);
        state.delays[i] = delay;
    }

    /// A new proxy listener in front of member `i`; its port.
    fn add_proxy(&self, i: usize) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a proxy port");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().unwrap().port();
        self.state.lock().unwrap().grow(i);
        let state = self.state.clone();
        let rt = self.rt.as_ref().expect("proxy runtime").handle().clone();
        rt.clone().spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("proxy listener");
            loop {
                let Ok((inbound, from_addr)) = listener.accept().await else {
                    continue;
                };
                let pids = state.lock().unwrap().pids.clone();
                let from = owner(from_addr.port(), port, &pids);
                let (target, cut) = {
                    let state = state.lock().unwrap();
                    (state.targets[i], state.cut(i, from))
                };
                if cut {
                    drop(inbound);
                    continue;
                }
                let id = {
                    let mut s = state.lock().unwrap();
                    s.next_conn += 1;
                    s.next_conn
                };
                let guard = ConnGuard {
                    id,
                    state: state.clone(),
                };
                let link_state = state.clone();
                let task = rt.spawn(async move {
                    let _guard = guard;
                    let inbound = inbound;
                    let _ = inbound.set_nodelay(true);
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let _ = outbound.set_nodelay(true);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        pump(in_read, out_write, link_state.clone(), i, from),
                        pump(out_read, in_write, link_state, i, from),
                    );
                });
                let mut s = state.lock().unwrap();
                if s.cut(i, from) {
                    // Isolated between the check and now.
                    task.abort();
                } else if !task.is_finished() {
                    s.conns.insert(
                        id,
                        Conn {
                            to: i,
                            from,
                            abort: task.abort_handle(),
                        },
                    );
                }
            }
        });
        port
    }
}

/// Copies one direction of a proxied connection, each chunk held back by the link's current
/// delay (read when the chunk arrives, so a delay set later applies to later bytes only; the
/// order of chunks is kept).
async fn pump(
    mut from_half: tokio::net::tcp::OwnedReadHalf,
    mut to_half: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<Mutex<NetState>>,
    to: usize,
    from: Option<usize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_half.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let delay = state.lock().unwrap().delay(to, from);
                    if tx
                        .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to_half.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to_half.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Removes a finished (or aborted) connection from the table.
struct ConnGuard {
    id: u64,
    state: Arc<Mutex<NetState>>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut state) = self.state.lock() {
            state.conns.remove(&self.id);
        }
    }
}

/// The member whose process owns the client end of a loopback connection from `local_port` to
/// `remote_port`: the socket's inode from /proc/net/tcp, then the process whose fd links to it.
fn owner(local_port: u16, remote_port: u16, pids: &[Option<u32>]) -> Option<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!(":{local_port:04X}");
    let remote = format!(":{remote_port:04X}");
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 9
            && fields[1].ends_with(&local)
            && fields[2].ends_with(&remote)
            && fields[9] != "0")
            .then(|| fields[9].to_string())
    })?;
    let link = format!("socket:[{inode}]");
    pids.iter().position(|pid| {
        let Some(pid) = pid else { return false };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == link.as_str())
        })
    })
}

// ---------------------------------------------------------------------------------------------
// A small JSON reader for etcdctl's `-w json` output.

/// A parsed JSON value. Numbers keep their text (etcd's uint64 ids overflow f64).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(text: &str) -> Json {
        let mut p = JsonParser {
            s: text.trim().as_bytes(),
            at: 0,
        };
        let v = p.value();
        p.ws();
        assert_eq!(p.at, p.s.len(), "trailing text after JSON: {text}");
        v
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> &[Json] {
        match self {
            Json::Arr(items) => items,
            _ => &[],
        }
    }

    /// The strings of an array member `key` (empty if absent).
    pub fn strings(&self, key: &str) -> Vec<String> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    at: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.at < self.s.len() && self.s[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) {
        self.ws();
        assert_eq!(
            self.s.get(self.at),
            Some(&c),
            "JSON: expected {:?} at {}",
            c as char,
            self.at
        );
        self.at += 1;
    }

    fn peek(&mut self) -> u8 {
        self.ws();
        *self.s.get(self.at).expect("JSON: unexpected end")
    }

    fn value(&mut self) -> Json {
        match self.peek() {
            b'{' => {
                self.eat(b'{');
                Json::Obj(self.items(b'}', |p| {
                    let key = p.string();
                    p.eat(b':');
                    (key, p.value())
                }))
            }
            b'[' => {
                self.eat(b'[');
                Json::Arr(self.items(b']', Self::value))
            }
            b'"' => Json::Str(self.string()),
            b't' => self.word("true", Json::Bool(true)),
            b'f' => self.word("false", Json::Bool(false)),
            b'n' => self.word("null", Json::Null),
            _ => {
                let start = self.at;
                while self.at < self.s.len()
                    && matches!(
                        self.s[self.at],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.at += 1;
                }
                assert!(self.at > start, "JSON: unexpected byte at {start}");
                Json::Num(String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
            }
        }
    }

    /// The comma-separated items of an object or array up to `close`, whose opening bracket
    /// was eaten.
    fn items<T>(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> T) -> Vec<T> {
        let mut items = Vec::new();
        if self.peek() == close {
            self.at += 1;
            return items;
        }
        loop {
            items.push(item(self));
            if self.peek() == b',' {
                self.at += 1;
            } else {
                self.eat(close);
                return items;
            }
        }
    }

    fn word(&mut self, word: &str, v: Json) -> Json {
        assert!(
            self.s[self.at..].starts_with(word.as_bytes()),
            "JSON: bad literal at {}",
            self.at
        );
        self.at += word.len();
        v
    }

    fn string(&mut self) -> String {
        self.eat(b'"');
        let mut out = Vec::new();
        loop {
            let c = *self.s.get(self.at).expect("JSON: unterminated string");
            self.at += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.s[self.at];
                    self.at += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = std::str::from_utf8(&self.s[self.at..self.at + 4]).unwrap();
                            self.at += 4;
                            let c = char::from_u32(u32::from_str_radix(hex, 16).unwrap())
                                .unwrap_or('\u{fffd}');
                            out.extend_from_slice(c.to_string().as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                other => out.push(other),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
