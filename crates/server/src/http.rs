//! HTTP beside gRPC, as etcd serves it: on the client URLs (same port, HTTP/1.1 and HTTP/2, TLS
//! and unix sockets as the gRPC side) `/health`, `/livez`, `/readyz`, `/version` and `/metrics`;
//! on `--listen-metrics-urls` only `/metrics` and the probes. Every other path is etcd's 404.
//!
//! Routing: [`HttpLayer`] sits in front of the client port's gRPC services and sends every
//! request that is not gRPC (no `content-type: application/grpc…`) to an axum router built here
//! ([`client_router`]), except etcd's `/v3/…` JSON gateway (`gateway.rs`), which it hands the
//! gRPC stack it wraps; gRPC calls go on to the auth layer and the services.
//!
//! The probes follow etcd 3.5 (`server/etcdserver/api/etcdhttp/health.go`): `/health` checks the
//! alarms (minus `?exclude=`), a leader (unless `?serializable=true`) and a Range (linearizable
//! unless serializable), answering `{"health":"true","reason":""}` or 503 with the reason;
//! `/livez` runs `serializable_read`, `/readyz` runs `data_corruption` and `serializable_read`,
//! each also alone under its own sub-path, answering `ok` (with the list of checks under
//! `?verbose`) or 503 with the list.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use futures::future::{BoxFuture, Either};
use http::{header, HeaderValue, Method, StatusCode};
use metastore_api_context::ServerContext;
use metastore_proto::etcdserverpb::{AlarmType, RangeRequest};

use crate::gateway::{self, GatewayConfig};
use crate::metrics::Exporter;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    ctx: ServerContext,
    /// etcd's `ReqTimeout()`: how long the health check's Range may take.
    request_timeout: Duration,
    exporter: Option<Exporter>,
}

impl HttpState {
    /// The state of a member's HTTP handlers; `election_timeout` is `--election-timeout`.
    pub fn new(
        ctx: ServerContext,
        election_timeout: Duration,
        exporter: Option<Exporter>,
    ) -> HttpState {
        HttpState {
            ctx,
            // etcd: 5s plus two election timeouts.
            request_timeout: Duration::from_secs(5) + 2 * election_timeout,
            exporter,
        }
    }
}

/// The client URLs' HTTP routes.
pub fn client_router(state: HttpState) -> Router {
    probes(Router::new())
        .route("/version", any(version))
        .route("/metrics", any(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// The routes of `--listen-metrics-urls`: metrics and the probes only (etcd answers 404 for
/// `/version` there).
pub fn metrics_router(state: HttpState) -> Router {
    probes(Router::new())
        .route("/metrics", any(metrics))
        .fallback(not_found)
        .with_state(state)
}

fn probes(router: Router<HttpState>) -> Router<HttpState> {
    router
        .route("/health", any(health))
        .route("/livez", any(livez))
        .route("/livez/serializable_read", any(livez_serializable_read))
        .route("/readyz", any(readyz))
        .route("/readyz/data_corruption", any(readyz_data_corruption))
        .route("/readyz/serializable_read", any(readyz_serializable_read))
}

/// The version etcd's clusters report: major.minor of the server's, patch 0.
pub fn cluster_version() -> String {
    let version = metastore_maintenance_api::ETCD_API_VERSION;
    let mut parts = version.split('.');
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => format!("{major}.{minor}.0"),
        _ => version.to_string(),
    }
}

/// A plain-text answer as Go's `http.Error` writes it (text, newline, `nosniff`).
pub(crate) fn text_error(status: StatusCode, text: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        format!("{text}\n"),
    )
        .into_response()
}

/// etcd's (Go's) 404.
async fn not_found() -> Response {
    text_error(StatusCode::NOT_FOUND, "404 page not found")
}

/// Go's answer to a method a handler does not take.
fn method_not_allowed() -> Response {
    let mut response = text_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET"));
    response
}

/// The values of `name` in a query string (`a=1&a=2`), percent-decoding left out: the values
/// etcd's probes take (alarm and check names, `true`) have nothing to decode.
fn query_values<'a>(query: &'a Option<String>, name: &'a str) -> impl Iterator<Item = &'a str> {
    query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter_map(move |pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
}

fn has_key(query: &Option<String>, name: &str) -> bool {
    query_values(query, name).next().is_some()
}

/// etcd's `Health` answer.
struct Health {
    healthy: bool,
    reason: String,
}

impl Health {
    fn ok() -> Health {
        Health {
            healthy: true,
            reason: String::new(),
        }
    }

    fn failed(reason: impl Into<String>) -> Health {
        Health {
            healthy: false,
            reason: reason.into(),
        }
    }
}

async fn health(
    State(state): State<HttpState>,
    method: Method,
    RawQuery(query): RawQuery,
) -> Response {
    if method != Method::GET {
        return method_not_allowed();
    }
    let excluded: Vec<&str> = query_values(&query, "exclude")
        .filter(|v| !v.is_empty())
        .collect();
    let serializable = query_values(&query, "serializable").next() == Some("true");
    let health = check_health(&state, &excluded, serializable).await;
    // etcd counts the checks of /health only (not /livez, /readyz).
    if health.healthy {
        metrics::counter!("etcd_server_health_success").increment(1);
    } else {
        metrics::counter!("etcd_server_health_failures").increment(1);
    }
    let body = serde_json::json!({
        "health": if health.healthy { "true" } else { "false" },
        "reason": health.reason,
    })
    .to_string();
    if health.healthy {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response()
    } else {
        tracing::warn!(output = %body, "/health error");
        text_error(StatusCode::SERVICE_UNAVAILABLE, &body)
    }
}

/// etcd's `/health`: alarms, then the leader, then a Range.
async fn check_health(state: &HttpState, excluded: &[&str], serializable: bool) -> Health {
    let ctx = &state.ctx;
    for alarm in ctx.alarms.get(AlarmType::None) {
        let kind = AlarmType::try_from(alarm.alarm).unwrap_or(AlarmType::None);
        if excluded.contains(&kind.as_str_name()) {
            continue;
        }
        return Health::failed(match kind {
            AlarmType::Nospace => "ALARM NOSPACE",
            AlarmType::Corrupt => "ALARM CORRUPT",
            AlarmType::None => "ALARM UNKNOWN",
        });
    }
    if !serializable && ctx.raft.with_status(|s| s.leader_id) == 0 {
        return Health::failed("RAFT NO LEADER");
    }
    match range_check(state, serializable).await {
        Ok(()) => Health::ok(),
        Err(e) => Health::failed(format!("RANGE ERROR:{e}")),
    }
}

/// The Range the probes read with (one key, keys only), as the server itself: no auth check, as
/// etcd reads it with root's rights.
async fn range_check(state: &HttpState, serializable: bool) -> Result<(), String> {
    let req = RangeRequest {
        key: vec![0],
        limit: 1,
        keys_only: true,
        serializable,
        ..Default::default()
    };
    match tokio::time::timeout(state.request_timeout, state.ctx.range(None, req)).await {
        Err(_) => Err("etcdserver: request timed out".to_string()),
        Ok(Err(status)) => Err(status.message().to_string()),
        Ok(Ok(_)) => Ok(()),
    }
}

/// One of etcd 3.5's named checks (`/livez`, `/readyz`).
#[derive(Clone, Copy, PartialEq)]
enum Check {
    DataCorruption,
    SerializableRead,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::DataCorruption => "data_corruption",
            Check::SerializableRead => "serializable_read",
        }
    }

    async fn run(self, state: &HttpState) -> Result<(), String> {
        match self {
            Check::DataCorruption => {
                if state.ctx.alarms.is_active(AlarmType::Corrupt) {
                    Err("alarm activated: CORRUPT".to_string())
                } else {
                    Ok(())
                }
            }
            Check::SerializableRead => range_check(state, true)
                .await
                .map_err(|e| format!("range error: {e}")),
        }
    }
}

const LIVEZ_CHECKS: &[Check] = &[Check::SerializableRead];
const READYZ_CHECKS: &[Check] = &[Check::DataCorruption, Check::SerializableRead];

/// Runs `checks` (those of `all` not in `?exclude=` when `filter`), answering as etcd 3.5's
/// `newHealthHandler`: `ok` (after the check list under `?verbose`), or 503 with the list.
async fn run_checks(
    state: &HttpState,
    method: &Method,
    query: &Option<String>,
    path: &str,
    checks: &[Check],
    filter: bool,
) -> Response {
    if method != Method::GET {
        return method_not_allowed();
    }
    let excluded: Vec<&str> = if filter {
        query_values(query, "exclude").collect()
    } else {
        Vec::new()
    };
    let mut healthy = true;
    let mut list = String::new();
    for check in checks.iter().filter(|c| !excluded.contains(&c.name())) {
        match check.run(state).await {
            Ok(()) => list.push_str(&format!("[+]{} ok\n", check.name())),
            Err(e) => {
                healthy = false;
                list.push_str(&format!("[-]{} failed: {e}\n", check.name()));
            }
        }
    }
    if !healthy {
        tracing::error!(path, reason = %list, "health check error");
        return text_error(StatusCode::SERVICE_UNAVAILABLE, &list);
    }
    let body = if has_key(query, "verbose") {
        format!("{list}ok\n")
    } else {
        "ok\n".to_string()
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn livez(State(s): State<HttpState>, m: Method, RawQuery(q): RawQuery) -> Response {
    run_checks(&s, &m, &q, "/livez", LIVEZ_CHECKS, true).await
}

async fn livez_serializable_read(
    State(s): State<HttpState>,
    m: Method,
    RawQuery(q): RawQuery,
) -> Response {
    let checks = [Check::SerializableRead];
    run_checks(&s, &m, &q, "/livez/serializable_read", &checks, false).await
}

async fn readyz(State(s): State<HttpState>, m: Method, RawQuery(q): RawQuery) -> Response {
    run_checks(&s, &m, &q, "/readyz", READYZ_CHECKS, true).await
}

async fn readyz_data_corruption(
    State(s): State<HttpState>,
    m: Method,
    RawQuery(q): RawQuery,
) -> Response {
    let checks = [Check::DataCorruption];
    run_checks(&s, &m, &q, "/readyz/data_corruption", &checks, false).await
}

async fn readyz_serializable_read(
    State(s): State<HttpState>,
    m: Method,
    RawQuery(q): RawQuery,
) -> Response {
    let checks = [Check::SerializableRead];
    run_checks(&s, &m, &q, "/readyz/serializable_read", &checks, false).await
}

/// etcd's `/version`: the server's version and the cluster's.
async fn version(method: Method) -> Response {
    if method != Method::GET {
        return method_not_allowed();
    }
    // etcd's field order (serde_json's maps sort their keys).
    let body = format!(
        r#"{{"etcdserver":{},"etcdcluster":{}}}"#,
        serde_json::Value::from(metastore_maintenance_api::ETCD_API_VERSION),
        serde_json::Value::from(cluster_version()),
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// `/metrics`: the Prometheus text exposition.
async fn metrics(State(state): State<HttpState>) -> Response {
    let Some(exporter) = &state.exporter else {
        return not_found().await;
    };
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        exporter.render().await,
    )
        .into_response()
}

/// The tower layer that sends a client port's non-gRPC requests to the HTTP router (see the
/// module's description).
#[derive(Clone)]
pub struct HttpLayer {
    router: Router,
    gateway: GatewayConfig,
}

impl HttpLayer {
    /// A layer answering HTTP requests with `router`, and the gateway's with the gRPC services.
    pub fn new(router: Router, gateway: GatewayConfig) -> HttpLayer {
        HttpLayer { router, gateway }
    }
}

impl<S> tower_layer::Layer<S> for HttpLayer {
    type Service = HttpOrGrpc<S>;
    fn layer(&self, inner: S) -> HttpOrGrpc<S> {
        HttpOrGrpc {
            inner,
            router: self.router.clone(),
            gateway: self.gateway,
        }
    }
}

/// The service [`HttpLayer`] builds.
#[derive(Clone)]
pub struct HttpOrGrpc<S> {
    inner: S,
    router: Router,
    gateway: GatewayConfig,
}

type Request = http::Request<tonic::body::Body>;
type GrpcResponse = http::Response<tonic::body::Body>;

/// Whether a request is a gRPC call (grpc-go and tonic route on the same header).
fn is_grpc(request: &Request) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

impl<S> tower_service::Service<Request> for HttpOrGrpc<S>
where
    S: gateway::Inner,
{
    type Response = GrpcResponse;
    type Error = S::Error;
    type Future = Either<BoxFuture<'static, Result<GrpcResponse, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if is_grpc(&request) {
            return Either::Right(self.inner.call(request));
        }
        if gateway::is_gateway_path(request.uri().path()) {
            let answer = gateway::serve(self.gateway, self.inner.clone(), request);
            return Either::Left(Box::pin(async move {
                Ok(answer.await.map(tonic::body::Body::new))
            }));
        }
        let call = tower_service::Service::call(&mut self.router.clone(), request);
        let answer: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            let response = match call.await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok(response.map(tonic::body::Body::new))
        });
        Either::Left(answer)
    }
}
