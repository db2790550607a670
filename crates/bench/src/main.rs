//! `metastore-bench`: a load generator for any etcd v3 endpoint (MetaStore or etcd), in the style
//! of etcd's `tools/benchmark`. Every run is bounded by `--total` (and optionally `--max-secs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use metastore_proto::etcdserverpb::lease_client::LeaseClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::request_op::Request as Op;
use metastore_proto::etcdserverpb::watch_client::WatchClient;
use metastore_proto::etcdserverpb::{
    watch_request, LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, StatusRequest, TxnRequest, TxnResponse, WatchCreateRequest,
    WatchRequest,
};
use rand::Rng;
use tonic::transport::{Channel, Endpoint};

/// The allocator the server uses, so that both sides of a run spend alike on allocation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "metastore-bench",
    about = "Benchmark an etcd v3 compatible endpoint"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// gRPC endpoints (comma-separated); connections are spread over them.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:2379",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Total number of gRPC connections.
    #[arg(long, global = true, default_value_t = 1)]
    conns: usize,
    /// Total number of concurrent clients (spread over the connections).
    #[arg(long, global = true, default_value_t = 1)]
    clients: usize,
    /// Total number of requests.
    #[arg(long, global = true, default_value_t = 10_000)]
    total: u64,
    /// Stop after this many seconds even if `--total` is not reached (0 = no time limit).
    #[arg(long, global = true, default_value_t = 600)]
    max_secs: u64,
    /// Maximum requests per second over all clients (0 = unlimited).
    #[arg(long, global = true, default_value_t = 0)]
    rate: u64,
    /// Print the summary as one JSON object.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bar.
    #[arg(long, global = true)]
    no_progress: bool,
    /// Send every request to the leader only (asks each endpoint's Status first).
    #[arg(long, global = true)]
    target_leader: bool,
    /// Threads of the load generator's runtime (0 = twice the cores, at least 4). With one
    /// thread per core on a machine shared with the servers, a descheduled thread holds back
    /// every response queued on it: at 1000 clients that doubled the p99 measured against a
    /// fast server, while a slow one (etcd) measured the same either way.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
}

/// Keys and values written by the write workloads.
#[derive(Args, Debug, Clone)]
struct KeyArgs {
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8)]
    val_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 1)]
    key_space_size: u64,
    /// Use keys in order instead of at random.
    #[arg(long)]
    sequential_keys: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Put keys.
    Put {
        /// Key size in bytes.
        #[arg(long, default_value_t = 8)]
        key_size: usize,
        /// Value size in bytes.
        #[arg(long, default_value_t = 8)]
        val_size: usize,
        /// Number of distinct keys written.
        #[arg(long, default_value_t = 1)]
        key_space_size: u64,
        /// Write keys in order instead of at random.
        #[arg(long)]
        sequential_keys: bool,
    },
    /// Range over a key or a key range.
    Range {
        /// Key to read.
        key: String,
        /// Range end (exclusive); omit for a single key.
        end: Option<String>,
        /// Consistency: `l` (linearizable) or `s` (serializable).
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
        /// Maximum keys returned per request (0 = no limit).
        #[arg(long, default_value_t = 0)]
        limit: i64,
    },
    /// Transactions of `--txn-ops` puts each.
    TxnPut {
        #[command(flatten)]
        keys: KeyArgs,
        /// Puts per transaction.
        #[arg(long, default_value_t = 1)]
        txn_ops: usize,
    },
    /// Transactions that each read or write one key, `--rw-ratio` reads per write.
    TxnMixed {
        #[command(flatten)]
        keys: KeyArgs,
        /// Reads per write (e.g. 9 for 90% reads).
        #[arg(long, default_value_t = 1.0)]
        rw_ratio: f64,
    },
    /// Plain Range and Put requests on one key space, `--read-ratio` of them reads.
    Mixed {
        #[command(flatten)]
        keys: KeyArgs,
        /// Share of reads, 0 to 1.
        #[arg(long, default_value_t = 0.9)]
        read_ratio: f64,
        /// Consistency of the reads: `l` or `s`.
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
    },
    /// Each client keeps one lease alive; every keep-alive round trip is a request.
    LeaseKeepalive,
    /// etcd's `benchmark watch`: `--streams` streams of `--watch-per-stream` watchers each on
    /// `--watched-key-total` keys (watcher i watches key i modulo the key count), their creation
    /// timed from the create request to its `created` answer; then `--put-total` puts, cycling
    /// over the watched keys, by `--clients` writers at `--put-rate`, and every event timed from
    /// sending its put to the watcher receiving it.
    Watch {
        /// Watch streams.
        #[arg(long, default_value_t = 10)]
        streams: usize,
        /// Watchers per stream.
        #[arg(long, default_value_t = 100)]
        watch_per_stream: usize,
        /// Distinct keys watched.
        #[arg(long, default_value_t = 1)]
        watched_key_total: usize,
        /// Puts to the watched keys.
        #[arg(long, default_value_t = 1000)]
        put_total: u64,
        /// Puts per second (0 = as fast as the writers go).
        #[arg(long, default_value_t = 0)]
        put_rate: u64,
        /// Key size in bytes.
        #[arg(long, default_value_t = 32)]
        key_size: usize,
        /// Value size in bytes (at least 20: the value carries the put's sequence number).
        #[arg(long, default_value_t = 32)]
        val_size: usize,
    },
    /// Watch event throughput and latency: `--watchers` watchers on one key over
    /// `--watch-streams` streams, while `--clients` writers put `--total` times to that key.
    /// Latency is from sending the put to each watcher's event.
    WatchLatency {
        /// Watchers in all.
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// Watch streams the watchers share.
        #[arg(long, default_value_t = 10)]
        watch_streams: usize,
        /// Value size in bytes.
        #[arg(long, default_value_t = 32)]
        val_size: usize,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Consistency {
    L,
    S,
}

/// Which keys and values a write workload uses.
#[derive(Clone)]
struct KeyGen {
    key_size: usize,
    value: Vec<u8>,
    key_space: u64,
    sequential: bool,
}

impl KeyGen {
    fn new(args: &KeyArgs) -> Self {
        KeyGen {
            key_size: args.key_size.max(1),
            value: vec![b'v'; args.val_size],
            key_space: args.key_space_size.max(1),
            sequential: args.sequential_keys,
        }
    }

    fn key(&self, n: u64) -> Vec<u8> {
        let k = if self.sequential {
            n % self.key_space
        } else {
            rand::rng().random_range(0..self.key_space)
        };
        make_key(k, self.key_size)
    }

    fn put(&self, n: u64) -> PutRequest {
        PutRequest {
            key: self.key(n),
            value: self.value.clone(),
            ..Default::default()
        }
    }
}

/// What one worker sends.
#[derive(Clone)]
enum Work {
    Put(KeyGen),
    Range(RangeRequest),
    TxnPut(KeyGen, usize),
    TxnMixed(KeyGen, f64),
    Mixed(KeyGen, f64, bool),
    LeaseKeepalive,
}

fn make_key(n: u64, size: usize) -> Vec<u8> {
    // etcd's benchmark writes the key number as fixed-width binary; decimal keeps keys readable.
    let digits = format!("{n:0width$}", width = size.max(1));
    digits.as_bytes()[digits.len() - size..].to_vec()
}

async fn connect(endpoints: &[String], conns: usize) -> Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(conns);
    for i in 0..conns.max(1) {
        let ep = &endpoints[i % endpoints.len()];
        let uri = if ep.starts_with("http") {
            ep.clone()
        } else {
            format!("http://{ep}")
        };
        let channel = Endpoint::from_shared(uri.clone())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to {uri}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// One HTTP/2 connection for unary gRPC calls, spoken with the `h2` crate directly. A unary
/// call is one message each way, so the request goes out as headers plus one data frame and the
/// answer is read as it arrives. tonic's `Channel` (a buffer task in front of the connection, a
/// body task per request) and then hyper's client (a dispatch channel and a spawned task per
/// request) each cost load-generator CPU, which on one machine is CPU taken from the servers:
/// at 3 members and 1000 clients the load generator had used about a third of the machine.
#[derive(Clone)]
struct UnaryConn {
    send: h2::client::SendRequest<Bytes>,
    /// `scheme://authority` of the endpoint, the prefix of every request's URI.
    origin: Arc<str>,
}

fn transport_error(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::unavailable(e.to_string())
}

impl UnaryConn {
    /// One unary call of `method` (`/package.Service/Method`).
    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &mut self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, tonic::Status> {
        std::future::poll_fn(|cx| self.send.poll_ready(cx))
            .await
            .map_err(transport_error)?;
        let mut body = Vec::with_capacity(5 + req.encoded_len());
        body.push(0);
        body.extend_from_slice(&(req.encoded_len() as u32).to_be_bytes());
        req.encode(&mut body).map_err(transport_error)?;
        let request = http::Request::post(format!("{}{method}", self.origin))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(transport_error)?;
        let (response, mut stream) = self
            .send
            .send_request(request, false)
            .map_err(transport_error)?;
        stream
            .send_data(Bytes::from(body), true)
            .map_err(transport_error)?;
        let response = response.await.map_err(transport_error)?;
        let (parts, mut recv) = response.into_parts();
        // A trailers-only answer (an error) carries its status in the headers; tonic decodes the
        // percent-encoded `grpc-message`.
        if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
            return Err(if status.code() == tonic::Code::Ok {
                tonic::Status::internal("a trailers-only answer without a message")
            } else {
                status
            });
        }
        if parts.status != http::StatusCode::OK {
            return Err(tonic::Status::unknown(format!(
                "HTTP status {}",
                parts.status
            )));
        }
        let mut message = bytes::BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(transport_error)?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            message.extend_from_slice(&chunk);
        }
        let trailers = recv.trailers().await.map_err(transport_error)?;
        match trailers.as_ref().and_then(tonic::Status::from_header_map) {
            Some(status) if status.code() == tonic::Code::Ok => {}
            Some(status) => return Err(status),
            None => return Err(tonic::Status::internal("an answer without grpc-status")),
        }
        if message.len() < 5 || message[0] != 0 {
            return Err(tonic::Status::internal(
                "an answer that is not one uncompressed message",
            ));
        }
        Resp::decode(&message[5..]).map_err(|e| tonic::Status::internal(e.to_string()))
    }

    async fn put(&mut self, req: PutRequest) -> Result<PutResponse, tonic::Status> {
        self.call("/etcdserverpb.KV/Put", &req).await
    }

    async fn range(&mut self, req: RangeRequest) -> Result<RangeResponse, tonic::Status> {
        self.call("/etcdserverpb.KV/Range", &req).await
    }

    async fn txn(&mut self, req: TxnRequest) -> Result<TxnResponse, tonic::Status> {
        self.call("/etcdserverpb.KV/Txn", &req).await
    }
}

/// `conns` unary connections spread over `endpoints`.
async fn connect_unary(endpoints: &[String], conns: usize) -> Result<Vec<UnaryConn>> {
    let mut out = Vec::with_capacity(conns);
    for i in 0..conns.max(1) {
        let ep = &endpoints[i % endpoints.len()];
        let uri: http::Uri = if ep.starts_with("http") {
            ep.parse()?
        } else {
            format!("http://{ep}").parse()?
        };
        if uri.scheme_str() != Some("http") {
            bail!("{uri}: the load generator speaks plain http only");
        }
        let authority = uri.authority().context("endpoint without host")?.as_str();
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(authority),
        )
        .await
        .with_context(|| format!("connecting to {uri}: timed out"))?
        .with_context(|| format!("connecting to {uri}"))?;
        tcp.set_nodelay(true)?;
        // Windows as hyper's client sets them by default, so that neither side waits on flow
        // control.
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .handshake::<_, Bytes>(tcp)
            .await
            .with_context(|| format!("HTTP/2 handshake with {uri}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        out.push(UnaryConn {
            send,
            origin: format!("http://{authority}").into(),
        });
    }
    Ok(out)
}

struct Outcome {
    errors: u64,
    first_error: Option<String>,
}

/// Longest latency a histogram holds, in microseconds; longer ones count as this.
const MAX_LATENCY_MICROS: u64 = 60_000_000;

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3).expect("valid histogram bounds")
}

/// Latencies recorded by many clients into a few shared histograms. One histogram of this range
/// and precision is about 200 KiB: one per client made 1000 clients allocate 200 MiB at start,
/// and the kernel's work supplying it, on the cores the servers share, delayed the first
/// requests of a run by up to 300 ms and set the p99 of short runs.
struct Latencies(Vec<parking_lot::Mutex<Histogram<u64>>>);

impl Latencies {
    /// Enough shards that runtime threads recording at once rarely meet on a lock.
    fn new() -> Latencies {
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get() * 4);
        Latencies(
            (0..shards)
                .map(|_| parking_lot::Mutex::new(latency_histogram()))
                .collect(),
        )
    }

    fn record(&self, client: usize, micros: u64) {
        let _ = self.0[client % self.0.len()]
            .lock()
            .record(micros.clamp(1, MAX_LATENCY_MICROS));
    }

    fn merged(&self) -> Result<Histogram<u64>> {
        let mut all = latency_histogram();
        for shard in &self.0 {
            all.add(&*shard.lock())?;
        }
        Ok(all)
    }
}

/// One lease kept alive over one stream: each round trip is a request.
struct KeepAlive {
    id: i64,
    tx: tokio::sync::mpsc::Sender<LeaseKeepAliveRequest>,
    rx: tonic::Streaming<metastore_proto::etcdserverpb::LeaseKeepAliveResponse>,
}

impl KeepAlive {
    async fn start(channel: Channel) -> KeepAlive {
        let mut lease = LeaseClient::new(channel);
        let id = lease
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
            .await
            .map(|r| r.into_inner().id)
            .unwrap_or(0);
        let (tx, body) = tokio::sync::mpsc::channel(1);
        // etcd (grpc-go) sends the response headers with the first response: queue a request
        // before waiting for the call, or both sides wait for each other.
        let _ = tx.send(LeaseKeepAliveRequest { id }).await;
        let mut rx = lease
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(body))
            .await
            .map(|r| r.into_inner())
            .expect("lease keep-alive stream");
        let _ = rx.message().await;
        KeepAlive { id, tx, rx }
    }

    async fn round_trip(&mut self) -> Result<(), tonic::Status> {
        self.tx
            .send(LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| tonic::Status::unavailable("keep-alive stream closed"))?;
        match self.rx.message().await? {
            Some(r) if r.ttl > 0 => Ok(()),
            Some(_) => Err(tonic::Status::not_found("lease expired")),
            None => Err(tonic::Status::unavailable("keep-alive stream closed")),
        }
    }
}

/// The endpoint of the member that leads, as each endpoint's Status says (waits up to 10 s for
/// an election).
async fn leader_endpoint(endpoints: &[String]) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for ep in endpoints {
            let channel = connect(std::slice::from_ref(ep), 1).await?.remove(0);
            let Ok(status) = MaintenanceClient::new(channel)
                .status(StatusRequest {})
                .await
            else {
                continue;
            };
            let status = status.into_inner();
            let member = status.header.map(|h| h.member_id).unwrap_or(0);
            if status.leader != 0 && status.leader == member {
                return Ok(ep.clone());
            }
        }
        if Instant::now() >= deadline {
            bail!("no endpoint among {endpoints:?} is the leader");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run(mut global: Global, work: Work) -> Result<()> {
    if global.endpoints.is_empty() {
        bail!("--endpoints is empty");
    }
    if global.target_leader {
        global.endpoints = vec![leader_endpoint(&global.endpoints).await?];
    }
    // Keep-alive streams need tonic's channel; every other workload is unary.
    let streaming = matches!(work, Work::LeaseKeepalive);
    let channels = if streaming {
        connect(&global.endpoints, global.conns).await?
    } else {
        Vec::new()
    };
    let unary = if streaming {
        Vec::new()
    } else {
        connect_unary(&global.endpoints, global.conns).await?
    };
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::new());
    let start = Instant::now();
    let deadline = (global.max_secs > 0).then(|| start + Duration::from_secs(global.max_secs));

    let bar = if global.no_progress || global.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(global.total)
    };
    let mut workers = Vec::new();
    for c in 0..global.clients.max(1) {
        let mut kv = unary.get(c % unary.len().max(1)).cloned();
        let issued = issued.clone();
        let done = done.clone();
        let latencies = latencies.clone();
        let work = work.clone();
        let (total, rate) = (global.total, global.rate);
        let lease_channel = channels.get(c % channels.len().max(1)).cloned();
        workers.push(tokio::spawn(async move {
            let mut keepalive = match (&work, lease_channel) {
                (Work::LeaseKeepalive, Some(channel)) => Some(KeepAlive::start(channel).await),
                _ => None,
            };
            let mut out = Outcome {
                errors: 0,
                first_error: None,
            };
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= total || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if rate > 0 {
                    let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let began = Instant::now();
                let result = match (&work, kv.as_mut()) {
                    (Work::Put(keys), Some(kv)) => kv.put(keys.put(n)).await.map(|_| ()),
                    (Work::Range(req), Some(kv)) => kv.range(req.clone()).await.map(|_| ()),
                    (Work::TxnPut(keys, ops), Some(kv)) => {
                        // Distinct keys within one txn (etcd refuses duplicates).
                        let base = if keys.sequential {
                            n * *ops as u64
                        } else {
                            rand::rng().random_range(0..keys.key_space)
                        };
                        let success = (0..*ops as u64)
                            .map(|i| RequestOp {
                                request: Some(Op::RequestPut(PutRequest {
                                    key: make_key((base + i) % keys.key_space, keys.key_size),
                                    value: keys.value.clone(),
                                    ..Default::default()
                                })),
                            })
                            .collect();
                        kv.txn(TxnRequest {
                            success,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                    }
                    (Work::TxnMixed(keys, rw_ratio), Some(kv)) => {
                        let read = rand::rng().random_bool(rw_ratio / (rw_ratio + 1.0));
                        let op = if read {
                            Op::RequestRange(RangeRequest {
                                key: keys.key(n),
                                ..Default::default()
                            })
                        } else {
                            Op::RequestPut(keys.put(n))
                        };
                        let txn = TxnRequest {
                            success: vec![RequestOp { request: Some(op) }],
                            ..Default::default()
                        };
                        kv.txn(txn).await.map(|_| ())
                    }
                    (Work::Mixed(keys, read_ratio, serializable), Some(kv)) => {
                        if rand::rng().random_bool(read_ratio.clamp(0.0, 1.0)) {
                            let req = RangeRequest {
                                key: keys.key(n),
                                serializable: *serializable,
                                ..Default::default()
                            };
                            kv.range(req).await.map(|_| ())
                        } else {
                            kv.put(keys.put(n)).await.map(|_| ())
                        }
                    }
                    (Work::LeaseKeepalive, _) => match keepalive.as_mut() {
                        Some(k) => k.round_trip().await,
                        None => Err(tonic::Status::internal("no lease")),
                    },
                    (_, None) => Err(tonic::Status::internal("no connection")),
                };
                let micros = began.elapsed().as_micros().max(1) as u64;
                match result {
                    Ok(()) => {
                        latencies.record(c, micros);
                    }
                    Err(status) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| {
                            format!("{:?}: {}", status.code(), status.message())
                        });
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            out
        }));
    }
    let ticker = {
        let bar = bar.clone();
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut errors = 0;
    let mut first_error = None;
    for w in workers {
        let out = w.await?;
        errors += out.errors;
        if first_error.is_none() {
            first_error = out.first_error;
        }
    }
    ticker.abort();
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    report(&global, &latencies.merged()?, errors, first_error, elapsed);
    Ok(())
}

/// What a watch benchmark creates and writes (`watch` and `watch-latency`).
struct WatchSpec {
    streams: usize,
    /// Watchers in all, spread over the streams; watcher `i` watches `keys[i % keys.len()]`.
    watchers: usize,
    keys: Vec<Vec<u8>>,
    /// Put `n` writes `keys[n % keys.len()]`.
    puts: u64,
    /// Puts per second; 0 = no limit.
    rate: u64,
    val_size: usize,
    /// Report the watchers' creation first (`watch`).
    creation_summary: bool,
}

impl WatchSpec {
    /// Events the puts cause, over all watchers.
    fn expected_events(&self) -> u64 {
        let k = self.keys.len().max(1);
        let watchers_of =
            |key: usize| (self.watchers / k + usize::from(key < self.watchers % k)) as u64;
        (0..k)
            .map(|key| {
                let puts = self.puts / k as u64 + u64::from((key as u64) < self.puts % k as u64);
                puts * watchers_of(key)
            })
            .sum()
    }
}

/// Watchers over `spec.streams` streams, then writers putting to the watched keys; every event
/// is timed from the moment its put was sent.
async fn watch_bench(mut global: Global, spec: WatchSpec) -> Result<()> {
    if global.target_leader {
        global.endpoints = vec![leader_endpoint(&global.endpoints).await?];
    }
    if spec.keys.is_empty() {
        bail!("no key to watch");
    }
    let channels = connect(&global.endpoints, global.conns).await?;
    let streams = spec.streams.clamp(1, spec.watchers.max(1));
    // Send time of each put, by the value's sequence number.
    let acked: Arc<parking_lot::Mutex<std::collections::HashMap<u64, Instant>>> =
        Default::default();
    let expected = spec.expected_events();
    let received = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(streams);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let latencies = Arc::new(Latencies::new());
    let creations = Arc::new(Latencies::new());
    let created_at = Instant::now();
    let mut listeners = Vec::new();
    let mut next_watcher = 0;
    for s in 0..streams {
        let per_stream = spec.watchers / streams + usize::from(s < spec.watchers % streams);
        let mut client = WatchClient::new(channels[s % channels.len()].clone());
        let (tx, body) = tokio::sync::mpsc::channel(per_stream.max(1));
        let sent = Instant::now();
        for _ in 0..per_stream {
            tx.send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(
                    WatchCreateRequest {
                        key: spec.keys[next_watcher % spec.keys.len()].clone(),
                        ..Default::default()
                    },
                )),
            })
            .await?;
            next_watcher += 1;
        }
        let mut events = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(body))
            .await?
            .into_inner();
        let acked = acked.clone();
        let received = received.clone();
        let latencies = latencies.clone();
        let creations = creations.clone();
        let ready = ready_tx.clone();
        let mut stop = stop_rx.clone();
        listeners.push(tokio::spawn(async move {
            let _keep_open = tx;
            let mut created = 0;
            loop {
                let resp = tokio::select! {
                    msg = events.message() => match msg {
                        Ok(Some(resp)) => resp,
                        _ => break,
                    },
                    _ = stop.wait_for(|s| *s) => break,
                };
                if resp.created {
                    creations.record(s, sent.elapsed().as_micros().max(1) as u64);
                    created += 1;
                    if created == per_stream {
                        let _ = ready.send(()).await;
                    }
                    continue;
                }
                let now = Instant::now();
                for ev in resp.events {
                    let Some(kv) = ev.kv else { continue };
                    let seq: u64 = String::from_utf8_lossy(&kv.value[..kv.value.len().min(20)])
                        .trim_end_matches('v')
                        .parse()
                        .unwrap_or(u64::MAX);
                    let at = acked.lock().get(&seq).copied();
                    let micros = at.map_or(1, |t| {
                        now.saturating_duration_since(t).as_micros().max(1) as u64
                    });
                    latencies.record(s, micros);
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    drop(ready_tx);
    for _ in 0..streams {
        ready_rx
            .recv()
            .await
            .context("a watch stream ended before its watchers were created")?;
    }
    if spec.creation_summary {
        let elapsed = created_at.elapsed().as_secs_f64();
        if !global.json {
            println!("Watch creation summary:");
        }
        report(&global, &creations.merged()?, 0, None, elapsed);
        if !global.json {
            println!("\nWatch events received summary:");
        }
    }

    let start = Instant::now();
    let issued = Arc::new(AtomicU64::new(0));
    let keys = Arc::new(spec.keys);
    let mut writers = Vec::new();
    for c in 0..global.clients.max(1) {
        let mut kv = metastore_proto::etcdserverpb::kv_client::KvClient::new(
            channels[c % channels.len()].clone(),
        );
        let (issued, acked, keys) = (issued.clone(), acked.clone(), keys.clone());
        let (total, rate, val_size) = (spec.puts, spec.rate, spec.val_size);
        writers.push(tokio::spawn(async move {
            let mut errors = 0u64;
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                if rate > 0 {
                    let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let mut value = format!("{n:020}").into_bytes();
                value.resize(val_size.max(20), b'v');
                // Latency counts from the moment the put is sent, as etcd's tool does.
                acked.lock().insert(n, Instant::now());
                let put = PutRequest {
                    key: keys[(n % keys.len() as u64) as usize].clone(),
                    value,
                    ..Default::default()
                };
                if kv.put(put).await.is_err() {
                    errors += 1;
                }
            }
            errors
        }));
    }
    let mut errors = 0;
    for w in writers {
        errors += w.await?;
    }
    // A failed put causes no events; how many it would have caused depends on its key, so the
    // wait allows for the most watched key's count per failure.
    let most_watchers = spec.watchers.div_ceil(keys.len()) as u64;
    let wait_until = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < expected.saturating_sub(errors * most_watchers)
        && Instant::now() < wait_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for l in listeners {
        let _ = l.await;
    }
    let histogram = latencies.merged()?;
    let got = received.load(Ordering::Relaxed);
    let first_error =
        (got < expected).then(|| format!("{} of {expected} events not received", expected - got));
    // Throughput here is events delivered per second.
    report(&global, &histogram, errors, first_error, elapsed);
    Ok(())
}

fn report(
    global: &Global,
    h: &Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    elapsed: f64,
) {
    let ok = h.len();
    let ms = |micros: u64| micros as f64 / 1000.0;
    let rps = if elapsed > 0.0 {
        ok as f64 / elapsed
    } else {
        0.0
    };
    if global.json {
        println!(
            "{{\"requests\":{ok},\"errors\":{errors},\"seconds\":{elapsed:.3},\"requests_per_sec\":{rps:.1},\
\"avg_ms\":{:.3},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3},\
\"clients\":{},\"conns\":{}}}",
            h.mean() / 1000.0,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max()),
            global.clients,
            global.conns,
        );
        return;
    }
    println!("Summary:");
    println!("  Total:        {elapsed:.4} secs.");
    println!("  Requests:     {ok} ok, {errors} failed");
    println!("  Slowest:      {:.4} ms.", ms(h.max()));
    println!("  Fastest:      {:.4} ms.", ms(h.min()));
    println!("  Average:      {:.4} ms.", h.mean() / 1000.0);
    println!("  Requests/sec: {rps:.1}");
    println!("\nLatency distribution:");
    for (label, q) in [("50%", 0.5), ("90%", 0.9), ("99%", 0.99), ("99.9%", 0.999)] {
        println!("  {label} in {:.4} ms.", ms(h.value_at_quantile(q)));
    }
    if let Some(e) = first_error {
        println!("\nFirst error: {e}");
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match cli.global.threads {
        0 => std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .saturating_mul(2)
            .max(4),
        n => n,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(threads).enable_all();
    // Requests that clients of one connection issue together then leave in one write, as Go's
    // gRPC client sends them (see .cargo/config.toml).
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    runtime.build()?.block_on(run_command(cli))
}

async fn run_command(cli: Cli) -> Result<()> {
    let work = match cli.command {
        Cmd::Put {
            key_size,
            val_size,
            key_space_size,
            sequential_keys,
        } => Work::Put(KeyGen::new(&KeyArgs {
            key_size,
            val_size,
            key_space_size,
            sequential_keys,
        })),
        Cmd::TxnPut { keys, txn_ops } => Work::TxnPut(KeyGen::new(&keys), txn_ops.max(1)),
        Cmd::TxnMixed { keys, rw_ratio } => Work::TxnMixed(KeyGen::new(&keys), rw_ratio.max(0.0)),
        Cmd::Mixed {
            keys,
            read_ratio,
            consistency,
        } => Work::Mixed(
            KeyGen::new(&keys),
            read_ratio,
            matches!(consistency, Consistency::S),
        ),
        Cmd::LeaseKeepalive => Work::LeaseKeepalive,
        Cmd::WatchLatency {
            watchers,
            watch_streams,
            val_size,
        } => {
            let spec = WatchSpec {
                streams: watch_streams,
                watchers,
                keys: vec![b"metastore-bench-watch-latency".to_vec()],
                puts: cli.global.total,
                rate: cli.global.rate,
                val_size,
                creation_summary: false,
            };
            return watch_bench(cli.global, spec).await;
        }
        Cmd::Watch {
            streams,
            watch_per_stream,
            watched_key_total,
            put_total,
            put_rate,
            key_size,
            val_size,
        } => {
            let spec = WatchSpec {
                streams,
                watchers: streams.saturating_mul(watch_per_stream),
                keys: (0..watched_key_total.max(1) as u64)
                    .map(|i| make_key(i, key_size.max(1)))
                    .collect(),
                puts: put_total,
                rate: put_rate,
                val_size,
                creation_summary: true,
            };
            return watch_bench(cli.global, spec).await;
        }
        Cmd::Range {
            key,
            end,
            consistency,
            limit,
        } => Work::Range(RangeRequest {
            key: key.into_bytes(),
            range_end: end.map(String::into_bytes).unwrap_or_default(),
            serializable: matches!(consistency, Consistency::S),
            limit,
            ..Default::default()
        }),
    };
    run(cli.global, work).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::kv_server::{Kv, KvServer};
    use metastore_proto::etcdserverpb::{
        CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
        ResponseHeader,
    };
    use metastore_proto::mvccpb::KeyValue;
    use tonic::{Request, Response, Status};

    /// A KV service whose answers are computed from the request, to check what the load
    /// generator's gRPC client sends and decodes.
    struct Echo;

    #[tonic::async_trait]
    impl Kv for Echo {
        async fn range(&self, r: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
            // `limit` values of 1 KiB each: large answers span many frames and window updates.
            let r = r.into_inner();
            let kvs = (0..r.limit)
                .map(|i| KeyValue {
                    key: [r.key.as_slice(), &i.to_be_bytes()].concat(),
                    value: vec![i as u8; 1024],
                    ..Default::default()
                })
                .collect();
            Ok(Response::new(RangeResponse {
                kvs,
                count: r.limit,
                ..Default::default()
            }))
        }

        async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
            let r = r.into_inner();
            Ok(Response::new(PutResponse {
                header: Some(ResponseHeader {
                    revision: r.value.len() as i64,
                    ..Default::default()
                }),
                prev_kv: Some(KeyValue {
                    key: r.key,
                    ..Default::default()
                }),
            }))
        }

        async fn delete_range(
            &self,
            _: Request<DeleteRangeRequest>,
        ) -> Result<Response<DeleteRangeResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
            Err(Status::invalid_argument(
                "etcdserver: duplicate key given in txn request",
            ))
        }

        async fn compact(
            &self,
            _: Request<CompactionRequest>,
        ) -> Result<Response<CompactionResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    #[test]
    fn watch_events_expected_follow_the_keys_watchers() {
        let spec = |watchers, keys: usize, puts| WatchSpec {
            streams: 1,
            watchers,
            keys: (0..keys as u64).map(|i| make_key(i, 4)).collect(),
            puts,
            rate: 0,
            val_size: 32,
            creation_summary: false,
        };
        // One key: every put reaches every watcher.
        assert_eq!(spec(100, 1, 1000).expected_events(), 100_000);
        // Watchers 0, 3, 6, 9 on key 0, the others 3 each; puts 0, 3, 6 on key 0, 2 on each
        // of the others: 4*3 + 3*2 + 3*2.
        assert_eq!(spec(10, 3, 7).expected_events(), 24);
        // More keys than watchers: puts to unwatched keys cause nothing.
        assert_eq!(spec(2, 5, 10).expected_events(), 4);
    }

    #[tokio::test]
    async fn unary_calls_carry_requests_answers_and_errors() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(KvServer::new(Echo))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut conns = connect_unary(&[addr.to_string()], 2).await.unwrap();
        assert_eq!(conns.len(), 2);
        let conn = &mut conns[1];

        let put = conn
            .put(PutRequest {
                key: b"k1".to_vec(),
                value: vec![7; 300],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(put.header.unwrap().revision, 300);
        assert_eq!(put.prev_kv.unwrap().key, b"k1");

        // About 5 MiB: more than the stream's and the connection's flow-control windows.
        let range = conn
            .range(RangeRequest {
                key: b"r".to_vec(),
                limit: 5000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(range.kvs.len(), 5000);
        assert_eq!(range.kvs[4999].value, vec![(4999 % 256) as u8; 1024]);

        let err = conn.txn(TxnRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "etcdserver: duplicate key given in txn request"
        );

        // The connection still serves calls after an error, many at once.
        let calls: Vec<_> = (0..50)
            .map(|i| {
                let mut conn = conn.clone();
                tokio::spawn(async move {
                    conn.put(PutRequest {
                        value: vec![0; i],
                        ..Default::default()
                    })
                    .await
                })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            let put = call.await.unwrap();
            assert_eq!(put.unwrap().header.unwrap().revision, i as i64);
        }
    }

    #[test]
    fn keys_have_the_requested_size() {
        assert_eq!(make_key(7, 8), b"00000007");
        assert_eq!(make_key(123_456, 3), b"456");
        assert_eq!(make_key(0, 1), b"0");
    }
}
