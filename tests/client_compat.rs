//! Real clients against a real MetaStore process, on both engines: the third-party `etcd-client`
//! crate and etcd's own `etcdctl`. Also: after a restart, revisions continue where they stopped
//! and history reads still work.

use crate::support;

use std::process::Command;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, GetResponse, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use support::{Kind, Server};

/// Reads `key` as it was at `revision`.
async fn get_at(
    client: &mut Client,
    key: &str,
    revision: i64,
) -> Result<GetResponse, etcd_client::Error> {
    let at = GetOptions::new().with_revision(revision);
    client.get(key, Some(at)).await
}

/// The read failed because its revision was compacted away.
fn assert_compacted(read: Result<GetResponse, etcd_client::Error>) {
    let err = read.unwrap_err();
    assert!(
        err.to_string()
            .contains("etcdserver: mvcc: required revision has been compacted"),
        "{err}"
    );
}

async fn etcd_client_roundtrip(kind: Kind) {
    let mut server = Server::start(kind).await;
    let mut client = Client::connect([server.endpoint()], None)
        .await
        .expect("connect");

    let put = client.put("k1", "v1", None).await.unwrap();
    let first_rev = put.header().unwrap().revision();
    assert_eq!(
        first_rev, 2,
        "an empty store is at revision 1; the first write makes 2"
    );
    let put = client
        .put("k1", "v2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(put.prev_key().unwrap().value(), b"v1");
    client.put("k2", "x", None).await.unwrap();
    client.put("k3", "y", None).await.unwrap();

    let got = client.get("k1", None).await.unwrap();
    let kv = &got.kvs()[0];
    assert_eq!(
        (
            kv.value(),
            kv.version(),
            kv.create_revision(),
            kv.mod_revision()
        ),
        (&b"v2"[..], 2, 2, 3)
    );
    let prefix = client
        .get("k", Some(GetOptions::new().with_prefix().with_limit(2)))
        .await
        .unwrap();
    assert_eq!(prefix.kvs().len(), 2);
    assert_eq!(prefix.count(), 3);
    assert!(prefix.more());
    let old = get_at(&mut client, "k1", 2).await.unwrap();
    assert_eq!(old.kvs()[0].value(), b"v1");

    let txn = Txn::new()
        .when([Compare::value("k1", CompareOp::Equal, "v2")])
        .and_then([TxnOp::put("k4", "from-txn", None), TxnOp::get("k1", None)])
        .or_else([TxnOp::put("k4", "wrong-branch", None)]);
    let resp = client.txn(txn).await.unwrap();
    assert!(resp.succeeded());
    match &resp.op_responses()[1] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"v2"),
        other => panic!("unexpected txn response {other:?}"),
    }

    let del = client
        .delete(
            "k",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(del.deleted(), 4);
    let rev_before_restart = del.header().unwrap().revision();

    client.compact(3, None).await.unwrap();
    assert_compacted(get_at(&mut client, "k1", 2).await);

    // Kill -9 and restart: every acknowledged write is there, revisions continue, history at and
    // above the compaction point is still readable.
    drop(client);
    server.restart().await;
    let mut client = Client::connect([server.endpoint()], None)
        .await
        .expect("reconnect");
    let now = client
        .get("k", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(now.kvs().len(), 0);
    assert_eq!(now.header().unwrap().revision(), rev_before_restart);
    let hist = get_at(&mut client, "k4", rev_before_restart - 1)
        .await
        .unwrap();
    assert_eq!(hist.kvs()[0].value(), b"from-txn");
    assert_compacted(get_at(&mut client, "k1", 2).await);
    let put = client.put("after", "restart", None).await.unwrap();
    assert_eq!(put.header().unwrap().revision(), rev_before_restart + 1);
}

per_engine!(etcd_client_roundtrip);

fn etcdctl(server: &Server, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", server.endpoint()))
        .args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("etcdctl (installed by `cargo xtask test`)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn etcdctl_commands(kind: Kind) {
    let server = Server::start(kind).await;
    // (arguments, the whole output)
    let run_all = |commands: &[(&[&str], &str)]| {
        for (args, expected) in commands {
            assert_eq!(etcdctl(&server, args, None), *expected, "etcdctl {args:?}");
        }
    };
    run_all(&[
        (&["put", "greeting", "hello"], "OK\n"),
        (&["put", "greeting/2", "world"], "OK\n"),
        (&["get", "greeting"], "greeting\nhello\n"),
        (
            &["get", "greeting", "--prefix", "--keys-only"],
            "greeting\n\ngreeting/2\n\n",
        ),
    ]);
    let json = etcdctl(&server, &["get", "greeting", "-w", "json"], None);
    assert!(json.contains("\"revision\":3"), "{json}");
    let txn = etcdctl(
        &server,
        &["txn"],
        Some("value(\"greeting\") = \"hello\"\n\nput greeting bye\n\nput greeting never\n\n"),
    );
    assert_eq!(txn, "SUCCESS\n\nOK\n");
    run_all(&[
        (&["get", "greeting", "--print-value-only"], "bye\n"),
        (&["del", "greeting", "--prefix"], "2\n"),
        (&["compaction", "3"], "compacted revision 3\n"),
        (
            &["get", "greeting", "--rev", "4", "--print-value-only"],
            "bye\n",
        ),
    ]);
}

per_engine!(etcdctl_commands);

/// The standard grpc.health.v1 service answers SERVING for the whole server once it has a leader,
/// and NOT_FOUND for a service name it does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let server = Server::start(Kind::Memory).await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never SERVING, last status {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}
