//! Lock and Election through the `etcd-client` crate against a real MetaStore process on both
//! engines, the same scenarios against Debian's etcd (so the expectations are etcd's), and a
//! differential script comparing responses and error strings with etcd's.

use crate::support;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    CampaignResponse, Client, EventType, GetOptions, LeaderKey, LeaseGrantOptions,
    LeaseTimeToLiveOptions, LockOptions, LockResponse, ProclaimOptions, ProclaimResponse,
    ResignOptions, ResignResponse, SortOrder, SortTarget,
};
use support::{Kind, Server};
use tokio::sync::mpsc;

/// Bound on every wait for something that must happen (a lock granted, a lease expiring, …).
const PATIENCE: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: still not done after {PATIENCE:?}"))
}

async fn connect(server: &Server) -> Client {
    Client::connect([server.endpoint()], None).await.unwrap()
}

async fn grant(client: &mut Client, ttl_secs: i64) -> i64 {
    client.lease_grant(ttl_secs, None).await.unwrap().id()
}

/// A client per TTL, each with a fresh lease of that TTL: (client, lease id).
async fn leased_clients<const N: usize>(
    server: &Server,
    ttls_secs: [i64; N],
) -> [(Client, i64); N] {
    let mut clients = Vec::new();
    for ttl_secs in ttls_secs {
        let mut client = connect(server).await;
        let lease = grant(&mut client, ttl_secs).await;
        clients.push((client, lease));
    }
    clients
        .try_into()
        .unwrap_or_else(|_| unreachable!("one client per TTL"))
}

/// A leader key as the differential script prints it.
fn leader_line(leader: &LeaderKey) -> String {
    format!(
        "name {} key {} rev {} lease {:x}",
        leader.name_str().unwrap(),
        leader.key_str().unwrap(),
        leader.rev(),
        leader.lease()
    )
}

/// `what: code: message` for a call that must fail.
fn refusal<T: std::fmt::Debug>(what: &str, result: Result<T, etcd_client::Error>) -> String {
    format!("{what}: {}", error_line(result.unwrap_err()))
}

/// `code: message` of a failed call.
fn error_line(err: etcd_client::Error) -> String {
    match err {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => panic!("expected a gRPC status, got {other}"),
    }
}

/// The keys under `prefix`, oldest (lowest create revision) first.
async fn queue(client: &mut Client, prefix: &str) -> Vec<String> {
    let resp = client
        .get(
            prefix,
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend),
            ),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8(kv.key().to_vec()).unwrap())
        .collect()
}

/// Polls until the keys under `prefix` are `expected`.
async fn wait_for_queue(client: &mut Client, prefix: &str, expected: &[String]) {
    within(
        &format!("keys under {prefix} to become {expected:?}"),
        async {
            while queue(client, prefix).await != expected {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
}

/// Takes lock `name` for `lease`, waiting while someone else holds it.
async fn lock(
    client: &mut Client,
    name: &str,
    lease: i64,
) -> Result<LockResponse, etcd_client::Error> {
    client
        .lock(name, Some(LockOptions::new().with_lease(lease)))
        .await
}

/// [`lock`] from a task on a clone of `client`, so the caller can go on and abort the wait.
fn spawn_lock(
    client: &Client,
    name: &str,
    lease: i64,
) -> tokio::task::JoinHandle<Result<LockResponse, etcd_client::Error>> {
    let (mut client, name) = (client.clone(), name.to_string());
    tokio::spawn(async move { lock(&mut client, &name, lease).await })
}

/// Proclaims `value` as `leader`.
async fn proclaim(
    client: &mut Client,
    leader: LeaderKey,
    value: &str,
) -> Result<ProclaimResponse, etcd_client::Error> {
    let leader = ProclaimOptions::new().with_leader(leader);
    client.proclaim(value, Some(leader)).await
}

/// Resigns `leader`.
async fn resign(
    client: &mut Client,
    leader: LeaderKey,
) -> Result<ResignResponse, etcd_client::Error> {
    let leader = ResignOptions::new().with_leader(leader);
    client.resign(Some(leader)).await
}

/// Waits (bounded) for a spawned campaign to win; returns its leader key.
async fn won(
    what: &str,
    campaign: tokio::task::JoinHandle<Result<CampaignResponse, etcd_client::Error>>,
) -> LeaderKey {
    let won = within(what, campaign).await.unwrap().unwrap();
    won.leader().unwrap().clone()
}

/// Keeps `lease` alive until the returned task is aborted.
async fn keep_alive(client: &mut Client, lease: i64) -> tokio::task::JoinHandle<()> {
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.unwrap();
    tokio::spawn(async move {
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            if !matches!(responses.message().await, Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// Tasks on separate connections each take the lock repeatedly and, holding it, increment a
/// counter with a read-modify-write that would lose updates if two of them overlapped.
async fn lock_excludes_contenders(kind: Kind) {
    const TASKS: usize = 4;
    const ROUNDS: usize = 5;
    let server = Server::start(kind).await;
    let mut client = connect(&server).await;
    client.put("counter", "0", None).await.unwrap();
    let holders = Arc::new(AtomicUsize::new(0));
    let most_holders = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let mut client = connect(&server).await;
        let (holders, most_holders) = (holders.clone(), most_holders.clone());
        tasks.push(tokio::spawn(async move {
            let lease = grant(&mut client, 60).await;
            for _ in 0..ROUNDS {
                let locked = lock(&mut client, "counter-lock", lease).await.unwrap();
                assert_eq!(locked.key(), format!("counter-lock/{lease:x}").as_bytes());
                let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                most_holders.fetch_max(now, Ordering::SeqCst);
                let value = client.get("counter", None).await.unwrap().kvs()[0]
                    .value_str()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
                client
                    .put("counter", (value + 1).to_string(), None)
                    .await
                    .unwrap();
                holders.fetch_sub(1, Ordering::SeqCst);
                client.unlock(locked.key()).await.unwrap();
            }
        }));
    }
    for task in tasks {
        within("the contending tasks", task).await.unwrap();
    }
    let counter = client.get("counter", None).await.unwrap();
    assert_eq!(
        counter.kvs()[0].value_str().unwrap(),
        (TASKS * ROUNDS).to_string(),
        "every critical section's increment survives"
    );
    assert_eq!(
        most_holders.load(Ordering::SeqCst),
        1,
        "never two holders at once"
    );
    assert!(
        queue(&mut client, "counter-lock/").await.is_empty(),
        "every lock key is gone after unlocking"
    );
}

per_kind!(lock_excludes_contenders);

/// A holder whose lease is not kept alive loses the lock when the lease expires; the waiter gets
/// it only after the holder's key was deleted.
async fn lock_lease_expiry_releases(kind: Kind) {
    let server = Server::start(kind).await;
    // The holder's lease has the minimum TTL (1.5 election timeouts: 2 s by default); nobody
    // keeps it alive.
    let [(mut holder, short), (waiter, long)] = leased_clients(&server, [2, 60]).await;
    let held = lock(&mut holder, "expiring", short).await.unwrap();
    let held_key = held.key().to_vec();
    let mut deletion = holder.watch(held_key.clone(), None).await.unwrap();

    let acquire = spawn_lock(&waiter, "expiring", long);
    let deleted_at = within(
        "the holder's key to be deleted by the lease expiry",
        async {
            loop {
                let resp = deletion.message().await.unwrap().unwrap();
                if let Some(event) = resp.events().first() {
                    assert_eq!(event.event_type(), EventType::Delete);
                    break event.kv().unwrap().mod_revision();
                }
            }
        },
    )
    .await;
    let acquired = within("the waiter to get the lock", acquire)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(acquired.key(), format!("expiring/{long:x}").as_bytes());
    assert!(
        acquired.header().unwrap().revision() >= deleted_at,
        "the waiter got the lock at revision {} before the holder's key was deleted at {deleted_at}",
        acquired.header().unwrap().revision()
    );
    let ttl = holder
        .lease_time_to_live(short, Some(LeaseTimeToLiveOptions::new()))
        .await
        .unwrap();
    assert_eq!(ttl.ttl(), -1, "the holder's lease expired");
    assert_eq!(
        queue(&mut holder, "expiring/").await,
        [format!("expiring/{long:x}")]
    );
}

per_kind!(lock_lease_expiry_releases);

/// A lock waiter or election candidate that gives up (the client cancels its call) leaves the
/// queue: its key is deleted, so it never gets the lock or leadership later and does not hold up
/// the next one.
async fn cancelled_waiters_leave_the_queue(kind: Kind) {
    let server = Server::start(kind).await;
    let [(mut holder, a), (mut quitter, b), (mut next, c)] = leased_clients(&server, [60; 3]).await;
    let held = lock(&mut holder, "cancel", a).await.unwrap();
    let held_key = format!("cancel/{a:x}");
    assert_eq!(held.key(), held_key.as_bytes());

    let mut queued = spawn_lock(&quitter, "cancel", b);
    let waiting = [held_key, format!("cancel/{b:x}")];
    wait_for_queue(&mut holder, "cancel/", &waiting).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut queued)
            .await
            .is_err(),
        "the lock is held: the second caller must still wait"
    );
    // Dropping the call resets its HTTP/2 stream: the server sees the cancellation.
    queued.abort();
    wait_for_queue(&mut holder, "cancel/", &waiting[..1]).await;

    holder.unlock(held.key()).await.unwrap();
    let locked = within(
        "the next caller to get the lock",
        lock(&mut next, "cancel", c),
    )
    .await
    .unwrap();
    assert_eq!(locked.key(), format!("cancel/{c:x}").as_bytes());

    // The same for a campaign: the cancelled candidate's key is resigned.
    let leading = holder.campaign("ce", "a", a).await.unwrap();
    let queued = tokio::spawn(async move { quitter.campaign("ce", "b", b).await });
    let candidates = [format!("ce/{a:x}"), format!("ce/{b:x}")];
    wait_for_queue(&mut holder, "ce/", &candidates).await;
    queued.abort();
    wait_for_queue(&mut holder, "ce/", &candidates[..1]).await;
    let leader = leading.leader().unwrap().clone();
    resign(&mut holder, leader).await.unwrap();
    let err = holder.leader("ce").await.unwrap_err();
    assert_eq!(error_line(err), "Unknown: election: no leader");
}

per_kind!(cancelled_waiters_leave_the_queue);

/// A waiter whose own lease expires while it waits is told so when the lock frees up: etcd
/// 3.5+'s `mutex: session is expired` (etcd 3.4 answered success, for a key that no longer
/// existed, so there is no etcd run of this one).
async fn lock_waiter_lease_expiry_fails(kind: Kind) {
    let server = Server::start(kind).await;
    let [(mut holder, long), (mut waiter, short)] = leased_clients(&server, [60, 2]).await;
    let keeper = keep_alive(&mut waiter, short).await;
    let held = lock(&mut holder, "lapse", long).await.unwrap();
    let acquire = spawn_lock(&waiter, "lapse", short);
    let holder_key = format!("lapse/{long:x}");
    let waiting = [holder_key.clone(), format!("lapse/{short:x}")];
    wait_for_queue(&mut holder, "lapse/", &waiting).await;
    // Queued: now let the waiter's lease run out, which deletes its key.
    keeper.abort();
    wait_for_queue(&mut holder, "lapse/", &[holder_key]).await;
    holder.unlock(held.key()).await.unwrap();
    let err = within("the waiter's answer", acquire)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error_line(err), "Unknown: mutex: session is expired");
}

per_engine!(lock_waiter_lease_expiry_fails);

/// Observes election `name` from a task (etcd sends the stream's headers only with its first
/// message, so the call itself waits for a leader there) and hands on (key, value) pairs.
fn observe(mut client: Client, name: &str) -> mpsc::UnboundedReceiver<(String, String)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let name = name.to_string();
    tokio::spawn(async move {
        let mut stream = client.observe(name).await.unwrap();
        let mut last_revision = 0;
        while let Some(resp) = stream.message().await.unwrap() {
            let kv = resp.kv().unwrap();
            let revision = resp.header().unwrap().revision();
            assert!(
                revision >= last_revision && revision >= kv.mod_revision(),
                "observations arrive in revision order"
            );
            last_revision = revision;
            let pair = (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            );
            if tx.send(pair).is_err() {
                return;
            }
        }
    });
    rx
}

async fn observed(rx: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    within("the next observed leader value", rx.recv())
        .await
        .expect("observe stream ended")
}

fn pair(key: &str, value: &str) -> (String, String) {
    (key.to_string(), value.to_string())
}

/// Three candidates (and a late fourth): the first wins at once and proclaims; the others queue
/// up; the leader's lease expires and the second takes over; it proclaims and resigns, and the
/// third takes over. Observe reports each leader and each proclaimed value once, in order.
async fn election_three_candidates(kind: Kind) {
    let server = Server::start(kind).await;
    let mut client = connect(&server).await;
    let mut observations = observe(connect(&server).await, "elect");
    let err = client.leader("elect").await.unwrap_err();
    assert_eq!(error_line(err), "Unknown: election: no leader");

    // First candidate: a short lease, kept alive until we let it expire.
    let l1 = grant(&mut client, 2).await;
    let keeper = keep_alive(&mut client, l1).await;
    let k1 = format!("elect/{l1:x}");
    let campaign = client.campaign("elect", "v1", l1).await.unwrap();
    let leader1 = campaign.leader().unwrap().clone();
    assert_eq!(leader1.name(), b"elect");
    assert_eq!(leader1.key(), k1.as_bytes());
    assert_eq!(leader1.lease(), l1);
    let created = client.get(k1.as_str(), None).await.unwrap();
    assert_eq!(leader1.rev(), created.kvs()[0].create_revision());
    assert_eq!(observed(&mut observations).await, pair(&k1, "v1"));
    proclaim(&mut client, leader1.clone(), "v1b").await.unwrap();
    assert_eq!(observed(&mut observations).await, pair(&k1, "v1b"));
    let leader = client.leader("elect").await.unwrap();
    assert_eq!(leader.kv().unwrap().value(), b"v1b");

    // Two more candidates queue up behind it, in this order.
    let mut c2 = connect(&server).await;
    let l2 = grant(&mut c2, 60).await;
    let k2 = format!("elect/{l2:x}");
    let second = tokio::spawn(async move { c2.campaign("elect", "v2", l2).await });
    wait_for_queue(&mut client, "elect/", &[k1.clone(), k2.clone()]).await;
    let mut c3 = connect(&server).await;
    let l3 = grant(&mut c3, 60).await;
    let k3 = format!("elect/{l3:x}");
    let third = tokio::spawn(async move { c3.campaign("elect", "v3", l3).await });
    wait_for_queue(&mut client, "elect/", &[k1.clone(), k2.clone(), k3.clone()]).await;
    assert_eq!(
        client.leader("elect").await.unwrap().kv().unwrap().key(),
        k1.as_bytes(),
        "the oldest candidate leads"
    );

    // The leader's lease runs out: the second candidate takes over.
    keeper.abort();
    let leader2 = won("the second candidate to win", second).await;
    assert_eq!(leader2.key(), k2.as_bytes());
    assert_eq!(leader2.lease(), l2);
    assert_eq!(observed(&mut observations).await, pair(&k2, "v2"));
    assert_eq!(queue(&mut client, "elect/").await, [k2.clone(), k3.clone()]);

    // The former leader's key is gone: it can no longer proclaim.
    let err = proclaim(&mut client, leader1, "stale").await.unwrap_err();
    assert_eq!(error_line(err), "Unknown: election: not leader");

    proclaim(&mut client, leader2.clone(), "v2b").await.unwrap();
    assert_eq!(observed(&mut observations).await, pair(&k2, "v2b"));

    // The second resigns: the third takes over.
    resign(&mut client, leader2.clone()).await.unwrap();
    let leader3 = won("the third candidate to win", third).await;
    assert_eq!(leader3.key(), k3.as_bytes());
    assert_eq!(observed(&mut observations).await, pair(&k3, "v3"));
    let leader = client.leader("elect").await.unwrap();
    assert_eq!(leader.kv().unwrap().key(), k3.as_bytes());
    assert_eq!(leader.kv().unwrap().value(), b"v3");

    // Resigning a leadership that is already gone does nothing and is no error.
    resign(&mut client, leader2).await.unwrap();
    resign(&mut client, leader3).await.unwrap();
    let err = client.leader("elect").await.unwrap_err();
    assert_eq!(error_line(err), "Unknown: election: no leader");

    // A late candidate on the empty election: the next observation is its value, proving that
    // nothing was reported twice in between.
    let l4 = grant(&mut client, 60).await;
    let k4 = format!("elect/{l4:x}");
    client.campaign("elect", "v4", l4).await.unwrap();
    assert_eq!(observed(&mut observations).await, pair(&k4, "v4"));
}

per_kind!(election_three_candidates);

/// One script of Lock and Election calls, success and failure, as comparable lines: headers'
/// revisions, keys (a server-chosen lease id shown as `<lease>`), values and error strings.
async fn script(server: &Server) -> Vec<String> {
    let mut c = connect(server).await;
    let mut out = Vec::new();
    let rev = |h: Option<&etcd_client::ResponseHeader>| h.map_or(0, |h| h.revision());
    let lease = c
        .lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x1234)))
        .await
        .unwrap()
        .id();

    // Lock: the key, a second Lock with the same lease (a no-op), Unlock twice.
    let locked = lock(&mut c, "dl", lease).await.unwrap();
    out.push(format!(
        "lock: {} at {}",
        String::from_utf8_lossy(locked.key()),
        rev(locked.header())
    ));
    let again = lock(&mut c, "dl", lease).await.unwrap();
    out.push(format!(
        "lock again: {} at {}",
        String::from_utf8_lossy(again.key()),
        rev(again.header())
    ));
    let kv = c.get("dl/1234", None).await.unwrap().kvs()[0].clone();
    out.push(format!(
        "lock key: value {:?} lease {:x} create {} version {}",
        kv.value_str().unwrap(),
        kv.lease(),
        kv.create_revision(),
        kv.version()
    ));
    let unlocked = c.unlock(locked.key()).await.unwrap();
    out.push(format!("unlock at {}", rev(unlocked.header())));
    let unlocked = c.unlock(locked.key()).await.unwrap();
    out.push(format!("unlock again at {}", rev(unlocked.header())));
    out.push(refusal("unlock empty key", c.unlock("").await));
    out.push(refusal(
        "lock with unknown lease",
        lock(&mut c, "dl", 0x999).await,
    ));
    // Without a lease the server attaches the key to a fresh 60 s lease.
    let own = c.lock("dl", None).await.unwrap();
    let key = String::from_utf8(own.key().to_vec()).unwrap();
    let own_lease = i64::from_str_radix(key.strip_prefix("dl/").unwrap(), 16).unwrap();
    let ttl = c
        .lease_time_to_live(own_lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    out.push(format!(
        "lock without lease: dl/<lease> at {}, granted ttl {}, keys {:?}",
        rev(own.header()),
        ttl.granted_ttl(),
        ttl.keys()
            .iter()
            .map(|k| String::from_utf8_lossy(k).replace(&format!("{own_lease:x}"), "<lease>"))
            .collect::<Vec<_>>()
    ));
    c.unlock(own.key()).await.unwrap();

    // Election.
    out.push(refusal("leader of empty election", c.leader("de").await));
    let campaign = c.campaign("de", "a", lease).await.unwrap();
    let leader = campaign.leader().unwrap().clone();
    out.push(format!(
        "campaign: {} at {}",
        leader_line(&leader),
        rev(campaign.header())
    ));
    // Campaigning again with the same lease keeps the place and proclaims the new value.
    let again = c.campaign("de", "b", lease).await.unwrap();
    out.push(format!(
        "campaign again: {} at {}",
        leader_line(again.leader().unwrap()),
        rev(again.header())
    ));
    let current = c.leader("de").await.unwrap();
    let kv = current.kv().unwrap();
    out.push(format!(
        "leader: {} = {:?} create {} mod {} version {} lease {:x} at {}",
        kv.key_str().unwrap(),
        kv.value_str().unwrap(),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease(),
        rev(current.header())
    ));
    let proclaimed = proclaim(&mut c, leader.clone(), "c").await.unwrap();
    out.push(format!("proclaim at {}", rev(proclaimed.header())));
    let stale = leader.clone().with_rev(leader.rev() + 100);
    out.push(refusal(
        "proclaim with another rev",
        proclaim(&mut c, stale.clone(), "x").await,
    ));
    out.push(refusal(
        "proclaim without leader",
        c.proclaim("x", None).await,
    ));
    let resigned = resign(&mut c, stale).await.unwrap();
    out.push(format!(
        "resign with another rev at {}; leader still {:?}",
        rev(resigned.header()),
        c.leader("de")
            .await
            .unwrap()
            .kv()
            .unwrap()
            .value_str()
            .unwrap()
    ));
    out.push(refusal("resign without leader", c.resign(None).await));
    let resigned = resign(&mut c, leader).await.unwrap();
    out.push(format!("resign at {}", rev(resigned.header())));
    out.push(refusal("leader after resign", c.leader("de").await));
    out.push(refusal(
        "campaign with unknown lease",
        c.campaign("de", "x", 0x999).await,
    ));
    let fresh = c.campaign("de", "d", 0).await.unwrap();
    let fresh = fresh.leader().unwrap().clone();
    let ttl = c
        .lease_time_to_live(fresh.lease(), None)
        .await
        .unwrap()
        .granted_ttl();
    out.push(format!(
        "campaign without lease: key is de/<lease>: {}, granted ttl {ttl}",
        fresh.key() == format!("de/{:x}", fresh.lease()).as_bytes()
    ));
    let mut observe = c.observe("de").await.unwrap();
    let first = within("the first observation", observe.message())
        .await
        .unwrap()
        .unwrap();
    out.push(format!(
        "observe: {:?} at {}",
        first.kv().unwrap().value_str().unwrap(),
        rev(first.header())
    ));
    out
}

differential!(script);
