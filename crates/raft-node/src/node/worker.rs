//! The Ready loop: the task (or thread, see [`super::host`]) that owns the `RawNode`, the WAL
//! and the state machine.
//!
//! It waits for commands (with a timeout so that it ticks on time), drains every queued command,
//! then handles raft's Ready: writes the WAL and fsyncs once, sends messages, installs a snapshot
//! received from the leader, applies committed entries in log order, wakes their proposers and
//! publishes the status. Draining first is what makes concurrent proposals share one fsync.
//!
//! It owns the order of things and the state they share (the raft node, the log, the WAL, the
//! state machine, the applied index); what each kind of request needs is kept by its own module
//! ([`super::propose`], [`super::read`], [`super::snapshot`], [`super::conf_change`]), which the
//! loop calls. It must not block on anything but the WAL: snapshots and persist jobs run on
//! another thread and report back through the command channel. Rounds that write the WAL or
//! apply entries run through [`blocking`], so that a runtime worker hands its other tasks over
//! first; the rest (commands, heartbeats, ReadIndex rounds) runs in place.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::{Poll, Wake, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use raft::eraftpb::{Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole, INVALID_ID};
use tokio::sync::{mpsc, watch};

use super::conf_change::{membership_of, ConfChanges};
use super::heartbeats::HeartbeatTimes;
use super::host::{blocking, on_multi_thread_runtime};
use super::propose::{split_request_id, ProposalWaiter, Proposals};
use super::read::Reads;
use super::recovery::Started;
use super::snapshot::SnapshotScheduler;
use super::{Command, CommandSender, RaftStatus, RequestIds};
use crate::snap::{SnapshotFile, Snapshotter};
use crate::storage::LogStore;
use crate::wal::Wal;
use crate::{RaftConfig, RaftError, StateMachine, Transport};

/// Most commands handled before the loop turns to raft's Ready, so ticks stay on time under load.
const MAX_COMMANDS_PER_ROUND: usize = 4096;
/// How long the loop stays off the runtime after a heavy round, waiting for the next one (see
/// `Worker::stay_blocking`).
const STAY_BLOCKING: Duration = Duration::from_millis(2);
/// Applying one entry for longer than this logs a warning (etcd: 100 ms).
const SLOW_APPLY: Duration = Duration::from_millis(100);

/// Wakes a thread parked in `Worker::recv_on_thread`.
struct UnparkThread(std::thread::Thread);

impl Wake for UnparkThread {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// What connects the loop with the [`super::RaftNode`] handles.
pub(super) struct Links<O> {
    /// Commands from the handles (and from the snapshot thread).
    pub(super) commands: mpsc::UnboundedReceiver<Command<O>>,
    /// For the snapshot thread to report back.
    pub(super) commands_tx: CommandSender<O>,
    /// Request ids, shared with the handles (ReadIndex contexts come from it too).
    pub(super) ids: Arc<RequestIds>,
    /// The status the handles read.
    pub(super) status: Arc<Mutex<RaftStatus>>,
    /// The leader the handles wait for.
    pub(super) leader_tx: watch::Sender<u64>,
    /// The applied index the handles wait for.
    pub(super) applied_tx: watch::Sender<u64>,
    /// Whether the disk is short of space (then the leader's appends are dropped).
    pub(super) disk: Arc<super::disk::DiskGuard>,
}

/// The state owned by the loop: what every step of the loop shares, and one struct per
/// concern. (Fields are dropped in this order when the loop ends, as before the split.)
pub(super) struct Worker<S: StateMachine> {
    member_id: u64,
    /// The only voter: campaign as soon as every committed entry is applied.
    campaign_alone: bool,
    conf_changes: ConfChanges,
    raw: RawNode<LogStore>,
    /// The in-memory log raft reads; the WAL is its durable copy.
    store: LogStore,
    wal: Wal,
    /// Where a snapshot received from the leader is read from (or saved to).
    snapshotter: Arc<Snapshotter>,
    sm: S,
    transport: Arc<dyn Transport>,
    commands: mpsc::UnboundedReceiver<Command<S::Output>>,
    status: Arc<Mutex<RaftStatus>>,
    leader_tx: watch::Sender<u64>,
    applied_tx: watch::Sender<u64>,
    tick_interval: Duration,
    proposals: Proposals<S::Output>,
    reads: Reads,
    /// Index of the last entry applied to `sm`.
    applied_index: u64,
    snapshots: SnapshotScheduler<S::Output>,
    /// When the leader last sent each follower a heartbeat.
    heartbeats: HeartbeatTimes,
    /// Whether the disk is short of space.
    disk: Arc<super::disk::DiskGuard>,
}

impl<S: StateMachine> Worker<S> {
    pub(super) fn new(
        cfg: &RaftConfig,
        started: Started,
        sm: S,
        transport: Arc<dyn Transport>,
        snapshotter: Arc<Snapshotter>,
        links: Links<S::Output>,
    ) -> Self {
        let member_id = cfg.member_id;
        Worker {
            member_id,
            campaign_alone: started.campaign_alone,
            conf_changes: ConfChanges::new(member_id),
            raw: started.raw,
            store: started.store,
            wal: started.wal,
            snapshotter: Arc::clone(&snapshotter),
            sm,
            transport,
            commands: links.commands,
            status: links.status,
            leader_tx: links.leader_tx,
            applied_tx: links.applied_tx,
            disk: links.disk,
            tick_interval: cfg.tick_interval,
            heartbeats: HeartbeatTimes::new(cfg.tick_interval * cfg.heartbeat_ticks as u32),
            proposals: Proposals::new(member_id, cfg.max_size_per_msg),
            reads: Reads::new(links.ids, cfg.request_timeout()),
            applied_index: started.applied,
            snapshots: SnapshotScheduler::new(
                member_id,
                snapshotter,
                links.commands_tx,
                cfg.snapshot_count,
                started.snapshot_index,
                (cfg.max_wals, cfg.max_snapshots),
            ),
        }
    }

    /// Runs the loop until shutdown, the last handle being dropped, or a fatal error. Its only
    /// wait is for the next command or tick; everything else is synchronous.
    pub(super) async fn run(mut self) {
        let mut next_tick = Instant::now() + self.tick_interval;
        // Handle what recovery left ready (and a lone voter's campaign) before any request.
        let started = blocking(|| {
            self.snapshots.release_left_over_files(&mut self.wal);
            self.round(Instant::now())
        });
        if let Err(e) = started {
            self.fatal(&e);
            blocking(|| self.stop());
            return;
        }
        self.update_status();
        // Whether a heavy round may stay off the runtime to wait for the next commands (see
        // `stay_blocking`); a loop on its own thread is always off it.
        let on_runtime = on_multi_thread_runtime();
        loop {
            let deadline = tokio::time::Instant::from_std(next_tick);
            let first = match tokio::time::timeout_at(deadline, self.commands.recv()).await {
                Ok(Some(command)) => Some(command),
                Ok(None) => break,
                Err(_elapsed) => None,
            };
            let turn = match self.commands_and_tick(first, &mut next_tick) {
                Ok(Some(now)) if self.round_is_heavy() => {
                    blocking(|| self.stay_blocking(now, &mut next_tick, on_runtime))
                }
                Ok(Some(now)) => self.round(now).map(|()| true),
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            };
            match turn {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    self.fatal(&e);
                    break;
                }
            }
        }
        blocking(|| self.stop());
    }

    /// Handles `first` and what is queued behind it, then ticks if it is time. Returns the
    /// time for the round, or None on shutdown.
    fn commands_and_tick(
        &mut self,
        first: Option<Command<S::Output>>,
        next_tick: &mut Instant,
    ) -> Result<Option<Instant>, RaftError> {
        if !self.handle_commands(first)? {
            return Ok(None);
        }
        let now = Instant::now();
        if now >= *next_tick {
            self.raw.tick();
            self.on_tick(now);
            *next_tick += self.tick_interval;
            if *next_tick <= now {
                *next_tick = now + self.tick_interval;
            }
        }
        Ok(Some(now))
    }

    /// A heavy round, already off the runtime's worker (inside [`blocking`]); then, when the loop
    /// is `on_runtime`, it stays here while heavy rounds keep coming, waiting for commands on this
    /// thread, and goes back to the runtime after [`STAY_BLOCKING`] without one. Each entry into `blocking` hands the worker's queue to another thread; under a
    /// steady write load that was paid every round (about a tenth of the put throughput at
    /// 100 clients), while the wait here costs what the loop's own thread cost before.
    /// Returns false on shutdown.
    fn stay_blocking(
        &mut self,
        now: Instant,
        next_tick: &mut Instant,
        on_runtime: bool,
    ) -> Result<bool, RaftError> {
        self.round(now)?;
        if !on_runtime {
            return Ok(true);
        }
        let waker = Waker::from(Arc::new(UnparkThread(std::thread::current())));
        let mut last_heavy = now;
        loop {
            let back_at = last_heavy + STAY_BLOCKING;
            let first = match self.recv_on_thread((*next_tick).min(back_at), &waker) {
                Some(Some(command)) => Some(command),
                Some(None) => return Ok(false),
                None => None,
            };
            if first.is_none() && Instant::now() >= back_at {
                return Ok(true);
            }
            let Some(now) = self.commands_and_tick(first, next_tick)? else {
                return Ok(false);
            };
            if self.round_is_heavy() {
                last_heavy = now;
            }
            self.round(now)?;
        }
    }

    /// The next command, waited for on this thread until `deadline` (None then); Some(None)
    /// once every sender is gone. `waker` unparks this thread.
    fn recv_on_thread(
        &mut self,
        deadline: Instant,
        waker: &Waker,
    ) -> Option<Option<Command<S::Output>>> {
        let mut cx = std::task::Context::from_waker(waker);
        loop {
            if let Poll::Ready(command) = self.commands.poll_recv(&mut cx) {
                return Some(command);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::park_timeout(deadline - now);
        }
    }

    /// Whether the coming round writes the WAL (entries, a received snapshot, a new term or
    /// vote, which need an fsync) or applies entries: then it runs through [`blocking`]. The
    /// other rounds (heartbeats, ReadIndex, commands that only step raft) are short and touch
    /// no disk but a commit index write, which needs no fsync.
    fn round_is_heavy(&self) -> bool {
        let raft = &self.raw.raft;
        let log = &raft.raft_log;
        // The hard state the log store holds is the one last written to the WAL.
        let durable = |term, vote| {
            let core = self.store.mem.rl();
            let hard_state = core.hard_state();
            (hard_state.term, hard_state.vote) == (term, vote)
        };
        !log.unstable.entries.is_empty()
            || log.unstable.snapshot.is_some()
            || log.committed > self.applied_index
            || !durable(raft.term, raft.vote)
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
            Command::Step(mut msg) => {
                let from = msg.from;
                if self.disk.is_low()
                    && matches!(
                        msg.get_msg_type(),
                        MessageType::MsgAppend | MessageType::MsgSnapshot | MessageType::MsgPropose
                    )
                {
                    // Not persisted, not acknowledged: the leader sends them again (and a
                    // follower's forwarded proposal fails at its deadline, by which time this
                    // member has handed its leadership over).
                    tracing::debug!(
                        from = format_args!("{from:x}"),
                        kind = ?msg.get_msg_type(),
                        "dropped a raft message: free disk space is below the reserve"
                    );
                } else if let Err(reason) = super::guard::sanitize(
                    &self.raw.raft.raft_log,
                    self.raw.raft.state == raft::StateRole::Leader,
                    &mut msg,
                ) {
                    tracing::warn!(
                        from = format_args!("{from:x}"),
                        kind = ?msg.get_msg_type(),
                        "refused a raft message: {reason}"
                    );
                } else if let Err(e) = self.raw.step(*msg) {
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
            // Both write the WAL (and may fsync it).
            Command::SnapshotSaved(result) => blocking(|| {
                self.snapshots.on_snapshot_saved(
                    result,
                    &mut self.wal,
                    &self.store,
                    self.applied_index,
                )
            })?,
            Command::PersistedInPlace { metadata, result } => blocking(|| {
                self.snapshots.on_persisted_in_place(
                    metadata,
                    result,
                    &mut self.wal,
                    &self.store,
                    self.applied_index,
                )
            })?,
            Command::Shutdown => return Ok(false),
        }
        Ok(true)
    }

    fn on_tick(&mut self, now: Instant) {
        self.reads.expire(now);
        // Callers that gave up (timed out) no longer need an answer.
        self.proposals.forget_abandoned();
        if self.disk.is_low() {
            self.hand_over_for_disk();
        }
    }

    /// A leader short of disk space cannot append: it hands its leadership to the voter whose
    /// log matches furthest, so that the cluster goes on taking writes. raft-rs gives up a
    /// transfer after an election timeout; then the next tick tries again.
    fn hand_over_for_disk(&mut self) {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader || raft.lead_transferee.is_some() {
            return;
        }
        let me = self.member_id;
        let prs = raft.prs();
        let target = prs
            .iter()
            .filter(|(id, _)| **id != me && prs.conf().voters().contains(**id))
            .max_by_key(|(_, progress)| progress.matched)
            .map(|(id, _)| *id);
        if let Some(to) = target {
            tracing::warn!(
                to = format_args!("{to:x}"),
                "free disk space is below the reserve: handing leadership over"
            );
            self.raw.transfer_leader(to);
        }
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
        self.snapshots.maybe_snapshot(
            &self.raw,
            &self.store,
            &mut self.sm,
            self.applied_index,
            self.wal.appended_bytes(),
        )?;
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
                fail::fail_point!("raft::wal::before_fsync");
                self.wal.sync()?;
                fail::fail_point!("raft::wal::after_fsync");
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
        fail::fail_point!("raft::snapshot::before_install");
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
        // Committed and durable in the WAL, not yet applied.
        fail::fail_point!("raft::before_apply");
        let mut outputs = Vec::new();
        let mut membership_changed = false;
        for entry in entries {
            if entry.index <= self.applied_index {
                continue;
            }
            let started = std::time::Instant::now();
            match entry.get_entry_type() {
                EntryType::EntryNormal => outputs.extend(self.apply_normal(&entry)),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    outputs.extend(self.apply_membership(&entry));
                    membership_changed = true;
                }
            }
            let took = started.elapsed();
            if took > SLOW_APPLY {
                // etcd's warning and counter for the same threshold.
                crate::metrics::METRICS.slow_applies.increment(1);
                tracing::warn!(
                    index = entry.index,
                    took_ms = took.as_millis() as u64,
                    "apply request took too long"
                );
            }
            self.applied_index = entry.index;
        }
        self.sm.applied_batch();
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

    fn send(&mut self, messages: Vec<Message>) {
        if !messages.is_empty() {
            self.heartbeats.observe(&messages, Instant::now());
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
        let metrics = &crate::metrics::METRICS;
        metrics
            .has_leader
            .set(f64::from(u8::from(leader_id != INVALID_ID)));
        metrics.is_leader.set(f64::from(u8::from(status.is_leader)));
        metrics
            .proposals_committed
            .set(status.committed_index as f64);
        metrics.proposals_applied.set(status.applied_index as f64);
        metrics
            .proposals_pending
            .set(self.proposals.pending() as f64);
        *self.status.lock() = status;
        let applied_index = self.applied_index;
        self.applied_tx.send_if_modified(|current| {
            let changed = *current != applied_index;
            *current = applied_index;
            changed
        });
        let changed = self.leader_tx.send_if_modified(|current| {
            let changed = *current != leader_id;
            *current = leader_id;
            changed
        });
        if changed {
            self.heartbeats.reset();
            if leader_id != INVALID_ID {
                metrics.leader_changes_seen.increment(1);
            }
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
        crate::metrics::METRICS.has_leader.set(0.0);
        crate::metrics::METRICS.is_leader.set(0.0);
        tracing::info!(
            member_id = format_args!("{:x}", self.member_id),
            "raft loop stopped"
        );
    }
}
