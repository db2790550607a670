//! Multi-member clusters: replication, leader failure, snapshot catch-up, membership changes
//! through etcdctl, and partitions. Every scenario is written once and run against real etcd
//! (the reference) and MetaStore on both engines; each ends with `assert_converged`.

use crate::support;

use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::{Member, PutRequest};
use support::cluster::{Cluster, Json, Launch, Removal};
use support::Kind;

/// Bound of one put or get in a scenario.
const CALL: Duration = Duration::from_secs(5);

per_kind!(
    writes_through_any_member,
    member_list_through_any_member,
    leader_kill_elects_a_new_leader,
    restarted_follower_catches_up_by_snapshot,
    learner_add_promote_update_remove,
    partitioned_member_serves_no_stale_read,
    configured_by_file_and_environment,
    sigterm_of_the_leader_hands_over_leadership,
);

/// A put through member `i` that must succeed.
async fn put(c: &Cluster, i: usize, key: &str, value: &str) -> i64 {
    c.put(i, key, value, CALL)
        .await
        .unwrap_or_else(|e| panic!("put {key} through m{}: {e}", i + 1))
}

/// A linearizable get through member `i` that must succeed.
async fn get(c: &Cluster, i: usize, key: &str) -> Option<String> {
    c.get(i, key, false, CALL)
        .await
        .unwrap_or_else(|e| panic!("get {key} through m{}: {e}", i + 1))
}

/// A put through member `i` into a cluster that is still settling (e.g. a healed member
/// disrupting the leader): retried for a bounded time.
async fn put_eventually(c: &Cluster, i: usize, key: &str, value: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.put(i, key, value, CALL).await {
            Ok(revision) => return revision,
            Err(e) => assert!(
                Instant::now() < deadline,
                "put {key} through m{} kept failing: {e}",
                i + 1
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A linearizable get through member `i` in a cluster that is still settling: transient
/// errors are retried for a bounded time (and printed).
async fn get_eventually(c: &Cluster, i: usize, key: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.get(i, key, false, CALL).await {
            Ok(value) => return value,
            Err(e) => {
                eprintln!("get {key} through m{} refused (retrying): {e}", i + 1);
                assert!(
                    Instant::now() < deadline,
                    "get {key} through m{} kept failing: {e}",
                    i + 1
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `etcdctl` through member `i`, retried for a bounded time until it succeeds; its stdout.
/// Prints the first refusal.
fn etcdctl_eventually(c: &Cluster, i: usize, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first_refusal = true;
    loop {
        let out = c.etcdctl(i, args);
        if out.status.success() {
            return String::from_utf8(out.stdout).expect("utf-8 output");
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if first_refusal {
            eprintln!("etcdctl {args:?} refused (retrying): {stderr}");
            first_refusal = false;
        }
        assert!(
            Instant::now() < deadline,
            "etcdctl {args:?} kept failing: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `count` puts through member `i` over 500 keys, 32 at a time.
async fn put_many(c: &Cluster, i: usize, count: usize) {
    let kv = c.kv(i).await;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let mut kv: KvClient<_> = kv.clone();
        tasks.spawn(async move {
            let mut n = worker;
            while n < count {
                let req = PutRequest {
                    key: format!("bulk/{:03}", n % 500).into_bytes(),
                    value: format!("value-{n}").into_bytes(),
                    ..Default::default()
                };
                tokio::time::timeout(CALL, kv.put(req))
                    .await
                    .unwrap_or_else(|_| panic!("put {n} timed out"))
                    .unwrap_or_else(|e| panic!("put {n}: {e}"));
                n += 32;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("writer task");
    }
}

/// Reserves member `name` and adds it as a learner with `etcdctl member add` on member 0;
/// returns its index and etcdctl's output. etcd refuses reconfiguration until its member has
/// been connected to every peer for 5 s (`etcdserver: unhealthy cluster`), which a fresh cluster
/// has not: hence etcdctl_eventually.
fn add_learner(c: &mut Cluster, name: &str) -> (usize, String) {
    let new = c.reserve_member(name);
    let peer_urls = format!("--peer-urls={}", c.peer_url(new));
    let added = etcdctl_eventually(c, 0, &["member", "add", name, &peer_urls, "--learner"]);
    (new, added)
}

/// The hexadecimal member id in etcdctl's `Member <id> added to cluster <cid>`-style lines.
fn member_id_in(line: &str) -> String {
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("Member"), "{line}");
    words.next().expect("member id").to_string()
}

/// `etcdctl member list -w json` through member `i`: the members array.
fn member_list_json(c: &Cluster, i: usize) -> Vec<Json> {
    let json = Json::parse(&c.etcdctl_ok(i, &["member", "list", "-w", "json"]));
    json.get("members")
        .expect("members in member list")
        .as_array()
        .to_vec()
}

/// The member with hexadecimal id `id` in a `member list -w json` array.
fn find_member<'a>(members: &'a [Json], id: &str) -> Option<&'a Json> {
    let id = u64::from_str_radix(id, 16).expect("hex member id");
    members
        .iter()
        .find(|m| m.get("ID").and_then(Json::as_u64) == Some(id))
}

/// (a) A put through any member is read linearizably through every member.
async fn writes_through_any_member(kind: Kind) {
    let mut c = Cluster::start(kind, 3, &[]).await;
    for round in 0..2 {
        for i in 0..3 {
            let key = format!("written-through/m{}", i + 1);
            let value = format!("round {round}");
            let revision = put(&c, i, &key, &value).await;
            for j in 0..3 {
                assert_eq!(
                    get(&c, j, &key).await.as_deref(),
                    Some(value.as_str()),
                    "{key} (revision {revision}) read through m{}",
                    j + 1
                );
            }
        }
    }
    // Through etcdctl too: put on one member, linearizable get on another.
    c.etcdctl_ok(1, &["put", "via-etcdctl", "yes"]);
    assert_eq!(
        c.etcdctl_ok(2, &["get", "via-etcdctl", "--print-value-only"]),
        "yes\n"
    );
    c.assert_converged().await;
}

/// SIGTERM of the leader under a write load, as etcd's leader does it: it hands leadership to an
/// up-to-date voter before stopping, so the others do not wait out an election timeout. Writers
/// go through the two followers; the test counts their errors and the longest time without a
/// successful write (printed), and checks that the new leader took over in the next term.
///
/// A write a follower forwarded to the leader while it hands over is dropped there without an
/// answer (raft drops proposals during a transfer, in etcd too) and waits for its deadline: the
/// writers give each call 1 s, and writes must resume within 3 s of the SIGTERM. With the 5 s
/// call timeout, one such write per writer made the test fail now and then (CI, RocksDB).
async fn sigterm_of_the_leader_hands_over_leadership(kind: Kind) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut c = Cluster::start(kind, 3, &[]).await;
    let leader = c.wait_leader().await;
    let term_before = c.status(leader).await.unwrap().raft_term;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, i) in (0..3).filter(|i| *i != leader).enumerate() {
        let mut kv = c.kv(i).await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let (mut ok, mut errors, mut n) = (Vec::new(), Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let put = PutRequest {
                    key: format!("load/{w}/{n}").into_bytes(),
                    value: b"v".to_vec(),
                    ..Default::default()
                };
                match tokio::time::timeout(Duration::from_secs(1), kv.put(put)).await {
                    Ok(Ok(_)) => ok.push(Instant::now()),
                    Ok(Err(status)) => errors.push(support::cluster::status_text(&status)),
                    Err(_) => errors.push("timed out".to_string()),
                }
            }
            (ok, errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    let exit = c.terminate(leader, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut errors) = (Vec::new(), Vec::new());
    for w in writers {
        let (o, e) = w.await.unwrap();
        ok.extend(o);
        errors.extend(e);
    }
    ok.sort();
    let longest_gap = ok
        .windows(2)
        .filter(|p| p[1] >= sent)
        .map(|p| p[1] - p[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "{kind:?}: SIGTERM of the leader: exit {exit:?}, {} writes, {} errors {:?}, longest gap \
         without a write {longest_gap:?}",
        ok.len(),
        errors.len(),
        errors.iter().take(3).collect::<Vec<_>>()
    );
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    let term_after = c.status(new_leader).await.unwrap().raft_term;
    assert_eq!(term_after, term_before + 1, "one new term: the transfer's");
    assert!(ok.last().is_some_and(|t| *t > sent), "writes resumed");
    // Raft drops proposals while no leader is known or the leader hands over: the member
    // proposes again once a leader is known instead of answering `no leader`.
    assert!(
        !errors.iter().any(|e| e.contains("no leader")),
        "{errors:?}"
    );
    if kind != Kind::Etcd {
        let log = c.log(leader);
        assert!(
            log.contains("leadership transferred before stopping"),
            "{log}"
        );
    }
    c.assert_converged().await;
}

/// etcd's other two ways to configure a member: m1 and m3 read a YAML `--config-file` (keys
/// named as the flags), m2 only `ETCD_*` variables. The cluster forms with the names and URLs
/// given there, and replicates.
async fn configured_by_file_and_environment(kind: Kind) {
    let mut c = Cluster::start_launched(kind, 3, Launch::FileAndEnv).await;
    let list = c.member_list(1).await.expect("member list");
    let mut seen: Vec<(String, Vec<String>, Vec<String>)> = list
        .members
        .iter()
        .map(|m| (m.name.clone(), m.peer_ur_ls.clone(), m.client_ur_ls.clone()))
        .collect();
    seen.sort();
    let expected: Vec<_> = (0..3)
        .map(|i| {
            let m = c.member(i);
            (m.name.clone(), vec![m.peer_url()], vec![m.client_url()])
        })
        .collect();
    assert_eq!(seen, expected);
    let revision = put(&c, 0, "configured", "by file").await;
    assert_eq!(
        get(&c, 1, "configured").await.as_deref(),
        Some("by file"),
        "revision {revision}"
    );
    c.assert_converged().await;
}

/// Cluster.MemberList through any member: the same members with names and URLs; headers with
/// one cluster id, the answering member's own id and a raft term.
async fn member_list_through_any_member(kind: Kind) {
    let mut c = Cluster::start(kind, 3, &[]).await;
    let mut cluster_id = None;
    let mut first: Option<Vec<Member>> = None;
    for i in 0..3 {
        let resp = c
            .member_list(i)
            .await
            .unwrap_or_else(|e| panic!("MemberList through m{}: {e}", i + 1));
        let header = resp.header.expect("header");
        assert_ne!(header.cluster_id, 0);
        assert_eq!(
            *cluster_id.get_or_insert(header.cluster_id),
            header.cluster_id
        );
        assert!(header.raft_term > 0, "raft_term in {header:?}");
        let mut members = resp.members;
        members.sort_by_key(|m| m.id);
        assert_eq!(members.len(), 3, "{members:?}");
        for k in 0..3 {
            let m = members
                .iter()
                .find(|m| m.name == format!("m{}", k + 1))
                .unwrap_or_else(|| panic!("m{} missing in {members:?}", k + 1));
            assert_eq!(m.peer_ur_ls, vec![c.peer_url(k)], "peer URLs of {m:?}");
            assert_eq!(m.client_ur_ls, vec![c.endpoint(k)], "client URLs of {m:?}");
            assert!(!m.is_learner, "{m:?} is no learner");
            assert_ne!(m.id, 0);
        }
        // The header names the member that answered.
        let me = members
            .iter()
            .find(|m| m.client_ur_ls == vec![c.endpoint(i)])
            .expect("the answering member");
        assert_eq!(
            header.member_id,
            me.id,
            "member_id in the header of m{}",
            i + 1
        );
        let status = c.status(i).await.expect("status");
        assert_eq!(status.header.unwrap().member_id, me.id);
        match &first {
            Some(first) => assert_eq!(&members, first, "m{} lists other members", i + 1),
            None => first = Some(members),
        }
    }
    c.assert_converged().await;
}

/// (b) Killing the leader elects a new one; writes resume; an acknowledged write survives.
async fn leader_kill_elects_a_new_leader(kind: Kind) {
    let mut c = Cluster::start(kind, 3, &[]).await;
    let old = c.wait_leader().await;
    let follower = (old + 1) % 3;
    put(&c, follower, "before-kill", "acknowledged").await;
    c.kill(old);
    let new = c.wait_leader().await;
    assert_ne!(new, old, "the killed member cannot lead");
    for i in c.live() {
        put(&c, i, &format!("after-kill/m{}", i + 1), "written").await;
        assert_eq!(
            get(&c, i, "before-kill").await.as_deref(),
            Some("acknowledged")
        );
    }
    c.restart(old).await;
    c.wait_leader().await;
    assert_eq!(
        get_eventually(&c, old, &format!("after-kill/m{}", new + 1))
            .await
            .as_deref(),
        Some("written")
    );
    c.assert_converged().await;
}

/// (c) A follower restarted after the others wrote far past `--snapshot-count` catches up.
/// etcd keeps 5,000 entries behind its newest snapshot for slow followers, so the others
/// write more than that: the follower can only catch up from a snapshot.
async fn restarted_follower_catches_up_by_snapshot(kind: Kind) {
    let mut c = Cluster::start(kind, 3, &["--snapshot-count", "100"]).await;
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    put(&c, follower, "before", "kill").await;
    c.assert_converged().await;
    c.kill(follower);
    let started = Instant::now();
    put_many(&c, leader, 5_600).await;
    eprintln!("5,600 puts took {:?}", started.elapsed());
    put(&c, leader, "last", "write").await;
    c.restart(follower).await;
    c.assert_converged().await;
    // Right after a restart an election may still be settling: a transient refusal
    // (`etcdserver: leader changed`) is fine, a wrong value is not.
    assert_eq!(
        get_eventually(&c, follower, "last").await.as_deref(),
        Some("write")
    );
    let log = c.log(follower);
    let marker = match kind {
        Kind::Etcd => "applied incoming snapshot",
        Kind::Memory | Kind::Rocks => "installed snapshot from the leader",
    };
    assert!(
        log.contains(marker),
        "the follower caught up without a snapshot"
    );
}

/// (d) Learner lifecycle through etcdctl: add, promote (refused while the learner is behind),
/// list, update its peer URLs, remove; the removed member stops serving.
async fn learner_add_promote_update_remove(kind: Kind) {
    let mut c = Cluster::start(kind, 3, &[]).await;
    put(&c, 0, "before-add", "x").await;
    let (new, added) = add_learner(&mut c, "m4");
    let url = c.peer_url(new);
    eprintln!("member add:\n{added}");
    let first_line = added.lines().next().expect("member add output");
    let id = member_id_in(first_line);
    // etcdctl prints ids with %16x: a short id is padded with spaces.
    assert_eq!(
        first_line.split_whitespace().last(),
        Some(cluster_id_hex(&c).await.as_str()),
        "{first_line}"
    );
    assert!(added.contains("ETCD_NAME=\"m4\""), "{added}");
    assert!(
        added.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
        "{added}"
    );
    assert!(
        added.contains(&format!("ETCD_INITIAL_ADVERTISE_PEER_URLS=\"{url}\"")),
        "{added}"
    );

    // Listed as an unstarted learner: no name, no client URLs yet. (Listed through the member
    // that ran the change: it applied the change before answering; others may lag.)
    let members = member_list_json(&c, 0);
    let learner = find_member(&members, &id).expect("the added learner is listed");
    assert_eq!(learner.get("isLearner").and_then(Json::as_bool), Some(true));
    assert_eq!(learner.strings("peerURLs"), vec![url.clone()]);
    assert_eq!(learner.get("name").and_then(Json::as_str).unwrap_or(""), "");

    // A learner that has not caught up cannot be promoted.
    let refused = c.etcdctl(0, &["member", "promote", &id]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    eprintln!("promote while behind: {stderr}");
    assert!(!refused.status.success());
    assert!(
        stderr.contains("can only promote a learner member which is in sync with leader"),
        "{stderr}"
    );

    assert_eq!(c.add_member_process("m4").await, new);
    // A learner serves serializable reads only.
    let refused = c.get(new, "before-add", false, CALL).await;
    eprintln!("linearizable get through the learner: {refused:?}");
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("etcdserver: rpc not supported for learner")),
        "{refused:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.get(new, "before-add", true, CALL).await != Ok(Some("x".to_string())) {
        assert!(Instant::now() < deadline, "the learner did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once started, the new member publishes its name and client URLs through raft.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let members = member_list_json(&c, 0);
        let named = find_member(&members, &id)
            .and_then(|m| m.get("name").and_then(Json::as_str).map(str::to_string));
        if named.as_deref() == Some("m4") {
            break;
        }
        assert!(Instant::now() < deadline, "m4 never published its name");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let promoted = loop {
        let out = c.etcdctl(0, &["member", "promote", &id]);
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "promote kept failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!("member promote: {promoted}");
    assert_eq!(
        words(promoted.trim()),
        words(&format!(
            "Member {id} promoted in cluster {}",
            cluster_id_hex(&c).await
        ))
    );
    let members = member_list_json(&c, 0);
    assert_eq!(members.len(), 4);
    let voter = find_member(&members, &id).expect("m4 is listed");
    assert_eq!(voter.get("name").and_then(Json::as_str), Some("m4"));
    assert_ne!(
        voter.get("isLearner").and_then(Json::as_bool),
        Some(true),
        "{voter}"
    );
    assert_eq!(voter.strings("clientURLs"), vec![c.endpoint(new)]);
    put(&c, new, "written-through-m4", "voter").await;
    c.assert_converged().await;

    // Update its peer URLs to another proxy of the same member.
    let alias = c.add_peer_alias(new);
    let updated = c.etcdctl_ok(
        0,
        &["member", "update", &id, &format!("--peer-urls={alias}")],
    );
    eprintln!("member update: {updated}");
    assert_eq!(
        words(updated.trim()),
        words(&format!(
            "Member {id} updated in cluster {}",
            cluster_id_hex(&c).await
        ))
    );
    let members = member_list_json(&c, 0);
    let updated = find_member(&members, &id).expect("m4 is listed");
    assert_eq!(updated.strings("peerURLs"), vec![alias]);
    put(&c, 1, "after-update", "y").await;
    assert_eq!(get(&c, new, "after-update").await.as_deref(), Some("y"));
    c.assert_converged().await;

    let removed = c.etcdctl_ok(0, &["member", "remove", &id]);
    eprintln!("member remove: {removed}");
    assert_eq!(
        words(removed.trim()),
        words(&format!(
            "Member {id} removed from cluster {}",
            cluster_id_hex(&c).await
        ))
    );
    let outcome = c.wait_removed(new, Duration::from_secs(30)).await;
    eprintln!(
        "the removed member: {outcome:?}\n{}",
        tail_text(&c.log(new), 8)
    );
    if kind == Kind::Etcd {
        assert!(matches!(outcome, Removal::Exited(_)), "{outcome:?}");
    }
    let members = member_list_json(&c, 0);
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(find_member(&members, &id).is_none());
    put(&c, 2, "after-remove", "z").await;
    c.assert_converged().await;
}

/// (e) A member cut off from its peers serves no stale linearizable read; a serializable read
/// may be stale; after healing it converges.
async fn partitioned_member_serves_no_stale_read(kind: Kind) {
    let mut c = Cluster::start(kind, 3, &[]).await;
    let leader = c.wait_leader().await;
    let isolated = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    put(&c, leader, "k", "old").await;
    c.assert_converged().await;

    c.isolate(isolated);
    // A loaded machine can see an election here (etcd answers `leader changed`): retried.
    put_eventually(&c, other, "k", "new").await;
    assert_eq!(
        get_eventually(&c, leader, "k").await.as_deref(),
        Some("new")
    );

    // Hearing nobody, it stops following (campaigns, or pre-campaigns, in vain).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = c
            .status(isolated)
            .await
            .expect("the isolated member answers Status");
        if status.leader == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the isolated member still follows {:x}",
            status.leader
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let asked = Instant::now();
    let linearizable = c.get(isolated, "k", false, Duration::from_secs(10)).await;
    eprintln!(
        "linearizable get through the isolated member: {linearizable:?} after {:?}",
        asked.elapsed()
    );
    assert!(
        linearizable.is_err(),
        "the isolated member answered a linearizable read: {linearizable:?}"
    );
    let out = c.etcdctl(
        isolated,
        &["--command-timeout=3s", "get", "k", "--print-value-only"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "etcdctl get through the isolated member: {:?} {stdout:?} {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "answered {stdout:?}");
    assert!(!stdout.contains("old"), "stale read: {stdout:?}");
    let serializable = c.etcdctl_ok(
        isolated,
        &["get", "k", "--consistency=s", "--print-value-only"],
    );
    assert!(
        serializable == "old\n" || serializable == "new\n",
        "{serializable:?}"
    );

    c.heal(isolated);
    put_eventually(&c, other, "after-heal", "yes").await;
    c.wait_leader().await;
    c.assert_converged().await;
    assert_eq!(
        get_eventually(&c, isolated, "k").await.as_deref(),
        Some("new")
    );
}

/// The cluster id as etcdctl prints it (hexadecimal).
async fn cluster_id_hex(c: &Cluster) -> String {
    let resp = c.member_list(0).await.expect("member list");
    format!("{:x}", resp.header.expect("header").cluster_id)
}

/// The words of etcdctl's output: it pads ids (`%16x`) with spaces.
fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

fn tail_text(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---- MetaStore-only scenarios ------------------------------------------------------------

/// Members trim their in-memory log to 5,000 entries behind what they applied. A member that
/// was a follower while the others wrote, then leads, no longer holds the entries a lagging
/// member needs: it must take and send a fresh snapshot (the newest snapshot file is older than
/// its log in memory, or there is none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_leader_with_a_trimmed_log_catches_a_member_up_by_snapshot() {
    let mut c = Cluster::start(Kind::Memory, 3, &[]).await;
    let leader = c.wait_leader().await;
    let lagging = (leader + 1) % 3;
    put(&c, leader, "before", "kill").await;
    c.assert_converged().await;
    c.kill(lagging);
    put_many(&c, leader, 12_000).await;
    put(&c, leader, "last", "write").await;
    // The third member has applied everything and trimmed its log; the old leader goes away,
    // so it must lead and bring `lagging` up to date.
    c.kill(leader);
    c.restart(lagging).await;
    assert_eq!(
        get_eventually(&c, lagging, "last").await.as_deref(),
        Some("write")
    );
    assert!(
        c.log(lagging)
            .contains("installed snapshot from the leader"),
        "the lagging member caught up without a snapshot"
    );
    c.restart(leader).await;
    c.assert_converged().await;
}

/// Members running different engines apply the same log to the same state: HashKV and the
/// whole-state Hash agree on every member; MoveLeader hands leadership to each member in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_engines_agree_on_hash_and_move_leader_moves_it() {
    use metastore_proto::etcdserverpb::{HashRequest, MoveLeaderRequest};
    let mut c = Cluster::start_mixed(&[Kind::Memory, Kind::Rocks, Kind::Memory], &[]).await;
    for i in 0..60 {
        put(&c, i % 3, &format!("k{i:03}"), &format!("v{i}")).await;
    }
    c.etcdctl_ok(1, &["del", "k01", "--prefix"]);
    let revision = put(&c, 2, "last", "x").await;
    c.etcdctl_ok(0, &["compaction", &(revision - 5).to_string()]);
    put(&c, 0, "after-compaction", "y").await;
    c.assert_converged().await;

    // Hash covers every bucket (membership included): wait until all applied the same index.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut applied = Vec::new();
        for i in 0..3 {
            applied.push(c.status(i).await.unwrap().raft_applied_index);
        }
        if applied.iter().all(|a| *a == applied[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "applied indexes differ: {applied:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut hashes = Vec::new();
    for i in 0..3 {
        let mut m = c.maintenance(i).await;
        hashes.push(m.hash(HashRequest {}).await.unwrap().into_inner().hash);
    }
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");

    // MoveLeader to every other member: it returns once the target leads.
    for round in 0..3 {
        let leader = c.wait_leader().await;
        let target = (leader + 1 + round % 2) % 3;
        let target_id = c.status(target).await.unwrap().header.unwrap().member_id;
        let mut m = c.maintenance(leader).await;
        m.move_leader(MoveLeaderRequest { target_id })
            .await
            .unwrap_or_else(|e| panic!("move-leader to m{}: {e}", target + 1));
        let status = c.status(leader).await.unwrap();
        assert_eq!(
            status.leader, target_id,
            "MoveLeader returned before the target led"
        );
        // Every member confirms the new leader.
        let deadline = Instant::now() + Duration::from_secs(5);
        for i in 0..3 {
            while c.status(i).await.unwrap().leader != target_id {
                assert!(
                    Instant::now() < deadline,
                    "m{} does not see the new leader",
                    i + 1
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        put(&c, target, &format!("after-move-{round}"), "z").await;
    }
    // A follower refuses MoveLeader, as etcd does.
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    let mut m = c.maintenance(follower).await;
    let err = m
        .move_leader(MoveLeaderRequest { target_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.message(), "etcdserver: not leader");
    c.assert_converged().await;
}

/// Leases live on the leader: keep-alives and TimeToLive through a follower reach it, and a
/// leader change neither loses a lease nor expires it early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_through_followers_survive_a_leader_change() {
    let mut c = Cluster::start(Kind::Memory, 3, &[]).await;
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    let granted = c.etcdctl_ok(follower, &["lease", "grant", "30"]);
    let lease = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    c.etcdctl_ok(follower, &["put", "leased", "v", "--lease", &lease]);
    let kept = c.etcdctl_ok(follower, &["lease", "keep-alive", "--once", &lease]);
    assert!(kept.contains("TTL(30)"), "{kept}");
    let ttl = c.etcdctl_ok(follower, &["lease", "timetolive", &lease, "--keys"]);
    assert!(
        ttl.contains("granted with TTL(30s)") && ttl.contains("leased"),
        "{ttl}"
    );

    c.kill(leader);
    let survivor = (leader + 2) % 3;
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    // Still there on every survivor, with most of its TTL left.
    for i in [follower, survivor] {
        let ttl = c.etcdctl_ok(i, &["lease", "timetolive", &lease]);
        let remaining: i64 = ttl
            .split("remaining(")
            .nth(1)
            .and_then(|r| r.split('s').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{ttl}"));
        assert!(
            remaining > 15,
            "the lease lost its TTL across the leader change: {ttl}"
        );
        assert_eq!(get(&c, i, "leased").await.as_deref(), Some("v"));
    }
    c.restart(leader).await;
    c.assert_converged().await;
}

/// etcd's lock recipe across members: the holder's member dies; the lock stays held until the
/// holder's lease expires, then the waiter on another member gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_outlives_its_holders_member_until_the_lease_expires() {
    use etcd_client::{Client, LockOptions};
    let mut c = Cluster::start(Kind::Rocks, 3, &[]).await;
    let leader = c.wait_leader().await;
    let holder_member = (leader + 1) % 3;
    let waiter_member = (leader + 2) % 3;
    let mut holder = Client::connect([c.endpoint(holder_member)], None)
        .await
        .unwrap();
    let mut waiter = Client::connect([c.endpoint(waiter_member)], None)
        .await
        .unwrap();
    const TTL: i64 = 4;
    let holder_lease = holder.lease_grant(TTL, None).await.unwrap().id();
    let waiter_lease = waiter.lease_grant(60, None).await.unwrap().id();
    let held = holder
        .lock("shared", Some(LockOptions::new().with_lease(holder_lease)))
        .await
        .unwrap();
    let held_key = held.key().to_vec();
    // Keep the holder's lease alive through its member until that member dies.
    let (mut keeper, _responses) = holder.lease_keep_alive(holder_lease).await.unwrap();
    let keep = tokio::spawn(async move {
        while keeper.keep_alive().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let wait = tokio::spawn(async move {
        let locked = waiter
            .lock("shared", Some(LockOptions::new().with_lease(waiter_lease)))
            .await
            .unwrap();
        (Instant::now(), locked.key().to_vec())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!wait.is_finished(), "the waiter got a held lock");
    let killed_at = Instant::now();
    c.kill(holder_member);
    let (acquired_at, key) = tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("the waiter never got the lock")
        .unwrap();
    keep.abort();
    assert_ne!(key, held_key);
    // The holder's key went away with its lease, not with its member.
    let held_for = acquired_at - killed_at;
    assert!(
        held_for >= Duration::from_secs(1),
        "the lock was released {held_for:?} after the holder's member died, before its lease \
         could expire"
    );
    let mut kv = c.kv(waiter_member).await;
    let gone = kv
        .range(metastore_proto::etcdserverpb::RangeRequest {
            key: held_key,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.count, 0);
}

/// Rewrites the record of revision 2 (key `k000`) in the RocksDB of a stopped member, behind
/// raft's back.
fn forge_first_write(c: &Cluster, i: usize) {
    use prost::Message as _;
    let db = c.member(i).data_dir.join("member").join("db");
    let backend =
        metastore_storage_rocks::RocksBackend::open(&db, &metastore_state_machine::buckets())
            .unwrap();
    let forged = metastore_proto::mvccpb::KeyValue {
        key: b"k000".to_vec(),
        value: b"forged".to_vec(),
        create_revision: 2,
        mod_revision: 2,
        version: 1,
        lease: 0,
    };
    let mut batch = metastore_storage::WriteBatch::new();
    batch.put(
        metastore_mvcc::KEY_BUCKET,
        metastore_mvcc::Revision::new(2, 0).to_key(false),
        forged.encode_to_vec(),
    );
    metastore_storage::Backend::write(&backend, batch).unwrap();
}

/// kubeadm's `--experimental-initial-corrupt-check=true`: a member whose data differs from its
/// peers' refuses to start, naming the inconsistency; with intact data it starts and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_corrupt_check_refuses_to_start_a_diverged_member() {
    let mut c = Cluster::start(
        Kind::Rocks,
        3,
        &["--experimental-initial-corrupt-check=true"],
    )
    .await;
    for i in 0..20 {
        put(&c, i % 3, &format!("k{i:03}"), "v").await;
    }
    c.assert_converged().await;
    let leader = c.wait_leader().await;
    let victim = (leader + 1) % 3;
    // Intact data: a restart passes the check.
    c.kill(victim);
    c.restart(victim).await;
    assert!(
        c.log(victim).contains("initial corruption check passed"),
        "{}",
        c.log(victim)
    );
    c.assert_converged().await;

    // RocksDB writes skip its own WAL (the raft WAL is the log): a member killed before a flush
    // replays its committed entries at start, which would overwrite the forged value. A
    // defragmentation flushes, so the forged write below stays.
    c.maintenance(victim)
        .await
        .defragment(metastore_proto::etcdserverpb::DefragmentRequest {})
        .await
        .expect("defragment");
    c.kill(victim);
    forge_first_write(&c, victim);
    let status = c
        .restart_expecting_exit(victim, Duration::from_secs(30))
        .await;
    assert!(!status.success(), "{status:?}");
    assert!(
        c.log(victim)
            .contains("found data inconsistency with peers"),
        "{}",
        c.log(victim)
    );
}

/// The leader's periodic corruption check (`--experimental-corrupt-check-time`): a member whose
/// data was altered behind raft's back gets the CORRUPT alarm, and the cluster refuses writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_check_raises_corrupt_for_a_diverged_member() {
    let mut c = Cluster::start(Kind::Rocks, 3, &["--experimental-corrupt-check-time", "1s"]).await;
    for i in 0..20 {
        put(&c, i % 3, &format!("k{i:03}"), "v").await;
    }
    c.assert_converged().await;
    let leader = c.wait_leader().await;
    let victim = (leader + 1) % 3;
    let victim_id = c.status(victim).await.unwrap().header.unwrap().member_id;
    // Healthy: no alarm after a few checks.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let alarms = c.etcdctl_ok(leader, &["alarm", "list"]);
    assert!(alarms.trim().is_empty(), "{alarms}");

    // Rewrite the first revision's record on one member's disk.
    c.kill(victim);
    forge_first_write(&c, victim);
    c.restart(victim).await;

    let expected = format!("memberID:{victim_id} alarm:CORRUPT");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alarms = c.etcdctl_ok(leader, &["alarm", "list"]);
        if alarms.contains(&expected) {
            break;
        }
        assert!(Instant::now() < deadline, "no CORRUPT alarm: {alarms:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let refused = c
        .put(leader, "after", "corruption", CALL)
        .await
        .unwrap_err();
    assert!(refused.contains("etcdserver: corrupt cluster"), "{refused}");
    // The alarm went through raft: every member lists it, also after a restart.
    let bystander = (leader + 2) % 3;
    c.kill(bystander);
    c.restart(bystander).await;
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let alarms = c.etcdctl_ok(i, &["alarm", "list"]);
            if alarms.contains(&expected) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "m{} does not list the alarm: {alarms:?}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A member that does not belong to the cluster cannot join it: one that was never added is
/// refused at start, one bootstrapped with another cluster's token is refused by every peer
/// with `cluster id mismatch`; the cluster is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_another_cluster_are_refused() {
    use std::process::{Command, Stdio};
    let c = Cluster::start(Kind::Memory, 3, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (support::free_port(), support::free_port());
    let own_peer = format!("http://127.0.0.1:{peer}");
    let client_url = format!("http://127.0.0.1:{client}");
    let others = format!("m1={},m2={}", c.peer_url(0), c.peer_url(1));
    let command = |state: &str, token: &str, log: &std::path::Path| {
        let mut cmd = Command::new(support::metastore_bin());
        cmd.args(["--name", "x1", "--data-dir"])
            .arg(dir.path().join(format!("x1-{state}")))
            .args(["--initial-cluster", &format!("{others},x1={own_peer}")])
            .args(["--initial-advertise-peer-urls", &own_peer])
            .args(["--listen-peer-urls", &own_peer])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", token])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        cmd
    };

    // Never added with `member add`: refused at start, with the fix in the message.
    let log = dir.path().join("existing.log");
    let status = command("existing", &c.token, &log).status().unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("add this member first"), "{text}");

    // Bootstrapped as a new cluster with another token, naming our members as its peers.
    let log = dir.path().join("new.log");
    let mut intruder = command("new", "another-cluster", &log).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("cluster id mismatch") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no cluster id mismatch reported:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = intruder.kill();
    let _ = intruder.wait();
    put(&c, 2, "still", "fine").await;
    let members = c.member_list(0).await.unwrap().members;
    assert_eq!(members.len(), 3);
}

/// A learner removed before it was promoted stops too: it never receives the commit of its own
/// removal, so the leader tells it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_learner_stops() {
    let mut c = Cluster::start(Kind::Memory, 3, &[]).await;
    put(&c, 0, "before-add", "x").await;
    let (new, added) = add_learner(&mut c, "m4");
    let id = member_id_in(added.lines().next().expect("member add output"));
    assert_eq!(c.add_member_process("m4").await, new);
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.get(new, "before-add", true, CALL).await != Ok(Some("x".to_string())) {
        assert!(Instant::now() < deadline, "the learner did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    etcdctl_eventually(&c, 0, &["member", "remove", &id]);
    let outcome = c.wait_removed(new, Duration::from_secs(30)).await;
    assert!(matches!(outcome, Removal::Exited(_)), "{outcome:?}");
    assert!(c
        .member(new)
        .data_dir
        .join("member")
        .join("removed")
        .exists());
    c.assert_converged().await;
}

/// A membership change whose member record is over `--max-request-bytes` is refused with etcd's
/// `request is too large`, like any other proposal, and changes nothing.
async fn oversized_member_changes_are_refused(kind: Kind) {
    use metastore_proto::etcdserverpb::cluster_client::ClusterClient;
    use metastore_proto::etcdserverpb::{MemberAddRequest, MemberListRequest, MemberUpdateRequest};
    let server = support::Server::start_with(kind, &["--max-request-bytes", "1024"]).await;
    let mut cluster = ClusterClient::connect(server.endpoint()).await.unwrap();
    let urls: Vec<String> = (0..100)
        .map(|i| format!("http://10.0.{i}.1:2380"))
        .collect();
    let added = cluster
        .member_add(MemberAddRequest {
            peer_ur_ls: urls.clone(),
            is_learner: true,
        })
        .await;
    let e = added.expect_err("an oversized member add was accepted");
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::InvalidArgument,
            "etcdserver: request is too large"
        )
    );
    let members = cluster
        .member_list(MemberListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(members.len(), 1, "{members:?}");
    let e = cluster
        .member_update(MemberUpdateRequest {
            id: members[0].id,
            peer_ur_ls: urls,
        })
        .await
        .expect_err("an oversized member update was accepted");
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::InvalidArgument,
            "etcdserver: request is too large"
        )
    );
}

per_engine!(oversized_member_changes_are_refused);

/// A `Removed` notice on the peer port from anyone but a member of this member's configuration
/// whose committed membership really lacks it is refused: the member keeps serving and starts
/// again (no `member/removed` marker). Before, any peer knowing the cluster and member ids (both
/// in every response header) could make a member stop for good.
async fn forged_removal_notices_are_ignored(kind: Kind) {
    use metastore_proto::etcdserverpb::StatusRequest;
    use metastore_proto::metastorepb::peer_client::PeerClient;
    use metastore_proto::metastorepb::RemovedNotice;
    let mut server = support::Server::start(kind).await;
    let status = metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient::connect(
        server.endpoint(),
    )
    .await
    .unwrap()
    .status(StatusRequest::default())
    .await
    .unwrap()
    .into_inner();
    let header = status.header.unwrap();
    let mut peer = PeerClient::connect(format!("http://127.0.0.1:{}", server.peer_port))
        .await
        .unwrap();
    // Claimed senders: none, an unknown member, the member itself.
    for from in [0, 0x1234_5678, header.member_id] {
        let refused = tokio::time::timeout(
            CALL,
            peer.removed(RemovedNotice {
                cluster_id: header.cluster_id,
                member_id: header.member_id,
                from,
            }),
        )
        .await
        .expect("the removal notice was answered");
        let e = refused.expect_err("a forged removal notice was accepted");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    }
    // Still serving: a write goes through.
    let put = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", server.endpoint()))
        .args(["put", "still", "serving"])
        .output()
        .expect("etcdctl");
    support::assert_success(&put);
    assert!(!server.data_dir.join("member/removed").exists());
    server.restart().await;
    let mut kv = server.kv().await;
    kv.put(PutRequest {
        key: b"still".to_vec(),
        value: b"up".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
}

per_engine!(forged_removal_notices_are_ignored);

/// Each member's (leader, term).
async fn leaders_and_terms(c: &mut Cluster) -> Vec<(u64, u64)> {
    let mut seen = Vec::new();
    for i in 0..c.member_count() {
        let s = c.status(i).await.unwrap();
        seen.push((s.leader, s.raft_term));
    }
    seen
}

/// Issue 22, item 4: no client can make the leader miss its heartbeats. On the leader of three
/// members: 40,000 watch requests on one key in four streams whose answers are never read (the
/// leader creates as many as the streams' flow control lets through; their watchers fall behind
/// and wait for catch-up), the key written 1,000 times under them, and meanwhile one Compact of a
/// 100,000-version history. The leader and term stay the same on every member, and every write
/// is acknowledged. (Before the watch hub's lock was taken off the async runtime's workers, the
/// catch-up thread holding it made both workers wait, peer messages stopped, and the followers
/// elected a new leader.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_and_a_large_compaction_cause_no_leader_change() {
    use metastore_proto::etcdserverpb::request_op::Request as Op;
    use metastore_proto::etcdserverpb::watch_client::WatchClient;
    use metastore_proto::etcdserverpb::watch_request::RequestUnion;
    use metastore_proto::etcdserverpb::{
        CompactionRequest, DeleteRangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
        WatchRequest,
    };
    const STREAMS: usize = 4;
    const PER_STREAM: usize = 10_000;
    const TXNS: usize = 800;
    const OPS: usize = 125;
    const WRITES: usize = 1000;
    let mut c = Cluster::start(Kind::Memory, 3, &[]).await;
    let leader = c.wait_leader().await;
    let before = leaders_and_terms(&mut c).await;

    // A history of TXNS × OPS versions, then all deleted: the Compact below drops all of it.
    let mut kv = c.kv(leader).await;
    for t in 0..TXNS {
        let success = (0..OPS)
            .map(|o| RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: format!("history/{:03}", o).into_bytes(),
                    value: format!("{t}").into_bytes(),
                    ..Default::default()
                })),
            })
            .collect();
        kv.txn(TxnRequest {
            success,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let deleted = kv
        .delete_range(DeleteRangeRequest {
            key: b"history/".to_vec(),
            range_end: b"history0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, OPS as i64);
    let compact_to = deleted.header.unwrap().revision;

    // Watchers whose streams are never read.
    let mut idle = Vec::new();
    for _ in 0..STREAMS {
        let creates = (0..PER_STREAM).map(|_| WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: b"watched".to_vec(),
                ..Default::default()
            })),
        });
        let mut watch = WatchClient::new(c.channel(leader).await.unwrap());
        idle.push(watch.watch(tokio_stream::iter(creates)).await.unwrap());
    }

    let writer = {
        let mut kv = c.kv(leader).await;
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for i in 0..WRITES {
                let started = Instant::now();
                let put = PutRequest {
                    key: b"watched".to_vec(),
                    value: i.to_string().into_bytes(),
                    ..Default::default()
                };
                tokio::time::timeout(CALL, kv.put(put))
                    .await
                    .expect("a write under watchers and a compaction timed out")
                    .unwrap();
                slowest = slowest.max(started.elapsed());
            }
            slowest
        })
    };
    let started = Instant::now();
    kv.compact(CompactionRequest {
        revision: compact_to,
        physical: true,
    })
    .await
    .unwrap();
    let compaction = started.elapsed();
    let slowest = writer.await.unwrap();
    eprintln!(
        "{} watch requests, compaction of {} versions: compact took {compaction:?}, slowest of {WRITES} \
         writes {slowest:?}",
        STREAMS * PER_STREAM,
        TXNS * OPS
    );
    assert_eq!(
        leaders_and_terms(&mut c).await,
        before,
        "(leader, term) of each member"
    );
    drop(idle);
    c.assert_converged().await;
}

per_engine!(a_leader_resumed_after_a_pause_revokes_no_lease_renewed_meanwhile);

/// A lease kept alive through a follower while the leader is stopped (SIGSTOP) for longer than
/// the lease's TTL and an election: the new leader takes the renewals. When the old leader
/// resumes, its lessor still counts the deadlines of before the pause; it must not revoke the
/// lease (etcd 3.5 confirms its leadership before revoking). Found by the robustness suite
/// (memory engine, seed 5).
async fn a_leader_resumed_after_a_pause_revokes_no_lease_renewed_meanwhile(kind: Kind) {
    use metastore_proto::etcdserverpb::lease_client::LeaseClient;
    use metastore_proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest};
    let mut c = Cluster::start(kind, 3, &[]).await;
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    let mut lease = LeaseClient::new(c.channel(follower).await.expect("connect"));
    let id = lease
        .lease_grant(LeaseGrantRequest { ttl: 2, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id;
    let mut kv = c.kv(follower).await;
    kv.put(PutRequest {
        key: b"leased".to_vec(),
        value: b"v".to_vec(),
        lease: id,
        ..Default::default()
    })
    .await
    .expect("put");
    // Keep-alives through the follower every 300 ms (forwarded to whoever leads), until told.
    let keeping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let keeper = {
        let keeping = keeping.clone();
        tokio::spawn(async move {
            let mut renewed = 0;
            while keeping.load(std::sync::atomic::Ordering::SeqCst) {
                let call = lease.lease_keep_alive(tokio_stream::once(LeaseKeepAliveRequest { id }));
                if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(1), call).await {
                    let mut responses = resp.into_inner();
                    if let Ok(Some(Ok(answer))) =
                        tokio::time::timeout(Duration::from_secs(1), responses.message())
                            .await
                            .map(|r| r.transpose())
                    {
                        assert!(answer.ttl > 0, "the lease was gone at a renewal");
                        renewed += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            renewed
        })
    };
    // Longer than the TTL plus an election: another member leads and renews meanwhile.
    c.pause(leader, Duration::from_secs(4)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    keeping.store(false, std::sync::atomic::Ordering::SeqCst);
    let renewed = keeper.await.expect("keeper");
    assert!(renewed > 5, "only {renewed} renewals");
    assert_eq!(
        get_eventually(&c, follower, "leased").await.as_deref(),
        Some("v"),
        "the resumed leader revoked a lease that was renewed meanwhile:\n{}",
        c.log(leader)
    );
}
