//! Peer messages raft-rs would panic on. raft-rs trusts its peers: a heartbeat whose commit
//! index is beyond this member's log, or an append whose entries do not follow its index, make
//! it panic (`to_commit … is out of range`, `conflict with committed entry`). A forged message
//! on the peer port, or a member whose WAL lost its tail, must not take the raft loop down:
//! such messages are corrected where that is safe and refused otherwise, before raft sees them.

use raft::eraftpb::{Message, MessageType};
use raft::RaftLog;

use crate::storage::LogStore;

/// Makes `msg` safe to step into raft with `log`, or says why it is refused.
pub(super) fn sanitize(log: &RaftLog<LogStore>, msg: &mut Message) -> Result<(), &'static str> {
    match msg.get_msg_type() {
        // A leader sends a follower at most the index it knows the follower has; lowering a
        // larger one to this member's last index only delays its commit until the leader
        // repairs the log.
        MessageType::MsgHeartbeat if msg.commit > log.last_index() => {
            msg.commit = log.last_index();
            Ok(())
        }
        MessageType::MsgAppend => {
            let in_sequence = msg
                .entries
                .iter()
                .zip(1u64..)
                .all(|(entry, i)| msg.index.checked_add(i) == Some(entry.index));
            if in_sequence {
                Ok(())
            } else {
                Err("append whose entries do not follow its index")
            }
        }
        // The leader counts an acknowledgement as entries this member holds.
        MessageType::MsgAppendResponse if !msg.reject && msg.index > log.last_index() => {
            Err("acknowledgement of entries beyond this member's log")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::Entry;

    fn log_with(last_index: u64) -> RaftLog<LogStore> {
        let store = LogStore::new(raft::storage::MemStorage::new());
        let entries: Vec<Entry> = (1..=last_index)
            .map(|index| Entry {
                index,
                term: 1,
                ..Default::default()
            })
            .collect();
        store.mem.wl().append(&entries).unwrap();
        RaftLog::new(store, crate::logger::raft_logger(1))
    }

    fn message(kind: MessageType) -> Message {
        let mut msg = Message::default();
        msg.set_msg_type(kind);
        msg
    }

    #[test]
    fn a_heartbeat_commit_beyond_the_log_is_lowered() {
        let log = log_with(5);
        let mut heartbeat = message(MessageType::MsgHeartbeat);
        heartbeat.commit = 1_000;
        assert_eq!(sanitize(&log, &mut heartbeat), Ok(()));
        assert_eq!(heartbeat.commit, 5);
        heartbeat.commit = 3;
        assert_eq!(sanitize(&log, &mut heartbeat), Ok(()));
        assert_eq!(heartbeat.commit, 3);
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
        append.entries = vec![entry(6), entry(7)].into();
        assert_eq!(sanitize(&log, &mut append), Ok(()));
        append.entries = vec![entry(1)].into();
        assert!(sanitize(&log, &mut append).is_err());
        append.entries = vec![entry(6), entry(8)].into();
        assert!(sanitize(&log, &mut append).is_err());
        append.index = u64::MAX;
        append.entries = vec![entry(0)].into();
        assert!(sanitize(&log, &mut append).is_err());
    }

    #[test]
    fn acknowledgements_beyond_the_log_are_refused() {
        let log = log_with(5);
        let mut ack = message(MessageType::MsgAppendResponse);
        ack.index = 5;
        assert_eq!(sanitize(&log, &mut ack), Ok(()));
        ack.index = 6;
        assert!(sanitize(&log, &mut ack).is_err());
        ack.reject = true;
        assert_eq!(sanitize(&log, &mut ack), Ok(()));
    }
}
