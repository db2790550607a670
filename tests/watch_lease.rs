//! Watch and Lease through real clients (the `etcd-client` crate and `etcdctl`) against a real
//! MetaStore process, on both engines.

use crate::support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, DeleteOptions, EventType, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions,
    PutOptions, Txn, TxnOp, WatchOptions, WatchResponse, WatchStream,
};
use support::{Kind, Server};

async fn next(stream: &mut WatchStream) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch response within 10s")
        .expect("watch stream healthy")
        .expect("watch stream open")
}

/// Puts `key` = `value`; returns the revision of the put.
async fn put_revision(client: &mut Client, key: &str, value: &str) -> i64 {
    let put = client.put(key, value, None).await.unwrap();
    put.header().unwrap().revision()
}

fn revisions(resp: &WatchResponse) -> Vec<i64> {
    resp.events()
        .iter()
        .map(|e| e.kv().unwrap().mod_revision())
        .collect()
}

async fn watch_with_etcd_client(kind: Kind) {
    let server = Server::start(kind).await;
    let mut client = Client::connect([server.endpoint()], None).await.unwrap();
    client.put("w/a", "1", None).await.unwrap(); // rev 2
    client.put("w/b", "1", None).await.unwrap(); // rev 3
    client.put("other", "1", None).await.unwrap(); // rev 4

    // History from revision 2 with prev_kv, then live events; a txn's events arrive together.
    let mut stream = client
        .watch(
            "w/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(2)
                    .with_prev_key(),
            ),
        )
        .await
        .unwrap();
    let created = next(&mut stream).await;
    assert!(created.created());
    let watch_id = created.watch_id();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(revisions(&next(&mut stream).await));
    }
    assert_eq!(seen, vec![2, 3]);
    client
        .txn(Txn::new().and_then([
            TxnOp::put("w/a", "2", None),
            TxnOp::put("w/c", "1", None),
            TxnOp::put("other", "2", None),
        ]))
        .await
        .unwrap(); // rev 5
    let txn = next(&mut stream).await;
    assert_eq!(txn.watch_id(), watch_id);
    assert_eq!(
        revisions(&txn),
        vec![5, 5],
        "one response for the whole txn"
    );
    assert_eq!(txn.events()[0].prev_kv().unwrap().value(), b"1");
    client.delete("w/b", None).await.unwrap(); // rev 6
    let delete = next(&mut stream).await;
    assert_eq!(delete.events()[0].event_type(), EventType::Delete);
    assert_eq!(delete.events()[0].kv().unwrap().key(), b"w/b");

    // A second watcher on the same stream with a client-chosen id, then a progress request.
    stream
        .watch("other", Some(WatchOptions::new().with_watch_id(42)))
        .await
        .unwrap();
    let second = next(&mut stream).await;
    assert!(second.created());
    assert_eq!(second.watch_id(), 42);
    stream.request_progress().await.unwrap();
    let progress = next(&mut stream).await;
    assert_eq!(progress.watch_id(), -1);
    assert_eq!(progress.header().unwrap().revision(), 6);
    stream.cancel(watch_id).await.unwrap();
    let canceled = next(&mut stream).await;
    assert!(canceled.canceled());
    assert_eq!(canceled.watch_id(), watch_id);

    // A watch from a compacted revision is created, then cancelled with the compact revision.
    client.compact(5, None).await.unwrap();
    let mut old = client
        .watch(
            "w/",
            Some(WatchOptions::new().with_prefix().with_start_revision(3)),
        )
        .await
        .unwrap();
    assert!(next(&mut old).await.created());
    let compacted = next(&mut old).await;
    assert!(compacted.canceled());
    assert_eq!(compacted.compact_revision(), 5);
}

per_kind!(watch_with_etcd_client);

async fn lease_with_etcd_client(kind: Kind) {
    let server = Server::start(kind).await;
    let mut client = Client::connect([server.endpoint()], None).await.unwrap();

    let granted = client.lease_grant(60, None).await.unwrap();
    assert!(granted.id() > 0);
    assert_eq!(granted.ttl(), 60);
    let chosen = client
        .lease_grant(1, Some(LeaseGrantOptions::new().with_id(0x1234)))
        .await
        .unwrap();
    assert_eq!(chosen.id(), 0x1234);
    assert_eq!(chosen.ttl(), 2, "etcd's minimum TTL: 1.5 election timeouts");
    let err = client
        .lease_grant(10, Some(LeaseGrantOptions::new().with_id(0x1234)))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("etcdserver: lease already exists"),
        "{err}"
    );

    let lease = granted.id();
    client
        .put("l/a", "1", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    client
        .put("l/b", "1", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let err = client
        .put("l/c", "1", Some(PutOptions::new().with_lease(999)))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("etcdserver: requested lease not found"),
        "{err}"
    );
    let ttl = client
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 60);
    assert!(ttl.ttl() > 55 && ttl.ttl() <= 60, "{}", ttl.ttl());
    // etcd lists attached keys in Go map order: compare them as a set.
    let mut keys = ttl.keys().to_vec();
    keys.sort();
    assert_eq!(keys, [b"l/a".to_vec(), b"l/b".to_vec()]);
    let unknown = client.lease_time_to_live(777, None).await.unwrap();
    assert_eq!(unknown.ttl(), -1);
    let mut ids: Vec<i64> = client
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    ids.sort();
    let mut expected = vec![lease, 0x1234];
    expected.sort();
    assert_eq!(ids, expected);

    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let renewed = responses.message().await.unwrap().unwrap();
    assert_eq!((renewed.id(), renewed.ttl()), (lease, 60));
    // The server answers TTL 0 for an unknown lease; etcd-client turns that into an error.
    let err = client.lease_keep_alive(555).await.unwrap_err();
    assert!(err.to_string().contains("lease not found"), "{err}");

    // Revoke deletes the attached keys in one revision, seen by watchers as one response.
    let mut stream = client
        .watch("l/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(next(&mut stream).await.created());
    let revoked = client.lease_revoke(lease).await.unwrap();
    let events = next(&mut stream).await;
    assert_eq!(events.events().len(), 2);
    assert!(events
        .events()
        .iter()
        .all(|e| e.event_type() == EventType::Delete
            && e.kv().unwrap().mod_revision() == revoked.header().unwrap().revision()));
    assert_eq!(
        client
            .get("l/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .count(),
        0
    );
    let err = client.lease_revoke(lease).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("etcdserver: requested lease not found"),
        "{err}"
    );
}

per_kind!(lease_with_etcd_client);

/// Polls until `key` is gone; returns how long that took.
async fn wait_gone(client: &mut Client, key: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if client.get(key, None).await.unwrap().count() == 0 {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{key} still there after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lease_expiry_also_across_restart(kind: Kind) {
    let mut server = Server::start(kind).await;
    let mut client = Client::connect([server.endpoint()], None).await.unwrap();
    let lease = client.lease_grant(2, None).await.unwrap().id();
    let granted_at = Instant::now();
    client
        .put("expiring", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    wait_gone(&mut client, "expiring", Duration::from_secs(6)).await;
    let after = granted_at.elapsed();
    // Within a second of the TTL — plus, when the grant is applied before the expiry loop has
    // seen this member become leader, the election-timeout extension every lease gets on
    // promotion (etcd's rule against early expiry after a leader change).
    assert!(
        after >= Duration::from_secs(2) && after < Duration::from_secs(4),
        "expired {after:?} after the grant"
    );
    assert_eq!(
        client.lease_time_to_live(lease, None).await.unwrap().ttl(),
        -1
    );

    // Across a restart: the lease and its key survive, the countdown restarts (never early
    // expiry), and the key goes once the extended TTL has passed.
    let lease = client.lease_grant(3, None).await.unwrap().id();
    client
        .put("survivor", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    server.restart().await;
    let restarted_at = Instant::now();
    let mut client = Client::connect([server.endpoint()], None).await.unwrap();
    let ttl = client
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 3);
    assert_eq!(ttl.keys(), &[b"survivor".to_vec()]);
    wait_gone(&mut client, "survivor", Duration::from_secs(10)).await;
    let after = restarted_at.elapsed();
    assert!(
        after >= Duration::from_secs(3) && after < Duration::from_secs(6),
        "expired {after:?} after the restart"
    );
}

per_engine!(lease_expiry_also_across_restart);

/// 10,000 watchers on one range (10 streams of 1,000) and a burst of writes: every watcher gets
/// every event exactly once, in revision order, however far its stream fell behind.
#[tokio::test]
async fn ten_thousand_watchers_get_every_event_once_in_order() {
    const STREAMS: usize = 10;
    const PER_STREAM: usize = 1000;
    const WRITES: i64 = 200;
    let server = Server::start(Kind::Memory).await;
    let mut client = Client::connect([server.endpoint()], None).await.unwrap();
    let first_rev = put_revision(&mut client, "burst/0", "start").await + 1;

    let mut readers = Vec::new();
    for _ in 0..STREAMS {
        let options = || Some(WatchOptions::new().with_prefix());
        let mut stream = client.watch("burst/", options()).await.unwrap();
        for _ in 1..PER_STREAM {
            stream.watch("burst/", options()).await.unwrap();
        }
        let mut created = 0;
        while created < PER_STREAM {
            if next(&mut stream).await.created() {
                created += 1;
            }
        }
        readers.push(tokio::spawn(async move {
            let mut seen: HashMap<i64, Vec<i64>> = HashMap::new();
            let mut total = 0;
            while total < PER_STREAM * WRITES as usize {
                let resp = next(&mut stream).await;
                total += resp.events().len();
                seen.entry(resp.watch_id())
                    .or_default()
                    .extend(revisions(&resp));
            }
            seen
        }));
    }

    let mut writes = Vec::new();
    for i in 0..WRITES {
        let mut c = client.clone();
        writes.push(tokio::spawn(async move {
            c.put(format!("burst/{}", i % 17), i.to_string(), None)
                .await
                .unwrap();
        }));
    }
    for w in writes {
        w.await.unwrap();
    }
    let expected: Vec<i64> = (first_rev..first_rev + WRITES).collect();
    for reader in readers {
        let seen = tokio::time::timeout(Duration::from_secs(120), reader)
            .await
            .expect("every event delivered within 120s")
            .unwrap();
        assert_eq!(seen.len(), PER_STREAM);
        for (watch_id, revs) in seen {
            assert_eq!(revs, expected, "watcher {watch_id}");
        }
    }
}

fn etcdctl(server: &Server, args: &[&str]) -> Command {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", server.endpoint()))
        .args(args);
    cmd
}

fn etcdctl_ok(server: &Server, args: &[&str]) -> String {
    let out = etcdctl(server, args).output().expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a long-lived etcdctl command until its output satisfies `done` (bounded), then kills it.
fn etcdctl_until(server: &Server, args: &[&str], done: impl Fn(&str) -> bool) -> String {
    let mut child = etcdctl(server, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run etcdctl");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut output = String::new();
    while !done(&output) && Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            output.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    output
}

async fn etcdctl_watch_and_lease(kind: Kind) {
    let server = Server::start(kind).await;
    etcdctl_ok(&server, &["put", "foo/1", "a"]); // rev 2
    etcdctl_ok(&server, &["put", "foo/2", "b"]); // rev 3
    etcdctl_ok(&server, &["put", "foo/1", "c"]); // rev 4
    let out = etcdctl_until(
        &server,
        &["watch", "foo/", "--prefix", "--rev", "2", "--prev-kv"],
        |o| o.ends_with("foo/1\nc\n"),
    );
    assert_eq!(
        out, "PUT\nfoo/1\na\nPUT\nfoo/2\nb\nPUT\nfoo/1\na\nfoo/1\nc\n",
        "history with prev_kv"
    );

    let granted = etcdctl_ok(&server, &["lease", "grant", "100"]);
    // "lease 694d77aa9e38260f granted with TTL(100s)"
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    assert!(granted.ends_with("granted with TTL(100s)\n"), "{granted}");
    etcdctl_ok(&server, &["put", "leased", "v", "--lease", &id]);
    let ttl = etcdctl_ok(&server, &["lease", "timetolive", &id, "--keys"]);
    assert!(
        ttl.starts_with(&format!("lease {id} granted with TTL(100s), remaining(")),
        "{ttl}"
    );
    assert!(ttl.trim_end().ends_with("attached keys([leased])"), "{ttl}");
    let list = etcdctl_ok(&server, &["lease", "list"]);
    assert_eq!(list, format!("found 1 leases\n{id}\n"));
    let kept = etcdctl_ok(&server, &["lease", "keep-alive", "--once", &id]);
    assert_eq!(kept, format!("lease {id} keepalived with TTL(100)\n"));
    let revoked = etcdctl_ok(&server, &["lease", "revoke", &id]);
    assert_eq!(revoked, format!("lease {id} revoked\n"));
    assert_eq!(etcdctl_ok(&server, &["get", "leased"]), "");
    let gone = etcdctl_ok(&server, &["lease", "timetolive", &id]);
    assert_eq!(gone, format!("lease {id} already expired\n"));
    // KeepAlive of an unknown lease answers TTL 0, which etcdctl's client reports as not found.
    let out = etcdctl(&server, &["lease", "keep-alive", "--once", &id])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("etcdserver: requested lease not found"),
        "{text}"
    );
}

per_kind!(etcdctl_watch_and_lease);

/// `etcdctl lock` is clientv3's lock recipe (a lease-bound key, Txn, and a watch on the key ahead
/// of it). Two clients compete; their critical sections never overlap.
async fn etcdctl_lock_mutual_exclusion(kind: Kind) {
    let server = Server::start(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let section = |name: &str| {
        format!(
            "echo start-{name} >> {log}; sleep 0.5; echo end-{name} >> {log}",
            log = log.display()
        )
    };
    let mut children: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            etcdctl(
                &server,
                &["lock", "mutex", "--", "sh", "-c", &section(name)],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run etcdctl lock")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for child in &mut children {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "etcdctl lock failed: {status}");
                break;
            }
            assert!(Instant::now() < deadline, "etcdctl lock did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    for pair in lines.chunks(2) {
        let name = pair[0].strip_prefix("start-").expect("a start line");
        assert_eq!(
            pair[1],
            format!("end-{name}"),
            "sections overlap: {lines:?}"
        );
    }
}

per_kind!(etcdctl_lock_mutual_exclusion);

/// The leader is the candidate whose key was created first.
const LEADER_QUERY: [&str; 8] = [
    "get",
    "election",
    "--prefix",
    "--sort-by=CREATE",
    "--order=ASCEND",
    "--limit=1",
    "--print-value-only",
    "--consistency=l",
];

/// `etcdctl elect`: the first candidate leads, the second waits until the first resigns
/// (SIGINT makes etcdctl resign and revoke its session lease).
async fn etcdctl_elect_one_leader(kind: Kind) {
    let server = Server::start(kind).await;
    let spawn = |value: &str| {
        let mut child = etcdctl(&server, &["elect", "election", value])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run etcdctl elect");
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 1024];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0
                    || tx
                        .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                        .is_err()
                {
                    break;
                }
            }
        });
        (child, rx)
    };
    let wait_for = |rx: &std::sync::mpsc::Receiver<String>, text: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut output = String::new();
        while !output.contains(text) {
            assert!(Instant::now() < deadline, "no {text:?} in {output:?}");
            if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
                output.push_str(&chunk);
            }
        }
    };
    let (mut first, first_out) = spawn("alpha");
    wait_for(&first_out, "alpha");
    let (mut second, second_out) = spawn("beta");
    assert!(
        second_out
            .recv_timeout(Duration::from_millis(1500))
            .is_err(),
        "the second candidate must wait while the first leads"
    );
    let leader = etcdctl_ok(&server, &LEADER_QUERY);
    assert_eq!(leader, "alpha\n");
    let interrupted = Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let _ = first.wait();
    wait_for(&second_out, "beta");
    let leader = etcdctl_ok(&server, &LEADER_QUERY);
    assert_eq!(leader, "beta\n");
    let _ = second.kill();
    let _ = second.wait();
}

per_kind!(etcdctl_elect_one_leader);

/// `--experimental-watch-progress-notify-interval`: a watcher created with progress_notify gets
/// empty responses carrying the current revision.
#[tokio::test]
async fn periodic_progress_notify() {
    let server = Server::start_with(
        Kind::Memory,
        &["--experimental-watch-progress-notify-interval", "300ms"],
    )
    .await;
    let mut client = Client::connect([server.endpoint()], None).await.unwrap();
    let rev = put_revision(&mut client, "p", "1").await;
    let mut stream = client
        .watch("q", Some(WatchOptions::new().with_progress_notify()))
        .await
        .unwrap();
    assert!(next(&mut stream).await.created());
    for _ in 0..2 {
        let progress = next(&mut stream).await;
        assert!(progress.events().is_empty() && !progress.canceled());
        assert_eq!(progress.header().unwrap().revision(), rev);
    }
}

/// A watcher that asks for fragments gets a large revision split into responses no larger than
/// `--max-request-bytes`, all but the last marked `fragment`; one that does not gets it whole.
/// (etcd-client does not expose `fragment`, so this uses the generated gRPC client.)
#[tokio::test]
async fn large_revisions_are_fragmented_on_request() {
    use metastore_proto::etcdserverpb::watch_client::WatchClient;
    use metastore_proto::etcdserverpb::watch_request::RequestUnion;
    use metastore_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};

    let server = Server::start_with(Kind::Rocks, &["--max-request-bytes", "4096"]).await;
    let mut client = Client::connect([server.endpoint()], None).await.unwrap();
    for i in 0..30 {
        client
            .put(format!("f/{i:02}"), vec![b'x'; 1000], None)
            .await
            .unwrap();
    }
    let mut watch = WatchClient::connect(server.endpoint()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for (watch_id, fragment) in [(1, false), (2, true)] {
        let create = WatchCreateRequest {
            key: b"f/".to_vec(),
            range_end: b"f0".to_vec(),
            watch_id,
            fragment,
            prev_kv: true,
            ..Default::default()
        };
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(create)),
        })
        .await
        .unwrap();
    }
    let mut responses = watch
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    macro_rules! recv {
        () => {
            tokio::time::timeout(Duration::from_secs(10), responses.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
        };
    }
    assert!(recv!().created);
    assert!(recv!().created);
    // One revision larger than a request may be: deleting 30 keys whose previous values
    // (sent as prev_kv) are 1 KB each.
    client
        .delete("f/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();

    let mut whole = 0;
    let mut fragments: Vec<(usize, bool)> = Vec::new();
    while whole == 0 || fragments.last().is_none_or(|f| f.1) {
        let resp = recv!();
        assert!(!resp.events.is_empty());
        if resp.watch_id == 1 {
            assert_eq!(resp.events.len(), 30);
            whole += 1;
        } else {
            // Each event is about 1 KB: at most 4 fit in 4096 bytes.
            assert!(
                resp.events.len() <= 4,
                "{} events in a fragment",
                resp.events.len()
            );
            fragments.push((resp.events.len(), resp.fragment));
        }
    }
    assert_eq!(whole, 1);
    assert!(
        fragments.len() > 1,
        "split into {} responses",
        fragments.len()
    );
    assert_eq!(fragments.iter().map(|f| f.0).sum::<usize>(), 30);
    assert!(fragments[..fragments.len() - 1].iter().all(|f| f.1));
}
