//! The faults of a robustness run, drawn from the run's seed: which fault, which member, how
//! long. Each fault is undone before the next one starts (a member killed is restarted, a paused
//! one continued, a cut link healed), so the cluster keeps a quorum most of the time and the
//! clients' histories have something to check.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;

use metastore_proto::etcdserverpb::cluster_client::ClusterClient;
use metastore_proto::etcdserverpb::{MemberAddRequest, MemberRemoveRequest};

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
    /// Remove a follower from the cluster (MemberRemove) and add a fresh member in its place
    /// (MemberAdd, then its process with an empty data dir).
    Replace,
}

const SCHEDULE: [(Fault, u32); 9] = [
    (Fault::KillFollower, 3),
    (Fault::KillLeader, 3),
    (Fault::KillAll, 1),
    (Fault::Pause, 2),
    (Fault::Isolate, 2),
    (Fault::Partition, 2),
    (Fault::Delay, 2),
    (Fault::SnapshotCatchUp, 1),
    (Fault::Replace, 1),
];

impl Fault {
    /// The faults named in `list` (comma-separated, e.g. `KillLeader,Replace`); `None` for all.
    pub fn parse_list(list: &str) -> Vec<Fault> {
        list.split(',')
            .map(|name| {
                SCHEDULE
                    .iter()
                    .map(|(f, _)| *f)
                    .find(|f| format!("{f:?}").eq_ignore_ascii_case(name.trim()))
                    .unwrap_or_else(|| panic!("unknown fault {name:?}; known: {SCHEDULE:?}"))
            })
            .collect()
    }
}

/// A fault of the schedule, among `allowed` only if given.
fn draw(rng: &mut StdRng, allowed: Option<&[Fault]>) -> Fault {
    let schedule: Vec<(Fault, u32)> = SCHEDULE
        .iter()
        .copied()
        .filter(|(f, _)| allowed.is_none_or(|a| a.contains(f)))
        .collect();
    let total: u32 = schedule.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random_range(0..total);
    for (fault, weight) in schedule {
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

/// Injects faults (of the kinds in `allowed`, if given) until `deadline`; returns how many of
/// each kind.
pub async fn inject(
    cluster: &mut Cluster,
    rng: &mut StdRng,
    allowed: Option<&[Fault]>,
    deadline: Instant,
    snapshot_count: u64,
    log: &mut Vec<String>,
    on_restart: &mut dyn FnMut(&Cluster),
) -> BTreeMap<Fault, usize> {
    let mut counts = BTreeMap::new();
    let start = Instant::now();
    let mut replacements = 0;
    while Instant::now() + Duration::from_secs(2) < deadline {
        tokio::time::sleep(millis(rng, 500, 2000)).await;
        let fault = draw(rng, allowed);
        let hold = millis(rng, 300, 3000);
        let ids = cluster.members_in_cluster();
        let n = ids.len();
        let leader = cluster.leader_index().await;
        let random = ids[rng.random_range(0..n)];
        let target = if rng.random_bool(0.5) {
            leader.unwrap_or(random)
        } else {
            random
        };
        let followers: Vec<usize> = ids.iter().copied().filter(|&i| Some(i) != leader).collect();
        let follower = followers[rng.random_range(0..followers.len())];
        let name = |i: usize| cluster.member(i).name.clone();
        log.push(format!(
            "{:.1}s {fault:?} (leader {}, target {}, follower {}, hold {hold:?})",
            start.elapsed().as_secs_f64(),
            leader.map_or("none".to_string(), name),
            name(target),
            name(follower)
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
                cluster.restart_many(&ids).await;
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
                let others: Vec<usize> = ids.iter().copied().filter(|&i| i != target).collect();
                let other = others[rng.random_range(0..others.len())];
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
                let others: Vec<usize> = ids.iter().copied().filter(|&i| i != follower).collect();
                cluster.restart_many(&others).await;
                cluster.restart(follower).await;
            }
            Fault::Replace => {
                replacements += 1;
                replace(cluster, follower, leader, &format!("r{replacements}")).await;
            }
        }
        on_restart(cluster);
        *counts.entry(fault).or_insert(0) += 1;
    }
    counts
}

/// Removes member `old` through the leader and adds a fresh member `name` in its place.
async fn replace(cluster: &mut Cluster, old: usize, leader: Option<usize>, name: &str) {
    let via = leader.unwrap_or_else(|| {
        *cluster
            .members_in_cluster()
            .iter()
            .find(|&&i| i != old)
            .expect("another member")
    });
    let id = cluster
        .status(old)
        .await
        .ok()
        .and_then(|s| s.header)
        .map(|h| h.member_id);
    let id = id
        .or(cluster.member(old).id)
        .expect("the removed member's id");
    retry(|| async {
        let mut client = ClusterClient::new(cluster.channel(via).await?);
        client
            .member_remove(MemberRemoveRequest { id })
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    cluster.wait_removed(old, Duration::from_secs(30)).await;
    let new = cluster.reserve_member(name);
    let peer_url = cluster.peer_url(new);
    let via = *cluster.members_in_cluster().first().expect("a member");
    retry(|| async {
        let mut client = ClusterClient::new(cluster.channel(via).await?);
        client
            .member_add(MemberAddRequest {
                peer_ur_ls: vec![peer_url.clone()],
                is_learner: false,
            })
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    cluster.add_member_process(name).await;
}

/// Calls `call` until it succeeds (a membership change is refused while the cluster is not
/// ready for it), bounded.
async fn retry<T, F: std::future::Future<Output = Result<T, String>>>(mut call: impl FnMut() -> F) {
    let mut last = String::new();
    for _ in 0..40 {
        match call().await {
            Ok(_) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("membership change refused 40 times: {last}");
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
    let ids = cluster.members_in_cluster();
    let dead: Vec<usize> = ids
        .into_iter()
        .filter(|&i| !cluster.is_running(i))
        .collect();
    if !dead.is_empty() {
        cluster.restart_many(&dead).await;
    }
}
