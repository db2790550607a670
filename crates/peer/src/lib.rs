//! Member-to-member communication on the peer URLs: raft streams ([`stream`]) for raft message
//! batches, gRPC (the `metastorepb.Peer` service) for everything else.
//!
//! Owns:
//! - [`PeerNetwork`], raft-node's [`Transport`]: one queue and one sending task per member. A task
//!   writes everything queued as one batch to its raft stream (the gRPC `Raft` call for a member
//!   that does not answer raft streams), so batches grow with the load; a full queue drops messages
//!   and tells raft the member is unreachable (backpressure: raft then probes instead of
//!   streaming). Snapshot messages carry only metadata; their file is streamed in 1 MiB chunks from
//!   disk, so neither side holds a whole snapshot in memory.
//! - [`PeerService`], the receiving side: tells raft streams from gRPC on the peer port
//!   ([`PeerService::route`]), checks the cluster id of every request, hands messages to raft,
//!   writes streamed snapshots to disk before raft sees the message, answers membership queries (a
//!   member joining an existing cluster learns its id from them) and lease requests forwarded by
//!   followers to the leader.
//!
//! Must not know about: mvcc, the engines, the client API. Membership and leases are reached
//! through the [`MemberSource`] closure and the [`LeaseHandler`] trait.

mod stream;

pub use stream::{Accepted, Rewind};

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metastore_proto::metastorepb::peer_client::PeerClient;
use metastore_proto::metastorepb::peer_server::{Peer, PeerServer};
use metastore_proto::metastorepb::{
    HashKvForward, HashKvForwardResponse, LeaseForward, LeaseForwardResponse, Member,
    MembersRequest, MembersResponse, PeerAck, ProgressResponse, RaftBatch, RemovedNotice,
    SnapshotChunk,
};
use metastore_raft_node::{Message, MessageType, RaftNode, Transport};
use parking_lot::Mutex;
use protobuf::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

/// Messages queued for one member before new ones are dropped.
const QUEUE_LEN: usize = 8192;
/// Largest batch sent in one call, in bytes (one message may exceed it alone).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Largest request a member accepts from a peer.
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Size of one snapshot chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// Pause after a failed call before the next one, so an unreachable member costs no busy loop.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Batches buffered on a member's stream before the sender waits (backpressure).
const STREAM_BATCHES: usize = 64;
/// Bound on one request-response call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often each peer's round trip is measured (etcd's prober: every 4 s).
const PROBE_INTERVAL: Duration = Duration::from_secs(4);
/// How long a member that did not answer the raft stream (an earlier version, which speaks only
/// gRPC) is sent batches over the gRPC `Raft` call before the raft stream is tried again.
const GRPC_FALLBACK: Duration = Duration::from_secs(60);
/// Bound on writing one batch to a raft stream: a peer that reads nothing for this long (paused,
/// or gone without a reset) loses the connection, as an HTTP/2 stream whose pings went
/// unanswered did.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive on raft streams (idle time, then probes this far apart), and how long sent
/// bytes may stay unacknowledged (`TCP_USER_TIMEOUT`): a peer that vanished without a reset is
/// noticed even on a stream with nothing to write, as HTTP/2 pings did.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const UNACKED_TIMEOUT: Duration = Duration::from_secs(15);
/// At most one warning per member per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(5);

/// The current members (for Members queries).
pub type MemberSource = Arc<dyn Fn() -> Vec<Member> + Send + Sync>;

/// Whether raft messages from a member id are accepted: false only for a member that a committed
/// change removed (not for one this member merely does not know yet).
pub type MemberCheck = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// What a removed member is told when it sends raft messages (etcd's wording).
const REMOVED_MESSAGE: &str = "the member has been permanently removed from the cluster";

/// The peer URLs of a member id, as currently known (membership table, then `--initial-cluster`).
pub type UrlResolver = Arc<dyn Fn(u64) -> Vec<String> + Send + Sync>;

/// Decides on a removal notice from member `from` (a member of this member's configuration):
/// true when `from` confirms the removal, and this member then stops (see
/// [`PeerNetwork::confirm_removal`]).
pub type RemovalCheck =
    Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// What the leader does with lease requests forwarded by followers.
pub trait LeaseHandler: Send + Sync + 'static {
    /// Renews lease `id`; its TTL, or `None` when it is unknown or expired.
    fn renew(&self, id: i64) -> Option<i64>;
    /// Remaining and granted TTL of lease `id`, or `None` when it is unknown.
    fn ttl(&self, id: i64) -> Option<(i64, i64)>;
    /// This member's HashKV at `revision`: (hash, compact revision, hash revision), or etcd's
    /// error status.
    fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), Status>;
}

/// The error a member of another cluster gets.
fn cluster_mismatch(mine: u64, theirs: u64) -> Status {
    Status::failed_precondition(format!(
        "cluster id mismatch: this member belongs to cluster {mine:x}, the request to cluster \
         {theirs:x} (check --initial-cluster and --initial-cluster-token)"
    ))
}

/// How this member reaches `https://` peers: the rustls client configuration (trust, its own
/// certificate, versions and cipher suites), built by the server from the `--peer-*` flags.
pub type PeerTls = std::sync::Arc<tokio_rustls::rustls::ClientConfig>;

/// A channel to the peer at `url`. `tls` is how this member reaches `https://` peers: the
/// handshake is rustls' own, under the channel's HTTP/2 (tonic's TLS cannot take versions,
/// cipher suites or `--peer-auto-tls`'s unverified certificates).
fn channel_to(url: &str, tls: Option<&PeerTls>) -> Result<Channel, Status> {
    let tls = match url.strip_prefix("https://") {
        Some(rest) => Some((
            tls.cloned().ok_or_else(|| {
                Status::failed_precondition(format!(
                    "peer URL {url} is https:// but no peer TLS was configured"
                ))
            })?,
            format!("http://{rest}"),
        )),
        None => None,
    };
    let target = tls.as_ref().map_or(url, |(_, plain)| plain.as_str());
    let endpoint = Endpoint::from_shared(target.to_string())
        .map_err(|e| Status::invalid_argument(format!("bad peer URL {url:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let Some((config, _)) = tls else {
        return Ok(endpoint.connect_lazy());
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(
        move |uri: tonic::codegen::http::Uri| {
            let connector = connector.clone();
            async move {
                let (host, port) = host_port(&uri)?;
                let tcp = open_tcp(&host, port).await?;
                let stream = tls_handshake(&connector, host, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        },
    )))
}

/// The host (without IPv6 brackets) and port of a peer URL; the port defaults to the scheme's.
fn host_port(uri: &tonic::codegen::http::Uri) -> io::Result<(String, u16)> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("peer URL {uri}: {what}"),
        )
    };
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = match (uri.port_u16(), uri.scheme_str()) {
        (Some(port), _) => port,
        (None, Some("https")) => 443,
        (None, _) => 80,
    };
    Ok((host, port))
}

/// A TCP connection to `host:port`, within [`CONNECT_TIMEOUT`], without Nagle's delay.
async fn open_tcp(host: &str, port: u16) -> io::Result<tokio::net::TcpStream> {
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to a peer timed out"))??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// rustls' handshake with the peer `host` over `tcp`.
async fn tls_handshake(
    connector: &tokio_rustls::TlsConnector,
    host: String,
    tcp: tokio::net::TcpStream,
) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    connector.connect(name, tcp).await
}

/// A connection to a peer: TCP, or TLS over it.
trait PeerIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> PeerIo for T {}

/// A connection for a raft stream.
enum Dialed {
    Tcp(tokio::net::TcpStream),
    Tls(Box<dyn PeerIo>),
}

/// A connection for a raft stream to the peer at `url` (TLS for `https://`, with `tls`), with
/// TCP keep-alive.
async fn dial(url: &str, tls: Option<&PeerTls>) -> io::Result<Dialed> {
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad peer URL {url:?}: {e}"),
        )
    })?;
    let (host, port) = host_port(&uri)?;
    let tcp = open_tcp(&host, port).await?;
    let socket = socket2::SockRef::from(&tcp);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL),
    )?;
    socket.set_tcp_user_timeout(Some(UNACKED_TIMEOUT))?;
    if uri.scheme_str() != Some("https") {
        return Ok(Dialed::Tcp(tcp));
    }
    let config = tls.cloned().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("peer URL {url} is https:// but no peer TLS was configured"),
        )
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    Ok(Dialed::Tls(Box::new(
        tls_handshake(&connector, host, tcp).await?,
    )))
}

/// The writing half of a raft stream.
enum Writer {
    /// Plain TCP: shared, so that it can be lent to [`Transport::send`] ([`Direct`]).
    Tcp(Arc<tokio::net::tcp::OwnedWriteHalf>),
    Tls(tokio::io::WriteHalf<Box<dyn PeerIo>>),
}

impl Writer {
    /// The socket to lend, if this stream can be written without the sending task.
    fn lendable(&self) -> Option<Arc<tokio::net::tcp::OwnedWriteHalf>> {
        match self {
            Writer::Tcp(socket) => Some(Arc::clone(socket)),
            Writer::Tls(_) => None,
        }
    }

    async fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        match self {
            Writer::Tcp(socket) => {
                while !bytes.is_empty() {
                    socket.writable().await?;
                    match socket.try_write(bytes) {
                        Ok(n) => bytes = &bytes[n..],
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Writer::Tls(half) => {
                half.write_all(bytes).await?;
                half.flush().await
            }
        }
    }
}

/// What a member's sending task shares with [`Transport::send`].
struct Link {
    queue: mpsc::Sender<Message>,
    direct: Direct,
    sent_bytes: metrics::Counter,
}

/// A raft stream's socket, lent to [`Transport::send`] while the sending task waits with nothing
/// queued: the raft loop then writes its batch to the socket itself (a write that never
/// blocks), which spares a wake-up of the sending task at each crossing of a ReadIndex round.
/// Plain TCP streams only (a TLS stream's writes need its task).
#[derive(Default)]
struct Direct {
    state: Mutex<DirectState>,
    /// Wakes the sending task for [`DirectState::rest`].
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct DirectState {
    /// The lent socket: whoever holds the lock and finds it here may write one whole frame, or
    /// leave what it could not write in `rest` and take the socket away.
    socket: Option<Arc<tokio::net::tcp::OwnedWriteHalf>>,
    /// The end of a frame a caller could not write whole: the sending task writes it first.
    rest: Vec<u8>,
}

/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn client(channel: Channel) -> PeerClient<Channel> {
    PeerClient::new(channel)
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES)
}

/// Sends raft messages to the other members and forwards requests to the leader.
pub struct PeerNetwork<O> {
    inner: Arc<Inner<O>>,
}

impl<O> Clone for PeerNetwork<O> {
    fn clone(&self) -> Self {
        PeerNetwork {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<O> {
    cluster_id: u64,
    member_id: u64,
    node: OnceLock<RaftNode<O>>,
    resolve: UrlResolver,
    links: Mutex<HashMap<u64, Arc<Link>>>,
    /// One channel per peer URL for unary calls (lease forwarding, progress, HashKV): a tonic
    /// channel multiplexes calls over one connection and reconnects by itself. Without it every
    /// forwarded lease keep-alive opened a new TCP and HTTP/2 connection to the leader.
    channels: Mutex<HashMap<String, Channel>>,
    runtime: tokio::runtime::Handle,
    /// How this member reaches `https://` peers; `None`: it cannot.
    tls: Option<PeerTls>,
    /// A peer answered that this member was removed from the cluster.
    removed: AtomicBool,
}

impl<O: Send + 'static> PeerNetwork<O> {
    /// A network for member `member_id` of cluster `cluster_id`, spawning its tasks on
    /// `runtime` and reaching `https://` peers with `tls` (`None`: only `http://` peers).
    /// Call [`PeerNetwork::set_node`] once the raft node is started.
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        resolve: UrlResolver,
        runtime: tokio::runtime::Handle,
        tls: Option<PeerTls>,
    ) -> Self {
        PeerNetwork {
            inner: Arc::new(Inner {
                cluster_id,
                member_id,
                node: OnceLock::new(),
                resolve,
                channels: Mutex::new(HashMap::new()),
                links: Mutex::new(HashMap::new()),
                runtime,
                tls,
                removed: AtomicBool::new(false),
            }),
        }
    }

    /// The raft node whose messages this network carries (for unreachable and snapshot
    /// reports, and to read snapshot files). Messages sent before are dropped.
    pub fn set_node(&self, node: RaftNode<O>) {
        let _ = self.inner.node.set(node);
    }

    /// Whether a peer told this member that it was removed from the cluster (it missed the
    /// commit of its own removal): it must stop.
    pub fn removed(&self) -> bool {
        self.inner.removed.load(Ordering::Relaxed)
    }

    /// Marks this member as removed (see [`PeerNetwork::removed`]).
    pub fn mark_removed(&self) {
        self.inner.removed.store(true, Ordering::Relaxed);
    }

    /// Whether member `from`, reached at the URLs this member knows for it, confirms that its
    /// membership (what it applied: committed changes only) no longer has this member; if so,
    /// marks this member removed. The check a removal notice from `from` must pass, so that no
    /// one but a member of the cluster can make this member stop.
    pub async fn confirm_removal(&self, from: u64) -> bool {
        for url in (self.inner.resolve)(from) {
            let Ok(channel) = self.channel(&url) else {
                continue;
            };
            let mut peer = client(channel);
            let call = peer.members(MembersRequest {
                cluster_id: self.inner.cluster_id,
            });
            let Ok(Ok(answer)) = tokio::time::timeout(CALL_TIMEOUT, call).await else {
                continue;
            };
            let answer = answer.into_inner();
            let removed = answer.cluster_id == self.inner.cluster_id
                && !answer.members.is_empty()
                && !answer.members.iter().any(|m| m.id == self.inner.member_id);
            if removed {
                self.mark_removed();
            }
            return removed;
        }
        false
    }

    /// Tells member `to`, at `urls` (its URLs before it was removed), that it was removed.
    /// Best effort: a member that cannot be reached learns it when it next talks to a peer.
    pub async fn notify_removed(&self, to: u64, urls: &[String]) {
        for url in urls {
            let Ok(channel) = channel_to(url, self.inner.tls.as_ref()) else {
                continue;
            };
            let mut peer = client(channel);
            let call = peer.removed(RemovedNotice {
                cluster_id: self.inner.cluster_id,
                member_id: to,
                from: self.inner.member_id,
            });
            if let Ok(Ok(_)) = tokio::time::timeout(CALL_TIMEOUT, call).await {
                return;
            }
        }
    }

    /// Renews lease `id` on member `to` (the leader): its TTL, or `None` if unknown there.
    pub async fn lease_renew(&self, to: u64, id: i64) -> Result<Option<i64>, Status> {
        let resp = self
            .call(to, |mut c, req| async move { c.lease_renew(req).await }, id)
            .await?;
        Ok(resp.found.then_some(resp.ttl))
    }

    /// Remaining and granted TTL of lease `id` on member `to` (the leader).
    pub async fn lease_ttl(&self, to: u64, id: i64) -> Result<Option<(i64, i64)>, Status> {
        let resp = self
            .call(to, |mut c, req| async move { c.lease_ttl(req).await }, id)
            .await?;
        Ok(resp.found.then_some((resp.ttl, resp.granted_ttl)))
    }

    /// The replication progress (match index by member) as leader `to` sees it.
    pub async fn leader_progress(&self, to: u64) -> Result<Vec<(u64, u64)>, Status> {
        let urls = (self.inner.resolve)(to);
        let url = urls
            .first()
            .ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
        let mut peer = client(self.channel(url)?);
        let call = peer.progress(MembersRequest {
            cluster_id: self.inner.cluster_id,
        });
        let resp = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::unavailable("etcdserver: request timed out")),
        };
        Ok(resp.ids.into_iter().zip(resp.matched).collect())
    }

    /// Member `to`'s HashKV at `revision`.
    pub async fn hash_kv(&self, to: u64, revision: i64) -> Result<HashKvForwardResponse, Status> {
        let urls = (self.inner.resolve)(to);
        let url = urls
            .first()
            .ok_or_else(|| Status::unavailable("no peer URL known for this member"))?;
        let mut peer = client(self.channel(url)?);
        let call = peer.hash_kv(HashKvForward {
            cluster_id: self.inner.cluster_id,
            revision,
        });
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::unavailable("etcdserver: request timed out")),
        }
    }

    async fn call<F, Fut>(&self, to: u64, f: F, id: i64) -> Result<LeaseForwardResponse, Status>
    where
        F: Fn(PeerClient<Channel>, LeaseForward) -> Fut,
        Fut: std::future::Future<Output = Result<Response<LeaseForwardResponse>, Status>>,
    {
        let urls = (self.inner.resolve)(to);
        let url = urls
            .first()
            .ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
        let req = LeaseForward {
            cluster_id: self.inner.cluster_id,
            id,
        };
        match tokio::time::timeout(CALL_TIMEOUT, f(client(self.channel(url)?), req)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::unavailable("etcdserver: request timed out")),
        }
    }

    /// Measures the round trip to every other member every [`PROBE_INTERVAL`] (a `Members`
    /// call on the shared channel), as etcd's prober does, into
    /// `etcd_network_peer_round_trip_time_seconds{To}`. Stops when the network is dropped.
    pub fn spawn_prober(&self) {
        let network = Arc::downgrade(&self.inner);
        self.inner.runtime.spawn(async move {
            let mut every = tokio::time::interval(PROBE_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(inner) = network.upgrade() else {
                    return;
                };
                let network = PeerNetwork { inner };
                let Some(node) = network.inner.node.get() else {
                    continue;
                };
                let peers: Vec<u64> = node.with_status(|s| {
                    let m = &s.membership;
                    m.voters.iter().chain(&m.learners).copied().collect()
                });
                for to in peers
                    .into_iter()
                    .filter(|id| *id != network.inner.member_id)
                {
                    let network = network.clone();
                    tokio::spawn(async move { network.probe(to).await });
                }
            }
        });
    }

    /// One round trip to member `to`, recorded when it answered.
    async fn probe(&self, to: u64) {
        let urls = (self.inner.resolve)(to);
        let Some(url) = urls.first() else {
            return;
        };
        let Ok(channel) = self.channel(url) else {
            return;
        };
        let mut peer = client(channel);
        let started = Instant::now();
        let call = peer.members(MembersRequest {
            cluster_id: self.inner.cluster_id,
        });
        if let Ok(Ok(_)) = tokio::time::timeout(CALL_TIMEOUT, call).await {
            metrics::histogram!("etcd_network_peer_round_trip_time_seconds", "To" => hex(to))
                .record(started.elapsed().as_secs_f64());
        }
    }

    /// The shared channel to `url` for unary calls.
    fn channel(&self, url: &str) -> Result<Channel, Status> {
        let mut channels = self.inner.channels.lock();
        if let Some(channel) = channels.get(url) {
            return Ok(channel.clone());
        }
        let channel = channel_to(url, self.inner.tls.as_ref())?;
        channels.insert(url.to_string(), channel.clone());
        Ok(channel)
    }

    fn link_for(&self, to: u64) -> Arc<Link> {
        let mut links = self.inner.links.lock();
        if let Some(link) = links.get(&to) {
            if !link.queue.is_closed() {
                return Arc::clone(link);
            }
        }
        let (queue, rx) = mpsc::channel(QUEUE_LEN);
        let link = Arc::new(Link {
            queue,
            direct: Direct::default(),
            sent_bytes: metrics::counter!("etcd_network_peer_sent_bytes_total", "To" => hex(to)),
        });
        links.insert(to, Arc::clone(&link));
        let (network, task_link) = (self.clone(), Arc::clone(&link));
        self.inner
            .runtime
            .spawn(async move { network.run_sender(to, rx, task_link).await });
        link
    }

    /// Sends `messages` (all to `to`, in order): written to the lent socket when the sending
    /// task lends it, queued for the task otherwise.
    fn send_to(&self, to: u64, messages: Vec<Message>) {
        let link = self.link_for(to);
        let mut state = link.direct.state.lock();
        let Some(socket) = state.socket.clone() else {
            // Queued under the lock, so the task cannot lend the socket between this check and
            // the queueing (a later batch written directly would pass these).
            for msg in messages {
                if link.queue.try_send(msg).is_err() {
                    sent_failure(to);
                    self.report_unreachable(to);
                }
            }
            return;
        };
        let encoded = messages
            .iter()
            .filter_map(|m| m.write_to_bytes().ok())
            .collect();
        let batch = self.batch_of(to, encoded, &link.sent_bytes);
        let mut frame = Vec::new();
        stream::encode_frame(&batch, &mut frame);
        let written = match socket.try_write(&frame) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            // The stream broke: the task hears it from the reading half. The batch is lost, as
            // on a broken stream anyway; raft sends again.
            Err(_) => {
                state.socket = None;
                link.direct.wake.notify_one();
                return;
            }
        };
        if written < frame.len() {
            state.socket = None;
            state.rest = frame.split_off(written);
            link.direct.wake.notify_one();
        }
    }

    /// A batch of encoded `messages` to `to`, counted in `sent` (bytes sent to the member).
    fn batch_of(&self, to: u64, messages: Vec<Vec<u8>>, sent: &metrics::Counter) -> RaftBatch {
        sent.increment(messages.iter().map(|m| m.len() as u64).sum());
        RaftBatch {
            cluster_id: self.inner.cluster_id,
            from: self.inner.member_id,
            to,
            messages,
        }
    }

    fn report_unreachable(&self, to: u64) {
        if let Some(node) = self.inner.node.get() {
            node.report_unreachable(to);
        }
    }

    /// Sends batches to member `to` over one long-lived stream until the network is dropped;
    /// opens a new stream after a failure. The stream is a raft stream ([`stream`]), or the
    /// gRPC `Raft` call for a member that does not answer one.
    async fn run_sender(self, to: u64, mut rx: mpsc::Receiver<Message>, link: Arc<Link>) {
        let mut last_warning: Option<Instant> = None;
        let mut grpc_until: Option<Instant> = None;
        loop {
            // Wait for something to send before connecting.
            let Some(first) = rx.recv().await else {
                return;
            };
            let urls = (self.inner.resolve)(to);
            let Some(url) = urls.first().cloned() else {
                warn_limited(&mut last_warning, to, "no peer URL known for this member");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            };
            let over_grpc = grpc_until.is_some_and(|until| Instant::now() < until);
            let ended = if over_grpc {
                self.grpc_stream(to, &url, first, &mut rx, &link.sent_bytes)
                    .await
            } else {
                self.raft_stream(to, &url, first, &mut rx, &link).await
            };
            let failure = match ended {
                StreamEnd::Dropped => return,
                StreamEnd::Unsupported => {
                    // The batch written before the answer is lost; raft sends again.
                    tracing::info!(
                        to = format_args!("{to:x}"),
                        "the member does not answer raft streams; sending over gRPC"
                    );
                    grpc_until = Some(Instant::now() + GRPC_FALLBACK);
                    continue;
                }
                StreamEnd::Failed(failure) => failure,
            };
            if failure.contains(REMOVED_MESSAGE) {
                tracing::warn!(to = format_args!("{to:x}"), "{REMOVED_MESSAGE}");
                self.inner.removed.store(true, Ordering::Relaxed);
            }
            sent_failure(to);
            warn_limited(
                &mut last_warning,
                to,
                &format!("sending raft messages to {url} failed: {failure}"),
            );
            self.report_unreachable(to);
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Sends `first` and what follows to `to` over a raft stream ([`stream`]) until it ends,
    /// lending its socket to [`Transport::send`] whenever nothing is queued ([`Direct`]).
    async fn raft_stream(
        &self,
        to: u64,
        url: &str,
        first: Message,
        rx: &mut mpsc::Receiver<Message>,
        link: &Link,
    ) -> StreamEnd {
        let (read, mut writer): (Box<dyn AsyncRead + Send + Unpin>, Writer) =
            match dial(url, self.inner.tls.as_ref()).await {
                Ok(Dialed::Tcp(tcp)) => {
                    let (read, write) = tcp.into_split();
                    (Box::new(read), Writer::Tcp(Arc::new(write)))
                }
                Ok(Dialed::Tls(io)) => {
                    let (read, write) = tokio::io::split(io);
                    (Box::new(read), Writer::Tls(write))
                }
                Err(e) => return StreamEnd::Failed(format!("connecting: {e}")),
            };
        let answer = stream::read_answer(read, CALL_TIMEOUT);
        tokio::pin!(answer);
        let mut out = stream::MAGIC.to_vec();
        let mut next = Some(first);
        let end = loop {
            let msg = match next.take() {
                Some(msg) => Some(msg),
                None => {
                    {
                        let mut state = link.direct.state.lock();
                        if state.rest.is_empty() && rx.is_empty() {
                            state.socket = writer.lendable();
                        }
                    }
                    tokio::select! {
                        msg = rx.recv() => match msg {
                            Some(msg) => Some(msg),
                            None => break StreamEnd::Dropped,
                        },
                        () = link.direct.wake.notified() => None,
                        end = &mut answer => break end.into(),
                    }
                }
            };
            {
                // Take the socket back; the end of a frame a caller left goes first.
                let mut state = link.direct.state.lock();
                state.socket = None;
                out.append(&mut state.rest);
            }
            if let Some(msg) = msg {
                let batch = self.batch(to, msg, rx, &link.sent_bytes);
                stream::encode_frame(&batch, &mut out);
            }
            if out.is_empty() {
                continue;
            }
            let written = tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&out)).await;
            out.clear();
            match written {
                Ok(Ok(())) => {}
                // The peer may have said why before it closed the connection.
                Ok(Err(e)) => {
                    break match tokio::time::timeout(RETRY_PAUSE, &mut answer).await {
                        Ok(end) => end.into(),
                        Err(_) => StreamEnd::Failed(e.to_string()),
                    }
                }
                Err(_) => {
                    break StreamEnd::Failed(format!(
                        "the peer read nothing for {} s",
                        WRITE_TIMEOUT.as_secs()
                    ))
                }
            }
        };
        // Nothing lent or half written outlives the connection.
        let mut state = link.direct.state.lock();
        state.socket = None;
        state.rest.clear();
        end
    }

    /// Sends `first` and what follows to `to` over the gRPC `Raft` call until it ends.
    async fn grpc_stream(
        &self,
        to: u64,
        url: &str,
        first: Message,
        rx: &mut mpsc::Receiver<Message>,
        sent_bytes: &metrics::Counter,
    ) -> StreamEnd {
        let mut peer = match channel_to(url, self.inner.tls.as_ref()) {
            Ok(channel) => client(channel),
            Err(status) => return StreamEnd::Failed(status.message().to_string()),
        };
        let (batches, body) = mpsc::channel::<RaftBatch>(STREAM_BATCHES);
        let mut call = tokio::spawn(async move {
            peer.raft(tokio_stream::wrappers::ReceiverStream::new(body))
                .await
        });
        let mut next = Some(first);
        loop {
            let msg = match next.take() {
                Some(msg) => msg,
                None => tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(msg) => msg,
                        None => return StreamEnd::Dropped,
                    },
                    ended = &mut call => return StreamEnd::Failed(describe_end(ended)),
                },
            };
            let batch = self.batch(to, msg, rx, sent_bytes);
            if batches.send(batch).await.is_err() {
                return StreamEnd::Failed(describe_end((&mut call).await));
            }
        }
    }

    /// `first` and whatever else is queued for `to`, up to the batch size, counted in `sent`.
    fn batch(
        &self,
        to: u64,
        first: Message,
        rx: &mut mpsc::Receiver<Message>,
        sent: &metrics::Counter,
    ) -> RaftBatch {
        let mut bytes = 0;
        let mut messages = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if let Ok(encoded) = msg.write_to_bytes() {
                bytes += encoded.len();
                messages.push(encoded);
            }
            if bytes < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        self.batch_of(to, messages, sent)
    }

    /// Streams the snapshot file `msg` refers to, then reports the outcome to raft.
    fn send_snapshot(&self, msg: Message) {
        let network = self.clone();
        self.inner.runtime.spawn(async move {
            let to = msg.to;
            let index = msg.get_snapshot().get_metadata().index;
            let delivered = match network.stream_snapshot(msg).await {
                Ok(bytes) => {
                    tracing::info!(
                        to = format_args!("{to:x}"),
                        index,
                        bytes,
                        "sent snapshot"
                    );
                    true
                }
                Err(e) => {
                    sent_failure(to);
                    tracing::warn!(to = format_args!("{to:x}"), index, error = %e, "sending snapshot failed");
                    false
                }
            };
            if let Some(node) = network.inner.node.get() {
                node.report_snapshot(to, delivered);
            }
        });
    }

    async fn stream_snapshot(&self, msg: Message) -> Result<u64, String> {
        let node = self.inner.node.get().ok_or("raft node not started")?;
        let to = msg.to;
        let (mut file, len) = node.open_snapshot(&msg).map_err(|e| e.to_string())?;
        let url = (self.inner.resolve)(to)
            .first()
            .cloned()
            .ok_or("no peer URL known for this member")?;
        let message = msg.write_to_bytes().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<SnapshotChunk>(2);
        let cluster_id = self.inner.cluster_id;
        // Read on a blocking thread, at most a few chunks ahead of the network.
        let reader = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut first = Some(message);
            let mut total_bytes = len;
            loop {
                let mut data = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                let mut filled = 0;
                while filled < data.len() {
                    let n = file.read(&mut data[filled..])?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                data.truncate(filled);
                let last = filled < SNAPSHOT_CHUNK_BYTES;
                let chunk = SnapshotChunk {
                    cluster_id,
                    message: first.take().unwrap_or_default(),
                    data,
                    total_bytes: std::mem::take(&mut total_bytes),
                };
                if tx.blocking_send(chunk).is_err() || last {
                    return Ok(());
                }
            }
        });
        let mut peer =
            client(channel_to(&url, self.inner.tls.as_ref()).map_err(|s| s.message().to_string())?);
        let sent = peer
            .snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        reader
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading the snapshot file: {e}"))?;
        sent.map_err(|s| format!("{}: {}", s.code(), s.message()))?;
        Ok(len)
    }
}

/// How a stream of batches to a member ended.
enum StreamEnd {
    /// The network was dropped: the sender stops.
    Dropped,
    /// The member does not answer raft streams: send over gRPC.
    Unsupported,
    /// The stream failed or the member refused it; what to log.
    Failed(String),
}

impl From<stream::End> for StreamEnd {
    fn from(end: stream::End) -> Self {
        match end {
            stream::End::Unsupported => StreamEnd::Unsupported,
            stream::End::Failed(failure) => StreamEnd::Failed(failure),
        }
    }
}

/// Why a gRPC raft stream ended.
fn describe_end(
    ended: Result<Result<Response<PeerAck>, Status>, tokio::task::JoinError>,
) -> String {
    match ended {
        Ok(Ok(_)) => "the peer closed the stream".to_string(),
        Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
        Err(e) => format!("stream task failed: {e}"),
    }
}

/// A member id as etcd writes it in metric labels.
fn hex(id: u64) -> String {
    format!("{id:x}")
}

/// `etcd_network_peer_sent_failures_total{To}`: messages to `to` that could not be sent (a full
/// queue dropped one, a stream or a snapshot transfer failed).
fn sent_failure(to: u64) {
    metrics::counter!("etcd_network_peer_sent_failures_total", "To" => hex(to)).increment(1);
}

fn warn_limited(last: &mut Option<Instant>, to: u64, what: &str) {
    if last.is_none_or(|at| at.elapsed() >= WARN_INTERVAL) {
        tracing::warn!(to = format_args!("{to:x}"), "{what}");
        *last = Some(Instant::now());
    }
}

impl<O: Send + 'static> Transport for PeerNetwork<O> {
    fn send(&self, messages: Vec<Message>) {
        // Each member's messages, in their order.
        let mut by_member: Vec<(u64, Vec<Message>)> = Vec::new();
        for msg in messages {
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                self.send_snapshot(msg);
                continue;
            }
            match by_member.iter_mut().find(|(to, _)| *to == msg.to) {
                Some((_, queued)) => queued.push(msg),
                None => by_member.push((msg.to, vec![msg])),
            }
        }
        for (to, messages) in by_member {
            self.send_to(to, messages);
        }
    }
}

/// Asks the members at `urls` for the cluster's membership (a member joining an existing
/// cluster learns its own id and the cluster id this way), reaching `https://` URLs with `tls`.
/// Returns the first answer.
pub async fn fetch_members(
    urls: &[String],
    tls: Option<&PeerTls>,
) -> Result<(u64, Vec<Member>), String> {
    let mut errors = Vec::new();
    for url in urls {
        let channel = match channel_to(url, tls) {
            Ok(c) => c,
            Err(e) => {
                errors.push(format!("{url}: {}", e.message()));
                continue;
            }
        };
        let mut peer = client(channel);
        let call = peer.members(MembersRequest { cluster_id: 0 });
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                return Ok((resp.cluster_id, resp.members));
            }
            Ok(Err(status)) => errors.push(format!("{url}: {}", status.message())),
            Err(_) => errors.push(format!("{url}: timed out")),
        }
    }
    Err(errors.join("; "))
}

/// The receiving side of the peer protocol.
pub struct PeerService<O> {
    cluster_id: u64,
    member_id: u64,
    node: RaftNode<O>,
    members: MemberSource,
    accepts: MemberCheck,
    leases: Arc<dyn LeaseHandler>,
    confirm_removal: RemovalCheck,
}

impl<O: Send + 'static> PeerService<O> {
    /// The service of member `member_id` of cluster `cluster_id`: serve its gRPC side with
    /// [`PeerService::grpc`] on the connections [`PeerService::route`] leaves to it.
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        node: RaftNode<O>,
        members: MemberSource,
        accepts: MemberCheck,
        leases: Arc<dyn LeaseHandler>,
        confirm_removal: RemovalCheck,
    ) -> Arc<Self> {
        Arc::new(PeerService {
            cluster_id,
            member_id,
            node,
            members,
            accepts,
            leases,
            confirm_removal,
        })
    }

    /// The gRPC side, for tonic.
    pub fn grpc(self: &Arc<Self>) -> PeerServer<Self> {
        PeerServer::from_arc(Arc::clone(self))
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES)
    }

    /// Serves the raft streams among the connections `incoming` accepts on the peer port,
    /// each on a task of its own until the peer closes it or `stop` turns true, and yields the
    /// other connections (gRPC), unread, for [`PeerService::grpc`].
    pub fn route<IO>(
        self: &Arc<Self>,
        mut incoming: impl Stream<Item = io::Result<IO>> + Unpin + Send + 'static,
        stop: watch::Receiver<bool>,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<Rewind<IO>>>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(64);
        let service = Arc::clone(self);
        tokio::spawn(async move {
            let stopped = {
                let mut stop = stop.clone();
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                }
            };
            tokio::pin!(stopped);
            loop {
                let io = tokio::select! {
                    () = &mut stopped => return,
                    next = incoming.next() => match next {
                        Some(Ok(io)) => io,
                        Some(Err(e)) => {
                            if tx.send(Err(e)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        None => return,
                    },
                };
                let (service, tx, mut stop) = (Arc::clone(&service), tx.clone(), stop.clone());
                tokio::spawn(async move {
                    match stream::accept(io).await {
                        Ok(Accepted::Raft(io)) => {
                            let stopped = async move {
                                let _ = stop.wait_for(|s| *s).await;
                            };
                            service.serve_raft_stream(io, stopped).await;
                        }
                        Ok(Accepted::Other(io)) => {
                            let _ = tx.send(Ok(io)).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "a peer connection showed nothing"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Serves one raft stream (its [`stream::MAGIC`] read).
    async fn serve_raft_stream<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: IO,
        stop: impl Future<Output = ()>,
    ) {
        let mut received = None;
        stream::serve(
            io,
            MAX_PEER_MESSAGE_BYTES,
            |batch| self.receive_batch(batch, &mut received),
            stop,
        )
        .await;
    }

    /// Steps the messages of one batch into raft, after checking who sent it and to whom;
    /// `received` caches the byte counter of the stream's sender.
    fn receive_batch(
        &self,
        batch: RaftBatch,
        received: &mut Option<(u64, metrics::Counter)>,
    ) -> Result<(), Status> {
        self.check_cluster(batch.cluster_id)?;
        let bytes = batch.messages.iter().map(|m| m.len() as u64).sum();
        match received {
            Some((from, counter)) if *from == batch.from => counter.increment(bytes),
            _ => {
                let counter = metrics::counter!(
                    "etcd_network_peer_received_bytes_total",
                    "From" => hex(batch.from)
                );
                counter.increment(bytes);
                *received = Some((batch.from, counter));
            }
        }
        if batch.to != self.member_id {
            return Err(Status::failed_precondition(format!(
                "member id mismatch: messages for {:x} reached member {:x}",
                batch.to, self.member_id
            )));
        }
        if !(self.accepts)(batch.from) {
            return Err(Status::failed_precondition(REMOVED_MESSAGE));
        }
        for bytes in &batch.messages {
            self.node.step(decode_message(bytes)?);
        }
        Ok(())
    }

    fn check_cluster(&self, cluster_id: u64) -> Result<(), Status> {
        if cluster_id != self.cluster_id {
            return Err(cluster_mismatch(self.cluster_id, cluster_id));
        }
        Ok(())
    }

    /// Requests only the leader can answer.
    fn require_leader(&self) -> Result<(), Status> {
        if self.node.with_status(|s| s.is_leader) {
            Ok(())
        } else {
            Err(Status::unavailable("etcdserver: not leader"))
        }
    }

    fn lease_reply(&self, found: Option<(i64, i64)>) -> Response<LeaseForwardResponse> {
        let (ttl, granted_ttl) = found.unwrap_or((0, 0));
        Response::new(LeaseForwardResponse {
            ttl,
            granted_ttl,
            found: found.is_some(),
        })
    }
}

/// A `Read` over snapshot chunks arriving from the network.
struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A raft message as a peer sent it (one of a [`RaftBatch`]'s, or a snapshot stream's first);
/// undecodable bytes are the caller's `invalid argument`.
pub fn decode_message(bytes: &[u8]) -> Result<Message, Status> {
    Message::parse_from_bytes(bytes)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

#[tonic::async_trait]
impl<O: Send + 'static> Peer for PeerService<O> {
    async fn raft(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<PeerAck>, Status> {
        let mut stream = request.into_inner();
        let mut received = None;
        while let Some(batch) = stream.message().await? {
            self.receive_batch(batch, &mut received)?;
        }
        Ok(Response::new(PeerAck {}))
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<PeerAck>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check_cluster(first.cluster_id)?;
        let msg = decode_message(&first.message)?;
        let size = first.total_bytes;
        let (tx, rx) = mpsc::channel(4);
        let node = self.node.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut reader = ChunkReader {
                rx,
                chunk: Vec::new(),
                pos: 0,
            };
            node.receive_snapshot(msg, size, &mut reader)
        });
        let mut next = Some(first.data);
        while let Some(data) = next.take() {
            if !data.is_empty() && tx.send(Ok(data)).await.is_err() {
                break;
            }
            match stream.message().await {
                Ok(Some(chunk)) => next = Some(chunk.data),
                Ok(None) => {}
                Err(status) => {
                    let _ = tx
                        .send(Err(io::Error::other(status.message().to_string())))
                        .await;
                }
            }
        }
        drop(tx);
        writer
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::data_loss(format!("snapshot not installed: {e}")))?;
        Ok(Response::new(PeerAck {}))
    }

    async fn members(
        &self,
        request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let req = request.into_inner();
        // 0: a joining member that does not know the cluster id yet.
        if req.cluster_id != 0 {
            self.check_cluster(req.cluster_id)?;
        }
        Ok(Response::new(MembersResponse {
            cluster_id: self.cluster_id,
            members: (self.members)(),
        }))
    }

    async fn progress(
        &self,
        request: Request<MembersRequest>,
    ) -> Result<Response<ProgressResponse>, Status> {
        self.check_cluster(request.into_inner().cluster_id)?;
        self.require_leader()?;
        let (ids, matched) = self.node.with_status(|s| {
            (
                s.progress.keys().copied().collect(),
                s.progress.values().copied().collect(),
            )
        });
        Ok(Response::new(ProgressResponse { ids, matched }))
    }

    async fn removed(&self, request: Request<RemovedNotice>) -> Result<Response<PeerAck>, Status> {
        let notice = request.into_inner();
        self.check_cluster(notice.cluster_id)?;
        if notice.member_id != self.member_id {
            return Err(Status::failed_precondition(format!(
                "member id mismatch: notice for {:x} reached member {:x}",
                notice.member_id, self.member_id
            )));
        }
        // Only a voter of this member's configuration may tell it, and only what that
        // member's committed membership says: anyone can reach the peer port.
        let from = notice.from;
        let in_configuration = from != self.member_id
            && self
                .node
                .with_status(|s| s.membership.voters.contains(&from));
        if !in_configuration {
            tracing::warn!(
                from = format_args!("{from:x}"),
                "ignored a removal notice from a peer that is not a member"
            );
            return Err(Status::failed_precondition(format!(
                "removal notice from {from:x}, which is not a member of this member's configuration"
            )));
        }
        if !(self.confirm_removal)(from).await {
            tracing::warn!(
                from = format_args!("{from:x}"),
                "ignored a removal notice its sender does not confirm"
            );
            return Err(Status::failed_precondition(format!(
                "member {from:x} does not confirm this member's removal"
            )));
        }
        tracing::warn!(
            from = format_args!("{from:x}"),
            "{REMOVED_MESSAGE} (told by a peer)"
        );
        Ok(Response::new(PeerAck {}))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvForward>,
    ) -> Result<Response<HashKvForwardResponse>, Status> {
        let req = request.into_inner();
        self.check_cluster(req.cluster_id)?;
        let leases = Arc::clone(&self.leases);
        let (hash, compact_revision, hash_revision) =
            tokio::task::spawn_blocking(move || leases.hash_kv(req.revision))
                .await
                .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(HashKvForwardResponse {
            member_id: self.member_id,
            hash,
            compact_revision,
            hash_revision,
        }))
    }

    async fn lease_renew(
        &self,
        request: Request<LeaseForward>,
    ) -> Result<Response<LeaseForwardResponse>, Status> {
        let req = request.into_inner();
        self.check_cluster(req.cluster_id)?;
        self.require_leader()?;
        let found = self.leases.renew(req.id).map(|ttl| (ttl, ttl));
        Ok(self.lease_reply(found))
    }

    async fn lease_ttl(
        &self,
        request: Request<LeaseForward>,
    ) -> Result<Response<LeaseForwardResponse>, Status> {
        let req = request.into_inner();
        self.check_cluster(req.cluster_id)?;
        self.require_leader()?;
        Ok(self.lease_reply(self.leases.ttl(req.id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use metastore_proto::metastorepb::{
        HashKvForward, HashKvForwardResponse, LeaseForward, LeaseForwardResponse, MembersRequest,
        MembersResponse, ProgressResponse, RemovedNotice, SnapshotChunk,
    };

    fn heartbeat(to: u64, commit: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 1;
        m.to = to;
        m.commit = commit;
        m
    }

    /// A network of member 1 in cluster 7 whose member 2 is at `url`.
    fn network(url: String) -> PeerNetwork<()> {
        PeerNetwork::new(
            7,
            1,
            Arc::new(move |_| vec![url.clone()]),
            tokio::runtime::Handle::current(),
            None,
        )
    }

    /// The next batch a test server got (a test that hangs is a failure too).
    async fn next(batches: &mut mpsc::UnboundedReceiver<RaftBatch>) -> RaftBatch {
        tokio::time::timeout(Duration::from_secs(10), batches.recv())
            .await
            .expect("no batch within 10 s")
            .expect("the test server stopped")
    }

    /// The commits of the heartbeats in `batches`, checking each batch's addressing.
    fn commits(batch: &RaftBatch) -> Vec<u64> {
        assert_eq!((batch.cluster_id, batch.from, batch.to), (7, 1, 2));
        batch
            .messages
            .iter()
            .map(|m| decode_message(m).expect("a raft message").commit)
            .collect()
    }

    #[tokio::test]
    async fn batches_go_over_a_raft_stream_and_a_refusal_is_heard() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (got, mut batches) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let got = got.clone();
                tokio::spawn(async move {
                    let Ok(Accepted::Raft(io)) = stream::accept(tcp).await else {
                        panic!("the sender did not open a raft stream");
                    };
                    let receive = move |batch: RaftBatch| {
                        if batch.messages.len() == 1
                            && decode_message(&batch.messages[0]).unwrap().commit == 99
                        {
                            return Err(Status::failed_precondition(REMOVED_MESSAGE));
                        }
                        got.send(batch).unwrap();
                        Ok(())
                    };
                    stream::serve(io, 1 << 20, receive, std::future::pending()).await;
                });
            }
        });
        let network = network(url);
        network.send((1..=3).map(|c| heartbeat(2, c)).collect());
        let mut seen = Vec::new();
        while seen.len() < 3 {
            seen.extend(commits(&next(&mut batches).await));
        }
        assert_eq!(seen, [1, 2, 3], "in order, none lost");
        network.send(vec![heartbeat(2, 4)]);
        assert_eq!(commits(&next(&mut batches).await), [4], "same stream");

        assert!(!network.removed());
        network.send(vec![heartbeat(2, 99)]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !network.removed() {
            assert!(Instant::now() < deadline, "the refusal was not heard");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn batches_the_socket_cannot_take_whole_arrive_whole_and_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (got, mut batches) = mpsc::unbounded_channel();
        let (go, reading) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // Read nothing until the sender has filled the socket's buffers.
            reading.await.unwrap();
            let Ok(Accepted::Raft(io)) = stream::accept(tcp).await else {
                panic!("the sender did not open a raft stream");
            };
            let receive = move |batch: RaftBatch| {
                got.send(batch).unwrap();
                Ok(())
            };
            stream::serve(io, 64 << 20, receive, std::future::pending()).await;
        });
        let network = network(url);
        // The first batch opens the stream; the socket is lent once it is written.
        network.send(vec![heartbeat(2, 1)]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // 50 MiB, one message per call: far more than loopback buffers take, so writes to the
        // lent socket end part-way and the rest goes through the task.
        let big = 400;
        for commit in 2..=big {
            let mut m = heartbeat(2, commit);
            m.context = vec![commit as u8; 128 * 1024].into();
            network.send(vec![m]);
            tokio::task::yield_now().await;
        }
        go.send(()).unwrap();
        let mut seen = Vec::new();
        while seen.len() < big as usize {
            let batch = next(&mut batches).await;
            for m in &batch.messages {
                let m = decode_message(m).expect("whole frames only");
                if m.commit > 1 {
                    assert!(m.context.iter().all(|b| *b == m.commit as u8));
                    assert_eq!(m.context.len(), 128 * 1024);
                }
                seen.push(m.commit);
            }
        }
        assert_eq!(seen, (1..=big).collect::<Vec<_>>(), "in order, none lost");
    }

    /// A member of an earlier version: only the gRPC `Raft` call.
    struct GrpcOnly(mpsc::UnboundedSender<RaftBatch>);

    fn not_here<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl Peer for GrpcOnly {
        async fn raft(
            &self,
            request: Request<Streaming<RaftBatch>>,
        ) -> Result<Response<PeerAck>, Status> {
            let mut stream = request.into_inner();
            while let Some(batch) = stream.message().await? {
                let _ = self.0.send(batch);
            }
            Ok(Response::new(PeerAck {}))
        }
        async fn snapshot(
            &self,
            _: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<PeerAck>, Status> {
            not_here()
        }
        async fn members(
            &self,
            _: Request<MembersRequest>,
        ) -> Result<Response<MembersResponse>, Status> {
            not_here()
        }
        async fn progress(
            &self,
            _: Request<MembersRequest>,
        ) -> Result<Response<ProgressResponse>, Status> {
            not_here()
        }
        async fn removed(&self, _: Request<RemovedNotice>) -> Result<Response<PeerAck>, Status> {
            not_here()
        }
        async fn hash_kv(
            &self,
            _: Request<HashKvForward>,
        ) -> Result<Response<HashKvForwardResponse>, Status> {
            not_here()
        }
        async fn lease_renew(
            &self,
            _: Request<LeaseForward>,
        ) -> Result<Response<LeaseForwardResponse>, Status> {
            not_here()
        }
        async fn lease_ttl(
            &self,
            _: Request<LeaseForward>,
        ) -> Result<Response<LeaseForwardResponse>, Status> {
            not_here()
        }
    }

    #[tokio::test]
    async fn a_member_that_speaks_only_grpc_gets_batches_over_grpc() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (got, mut batches) = mpsc::unbounded_channel();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(GrpcOnly(got)))
                .serve_with_incoming(incoming),
        );
        let network = network(url);
        // The batch written before the member's answer is lost (raft sends again); keep
        // sending until one arrives.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut commit = 0;
        let batch = loop {
            commit += 1;
            network.send(vec![heartbeat(2, commit)]);
            if let Ok(Some(batch)) =
                tokio::time::timeout(Duration::from_millis(50), batches.recv()).await
            {
                break batch;
            }
            assert!(Instant::now() < deadline, "nothing arrived over gRPC");
        };
        assert!(
            commits(&batch)[0] > 1,
            "the first batch went to the raft stream"
        );
        network.send(vec![heartbeat(2, 1000)]);
        let mut later = Vec::new();
        while !later.contains(&1000) {
            later.extend(commits(&next(&mut batches).await));
        }
    }
}
