//! The faults of a robustness run, drawn from the run's seed: which fault, which member, how
//! long. Each fault is undone before the next one starts (a member killed is restarted, a paused
//! one continued, a cut link healed), so the cluster keeps a quorum most of the time and the
//! clients' histories have something to check.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;

use crate::support::cluster::Cluster;

/// The kinds of fault, with their weights in the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL a follower, restart it after a while.
    KillFollower,
    /// SIGKILL the leader, restart it after a while.
    KillLeader,
    /// SIGKILL every member, restart them all.
    KillAll,
    /// SIGSTOP a member (the leader half of the time), SIGCONT after a while.
    Pause,
    /// Cut a member (the leader half of the time) off from its peers.
    Isolate,
    /// Cut the link between two members; each still reaches the third.
    Partition,
    /// Slow every peer message of a member down.
    Delay,
    /// Kill a follower, let the others take raft snapshots and restart (so their log starts
    /// after it), then restart it: it catches up by snapshot.
    SnapshotCatchUp,
}

const SCHEDULE: [(Fault, u32); 8] = [
    (Fault::KillFollower, 3),
    (Fault::KillLeader, 3),
    (Fault::KillAll, 1),
    (Fault::Pause, 2),
    (Fault::Isolate, 2),
    (Fault::Partition, 2),
    (Fault::Delay, 2),
    (Fault::SnapshotCatchUp, 1),
];

fn draw(rng: &mut StdRng) -> Fault {
    let total: u32 = SCHEDULE.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random_range(0..total);
    for (fault, weight) in SCHEDULE {
        if pick < weight {
            return fault;
        }
        pick -= weight;
    }
    unreachable!("the weights sum to total")
}

fn millis(rng: &mut StdRng, from: u64, to: u64) -> Duration {
    Duration::from_millis(rng.random_range(from..=to))
}

/// Injects faults until `deadline`; returns how many of each kind.
pub async fn inject(
    cluster: &mut Cluster,
    rng: &mut StdRng,
    deadline: Instant,
    snapshot_count: u64,
    log: &mut Vec<String>,
    on_restart: &mut dyn FnMut(&Cluster),
) -> BTreeMap<Fault, usize> {
    let mut counts = BTreeMap::new();
    let n = cluster.member_count();
    let start = Instant::now();
    while Instant::now() + Duration::from_secs(2) < deadline {
        tokio::time::sleep(millis(rng, 500, 2000)).await;
        let fault = draw(rng);
        let hold = millis(rng, 300, 3000);
        let leader = cluster.leader_index().await;
        let random = rng.random_range(0..n);
        let target = if rng.random_bool(0.5) {
            leader.unwrap_or(random)
        } else {
            random
        };
        let follower = (0..n)
            .filter(|&i| Some(i) != leader)
            .nth(rng.random_range(0..n - 1))
            .unwrap_or(random);
        log.push(format!(
            "{:.1}s {fault:?} (leader {leader:?}, target m{}, follower m{}, hold {hold:?})",
            start.elapsed().as_secs_f64(),
            target + 1,
            follower + 1
        ));
        match fault {
            Fault::KillFollower | Fault::KillLeader => {
                let victim = match (fault, leader) {
                    (Fault::KillLeader, Some(l)) => l,
                    _ => follower,
                };
                cluster.kill(victim);
                tokio::time::sleep(hold).await;
                cluster.restart(victim).await;
            }
            Fault::KillAll => {
                cluster.stop();
                tokio::time::sleep(hold).await;
                cluster.restart_many(&(0..n).collect::<Vec<_>>()).await;
            }
            Fault::Pause => {
                cluster.signal_stop(target, true);
                tokio::time::sleep(hold).await;
                cluster.signal_stop(target, false);
            }
            Fault::Isolate => {
                cluster.isolate(target);
                tokio::time::sleep(hold).await;
                cluster.heal(target);
            }
            Fault::Partition => {
                let other = (target + 1 + rng.random_range(0..n - 1)) % n;
                cluster.partition(target, other);
                tokio::time::sleep(hold).await;
                cluster.unpartition(target, other);
            }
            Fault::Delay => {
                cluster.set_delay(target, millis(rng, 10, 150));
                tokio::time::sleep(hold * 2).await;
                cluster.set_delay(target, Duration::ZERO);
            }
            Fault::SnapshotCatchUp => {
                cluster.kill(follower);
                wait_entries(cluster, leader, 2 * snapshot_count, Duration::from_secs(20)).await;
                let others: Vec<usize> = (0..n).filter(|&i| i != follower).collect();
                cluster.restart_many(&others).await;
                cluster.restart(follower).await;
            }
        }
        on_restart(cluster);
        *counts.entry(fault).or_insert(0) += 1;
    }
    counts
}

/// Waits, bounded by `timeout`, until the leader's raft index grew by `entries`.
async fn wait_entries(
    cluster: &mut Cluster,
    leader: Option<usize>,
    entries: u64,
    timeout: Duration,
) {
    let Some(leader) = leader else { return };
    let Ok(first) = cluster.status(leader).await else {
        return;
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match cluster.status(leader).await {
            Ok(s) if s.raft_index >= first.raft_index + entries => return,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Undoes whatever a fault might have left (used at the end of a run and after a failure):
/// links healed, no delay, every member continued, dead members restarted.
pub async fn heal_all(cluster: &mut Cluster) {
    let n = cluster.member_count();
    for i in 0..n {
        cluster.heal(i);
        cluster.set_delay(i, Duration::ZERO);
        cluster.signal_stop(i, false);
        for j in 0..n {
            cluster.unpartition(i, j);
        }
    }
    let dead: Vec<usize> = (0..n).filter(|&i| !cluster.is_running(i)).collect();
    if !dead.is_empty() {
        cluster.restart_many(&dead).await;
    }
}
