//! The raft loop thread and the cloneable handle that talks to it.
//!
//! One thread owns the `RawNode`, the WAL and the state machine. It waits for commands (with a
//! timeout so that it ticks on time), drains every queued command, then handles raft's Ready:
//! writes the WAL and fsyncs once, sends messages, applies committed entries and wakes waiters.
//! Draining first is what makes concurrent proposals share one fsync.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use raft::eraftpb::{
    ConfChangeV2, Entry, EntryType, Message, MessageType, Snapshot, SnapshotMetadata,
};
use raft::{RawNode, SnapshotStatus, StateRole, INVALID_ID};
use tokio::sync::{oneshot, watch};

use crate::snap::{SnapError, SnapshotFile, Snapshotter};
use crate::storage::LogStore;
use crate::wal::Wal;
use crate::{MemberChange, Membership, RaftConfig, RaftError, StateMachine, Transport};

mod conf_change;
mod propose;
mod read;
mod recovery;
mod snapshot;

use conf_change::{membership_of, single_change, ConfChanges};

use propose::{split_request_id, with_request_id, ProposalWaiter, Proposals};
use read::{ReadWaiter, Reads};
pub use recovery::bootstrap_from_snapshot;
use recovery::Started;
use snapshot::SnapshotScheduler;

/// Most commands handled before the loop turns to raft's Ready, so ticks stay on time under load.
const MAX_COMMANDS_PER_ROUND: usize = 4096;

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

/// A handle to a running raft member. Cloning is cheap; all clones talk to the same loop thread,
/// which stops on [`RaftNode::shutdown`] or when the last clone is dropped.
pub struct RaftNode<O> {
    inner: Arc<Inner<O>>,
}

struct Inner<O> {
    member_id: u64,
    snapshotter: Arc<Snapshotter>,
    commands: mpsc::Sender<Command<O>>,
    ids: Arc<RequestIds>,
    status: Arc<Mutex<RaftStatus>>,
    leader: watch::Receiver<u64>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<O> Inner<O> {
    fn stop(&self) {
        // The loop may already be gone; then there is nothing to stop.
        let _ = self.commands.send(Command::Shutdown);
        let handle = self.thread.lock().take();
        if let Some(handle) = handle {
            if handle.thread().id() != thread::current().id() && handle.join().is_err() {
                tracing::error!(
                    member_id = format_args!("{:x}", self.member_id),
                    "raft loop thread panicked"
                );
            }
        }
    }
}

impl<O> Drop for Inner<O> {
    fn drop(&mut self) {
        self.stop();
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
    /// date and starts the raft loop thread.
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
        let Started {
            raw,
            store,
            wal,
            applied,
            snapshot_index,
            campaign_alone,
        } = recovery::start_raft(&cfg, &mut sm, &snapshotter)?;

        let (commands_tx, commands_rx) = mpsc::channel();
        let ids = Arc::new(RequestIds::new(member_id));
        let status = Arc::new(Mutex::new(RaftStatus {
            member_id,
            applied_index: applied,
            ..RaftStatus::default()
        }));
        let (leader_tx, leader_rx) = watch::channel(INVALID_ID);
        let snapshotter_handle = Arc::clone(&snapshotter);
        let worker = Worker {
            member_id,
            campaign_alone,
            conf_changes: ConfChanges::new(member_id),
            raw,
            store,
            wal,
            snapshotter: Arc::clone(&snapshotter),
            sm,
            transport,
            commands: commands_rx,
            status: Arc::clone(&status),
            leader_tx,
            tick_interval: cfg.tick_interval,
            proposals: Proposals::new(member_id, cfg.max_size_per_msg),
            reads: Reads::new(Arc::clone(&ids), cfg.request_timeout()),
            applied_index: applied,
            snapshots: SnapshotScheduler::new(
                member_id,
                snapshotter,
                commands_tx.clone(),
                cfg.snapshot_count,
                snapshot_index,
            ),
        };
        let thread = thread::Builder::new()
            .name(format!("raft-{member_id:x}"))
            .spawn(move || worker.run())
            .map_err(|e| RaftError::Raft(format!("cannot start the raft loop thread: {e}")))?;
        tracing::info!(
            member_id = format_args!("{member_id:x}"),
            applied_index = applied,
            snapshot_index,
            "raft node started"
        );
        Ok(RaftNode {
            inner: Arc::new(Inner {
                member_id,
                snapshotter: snapshotter_handle,
                commands: commands_tx,
                ids,
                status,
                leader: leader_rx,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Proposes `payload` and resolves with the state machine's output once the entry is
    /// committed and applied on this member.
    ///
    /// Fails with [`RaftError::NoLeader`] when raft drops the proposal for lack of a leader and
    /// with [`RaftError::LeaderChanged`] when the leader that appended it lost its leadership and
    /// the entry was replaced. A proposal forwarded to another leader that is lost there is never
    /// answered, so bound the wait (e.g. with [`RaftConfig::request_timeout`]).
    pub async fn propose(&self, payload: Vec<u8>) -> Result<O, RaftError> {
        let request_id = self.inner.ids.next();
        let data = with_request_id(request_id, &payload);
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
    /// applied; the state machine then sees the refusal in [`MembershipChange::outcome`].
    pub async fn propose_membership(
        &self,
        changes: &[MemberChange],
        payload: Vec<u8>,
    ) -> Result<O, RaftError> {
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

    /// Receives a snapshot file streamed by the sender of `msg` (a `MsgSnapshot`): writes it
    /// durably next to this member's own snapshots, verifies it, then hands `msg` to raft.
    /// Blocking file I/O: call it from a blocking context.
    pub fn receive_snapshot(&self, msg: Message, file: &mut dyn Read) -> Result<(), RaftError> {
        if msg.get_msg_type() != MessageType::MsgSnapshot {
            return Err(RaftError::Raft(format!(
                "expected a snapshot message, got {:?}",
                msg.get_msg_type()
            )));
        }
        let metadata = msg.get_snapshot().get_metadata().clone();
        self.inner.snapshotter.receive(&metadata, file)?;
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

    /// Stops the loop thread and waits for it (and for a snapshot being written) to finish.
    /// Pending requests fail with [`RaftError::Stopped`]. Idempotent.
    pub fn shutdown(&self) {
        self.inner.stop();
    }

    fn send(&self, command: Command<O>) -> Result<(), RaftError> {
        self.inner
            .commands
            .send(command)
            .map_err(|_| RaftError::Stopped)
    }
}

/// The state owned by the loop thread.
struct Worker<S: StateMachine> {
    member_id: u64,
    /// The only voter: campaign as soon as every committed entry is applied.
    campaign_alone: bool,
    conf_changes: ConfChanges,
    raw: RawNode<LogStore>,
    store: LogStore,
    wal: Wal,
    snapshotter: Arc<Snapshotter>,
    sm: S,
    transport: Arc<dyn Transport>,
    commands: mpsc::Receiver<Command<S::Output>>,
    status: Arc<Mutex<RaftStatus>>,
    leader_tx: watch::Sender<u64>,
    tick_interval: Duration,
    proposals: Proposals<S::Output>,
    reads: Reads,
    applied_index: u64,
    snapshots: SnapshotScheduler<S::Output>,
}

impl<S: StateMachine> Worker<S> {
    fn run(mut self) {
        let mut next_tick = Instant::now() + self.tick_interval;
        // Handle what recovery left ready (and a lone voter's campaign) before any request.
        if let Err(e) = self.round(Instant::now()) {
            self.fatal(&e);
            self.stop();
            return;
        }
        self.update_status();
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            let first = match self.commands.recv_timeout(timeout) {
                Ok(command) => Some(command),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match self.handle_commands(first) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    self.fatal(&e);
                    break;
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                self.on_tick(now);
                next_tick += self.tick_interval;
                if next_tick <= now {
                    next_tick = now + self.tick_interval;
                }
            }
            if let Err(e) = self.round(now) {
                self.fatal(&e);
                break;
            }
        }
        self.stop();
    }

    /// Handles `first` and everything queued behind it. Returns false on shutdown.
    fn handle_commands(&mut self, first: Option<Command<S::Output>>) -> Result<bool, RaftError> {
        let Some(first) = first else { return Ok(true) };
        let mut running = self.handle(first)?;
        for _ in 0..MAX_COMMANDS_PER_ROUND {
            if !running {
                break;
            }
            match self.commands.try_recv() {
                Ok(command) => running = self.handle(command)?,
                Err(_) => break,
            }
        }
        self.proposals.flush(&mut self.raw);
        Ok(running)
    }

    fn handle(&mut self, command: Command<S::Output>) -> Result<bool, RaftError> {
        if let Command::Propose {
            request_id,
            data,
            waiter,
        } = command
        {
            self.proposals
                .queue(&mut self.raw, request_id, data, waiter);
            return Ok(true);
        }
        // Everything else sees the proposals received before it already proposed.
        self.proposals.flush(&mut self.raw);
        match command {
            Command::Propose { .. } => {}
            Command::ProposeMembership {
                request_id,
                change,
                waiter,
            } => self
                .proposals
                .propose_membership(&mut self.raw, request_id, change, waiter),
            Command::TransferLeader(to) => self.conf_changes.transfer_leader(&mut self.raw, to),
            Command::ReadIndex(waiter) => self.reads.push(waiter),
            Command::Step(msg) => {
                let from = msg.from;
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(from = format_args!("{from:x}"), error = %e, "dropped raft message");
                }
            }
            Command::ReportUnreachable(member_id) => self.raw.report_unreachable(member_id),
            Command::ReportSnapshot { to, delivered } => {
                let status = if delivered {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Command::SnapshotSaved(result) => self.snapshots.on_snapshot_saved(
                result,
                &mut self.wal,
                &self.store,
                self.applied_index,
            )?,
            Command::PersistedInPlace { metadata, result } => {
                self.snapshots.on_persisted_in_place(
                    metadata,
                    result,
                    &mut self.wal,
                    &self.store,
                    self.applied_index,
                )?
            }
            Command::Shutdown => return Ok(false),
        }
        Ok(true)
    }

    fn on_tick(&mut self, now: Instant) {
        self.reads.expire(now);
        // Callers that gave up (timed out) no longer need an answer.
        self.proposals.forget_abandoned();
    }

    /// Everything after the commands: reads, Ready, snapshots, status.
    fn round(&mut self, now: Instant) -> Result<(), RaftError> {
        self.reads.send(&mut self.raw, now);
        self.handle_readies()?;
        if self.campaign_alone && self.applied_index >= self.raw.raft.raft_log.committed {
            self.campaign_alone = false;
            if self.raw.raft.state != StateRole::Leader {
                self.raw
                    .campaign()
                    .map_err(|e| RaftError::Raft(e.to_string()))?;
                self.handle_readies()?;
            }
        }
        // A new leader holds reads back until its first commit, which the Ready above may have
        // made; send them now rather than a tick later.
        if self.reads.has_unsent() {
            self.reads.send(&mut self.raw, now);
            self.handle_readies()?;
        }
        self.snapshots
            .maybe_snapshot(&self.raw, &self.store, &mut self.sm, self.applied_index)?;
        self.snapshots
            .trim_memory_log(&self.raw, &self.store, self.applied_index);
        self.update_status();
        Ok(())
    }

    fn handle_readies(&mut self) -> Result<(), RaftError> {
        while self.raw.has_ready() {
            let mut ready = self.raw.ready();
            // raft-rs separates the messages that do not depend on this member's log being
            // durable (a leader's appends and heartbeats) from those that do: sending the first
            // kind now lets followers write their WAL while this member writes its own.
            self.send(ready.take_messages());

            // Durability first: nothing below is sent or acknowledged before the fsync.
            let received = if ready.snapshot().is_empty() {
                None
            } else {
                let snapshot = ready.snapshot().clone();
                let metadata = snapshot.get_metadata();
                // Transports deliver the file before the message (RaftNode::receive_snapshot);
                // a message that carries the data itself is saved here.
                let file = if snapshot.data.is_empty() {
                    self.snapshotter
                        .load(&self.snapshotter.path_of(metadata.term, metadata.index))?
                } else {
                    self.snapshotter.save_bytes(metadata, &snapshot.data)?
                };
                Some((snapshot, file))
            };
            self.wal.save(
                received.as_ref().map(|(s, _)| s.get_metadata()),
                ready.entries(),
                ready.hs(),
            )?;
            if ready.must_sync() {
                self.wal.sync()?;
            }

            if let Some((snapshot, file)) = received {
                self.install_snapshot(snapshot, file)?;
            }
            if !ready.entries().is_empty() {
                self.store
                    .mem
                    .wl()
                    .append(ready.entries())
                    .map_err(|e| RaftError::Raft(e.to_string()))?;
            }
            if let Some(hard_state) = ready.hs() {
                self.store.mem.wl().set_hardstate(hard_state.clone());
            }

            self.send(ready.take_persisted_messages());
            self.reads.on_read_states(ready.take_read_states());
            self.apply(ready.take_committed_entries());

            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                let hard_state = {
                    let mut core = self.store.mem.wl();
                    core.mut_hard_state().set_commit(commit);
                    core.hard_state().clone()
                };
                // No fsync needed: raft recomputes a lost commit index.
                self.wal.save(None, &[], Some(&hard_state))?;
            }
            self.send(light.take_messages());
            self.apply(light.take_committed_entries());
            self.raw.advance_apply();
            self.reads.resolve(self.applied_index, &self.status);
        }
        Ok(())
    }

    /// Replaces the state with a snapshot received from the leader (already durable).
    fn install_snapshot(
        &mut self,
        snapshot: Snapshot,
        file: SnapshotFile,
    ) -> Result<(), RaftError> {
        let (index, term) = (snapshot.get_metadata().index, snapshot.get_metadata().term);
        self.store
            .mem
            .wl()
            .apply_snapshot(snapshot.clone())
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        let mut data = self.snapshotter.open_data(&file)?;
        self.sm
            .restore(index, term, &mut data)
            .map_err(|source| RaftError::Restore { index, source })?;
        self.applied_index = index;
        self.snapshots.installed(index);
        self.store.set_latest_snapshot(file);
        self.proposals.fail_lost(self.applied_index);
        tracing::info!(index, term, "installed snapshot from the leader");
        self.snapshots.release_old_files(&mut self.wal, index);
        Ok(())
    }

    /// Applies committed entries in order, then wakes the proposers among them. The status is
    /// updated first, so a woken caller sees an applied index that covers its write.
    fn apply(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let mut outputs = Vec::new();
        let mut membership_changed = false;
        for entry in entries {
            if entry.index <= self.applied_index {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => outputs.extend(self.apply_normal(&entry)),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    outputs.extend(self.apply_membership(&entry));
                    membership_changed = true;
                }
            }
            self.applied_index = entry.index;
        }
        {
            let mut status = self.status.lock();
            status.applied_index = self.applied_index;
            status.committed_index = self.raw.raft.raft_log.committed;
            if membership_changed {
                status.membership = membership_of(&self.raw.raft.prs().conf().to_conf_state());
                status.removed = self.conf_changes.removed();
            }
        }
        for (waiter, output) in outputs {
            let _ = waiter.send(Ok(output));
        }
        self.proposals.fail_lost(self.applied_index);
    }

    /// Applies one normal entry; returns the output for this member's proposer, if any.
    fn apply_normal(&mut self, entry: &Entry) -> Option<(ProposalWaiter<S::Output>, S::Output)> {
        if entry.data.is_empty() {
            self.sm.apply_noop(entry.index, entry.term);
            return None;
        }
        let Some((request_id, payload)) = split_request_id(&entry.data) else {
            // Not written by this crate; every member skips it alike.
            tracing::warn!(
                index = entry.index,
                "entry without a request id, applied as a no-op"
            );
            self.sm.apply_noop(entry.index, entry.term);
            return None;
        };
        let output = self.sm.apply(entry.index, entry.term, payload);
        self.proposals
            .take(request_id)
            .map(|waiter| (waiter, output))
    }

    /// Applies a committed membership change; returns the output for this member's proposer,
    /// if any.
    fn apply_membership(
        &mut self,
        entry: &Entry,
    ) -> Option<(ProposalWaiter<S::Output>, S::Output)> {
        let (request_id, output) =
            self.conf_changes
                .apply(&mut self.raw, &self.store, &mut self.sm, entry)?;
        self.proposals
            .take(request_id)
            .map(|waiter| (waiter, output))
    }

    fn send(&self, messages: Vec<Message>) {
        if !messages.is_empty() {
            self.transport.send(messages);
        }
    }

    fn update_status(&mut self) {
        let raft = &self.raw.raft;
        let status = RaftStatus {
            member_id: self.member_id,
            leader_id: raft.leader_id,
            term: raft.term,
            committed_index: raft.raft_log.committed,
            applied_index: self.applied_index,
            is_leader: raft.state == StateRole::Leader,
            membership: membership_of(&raft.prs().conf().to_conf_state()),
            progress: if raft.state == StateRole::Leader {
                raft.prs()
                    .iter()
                    .map(|(id, pr)| (*id, pr.matched))
                    .collect()
            } else {
                BTreeMap::new()
            },
            removed: self.conf_changes.removed(),
        };
        let leader_id = status.leader_id;
        let term = status.term;
        *self.status.lock() = status;
        let changed = self.leader_tx.send_if_modified(|current| {
            let changed = *current != leader_id;
            *current = leader_id;
            changed
        });
        if changed {
            tracing::info!(
                member_id = format_args!("{:x}", self.member_id),
                leader_id = format_args!("{leader_id:x}"),
                term,
                "leader changed"
            );
        }
    }

    fn fatal(&self, error: &RaftError) {
        tracing::error!(
            member_id = format_args!("{:x}", self.member_id),
            error = %error,
            "raft loop stopped after a fatal error"
        );
    }

    /// Leaves the loop: waits for a snapshot being written; pending requests fail with
    /// `Stopped` when their waiters are dropped with `self`.
    fn stop(&mut self) {
        self.snapshots.join();
        {
            let mut status = self.status.lock();
            status.leader_id = INVALID_ID;
            status.is_leader = false;
        }
        tracing::info!(
            member_id = format_args!("{:x}", self.member_id),
            "raft loop stopped"
        );
    }
}
