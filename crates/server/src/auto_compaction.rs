//! Auto-compaction (`--auto-compaction-mode`, `--auto-compaction-retention`), with etcd's
//! semantics (its `v3compactor` package). Every member samples its revision; only the leader
//! compacts, by proposing a Compaction through raft like a client's Compact, so every member
//! compacts at the same revision.
//!
//! - `periodic` keeps about the retention window of history: the revision is sampled every
//!   `min(retention, 1h) / 10`; the first compaction comes one retention after start, to the
//!   revision sampled a retention ago, then one every `min(retention, 1h)`, each to the oldest
//!   sample still in the window. A retention is a duration (`5m`, `1h30m`) or a plain number of
//!   hours.
//! - `revision` keeps the last N revisions: every 5 minutes (etcd's fixed interval), compact to
//!   `current - N` when that moved since the last compaction.
//!
//! A compaction that loses a race with another one (`required revision has been compacted`)
//! counts as done, as in etcd.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{bail, Result};
use metastore_api_context::ServerContext;
use metastore_proto::etcdserverpb::CompactionRequest;
use metastore_proto::metastorepb::internal_raft_request::Request;
use tokio::time::Instant;
use tracing::{info, warn};

/// etcd's interval between two checks in revision mode.
const REVISION_CHECK_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Periodic mode samples the revision this many times per compaction interval.
const SAMPLES_PER_INTERVAL: u32 = 10;

/// What the two flags ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Off,
    /// Keep this much time of history.
    Periodic(Duration),
    /// Keep this many revisions.
    Revision(i64),
}

impl Policy {
    /// Parses the flags as etcd does; a retention of 0 turns auto-compaction off.
    pub fn from_flags(mode: &str, retention: &str) -> Result<Policy> {
        let retention = retention.trim();
        match mode {
            "periodic" => {
                let period = match retention.parse::<u64>() {
                    Ok(hours) => Duration::from_secs(hours.saturating_mul(3600)),
                    Err(_) => metastore_auth::tokens::parse_duration(retention).map_err(|e| {
                        anyhow::anyhow!("--auto-compaction-retention {retention:?}: {e}")
                    })?,
                };
                Ok(if period.is_zero() {
                    Policy::Off
                } else {
                    Policy::Periodic(period)
                })
            }
            "revision" => match retention.parse::<i64>() {
                Ok(0) => Ok(Policy::Off),
                Ok(n) if n > 0 => Ok(Policy::Revision(n)),
                _ => bail!(
                    "--auto-compaction-retention {retention:?}: revision mode takes a positive \
                     number of revisions"
                ),
            },
            other => bail!(
                "unknown auto-compaction-mode {other:?} (expected \"periodic\" or \"revision\")"
            ),
        }
    }
}

/// Runs the policy until the process ends.
pub async fn run(ctx: ServerContext, policy: Policy, revision_check: Duration) {
    match policy {
        Policy::Off => {}
        Policy::Periodic(period) => periodic(ctx, period).await,
        Policy::Revision(keep) => revision(ctx, keep, revision_check).await,
    }
}

/// How long the revision mode waits between checks: etcd's 5 minutes unless the hidden test
/// flag shortens it.
pub fn revision_check_interval(flag: Option<Duration>) -> Duration {
    flag.unwrap_or(REVISION_CHECK_INTERVAL)
}

fn current_revision(ctx: &ServerContext) -> i64 {
    ctx.store.current().current_revision()
}

async fn periodic(ctx: ServerContext, period: Duration) {
    let interval = period.min(Duration::from_secs(3600));
    let sample_every = interval / SAMPLES_PER_INTERVAL;
    // Samples covering one period: the oldest is the revision about a period ago.
    let keep = (period.as_nanos() / sample_every.as_nanos().max(1)) as usize + 1;
    let mut samples: VecDeque<i64> = VecDeque::with_capacity(keep + 1);
    let mut last_success = Instant::now();
    // The first compaction waits a whole period; later ones an interval.
    let mut wait = period;
    loop {
        samples.push_back(current_revision(&ctx));
        if samples.len() > keep {
            samples.pop_front();
        }
        tokio::time::sleep(sample_every).await;
        if last_success.elapsed() < wait || !ctx.raft.with_status(|s| s.is_leader) {
            continue;
        }
        wait = interval;
        let target = samples[0];
        if compact(&ctx, target, "periodic", format!("{period:?}")).await {
            last_success = Instant::now();
        }
    }
}

async fn revision(ctx: ServerContext, keep: i64, check_every: Duration) {
    let mut previous = 0;
    loop {
        tokio::time::sleep(check_every).await;
        if !ctx.raft.with_status(|s| s.is_leader) {
            continue;
        }
        let target = current_revision(&ctx) - keep;
        if target <= 0 || target == previous {
            continue;
        }
        if compact(&ctx, target, "revision", keep.to_string()).await {
            previous = target;
        }
    }
}

/// Proposes a compaction to `revision`; whether it is done (or was done already).
async fn compact(ctx: &ServerContext, revision: i64, mode: &str, retention: String) -> bool {
    if revision <= 0 {
        return false;
    }
    info!(revision, mode, retention, "starting auto compaction");
    let request = Request::Compaction(CompactionRequest {
        revision,
        physical: false,
    });
    match ctx.propose(request).await {
        Ok(_) => {
            info!(revision, mode, "completed auto compaction");
            true
        }
        Err(status)
            if status
                .message()
                .contains("required revision has been compacted") =>
        {
            true
        }
        Err(status) => {
            warn!(revision, mode, error = %status.message(), "failed auto compaction");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_parses_as_etcd() {
        let p = |m, r| Policy::from_flags(m, r);
        assert_eq!(p("periodic", "0").unwrap(), Policy::Off);
        assert_eq!(
            p("periodic", "1").unwrap(),
            Policy::Periodic(Duration::from_secs(3600))
        );
        assert_eq!(
            p("periodic", "5m").unwrap(),
            Policy::Periodic(Duration::from_secs(300))
        );
        assert_eq!(
            p("periodic", "1h30m").unwrap(),
            Policy::Periodic(Duration::from_secs(5400))
        );
        assert_eq!(p("revision", "1000").unwrap(), Policy::Revision(1000));
        assert_eq!(p("revision", "0").unwrap(), Policy::Off);
        assert!(p("revision", "1h").is_err());
        assert!(p("revision", "-5").is_err());
        assert!(p("periodic", "soon").is_err());
        let e = p("hourly", "1").unwrap_err().to_string();
        assert!(e.contains("unknown auto-compaction-mode"), "{e}");
    }
}
