//! The raft node: the cloneable handle ([`RaftNode`]) that callers hold, the commands it sends
//! to the loop, the status the loop publishes back ([`RaftStatus`]) and cluster-unique
//! request ids.
//!
//! The handle owns no raft state: it only sends [`Command`]s and reads the published status, so
//! it must never block on the loop except to join it on shutdown. The loop and what it keeps are
//! split by concern, each module owning its own state:
//! - [`worker`]: the Ready loop, which owns the raft node, WAL and state machine, and decides
//!   the order of everything;
//! - [`host`]: where the loop runs (a task of the server's runtime, or a thread of its own);
//! - [`propose`]: proposals and their waiters;
//! - [`read`]: ReadIndex batches;
//! - [`snapshot`]: snapshot scheduling and log compaction;
//! - [`conf_change`]: membership changes and leader transfer;
//! - [`recovery`]: start-up from the WAL and snapshots.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use raft::eraftpb::{ConfChangeV2, Message, MessageType, SnapshotMetadata};
use raft::INVALID_ID;
use tokio::sync::{mpsc, oneshot, watch};

use crate::snap::{SnapError, SnapshotFile, Snapshotter};
use crate::{MemberChange, Membership, RaftConfig, RaftError, StateMachine, Transport};

mod conf_change;
mod disk;
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzz_hooks;
mod guard;
mod heartbeats;
mod host;
mod propose;
mod read;
mod recovery;
mod snapshot;
mod worker;

use conf_change::single_change;
use propose::{with_request_id, ProposalWaiter};
use read::ReadWaiter;
pub use recovery::bootstrap_from_snapshot;
use worker::{Links, Worker};

/// The node's raft state as last seen by its loop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// This member's id.
    pub member_id: u64,
    /// The leader this member knows of; 0 when there is none.
    pub leader_id: u64,
    /// The current raft term.
    pub term: u64,
    /// Index of the last entry known to be committed.
    pub committed_index: u64,
    /// Index of the last entry applied to the state machine.
    pub applied_index: u64,
    /// Whether this member is the leader.
    pub is_leader: bool,
    /// The membership raft currently uses.
    pub membership: Membership,
    /// On the leader: the highest log index known to be replicated on each member (its
    /// "match" index), by member id. Empty on other members.
    pub progress: BTreeMap<u64, u64>,
    /// A membership change applied since the start removed this member: it must stop (and
    /// remember it, see the server).
    pub removed: bool,
}

/// Where [`Command`]s are sent. Unbounded, so that senders never wait, as with the std channel
/// it replaced; the loop drains it every round.
type CommandSender<O> = mpsc::UnboundedSender<Command<O>>;

/// What the handles (and the snapshot thread) ask of the loop, handled in the order sent.
enum Command<O> {
    Propose {
        request_id: u64,
        /// Request id followed by the caller's payload.
        data: Vec<u8>,
        waiter: ProposalWaiter<O>,
    },
    ProposeMembership {
        request_id: u64,
        change: ConfChangeV2,
        waiter: ProposalWaiter<O>,
    },
    TransferLeader(u64),
    ReadIndex(ReadWaiter),
    Step(Box<Message>),
    ReportUnreachable(u64),
    ReportSnapshot {
        to: u64,
        delivered: bool,
    },
    /// The snapshot thread finished writing a snapshot file.
    SnapshotSaved(Result<SnapshotFile, SnapError>),
    /// The state machine's persist job for a snapshot in place finished.
    PersistedInPlace {
        metadata: SnapshotMetadata,
        result: std::io::Result<()>,
    },
    Shutdown,
}

/// Cluster-unique request ids in etcd's layout: the member id's low 16 bits, then a counter
/// that starts at the current time in milliseconds shifted left by 8, so ids are not reused
/// across restarts.
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    const SUFFIX_BITS: u32 = 48;

    fn new(member_id: u64) -> Self {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        RequestIds {
            prefix: member_id << Self::SUFFIX_BITS,
            counter: AtomicU64::new((now_ms & ((1 << 40) - 1)) << 8),
        }
    }

    fn next(&self) -> u64 {
        let suffix = self.counter.fetch_add(1, Ordering::Relaxed) & ((1 << Self::SUFFIX_BITS) - 1);
        self.prefix | suffix
    }
}

/// A handle to a running raft member. Cloning is cheap; all clones talk to the same loop, which
/// stops on [`RaftNode::shutdown`] or when the last clone is dropped (only `shutdown` waits for
/// a loop that runs as a task to finish).
pub struct RaftNode<O> {
    inner: Arc<Inner<O>>,
}

struct Inner<O> {
    snapshotter: Arc<Snapshotter>,
    commands: CommandSender<O>,
    ids: Arc<RequestIds>,
    status: Arc<Mutex<RaftStatus>>,
    leader: watch::Receiver<u64>,
    applied: watch::Receiver<u64>,
    host: host::Host,
    disk: Arc<disk::DiskGuard>,
}

impl<O> Inner<O> {
    /// Tells the loop to stop and waits for it (see [`host::Host::wait`] for `dropping`).
    fn stop(&self, dropping: bool) {
        // The loop may already be gone; then there is nothing to stop.
        let _ = self.commands.send(Command::Shutdown);
        self.host.wait(dropping);
    }
}

impl<O> Drop for Inner<O> {
    fn drop(&mut self) {
        self.stop(true);
    }
}

impl<O> Clone for RaftNode<O> {
    fn clone(&self) -> Self {
        RaftNode {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<O> fmt::Debug for RaftNode<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftNode")
            .field("status", &*self.inner.status.lock())
            .finish()
    }
}

impl<O: Send + 'static> RaftNode<O> {
    /// Opens (or creates) the member's WAL and snapshots under `cfg.data_dir`, brings `sm` up to
    /// date and starts the raft loop: as a task of the current multi-thread tokio runtime when
    /// there is one, otherwise on a thread of its own (see `host`).
    ///
    /// On restart the newest valid snapshot is restored into `sm` if `sm` is older than it, and
    /// committed entries after `max(sm.applied_index(), snapshot index)` are applied again. A
    /// member that is the only voter elects itself at once. This does blocking disk I/O; call it
    /// from a blocking context.
    pub fn start<S: StateMachine<Output = O>>(
        cfg: RaftConfig,
        mut sm: S,
        transport: Arc<dyn Transport>,
    ) -> Result<Self, RaftError> {
        cfg.validate()?;
        let member_id = cfg.member_id;
        let snapshotter = Arc::new(Snapshotter::new(&cfg.snap_dir())?);
        let started = recovery::start_raft(&cfg, &mut sm, &snapshotter)?;
        let (applied, snapshot_index) = (started.applied, started.snapshot_index);
        let disk = disk::DiskGuard::start(
            member_id,
            vec![cfg.wal_dir(), cfg.data_dir.clone()],
            cfg.disk_reserve_bytes,
        )
        .map_err(|e| RaftError::Raft(format!("cannot start the disk guard thread: {e}")))?;

        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let ids = Arc::new(RequestIds::new(member_id));
        let status = Arc::new(Mutex::new(RaftStatus {
            member_id,
            applied_index: applied,
            ..RaftStatus::default()
        }));
        let (leader_tx, leader_rx) = watch::channel(INVALID_ID);
        let (applied_tx, applied_rx) = watch::channel(applied);
        let worker = Worker::new(
            &cfg,
            started,
            sm,
            transport,
            Arc::clone(&snapshotter),
            Links {
                commands: commands_rx,
                commands_tx: commands_tx.clone(),
                ids: Arc::clone(&ids),
                status: Arc::clone(&status),
                leader_tx,
                applied_tx,
                disk: Arc::clone(&disk),
            },
        );
        let host = host::Host::start(format!("raft-{member_id:x}"), member_id, worker.run())?;
        tracing::info!(
            member_id = format_args!("{member_id:x}"),
            applied_index = applied,
            snapshot_index,
            "raft node started"
        );
        Ok(RaftNode {
            inner: Arc::new(Inner {
                snapshotter,
                commands: commands_tx,
                ids,
                status,
                leader: leader_rx,
                applied: applied_rx,
                host,
                disk,
            }),
        })
    }

    /// Changes the free disk space the member keeps ([`RaftConfig::disk_reserve_bytes`]; 0 turns
    /// the guard off). Applied at the guard's next check, within a fraction of a second.
    pub fn set_disk_reserve_bytes(&self, reserve: u64) {
        self.inner.disk.set_reserve(reserve);
    }

    /// Proposes `payload` and resolves with the state machine's output once the entry is
    /// committed and applied on this member.
    ///
    /// Fails with [`RaftError::NoLeader`] when raft drops the proposal for lack of a leader and
    /// with [`RaftError::LeaderChanged`] when the leader that appended it lost its leadership and
    /// the entry was replaced. A proposal forwarded to another leader that is lost there is never
    /// answered, so bound the wait (e.g. with [`RaftConfig::request_timeout`]).
    /// Fails with [`RaftError::NoSpace`] while the disk is short of space.
    pub async fn propose(&self, payload: impl AsRef<[u8]>) -> Result<O, RaftError> {
        if self.inner.disk.is_low() {
            return Err(RaftError::NoSpace);
        }
        let request_id = self.inner.ids.next();
        let data = with_request_id(request_id, payload.as_ref());
        let (waiter, result) = oneshot::channel();
        self.send(Command::Propose {
            request_id,
            data,
            waiter,
        })?;
        result.await.unwrap_or(Err(RaftError::Stopped))
    }

    /// Proposes a membership change and resolves with the state machine's output once it is
    /// committed and applied here ([`StateMachine::apply_membership`]). `payload` reaches the
    /// state machine with the change. Raft refuses a change while another one is still being
    /// applied; the state machine then sees the refusal in
    /// [`MembershipChange::outcome`](crate::MembershipChange::outcome).
    pub async fn propose_membership(
        &self,
        changes: &[MemberChange],
        payload: Vec<u8>,
    ) -> Result<O, RaftError> {
        if self.inner.disk.is_low() {
            return Err(RaftError::NoSpace);
        }
        let request_id = self.inner.ids.next();
        let context = with_request_id(request_id, &payload);
        let change = ConfChangeV2 {
            changes: changes.iter().map(|c| single_change(*c)).collect(),
            context: context.into(),
            ..Default::default()
        };
        let (waiter, result) = oneshot::channel();
        self.send(Command::ProposeMembership {
            request_id,
            change,
            waiter,
        })?;
        result.await.unwrap_or(Err(RaftError::Stopped))
    }

    /// Asks the leader (this member) to hand leadership to `to`. Returns at once; watch
    /// [`RaftNode::status`] or [`RaftNode::wait_leader_is`] for the outcome.
    pub fn transfer_leader(&self, to: u64) -> Result<(), RaftError> {
        self.send(Command::TransferLeader(to))
    }

    /// Waits until this member sees `leader_id` as the leader.
    pub async fn wait_leader_is(&self, leader_id: u64, timeout: Duration) -> Result<(), RaftError> {
        let mut leader = self.inner.leader.clone();
        let outcome =
            match tokio::time::timeout(timeout, leader.wait_for(|id| *id == leader_id)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err(RaftError::Stopped),
                Err(_) => Err(RaftError::Timeout),
            };
        outcome
    }

    /// Opens the snapshot file a `MsgSnapshot` from this member refers to (raft messages carry
    /// only the snapshot's metadata; transports stream the file itself). Returns the reader and
    /// the file's length in bytes.
    pub fn open_snapshot(&self, msg: &Message) -> Result<(Box<dyn Read + Send>, u64), RaftError> {
        let metadata = msg.get_snapshot().get_metadata();
        let path = self
            .inner
            .snapshotter
            .path_of(metadata.term, metadata.index);
        let file = std::fs::File::open(&path).map_err(|source| {
            RaftError::Snap(SnapError::Io {
                op: "open",
                path: path.clone(),
                source,
            })
        })?;
        let len = file
            .metadata()
            .map_err(|source| {
                RaftError::Snap(SnapError::Io {
                    op: "stat",
                    path: path.clone(),
                    source,
                })
            })?
            .len();
        Ok((Box::new(file), len))
    }

    /// Receives a snapshot file of `size` bytes (as its sender advertised it) streamed by the
    /// sender of `msg` (a `MsgSnapshot`) if it is the leader this member follows, at its term,
    /// and raft could use it (past this member's commit index): writes it durably next to this
    /// member's own snapshots if the disk has room, verifies it, then hands `msg` to raft.
    /// Blocking file I/O: call it from a blocking context.
    pub fn receive_snapshot(
        &self,
        msg: Message,
        size: u64,
        file: &mut dyn Read,
    ) -> Result<(), RaftError> {
        if msg.get_msg_type() != MessageType::MsgSnapshot {
            return Err(RaftError::Raft(format!(
                "expected a snapshot message, got {:?}",
                msg.get_msg_type()
            )));
        }
        // Only the leader this member follows sends it snapshots (after its appends told it
        // how far behind this member is). Anything else is refused before a byte is written:
        // an upload is a whole state to replace this member's, and its index ranks it among
        // the snapshot files.
        let (leader_id, term) = self.with_status(|s| (s.leader_id, s.term));
        if msg.from == INVALID_ID || msg.from != leader_id || msg.term != term {
            return Err(RaftError::Raft(format!(
                "refused a snapshot from {:x} at term {}: this member follows {leader_id:x} at term {term}",
                msg.from, msg.term
            )));
        }
        let metadata = msg.get_snapshot().get_metadata().clone();
        // Raft asks for a snapshot only past what this member has committed and would ignore
        // any other: nothing is read or written for it. It counts as delivered, so that the
        // leader goes back to probing this member with appends instead of sending it again.
        let committed = self.with_status(|s| s.committed_index);
        if metadata.index <= committed {
            tracing::info!(
                index = metadata.index,
                committed,
                "ignored a snapshot at or below this member's commit index"
            );
            return Ok(());
        }
        self.inner.snapshotter.receive(&metadata, size, file)?;
        self.step(msg);
        Ok(())
    }

    /// A linearizable read barrier: resolves with a read index once this member has applied at
    /// least up to it, so a local read then sees every write acknowledged before the call.
    /// Concurrent calls share one ReadIndex round.
    pub async fn read_index(&self) -> Result<u64, RaftError> {
        let (waiter, result) = oneshot::channel();
        self.send(Command::ReadIndex(waiter))?;
        result.await.unwrap_or(Err(RaftError::Stopped))
    }

    /// Hands a message received from a peer to raft. Messages are dropped once the node stopped.
    pub fn step(&self, msg: Message) {
        // A stopped node has no use for messages.
        let _ = self.inner.commands.send(Command::Step(Box::new(msg)));
    }

    /// Tells raft that a message to `member_id` could not be delivered, so that the leader stops
    /// streaming appends to it and probes instead.
    pub fn report_unreachable(&self, member_id: u64) {
        let _ = self
            .inner
            .commands
            .send(Command::ReportUnreachable(member_id));
    }

    /// Tells raft whether a snapshot message (`MsgSnapshot`) sent to `member_id` was delivered.
    /// Transports must call this for every snapshot message they send: until then the leader
    /// sends nothing else to that member.
    pub fn report_snapshot(&self, member_id: u64, delivered: bool) {
        let _ = self.inner.commands.send(Command::ReportSnapshot {
            to: member_id,
            delivered,
        });
    }

    /// The node's raft state as of the loop's last round.
    pub fn status(&self) -> RaftStatus {
        self.inner.status.lock().clone()
    }

    /// Reads the node's raft state without copying it (for hot paths).
    pub fn with_status<T>(&self, read: impl FnOnce(&RaftStatus) -> T) -> T {
        read(&self.inner.status.lock())
    }

    /// Waits until a leader is known and returns its id.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<u64, RaftError> {
        let mut leader = self.inner.leader.clone();
        let leader_id =
            match tokio::time::timeout(timeout, leader.wait_for(|id| *id != INVALID_ID)).await {
                Ok(Ok(id)) => Ok(*id),
                Ok(Err(_)) => Err(RaftError::Stopped),
                Err(_) => Err(RaftError::Timeout),
            };
        leader_id
    }

    /// Waits, without polling, until this member applied `index`, at most `timeout`; whether it
    /// did.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut applied = self.inner.applied.clone();
        let reached = tokio::time::timeout(timeout, async {
            applied.wait_for(|a| *a >= index).await.is_ok()
        })
        .await;
        reached == Ok(true)
    }

    /// The leader this member sees, as a watch channel for following leadership without
    /// polling: the leader's id, 0 while none is known. It changes together with
    /// [`RaftStatus::leader_id`] (so whether this member leads changes with it too), the value
    /// at the call counts as seen, and `changed()` fails once the node stopped.
    pub fn leader_watch(&self) -> watch::Receiver<u64> {
        let mut leader = self.inner.leader.clone();
        leader.mark_unchanged();
        leader
    }

    /// Stops the loop and waits for it (and for a snapshot being written) to finish.
    /// Pending requests fail with [`RaftError::Stopped`]. Idempotent.
    pub fn shutdown(&self) {
        self.inner.stop(false);
    }

    fn send(&self, command: Command<O>) -> Result<(), RaftError> {
        self.inner
            .commands
            .send(command)
            .map_err(|_| RaftError::Stopped)
    }
}
