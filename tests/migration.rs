//! The live migration of docs/migration.md: `etcdctl make-mirror` (etcdctl 3.4) copies a running
//! etcd into MetaStore, and MetaStore back into etcd, while a client keeps writing to the
//! source; once a marker key written last has reached the destination, every key and value
//! must agree on both sides (puts, overwrites, deletes, ranges deleted, transactions, writes
//! after a compaction of the source).

use crate::support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Permission, PutOptions,
    Txn, TxnOp,
};
use support::cluster::Cluster;
use support::{KillOnDrop, Kind, Server};

/// How long the destination may take to catch up with the source; generous for a loaded
/// machine (the test waits for an outcome, it does not time anything).
const CATCH_UP: Duration = Duration::from_secs(120);

/// Keys written before the mirror starts: more than one page of make-mirror's initial copy
/// (it reads 1,000 keys per Range).
const PRELOADED: usize = 1500;

/// The destination's flags docs/migration.md asks for: a transaction as large as the most keys
/// one write of the source changes (make-mirror applies each source revision as one
/// transaction, so a range deleted is one operation per key).
const DEST_FLAGS: &[&str] = &["--max-txn-ops", "1024"];

async fn client(endpoint: &str) -> Client {
    Client::connect([endpoint], None).await.expect("connect")
}

/// A running `etcdctl make-mirror` from the `source` endpoints into the `dest` endpoint (killed
/// when dropped), its output in a file shown when a test fails.
struct Mirror {
    process: KillOnDrop,
    output: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mirror {
    fn start(source: &str, dest: &str, extra: &[&str]) -> Mirror {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("make-mirror.out");
        let file = std::fs::File::create(&output).unwrap();
        let child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={source}"))
            .arg("make-mirror")
            .args(extra)
            .arg(dest)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("etcdctl (installed by `cargo xtask test`)");
        Mirror {
            process: KillOnDrop(vec![child]),
            output,
            _dir: dir,
        }
    }

    /// Panics, with what make-mirror printed, if it has exited (it stops at the first error a
    /// destination answers).
    fn assert_running(&mut self) {
        let exited = self.process.0[0].try_wait().unwrap();
        assert!(
            exited.is_none(),
            "make-mirror exited ({exited:?}): {}",
            std::fs::read_to_string(&self.output).unwrap_or_default()
        );
    }
}

/// Every key and its value at `endpoint`.
async fn dump(endpoint: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let resp = client(endpoint)
        .await
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .expect("range over every key");
    resp.kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect()
}

/// Polls `dest` until `key` holds `value` there (make-mirror applies the source's revisions in
/// order, so every earlier write has arrived too), failing if make-mirror exits or
/// [`CATCH_UP`] passes.
async fn wait_for(dest: &str, mirror: &mut Mirror, key: &str, value: &str) {
    let mut c = client(dest).await;
    let deadline = Instant::now() + CATCH_UP;
    loop {
        mirror.assert_running();
        let got = c.get(key, None).await.expect("get on the destination");
        if got.kvs().first().map(|kv| kv.value()) == Some(value.as_bytes()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key}={value} did not reach the destination in {CATCH_UP:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `dest` holds exactly the pairs `expected` holds, listing the differences otherwise.
fn assert_same_pairs(expected: &BTreeMap<Vec<u8>, Vec<u8>>, got: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let show = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
    let missing: Vec<String> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, _)| show(k))
        .collect();
    let extra: Vec<String> = got
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .map(|k| show(k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "destination differs from the source ({} against {} keys): missing or different {missing:?}, \
         not in the source {extra:?}",
        got.len(),
        expected.len()
    );
}

fn pre(i: usize) -> String {
    format!("pre/{i:04}")
}

/// Mirrors `source` into `dest` under a write load and checks both hold the same keys and
/// values, in three steps: the initial copy, a concurrent load, writes after a compaction.
async fn mirror_under_load(source: &str, dest: &str) {
    let mut src = client(source).await;
    for i in 0..PRELOADED {
        src.put(pre(i), format!("initial {i}"), None).await.unwrap();
    }
    // A key under a lease: make-mirror copies the key, not the lease (docs/migration.md).
    let lease = src.lease_grant(600, None).await.unwrap().id();
    let leased = PutOptions::new().with_lease(lease);
    src.put("leased", "l", Some(leased)).await.unwrap();

    let mut mirror = Mirror::start(source, dest, &[]);
    // The initial copy: everything written before the mirror started.
    wait_for(dest, &mut mirror, &pre(PRELOADED - 1), "initial 1499").await;
    wait_for(dest, &mut mirror, "leased", "l").await;
    let copied = dump(dest).await;
    assert_eq!(copied.len(), PRELOADED + 1, "the initial copy");

    // A load from two clients at once while the mirror runs: new keys, overwrites, single
    // deletes, a range deleted, and transactions (both branches).
    let mut writer = src.clone();
    let puts = tokio::spawn(async move {
        for i in 0..300 {
            writer
                .put(format!("live/{i:03}"), format!("v{i}"), None)
                .await
                .unwrap();
            if i % 3 == 0 {
                writer
                    .put(pre(i), format!("overwritten {i}"), None)
                    .await
                    .unwrap();
            }
        }
    });
    let mut deleter = src.clone();
    let deletes = tokio::spawn(async move {
        for i in (0..PRELOADED).step_by(7) {
            deleter.delete(pre(i), None).await.unwrap();
        }
        // About 250 keys in one revision, which make-mirror applies as one transaction of as
        // many deletes: beyond the default --max-txn-ops of 128, hence the destination's flag.
        let range = DeleteOptions::new().with_range(pre(800));
        let deleted = deleter.delete(pre(500), Some(range)).await.unwrap();
        assert!(deleted.deleted() > 128, "{}", deleted.deleted());
        let taken = Txn::new()
            .when([Compare::value(pre(1401), CompareOp::Equal, "initial 1401")])
            .and_then([
                TxnOp::put("txn/a", "then", None),
                TxnOp::put(pre(1402), "changed by a txn", None),
                TxnOp::delete(pre(1403), None),
            ])
            .or_else([TxnOp::put("txn/a", "else", None)]);
        assert!(deleter.txn(taken).await.unwrap().succeeded());
        let not_taken = Txn::new()
            .when([Compare::value(
                pre(1401),
                CompareOp::Equal,
                "something else",
            )])
            .and_then([TxnOp::put("txn/b", "then", None)])
            .or_else([
                TxnOp::put("txn/b", "else", None),
                TxnOp::delete(pre(1404), None),
            ]);
        assert!(!deleter.txn(not_taken).await.unwrap().succeeded());
    });
    puts.await.unwrap();
    deletes.await.unwrap();
    src.put("migration/marker", "1", None).await.unwrap();
    wait_for(dest, &mut mirror, "migration/marker", "1").await;
    let expected = dump(source).await;
    let got = dump(dest).await;
    assert_same_pairs(&expected, &got);
    // The deletes were mirrored: these keys were copied at first, and are gone (none of them
    // is overwritten by the other client).
    for key in [pre(1400), pre(600), pre(1403), pre(1404)] {
        assert!(copied.contains_key(key.as_bytes()), "{key} copied at first");
        assert!(!got.contains_key(key.as_bytes()), "{key} deleted");
    }
    assert_eq!(
        got.get(b"txn/b".as_slice()).map(Vec::as_slice),
        Some(b"else".as_slice())
    );

    // A compaction of the source (as --auto-compaction does) leaves the mirror's watch alone;
    // the writes after it arrive too.
    let revision = src
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    src.compact(revision, None).await.unwrap();
    for i in 0..50 {
        src.put(format!("after/{i:02}"), "c", None).await.unwrap();
    }
    let first_hundred = DeleteOptions::new().with_range("live/100");
    src.delete("live/000", Some(first_hundred)).await.unwrap();
    src.put("migration/marker", "2", None).await.unwrap();
    wait_for(dest, &mut mirror, "migration/marker", "2").await;
    assert_same_pairs(&dump(source).await, &dump(dest).await);
    mirror.assert_running();

    // What make-mirror does not carry: the lease (the copy is a plain key).
    let at_dest = client(dest).await.get("leased", None).await.unwrap();
    assert_eq!(at_dest.kvs()[0].lease(), 0, "the copy has no lease");
}

/// etcd 3.4 into MetaStore (`kind`), the way in of docs/migration.md.
async fn make_mirror_from_etcd_into_metastore(kind: Kind) {
    let etcd = Server::start(Kind::Etcd).await;
    let metastore = Server::start_with(kind, DEST_FLAGS).await;
    mirror_under_load(&etcd.endpoint(), &metastore.endpoint()).await;
}

/// MetaStore (`kind`) into etcd 3.4, the way back of docs/migration.md.
async fn make_mirror_from_metastore_into_etcd(kind: Kind) {
    let metastore = Server::start(kind).await;
    let etcd = Server::start_with(Kind::Etcd, DEST_FLAGS).await;
    mirror_under_load(&metastore.endpoint(), &etcd.endpoint()).await;
}

/// etcd 3.4 into a 3-member MetaStore cluster (members on both engines) through a follower, the
/// one destination address make-mirror takes: the follower forwards the mirrored writes, and
/// every member ends with the same keys and HashKV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_mirror_into_a_follower_of_a_three_member_cluster() {
    let etcd = Server::start(Kind::Etcd).await;
    let engines = [Kind::Memory, Kind::Rocks, Kind::Memory];
    let mut cluster = Cluster::start_mixed(&engines, DEST_FLAGS).await;
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % engines.len();
    mirror_under_load(&etcd.endpoint(), &cluster.endpoint(follower)).await;
    cluster.assert_converged().await;
    let expected = dump(&etcd.endpoint()).await;
    for i in 0..engines.len() {
        assert_same_pairs(&expected, &dump(&cluster.endpoint(i)).await);
    }
}

per_engine!(
    make_mirror_from_etcd_into_metastore,
    make_mirror_from_metastore_into_etcd
);

/// `--prefix` and `--dest-prefix`: only the keys under the prefix are mirrored (from MetaStore's
/// watch of a key range), renamed at the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_mirror_of_a_prefix_into_another_prefix() {
    let metastore = Server::start(Kind::Memory).await;
    let etcd = Server::start(Kind::Etcd).await;
    let (metastore, etcd) = (metastore.endpoint(), etcd.endpoint());
    let mut src = client(&metastore).await;
    src.put("app/a", "1", None).await.unwrap();
    src.put("other/a", "1", None).await.unwrap();
    let mut mirror = Mirror::start(&metastore, &etcd, &["--prefix=app/", "--dest-prefix=copy/"]);
    wait_for(&etcd, &mut mirror, "copy/a", "1").await;
    src.put("app/b", "2", None).await.unwrap();
    src.put("other/b", "2", None).await.unwrap();
    src.delete("app/a", None).await.unwrap();
    src.put("app/marker", "done", None).await.unwrap();
    wait_for(&etcd, &mut mirror, "copy/marker", "done").await;
    let got: Vec<(String, String)> = dump(&etcd)
        .await
        .into_iter()
        .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
        .collect();
    let want = [("copy/b", "2"), ("copy/marker", "done")];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(got, want);
}

/// make-mirror from a source with auth on (`--user`), as etcd 3.4 and MetaStore (`kind`) answer
/// it: a user who may read only the mirrored prefix is refused (make-mirror first reads the key
/// `foo` to learn the revision), root mirrors.
async fn make_mirror_from_a_source_with_auth_on(kind: Kind) {
    let source = Server::start(kind).await;
    let dest = Server::start(Kind::Etcd).await;
    let (source, dest) = (source.endpoint(), dest.endpoint());
    let c = client(&source).await;
    let mut auth = c.auth_client();
    auth.user_add("root", "rootpw", None).await.unwrap();
    auth.role_add("root").await.unwrap();
    auth.user_grant_role("root", "root").await.unwrap();
    auth.role_add("app-reader").await.unwrap();
    let app = Permission::read("app/").with_prefix();
    auth.role_grant_permission("app-reader", app).await.unwrap();
    auth.user_add("alice", "alicepw", None).await.unwrap();
    auth.user_grant_role("alice", "app-reader").await.unwrap();
    c.kv_client().put("app/a", "1", None).await.unwrap();
    auth.auth_enable().await.unwrap();

    let mut refused = Mirror::start(&source, &dest, &["--user=alice:alicepw", "--prefix=app/"]);
    let deadline = Instant::now() + CATCH_UP;
    let status = loop {
        if let Some(status) = refused.process.0[0].try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "make-mirror as alice never stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let output = std::fs::read_to_string(&refused.output).unwrap();
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("Error: etcdserver: permission denied"),
        "{output}"
    );

    let mut mirror = Mirror::start(&source, &dest, &["--user=root:rootpw", "--prefix=app/"]);
    wait_for(&dest, &mut mirror, "app/a", "1").await;
    let options = ConnectOptions::new().with_user("root", "rootpw");
    let mut root = Client::connect([source.as_str()], Some(options))
        .await
        .unwrap();
    root.put("app/b", "2", None).await.unwrap();
    root.delete("app/a", None).await.unwrap();
    root.put("other", "not mirrored", None).await.unwrap();
    root.put("app/marker", "done", None).await.unwrap();
    wait_for(&dest, &mut mirror, "app/marker", "done").await;
    let got: Vec<Vec<u8>> = dump(&dest).await.into_keys().collect();
    assert_eq!(got, [b"app/b".to_vec(), b"app/marker".to_vec()]);
}

per_kind!(make_mirror_from_a_source_with_auth_on);
