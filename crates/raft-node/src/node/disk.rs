//! The free-space guard. A WAL write that finds the disk full cannot be undone once raft
//! counts the entries as persisted, so the member stops taking new entries *before* the disk is
//! full: a thread checks the free space of the WAL's and the data directory's file systems every
//! [`CHECK_INTERVAL`], and while either is below the reserve
//! ([`crate::RaftConfig::disk_reserve_bytes`]) the member refuses proposals with
//! [`RaftError::NoSpace`] (etcd's `database space exceeded`) and drops the leader's appends and
//! snapshots, which the leader sends again once space returns. Reads, heartbeats and elections
//! go on. Space is back once the free space exceeds the reserve by half of it again, so a file
//! system hovering at the threshold does not flip the member back and forth.
//!
//! [`RaftError::NoSpace`]: crate::RaftError::NoSpace

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often the free space is checked (a `statvfs` per directory).
const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Whether the member is short of disk space; shared by the handles and the raft loop.
#[derive(Debug, Default)]
pub(crate) struct DiskGuard {
    low: AtomicBool,
    /// Free bytes to keep; 0: the guard is off.
    reserve: AtomicU64,
}

impl DiskGuard {
    /// True while the free space is below the reserve.
    pub(crate) fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// Changes the reserve (0 turns the guard off); the next check applies it.
    pub(crate) fn set_reserve(&self, reserve: u64) {
        self.reserve.store(reserve, Ordering::Relaxed);
    }

    /// Starts the checking thread for `dirs` (which runs until the guard is dropped).
    pub(crate) fn start(
        member_id: u64,
        dirs: Vec<PathBuf>,
        reserve: u64,
    ) -> std::io::Result<Arc<DiskGuard>> {
        let guard = Arc::new(DiskGuard::default());
        guard.set_reserve(reserve);
        let weak = Arc::downgrade(&guard);
        std::thread::Builder::new()
            .name(format!("disk-guard-{member_id:x}"))
            .spawn(move || watch(weak, dirs))?;
        Ok(guard)
    }

    /// Records the free space `free` against `reserve`; returns the new state if it changed.
    fn update(&self, free: u64, reserve: u64) -> Option<bool> {
        let low = self.is_low();
        let now_low = if low {
            free < reserve.saturating_add(reserve / 2)
        } else {
            free < reserve
        };
        (now_low != low).then(|| {
            self.low.store(now_low, Ordering::Relaxed);
            now_low
        })
    }
}

fn watch(guard: Weak<DiskGuard>, dirs: Vec<PathBuf>) {
    while let Some(guard) = guard.upgrade() {
        let reserve = guard.reserve.load(Ordering::Relaxed);
        // The least free space among the directories, and where it is (with the guard off,
        // as much as there can be).
        let least = if reserve == 0 {
            dirs.first().map(|dir| (u64::MAX, dir))
        } else {
            dirs.iter()
                .filter_map(|dir| crate::snap::free_bytes(dir).ok().map(|free| (free, dir)))
                .min_by_key(|(free, _)| *free)
        };
        if let Some((free, dir)) = least {
            match guard.update(free, reserve) {
                Some(true) => tracing::warn!(
                    dir = %dir.display(),
                    free_bytes = free,
                    reserve_bytes = reserve,
                    "free disk space is below the reserve: refusing writes until space returns"
                ),
                Some(false) => tracing::info!(
                    dir = %dir.display(),
                    free_bytes = free,
                    reserve_bytes = reserve,
                    "free disk space is back above the reserve: accepting writes"
                ),
                None => {}
            }
        }
        drop(guard);
        std::thread::sleep(CHECK_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_below_the_reserve_and_back_only_past_half_again() {
        let guard = DiskGuard::default();
        assert_eq!(guard.update(1000, 100), None);
        assert_eq!(guard.update(99, 100), Some(true));
        assert!(guard.is_low());
        // Hovering between the reserve and 1.5 times it stays low.
        assert_eq!(guard.update(120, 100), None);
        assert!(guard.is_low());
        assert_eq!(guard.update(150, 100), Some(false));
        assert!(!guard.is_low());
        assert_eq!(guard.update(120, 100), None);
    }

    #[test]
    fn a_reserve_above_the_free_space_reports_low() {
        let dir = tempfile::tempdir().unwrap();
        let guard = DiskGuard::start(1, vec![dir.path().to_path_buf()], u64::MAX).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !guard.is_low() {
            assert!(std::time::Instant::now() < deadline, "never reported low");
            std::thread::sleep(CHECK_INTERVAL);
        }
    }
}
