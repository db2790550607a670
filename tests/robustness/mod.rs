//! The robustness suite (issue 22): a 3-member cluster of real processes, concurrent clients
//! recording what they did and saw, faults injected on a seeded schedule, then the history
//! checked (`checker`): linearizability, no acknowledged write lost, complete watch streams,
//! leases not expiring early; and the members: HashKV equal at the same revision, no panic in
//! any log.
//!
//! `short_run_memory` (a fixed seed, memory engine, about 20 s of faults) runs with every
//! `cargo xtask test`. `long_run` is ignored by default; `cargo xtask robustness [--seed N]
//! [--duration S] [--engine memory|rocksdb]` runs it with `METASTORE_ROBUSTNESS_SEED`,
//! `_DURATION` (seconds) and `_ENGINE` set. The seed decides every choice of the clients and the
//! fault schedule (the timing of a real cluster does not repeat exactly, but a failing seed
//! replays the same mix of operations and faults). `METASTORE_ROBUSTNESS_FAULTS` (e.g.
//! `KillLeader,Replace`) narrows the schedule to some kinds of fault. Figures are printed at
//! the end.

mod checker;
mod checker_tests;
mod faults;
mod history;
mod workload;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::watch_client::WatchClient;
use metastore_proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};
use metastore_proto::mvccpb::event::EventType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::cluster::Cluster;
use crate::support::Kind;
use history::{Event, EventKind, Op, Outcome, Request};
use workload::{Shared, KV_PREFIX};

/// Raft snapshots this many entries apart, so that restarted members catch up by snapshot.
const SNAPSHOT_COUNT: u64 = 200;
const KV_CLIENTS: usize = 6;
const LEASE_CLIENTS: usize = 2;
const HOT_KEYS: usize = 8;
/// How long the end of a run may take to get every watcher to its end marker.
const WATCH_DRAIN: Duration = Duration::from_secs(60);

/// One run's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub seed: u64,
    pub duration: Duration,
    pub engine: Kind,
    /// Only these faults (`METASTORE_ROBUSTNESS_FAULTS=KillLeader,Replace`), to narrow a
    /// failure down; all when `None`.
    pub faults: Option<&'static [faults::Fault]>,
}

impl Config {
    /// From `METASTORE_ROBUSTNESS_SEED`, `_DURATION` (seconds) and `_ENGINE`
    /// (memory|rocksdb|etcd);
    /// defaults: a random seed (printed), 120 s, memory.
    fn from_env() -> Config {
        let var = |name: &str| std::env::var(format!("METASTORE_ROBUSTNESS_{name}")).ok();
        let seed = var("SEED").map_or_else(rand::random, |s| {
            s.parse().expect("METASTORE_ROBUSTNESS_SEED: a number")
        });
        let secs = var("DURATION").map_or(120, |s| {
            s.parse().expect("METASTORE_ROBUSTNESS_DURATION: seconds")
        });
        let engine = match var("ENGINE").as_deref() {
            None | Some("memory") => Kind::Memory,
            Some("rocksdb") => Kind::Rocks,
            // etcd itself, to tell a false alarm of the suite from a finding about MetaStore
            Some("etcd") => Kind::Etcd,
            Some(other) => {
                panic!("METASTORE_ROBUSTNESS_ENGINE: memory, rocksdb or etcd, not {other}")
            }
        };
        let faults = var("FAULTS").map(|list| &*faults::Fault::parse_list(&list).leak());
        Config {
            seed,
            duration: Duration::from_secs(secs),
            engine,
            faults,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_run_memory() {
    run(Config {
        seed: 22,
        duration: Duration::from_secs(20),
        engine: Kind::Memory,
        faults: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "minutes long: `cargo xtask robustness` runs it"]
async fn long_run() {
    run(Config::from_env()).await;
}

/// One run: cluster, clients, faults, end phase, checks. Panics with every anomaly found.
async fn run(config: Config) {
    eprintln!(
        "robustness: {config:?} (replay with METASTORE_ROBUSTNESS_SEED={})",
        config.seed
    );
    let snapshot_count = SNAPSHOT_COUNT.to_string();
    let mut cluster =
        Cluster::start(config.engine, 3, &["--snapshot-count", &snapshot_count]).await;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let shared = Arc::new(Shared {
        endpoints: RwLock::new(cluster.endpoints()),
        stop: AtomicBool::new(false),
        stop_watchers: AtomicBool::new(false),
        t0: Instant::now(),
    });
    let end_kv = [KV_PREFIX, b"~end"].concat();
    let end_lease = [checker::LEASE_PREFIX, b"~end"].concat();

    let mut watchers = Vec::new();
    for (prefix, end) in [
        (KV_PREFIX.to_vec(), end_kv.clone()),
        (KV_PREFIX.to_vec(), end_kv.clone()),
        (checker::LEASE_PREFIX.to_vec(), end_lease.clone()),
        (checker::LEASE_PREFIX.to_vec(), end_lease.clone()),
    ] {
        watchers.push(tokio::spawn(workload::watcher(
            rng.random(),
            prefix,
            end,
            1,
            shared.clone(),
        )));
    }
    let mut kv_clients = Vec::new();
    for c in 0..KV_CLIENTS {
        kv_clients.push(tokio::spawn(workload::kv_client(
            c,
            rng.random(),
            HOT_KEYS,
            shared.clone(),
        )));
    }
    let mut lease_clients = Vec::new();
    for c in 0..LEASE_CLIENTS {
        lease_clients.push(tokio::spawn(workload::lease_client(
            KV_CLIENTS + c,
            rng.random(),
            shared.clone(),
        )));
    }

    let mut fault_log = Vec::new();
    let deadline = Instant::now() + config.duration;
    let update = {
        let shared = shared.clone();
        move |c: &Cluster| *shared.endpoints.write().unwrap() = c.endpoints()
    };
    let mut update = update;
    let faults = faults::inject(
        &mut cluster,
        &mut rng,
        config.faults,
        deadline,
        SNAPSHOT_COUNT,
        &mut fault_log,
        &mut update,
    )
    .await;

    // The end: clients stop, every fault is undone, the watchers drain to an end marker.
    shared.stop.store(true, Ordering::Relaxed);
    faults::heal_all(&mut cluster).await;
    update(&cluster);
    let mut ops: Vec<Op> = Vec::new();
    for c in kv_clients {
        ops.extend(c.await.expect("kv client"));
    }
    let mut leases = Vec::new();
    for c in lease_clients {
        let (o, l) = c.await.expect("lease client");
        ops.extend(o);
        leases.extend(l);
    }
    let leader = cluster.wait_leader().await;
    let last_client = KV_CLIENTS + LEASE_CLIENTS;
    for key in [&end_kv, &end_lease] {
        // A fresh value per attempt: an attempt with an unknown outcome may still apply.
        let request = |attempt: usize| Request::Put {
            key: key.clone(),
            value: [key.as_slice(), format!("-marker-{attempt}").as_bytes()].concat(),
            lease: 0,
        };
        ops.extend(until_known(&cluster, leader, last_client, request, &shared).await);
    }
    let drain_deadline = Instant::now() + WATCH_DRAIN;
    while Instant::now() < drain_deadline && watchers.iter().any(|w| !w.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shared.stop_watchers.store(true, Ordering::Relaxed);
    let mut watch_logs = Vec::new();
    for w in watchers {
        watch_logs.push(w.await.expect("watcher"));
    }
    // Final linearizable reads of everything, checked like any other read.
    for prefix in [KV_PREFIX, checker::LEASE_PREFIX] {
        let request = |_| Request::Range {
            prefix: prefix.to_vec(),
        };
        ops.extend(until_known(&cluster, leader, last_client, request, &shared).await);
    }
    let last_revision = ops
        .iter()
        .filter_map(|op| match &op.outcome {
            Outcome::Read { revision, .. } => Some(*revision),
            _ => None,
        })
        .max()
        .unwrap_or(1);
    let truth = read_history(&cluster, leader, last_revision).await;

    let report = checker::check(&checker::Recorded {
        ops: &ops,
        truth: &truth,
        leases: &leases,
        watches: &watch_logs,
    });
    cluster.assert_converged().await;
    let panics: Vec<String> = (0..cluster.member_count())
        .filter(|&i| cluster.log(i).contains("panicked"))
        .map(|i| cluster.member(i).name.clone())
        .collect();
    let snapshot_installs: usize = (0..cluster.member_count())
        .map(|i| {
            cluster
                .log(i)
                .matches("installed snapshot from the leader")
                .count()
        })
        .sum();

    let acknowledged = ops.iter().filter(|op| !op.is_unknown()).count();
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for op in &ops {
        if let Outcome::Unknown(reason) = &op.outcome {
            *reasons
                .entry(reason.chars().take(60).collect())
                .or_default() += 1;
        }
    }
    let mut reasons: Vec<(String, usize)> = reasons.into_iter().collect();
    reasons.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    eprintln!(
        "robustness: most frequent unknown outcomes: {:?}",
        &reasons[..reasons.len().min(6)]
    );
    let faults_total: usize = faults.values().sum();
    eprintln!("robustness: faults injected:\n  {}", fault_log.join("\n  "));
    eprintln!(
        "robustness figures: seed {} engine {:?} duration {:?}: {} operations ({} acknowledged, \
         {} unknown outcome: {} took effect, {} did not), {} leases ({} attached keys expired, {} revoked), \
         {} watch events received over {} reconnects, history of {} revisions, {} faults \
         injected {:?}, {} snapshot catch-ups, {} anomalies, panics in {:?}",
        config.seed,
        config.engine,
        config.duration,
        ops.len(),
        acknowledged,
        ops.len() - acknowledged,
        report.unknown_ops_applied,
        report.unknown_ops_not_applied,
        leases.len(),
        report.lease_expiries,
        report.lease_revocations,
        watch_logs.iter().map(|w| w.events.len()).sum::<usize>(),
        watch_logs.iter().map(|w| w.reconnects).sum::<usize>(),
        last_revision,
        faults_total,
        faults,
        snapshot_installs,
        report.count(),
        panics,
    );
    assert!(
        report.count() == 0,
        "seed {}: {} anomalies:\n{}",
        config.seed,
        report.count(),
        report.anomalies.join("\n")
    );
    assert!(panics.is_empty(), "a member panicked: {panics:?}");
    assert!(
        acknowledged > ops.len() / 4,
        "too few operations succeeded to check anything: {acknowledged} of {}",
        ops.len()
    );
}

/// Sends `request(attempt)` through the leader (then the other members) until an outcome is
/// known; every attempt is recorded.
async fn until_known(
    cluster: &Cluster,
    leader: usize,
    client: usize,
    request: impl Fn(usize) -> Request,
    shared: &Shared,
) -> Vec<Op> {
    let members = cluster.member_count();
    let mut ops = Vec::new();
    for attempt in 0..30 {
        let member = (leader + attempt) % members;
        let Ok(channel) = cluster.channel(member).await else {
            continue;
        };
        let call = shared.now();
        let request = request(attempt);
        let outcome = workload::execute(channel, &request).await;
        let known = !matches!(outcome, Outcome::Unknown(_));
        ops.push(Op {
            client,
            call,
            ret: shared.now(),
            request,
            outcome,
        });
        if known {
            return ops;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{ops:?}: no answer in 30 attempts after the faults were undone");
}

/// Every event from revision 1 to `last_revision`, through one watch on member `member`.
async fn read_history(cluster: &Cluster, member: usize, last_revision: i64) -> Vec<Event> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: vec![0],
                range_end: vec![0],
                start_revision: 1,
                ..Default::default()
            },
        )),
    })
    .await
    .expect("watch request");
    let mut client = WatchClient::new(cluster.channel(member).await.expect("connect"));
    let mut stream = client
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("watch the whole history")
        .into_inner();
    let mut events = Vec::new();
    while events
        .last()
        .is_none_or(|e: &Event| e.revision < last_revision)
    {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the history watch stalled")
            .expect("the history watch failed")
            .expect("the history watch ended");
        assert!(!resp.canceled, "history watch canceled: {resp:?}");
        for e in resp.events {
            let kv = e.kv.unwrap_or_default();
            events.push(Event {
                revision: kv.mod_revision,
                kind: if e.r#type == EventType::Delete as i32 {
                    EventKind::Delete
                } else {
                    EventKind::Put
                },
                key: kv.key,
                value: kv.value,
                mod_revision: kv.mod_revision,
                lease: kv.lease,
            });
        }
    }
    drop(tx);
    events
}

/// The proxies' pair partition cuts one link only: a follower cut from the leader stops
/// receiving its log (the third member does not relay raft messages), the other two go on, and
/// the follower catches up once the link is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_partition_cuts_one_link_only() {
    let mut cluster = Cluster::start(Kind::Memory, 3, &[]).await;
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    let third = (leader + 2) % 3;
    cluster.partition(leader, follower);
    let timeout = Duration::from_secs(5);
    for n in 0..20 {
        let value = n.to_string();
        cluster
            .put(leader, "cut", &value, timeout)
            .await
            .expect("the leader and the third member are a quorum");
    }
    let until = |member: usize| {
        let cluster = &cluster;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let value = cluster.get(member, "cut", true, timeout).await;
                if matches!(value, Ok(Some(v)) if v == "19") {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "m{} never saw cut=19",
                    member + 1
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until(third).await;
    // Long after the third member applied it, the cut follower still has none of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cluster.get(follower, "cut", true, timeout).await,
        Ok(None),
        "the follower received the leader's log through a cut link"
    );
    cluster.unpartition(leader, follower);
    until(follower).await;
}
