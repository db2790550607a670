//! Proposals and their waiters: the request-id framing of a proposal's payload, the batch of
//! proposals received in one round (proposed to raft as one message), the waiter of every
//! proposal raft accepted, and the log position of those this member appended as leader, so that
//! a proposal overwritten by a new leader fails instead of waiting forever.
//!
//! It must not apply entries: the Ready loop applies them and takes the waiter of each one it
//! applied ([`Proposals::take`]).

use std::collections::{BTreeMap, HashMap};

use raft::eraftpb::{ConfChangeV2, Entry, Message, MessageType};
use raft::{RawNode, StateRole};
use tokio::sync::oneshot;

use crate::storage::LogStore;
use crate::RaftError;

/// Length of a proposal's request id prefix.
pub(super) const REQUEST_ID_LEN: usize = 8;

/// Where the outcome of a proposal is sent.
pub(super) type ProposalWaiter<O> = oneshot::Sender<Result<O, RaftError>>;

/// A proposal's payload as it goes into the log: `request_id` followed by `payload`.
pub(super) fn with_request_id(request_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(REQUEST_ID_LEN + payload.len());
    data.extend_from_slice(&request_id.to_be_bytes());
    data.extend_from_slice(payload);
    data
}

/// Splits a logged payload into its request id and the caller's payload; None when it is too
/// short to hold a request id.
pub(super) fn split_request_id(data: &[u8]) -> Option<(u64, &[u8])> {
    data.split_first_chunk::<REQUEST_ID_LEN>()
        .map(|(id, payload)| (u64::from_be_bytes(*id), payload))
}

/// What the proposer of a proposal raft refused is told.
fn refused(error: &raft::Error) -> RaftError {
    match error {
        raft::Error::ProposalDropped => RaftError::NoLeader,
        e => RaftError::Raft(e.to_string()),
    }
}

/// This member's proposals, from the round they arrive in until they are applied or lost.
pub(super) struct Proposals<O> {
    member_id: u64,
    /// Waiters of this member's proposals by request id.
    waiters: HashMap<u64, ProposalWaiter<O>>,
    /// Request ids of proposals this member appended as leader, by log index.
    proposed_at: BTreeMap<u64, u64>,
    /// Proposals received this round, proposed together as one raft message (see
    /// [`Proposals::flush`]).
    batch: Vec<(u64, Vec<u8>, ProposalWaiter<O>)>,
    /// Payload bytes in `batch`.
    batch_bytes: u64,
    /// Largest batch of proposals, in bytes (raft's `max_size_per_msg`).
    max_batch_bytes: u64,
}

impl<O> Proposals<O> {
    pub(super) fn new(member_id: u64, max_batch_bytes: u64) -> Self {
        Proposals {
            member_id,
            waiters: HashMap::new(),
            proposed_at: BTreeMap::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            max_batch_bytes,
        }
    }

    /// Adds a proposal to this round's batch (proposing the batch first if it would grow too
    /// large). A proposal whose caller gave up is dropped.
    pub(super) fn queue(
        &mut self,
        raw: &mut RawNode<LogStore>,
        request_id: u64,
        data: Vec<u8>,
        waiter: ProposalWaiter<O>,
    ) {
        if waiter.is_closed() {
            return;
        }
        if self.batch_bytes + data.len() as u64 > self.max_batch_bytes {
            self.flush(raw);
        }
        self.batch_bytes += data.len() as u64;
        self.batch.push((request_id, data, waiter));
    }

    /// Proposes the queued proposals as one raft message: the leader appends them together and
    /// sends each follower one append for all of them (one acknowledgement back), and a follower
    /// forwards them to the leader in one message. Proposed one by one, every proposal cost its
    /// own append message to each follower and its own acknowledgement.
    pub(super) fn flush(&mut self, raw: &mut RawNode<LogStore>) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgPropose);
        msg.from = self.member_id;
        let mut entries = Vec::with_capacity(batch.len());
        let mut tracked = Vec::with_capacity(batch.len());
        for (request_id, data, waiter) in batch {
            entries.push(Entry {
                data: data.into(),
                ..Default::default()
            });
            tracked.push((request_id, waiter));
        }
        msg.set_entries(entries.into());
        let proposed = raw.raft.step(msg);
        let count = tracked.len() as u64;
        // A leader appended them as the last `count` entries; elsewhere the index is unused.
        let first_index = (raw.raft.raft_log.last_index() + 1).saturating_sub(count);
        for (offset, (request_id, waiter)) in (0..).zip(tracked) {
            let outcome = proposed.as_ref().map(|()| first_index + offset);
            self.track(raw, request_id, outcome.map_err(refused), waiter);
        }
    }

    /// Proposes a membership change (on its own: raft takes one at a time).
    pub(super) fn propose_membership(
        &mut self,
        raw: &mut RawNode<LogStore>,
        request_id: u64,
        change: ConfChangeV2,
        waiter: ProposalWaiter<O>,
    ) {
        if waiter.is_closed() {
            return;
        }
        let outcome = raw
            .propose_conf_change(Vec::new(), change)
            .map(|()| raw.raft.raft_log.last_index());
        self.track(raw, request_id, outcome.map_err(|e| refused(&e)), waiter);
    }

    /// Keeps the waiter of a proposal raft accepted at log index `outcome` (remembering that
    /// position when this member leads), or fails it at once.
    fn track(
        &mut self,
        raw: &RawNode<LogStore>,
        request_id: u64,
        outcome: Result<u64, RaftError>,
        waiter: ProposalWaiter<O>,
    ) {
        match outcome {
            Ok(index) => {
                if raw.raft.state == StateRole::Leader {
                    self.proposed_at.insert(index, request_id);
                }
                self.waiters.insert(request_id, waiter);
            }
            Err(e) => {
                crate::metrics::METRICS.proposals_failed.increment(1);
                let _ = waiter.send(Err(e));
            }
        }
    }

    /// The waiter of this member's proposal `request_id`, which was just applied.
    pub(super) fn take(&mut self, request_id: u64) -> Option<ProposalWaiter<O>> {
        self.waiters.remove(&request_id)
    }

    /// Fails proposals whose log position was applied with another entry: the leader that
    /// appended them lost its leadership and its successor overwrote them.
    pub(super) fn fail_lost(&mut self, applied_index: u64) {
        while let Some(slot) = self.proposed_at.first_entry() {
            if *slot.key() > applied_index {
                break;
            }
            let request_id = slot.remove();
            if let Some(waiter) = self.waiters.remove(&request_id) {
                crate::metrics::METRICS.proposals_failed.increment(1);
                let _ = waiter.send(Err(RaftError::LeaderChanged));
            }
        }
    }

    /// Forgets the waiters of callers that gave up (timed out): they no longer need an answer.
    pub(super) fn forget_abandoned(&mut self) {
        let before = self.waiters.len();
        self.waiters.retain(|_, waiter| !waiter.is_closed());
        let abandoned = before - self.waiters.len();
        if abandoned > 0 {
            crate::metrics::METRICS
                .proposals_failed
                .increment(abandoned as u64);
        }
    }

    /// This member's proposals not yet applied or failed.
    pub(super) fn pending(&self) -> usize {
        self.waiters.len() + self.batch.len()
    }
}
