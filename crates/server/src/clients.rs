//! Serving the client port (`--listen-client-urls`): etcd's gRPC services (KV, Watch, Lease,
//! Maintenance, Cluster, Auth, Lock, Election) and `grpc.health.v1`, every call counted
//! (`GrpcMetricsLayer`) and through the auth layer, and etcd's HTTP endpoints on the same port
//! (HTTP/1.1 and HTTP/2, see `http.rs`); and `--listen-metrics-urls` (HTTP only). Both over TCP
//! or unix sockets, with the client TLS for `https://` and `unixs://` URLs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use metastore_api_context::{AuthLayer, OversizeLayer};
use metastore_etcd_api::{
    AuthService, ClusterService, ElectionService, KvService, LeaseService, LockService,
    WatchService,
};
use metastore_maintenance_api::MaintenanceService;
use metastore_proto::etcdserverpb::auth_server::AuthServer;
use metastore_proto::etcdserverpb::cluster_server::ClusterServer;
use metastore_proto::etcdserverpb::lease_server::LeaseServer;
use metastore_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use metastore_proto::range_service::KvServer;
use metastore_proto::v3electionpb::election_server::ElectionServer;
use metastore_proto::v3lockpb::lock_server::LockServer;
use metastore_proto::watch_frame::watch_server::WatchServer;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic_health::pb::health_server::{Health, HealthServer};

use tracing::{debug, info, warn};

use crate::config::{Config, MetricsLevel};
use crate::context::Member;
use crate::gateway::GatewayConfig;
use crate::http::{self, HttpLayer, HttpState};
use crate::metrics::GrpcMetricsLayer;
use crate::shutdown::ServerTask;
use crate::urls;

/// Bytes gRPC may receive on top of `--max-request-bytes` (etcd's `grpcOverheadBytes`), so that
/// an oversized request reaches our check and gets etcd's own error.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// A bound client listener: TCP, or a unix socket (`unix://` and `unixs://` URLs).
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    async fn bind(bind: &urls::Bind) -> std::io::Result<Listener> {
        Ok(match bind {
            urls::Bind::Tcp(addr) => Listener::Tcp(tokio::net::TcpListener::bind(addr).await?),
            urls::Bind::Unix(path) => {
                // As etcd: a socket file left by an earlier run is replaced.
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                Listener::Unix(tokio::net::UnixListener::bind(path)?, path.clone())
            }
        })
    }

    fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

/// Binds `--listen-client-urls`, so that a taken port or a bad socket path fails before
/// anything starts.
pub async fn bind(cfg: &Config) -> Result<Vec<(urls::Url, Listener)>> {
    bind_urls("--listen-client-urls", &cfg.listen_client_urls, "clients").await
}

/// Binds `--listen-metrics-urls` (none by default).
pub async fn bind_metrics(cfg: &Config) -> Result<Vec<(urls::Url, Listener)>> {
    if cfg.listen_metrics_urls.is_empty() {
        return Ok(Vec::new());
    }
    bind_urls("--listen-metrics-urls", &cfg.listen_metrics_urls, "metrics").await
}

async fn bind_urls(flag: &str, texts: &[String], what: &str) -> Result<Vec<(urls::Url, Listener)>> {
    let mut listeners = Vec::new();
    for url in urls::parse_all(flag, texts)? {
        let listener = Listener::bind(&url.bind(flag).await?)
            .await
            .with_context(|| format!("listening for {what} on {}", url.text))?;
        listeners.push((url, listener));
    }
    Ok(listeners)
}

/// The client TLS of `url`: `https://` and `unixs://` URLs need `--cert-file` and `--key-file`.
fn tls_of(url: &urls::Url, tls: Option<&TlsAcceptor>) -> Result<Option<TlsAcceptor>> {
    if !url.scheme.tls() {
        return Ok(None);
    }
    let tls = tls.cloned().with_context(|| {
        format!(
            "TLS key/cert (--cert-file, --key-file) must be provided for client url {} with \
             HTTPS scheme",
            url.text
        )
    })?;
    Ok(Some(tls))
}

/// The builder of one listener's server: HTTP/1.1 beside HTTP/2, as etcd serves both on its
/// client and metrics URLs (TLS is the listener's, see [`spawn`]).
fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder().accept_http1(true)
}

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS connections over the connections of `incoming`, until `stop`. Handshakes run side by side,
/// so a slow or silent client holds up no other.
pub(crate) fn tls_incoming<IO>(
    mut incoming: impl Stream<Item = std::io::Result<IO>> + Unpin + Send + 'static,
    acceptor: TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<IO>>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::pin!(stopped);
        loop {
            let io = tokio::select! {
                () = &mut stopped => break,
                next = incoming.next() => match next {
                    Some(Ok(io)) => io,
                    Some(Err(e)) => {
                        // Out of file descriptors, typically: try again shortly.
                        warn!(error = %e, "accepting a client connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    None => break,
                },
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                    Err(_) => debug!("TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The connections of `listener`, without Nagle's algorithm.
pub(crate) fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// Serves `router` on `listener` (with `tls` when given) until `stop`.
fn spawn<S>(
    listener: Listener,
    tls: Option<TlsAcceptor>,
    router: tonic::transport::server::Router<S>,
    stop: &watch::Receiver<bool>,
) -> ServerTask
where
    S: tower_layer::Layer<tonic::service::Routes> + Clone + Send + 'static,
    S::Service: tower_service::Service<
            ::http::Request<tonic::body::Body>,
            Response = ::http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    <S::Service as tower_service::Service<::http::Request<tonic::body::Body>>>::Future:
        Send + 'static,
    <S::Service as tower_service::Service<::http::Request<tonic::body::Body>>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let mut stop_rx = stop.clone();
    let stopped = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    };
    match (listener, tls) {
        (Listener::Tcp(listener), None) => {
            // Small responses must not wait for Nagle's algorithm (40 ms with delayed ACKs).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        (Listener::Tcp(listener), Some(tls)) => {
            let incoming = tls_incoming(Box::pin(nodelay_incoming(listener)), tls, stop.clone());
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        (Listener::Unix(listener, _), None) => {
            let incoming = UnixListenerStream::new(listener);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        (Listener::Unix(listener, _), Some(tls)) => {
            let incoming = tls_incoming(UnixListenerStream::new(listener), tls, stop.clone());
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    }
}

/// Serves `--listen-metrics-urls`: `/metrics` and the health probes, nothing else.
pub fn serve_metrics(
    listeners: Vec<(urls::Url, Listener)>,
    tls: Option<&TlsAcceptor>,
    state: &HttpState,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<ServerTask>> {
    let mut servers = Vec::new();
    for (url, listener) in listeners {
        info!(address = %listener.address(), url = %url.text, "serving metrics");
        let routes = tonic::service::Routes::from(http::metrics_router(state.clone()));
        let router = server_builder().add_routes(routes);
        servers.push(spawn(listener, tls_of(&url, tls)?, router, stop));
    }
    Ok(servers)
}

/// Serves clients on `listeners` until `stop` turns true. `tls` is the client port's TLS, which
/// `https://` and `unixs://` URLs need; `health` is the `grpc.health.v1` service; `state` what
/// the HTTP endpoints read.
pub fn serve(
    cfg: &Config,
    member: &Member,
    listeners: Vec<(urls::Url, Listener)>,
    tls: Option<&TlsAcceptor>,
    health: HealthServer<impl Health>,
    state: &HttpState,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<ServerTask>> {
    let ctx = &member.ctx;
    let grpc_metrics = GrpcMetricsLayer::new(cfg.metrics == MetricsLevel::Extensive);
    let max_recv = cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let mut servers = Vec::new();
    for (url, listener) in listeners {
        info!(address = %listener.address(), url = %url.text, "serving client requests");
        let kv = KvServer::new(KvService::new(ctx.clone())).max_decoding_message_size(max_recv);
        let maintenance =
            MaintenanceServer::new(MaintenanceService::new(ctx.clone(), member.backend.clone()))
                .max_decoding_message_size(max_recv);
        let watch = WatchServer::new(WatchService::new(
            ctx.clone(),
            member.watch_hub.clone(),
            cfg.experimental_watch_progress_notify_interval,
        ))
        .max_decoding_message_size(max_recv);
        let lease = LeaseServer::new(LeaseService::new(ctx.clone(), member.lessor.clone()))
            .max_decoding_message_size(max_recv);
        let cluster = ClusterServer::new(ClusterService::new(ctx.clone()))
            .max_decoding_message_size(max_recv);
        let auth =
            AuthServer::new(AuthService::new(ctx.clone())).max_decoding_message_size(max_recv);
        let lock = LockServer::new(LockService::new(ctx, &member.watch_hub))
            .max_decoding_message_size(max_recv);
        let election = ElectionServer::new(ElectionService::new(ctx, &member.watch_hub))
            .max_decoding_message_size(max_recv);
        let url_tls = tls_of(&url, tls)?;
        let router = server_builder()
            // Requests that are not gRPC go to etcd's HTTP endpoints and its JSON gateway.
            .layer(HttpLayer::new(
                http::client_router(state.clone()),
                GatewayConfig {
                    max_message_bytes: max_recv,
                },
            ))
            .layer(grpc_metrics.clone())
            // Every service decodes at most `max_recv` bytes per message (etcd's server-wide
            // limit); a larger one gets grpc-go's answer.
            .layer(OversizeLayer)
            // Every call passes the auth layer: one place decides who may call what.
            .layer(AuthLayer::new(ctx.clone()))
            .add_service(kv)
            .add_service(watch)
            .add_service(lease)
            .add_service(maintenance)
            .add_service(cluster)
            .add_service(auth)
            .add_service(lock)
            .add_service(election)
            .add_service(health.clone());
        servers.push(spawn(listener, url_tls, router, stop));
    }
    Ok(servers)
}
