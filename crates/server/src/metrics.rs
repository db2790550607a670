//! Prometheus metrics: the process's recorder (the `metrics` facade's Prometheus exporter, with
//! etcd's histogram buckets and help texts), the figures sampled when `/metrics` is scraped, and
//! the gRPC layer that counts calls as go-grpc-prometheus does for etcd.
//!
//! Where each metric is recorded: raft and WAL figures in `metastore-raft-node` (`metrics.rs`),
//! the backend commit duration in `metastore-mvcc`, the gRPC figures in [`GrpcMetricsLayer`]
//! here. Gauges that etcd computes when scraped (`prometheus.GaugeFunc`: database sizes, the
//! quota) are sampled in [`Exporter::render`] from the same sources Status answers from.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body::Frame;
use metastore_api_context::ServerContext;
use metastore_storage::Backend;
use metastore_watch::WatchHub;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// etcd's buckets for its disk histograms (`prometheus.ExponentialBuckets(0.001, 2, 14)`:
/// 1 ms to 8 s).
fn disk_buckets() -> Vec<f64> {
    (0..14).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

/// The process's Prometheus recorder. Installed once, before anything records.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder (once) and describes etcd's metrics. Must run before the
/// member starts, so that every crate's handles reach this recorder.
pub fn install() -> Result<()> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("etcd_disk_wal_fsync_duration_seconds".into()),
            &disk_buckets(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("etcd_disk_backend_commit_duration_seconds".into()),
            &disk_buckets(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("etcd_network_peer_round_trip_time_seconds".into()),
            // etcd's ExponentialBuckets(0.0001, 2, 14): 0.1 ms to 0.8 s
            &(0..14)
                .map(|i| 0.0001 * f64::from(1u32 << i))
                .collect::<Vec<_>>(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("grpc_server_handling_seconds".into()),
            // go-grpc-prometheus' default: Prometheus' DefBuckets.
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("etcd_debugging_lease_ttl_total".into()),
            // etcd's ExponentialBuckets(1, 2, 24): 1 s to about 3 months.
            &(0..24).map(|i| f64::from(1u32 << i)).collect::<Vec<_>>(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("etcd_debugging_mvcc_db_compaction_total_duration_milliseconds".into()),
            // etcd's ExponentialBuckets(100, 2, 14): 100 ms to about 13 minutes.
            &(0..14)
                .map(|i| 100.0 * f64::from(1u32 << i))
                .collect::<Vec<_>>(),
        )?
        .install_recorder()
        .context("installing the Prometheus metrics recorder")?;
    let _ = HANDLE.set(handle);
    describe();
    Ok(())
}

/// Help texts (etcd's), which Prometheus' linters require.
fn describe() {
    describe_gauge!(
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not."
    );
    describe_gauge!(
        "etcd_server_is_leader",
        "Whether or not this member is a leader. 1 if is, 0 otherwise."
    );
    describe_counter!(
        "etcd_server_leader_changes_seen_total",
        "The number of leader changes seen."
    );
    describe_gauge!(
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed."
    );
    describe_gauge!(
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied."
    );
    describe_gauge!(
        "etcd_server_proposals_pending",
        "The current number of pending proposals to commit."
    );
    describe_counter!(
        "etcd_server_proposals_failed_total",
        "The total number of failed proposals seen."
    );
    describe_histogram!(
        "etcd_disk_wal_fsync_duration_seconds",
        Unit::Seconds,
        "The latency distributions of fsync called by WAL."
    );
    describe_histogram!(
        "etcd_disk_backend_commit_duration_seconds",
        Unit::Seconds,
        "The latency distributions of commit called by backend."
    );
    describe_gauge!(
        "etcd_mvcc_db_total_size_in_bytes",
        Unit::Bytes,
        "Total size of the underlying database physically allocated in bytes."
    );
    describe_gauge!(
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        Unit::Bytes,
        "Total size of the underlying database logically in use in bytes."
    );
    describe_gauge!(
        "etcd_server_quota_backend_bytes",
        Unit::Bytes,
        "Current backend storage quota size in bytes."
    );
    describe_gauge!(
        "etcd_server_id",
        "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID."
    );
    describe_gauge!(
        "etcd_server_version",
        "Which version is running. 1 for 'server_version' label with current version."
    );
    describe_gauge!(
        "etcd_cluster_version",
        "Which version is running. 1 for 'cluster_version' label with current cluster version"
    );
    describe_gauge!(
        "etcd_server_is_learner",
        "Whether or not this member is a learner. 1 if is, 0 otherwise."
    );
    describe_gauge!(
        "etcd_debugging_mvcc_watcher_total",
        "Total number of watchers."
    );
    describe_gauge!(
        "etcd_debugging_mvcc_slow_watcher_total",
        "Total number of unsynced slow watchers."
    );
    describe_gauge!(
        "etcd_debugging_mvcc_current_revision",
        "The current revision of store."
    );
    describe_gauge!(
        "etcd_debugging_mvcc_compact_revision",
        "The revision of the last compaction in store."
    );
    describe_histogram!(
        "etcd_network_peer_round_trip_time_seconds",
        Unit::Seconds,
        "Round-Trip-Time histogram between peers"
    );
    describe_counter!(
        "etcd_network_peer_sent_failures_total",
        "The total number of send failures from peers."
    );
    describe_counter!(
        "etcd_network_peer_sent_bytes_total",
        Unit::Bytes,
        "The total number of bytes sent to peers."
    );
    describe_counter!(
        "etcd_network_peer_received_bytes_total",
        Unit::Bytes,
        "The total number of bytes received from peers."
    );
    describe_counter!(
        "grpc_server_started_total",
        "Total number of RPCs started on the server."
    );
    describe_counter!(
        "grpc_server_handled_total",
        "Total number of RPCs completed on the server, regardless of success or failure."
    );
    describe_histogram!(
        "grpc_server_handling_seconds",
        Unit::Seconds,
        "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server."
    );
    describe_gauge!("etcd_debugging_mvcc_keys_total", "Total number of keys.");
    describe_counter!(
        "etcd_mvcc_put_total",
        "Total number of puts seen by this member."
    );
    describe_counter!(
        "etcd_mvcc_delete_total",
        "Total number of deletes seen by this member."
    );
    describe_counter!(
        "etcd_mvcc_range_total",
        "Total number of ranges seen by this member."
    );
    describe_counter!(
        "etcd_mvcc_txn_total",
        "Total number of txns seen by this member."
    );
    describe_counter!(
        "etcd_debugging_mvcc_db_compaction_keys_total",
        "Total number of db keys compacted."
    );
    describe_histogram!(
        "etcd_debugging_mvcc_db_compaction_total_duration_milliseconds",
        Unit::Milliseconds,
        "Bucketed histogram of db compaction total duration."
    );
    describe_counter!(
        "etcd_debugging_lease_granted_total",
        "The total number of granted leases."
    );
    describe_counter!(
        "etcd_debugging_lease_revoked_total",
        "The total number of revoked leases."
    );
    describe_counter!(
        "etcd_debugging_lease_renewed_total",
        "The number of renewed leases seen by the leader."
    );
    describe_histogram!(
        "etcd_debugging_lease_ttl_total",
        Unit::Seconds,
        "Bucketed histogram of lease TTLs."
    );
    describe_counter!(
        "etcd_server_slow_apply_total",
        "The total number of slow apply requests (likely overloaded from slow disk)."
    );
    describe_counter!(
        "etcd_server_slow_read_indexes_total",
        "The total number of pending read indexes not in sync with leader's or timed out read index requests."
    );
    describe_counter!(
        "etcd_server_heartbeat_send_failures_total",
        "The total number of leader heartbeat send failures (likely overloaded from slow disk)."
    );
    describe_counter!(
        "etcd_server_read_indexes_failed_total",
        "The total number of failed read indexes seen."
    );
    describe_counter!(
        "etcd_server_health_success",
        "The total number of successful health checks"
    );
    describe_counter!(
        "etcd_server_health_failures",
        "The total number of failed health checks"
    );
    describe_counter!(
        "etcd_network_client_grpc_received_bytes_total",
        Unit::Bytes,
        "The total number of bytes received from grpc clients."
    );
    describe_counter!(
        "etcd_network_client_grpc_sent_bytes_total",
        Unit::Bytes,
        "The total number of bytes sent to grpc clients."
    );
}

/// Keeps the recorder's histograms drained (the exporter's upkeep, which `install_recorder`
/// leaves to its caller).
pub fn spawn_upkeep() {
    if let Some(handle) = HANDLE.get() {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                handle.run_upkeep();
            }
        });
    }
}

/// Counters recorded in other crates (or only on rare events) that are shown from the start.
const ZERO_FROM_START: [&str; 14] = [
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_range_total",
    "etcd_mvcc_txn_total",
    "etcd_debugging_mvcc_db_compaction_keys_total",
    "etcd_debugging_lease_granted_total",
    "etcd_debugging_lease_revoked_total",
    "etcd_debugging_lease_renewed_total",
    "etcd_server_slow_apply_total",
    "etcd_server_slow_read_indexes_total",
    "etcd_server_read_indexes_failed_total",
    "etcd_server_heartbeat_send_failures_total",
    "etcd_server_health_success",
    "etcd_server_health_failures",
];

/// What `/metrics` renders: the recorder, plus the sources of the figures sampled at scrape time.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
    ctx: ServerContext,
    backend: Arc<dyn Backend>,
    watch_hub: Arc<WatchHub>,
    process: Arc<metrics_process::Collector>,
}

impl Exporter {
    /// The exporter of this process's recorder (`None` before [`install`]). Sets the gauges that
    /// never change while the member runs (its id and version).
    pub fn new(
        ctx: ServerContext,
        backend: Arc<dyn Backend>,
        watch_hub: Arc<WatchHub>,
    ) -> Option<Exporter> {
        let handle = HANDLE.get()?.clone();
        gauge!("etcd_server_id", "server_id" => format!("{:x}", ctx.member_id)).set(1.0);
        let version = metastore_maintenance_api::ETCD_API_VERSION;
        gauge!("etcd_server_version", "server_version" => version).set(1.0);
        gauge!("etcd_cluster_version", "cluster_version" => crate::http::cluster_version())
            .set(1.0);
        // etcd's counters exist from the start (at 0), so a rate has a series before the first
        // event; the recorder only shows a series once it is registered.
        for name in ZERO_FROM_START {
            let _ = counter!(name);
        }
        let process = metrics_process::Collector::default();
        process.describe();
        Some(Exporter {
            handle,
            ctx,
            backend,
            watch_hub,
            process: Arc::new(process),
        })
    }

    /// The Prometheus text exposition, after sampling the scrape-time figures.
    pub async fn render(&self) -> String {
        let this = self.clone();
        // Sizes ask the engine (RocksDB properties, file sizes): a blocking call.
        let sampled = tokio::task::spawn_blocking(move || {
            this.sample();
            this.handle.render()
        })
        .await;
        sampled.unwrap_or_default()
    }

    fn sample(&self) {
        let ctx = &self.ctx;
        if let Ok(size) = self.backend.size() {
            gauge!("etcd_mvcc_db_total_size_in_bytes").set(size.size_bytes as f64);
            gauge!("etcd_mvcc_db_total_size_in_use_in_bytes").set(size.size_in_use_bytes as f64);
        }
        gauge!("etcd_server_quota_backend_bytes").set(ctx.quota.quota_bytes() as f64);
        let is_learner = ctx
            .raft
            .with_status(|s| s.membership.learners.contains(&ctx.member_id));
        gauge!("etcd_server_is_learner").set(f64::from(u8::from(is_learner)));
        let store = ctx.store.current();
        gauge!("etcd_debugging_mvcc_current_revision").set(store.current_revision() as f64);
        gauge!("etcd_debugging_mvcc_compact_revision").set(store.compact_revision() as f64);
        // Kept as writes apply: reading it is O(1) whatever the key count.
        gauge!("etcd_debugging_mvcc_keys_total").set(store.live_keys() as f64);
        let watch = self.watch_hub.stats();
        gauge!("etcd_debugging_mvcc_watcher_total").set((watch.synced + watch.unsynced) as f64);
        gauge!("etcd_debugging_mvcc_slow_watcher_total").set(watch.unsynced as f64);
        self.process.collect();
    }
}

/// How a method streams, as go-grpc-prometheus labels it (`grpc_type`).
fn grpc_type(path: &str) -> &'static str {
    match path {
        "/etcdserverpb.Watch/Watch" | "/etcdserverpb.Lease/LeaseKeepAlive" => "bidi_stream",
        "/etcdserverpb.Maintenance/Snapshot"
        | "/v3electionpb.Election/Observe"
        | "/grpc.health.v1.Health/Watch" => "server_stream",
        _ => "unary",
    }
}

/// gRPC status codes by number, named as grpc-go names them (the `grpc_code` label).
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The counters of one method: started, and handled by code; with `--metrics=extensive`, the
/// histogram of its handling time.
struct MethodCounters {
    started: Counter,
    handled: Vec<Counter>,
    handling_seconds: Option<Histogram>,
}

impl MethodCounters {
    fn new(path: &str, extensive: bool) -> MethodCounters {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", path));
        let labels = [
            ("grpc_type", grpc_type(path).to_string()),
            ("grpc_service", service.to_string()),
            ("grpc_method", method.to_string()),
        ];
        MethodCounters {
            started: counter!("grpc_server_started_total", &labels),
            handled: CODE_NAMES
                .iter()
                .map(|code| {
                    let mut labels = labels.to_vec();
                    labels.push(("grpc_code", (*code).to_string()));
                    counter!("grpc_server_handled_total", &labels)
                })
                .collect(),
            handling_seconds: extensive
                .then(|| histogram!("grpc_server_handling_seconds", &labels)),
        }
    }

    /// The call ended with `code`; `started` is when it arrived, known when the handling time is
    /// recorded.
    fn handled(&self, code: usize, started: Option<Instant>) {
        if let Some(counter) = self.handled.get(code) {
            counter.increment(1);
        }
        if let (Some(histogram), Some(started)) = (&self.handling_seconds, started) {
            histogram.record(started.elapsed().as_secs_f64());
        }
    }
}

/// The counters of every method served, looked up by path.
struct GrpcCounters {
    methods: HashMap<&'static str, MethodCounters>,
    /// Whether calls are timed (`--metrics=extensive`).
    extensive: bool,
    received_bytes: Counter,
    sent_bytes: Counter,
}

/// The methods counted from the start, as go-grpc-prometheus pre-registers every method of the
/// server with every code (so a rate has a series before the first call).
const HEALTH_METHODS: [&str; 2] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// A tower layer counting the gRPC calls of the client port: `grpc_server_started_total` when a
/// call arrives, `grpc_server_handled_total` with its code when it ends (a stream dropped before
/// its status counts as `Canceled`), and the bytes of request and response bodies
/// (`etcd_network_client_grpc_{received,sent}_bytes_total`). A method this server does not serve
/// is not counted (tonic answers Unimplemented), which keeps the label set bounded.
///
/// With `--metrics=extensive` it also records `grpc_server_handling_seconds` per method, from
/// the call's arrival to its status (for a stream, the end of the stream), as go-grpc-prometheus
/// does once etcd turns its handling-time histogram on. The basic path reads no clock.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    counters: Arc<GrpcCounters>,
}

impl GrpcMetricsLayer {
    /// A layer over the methods of etcd's services (and grpc.health.v1); `extensive` adds the
    /// handling-time histograms.
    pub fn new(extensive: bool) -> GrpcMetricsLayer {
        let methods = metastore_auth::needs::RPC_RULES
            .iter()
            .map(|(path, _, _)| *path)
            .chain(HEALTH_METHODS)
            .map(|path| (path, MethodCounters::new(path, extensive)))
            .collect();
        GrpcMetricsLayer {
            counters: Arc::new(GrpcCounters {
                methods,
                extensive,
                received_bytes: counter!("etcd_network_client_grpc_received_bytes_total"),
                sent_bytes: counter!("etcd_network_client_grpc_sent_bytes_total"),
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            counters: self.counters.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] builds.
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    counters: Arc<GrpcCounters>,
}

type GrpcRequest = http::Request<tonic::body::Body>;
type GrpcResponse = http::Response<tonic::body::Body>;

impl<S> tower_service::Service<GrpcRequest> for GrpcMetrics<S>
where
    S: tower_service::Service<GrpcRequest, Response = GrpcResponse> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<GrpcResponse, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: GrpcRequest) -> Self::Future {
        let counters = self.counters.clone();
        let method = counters
            .methods
            .get_key_value(request.uri().path())
            .map(|(path, _)| *path);
        if let Some(path) = method {
            counters.methods[path].started.increment(1);
        }
        let started = (counters.extensive && method.is_some()).then(Instant::now);
        let request = request.map(|body| {
            tonic::body::Body::new(CountedBody {
                inner: body,
                counters: counters.clone(),
                method: None,
                started: None,
                sent: false,
            })
        });
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            // A call that failed at once answers its status in the headers (trailers-only).
            let status = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            if let (Some(path), Some(code)) = (method, status) {
                counters.methods[path].handled(code, started);
            }
            let method = if status.is_some() { None } else { method };
            Ok(response.map(|body| {
                tonic::body::Body::new(CountedBody {
                    inner: body,
                    counters,
                    method,
                    started,
                    sent: true,
                })
            }))
        })
    }
}

/// A request or response body whose data bytes are counted; for a response whose status comes
/// in its trailers, `method` is the method whose handled counter the status goes to.
struct CountedBody {
    inner: tonic::body::Body,
    counters: Arc<GrpcCounters>,
    method: Option<&'static str>,
    /// When the call arrived, if its handling time is recorded.
    started: Option<Instant>,
    /// A response (sent bytes), else a request (received bytes).
    sent: bool,
}

impl CountedBody {
    fn handled(&mut self, code: usize) {
        if let Some(path) = self.method.take() {
            self.counters.methods[path].handled(code, self.started);
        }
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let counter = if self.sent {
                        &self.counters.sent_bytes
                    } else {
                        &self.counters.received_bytes
                    };
                    counter.increment(data.len() as u64);
                } else if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(2);
                    self.handled(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.handled(2),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        // The client went away before the call's status: grpc-go counts it as Canceled.
        self.handled(1);
    }
}
