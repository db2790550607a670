//! End-to-end tests of the raft node through its public API: a single member with its WAL and
//! snapshots on disk, and a three-member cluster connected by in-process channels.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use metastore_raft_node::{
    MemberChange, MembershipChange, Message, PersistJob, RaftConfig, RaftError, RaftNode,
    SnapshotWriter, StateMachine, Transport,
};

const WAIT: Duration = Duration::from_secs(15);

/// A payload the test state machine panics on when applying it.
const PANIC_ON_APPLY: &[u8] = b"panic on apply";

/// A payload whose apply blocks until [`LogMachine::apply_gate`] lets it go, as a slow disk
/// would make it.
const BLOCK_ON_APPLY: &[u8] = b"block on apply";

/// What the test state machine saw.
#[derive(Default, Debug)]
struct Applied {
    /// (index, payload) of every applied proposal, in apply order.
    log: Vec<(u64, Vec<u8>)>,
    /// Indexes of restored snapshots.
    restores: Vec<u64>,
    /// The length of `log` at each `applied_batch` call.
    batch_ends: Vec<usize>,
}

/// An append-only log of payloads: volatile, or `durable` (its state outlives a restart when
/// the test hands the same machine to the restarted node, as an engine on disk would). Like the
/// RocksDB engine, a durable machine makes its entries durable only when its persist job runs:
/// [`LogMachine::crash`] drops what came after.
#[derive(Clone, Default)]
struct LogMachine {
    applied: Arc<Mutex<Applied>>,
    durable: bool,
    /// How many entries of the log the last persist job made durable.
    persisted: Arc<Mutex<usize>>,
    /// When set, a persist job first waits for a message here (or for its sender to be dropped),
    /// as a slow disk would make it wait.
    persist_gate: Option<Arc<Mutex<std::sync::mpsc::Receiver<()>>>>,
    /// The nice value of the thread each persist job ran on.
    persist_nice: Arc<Mutex<Vec<i32>>>,
    /// The applied index each persist job was started at.
    persist_calls: Arc<Mutex<Vec<u64>>>,
    /// How many persist jobs finished.
    persists_finished: Arc<Mutex<usize>>,
    /// The length of the log at each whole snapshot taken.
    snapshots_taken: Arc<Mutex<Vec<usize>>>,
    /// What applying [`BLOCK_ON_APPLY`] waits for (a message, or the sender being dropped).
    apply_gate: Option<Arc<Mutex<std::sync::mpsc::Receiver<()>>>>,
    /// Set once an apply of [`BLOCK_ON_APPLY`] waits at the gate.
    apply_blocked: Arc<std::sync::atomic::AtomicBool>,
}

impl LogMachine {
    fn durable() -> Self {
        LogMachine {
            durable: true,
            ..Default::default()
        }
    }

    fn log(&self) -> Vec<(u64, Vec<u8>)> {
        self.applied.lock().unwrap().log.clone()
    }

    fn restores(&self) -> Vec<u64> {
        self.applied.lock().unwrap().restores.clone()
    }

    /// What a crash leaves of a durable machine: the log as its last persist job found it.
    fn crash(&self) {
        let persisted = *self.persisted.lock().unwrap();
        self.applied.lock().unwrap().log.truncate(persisted);
    }
}

impl StateMachine for LogMachine {
    /// The index the payload was applied at, and the payload.
    type Output = (u64, Vec<u8>);

    fn applied_index(&self) -> u64 {
        if !self.durable {
            return 0;
        }
        self.log().last().map_or(0, |(index, _)| *index)
    }

    fn persist(&mut self) -> Option<PersistJob> {
        if !self.durable {
            return None;
        }
        self.persist_calls
            .lock()
            .unwrap()
            .push(self.applied_index());
        let (applied, persisted) = (self.applied.clone(), self.persisted.clone());
        let gate = self.persist_gate.clone();
        let nice = self.persist_nice.clone();
        let finished = self.persists_finished.clone();
        // Everything applied by the time the job runs, as a flush would write it.
        Some(Box::new(move || {
            // SAFETY: `getpriority` takes plain integers; `who` 0 is the calling thread.
            nice.lock()
                .unwrap()
                .push(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) });
            if let Some(gate) = gate {
                let _ = gate.lock().unwrap().recv_timeout(WAIT);
            }
            *persisted.lock().unwrap() = applied.lock().unwrap().log.len();
            *finished.lock().unwrap() += 1;
            Ok(())
        }))
    }

    fn apply(&mut self, index: u64, _term: u64, payload: &[u8]) -> Self::Output {
        // The test of the raft loop's panic policy injects a panic on the loop's thread.
        assert_ne!(
            payload, PANIC_ON_APPLY,
            "a panic injected on the raft thread"
        );
        if payload == BLOCK_ON_APPLY {
            if let Some(gate) = &self.apply_gate {
                self.apply_blocked
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = gate.lock().unwrap().recv_timeout(WAIT);
            }
        }
        self.applied
            .lock()
            .unwrap()
            .log
            .push((index, payload.to_vec()));
        (index, payload.to_vec())
    }

    fn apply_noop(&mut self, _index: u64, _term: u64) {}

    fn applied_batch(&mut self) {
        let mut applied = self.applied.lock().unwrap();
        let len = applied.log.len();
        applied.batch_ends.push(len);
    }

    /// Membership changes are not logged; the output is the outcome, rendered.
    fn apply_membership(
        &mut self,
        index: u64,
        _term: u64,
        change: &MembershipChange<'_>,
    ) -> Self::Output {
        (index, format!("{:?}", change.outcome).into_bytes())
    }

    fn snapshot(&self) -> SnapshotWriter {
        let log = self.log();
        self.snapshots_taken.lock().unwrap().push(log.len());
        Box::new(move |w: &mut dyn Write| {
            for (index, payload) in log {
                w.write_all(&index.to_le_bytes())?;
                w.write_all(&(payload.len() as u32).to_le_bytes())?;
                w.write_all(&payload)?;
            }
            Ok(())
        })
    }

    fn restore(&mut self, index: u64, _term: u64, reader: &mut dyn Read) -> io::Result<()> {
        let mut data = Vec::new();
        reader.read_to_end(&mut data)?;
        let mut log = Vec::new();
        let mut rest = &data[..];
        while !rest.is_empty() {
            if rest.len() < 12 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "short snapshot"));
            }
            let entry_index = u64::from_le_bytes(rest[..8].try_into().unwrap());
            let len = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
            log.push((entry_index, rest[12..12 + len].to_vec()));
            rest = &rest[12 + len..];
        }
        let mut applied = self.applied.lock().unwrap();
        applied.log = log;
        applied.restores.push(index);
        Ok(())
    }
}

/// A transport for a single member: there is nobody to talk to.
struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, _messages: Vec<Message>) {}
}

type Node = RaftNode<(u64, Vec<u8>)>;

/// Delivers messages between in-process members, except to or from isolated ones.
#[derive(Default)]
struct Network {
    nodes: RwLock<HashMap<u64, Node>>,
    isolated: RwLock<HashSet<u64>>,
    /// A member whose raft loop blocks in its next send until this is cleared.
    paused: Mutex<Option<u64>>,
    resumed: Condvar,
    /// (from, to, entries) of every append message with entries whose payload starts with
    /// `traced`.
    traced_appends: Mutex<Vec<(u64, u64, usize)>>,
    traced: RwLock<Vec<u8>>,
}

struct ChannelTransport {
    network: Arc<Network>,
}

impl Transport for ChannelTransport {
    fn send(&self, messages: Vec<Message>) {
        let wait_while_paused = || {
            let mut paused = self.network.paused.lock().unwrap();
            while messages.iter().any(|m| Some(m.from) == *paused) {
                paused = self.network.resumed.wait(paused).unwrap();
            }
        };
        // A loop that runs as a task must not block its worker in place (the runtime's timers
        // would stop with it): the pause blocks as the Transport contract allows.
        let on_multi_thread_runtime = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_multi_thread_runtime {
            tokio::task::block_in_place(wait_while_paused);
        } else {
            wait_while_paused();
        }
        let traced = self.network.traced.read().unwrap().clone();
        if !traced.is_empty() {
            for msg in &messages {
                let entries = msg
                    .get_entries()
                    .iter()
                    .filter(|e| e.data.len() > 8 && e.data[8..].starts_with(&traced))
                    .count();
                if msg.get_msg_type() == raft::eraftpb::MessageType::MsgAppend && entries > 0 {
                    let mut appends = self.network.traced_appends.lock().unwrap();
                    appends.push((msg.from, msg.to, entries));
                }
            }
        }
        let nodes = self.network.nodes.read().unwrap();
        let isolated = self.network.isolated.read().unwrap();
        for msg in messages {
            let (from, to) = (msg.from, msg.to);
            let is_snapshot = msg.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
            let mut delivered = !isolated.contains(&from) && !isolated.contains(&to);
            if delivered {
                match (nodes.get(&to), nodes.get(&from)) {
                    // Snapshot messages carry only metadata: stream the file, as a real
                    // transport does.
                    (Some(receiver), Some(sender)) if is_snapshot => {
                        delivered = sender
                            .open_snapshot(&msg)
                            .and_then(|(mut file, len)| {
                                receiver.receive_snapshot(msg, len, &mut file)
                            })
                            .is_ok();
                    }
                    (Some(receiver), _) => receiver.step(msg),
                    _ => delivered = false,
                }
            }
            if is_snapshot {
                if let Some(sender) = nodes.get(&from) {
                    sender.report_snapshot(to, delivered);
                }
            }
        }
    }
}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// Started from a multi-thread runtime, the loop runs as a task of it (no thread of its own);
/// started elsewhere, on its own thread `raft-<id>`.
#[test]
fn the_loop_is_a_task_of_a_multi_thread_runtime_and_a_thread_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let (_, node) = start_alone(dir.path());
    // A new thread names itself once it runs: until then it has its parent's name.
    let deadline = Instant::now() + WAIT;
    while !thread_names().contains(&"raft-1".to_string()) {
        assert!(Instant::now() < deadline, "{:?}", thread_names());
        std::thread::sleep(Duration::from_millis(5));
    }
    node.shutdown();
    assert!(!thread_names().contains(&"raft-1".to_string()));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (sm, node) = start_alone(dir.path());
        // Applied by the loop: a thread of its own would have named itself by then.
        propose_many(&node, "on-task", 3).await;
        assert_eq!(sm.log().len(), 3);
        assert!(
            !thread_names().contains(&"raft-1".to_string()),
            "{:?}",
            thread_names()
        );
        node.shutdown();
    });
}

/// An apply that blocks (a slow disk) does not stop the runtime the loop runs on: with a single
/// worker, a timer task goes on ticking while the apply waits. (Applied in place, the worker
/// would run nothing else, timers included, until the apply returned.)
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_blocking_apply_leaves_the_runtime_running() {
    let dir = tempfile::tempdir().unwrap();
    let (open_gate, gate) = std::sync::mpsc::channel();
    let sm = LogMachine {
        apply_gate: Some(Arc::new(Mutex::new(gate))),
        ..Default::default()
    };
    let node: Node = RaftNode::start(config(1, dir.path()), sm.clone(), Arc::new(NoPeers)).unwrap();
    bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
    let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticker = {
        let ticks = Arc::clone(&ticks);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let proposal = {
        let node = node.clone();
        tokio::spawn(async move { node.propose(BLOCK_ON_APPLY).await })
    };
    // This thread is the test's, not the worker: it may block to watch.
    let deadline = Instant::now() + WAIT;
    while !sm.apply_blocked.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the apply never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = ticks.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    let during = ticks.load(std::sync::atomic::Ordering::SeqCst) - before;
    open_gate.send(()).unwrap();
    let (index, payload) = bounded("the proposal", proposal).await.unwrap().unwrap();
    assert_eq!(payload, BLOCK_ON_APPLY);
    assert!(
        during >= 2,
        "the timer task ticked {during} times in 300 ms while the apply was blocked"
    );
    assert_eq!(sm.log().last(), Some(&(index, BLOCK_ON_APPLY.to_vec())));
    ticker.abort();
    node.shutdown();
}

/// Member 1 alone (no peers) over `dir`, applying to a fresh [`LogMachine`].
fn start_alone(dir: &Path) -> (LogMachine, Node) {
    let sm = LogMachine::default();
    let node = RaftNode::start(config(1, dir), sm.clone(), Arc::new(NoPeers)).unwrap();
    (sm, node)
}

fn config(member_id: u64, dir: &Path) -> RaftConfig {
    RaftConfig::new(member_id, dir.join("member"))
}

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `condition` until it holds, failing the test after `WAIT`.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().ends_with(suffix))
        .collect();
    files.sort();
    files
}

/// Proposes `count` payloads `"{prefix}-{i}"` concurrently; returns (payload, output) pairs.
async fn propose_many(node: &Node, prefix: &str, count: usize) -> Vec<(Vec<u8>, (u64, Vec<u8>))> {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let node = node.clone();
            let payload = format!("{prefix}-{i}").into_bytes();
            tokio::spawn(async move {
                let output = node.propose(payload.clone()).await;
                (payload, output)
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        let (payload, output) = bounded("a proposal", task).await.unwrap();
        results.push((payload, output.expect("proposal failed")));
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_proposals_each_get_their_own_output_in_log_order() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (sm, node) = start_alone(dir.path());
    assert_eq!(node.wait_leader(Duration::from_secs(1)).await.unwrap(), 1);
    assert!(started.elapsed() < Duration::from_secs(1));

    let results = propose_many(&node, "value", 200).await;

    // Every proposer got the output of applying its own payload.
    for (payload, (_, output_payload)) in &results {
        assert_eq!(payload, output_payload);
    }
    let indexes: HashSet<u64> = results.iter().map(|(_, (index, _))| *index).collect();
    assert_eq!(indexes.len(), 200, "each proposal has its own log index");

    // Entries were applied in log order, and each at the index its proposer was told.
    let log = sm.log();
    assert_eq!(log.len(), 200);
    assert!(
        log.windows(2).all(|w| w[0].0 < w[1].0),
        "apply order is log order"
    );
    let by_payload: HashMap<&[u8], u64> = log.iter().map(|(i, p)| (p.as_slice(), *i)).collect();
    for (payload, (index, _)) in &results {
        assert_eq!(by_payload[payload.as_slice()], *index);
    }

    let status = node.status();
    assert_eq!(status.member_id, 1);
    assert_eq!(status.leader_id, 1);
    assert!(status.is_leader);
    assert!(status.term >= 1);
    assert!(status.applied_index >= log.last().unwrap().0);
    assert!(status.committed_index >= status.applied_index);
    node.shutdown();
}

/// `applied_batch` closes every apply round before its proposers hear back, so whatever it
/// does for the batch (the KV state machine wakes the watch dispatcher) is done by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_apply_round_ends_with_applied_batch_before_its_proposers_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (sm, node) = start_alone(dir.path());
    assert_eq!(node.wait_leader(Duration::from_secs(1)).await.unwrap(), 1);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (node, sm) = (node.clone(), sm.clone());
            tokio::spawn(async move {
                let payload = format!("p-{i}").into_bytes();
                node.propose(payload.clone())
                    .await
                    .expect("proposal failed");
                let applied = sm.applied.lock().unwrap();
                let position = applied
                    .log
                    .iter()
                    .position(|(_, p)| *p == payload)
                    .expect("applied");
                assert!(
                    applied.batch_ends.iter().any(|end| *end > position),
                    "proposal {i} answered before its round's applied_batch"
                );
            })
        })
        .collect();
    for task in tasks {
        bounded("a proposal", task).await.unwrap();
    }
    let applied = sm.applied.lock().unwrap();
    assert_eq!(
        applied.batch_ends.last(),
        Some(&100),
        "the last round closed"
    );
    drop(applied);
    node.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reapplies_committed_entries_in_the_same_order() {
    let dir = tempfile::tempdir().unwrap();
    let (sm, node) = start_alone(dir.path());
    bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
    propose_many(&node, "before", 50).await;
    for i in 0..10 {
        bounded(
            "a proposal",
            node.propose(format!("sequential-{i}").into_bytes()),
        )
        .await
        .unwrap();
    }
    let before = sm.log();
    assert_eq!(before.len(), 60);
    let term_before = node.status().term;
    node.shutdown();
    assert!(matches!(
        node.propose(b"late".to_vec()).await,
        Err(RaftError::Stopped)
    ));

    let (sm, node) = start_alone(dir.path());
    wait_until("the log to be applied again", || {
        sm.log().len() >= before.len()
    })
    .await;
    assert_eq!(sm.log(), before);
    assert!(sm.restores().is_empty());

    // The restarted member is leader of a later term and keeps appending after the old log.
    bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
    let (index, _) = bounded("a proposal", node.propose(b"after".to_vec()))
        .await
        .unwrap();
    assert!(index > before.last().unwrap().0);
    assert!(node.status().term > term_before);
    node.shutdown();
}

/// A single member snapshotting every 10 entries in 4 KiB WAL segments, after 100 proposals of
/// 200-odd bytes; returns its config, the node and its applied index.
async fn snapshotting_member(dir: &Path, sm: LogMachine) -> (RaftConfig, Node, u64) {
    let mut cfg = config(1, dir);
    cfg.snapshot_count = 10;
    cfg.wal_segment_size_bytes = 4096;
    let node: Node = RaftNode::start(cfg.clone(), sm, Arc::new(NoPeers)).unwrap();
    bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
    let padding = "x".repeat(200);
    for batch in 0..10 {
        propose_many(&node, &format!("{batch}-{padding}"), 10).await;
    }
    let last_index = node.status().applied_index;
    (cfg, node, last_index)
}

/// Whether the WAL's first segment (the one starting at sequence 0) is gone.
fn first_wal_segment_released(wal_dir: &Path) -> bool {
    !files_with_suffix(wal_dir, ".wal")[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("0000000000000000-")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_the_wal_and_restart_restores_from_snapshot_and_tail() {
    let dir = tempfile::tempdir().unwrap();
    let sm = LogMachine::default();
    let (cfg, node, last_index) = snapshotting_member(dir.path(), sm.clone()).await;
    let (wal_dir, snap_dir) = (cfg.wal_dir(), cfg.snap_dir());
    let snapshot_indexes = || -> Vec<u64> {
        files_with_suffix(&snap_dir, ".snap")
            .iter()
            .map(|p| {
                let name = p.file_name().unwrap().to_str().unwrap();
                u64::from_str_radix(&name[17..33], 16).unwrap()
            })
            .collect()
    };
    // Snapshots are written in the background; once the first WAL segment is gone, one of them
    // was recorded in the WAL (the newest file may not be yet when the node stops).
    wait_until("snapshots to settle", || {
        let indexes = snapshot_indexes();
        !indexes.is_empty() && indexes.len() <= 2 && first_wal_segment_released(&wal_dir)
    })
    .await;
    let before = sm.log();
    assert_eq!(before.len(), 100);
    node.shutdown();

    let files = snapshot_indexes();
    let sm = LogMachine::default();
    let node: Node = RaftNode::start(cfg, sm.clone(), Arc::new(NoPeers)).unwrap();
    let restores = sm.restores();
    assert!(
        restores.len() == 1 && files.contains(&restores[0]),
        "restored {restores:?}, snapshot files at {files:?}"
    );
    wait_until("the tail to be applied again", || {
        sm.log().len() >= before.len()
    })
    .await;
    assert_eq!(sm.log(), before);
    let (index, _) = bounded("a proposal", node.propose(b"after".to_vec()))
        .await
        .unwrap();
    assert!(index > last_index);
    node.shutdown();
}

/// Writing a whole state every `snapshot_count` entries costs more than the log it lets go of
/// once the state is large: the next snapshot also waits for the WAL to grow by half the last
/// file. This machine's state is its whole log, so snapshots come at growing intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_state_is_written_once_the_log_has_grown_by_half_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let sm = LogMachine::default();
    let mut cfg = config(1, dir.path());
    cfg.snapshot_count = 10;
    let node: Node = RaftNode::start(cfg, sm.clone(), Arc::new(NoPeers)).unwrap();
    bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
    let payload = 200;
    for batch in 0..40 {
        propose_many(
            &node,
            &format!("{batch:02}-{}", "x".repeat(payload - 8)),
            10,
        )
        .await;
    }
    let taken = sm.snapshots_taken.lock().unwrap().clone();
    assert!(taken.len() >= 3, "snapshots still happen: {taken:?}");
    // A file of `a` entries holds about `a * payload` bytes; an entry takes at most `payload +
    // 100` bytes of WAL (its record and its share of hard states).
    for pair in taken.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(
            (b - a) * (payload + 100) >= a * payload / 2,
            "snapshot at {b} entries came too soon after the one at {a}: {taken:?}"
        );
    }
    assert!(
        taken.len() < 400 / 10 / 2,
        "fewer than one every snapshot_count entries: {taken:?}"
    );
    node.shutdown();
}

/// A state machine that persists its own state gets snapshots that are only WAL markers: no
/// snapshot file, the WAL below the marker released, and a restart that takes the state as it
/// is (recovery from the initial membership would find the released entries missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_state_machine_snapshots_in_place_and_restarts_on_its_own_state() {
    let dir = tempfile::tempdir().unwrap();
    let sm = LogMachine::durable();
    let (cfg, node, last_index) = snapshotting_member(dir.path(), sm.clone()).await;
    let (wal_dir, snap_dir) = (cfg.wal_dir(), cfg.snap_dir());
    wait_until("the first WAL segments to be released", || {
        first_wal_segment_released(&wal_dir)
    })
    .await;
    assert!(files_with_suffix(&snap_dir, ".snap").is_empty());
    // A tail no persist job covers. One entry at a time until a job starts less than 5 entries
    // before the last one: the next job cannot start before `snapshot_count` (10) entries past
    // that one, so once it is finished 5 more entries stay out of every job. (Whether a job is
    // held back while the previous one runs is not visible here; this does not depend on it.)
    let last_call = || {
        sm.persist_calls
            .lock()
            .unwrap()
            .last()
            .copied()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + WAIT;
    while sm.applied_index() >= last_call() + 5 {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a persist job"
        );
        propose_many(&node, "sync", 1).await;
    }
    let calls = sm.persist_calls.lock().unwrap().len();
    wait_until("the last persist job to finish", || {
        *sm.persists_finished.lock().unwrap() == calls
    })
    .await;
    propose_many(&node, "tail", 5).await;
    assert_eq!(
        sm.persist_calls.lock().unwrap().len(),
        calls,
        "no job after the tail"
    );
    let before = sm.log();
    assert!(before.len() >= 105);
    node.shutdown();
    // Entries applied after the last persist job are lost, as unflushed memtables are: the WAL
    // must still hold them.
    sm.crash();
    assert_eq!(sm.log().len(), *sm.persisted.lock().unwrap());
    assert!(
        sm.log().len() <= before.len() - 5,
        "the crash loses the tail"
    );

    let node: Node = RaftNode::start(cfg, sm.clone(), Arc::new(NoPeers)).unwrap();
    bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
    assert!(sm.restores().is_empty());
    let (index, _) = bounded("a proposal", node.propose(b"after".to_vec()))
        .await
        .unwrap();
    assert!(index > last_index);
    let mut expected = before;
    expected.push((index, b"after".to_vec()));
    assert_eq!(sm.log(), expected, "nothing applied twice, nothing lost");
    node.shutdown();
}

/// The persist job runs beside the loop: entries go on being applied and acknowledged while it
/// waits for its disk, and the WAL is released only once it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persist_job_does_not_hold_up_applying() {
    let dir = tempfile::tempdir().unwrap();
    let (open_gate, gate) = std::sync::mpsc::channel();
    let sm = LogMachine {
        persist_gate: Some(Arc::new(Mutex::new(gate))),
        ..LogMachine::durable()
    };
    // 100 entries with a snapshot every 10: the first persist job starts early and waits.
    let (cfg, node, _) = snapshotting_member(dir.path(), sm.clone()).await;
    assert_eq!(sm.log().len(), 100);
    assert_eq!(*sm.persisted.lock().unwrap(), 0, "the job is still waiting");
    assert!(!first_wal_segment_released(&cfg.wal_dir()));
    drop(open_gate);
    wait_until("the first WAL segments to be released", || {
        first_wal_segment_released(&cfg.wal_dir())
    })
    .await;
    assert!(*sm.persisted.lock().unwrap() > 0);
    node.shutdown();
}

/// Deleting the files a snapshot made obsolete is background work too: while a deletion is held
/// up, the loop goes on applying and acknowledging writes, and the files go once it resumes.
/// (The crash point is the process's: nextest runs each test in a process of its own.)
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obsolete_files_are_deleted_beside_the_loop() {
    let _scenario = fail::FailScenario::setup();
    let (hit, hits) = std::sync::mpsc::channel::<()>();
    let (resume, resumed) = std::sync::mpsc::channel::<()>();
    let (hit, resumed) = (Mutex::new(hit), Mutex::new(resumed));
    fail::cfg_callback("raft::release::before_remove", move || {
        let _ = hit.lock().unwrap().send(());
        // Held until `resume` is dropped.
        let _ = resumed.lock().unwrap().recv();
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sm = LogMachine::default();
    let (cfg, node, last_index) = snapshotting_member(dir.path(), sm.clone()).await;
    bounded("a release to start", async {
        while hits.try_recv().is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(!first_wal_segment_released(&cfg.wal_dir()));
    propose_many(&node, "while-releasing", 30).await;
    assert!(node.status().applied_index >= last_index + 30);
    assert!(!first_wal_segment_released(&cfg.wal_dir()), "still held");
    drop(resume);
    wait_until("the first WAL segment to be deleted", || {
        first_wal_segment_released(&cfg.wal_dir())
    })
    .await;
    node.shutdown();
}

/// Snapshots are background work: their thread runs at nice 10, the loop at the process's.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_thread_runs_at_a_lower_priority() {
    let dir = tempfile::tempdir().unwrap();
    let sm = LogMachine::durable();
    let (_, node, _) = snapshotting_member(dir.path(), sm.clone()).await;
    wait_until("a persist job", || {
        !sm.persist_nice.lock().unwrap().is_empty()
    })
    .await;
    // SAFETY: as above.
    let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    assert_eq!(sm.persist_nice.lock().unwrap()[0], (own + 10).min(19));
    node.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_index_covers_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (_sm, node) = start_alone(dir.path());
    // A single member is leader as soon as it starts; a read issued at once waits for its
    // first commit (the leader's no-op at index 1).
    let first = bounded("a read index", node.read_index()).await.unwrap();
    assert!(first >= 1);
    assert_eq!(node.wait_leader(WAIT).await.unwrap(), 1);

    let results = propose_many(&node, "w", 20).await;
    let last_write = results.iter().map(|(_, (index, _))| *index).max().unwrap();
    let reads: Vec<_> = (0..50)
        .map(|_| {
            let node = node.clone();
            tokio::spawn(async move { node.read_index().await })
        })
        .collect();
    for read in reads {
        let read_index = bounded("a read index", read).await.unwrap().unwrap();
        assert!(read_index >= last_write, "{read_index} < {last_write}");
        assert!(node.status().applied_index >= read_index);
    }
    node.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_requests_fail_with_no_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(1, dir.path());
    cfg.peers = vec![1, 2, 3];
    let node: Node = RaftNode::start(cfg, LogMachine::default(), Arc::new(NoPeers)).unwrap();
    let err = node.propose(b"v".to_vec()).await.unwrap_err();
    assert!(matches!(err, RaftError::NoLeader), "{err:?}");
    assert_eq!(err.to_string(), "etcdserver: no leader");
    let err = node.read_index().await.unwrap_err();
    assert!(matches!(err, RaftError::NoLeader), "{err:?}");
    let err = node
        .wait_leader(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, RaftError::Timeout), "{err:?}");
    assert_eq!(node.status().leader_id, 0);
    node.shutdown();
    let err = node.wait_leader(WAIT).await.unwrap_err();
    assert!(matches!(err, RaftError::Stopped), "{err:?}");
    assert_eq!(err.to_string(), "etcdserver: server stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_refuses_a_corrupt_wal_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, dir.path());
    let node: Node =
        RaftNode::start(cfg.clone(), LogMachine::default(), Arc::new(NoPeers)).unwrap();
    bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
    propose_many(&node, "v", 10).await;
    node.shutdown();

    // Flip a payload byte of the second record; the records after it are intact.
    let segment = files_with_suffix(&cfg.wal_dir(), ".wal")[0].clone();
    let mut data = std::fs::read(&segment).unwrap();
    let first_len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
    let second = 9 + first_len;
    data[second + 9] ^= 0xff;
    std::fs::write(&segment, &data).unwrap();

    let err = RaftNode::<(u64, Vec<u8>)>::start(cfg, LogMachine::default(), Arc::new(NoPeers))
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, RaftError::Wal(_)), "{err:?}");
    assert!(
        message.contains(&segment.display().to_string()),
        "{message}"
    );
    assert!(
        message.contains(&format!("byte offset {second}")),
        "{message}"
    );
}

/// Starts members 1..=3 of one cluster on `network`.
fn start_cluster(
    network: &Arc<Network>,
    dirs: &[tempfile::TempDir],
    snapshot_count: u64,
) -> Vec<LogMachine> {
    start_cluster_ticking(network, dirs, snapshot_count, Duration::from_millis(20))
}

fn start_cluster_ticking(
    network: &Arc<Network>,
    dirs: &[tempfile::TempDir],
    snapshot_count: u64,
    tick_interval: Duration,
) -> Vec<LogMachine> {
    start_cluster_of(
        network,
        dirs,
        snapshot_count,
        tick_interval,
        LogMachine::default,
    )
}

fn start_cluster_of(
    network: &Arc<Network>,
    dirs: &[tempfile::TempDir],
    snapshot_count: u64,
    tick_interval: Duration,
    machine: fn() -> LogMachine,
) -> Vec<LogMachine> {
    let mut machines = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let member_id = i as u64 + 1;
        let mut cfg = config(member_id, dir.path());
        cfg.peers = vec![1, 2, 3];
        cfg.tick_interval = tick_interval;
        cfg.snapshot_count = snapshot_count;
        let sm = machine();
        let transport = Arc::new(ChannelTransport {
            network: Arc::clone(network),
        });
        let node = RaftNode::start(cfg, sm.clone(), transport).unwrap();
        network.nodes.write().unwrap().insert(member_id, node);
        machines.push(sm);
    }
    machines
}

fn node(network: &Network, member_id: u64) -> Node {
    network.nodes.read().unwrap()[&member_id].clone()
}

/// Waits until the members in `members` agree on a leader among them; returns it.
async fn agreed_leader(network: &Network, members: &[u64]) -> u64 {
    let mut leader = 0;
    wait_until("members to agree on a leader", || {
        let statuses: Vec<_> = members
            .iter()
            .map(|id| node(network, *id).status())
            .collect();
        leader = statuses[0].leader_id;
        leader != 0 && members.contains(&leader) && statuses.iter().all(|s| s.leader_id == leader)
    })
    .await;
    leader
}

fn shutdown_all(network: &Network) {
    let nodes: Vec<Node> = network
        .nodes
        .write()
        .unwrap()
        .drain()
        .map(|(_, n)| n)
        .collect();
    for node in &nodes {
        node.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_forward_and_survive_losing_the_leader() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let network = Arc::new(Network::default());
    let machines = start_cluster(&network, &dirs, 0);

    let leader = agreed_leader(&network, &[1, 2, 3]).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    // Proposals through the leader and through a follower (forwarded by raft) both complete.
    let (leader_node, follower_node) = (node(&network, leader), node(&network, follower));
    let (via_leader, via_follower) = tokio::join!(
        propose_many(&leader_node, "leader", 30),
        propose_many(&follower_node, "follower", 30),
    );
    for (payload, (_, output)) in via_leader.iter().chain(&via_follower) {
        assert_eq!(payload, output);
    }
    wait_until("every member to apply 60 entries", || {
        machines.iter().all(|m| m.log().len() == 60)
    })
    .await;
    assert_eq!(machines[0].log(), machines[1].log());
    assert_eq!(machines[1].log(), machines[2].log());
    let last_write = machines[0].log().last().unwrap().0;
    let read_index = bounded("a follower read", node(&network, follower).read_index())
        .await
        .unwrap();
    assert!(read_index >= last_write);

    // Stop the leader: the other two elect a new one and keep accepting writes.
    let old_leader = network.nodes.write().unwrap().remove(&leader).unwrap();
    old_leader.shutdown();
    let rest: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let new_leader = agreed_leader(&network, &rest).await;
    assert_ne!(new_leader, leader);
    propose_many(&node(&network, new_leader), "after", 10).await;
    let survivors: Vec<&LogMachine> = rest.iter().map(|id| &machines[*id as usize - 1]).collect();
    wait_until("the survivors to apply 70 entries", || {
        survivors.iter().all(|m| m.log().len() == 70)
    })
    .await;
    assert_eq!(survivors[0].log(), survivors[1].log());
    shutdown_all(&network);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_watch_follows_leader_changes_and_closes_when_the_node_stops() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let network = Arc::new(Network::default());
    start_cluster(&network, &dirs, 0);
    let leader = agreed_leader(&network, &[1, 2, 3]).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let follower_node = node(&network, follower);
    let mut watch = follower_node.leader_watch();
    bounded(
        "the leader on the watch",
        watch.wait_for(|id| *id == leader),
    )
    .await
    .unwrap();
    // The value at the call counts as seen.
    let fresh = follower_node.leader_watch();
    assert!(!fresh.has_changed().unwrap());
    assert_eq!(*fresh.borrow(), leader);

    // The leader stops: the follower's watch moves on to the new leader, as its status does.
    let old_leader = network.nodes.write().unwrap().remove(&leader).unwrap();
    old_leader.shutdown();
    let new_leader = *bounded(
        "a new leader on the watch",
        watch.wait_for(|id| *id != 0 && *id != leader),
    )
    .await
    .unwrap();
    assert_eq!(follower_node.status().leader_id, new_leader);
    let rest: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    assert_eq!(agreed_leader(&network, &rest).await, new_leader);

    // Once the node stopped, waiting for a change fails at once.
    follower_node.shutdown();
    bounded("the watch to close", watch.changed())
        .await
        .unwrap_err();
    shutdown_all(&network);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_queued_together_reach_each_follower_in_one_append() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let network = Arc::new(Network::default());
    // Slow ticks: an election takes over a second, far longer than the pause below.
    let machines = start_cluster_ticking(&network, &dirs, 0, Duration::from_millis(100));
    let leader = agreed_leader(&network, &[1, 2, 3]).await;
    let leader_node = node(&network, leader);
    propose_many(&leader_node, "warm-up", 3).await;

    // Hold the leader's loop (it blocks in its next send, a heartbeat at the latest) while 20
    // proposals queue up behind it.
    *network.traced.write().unwrap() = b"batched-".to_vec();
    *network.paused.lock().unwrap() = Some(leader);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let proposals = {
        let node = leader_node.clone();
        tokio::spawn(async move { propose_many(&node, "batched", 20).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    *network.paused.lock().unwrap() = None;
    network.resumed.notify_all();
    let results = bounded("the batched proposals", proposals).await.unwrap();
    assert_eq!(results.len(), 20);
    wait_until("every member to apply them", || {
        machines.iter().all(|m| m.log().len() == 23)
    })
    .await;

    // Each follower got the 20 entries in a single append (proposed one by one, they went out
    // as 20 appends per follower).
    let appends = network.traced_appends.lock().unwrap().clone();
    for follower in (1..=3).filter(|id| *id != leader) {
        let to_follower: Vec<usize> = appends
            .iter()
            .filter(|(from, to, _)| *from == leader && *to == follower)
            .map(|(_, _, entries)| *entries)
            .collect();
        assert_eq!(
            to_follower,
            vec![20],
            "appends to member {follower}: {appends:?}"
        );
    }
    shutdown_all(&network);
}

/// Proposes batches of 10 entries, at least `min_batches`, until the member's raft log was
/// compacted by a snapshot. Snapshots are written in the background at a lower priority, so
/// how many entries that takes varies. A snapshot file is removed (the newest 2 are kept) only
/// after a newer one was recorded and the log compacted to it: the sign waited for.
async fn propose_until_compacted(node: &Node, snap_dir: &Path, prefix: &str, min_batches: usize) {
    let mut seen = HashSet::new();
    let compacted = |seen: &mut HashSet<PathBuf>| {
        let current = files_with_suffix(snap_dir, ".snap");
        seen.extend(current.iter().cloned());
        seen.len() > current.len()
    };
    let deadline = Instant::now() + WAIT;
    for batch in 0.. {
        propose_many(node, &format!("{prefix}{batch}"), 10).await;
        if batch + 1 < min_batches {
            continue;
        }
        let polled = Instant::now();
        while polled.elapsed() < Duration::from_millis(200) {
            if compacted(&mut seen) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a compaction"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_member_catches_up_from_a_snapshot() {
    lagging_member_catches_up(LogMachine::default).await;
}

/// With state machines that snapshot in place, the leader keeps thousands of entries before
/// its snapshot in memory: a member a few entries behind catches up from them, and no snapshot
/// file is written. (A member further behind is `restarted_follower_catches_up_by_snapshot` in
/// the server's tests, on the RocksDB engine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_member_of_durable_machines_catches_up_from_entries() {
    lagging_member_catches_up(LogMachine::durable).await;
}

async fn lagging_member_catches_up(machine: fn() -> LogMachine) {
    let durable = machine().durable;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let network = Arc::new(Network::default());
    let machines = start_cluster_of(&network, &dirs, 10, Duration::from_millis(20), machine);
    let leader = agreed_leader(&network, &[1, 2, 3]).await;
    let lagging = (1..=3).find(|id| *id != leader).unwrap();

    network.isolated.write().unwrap().insert(lagging);
    let snap_dir = dirs[leader as usize - 1].path().join("member").join("snap");
    if durable {
        for batch in 0..5 {
            propose_many(&node(&network, leader), &format!("b{batch}"), 10).await;
        }
    } else {
        // The leader must have compacted its log past what the lagging member has.
        propose_until_compacted(&node(&network, leader), &snap_dir, "b", 5).await;
    }
    let leader_machine = &machines[leader as usize - 1];
    let lagging_machine = &machines[lagging as usize - 1];
    let expected = leader_machine.log().len();
    assert!(lagging_machine.log().len() < expected);

    network.isolated.write().unwrap().clear();
    wait_until("the lagging member to catch up", || {
        lagging_machine.log().len() == expected
    })
    .await;
    assert_eq!(lagging_machine.log(), leader_machine.log());
    if durable {
        assert!(lagging_machine.restores().is_empty());
        assert!(files_with_suffix(&snap_dir, ".snap").is_empty());
    } else {
        assert!(
            !lagging_machine.restores().is_empty(),
            "the lagging member was sent a snapshot"
        );
    }
    shutdown_all(&network);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_as_learners_get_promoted_and_removed_and_leadership_moves() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let network = Arc::new(Network::default());
    // A snapshot every 10 entries, so that the joining member is sent one.
    let machines = start_cluster(&network, &dirs[..3], 10);
    let leader = agreed_leader(&network, &[1, 2, 3]).await;
    // The leader must have compacted its log, or the joiner gets entries.
    let snap_dir = dirs[leader as usize - 1].path().join("member").join("snap");
    propose_until_compacted(&node(&network, leader), &snap_dir, "before", 3).await;
    let expected = machines[leader as usize - 1].log().len();

    // Member 4 joins empty, learns everything from the leader.
    let mut cfg = config(4, dirs[3].path());
    cfg.join = true;
    cfg.peers = Vec::new();
    cfg.tick_interval = Duration::from_millis(20);
    let joiner = LogMachine::default();
    let transport = Arc::new(ChannelTransport {
        network: Arc::clone(&network),
    });
    let node4 = RaftNode::start(cfg, joiner.clone(), transport).unwrap();
    network.nodes.write().unwrap().insert(4, node4.clone());
    let (_, outcome) = bounded(
        "adding a learner",
        node(&network, leader).propose_membership(&[MemberChange::AddLearner(4)], b"m4".to_vec()),
    )
    .await
    .unwrap();
    let outcome = String::from_utf8(outcome).unwrap();
    assert!(outcome.contains("learners: [4]"), "{outcome}");
    wait_until("the learner to catch up", || joiner.log().len() == expected).await;
    assert_eq!(joiner.log(), machines[leader as usize - 1].log());
    assert!(
        !joiner.restores().is_empty(),
        "the learner was sent a snapshot"
    );
    assert_eq!(node4.status().membership.learners, vec![4]);

    // Promote it; then make it the leader.
    bounded(
        "promoting the learner",
        node(&network, leader).propose_membership(&[MemberChange::AddVoter(4)], Vec::new()),
    )
    .await
    .unwrap();
    wait_until("member 4 to be a voter everywhere", || {
        (1..=4).all(|id| node(&network, id).status().membership.voters == vec![1, 2, 3, 4])
    })
    .await;
    wait_until("member 4 to catch up", || {
        let progress = node(&network, leader).status().progress;
        progress.get(&4) == progress.get(&leader)
    })
    .await;
    node(&network, leader).transfer_leader(4).unwrap();
    bounded(
        "leadership to move to member 4",
        node4.wait_leader_is(4, Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert!(node4.status().is_leader);
    propose_many(&node4, "after", 5).await;

    // Remove the old leader. It learns that from raft only if the commit of its removal reaches
    // it before the leader stops replicating to it, which is a race (the server tells it in any
    // case, see its `notify_removed_members`); the others go on without it.
    bounded(
        "removing a member",
        node4.propose_membership(&[MemberChange::Remove(leader)], Vec::new()),
    )
    .await
    .unwrap();
    let remaining: Vec<u64> = (1..=4).filter(|id| *id != leader).collect();
    wait_until("the remaining members to apply the removal", || {
        remaining
            .iter()
            .all(|id| node(&network, *id).status().membership.voters == remaining)
    })
    .await;
    propose_many(&node4, "without", 5).await;

    // The leader removes itself: it applies its own removal, so it knows at once.
    bounded(
        "removing the leader",
        node4.propose_membership(&[MemberChange::Remove(4)], Vec::new()),
    )
    .await
    .unwrap();
    wait_until("the leader to know it removed itself", || {
        node4.status().removed
    })
    .await;
    assert!(!node4.status().membership.contains(leader));
    shutdown_all(&network);
}

/// Proposes `payload` until it is applied, at most `WAIT`: the member may be between leaders,
/// or following one that is gone (an attempt forwarded to it is lost, so each gets a second).
async fn propose_until_applied(node: &Node, payload: &[u8]) -> (u64, Vec<u8>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let attempt = Duration::from_secs(1);
        match tokio::time::timeout(attempt, node.propose(payload.to_vec())).await {
            Ok(Ok(output)) => return output,
            outcome => assert!(
                Instant::now() < deadline,
                "{payload:?} was never applied: {outcome:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Peer messages raft-rs would panic on (it trusts its peers): a heartbeat whose commit index
/// is beyond this member's log, an append whose entries do not follow its index. The member
/// refuses or corrects them and goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_peer_messages_do_not_panic_the_raft_loop() {
    use raft::eraftpb::{Entry, MessageType};
    let dir = tempfile::tempdir().unwrap();
    let sm = LogMachine::default();
    let node: Node = RaftNode::start(config(1, dir.path()), sm.clone(), Arc::new(NoPeers)).unwrap();
    bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
    propose_until_applied(&node, b"before").await;
    let status = node.status();

    // From a member 99 that does not exist, to member 1, in the next term.
    let forged = |kind: MessageType, term: u64| {
        let mut m = Message::default();
        m.set_msg_type(kind);
        (m.from, m.to, m.term) = (99, 1, term);
        m
    };
    let mut heartbeat = forged(MessageType::MsgHeartbeat, status.term + 1);
    heartbeat.commit = status.committed_index + 1_000_000;
    node.step(heartbeat);
    propose_until_applied(&node, b"after a forged heartbeat").await;

    let status = node.status();
    let mut append = forged(MessageType::MsgAppend, status.term + 1);
    append.index = status.applied_index;
    append.log_term = status.term;
    append.entries = vec![Entry {
        index: 1,
        term: status.term + 1,
        ..Default::default()
    }]
    .into();
    append.commit = status.committed_index;
    node.step(append);
    propose_until_applied(&node, b"after a forged append").await;

    let payloads: Vec<Vec<u8>> = sm.log().into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        payloads,
        vec![
            b"before".to_vec(),
            b"after a forged heartbeat".to_vec(),
            b"after a forged append".to_vec()
        ]
    );
    node.shutdown();
}

/// A panic on the raft loop's thread takes the process down (as etcd's does), rather than
/// leaving a member that answers health checks and serves frozen reads with no consensus
/// behind them. The test runs itself again in a child process, which must die of SIGABRT.
#[test]
fn a_panic_on_the_raft_thread_aborts_the_process() {
    const CHILD: &str = "METASTORE_RAFT_NODE_PANIC_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let node: Node = RaftNode::start(
                config(1, dir.path()),
                LogMachine::default(),
                Arc::new(NoPeers),
            )
            .unwrap();
            bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
            let outcome = tokio::time::timeout(WAIT, node.propose(PANIC_ON_APPLY.to_vec())).await;
            // Still alive: the panic did not take the process down.
            eprintln!("the process outlived the panic: {outcome:?}");
        });
        std::process::exit(0);
    }
    use std::os::unix::process::ExitStatusExt;
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_panic_on_the_raft_thread_aborts_the_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert_eq!(
        child.status.signal(),
        Some(libc::SIGABRT),
        "{:?}\n{stderr}",
        child.status
    );
    assert!(
        stderr.contains("a panic injected on the raft thread"),
        "{stderr}"
    );
}

/// A snapshot upload from anyone but this member's current leader (at its term) is refused
/// before anything is written: a checksum-valid file of another cluster, sent as from a member
/// this one does not follow, neither lands in the snapshot directory (where its higher index
/// would rank it first and purge the real snapshots) nor replaces the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_only_from_the_current_leader_are_received() {
    use raft::eraftpb::MessageType;
    // A valid snapshot file, from another member's history.
    let other_dir = tempfile::tempdir().unwrap();
    let (other_cfg, other, _) = snapshotting_member(other_dir.path(), LogMachine::default()).await;
    other.shutdown();
    let snap_file = files_with_suffix(&other_cfg.snap_dir(), ".snap")
        .pop()
        .expect("the other member took a snapshot");
    let name = snap_file.file_name().unwrap().to_str().unwrap().to_string();
    let (term, index) = name.trim_end_matches(".snap").split_once('-').unwrap();
    let (term, index) = (
        u64::from_str_radix(term, 16).unwrap(),
        u64::from_str_radix(index, 16).unwrap(),
    );
    let bytes = std::fs::read(&snap_file).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let sm = LogMachine::default();
    let cfg = config(1, dir.path());
    let node: Node = RaftNode::start(cfg.clone(), sm.clone(), Arc::new(NoPeers)).unwrap();
    bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
    propose_until_applied(&node, b"mine").await;

    let mut msg = Message::default();
    msg.set_msg_type(MessageType::MsgSnapshot);
    msg.from = 99;
    msg.to = 1;
    msg.term = node.status().term + 1;
    let metadata = msg.mut_snapshot().mut_metadata();
    metadata.term = term;
    metadata.index = index;
    let refused = node.receive_snapshot(msg.clone(), bytes.len() as u64, &mut bytes.as_slice());
    assert!(
        refused.is_err(),
        "a snapshot from a non-leader was received"
    );
    // From the leader (this member itself here) at its term, for an index this member has
    // already committed, raft did not ask for it: it is ignored, nothing read or written.
    msg.from = 1;
    msg.term = node.status().term;
    msg.mut_snapshot().mut_metadata().index = node.status().committed_index;
    let mut unread = bytes.as_slice();
    node.receive_snapshot(msg, bytes.len() as u64, &mut unread)
        .expect("ignored");
    assert_eq!(unread.len(), bytes.len(), "the upload was read");
    assert!(
        files_with_suffix(&cfg.snap_dir(), ".snap").is_empty(),
        "the upload was written"
    );
    propose_until_applied(&node, b"still mine").await;
    let payloads: Vec<Vec<u8>> = sm.log().into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, vec![b"mine".to_vec(), b"still mine".to_vec()]);
    assert!(sm.restores().is_empty());
    node.shutdown();
}

/// Snapshot files beyond `--max-snapshots` that a crash left (between saving a snapshot and
/// releasing the older ones) are released when the member starts, not at its next snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_beyond_the_limits_are_released_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, node, _) = snapshotting_member(dir.path(), LogMachine::default()).await;
    node.shutdown();
    // What a crash between saving snapshots and releasing the older ones leaves: old files
    // beyond the limit (copies of a real one, under the names of indexes 1 and 2).
    let snap_dir = cfg.snap_dir();
    let real = files_with_suffix(&snap_dir, ".snap").pop().unwrap();
    let stale: Vec<_> = [1u64, 2]
        .iter()
        .map(|index| snap_dir.join(format!("{:016x}-{index:016x}.snap", 1)))
        .collect();
    for path in &stale {
        std::fs::copy(&real, path).unwrap();
    }
    cfg.max_snapshots = 1;
    // No snapshot soon: what releases them is the start, not the next snapshot.
    cfg.snapshot_count = 1_000_000;
    let node: Node =
        RaftNode::start(cfg.clone(), LogMachine::default(), Arc::new(NoPeers)).unwrap();
    bounded("a leader", node.wait_leader(WAIT)).await.unwrap();
    // The release thread deletes them, after the start has handed them over.
    wait_until("the stale snapshot files to be released", || {
        stale.iter().all(|path| !path.exists())
    })
    .await;
    // One at or below the snapshot the member started from, and at most one saved after it
    // (its WAL record not yet written when the member stopped).
    assert!(files_with_suffix(&snap_dir, ".snap").len() <= 2);
    node.shutdown();
}

/// The leader's disk runs short of space (a reserve it can never have): it hands leadership
/// over, refuses proposals with `NoSpace` and takes no entries, while the other two go on
/// committing; once space returns (the reserve lifted) it catches up and takes proposals again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_short_of_disk_space_leaves_the_leadership_and_catches_up_after() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let network = Arc::new(Network::default());
    let machines = start_cluster(&network, &dirs, 0);
    let short_id = agreed_leader(&network, &[1, 2, 3]).await;
    let short = node(&network, short_id);
    short.set_disk_reserve_bytes(u64::MAX);
    let deadline = Instant::now() + WAIT;
    loop {
        match bounded("a proposal", short.propose(b"probe")).await {
            Err(RaftError::NoSpace) => break,
            other => {
                assert!(Instant::now() < deadline, "never refused: {other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let rest: Vec<u64> = (1..=3).filter(|id| *id != short_id).collect();
    let leader = agreed_leader(&network, &rest).await;
    assert_ne!(leader, short_id, "the member short of space still leads");
    let base = machines[leader as usize - 1].log().len();
    propose_many(&node(&network, leader), "ok", 30).await;
    let (short_machine, others): (Vec<_>, Vec<_>) = machines
        .iter()
        .enumerate()
        .partition(|(i, _)| *i as u64 + 1 == short_id);
    wait_until("the other two to apply the 30 entries", || {
        others.iter().all(|(_, m)| m.log().len() >= base + 30)
    })
    .await;
    let applied_ok = |m: &LogMachine| {
        m.log()
            .iter()
            .filter(|(_, payload)| payload.starts_with(b"ok-"))
            .count()
    };
    assert_eq!(
        applied_ok(short_machine[0].1),
        0,
        "the member short of space applied entries it could not have persisted"
    );
    assert!(matches!(
        bounded("a proposal", short.propose(b"refused")).await,
        Err(RaftError::NoSpace)
    ));

    // Space returns: it catches up and takes proposals again.
    short.set_disk_reserve_bytes(0);
    wait_until("the member to catch up", || {
        applied_ok(short_machine[0].1) == 30
    })
    .await;
    bounded("a proposal", short.propose(b"after"))
        .await
        .expect("a proposal once space returned");
    shutdown_all(&network);
}
