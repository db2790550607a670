//! Membership: turning [`MemberChange`]s into raft conf changes and back, applying a committed
//! change to raft, to the in-memory log's conf state and then to the state machine, noticing
//! that a change removed this member, a new cluster's bootstrap entries, and leader transfer.
//!
//! Owns only the "this member was removed" flag. It must not track proposals (the caller wakes
//! the proposer of a change, see [`super::propose`]) nor write the WAL: a change is durable as
//! the log entry that carries it.

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType,
};
use raft::{RawNode, StateRole};

use super::propose::{split_request_id, REQUEST_ID_LEN};
use crate::storage::LogStore;
use crate::{MemberChange, Membership, MembershipChange, StateMachine};

/// Applies committed membership changes on the loop and remembers whether one removed
/// this member.
pub(super) struct ConfChanges {
    member_id: u64,
    /// A committed membership change removed this member.
    removed: bool,
}

impl ConfChanges {
    pub(super) fn new(member_id: u64) -> Self {
        ConfChanges {
            member_id,
            removed: false,
        }
    }

    /// Whether a membership change applied since the start removed this member.
    pub(super) fn removed(&self) -> bool {
        self.removed
    }

    /// Asks raft to hand leadership to `to`, if this member leads and `to` is another member.
    pub(super) fn transfer_leader(&self, raw: &mut RawNode<LogStore>, to: u64) {
        if raw.raft.state == StateRole::Leader && to != self.member_id {
            tracing::info!(to = format_args!("{to:x}"), "transferring leadership");
            raw.transfer_leader(to);
        }
    }

    /// Applies a committed membership change to raft, then to the state machine; returns the
    /// proposal's request id (0 when it has none) and the state machine's output, or None when
    /// the entry could not be decoded (it is then applied as a no-op).
    pub(super) fn apply<S: StateMachine>(
        &mut self,
        raw: &mut RawNode<LogStore>,
        store: &LogStore,
        sm: &mut S,
        entry: &Entry,
    ) -> Option<(u64, S::Output)> {
        let change = match decode_conf_change(entry) {
            Ok(change) => change,
            Err(e) => {
                tracing::error!(index = entry.index, error = %e, "undecodable membership change");
                sm.apply_noop(entry.index, entry.term);
                return None;
            }
        };
        let outcome = match raw.apply_conf_change(&change) {
            Ok(conf_state) => {
                let membership = membership_of(&conf_state);
                tracing::info!(
                    index = entry.index,
                    voters = ?membership.voters,
                    learners = ?membership.learners,
                    "applied membership change"
                );
                store.mem.wl().set_conf_state(conf_state);
                let removes_me = change.changes.iter().any(|c| {
                    c.get_change_type() == ConfChangeType::RemoveNode && c.node_id == self.member_id
                });
                if removes_me && !membership.contains(self.member_id) {
                    tracing::warn!(
                        member_id = format_args!("{:x}", self.member_id),
                        "this member was removed from the cluster"
                    );
                    self.removed = true;
                }
                Ok(membership)
            }
            Err(e) => {
                tracing::warn!(index = entry.index, error = %e, "raft refused a membership change");
                Err(e.to_string())
            }
        };
        let changes = change.changes.iter().filter_map(member_change).collect();
        let (request_id, payload) = split_request_id(&change.context).unwrap_or((0, &[][..]));
        let output = sm.apply_membership(
            entry.index,
            entry.term,
            &MembershipChange {
                changes,
                payload,
                outcome,
            },
        );
        Some((request_id, output))
    }
}

/// A membership change entry as a `ConfChangeV2` (version 1 changes are converted).
fn decode_conf_change(entry: &Entry) -> Result<ConfChangeV2, String> {
    match entry.get_entry_type() {
        EntryType::EntryConfChange => {
            let cc = ConfChange::parse_from_bytes(&entry.data).map_err(|e| e.to_string())?;
            Ok(ConfChangeV2 {
                changes: vec![ConfChangeSingle {
                    change_type: cc.change_type,
                    node_id: cc.node_id,
                    ..Default::default()
                }]
                .into(),
                context: cc.context,
                ..Default::default()
            })
        }
        EntryType::EntryConfChangeV2 => {
            ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| e.to_string())
        }
        EntryType::EntryNormal => Err("not a membership change".into()),
    }
}

/// One [`MemberChange`] as raft's conf change step.
pub(super) fn single_change(change: MemberChange) -> ConfChangeSingle {
    let (change_type, node_id) = match change {
        MemberChange::AddVoter(id) => (ConfChangeType::AddNode, id),
        MemberChange::AddLearner(id) => (ConfChangeType::AddLearnerNode, id),
        MemberChange::Remove(id) => (ConfChangeType::RemoveNode, id),
    };
    ConfChangeSingle {
        change_type,
        node_id,
        ..Default::default()
    }
}

fn member_change(single: &ConfChangeSingle) -> Option<MemberChange> {
    Some(match single.get_change_type() {
        ConfChangeType::AddNode => MemberChange::AddVoter(single.node_id),
        ConfChangeType::AddLearnerNode => MemberChange::AddLearner(single.node_id),
        ConfChangeType::RemoveNode => MemberChange::Remove(single.node_id),
    })
}

/// Raft's conf state as a sorted [`Membership`].
pub(super) fn membership_of(conf_state: &ConfState) -> Membership {
    let mut voters = conf_state.voters.clone();
    let mut learners = conf_state.learners.clone();
    voters.sort_unstable();
    learners.sort_unstable();
    Membership { voters, learners }
}

/// The first entries of a new cluster's log: one committed membership change per initial
/// member, carrying its payload, identical on every initial member.
pub(super) fn bootstrap_entries(members: &[(u64, Vec<u8>)]) -> Vec<Entry> {
    let mut members = members.to_vec();
    members.sort_by_key(|(id, _)| *id);
    members
        .into_iter()
        .enumerate()
        .map(|(i, (id, payload))| {
            let mut context = vec![0u8; REQUEST_ID_LEN];
            context.extend_from_slice(&payload);
            let change = ConfChangeV2 {
                changes: vec![single_change(MemberChange::AddVoter(id))].into(),
                context: context.into(),
                ..Default::default()
            };
            let mut entry = Entry::default();
            entry.set_entry_type(EntryType::EntryConfChangeV2);
            entry.term = 1;
            entry.index = i as u64 + 1;
            entry.data = change.write_to_bytes().unwrap_or_default().into();
            entry
        })
        .collect()
}

/// Applies a committed membership change entry to raft and to the log's conf state (at start,
/// for changes the state machine already holds).
pub(super) fn apply_conf_change(raw: &mut RawNode<LogStore>, store: &LogStore, entry: &Entry) {
    let result = decode_conf_change(entry)
        .and_then(|cc| raw.apply_conf_change(&cc).map_err(|e| e.to_string()));
    match result {
        Ok(conf_state) => {
            tracing::info!(
                index = entry.index,
                voters = ?conf_state.voters,
                learners = ?conf_state.learners,
                "applied membership change"
            );
            store.mem.wl().set_conf_state(conf_state);
        }
        Err(e) => tracing::error!(index = entry.index, error = %e, "rejected membership change"),
    }
}
