//! etcd's raft and WAL metrics, recorded where they happen through the `metrics` facade (the
//! binary installs the exporter; without one they cost nothing). Names, types and units are
//! etcd's: `etcd_server_proposals_committed_total` is a gauge there too (it follows the committed
//! index), `etcd_disk_wal_fsync_duration_seconds` a histogram in seconds.
//!
//! The handles are looked up once per process: recording is then an atomic operation, cheap
//! enough for every proposal and every fsync.

use std::sync::LazyLock;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

/// The handles of this crate's metrics.
pub(crate) struct RaftMetrics {
    /// 1 while this member knows a leader.
    pub(crate) has_leader: Gauge,
    /// 1 while this member is the leader.
    pub(crate) is_leader: Gauge,
    /// Times this member saw a new leader.
    pub(crate) leader_changes_seen: Counter,
    /// The committed index.
    pub(crate) proposals_committed: Gauge,
    /// The applied index.
    pub(crate) proposals_applied: Gauge,
    /// This member's proposals not yet applied or failed.
    pub(crate) proposals_pending: Gauge,
    /// This member's proposals that failed (refused, lost to a new leader, abandoned).
    pub(crate) proposals_failed: Counter,
    /// Durations of WAL fsyncs.
    pub(crate) wal_fsync_seconds: Histogram,
    /// Entries whose apply took longer than etcd's 100 ms warning threshold.
    pub(crate) slow_applies: Counter,
    /// ReadIndex requests raft left unanswered long enough to be sent again.
    pub(crate) slow_read_indexes: Counter,
    /// ReadIndex requests that failed (no leader, or unanswered within the request timeout).
    pub(crate) read_indexes_failed: Counter,
    /// Heartbeats a leader sent over twice the heartbeat interval after the previous one.
    pub(crate) heartbeat_send_failures: Counter,
}

/// The process's handles, looked up on first use (after the binary installed its recorder).
pub(crate) static METRICS: LazyLock<RaftMetrics> = LazyLock::new(|| RaftMetrics {
    has_leader: gauge!("etcd_server_has_leader"),
    is_leader: gauge!("etcd_server_is_leader"),
    leader_changes_seen: counter!("etcd_server_leader_changes_seen_total"),
    proposals_committed: gauge!("etcd_server_proposals_committed_total"),
    proposals_applied: gauge!("etcd_server_proposals_applied_total"),
    proposals_pending: gauge!("etcd_server_proposals_pending"),
    proposals_failed: counter!("etcd_server_proposals_failed_total"),
    wal_fsync_seconds: histogram!("etcd_disk_wal_fsync_duration_seconds"),
    slow_applies: counter!("etcd_server_slow_apply_total"),
    slow_read_indexes: counter!("etcd_server_slow_read_indexes_total"),
    read_indexes_failed: counter!("etcd_server_read_indexes_failed_total"),
    heartbeat_send_failures: counter!("etcd_server_heartbeat_send_failures_total"),
});
