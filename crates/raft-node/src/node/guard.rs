//! Peer messages raft-rs would panic on. raft-rs trusts its peers: a heartbeat whose commit
//! index is beyond this member's log, or an append whose entries do not follow its index, make
//! it panic (`to_commit … is out of range`, `conflict with committed entry`). A forged message
//! on the peer port, or a member whose WAL lost its tail, must not take the raft loop down:
//! such messages are corrected where that is safe and refused otherwise, before raft sees them.

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfState, Message, MessageType};
use raft::{Changer, ProgressTracker, RaftLog};

use crate::storage::LogStore;

/// Makes `msg` safe to step into raft with `log` on a member that leads or not (`leads`), or
/// says why it is refused.
pub(super) fn sanitize(
    log: &RaftLog<LogStore>,
    leads: bool,
    msg: &mut Message,
) -> Result<(), &'static str> {
    match msg.get_msg_type() {
        // A member's own events (an election timeout, a heartbeat beat, a failed send): raft
        // makes them itself, no peer sends them.
        MessageType::MsgHup
        | MessageType::MsgBeat
        | MessageType::MsgUnreachable
        | MessageType::MsgSnapStatus
        | MessageType::MsgCheckQuorum => Err("a message a member only sends itself"),
        // raft-rs sets the sender's term on every message but forwarded proposals and read
        // requests, and takes one without a term as the member's own: a vote request of term 0
        // is granted with a response of term 0, and raft panics sending it (`term should be set
        // when sending MsgRequestPreVoteResponse`, found by the peer_message fuzz target).
        kind if msg.term == 0
            && !matches!(kind, MessageType::MsgPropose | MessageType::MsgReadIndex) =>
        {
            Err("message without a term")
        }
        // A member that does not lead forwards a leadership transfer request to its leader,
        // and raft-rs panics forwarding one that carries a term (`term should not be set when
        // sending MsgTransferLeader`, found by the peer_message fuzz target); a peer's request
        // always carries one. Only the leader acts on it: a member that lost its leadership
        // since the request was sent drops it, and the caller's MoveLeader times out.
        MessageType::MsgTransferLeader if !leads => {
            Err("leadership transfer request to a member that does not lead")
        }
        // A leader sends a follower at most the index it knows the follower has; lowering a
        // larger one to this member's last index only delays its commit until the leader
        // repairs the log.
        MessageType::MsgHeartbeat if msg.commit > log.last_index() => {
            msg.commit = log.last_index();
            Ok(())
        }
        // raft-rs reads the term of an index beyond the log as 0, so a snapshot or an append
        // that claims term 0 for an index past this member's log "matches" it, and raft then
        // commits up to that index (`to_commit … is out of range`). No entry after index 0 has
        // term 0, so such messages are forged or corrupt.
        MessageType::MsgSnapshot
            if msg.get_snapshot().get_metadata().index > 0
                && msg.get_snapshot().get_metadata().term == 0 =>
        {
            Err("snapshot of term 0")
        }
        // A follower forwards proposals and read requests to its leader as it got them; raft-rs
        // sends them without a term and panics (`term should not be set when sending
        // MsgPropose`) when asked to forward one that has a term. Members send them without.
        MessageType::MsgPropose | MessageType::MsgReadIndex if msg.term != 0 => {
            Err("proposal or read request carrying a term")
        }
        // A leader panics on a proposal without entries (`stepped empty MsgProp`) and on a read
        // request without one (raft-rs reads the request's context from its first entry: `index
        // out of bounds`), both found by the peer_message fuzz target; a follower forwards
        // what raft made, which always has them.
        MessageType::MsgPropose | MessageType::MsgReadIndex if msg.entries.is_empty() => {
            Err("proposal or read request without entries")
        }
        // raft-rs restores a snapshot's membership and panics when what it built differs from
        // what the snapshot says (`invalid restore`): member id 0, an id listed twice.
        MessageType::MsgSnapshot
            if !valid_membership(msg.get_snapshot().get_metadata())
                || !restorable(msg.get_snapshot().get_metadata().get_conf_state()) =>
        {
            Err("snapshot with an invalid membership")
        }
        MessageType::MsgAppend if msg.index > 0 && msg.log_term == 0 => {
            Err("append after an entry of term 0")
        }
        MessageType::MsgAppend => {
            let in_sequence = msg
                .entries
                .iter()
                .zip(1u64..)
                .all(|(entry, i)| msg.index.checked_add(i) == Some(entry.index));
            // A log's terms never decrease, and no entry has term 0. raft-rs reads the term of
            // an index past the log as 0: an entry of term 0 there "matches", raft appends the
            // entries after it, leaving a hole, and panics (`unstable.slice[6, 7] out of
            // bound[6, 6]`, found by the peer_message fuzz target).
            let terms_rise = msg
                .entries
                .iter()
                .try_fold(msg.log_term, |previous, entry| {
                    (entry.term != 0 && entry.term >= previous).then_some(entry.term)
                })
                .is_some();
            if !in_sequence {
                Err("append whose entries do not follow its index")
            } else if !terms_rise {
                Err("append whose entry terms are 0 or decrease")
            } else {
                Ok(())
            }
        }
        // The leader counts an acknowledgement as entries this member holds.
        MessageType::MsgAppendResponse if !msg.reject && msg.index > log.last_index() => {
            Err("acknowledgement of entries beyond this member's log")
        }
        _ => Ok(()),
    }
}

/// Member ids are not 0 and appear once in each list, and no voter is also a learner.
fn valid_membership(metadata: &raft::eraftpb::SnapshotMetadata) -> bool {
    let cs = metadata.get_conf_state();
    let lists = [
        &cs.voters,
        &cs.learners,
        &cs.voters_outgoing,
        &cs.learners_next,
    ];
    let well_formed = lists.iter().all(|ids| {
        let mut seen = std::collections::HashSet::new();
        ids.iter().all(|id| *id != 0 && seen.insert(*id))
    });
    well_formed && !cs.voters.iter().any(|id| cs.learners.contains(id))
}

/// Whether raft-rs can restore `cs` as it is: the membership its restore builds from the lists
/// (`raft::confchange::restore`, private: the same steps through the public `Changer`) equals
/// the one given, or raft panics (`invalid restore: … auto_leave: true != …`, found by the
/// peer_message fuzz target: `auto_leave` without outgoing voters; learners_next likewise).
fn restorable(cs: &ConfState) -> bool {
    let single = |node_id: u64, kind: ConfChangeType| {
        let mut change = ConfChangeSingle {
            node_id,
            ..Default::default()
        };
        change.set_change_type(kind);
        change
    };
    let outgoing: Vec<ConfChangeSingle> = cs
        .voters_outgoing
        .iter()
        .map(|id| single(*id, ConfChangeType::AddNode))
        .collect();
    let incoming: Vec<ConfChangeSingle> = cs
        .voters_outgoing
        .iter()
        .map(|id| single(*id, ConfChangeType::RemoveNode))
        .chain(
            cs.voters
                .iter()
                .map(|id| single(*id, ConfChangeType::AddNode)),
        )
        .chain(
            cs.learners
                .iter()
                .chain(&cs.learners_next)
                .map(|id| single(*id, ConfChangeType::AddLearnerNode)),
        )
        .collect();
    let mut tracker = ProgressTracker::new(1);
    let mut build = || -> raft::Result<()> {
        if outgoing.is_empty() {
            for change in &incoming {
                let (conf, changes) =
                    Changer::new(&tracker).simple(std::slice::from_ref(change))?;
                tracker.apply_conf(conf, changes, 1);
            }
        } else {
            for change in &outgoing {
                let (conf, changes) =
                    Changer::new(&tracker).simple(std::slice::from_ref(change))?;
                tracker.apply_conf(conf, changes, 1);
            }
            let (conf, changes) = Changer::new(&tracker).enter_joint(cs.auto_leave, &incoming)?;
            tracker.apply_conf(conf, changes, 1);
        }
        Ok(())
    };
    if build().is_err() {
        return false;
    }
    let built = tracker.conf().to_conf_state();
    let same = |a: &[u64], b: &[u64]| {
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        a.sort_unstable();
        b.sort_unstable();
        a == b
    };
    same(&cs.voters, &built.voters)
        && same(&cs.learners, &built.learners)
        && same(&cs.voters_outgoing, &built.voters_outgoing)
        && same(&cs.learners_next, &built.learners_next)
        && cs.auto_leave == built.auto_leave
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::Entry;

    /// Entries 1 to `last_index`, all of term 1.
    fn entries(last_index: u64) -> Vec<Entry> {
        (1..=last_index)
            .map(|index| Entry {
                index,
                term: 1,
                ..Default::default()
            })
            .collect()
    }

    fn log_with(last_index: u64) -> RaftLog<LogStore> {
        let store = LogStore::new(raft::storage::MemStorage::new());
        store.mem.wl().append(&entries(last_index)).unwrap();
        RaftLog::new(store, crate::logger::raft_logger(1))
    }

    /// A message of `kind` with a term, as peers send it (none for the forwarded kinds).
    fn message(kind: MessageType) -> Message {
        let mut msg = Message::default();
        msg.set_msg_type(kind);
        if !matches!(kind, MessageType::MsgPropose | MessageType::MsgReadIndex) {
            msg.term = 1;
        }
        msg
    }

    /// Steps `messages` into raft-rs itself, without the guard, on member 1 of `voters` whose
    /// log holds `log_len` entries of term 1; true if raft panicked. Each guard rule keeps
    /// such a test: when raft-rs stops panicking, the rule may go.
    fn raft_panics_on(voters: Vec<u64>, log_len: u64, messages: Vec<Message>) -> bool {
        std::panic::catch_unwind(move || {
            let store = LogStore::new(raft::storage::MemStorage::new_with_conf_state(
                raft::eraftpb::ConfState::from((voters, vec![])),
            ));
            store.mem.wl().append(&entries(log_len)).unwrap();
            let cfg = raft::Config {
                id: 1,
                ..Default::default()
            };
            let mut raw = raft::RawNode::new(&cfg, store, &crate::logger::raft_logger(1)).unwrap();
            for msg in messages {
                let _ = raw.step(msg);
            }
        })
        .is_err()
    }

    #[test]
    fn a_heartbeat_commit_beyond_the_log_is_lowered() {
        let log = log_with(5);
        let mut heartbeat = message(MessageType::MsgHeartbeat);
        heartbeat.commit = 1_000;
        assert_eq!(sanitize(&log, false, &mut heartbeat), Ok(()));
        assert_eq!(heartbeat.commit, 5);
        heartbeat.commit = 3;
        assert_eq!(sanitize(&log, false, &mut heartbeat), Ok(()));
        assert_eq!(heartbeat.commit, 3);
    }

    /// Found by the peer_message fuzz target: raft-rs panicked with `to_commit 20 is out of
    /// range [last_index 5]` on a snapshot of term 0 at index 20.
    #[test]
    fn messages_claiming_term_0_past_index_0_are_refused() {
        let log = log_with(5);
        let mut snapshot = message(MessageType::MsgSnapshot);
        snapshot.mut_snapshot().mut_metadata().index = 20;
        assert!(sanitize(&log, false, &mut snapshot).is_err());
        snapshot.mut_snapshot().mut_metadata().term = 3;
        assert_eq!(sanitize(&log, false, &mut snapshot), Ok(()));

        let mut append = message(MessageType::MsgAppend);
        append.index = 20;
        append.commit = 20;
        assert!(sanitize(&log, false, &mut append).is_err());
        append.log_term = 1;
        assert_eq!(sanitize(&log, false, &mut append), Ok(()));
        // The first append of a new log: index 0, term 0.
        let mut first = message(MessageType::MsgAppend);
        first.entries = vec![Entry {
            index: 1,
            term: 1,
            ..Default::default()
        }]
        .into();
        assert_eq!(sanitize(&log, false, &mut first), Ok(()));
    }

    /// Found by the peer_message fuzz target: `invalid restore: voters: 1 voters: 2 voters: 0
    /// != voters: 1 voters: 2`.
    #[test]
    fn snapshots_with_an_invalid_membership_are_refused() {
        let log = log_with(5);
        let snapshot = |voters: Vec<u64>, learners: Vec<u64>| {
            let mut msg = message(MessageType::MsgSnapshot);
            let metadata = msg.mut_snapshot().mut_metadata();
            metadata.index = 9;
            metadata.term = 2;
            metadata.mut_conf_state().voters = voters;
            metadata.mut_conf_state().learners = learners;
            msg
        };
        assert_eq!(
            sanitize(&log, false, &mut snapshot(vec![1, 2], vec![3])),
            Ok(())
        );
        assert!(sanitize(&log, false, &mut snapshot(vec![1, 2, 0], vec![])).is_err());
        assert!(sanitize(&log, false, &mut snapshot(vec![1, 2, 2], vec![])).is_err());
        assert!(sanitize(&log, false, &mut snapshot(vec![1, 2], vec![2])).is_err());
    }

    /// Found by the peer_message fuzz target: `invalid restore: voters: 1 voters: 2
    /// auto_leave: true != voters: 1 voters: 2`.
    #[test]
    fn snapshots_whose_membership_raft_would_restore_differently_are_refused() {
        let cs = |voters: Vec<u64>, outgoing: Vec<u64>, learners_next: Vec<u64>, auto_leave| {
            let mut cs = ConfState::from((voters, vec![]));
            cs.voters_outgoing = outgoing;
            cs.learners_next = learners_next;
            cs.auto_leave = auto_leave;
            cs
        };
        assert!(restorable(&cs(vec![1, 2], vec![], vec![], false)));
        // Joint: leaving 1, 2, 3 for 1, 2, with 3 a learner afterwards.
        assert!(restorable(&cs(vec![1, 2], vec![1, 2, 3], vec![3], true)));
        assert!(!restorable(&cs(vec![1, 2], vec![], vec![], true)));
        assert!(!restorable(&cs(vec![1, 2], vec![], vec![3], false)));
        let log = log_with(5);
        let mut msg = message(MessageType::MsgSnapshot);
        let metadata = msg.mut_snapshot().mut_metadata();
        metadata.index = 9;
        metadata.term = 2;
        metadata.set_conf_state(cs(vec![1, 2], vec![], vec![], true));
        assert!(sanitize(&log, false, &mut msg).is_err());
    }

    /// Found by the peer_message fuzz target: a follower panicked forwarding a peer's
    /// MsgPropose of term 3 to its leader.
    #[test]
    fn proposals_and_read_requests_carrying_a_term_are_refused() {
        let log = log_with(5);
        for kind in [MessageType::MsgPropose, MessageType::MsgReadIndex] {
            let mut msg = message(kind);
            msg.entries = vec![Entry::default()].into();
            assert_eq!(sanitize(&log, false, &mut msg), Ok(()));
            msg.term = 3;
            assert!(sanitize(&log, false, &mut msg).is_err(), "{kind:?}");
        }
    }

    /// The same messages through raft itself: refused by the guard, they cannot reach it.
    #[test]
    fn raft_panics_on_a_snapshot_of_term_0_without_the_guard() {
        let mut snapshot = message(MessageType::MsgSnapshot);
        snapshot.from = 2;
        snapshot.to = 1;
        snapshot.term = 2;
        snapshot.mut_snapshot().mut_metadata().index = 20;
        snapshot
            .mut_snapshot()
            .mut_metadata()
            .mut_conf_state()
            .voters = vec![1, 2];
        assert!(
            raft_panics_on(vec![1, 2], 5, vec![snapshot]),
            "raft-rs no longer panics: the guard's rule may go"
        );
    }

    #[test]
    fn appends_out_of_sequence_are_refused() {
        let log = log_with(5);
        let entry = |index| Entry {
            index,
            term: 2,
            ..Default::default()
        };
        let mut append = message(MessageType::MsgAppend);
        append.index = 5;
        append.log_term = 1;
        append.entries = vec![entry(6), entry(7)].into();
        assert_eq!(sanitize(&log, false, &mut append), Ok(()));
        append.entries = vec![entry(1)].into();
        assert!(sanitize(&log, false, &mut append).is_err());
        append.entries = vec![entry(6), entry(8)].into();
        assert!(sanitize(&log, false, &mut append).is_err());
        append.index = u64::MAX;
        append.entries = vec![entry(0)].into();
        assert!(sanitize(&log, false, &mut append).is_err());
    }

    /// Found by the peer_message fuzz target: raft-rs panicked with `unstable.slice[6, 7] out
    /// of bound[6, 6]` on an append whose entry of term 0 lay past the log's end.
    #[test]
    fn appends_with_entries_of_term_0_or_falling_terms_are_refused() {
        let log = log_with(5);
        let entry = |index, term| Entry {
            index,
            term,
            ..Default::default()
        };
        let mut append = message(MessageType::MsgAppend);
        append.index = 5;
        append.log_term = 2;
        append.entries = vec![entry(6, 2), entry(7, 3)].into();
        assert_eq!(sanitize(&log, false, &mut append), Ok(()));
        append.entries = vec![entry(6, 0), entry(7, 3)].into();
        assert!(sanitize(&log, false, &mut append).is_err());
        append.entries = vec![entry(6, 3), entry(7, 2)].into();
        assert!(sanitize(&log, false, &mut append).is_err());
        // Below the term of the entry it follows.
        append.entries = vec![entry(6, 1)].into();
        assert!(sanitize(&log, false, &mut append).is_err());
    }

    /// The same append through raft itself: refused by the guard, it cannot reach it.
    #[test]
    fn raft_panics_on_an_append_with_an_entry_of_term_0_past_the_log_without_the_guard() {
        let mut append = message(MessageType::MsgAppend);
        append.from = 2;
        append.to = 1;
        append.term = 2;
        append.index = 5;
        append.log_term = 1;
        append.entries = vec![
            Entry {
                index: 6,
                term: 0,
                ..Default::default()
            },
            Entry {
                index: 7,
                term: 2,
                ..Default::default()
            },
        ]
        .into();
        assert!(
            raft_panics_on(vec![1, 2], 5, vec![append]),
            "raft-rs no longer panics: the guard's rule may go"
        );
    }

    /// Found by the peer_message fuzz target: raft-rs panicked with `term should be set when
    /// sending MsgRequestPreVoteResponse` after granting a pre-vote request of term 0.
    #[test]
    fn messages_without_a_term_and_local_messages_are_refused() {
        let log = log_with(5);
        for kind in [
            MessageType::MsgRequestPreVote,
            MessageType::MsgRequestVote,
            MessageType::MsgAppend,
            MessageType::MsgHeartbeat,
            MessageType::MsgTimeoutNow,
        ] {
            let mut msg = message(kind);
            msg.term = 0;
            assert!(
                sanitize(&log, false, &mut msg).is_err(),
                "{kind:?} of term 0"
            );
            msg.term = 2;
            assert_eq!(
                sanitize(&log, false, &mut msg),
                Ok(()),
                "{kind:?} of term 2"
            );
        }
        for kind in [
            MessageType::MsgHup,
            MessageType::MsgBeat,
            MessageType::MsgUnreachable,
            MessageType::MsgSnapStatus,
            MessageType::MsgCheckQuorum,
        ] {
            let mut msg = message(kind);
            msg.term = 2;
            assert!(sanitize(&log, false, &mut msg).is_err(), "{kind:?}");
        }
    }

    /// Found by the peer_message fuzz target: a follower panicked with `term should not be set
    /// when sending MsgTransferLeader (was 3)` forwarding a peer's request to its leader.
    #[test]
    fn transfer_requests_reach_only_a_leader() {
        let log = log_with(5);
        let mut transfer = message(MessageType::MsgTransferLeader);
        transfer.term = 3;
        assert!(sanitize(&log, false, &mut transfer).is_err());
        assert_eq!(sanitize(&log, true, &mut transfer), Ok(()));
    }

    /// The same request through raft itself: refused by the guard, it cannot reach it.
    #[test]
    fn raft_panics_forwarding_a_peers_transfer_request_without_the_guard() {
        // Learn of leader 2 in term 3, then take member 3's request.
        let mut heartbeat = message(MessageType::MsgHeartbeat);
        heartbeat.from = 2;
        heartbeat.to = 1;
        heartbeat.term = 3;
        let mut transfer = message(MessageType::MsgTransferLeader);
        transfer.from = 3;
        transfer.to = 1;
        transfer.term = 3;
        assert!(
            raft_panics_on(vec![1, 2, 3], 0, vec![heartbeat, transfer]),
            "raft-rs no longer panics: the guard's rule may go"
        );
    }

    /// Found by the peer_message fuzz target: a leader panicked with `stepped empty MsgProp`.
    /// And with `index out of bounds` in `handle_ready_read_index` on a read request without
    /// entries.
    #[test]
    fn proposals_and_read_requests_without_entries_are_refused() {
        let log = log_with(5);
        for kind in [MessageType::MsgPropose, MessageType::MsgReadIndex] {
            let mut msg = message(kind);
            assert!(sanitize(&log, false, &mut msg).is_err(), "{kind:?}");
            msg.entries = vec![Entry::default()].into();
            assert_eq!(sanitize(&log, false, &mut msg), Ok(()), "{kind:?}");
        }
    }

    /// The same pre-vote request through raft itself: refused by the guard, it cannot reach it.
    #[test]
    fn raft_panics_granting_a_pre_vote_of_term_0_without_the_guard() {
        let mut pre_vote = message(MessageType::MsgRequestPreVote);
        pre_vote.term = 0;
        pre_vote.from = 2;
        pre_vote.to = 1;
        assert!(
            raft_panics_on(vec![1, 2], 0, vec![pre_vote]),
            "raft-rs no longer panics: the guard's rule may go"
        );
    }

    #[test]
    fn acknowledgements_beyond_the_log_are_refused() {
        let log = log_with(5);
        let mut ack = message(MessageType::MsgAppendResponse);
        ack.index = 5;
        assert_eq!(sanitize(&log, false, &mut ack), Ok(()));
        ack.index = 6;
        assert!(sanitize(&log, false, &mut ack).is_err());
        ack.reject = true;
        assert_eq!(sanitize(&log, false, &mut ack), Ok(()));
    }
}
