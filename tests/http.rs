//! etcd's HTTP endpoints beside gRPC: `/health`, `/livez`, `/readyz`, `/version` and `/metrics` on
//! the client URLs (plain, TLS and unix sockets, HTTP/1.1 on the same port as gRPC) and on
//! `--listen-metrics-urls`, with the answers etcd 3.5 gives; metrics that move with what the
//! server does; the exposition checked by Prometheus' own `promtool` when it is installed.

use crate::support;

use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::alarm_request::AlarmAction;
use metastore_proto::etcdserverpb::lease_client::LeaseClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{
    request_op, AlarmRequest, AlarmType, CompactionRequest, LeaseGrantRequest,
    LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use support::cluster::{Cluster, Launch};
use support::{free_port, Kind, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::Code;

/// One HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `method path` over HTTP/1.1 on `io` (the connection closed after the answer).
async fn request<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, method: &str, path: &str) -> Reply {
    let text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    io.write_all(text.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify; what arrived is the answer.
    let _ = io.read_to_end(&mut raw).await;
    let raw = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

async fn get(port: u16, path: &str) -> Reply {
    request(tcp(port).await, "GET", path).await
}

async fn tcp(port: u16) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect")
}

/// The value of the series `name{labels…}` in a Prometheus text exposition: the line of that
/// name whose labels include every one of `labels` (`key="value"`).
fn sample(exposition: &str, name: &str, labels: &[&str]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            series_name == name && labels.iter().all(|l| series_labels.contains(l))
        })
        .map(|(_, value)| value.parse().expect("a number"))
}

fn value(exposition: &str, name: &str, labels: &[&str]) -> f64 {
    sample(exposition, name, labels)
        .unwrap_or_else(|| panic!("no {name}{labels:?} in the exposition:\n{exposition}"))
}

async fn metrics(port: u16) -> String {
    let reply = get(port, "/metrics").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{reply:?}"
    );
    reply.body
}

const HEALTHY: &str = r#"{"health":"true","reason":""}"#;

/// Status and body of an answer, to compare in one assertion.
fn answer(reply: &Reply) -> (u16, &str) {
    (reply.status, reply.body.as_str())
}

/// `GET path`: status and body.
async fn probe(port: u16, path: &str) -> (u16, String) {
    let reply = get(port, path).await;
    (reply.status, reply.body)
}

/// Activates (or deactivates) `alarm` for the server's own member through the Alarm RPC.
async fn set_alarm(server: &Server, alarm: AlarmType, action: AlarmAction) {
    let mut maint = MaintenanceClient::connect(server.endpoint()).await.unwrap();
    let status = maint
        .status(metastore_proto::etcdserverpb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    maint
        .alarm(AlarmRequest {
            action: action as i32,
            member_id: status.header.unwrap().member_id,
            alarm: alarm as i32,
        })
        .await
        .unwrap();
}

async fn probes_answer_as_etcd(kind: Kind) {
    let server = Server::start(kind).await;
    let port = server.client_port;

    let health = get(port, "/health").await;
    assert_eq!(answer(&health), (200, HEALTHY));
    let serializable = get(port, "/health?serializable=true").await;
    assert_eq!(answer(&serializable), (200, HEALTHY));

    // The same answers etcd gives for /version's shape and for a path it does not serve.
    let version = get(port, "/version").await;
    assert_eq!(version.status, 200);
    assert_eq!(version.header("content-type"), Some("application/json"));
    let fields = support::cluster::Json::parse(&version.body);
    let server_version = fields.get("etcdserver").and_then(|v| v.as_str()).unwrap();
    let cluster_version = fields.get("etcdcluster").and_then(|v| v.as_str()).unwrap();
    assert!(server_version.starts_with("3."), "{version:?}");
    assert!(cluster_version.ends_with(".0"), "{version:?}");
    assert!(version.body.starts_with("{\"etcdserver\":"), "{version:?}");
    for path in ["/nope", "/metrics/x", "/v2/keys", "/health/x"] {
        let missing = get(port, path).await;
        assert_eq!(answer(&missing), (404, "404 page not found\n"), "{path}");
    }
    let post = request(tcp(port).await, "POST", "/health").await;
    assert_eq!((post.status, post.header("allow")), (405, Some("GET")));

    // etcd 3.5's check lists.
    let livez = get(port, "/livez").await;
    assert_eq!(answer(&livez), (200, "ok\n"));
    let verbose = get(port, "/readyz?verbose").await;
    assert_eq!(
        answer(&verbose),
        (200, "[+]data_corruption ok\n[+]serializable_read ok\nok\n")
    );
    let excluded = get(port, "/readyz?verbose&exclude=data_corruption").await;
    assert_eq!(excluded.body, "[+]serializable_read ok\nok\n");
    let one = get(port, "/livez/serializable_read?verbose").await;
    assert_eq!(one.body, "[+]serializable_read ok\nok\n");

    // gRPC still answers on the same port.
    let mut kv = server.kv().await;
    kv.range(RangeRequest {
        key: b"k".to_vec(),
        ..Default::default()
    })
    .await
    .expect("gRPC beside HTTP/1.1");
}

per_engine!(probes_answer_as_etcd);

/// Real etcd answers /health and /version on its client port as MetaStore does (3.4 has no
/// `reason` field yet, and no /livez or /readyz).
#[tokio::test]
async fn etcd_answers_health_and_version_alike() {
    let etcd = Server::start(Kind::Etcd).await;
    let health = get(etcd.client_port, "/health").await;
    assert_eq!(answer(&health), (200, r#"{"health":"true"}"#));
    let version = get(etcd.client_port, "/version").await;
    let fields = support::cluster::Json::parse(&version.body);
    assert!(fields.get("etcdserver").is_some() && fields.get("etcdcluster").is_some());
    let missing = get(etcd.client_port, "/nope").await;
    assert_eq!(answer(&missing), (404, "404 page not found\n"));
}

#[tokio::test]
async fn probes_over_tls_and_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::Ca::new(dir.path(), "client");
    let leaf = ca.leaf(dir.path(), "server", "server");
    let tls_port = free_port();
    let socket = dir.path().join("metastore.sock");
    let tls_socket = dir.path().join("metastore-tls.sock");
    let urls = format!(
        "http://127.0.0.1:{},https://127.0.0.1:{tls_port},unix://{},unixs://{}",
        free_port(),
        socket.display(),
        tls_socket.display()
    );
    let _server = Server::start_with(
        Kind::Rocks,
        &[
            "--listen-client-urls",
            &urls,
            "--cert-file",
            leaf.cert.to_str().unwrap(),
            "--key-file",
            leaf.key.to_str().unwrap(),
        ],
    )
    .await;

    // A client that asks for HTTP/1.1 by ALPN (curl --http1.1, Prometheus' scraper) gets it.
    let (connector, name) = ca.connector(b"http/1.1");

    let tls = connector
        .connect(name.clone(), tcp(tls_port).await)
        .await
        .expect("TLS handshake");
    let reply = request(tls, "GET", "/health").await;
    assert_eq!(answer(&reply), (200, HEALTHY), "https");

    let unix = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let reply = request(unix, "GET", "/health").await;
    assert_eq!(answer(&reply), (200, HEALTHY), "unix");

    let unixs = tokio::net::UnixStream::connect(&tls_socket).await.unwrap();
    let tls = connector.connect(name, unixs).await.expect("TLS handshake");
    let reply = request(tls, "GET", "/readyz").await;
    assert_eq!(answer(&reply), (200, "ok\n"), "unixs");
}

/// An alarm makes /health fail with etcd's reason, unless excluded; CORRUPT fails /readyz.
#[tokio::test]
async fn alarms_fail_health_with_etcds_reasons() {
    let server = Server::start(Kind::Memory).await;
    let port = server.client_port;
    set_alarm(&server, AlarmType::Nospace, AlarmAction::Activate).await;

    let unhealthy = |reason: &str| {
        (
            503,
            format!("{{\"health\":\"false\",\"reason\":\"{reason}\"}}\n"),
        )
    };
    assert_eq!(probe(port, "/health").await, unhealthy("ALARM NOSPACE"));
    assert_eq!(
        probe(port, "/health?exclude=NOSPACE").await,
        (200, HEALTHY.to_string())
    );
    // /readyz looks at CORRUPT only.
    assert_eq!(get(port, "/readyz").await.status, 200);

    set_alarm(&server, AlarmType::Corrupt, AlarmAction::Activate).await;
    assert_eq!(
        probe(port, "/health?exclude=NOSPACE").await,
        unhealthy("ALARM CORRUPT")
    );
    let both = get(port, "/health?exclude=NOSPACE&exclude=CORRUPT").await;
    assert_eq!(both.status, 200);
    let readyz = get(port, "/readyz").await;
    assert_eq!(
        answer(&readyz),
        (
            503,
            "[-]data_corruption failed: alarm activated: CORRUPT\n[+]serializable_read ok\n\n"
        )
    );
    assert_eq!(
        get(port, "/readyz?exclude=data_corruption").await.status,
        200
    );
    assert_eq!(get(port, "/livez").await.status, 200);

    set_alarm(&server, AlarmType::Corrupt, AlarmAction::Deactivate).await;
    set_alarm(&server, AlarmType::Nospace, AlarmAction::Deactivate).await;
    assert_eq!(get(port, "/health").await.body, HEALTHY);
}

fn put(key: &str) -> PutRequest {
    PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    }
}

/// The metrics move with what the server does: writes are committed and applied proposals and
/// WAL fsyncs, gRPC calls are counted by method and code.
#[tokio::test]
async fn metrics_follow_what_the_server_does() {
    let server = Server::start(Kind::Rocks).await;
    let port = server.client_port;
    let mut kv = server.kv().await;
    let before = metrics(port).await;

    const WRITES: u64 = 20;
    for i in 0..WRITES {
        kv.put(put(&format!("k{i}"))).await.unwrap();
    }
    const READS: u64 = 7;
    for _ in 0..READS {
        kv.range(RangeRequest {
            key: b"k1".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let refused = kv.range(RangeRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let after = metrics(port).await;

    let grew =
        |name: &str, labels: &[&str]| value(&after, name, labels) - value(&before, name, labels);
    assert!(grew("etcd_server_proposals_committed_total", &[]) >= WRITES as f64);
    assert!(grew("etcd_server_proposals_applied_total", &[]) >= WRITES as f64);
    assert_eq!(value(&after, "etcd_server_proposals_pending", &[]), 0.0);
    // Every write waits for its own fsync or shares one: at least one more, at most one each.
    let fsyncs = grew("etcd_disk_wal_fsync_duration_seconds_count", &[]);
    assert!((1.0..=WRITES as f64 + 2.0).contains(&fsyncs), "{fsyncs}");
    assert!(grew("etcd_disk_backend_commit_duration_seconds_count", &[]) >= WRITES as f64);
    let range = [
        "grpc_type=\"unary\"",
        "grpc_service=\"etcdserverpb.KV\"",
        "grpc_method=\"Range\"",
    ];
    let code = |c: &'static str| [range[0], range[1], range[2], c];
    assert_eq!(
        grew("grpc_server_handled_total", &code("grpc_code=\"OK\"")),
        READS as f64
    );
    assert_eq!(
        grew(
            "grpc_server_handled_total",
            &code("grpc_code=\"InvalidArgument\"")
        ),
        1.0
    );
    assert_eq!(
        grew("grpc_server_started_total", &range),
        READS as f64 + 1.0
    );
    let puts = [
        "grpc_method=\"Put\"",
        "grpc_code=\"OK\"",
        "grpc_service=\"etcdserverpb.KV\"",
    ];
    assert_eq!(grew("grpc_server_handled_total", &puts), WRITES as f64);
    assert!(grew("etcd_network_client_grpc_received_bytes_total", &[]) > 0.0);
    assert!(grew("etcd_network_client_grpc_sent_bytes_total", &[]) > 0.0);

    assert_eq!(value(&after, "etcd_server_has_leader", &[]), 1.0);
    assert_eq!(value(&after, "etcd_server_is_leader", &[]), 1.0);
    assert!(value(&after, "etcd_server_leader_changes_seen_total", &[]) >= 1.0);
    assert_eq!(
        value(&after, "etcd_server_quota_backend_bytes", &[]),
        2.0 * 1024.0 * 1024.0 * 1024.0
    );
    assert!(value(&after, "etcd_mvcc_db_total_size_in_bytes", &[]) > 0.0);
    assert!(value(&after, "etcd_mvcc_db_total_size_in_use_in_bytes", &[]) > 0.0);
    assert!(value(&after, "process_resident_memory_bytes", &[]) > 0.0);
    assert_eq!(
        value(&after, "etcd_debugging_mvcc_current_revision", &[]),
        1.0 + WRITES as f64
    );
    // etcd's types and buckets (1 ms to 8.192 s).
    assert!(after.contains("# TYPE etcd_disk_wal_fsync_duration_seconds histogram"));
    assert!(after.contains("# TYPE etcd_server_proposals_committed_total gauge"));
    assert!(after.contains("# TYPE grpc_server_handled_total counter"));
    assert!(sample(
        &after,
        "etcd_disk_wal_fsync_duration_seconds_bucket",
        &["le=\"0.001\""]
    )
    .is_some());
    assert!(sample(
        &after,
        "etcd_disk_wal_fsync_duration_seconds_bucket",
        &["le=\"8.192\""]
    )
    .is_some());
}

/// etcd's mvcc, lease and health metrics move as the server works: live keys after puts,
/// deletions and a lease revocation; puts, deletes, ranges and txns as etcd counts them (a txn
/// is a request of more than one operation); leases granted, renewed and revoked with the TTL
/// in etcd's buckets; the keys a compaction deleted; /health's successes and failures. Without
/// `--metrics=extensive` no gRPC handling time is recorded.
#[tokio::test]
async fn mvcc_lease_and_health_metrics_follow_what_the_server_does() {
    let server = Server::start(Kind::Memory).await;
    let port = server.client_port;
    let mut kv = server.kv().await;
    let mut lease = LeaseClient::connect(server.endpoint()).await.unwrap();
    let before = metrics(port).await;
    assert_eq!(value(&before, "etcd_debugging_mvcc_keys_total", &[]), 0.0);

    for i in 0..5 {
        kv.put(put(&format!("k{i}"))).await.unwrap();
    }
    kv.put(put("k0")).await.unwrap();
    kv.delete_range(support::delete_req("k1", ""))
        .await
        .unwrap();
    kv.delete_range(support::delete_req("absent", ""))
        .await
        .unwrap();
    let txn = TxnRequest {
        success: vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(put("t"))),
            },
            RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: b"k2".to_vec(),
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    };
    kv.txn(txn).await.unwrap();
    const RANGES: u64 = 3;
    for _ in 0..RANGES {
        server.range(b"k", b"l").await;
    }
    let mid = metrics(port).await;
    let grew = |after: &str, name: &str| value(after, name, &[]) - value(&before, name, &[]);
    // k0, k2, k3, k4 and t.
    assert_eq!(value(&mid, "etcd_debugging_mvcc_keys_total", &[]), 5.0);
    assert_eq!(grew(&mid, "etcd_mvcc_put_total"), 7.0);
    assert_eq!(grew(&mid, "etcd_mvcc_delete_total"), 2.0);
    assert_eq!(grew(&mid, "etcd_mvcc_range_total"), RANGES as f64 + 1.0);
    assert_eq!(grew(&mid, "etcd_mvcc_txn_total"), 1.0);
    assert!(mid.contains("# TYPE etcd_debugging_mvcc_keys_total gauge"));
    assert!(mid.contains("# TYPE etcd_mvcc_put_total counter"));

    // A lease of 60 s: in etcd's bucket le=64, not le=32. One renewal, then a revocation that
    // deletes its key.
    let granted = lease
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner();
    kv.put(PutRequest {
        lease: granted.id,
        ..put("leased")
    })
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut keepalive = lease
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(LeaseKeepAliveRequest { id: granted.id })
        .await
        .unwrap();
    let renewed = keepalive.message().await.unwrap().unwrap();
    assert_eq!(renewed.ttl, 60);
    let with_lease = metrics(port).await;
    assert_eq!(
        value(&with_lease, "etcd_debugging_mvcc_keys_total", &[]),
        6.0
    );
    lease
        .lease_revoke(LeaseRevokeRequest { id: granted.id })
        .await
        .unwrap();
    let revoked = metrics(port).await;
    assert_eq!(value(&revoked, "etcd_debugging_mvcc_keys_total", &[]), 5.0);
    assert_eq!(grew(&revoked, "etcd_debugging_lease_granted_total"), 1.0);
    assert_eq!(grew(&revoked, "etcd_debugging_lease_renewed_total"), 1.0);
    assert_eq!(grew(&revoked, "etcd_debugging_lease_revoked_total"), 1.0);
    assert_eq!(
        value(&revoked, "etcd_debugging_lease_ttl_total_count", &[]),
        1.0
    );
    assert_eq!(
        value(
            &revoked,
            "etcd_debugging_lease_ttl_total_bucket",
            &["le=\"64\""]
        ),
        1.0
    );
    assert_eq!(
        value(
            &revoked,
            "etcd_debugging_lease_ttl_total_bucket",
            &["le=\"32\""]
        ),
        0.0
    );

    // A compaction at the current revision deletes the overwritten and deleted revisions.
    let revision = value(&revoked, "etcd_debugging_mvcc_current_revision", &[]) as i64;
    kv.compact(CompactionRequest {
        revision,
        physical: true,
    })
    .await
    .unwrap();
    let compacted = metrics(port).await;
    assert!(grew(&compacted, "etcd_debugging_mvcc_db_compaction_keys_total") >= 3.0);
    assert_eq!(
        value(
            &compacted,
            "etcd_debugging_mvcc_db_compaction_total_duration_milliseconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        value(&compacted, "etcd_debugging_mvcc_keys_total", &[]),
        5.0
    );

    // /health: two successes, then a failure under a NOSPACE alarm.
    assert_eq!(get(port, "/health").await.body, HEALTHY);
    assert_eq!(get(port, "/health").await.body, HEALTHY);
    set_alarm(&server, AlarmType::Nospace, AlarmAction::Activate).await;
    assert_eq!(get(port, "/health").await.status, 503);
    set_alarm(&server, AlarmType::Nospace, AlarmAction::Deactivate).await;
    let probed = metrics(port).await;
    assert_eq!(grew(&probed, "etcd_server_health_success"), 2.0);
    assert_eq!(grew(&probed, "etcd_server_health_failures"), 1.0);

    // Registered from the start, as etcd's, though nothing here made them move.
    for name in [
        "etcd_server_slow_apply_total",
        "etcd_server_slow_read_indexes_total",
        "etcd_server_read_indexes_failed_total",
        "etcd_server_heartbeat_send_failures_total",
    ] {
        assert_eq!(value(&before, name, &[]), 0.0, "{name}");
    }
    assert!(!probed.contains("grpc_server_handling_seconds"));
}

/// With `--metrics=extensive`, each gRPC call is timed per method in go-grpc-prometheus'
/// default buckets.
#[tokio::test]
async fn extensive_metrics_time_every_grpc_call() {
    let server = Server::start_with(Kind::Memory, &["--metrics", "extensive"]).await;
    let port = server.client_port;
    let mut kv = server.kv().await;
    let labels = [
        "grpc_type=\"unary\"",
        "grpc_service=\"etcdserverpb.KV\"",
        "grpc_method=\"Put\"",
    ];
    let before = metrics(port).await;
    let count = |exposition: &str| {
        sample(exposition, "grpc_server_handling_seconds_count", &labels).unwrap_or(0.0)
    };
    const WRITES: u64 = 4;
    for i in 0..WRITES {
        kv.put(put(&format!("k{i}"))).await.unwrap();
    }
    let refused = kv.put(put("")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let after = metrics(port).await;
    assert_eq!(count(&after) - count(&before), WRITES as f64 + 1.0);
    assert!(after.contains("# TYPE grpc_server_handling_seconds histogram"));
    let mut bucket_labels = labels.to_vec();
    bucket_labels.push("le=\"10\"");
    assert_eq!(
        value(
            &after,
            "grpc_server_handling_seconds_bucket",
            &bucket_labels
        ),
        count(&after)
    );
    bucket_labels.pop();
    bucket_labels.push("le=\"0.005\"");
    assert!(sample(
        &after,
        "grpc_server_handling_seconds_bucket",
        &bucket_labels
    )
    .is_some());
}

/// `--listen-metrics-urls` serves /metrics and the probes only, as etcd.
#[tokio::test]
async fn metrics_urls_serve_metrics_and_probes_only() {
    let metrics_port = free_port();
    let server = Server::start_with(
        Kind::Memory,
        &[
            "--listen-metrics-urls",
            &format!("http://127.0.0.1:{metrics_port}"),
        ],
    )
    .await;
    let exposition = metrics(metrics_port).await;
    assert_eq!(value(&exposition, "etcd_server_has_leader", &[]), 1.0);
    let health = get(metrics_port, "/health").await;
    assert_eq!(answer(&health), (200, HEALTHY));
    assert_eq!(get(metrics_port, "/readyz").await.status, 200);
    assert_eq!(get(metrics_port, "/version").await.status, 404);
    // The client port still has /version.
    assert_eq!(get(server.client_port, "/version").await.status, 200);
}

/// A member cut off from its peers loses its leader: has_leader drops to 0 and /health says
/// why, while ?serializable=true still answers from local state.
#[tokio::test]
async fn an_isolated_member_reports_no_leader() {
    let mut cluster = Cluster::start(Kind::Memory, 3, &[]).await;
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    let port = cluster.member(follower).client_port;
    let leader_port = cluster.member(leader).client_port;
    let follower_metrics = metrics(port).await;
    assert_eq!(value(&follower_metrics, "etcd_server_has_leader", &[]), 1.0);
    assert_eq!(value(&follower_metrics, "etcd_server_is_leader", &[]), 0.0);
    // The follower's id, as the peer metrics label it.
    let follower_id = follower_metrics
        .lines()
        .find_map(|l| l.strip_prefix("etcd_server_id{server_id=\""))
        .and_then(|rest| rest.split_once('"'))
        .map(|(id, _)| id.to_string())
        .expect("etcd_server_id");
    let to = format!("To=\"{follower_id}\"");
    let leader_metrics = metrics(leader_port).await;
    assert!(
        value(
            &leader_metrics,
            "etcd_network_peer_sent_bytes_total",
            &[&to]
        ) > 0.0
    );
    assert!(
        value(
            &follower_metrics,
            "etcd_network_peer_received_bytes_total",
            &[]
        ) > 0.0
    );
    // The prober measures every peer's round trip (every 4 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while sample(
        &metrics(leader_port).await,
        "etcd_network_peer_round_trip_time_seconds_count",
        &[&to],
    )
    .is_none_or(|count| count < 1.0)
    {
        assert!(Instant::now() < deadline, "no round trip measured to {to}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failures_before = sample(
        &leader_metrics,
        "etcd_network_peer_sent_failures_total",
        &[&to],
    )
    .unwrap_or(0.0);

    cluster.isolate(follower);
    // A linearizable read on the follower while it still believes in its leader: the ReadIndex
    // request goes unanswered and is sent again every 500 ms (etcd's slow read index), until
    // the follower gives up on its leader.
    let read_k = RangeRequest {
        key: b"k".to_vec(),
        ..Default::default()
    };
    let mut follower_kv = cluster.kv(follower).await;
    let read = read_k.clone();
    let unanswered = tokio::spawn(async move { follower_kv.range(read).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if value(&metrics(port).await, "etcd_server_has_leader", &[]) == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "has_leader stayed 1 on an isolated member"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = get(port, "/health").await;
    assert_eq!(
        answer(&health),
        (
            503,
            "{\"health\":\"false\",\"reason\":\"RAFT NO LEADER\"}\n"
        )
    );
    assert_eq!(get(port, "/health?serializable=true").await.status, 200);
    assert_eq!(get(port, "/livez").await.status, 200);
    let read_metrics = metrics(port).await;
    assert!(value(&read_metrics, "etcd_server_slow_read_indexes_total", &[]) >= 1.0);
    // A read with no leader known fails at once, and counts as a failed read index.
    let failed_before = value(&read_metrics, "etcd_server_read_indexes_failed_total", &[]);
    let mut no_leader = cluster.kv(follower).await;
    assert!(no_leader.range(read_k).await.is_err());
    assert!(
        value(
            &metrics(port).await,
            "etcd_server_read_indexes_failed_total",
            &[]
        ) > failed_before
    );
    assert!(
        unanswered.await.unwrap().is_err(),
        "a read without a quorum"
    );
    // The leader could not reach it.
    let failures = sample(
        &metrics(leader_port).await,
        "etcd_network_peer_sent_failures_total",
        &[&to],
    );
    assert!(
        failures.is_some_and(|f| f > failures_before),
        "{failures:?}"
    );

    cluster.heal(follower);
    let deadline = Instant::now() + Duration::from_secs(30);
    while value(&metrics(port).await, "etcd_server_has_leader", &[]) != 1.0 {
        assert!(Instant::now() < deadline, "has_leader did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(port, "/health").await.status, 200);
}

/// A leader held up (its process stopped for longer than two heartbeat intervals, as a stalled
/// disk would) sends its next heartbeats late: etcd counts each in
/// `etcd_server_heartbeat_send_failures_total` and logs a warning.
#[tokio::test]
async fn a_leader_held_up_counts_late_heartbeats() {
    // An election timeout well above the pause, so that the same member still leads after it.
    let mut cluster = Cluster::start(Kind::Memory, 3, &["--election-timeout", "3000"]).await;
    let leader = cluster.wait_leader().await;
    let port = cluster.member(leader).client_port;
    let late =
        |exposition: &str| value(exposition, "etcd_server_heartbeat_send_failures_total", &[]);
    assert_eq!(
        late(&metrics(port).await),
        0.0,
        "a leader that was never held up"
    );
    cluster.pause(leader, Duration::from_millis(800)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while late(&metrics(port).await) < 2.0 {
        assert!(
            Instant::now() < deadline,
            "no late heartbeat to either follower counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cluster
        .log(leader)
        .contains("leader failed to send out heartbeat on time"));
}

/// Whether `program` (from Debian's `prometheus` package, which `cargo xtask test` installs)
/// runs here; says SKIPPED when it does not.
fn installed(program: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        eprintln!("SKIPPED: {program} not installed (Debian package `prometheus`)");
    }
    found
}

/// Prometheus' own linter accepts the exposition (skipped, saying so, without promtool).
#[tokio::test]
async fn promtool_accepts_the_exposition() {
    if !installed("promtool") {
        return;
    }
    let server = Server::start(Kind::Rocks).await;
    let mut kv = server.kv().await;
    kv.put(put("k")).await.unwrap();
    let exposition = metrics(server.client_port).await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // etcd names these gauges (and a histogram) `…_total`, and these counters without it;
    // promtool says the same of etcd's own exposition.
    const ETCD_GAUGES: [&str; 6] = [
        "etcd_server_proposals_committed_total",
        "etcd_server_proposals_applied_total",
        "etcd_debugging_mvcc_watcher_total",
        "etcd_debugging_mvcc_slow_watcher_total",
        "etcd_debugging_mvcc_keys_total",
        "etcd_debugging_lease_ttl_total",
    ];
    const ETCD_COUNTERS: [&str; 2] = ["etcd_server_health_success", "etcd_server_health_failures"];
    let problems: Vec<&str> = report
        .lines()
        .filter(|line| {
            !ETCD_GAUGES.iter().any(|name| {
                *line == format!("{name} non-counter metrics should not have \"_total\" suffix")
            }) && !ETCD_COUNTERS.iter().any(|name| {
                *line == format!("{name} counter metrics should have \"_total\" suffix")
            })
        })
        .collect();
    assert!(problems.is_empty(), "promtool check metrics: {problems:#?}");
    assert!(
        report.contains(ETCD_GAUGES[0]),
        "promtool did not lint: {report}"
    );
}

/// kubeadm's generated etcd manifest, flag for flag (its `/etc/kubernetes/manifests/etcd.yaml`
/// command, with this test's ports, paths and certificates): the member starts, kubelet's probes
/// on the metrics URL answer (the older kubeadm's `/health?…` ones and the newer `/livez` and
/// `/readyz`), and `etcdctl` with kubeadm's client certificate (as the API server) reads and
/// writes over https.
async fn kubeadm_command_line_starts_a_member(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::Ca::new(dir.path(), "etcd");
    let server = ca.leaf(dir.path(), "server", "node1");
    let peer = ca.leaf(dir.path(), "peer", "node1");
    let client = ca.leaf(
        dir.path(),
        "apiserver-etcd-client",
        "kube-apiserver-etcd-client",
    );
    let (c, p, m) = (free_port(), free_port(), free_port());
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let data_dir = dir.path().join("etcd");
    let engine = match kind {
        Kind::Rocks => "rocksdb",
        _ => "memory",
    };
    let args = [
        format!("--advertise-client-urls=https://127.0.0.1:{c}"),
        format!("--cert-file={}", path(&server.cert)),
        "--client-cert-auth=true".to_string(),
        format!("--data-dir={}", path(&data_dir)),
        "--experimental-initial-corrupt-check=true".to_string(),
        "--experimental-watch-progress-notify-interval=5s".to_string(),
        format!("--initial-advertise-peer-urls=https://127.0.0.1:{p}"),
        format!("--initial-cluster=node1=https://127.0.0.1:{p}"),
        format!("--key-file={}", path(&server.key)),
        // The node address beside loopback, as kubeadm writes it (127.0.0.2 stands for it).
        format!("--listen-client-urls=https://127.0.0.1:{c},https://127.0.0.2:{c}"),
        format!("--listen-metrics-urls=http://127.0.0.1:{m}"),
        format!("--listen-peer-urls=https://127.0.0.1:{p}"),
        "--name=node1".to_string(),
        format!("--peer-cert-file={}", path(&peer.cert)),
        "--peer-client-cert-auth=true".to_string(),
        format!("--peer-key-file={}", path(&peer.key)),
        format!("--peer-trusted-ca-file={}", path(&ca.cert_path)),
        "--snapshot-count=10000".to_string(),
        format!("--trusted-ca-file={}", path(&ca.cert_path)),
    ];
    let mut cmd = std::process::Command::new(support::metastore_bin());
    // The engine, MetaStore's own choice, through its environment variable as a pod spec would.
    cmd.args(&args)
        .env("ETCD_STORAGE_ENGINE", engine)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("member.log")).unwrap());
    let mut child = support::KillOnDrop(vec![cmd.spawn().expect("start metastore")]);

    // kubelet's startup probe: until /readyz answers 200 (bounded).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.0[0].try_wait() {
            panic!(
                "exited with {status}: {}",
                std::fs::read_to_string(dir.path().join("member.log")).unwrap()
            );
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", m))
            .await
            .is_ok()
            && get(m, "/readyz").await.status == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never answered 200");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for probe in [
        "/health?exclude=NOSPACE&serializable=true",
        "/health?serializable=false",
    ] {
        let reply = get(m, probe).await;
        assert_eq!(answer(&reply), (200, HEALTHY), "{probe}");
    }
    for probe in ["/livez", "/readyz"] {
        let reply = get(m, probe).await;
        assert_eq!(answer(&reply), (200, "ok\n"), "{probe}");
    }
    assert!(metrics(m).await.contains("etcd_server_has_leader 1"));

    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=https://localhost:{c}"))
            .arg(format!("--cacert={}", path(&ca.cert_path)))
            .arg(format!("--cert={}", path(&client.cert)))
            .arg(format!("--key={}", path(&client.key)))
            .args(args)
            .output()
            .expect("etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    etcdctl(&["put", "/registry/namespaces/default", "ns"]);
    assert_eq!(
        etcdctl(&["get", "/registry/namespaces/default", "--print-value-only"]),
        "ns\n"
    );
    // Without a client certificate the TLS handshake is refused (--client-cert-auth=true).
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=https://localhost:{c}"))
        .arg(format!("--cacert={}", path(&ca.cert_path)))
        .args(["--dial-timeout=2s", "get", "x"])
        .output()
        .expect("etcdctl");
    assert!(!out.status.success());
}

per_engine!(kubeadm_command_line_starts_a_member);

/// The expressions of etcd's monitoring mixin (`contrib/mixin`): its alert rules, as operators
/// load them. Each is written here as an expression over etcd's metric names; the test checks
/// that a real Prometheus evaluates them against MetaStore and that every series they read exists.
const MIXIN_ALERTS: [(&str, &str); 12] = [
    (
        "etcdMembersDown",
        r#"max without (endpoint) (sum without (instance) (up{job=~".*etcd.*"} == bool 0) or count without (To) (sum without (instance) (rate(etcd_network_peer_sent_failures_total{job=~".*etcd.*"}[120s])) > 0.01)) > 0"#,
    ),
    (
        "etcdInsufficientMembers",
        r#"sum(up{job=~".*etcd.*"} == bool 1) without (instance) < ((count(up{job=~".*etcd.*"}) without (instance) + 1) / 2)"#,
    ),
    (
        "etcdNoLeader",
        r#"etcd_server_has_leader{job=~".*etcd.*"} == 0"#,
    ),
    (
        "etcdHighNumberOfLeaderChanges",
        r#"increase((max without (instance) (etcd_server_leader_changes_seen_total{job=~".*etcd.*"}) or 0*absent(etcd_server_leader_changes_seen_total{job=~".*etcd.*"}))[15m:1m]) >= 4"#,
    ),
    (
        "etcdHighNumberOfFailedGRPCRequests",
        r#"100 * sum(rate(grpc_server_handled_total{job=~".*etcd.*", grpc_code=~"Unknown|FailedPrecondition|ResourceExhausted|Internal|Unavailable|DataLoss|DeadlineExceeded"}[5m])) without (grpc_type, grpc_code) / sum(rate(grpc_server_handled_total{job=~".*etcd.*"}[5m])) without (grpc_type, grpc_code) > 1"#,
    ),
    (
        "etcdMemberCommunicationSlow",
        r#"histogram_quantile(0.99, rate(etcd_network_peer_round_trip_time_seconds_bucket{job=~".*etcd.*"}[5m])) > 0.15"#,
    ),
    (
        "etcdHighNumberOfFailedProposals",
        r#"rate(etcd_server_proposals_failed_total{job=~".*etcd.*"}[15m]) > 5"#,
    ),
    (
        "etcdHighFsyncDurations",
        r#"histogram_quantile(0.99, rate(etcd_disk_wal_fsync_duration_seconds_bucket{job=~".*etcd.*"}[5m])) > 0.5"#,
    ),
    (
        "etcdHighCommitDurations",
        r#"histogram_quantile(0.99, rate(etcd_disk_backend_commit_duration_seconds_bucket{job=~".*etcd.*"}[5m])) > 0.25"#,
    ),
    (
        "etcdDatabaseQuotaLowSpace",
        r#"(last_over_time(etcd_mvcc_db_total_size_in_bytes{job=~".*etcd.*"}[5m]) / last_over_time(etcd_server_quota_backend_bytes{job=~".*etcd.*"}[5m]))*100 > 95"#,
    ),
    (
        "etcdExcessiveDatabaseGrowth",
        r#"predict_linear(etcd_mvcc_db_total_size_in_bytes{job=~".*etcd.*"}[4h], 4*60*60) > etcd_server_quota_backend_bytes{job=~".*etcd.*"}"#,
    ),
    (
        "etcdDatabaseHighFragmentationRatio",
        r#"(last_over_time(etcd_mvcc_db_total_size_in_use_in_bytes{job=~".*etcd.*"}[5m]) / last_over_time(etcd_mvcc_db_total_size_in_bytes{job=~".*etcd.*"}[5m])) < 0.5 and etcd_mvcc_db_total_size_in_use_in_bytes{job=~".*etcd.*"} > 104857600"#,
    ),
];

/// The series the alerts above read. Not here: `grpc_server_handling_seconds_bucket` (the
/// mixin's etcdGRPCRequestsSlow), which etcd itself only exports with `--metrics=extensive`, and
/// `etcd_network_peer_sent_failures_total`, which exists per peer from its first failure only,
/// in etcd too (`an_isolated_member_reports_no_leader` checks it).
const MIXIN_SERIES: [&str; 11] = [
    "up",
    "etcd_server_has_leader",
    "etcd_server_leader_changes_seen_total",
    "grpc_server_handled_total",
    "etcd_network_peer_round_trip_time_seconds_bucket",
    "etcd_server_proposals_failed_total",
    "etcd_disk_wal_fsync_duration_seconds_bucket",
    "etcd_disk_backend_commit_duration_seconds_bucket",
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_server_quota_backend_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
];

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A PromQL query through Prometheus' HTTP API: `(status, number of result series)`.
async fn prom_query(port: u16, expr: &str) -> (String, usize) {
    let reply = get(port, &format!("/api/v1/query?query={}", url_encode(expr))).await;
    let json = support::cluster::Json::parse(&reply.body);
    let status = json
        .get("status")
        .and_then(|s| s.as_str())
        .unwrap_or_default()
        .to_string();
    let result = json
        .get("data")
        .and_then(|d| d.get("result"))
        .map_or(0, |r| r.as_array().len());
    (status, result)
}

/// A real Prometheus (Debian's) scrapes a 3-member cluster started from a config file and
/// `ETCD_*` variables, under a little load: every target is
/// up, every series etcd's mixin alerts read exists, and every alert expression evaluates
/// without error; on a healthy cluster etcdNoLeader and etcdInsufficientMembers find nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_cluster_and_evaluates_etcds_mixin_alerts() {
    if !installed("prometheus") {
        return;
    }
    // Configured as issue 19's operator would: m1 and m3 from a YAML --config-file, m2 from
    // ETCD_* variables only.
    let c = Cluster::start_launched(Kind::Memory, 3, Launch::FileAndEnv).await;
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = (0..3)
        .map(|i| format!("'127.0.0.1:{}'", c.member(i).client_port))
        .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - \
             job_name: etcd\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let port = free_port();
    let prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .expect("start prometheus");
    let _prometheus = support::KillOnDrop(vec![prometheus]);
    let mut kv = c.kv(0).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        kv.put(put("scraped")).await.unwrap();
        let up = if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            prom_query(port, r#"up{job="etcd"} == 1"#).await.1
        } else {
            0
        };
        // Three targets up, and enough samples for rate() over them.
        if up == 3
            && prom_query(port, "rate(etcd_server_proposals_committed_total[1m]) > 0")
                .await
                .1
                > 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus did not scrape the three members:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for series in MIXIN_SERIES {
        let (status, result) = prom_query(port, &format!("{series}{{job=\"etcd\"}}")).await;
        assert_eq!(status, "success", "{series}");
        assert!(result > 0, "no {series} series scraped");
    }
    for (alert, expr) in MIXIN_ALERTS {
        let (status, result) = prom_query(port, expr).await;
        assert_eq!(status, "success", "{alert}: {expr}");
        if matches!(
            alert,
            "etcdNoLeader" | "etcdInsufficientMembers" | "etcdMembersDown"
        ) {
            assert_eq!(result, 0, "{alert} fires on a healthy cluster");
        }
    }
}
