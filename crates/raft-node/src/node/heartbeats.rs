//! etcd's check that a leader sends its heartbeats on time (`contention.TimeoutDetector` in
//! etcd's raft loop): a heartbeat to a follower more than twice the heartbeat interval after the
//! previous one means the leader's loop was held up (a slow disk, an overloaded machine). Each
//! late heartbeat counts in `etcd_server_heartbeat_send_failures_total` and logs etcd's warning.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use raft::eraftpb::{Message, MessageType};

pub(super) struct HeartbeatTimes {
    /// The longest gap allowed between two heartbeats to one follower.
    allowed: Duration,
    heartbeat_interval: Duration,
    last: HashMap<u64, Instant>,
}

impl HeartbeatTimes {
    pub(super) fn new(heartbeat_interval: Duration) -> HeartbeatTimes {
        HeartbeatTimes {
            allowed: 2 * heartbeat_interval,
            heartbeat_interval,
            last: HashMap::new(),
        }
    }

    /// Notes the heartbeats among `messages`, sent at `now`; returns how many were late.
    pub(super) fn observe(&mut self, messages: &[Message], now: Instant) -> usize {
        let mut late = 0;
        for m in messages
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgHeartbeat)
        {
            if let Some(previous) = self.last.insert(m.to, now) {
                let gap = now.saturating_duration_since(previous);
                if gap > self.allowed {
                    late += 1;
                    crate::metrics::METRICS.heartbeat_send_failures.increment(1);
                    tracing::warn!(
                        to = format!("{:x}", m.to),
                        heartbeat_interval_ms = self.heartbeat_interval.as_millis() as u64,
                        expected_duration_ms = self.allowed.as_millis() as u64,
                        exceeded_duration_ms = (gap - self.allowed).as_millis() as u64,
                        "leader failed to send out heartbeat on time; took too long, leader is overloaded likely from slow disk"
                    );
                }
            }
        }
        late
    }

    /// Forgets the times: a new term as leader starts afresh (etcd resets its detector when
    /// this member becomes leader).
    pub(super) fn reset(&mut self) {
        self.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(to: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.to = to;
        m
    }

    #[test]
    fn only_a_gap_over_twice_the_interval_is_late() {
        let interval = Duration::from_millis(100);
        let mut times = HeartbeatTimes::new(interval);
        let start = Instant::now();
        let mut append = Message::default();
        append.set_msg_type(MessageType::MsgAppend);
        append.to = 2;
        // The first heartbeat to a follower has nothing to be late against.
        assert_eq!(
            times.observe(&[heartbeat(2), heartbeat(3), append.clone()], start),
            0
        );
        // Exactly twice the interval is on time; other message types are not heartbeats.
        assert_eq!(
            times.observe(&[heartbeat(2), append.clone()], start + 2 * interval),
            0
        );
        // Follower 3's heartbeat comes 250 ms after its previous, 2's only 50 ms after.
        let later = start + Duration::from_millis(250);
        assert_eq!(times.observe(&[heartbeat(2), heartbeat(3)], later), 1);
        assert_eq!(times.observe(&[append], later + 10 * interval), 0);
        times.reset();
        assert_eq!(times.observe(&[heartbeat(2)], later + 20 * interval), 0);
    }
}
