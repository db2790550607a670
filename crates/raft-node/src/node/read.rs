//! Linearizable reads: the ReadIndex requests received in a round become one batch sent to raft
//! as one ReadIndex request (resent while unanswered, failed after the request timeout); a batch
//! whose read index raft returned waits until the applied index reaches it.
//!
//! Owns only its batches. It must not apply entries nor publish the status: the Ready loop hands
//! it raft's read states and the applied index ([`Reads::resolve`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use raft::{RawNode, ReadState, StateRole, INVALID_ID};
use tokio::sync::oneshot;

use super::{RaftStatus, RequestIds};
use crate::storage::LogStore;
use crate::RaftError;

/// How long a ReadIndex request may go unanswered before it is sent again (etcd: 500ms).
const READ_INDEX_RETRY: Duration = Duration::from_millis(500);

/// Where the read index of a [`crate::RaftNode::read_index`] call is sent.
pub(super) type ReadWaiter = oneshot::Sender<Result<u64, RaftError>>;

/// A group of ReadIndex requests answered by one raft read.
struct ReadBatch {
    waiters: Vec<ReadWaiter>,
    created: Instant,
    last_sent: Option<Instant>,
}

/// The ReadIndex requests in flight, from the round they arrive in until they are answered.
pub(super) struct Reads {
    /// Source of the batches' request contexts.
    ids: Arc<RequestIds>,
    /// How long a batch may wait for raft before its callers get [`RaftError::Timeout`].
    timeout: Duration,
    /// Read requests received this round.
    new: Vec<ReadWaiter>,
    /// Read batches sent to raft, by request context.
    pending: HashMap<u64, ReadBatch>,
    /// Read batches with a read index, waiting for the applied index to reach it.
    ready: Vec<(u64, Vec<ReadWaiter>)>,
}

impl Reads {
    pub(super) fn new(ids: Arc<RequestIds>, timeout: Duration) -> Self {
        Reads {
            ids,
            timeout,
            new: Vec::new(),
            pending: HashMap::new(),
            ready: Vec::new(),
        }
    }

    /// A read request received this round.
    pub(super) fn push(&mut self, waiter: ReadWaiter) {
        self.new.push(waiter);
    }

    /// Fails the batches raft has not answered within the request timeout.
    pub(super) fn expire(&mut self, now: Instant) {
        let timeout = self.timeout;
        self.pending.retain(|_, batch| {
            if now.duration_since(batch.created) < timeout {
                return true;
            }
            crate::metrics::METRICS.read_indexes_failed.increment(1);
            for waiter in batch.waiters.drain(..) {
                let _ = waiter.send(Err(RaftError::Timeout));
            }
            false
        });
    }

    /// Whether a batch waits to be sent to raft for the first time.
    pub(super) fn has_unsent(&self) -> bool {
        self.pending.values().any(|b| b.last_sent.is_none())
    }

    /// Turns this round's read requests into one raft read, and resends unanswered ones.
    pub(super) fn send(&mut self, raw: &mut RawNode<LogStore>, now: Instant) {
        let leader_id = raw.raft.leader_id;
        if !self.new.is_empty() {
            let waiters = std::mem::take(&mut self.new);
            if leader_id == INVALID_ID {
                crate::metrics::METRICS.read_indexes_failed.increment(1);
                for waiter in waiters {
                    let _ = waiter.send(Err(RaftError::NoLeader));
                }
            } else {
                self.pending.insert(
                    self.ids.next(),
                    ReadBatch {
                        waiters,
                        created: now,
                        last_sent: None,
                    },
                );
            }
        }
        // A leader that has not committed an entry of its term yet drops reads; wait instead.
        let can_send = leader_id != INVALID_ID
            && (raw.raft.state != StateRole::Leader || raw.raft.commit_to_current_term());
        if !can_send {
            return;
        }
        for (ctx, batch) in &mut self.pending {
            let due = match batch.last_sent {
                None => true,
                Some(sent) if now.duration_since(sent) >= READ_INDEX_RETRY => {
                    // etcd's "waiting for ReadIndex response took too long, retrying".
                    crate::metrics::METRICS.slow_read_indexes.increment(1);
                    true
                }
                Some(_) => false,
            };
            if due {
                raw.read_index(ctx.to_be_bytes().to_vec());
                batch.last_sent = Some(now);
            }
        }
    }

    /// Raft answered batches with their read index: they now wait for the applied index.
    pub(super) fn on_read_states(&mut self, read_states: Vec<ReadState>) {
        for read_state in read_states {
            let Ok(ctx) = <[u8; 8]>::try_from(read_state.request_ctx.as_slice()) else {
                continue;
            };
            if let Some(batch) = self.pending.remove(&u64::from_be_bytes(ctx)) {
                self.ready.push((read_state.index, batch.waiters));
            }
        }
    }

    /// Answers the batches whose read index `applied` reaches. The status's applied index is
    /// updated first, so a woken caller sees an applied index that covers its read index.
    pub(super) fn resolve(&mut self, applied: u64, status: &Mutex<RaftStatus>) {
        if self.ready.is_empty() {
            return;
        }
        status.lock().applied_index = applied;
        self.ready.retain_mut(|(index, waiters)| {
            if *index > applied {
                return true;
            }
            for waiter in waiters.drain(..) {
                let _ = waiter.send(Ok(*index));
            }
            false
        });
    }
}
