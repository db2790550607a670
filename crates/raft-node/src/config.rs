//! Configuration of one raft member.

use std::path::PathBuf;
use std::time::Duration;

use crate::RaftError;

/// Default of [`RaftConfig::disk_reserve_bytes`]: room for the WAL's preallocation, a snapshot
/// marker, and the writes in flight while the guard notices.
pub const DEFAULT_DISK_RESERVE_BYTES: u64 = 64 * 1024 * 1024;

/// Configuration of one raft member. Field names follow etcd's flags where etcd has one.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    /// This member's id; must not be 0.
    pub member_id: u64,
    /// Voters of a new cluster, including this member. Only used when the data directory holds no
    /// WAL yet; afterwards the membership comes from the log.
    pub peers: Vec<u64>,
    /// Payloads of the initial members, by id: a new cluster's log starts with one committed
    /// membership change per member carrying them (as etcd's bootstrap does), so that every
    /// member — and every member added later — applies the same initial membership. Empty: the
    /// log starts empty.
    pub bootstrap: Vec<(u64, Vec<u8>)>,
    /// Join an existing cluster: start with no membership and an empty log, and learn both from
    /// the leader (etcd's `--initial-cluster-state existing`). `peers` and `bootstrap` are unused.
    pub join: bool,
    /// Directory that holds `wal/` and `snap/` (etcd's `<data-dir>/member`).
    pub data_dir: PathBuf,
    /// Applied entries between two snapshots (etcd `--snapshot-count`); 0 disables snapshots.
    pub snapshot_count: u64,
    /// Length of one raft tick (etcd `--heartbeat-interval`, 100ms).
    pub tick_interval: Duration,
    /// Ticks without hearing from a leader before a follower campaigns (etcd
    /// `--election-timeout` divided by the heartbeat interval, 10).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats (1).
    pub heartbeat_ticks: usize,
    /// Largest append message sent to a follower, in bytes (etcd: 1 MiB).
    pub max_size_per_msg: u64,
    /// Append messages in flight to one follower before waiting for acknowledgements (etcd: 512).
    pub max_inflight_msgs: usize,
    /// Size at which the WAL starts a new segment file (etcd: 64 MiB).
    pub wal_segment_size_bytes: u64,
    /// Where the WAL segments live when not in `<data_dir>/wal` (etcd `--wal-dir`, e.g. on a
    /// separate disk).
    pub wal_dir_override: Option<PathBuf>,
    /// Most WAL segment files kept, the current one included (etcd `--max-wals`); segments are
    /// deleted oldest first once a snapshot covers them. 0 keeps them all.
    pub max_wals: usize,
    /// Most snapshot files kept (etcd `--max-snapshots`). 0 keeps them all.
    pub max_snapshots: usize,
    /// Free bytes kept on the file systems of the WAL and the data directory: below it, the
    /// member refuses proposals and stops accepting log entries from the leader until space
    /// returns (see `node/disk.rs`). 0 turns the guard off.
    pub disk_reserve_bytes: u64,
}

impl RaftConfig {
    /// A single-member configuration with etcd's defaults, storing its files under `data_dir`.
    pub fn new(member_id: u64, data_dir: impl Into<PathBuf>) -> Self {
        RaftConfig {
            member_id,
            peers: vec![member_id],
            bootstrap: Vec::new(),
            join: false,
            data_dir: data_dir.into(),
            snapshot_count: 10_000,
            tick_interval: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 512,
            wal_segment_size_bytes: crate::wal::DEFAULT_SEGMENT_SIZE_BYTES,
            wal_dir_override: None,
            max_wals: 1,
            max_snapshots: 2,
            disk_reserve_bytes: DEFAULT_DISK_RESERVE_BYTES,
        }
    }

    /// Directory of the WAL segments.
    pub fn wal_dir(&self) -> PathBuf {
        self.wal_dir_override
            .clone()
            .unwrap_or_else(|| self.data_dir.join("wal"))
    }

    /// Directory of the snapshot files.
    pub fn snap_dir(&self) -> PathBuf {
        self.data_dir.join("snap")
    }

    /// How long a request may wait for raft before failing with [`RaftError::Timeout`]
    /// (etcd's request timeout: 5s plus two election timeouts).
    pub fn request_timeout(&self) -> Duration {
        let election = self.tick_interval * u32::try_from(self.election_ticks).unwrap_or(u32::MAX);
        Duration::from_secs(5).saturating_add(election.saturating_mul(2))
    }

    /// Checks what raft-rs does not: ids, peers and the tick length.
    pub(crate) fn validate(&self) -> Result<(), RaftError> {
        if self.member_id == 0 {
            return Err(RaftError::InvalidConfig("member id must not be 0".into()));
        }
        if !self.join && !self.peers.contains(&self.member_id) {
            return Err(RaftError::InvalidConfig(format!(
                "peers {:?} must include this member's id {:x}",
                self.peers, self.member_id
            )));
        }
        if self.peers.contains(&0) {
            return Err(RaftError::InvalidConfig("peer ids must not be 0".into()));
        }
        if self.tick_interval.is_zero() {
            return Err(RaftError::InvalidConfig(
                "tick interval must be positive".into(),
            ));
        }
        if self.wal_segment_size_bytes == 0 {
            return Err(RaftError::InvalidConfig(
                "WAL segment size must be positive".into(),
            ));
        }
        Ok(())
    }
}
