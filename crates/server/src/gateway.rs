//! etcd's HTTP/JSON gateway (grpc-gateway v1 as etcd 3.4 serves it) on the client port: every RPC
//! of KV, Watch, Lease, Cluster, Maintenance, Auth, Lock and Election at the `google.api.http`
//! path of etcd's .proto files, under `/v3/` and the older `/v3beta/`.
//!
//! One implementation: a gateway call is turned into a gRPC call to the same service stack the
//! client port serves (gRPC metrics, the size limit, the auth layer, the tonic services), made
//! in-process with tonic's client over that stack. The JSON is protobuf's JSON mapping generated
//! from the same .proto files (`metastore-proto`'s pbjson impls, .proto field names), so nothing
//! here knows a request's fields. The `Authorization` header becomes the `authorization` metadata
//! the auth layer reads, and the connection's extensions (the TLS client certificate) go along.
//!
//! Answers as grpc-gateway v1 writes them: a unary answer is the message's JSON, an error
//! `{"error":…,"message":…,"code":N}` with the HTTP status grpc-gateway maps the gRPC code to;
//! a stream answers one `{"result":…}` line per message, flushed as it comes, and an error as
//! `{"error":{"grpc_code":…,"http_code":…,"message":…,"http_status":…}}`. Client streams
//! (`/v3/watch`, `/v3/lease/keepalive`) read a sequence of JSON requests from the request body as
//! it arrives; at the end of the body (or at a value that does not parse) the gRPC side is
//! half-closed, as grpc-gateway does.

use std::convert::Infallible;

use axum::body::Body as HttpBody;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use http::uri::PathAndQuery;
use http::{header, HeaderValue, Method, StatusCode};
use metastore_proto::etcdserverpb as pb;
use metastore_proto::{v3electionpb as election, v3lockpb as lock};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::client::Grpc;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// The gRPC service stack the gateway calls (the client port's, behind the HTTP split).
pub trait Inner:
    tower_service::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error: Into<tonic::codegen::StdError> + Send,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error: Into<tonic::codegen::StdError> + Send,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// What the gateway needs to know of the server's configuration.
#[derive(Clone, Copy, Debug)]
pub struct GatewayConfig {
    /// The largest gRPC message the services decode (`--max-request-bytes` plus gRPC's
    /// overhead): a JSON body is read up to twice that (base64 takes 4/3 of the bytes it
    /// carries), a larger one is refused as gRPC refuses a message over the limit.
    pub max_message_bytes: usize,
}

/// The prefixes etcd 3.4 serves the gateway under (`/v3alpha` is gone since 3.4).
const PREFIXES: [&str; 2] = ["/v3/", "/v3beta/"];

/// Whether `path` is the gateway's (under one of its prefixes), known RPC or not.
pub fn is_gateway_path(path: &str) -> bool {
    PREFIXES.iter().any(|p| path.starts_with(p))
}

/// The RPC path relative to the prefix (`kv/range`).
fn rpc_of(path: &str) -> Option<&str> {
    PREFIXES.iter().find_map(|p| path.strip_prefix(p))
}

/// Serves one gateway request by calling `inner`.
pub fn serve<S: Inner>(
    config: GatewayConfig,
    inner: S,
    request: http::Request<tonic::body::Body>,
) -> BoxFuture<'static, Response> {
    let Some(call) = rpc_of(request.uri().path()).and_then(route::<S>) else {
        return Box::pin(async { not_found() });
    };
    if request.method() == Method::OPTIONS {
        // etcd's CORS wrapper answers preflight requests itself.
        return Box::pin(async { with_cors(StatusCode::OK.into_response()) });
    }
    if request.method() != Method::POST {
        return Box::pin(async { method_not_allowed() });
    }
    let (parts, body) = request.into_parts();
    let mut metadata = MetadataMap::new();
    if let Some(value) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| MetadataValue::try_from(v).ok())
    {
        metadata.insert("authorization", value);
    }
    let call_parts = CallParts {
        config,
        grpc: Grpc::new(inner)
            // The services judge sizes (etcd's errors); the gateway's side sets no limit.
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX),
        metadata,
        extensions: parts.extensions,
        body: HttpBody::new(body),
    };
    Box::pin(async move { with_cors(call(call_parts).await) })
}

/// A gateway call on its way to the gRPC stack.
struct CallParts<S> {
    config: GatewayConfig,
    grpc: Grpc<S>,
    metadata: MetadataMap,
    extensions: tonic::Extensions,
    body: HttpBody,
}

impl<S> CallParts<S> {
    fn request<T>(&mut self, message: T) -> tonic::Request<T> {
        tonic::Request::from_parts(
            std::mem::take(&mut self.metadata),
            std::mem::take(&mut self.extensions),
            message,
        )
    }
}

impl<S: Inner> CallParts<S> {
    /// The request of a unary or server-streaming call, from the whole body, with the stack
    /// below ready to take it.
    async fn whole_body_request<Req>(&mut self) -> Result<tonic::Request<Req>, Status>
    where
        Req: DeserializeOwned + Default,
    {
        let body = read_body(std::mem::take(&mut self.body), self.config).await?;
        let request = self.request(decode_one::<Req>(&body)?);
        ready(&mut self.grpc).await?;
        Ok(request)
    }
}

type Call<S> = fn(CallParts<S>) -> BoxFuture<'static, Response>;

/// The gateway's routes: the `google.api.http` path of each RPC (without `/v3/`), its gRPC
/// method, its messages and its kind (`unary`, `server_stream`, `bidi_stream`).
macro_rules! routes {
    ($($path:literal => $method:literal, $kind:ident($req:ty, $res:ty);)*) => {
        /// Every gateway path (for the test that compares them with the .proto annotations).
        #[cfg(test)]
        const PATHS: &[&str] = &[$($path),*];

        fn route<S: Inner>(rpc: &str) -> Option<Call<S>> {
            match rpc {
                $($path => Some(|parts| Box::pin($kind::<S, $req, $res>(parts, $method))),)*
                _ => None,
            }
        }
    };
}

routes! {
    "kv/range" => "/etcdserverpb.KV/Range", unary(pb::RangeRequest, pb::RangeResponse);
    "kv/put" => "/etcdserverpb.KV/Put", unary(pb::PutRequest, pb::PutResponse);
    "kv/deleterange" => "/etcdserverpb.KV/DeleteRange",
        unary(pb::DeleteRangeRequest, pb::DeleteRangeResponse);
    "kv/txn" => "/etcdserverpb.KV/Txn", unary(pb::TxnRequest, pb::TxnResponse);
    "kv/compaction" => "/etcdserverpb.KV/Compact",
        unary(pb::CompactionRequest, pb::CompactionResponse);
    "watch" => "/etcdserverpb.Watch/Watch", bidi_stream(pb::WatchRequest, pb::WatchResponse);
    "lease/grant" => "/etcdserverpb.Lease/LeaseGrant",
        unary(pb::LeaseGrantRequest, pb::LeaseGrantResponse);
    "lease/revoke" => "/etcdserverpb.Lease/LeaseRevoke",
        unary(pb::LeaseRevokeRequest, pb::LeaseRevokeResponse);
    "kv/lease/revoke" => "/etcdserverpb.Lease/LeaseRevoke",
        unary(pb::LeaseRevokeRequest, pb::LeaseRevokeResponse);
    "lease/keepalive" => "/etcdserverpb.Lease/LeaseKeepAlive",
        bidi_stream(pb::LeaseKeepAliveRequest, pb::LeaseKeepAliveResponse);
    "lease/timetolive" => "/etcdserverpb.Lease/LeaseTimeToLive",
        unary(pb::LeaseTimeToLiveRequest, pb::LeaseTimeToLiveResponse);
    "kv/lease/timetolive" => "/etcdserverpb.Lease/LeaseTimeToLive",
        unary(pb::LeaseTimeToLiveRequest, pb::LeaseTimeToLiveResponse);
    "lease/leases" => "/etcdserverpb.Lease/LeaseLeases",
        unary(pb::LeaseLeasesRequest, pb::LeaseLeasesResponse);
    "kv/lease/leases" => "/etcdserverpb.Lease/LeaseLeases",
        unary(pb::LeaseLeasesRequest, pb::LeaseLeasesResponse);
    "cluster/member/add" => "/etcdserverpb.Cluster/MemberAdd",
        unary(pb::MemberAddRequest, pb::MemberAddResponse);
    "cluster/member/remove" => "/etcdserverpb.Cluster/MemberRemove",
        unary(pb::MemberRemoveRequest, pb::MemberRemoveResponse);
    "cluster/member/update" => "/etcdserverpb.Cluster/MemberUpdate",
        unary(pb::MemberUpdateRequest, pb::MemberUpdateResponse);
    "cluster/member/list" => "/etcdserverpb.Cluster/MemberList",
        unary(pb::MemberListRequest, pb::MemberListResponse);
    "cluster/member/promote" => "/etcdserverpb.Cluster/MemberPromote",
        unary(pb::MemberPromoteRequest, pb::MemberPromoteResponse);
    "maintenance/alarm" => "/etcdserverpb.Maintenance/Alarm",
        unary(pb::AlarmRequest, pb::AlarmResponse);
    "maintenance/status" => "/etcdserverpb.Maintenance/Status",
        unary(pb::StatusRequest, pb::StatusResponse);
    "maintenance/defragment" => "/etcdserverpb.Maintenance/Defragment",
        unary(pb::DefragmentRequest, pb::DefragmentResponse);
    "maintenance/hash" => "/etcdserverpb.Maintenance/Hash",
        unary(pb::HashRequest, pb::HashResponse);
    "maintenance/hashkv" => "/etcdserverpb.Maintenance/HashKV",
        unary(pb::HashKvRequest, pb::HashKvResponse);
    "maintenance/snapshot" => "/etcdserverpb.Maintenance/Snapshot",
        server_stream(pb::SnapshotRequest, pb::SnapshotResponse);
    "maintenance/transfer-leadership" => "/etcdserverpb.Maintenance/MoveLeader",
        unary(pb::MoveLeaderRequest, pb::MoveLeaderResponse);
    "maintenance/downgrade" => "/etcdserverpb.Maintenance/Downgrade",
        unary(pb::DowngradeRequest, pb::DowngradeResponse);
    "auth/enable" => "/etcdserverpb.Auth/AuthEnable",
        unary(pb::AuthEnableRequest, pb::AuthEnableResponse);
    "auth/disable" => "/etcdserverpb.Auth/AuthDisable",
        unary(pb::AuthDisableRequest, pb::AuthDisableResponse);
    "auth/status" => "/etcdserverpb.Auth/AuthStatus",
        unary(pb::AuthStatusRequest, pb::AuthStatusResponse);
    "auth/authenticate" => "/etcdserverpb.Auth/Authenticate",
        unary(pb::AuthenticateRequest, pb::AuthenticateResponse);
    "auth/user/add" => "/etcdserverpb.Auth/UserAdd",
        unary(pb::AuthUserAddRequest, pb::AuthUserAddResponse);
    "auth/user/get" => "/etcdserverpb.Auth/UserGet",
        unary(pb::AuthUserGetRequest, pb::AuthUserGetResponse);
    "auth/user/list" => "/etcdserverpb.Auth/UserList",
        unary(pb::AuthUserListRequest, pb::AuthUserListResponse);
    "auth/user/delete" => "/etcdserverpb.Auth/UserDelete",
        unary(pb::AuthUserDeleteRequest, pb::AuthUserDeleteResponse);
    "auth/user/changepw" => "/etcdserverpb.Auth/UserChangePassword",
        unary(pb::AuthUserChangePasswordRequest, pb::AuthUserChangePasswordResponse);
    "auth/user/grant" => "/etcdserverpb.Auth/UserGrantRole",
        unary(pb::AuthUserGrantRoleRequest, pb::AuthUserGrantRoleResponse);
    "auth/user/revoke" => "/etcdserverpb.Auth/UserRevokeRole",
        unary(pb::AuthUserRevokeRoleRequest, pb::AuthUserRevokeRoleResponse);
    "auth/role/add" => "/etcdserverpb.Auth/RoleAdd",
        unary(pb::AuthRoleAddRequest, pb::AuthRoleAddResponse);
    "auth/role/get" => "/etcdserverpb.Auth/RoleGet",
        unary(pb::AuthRoleGetRequest, pb::AuthRoleGetResponse);
    "auth/role/list" => "/etcdserverpb.Auth/RoleList",
        unary(pb::AuthRoleListRequest, pb::AuthRoleListResponse);
    "auth/role/delete" => "/etcdserverpb.Auth/RoleDelete",
        unary(pb::AuthRoleDeleteRequest, pb::AuthRoleDeleteResponse);
    "auth/role/grant" => "/etcdserverpb.Auth/RoleGrantPermission",
        unary(pb::AuthRoleGrantPermissionRequest, pb::AuthRoleGrantPermissionResponse);
    "auth/role/revoke" => "/etcdserverpb.Auth/RoleRevokePermission",
        unary(pb::AuthRoleRevokePermissionRequest, pb::AuthRoleRevokePermissionResponse);
    "lock/lock" => "/v3lockpb.Lock/Lock", unary(lock::LockRequest, lock::LockResponse);
    "lock/unlock" => "/v3lockpb.Lock/Unlock", unary(lock::UnlockRequest, lock::UnlockResponse);
    "election/campaign" => "/v3electionpb.Election/Campaign",
        unary(election::CampaignRequest, election::CampaignResponse);
    "election/proclaim" => "/v3electionpb.Election/Proclaim",
        unary(election::ProclaimRequest, election::ProclaimResponse);
    "election/leader" => "/v3electionpb.Election/Leader",
        unary(election::LeaderRequest, election::LeaderResponse);
    "election/observe" => "/v3electionpb.Election/Observe",
        server_stream(election::LeaderRequest, election::LeaderResponse);
    "election/resign" => "/v3electionpb.Election/Resign",
        unary(election::ResignRequest, election::ResignResponse);
}

/// A request message as grpc-gateway decodes it: the first JSON value of the body (an empty
/// body is the empty message; what follows the first value is not read).
fn decode_one<Req: DeserializeOwned + Default>(body: &[u8]) -> Result<Req, Status> {
    match serde_json::Deserializer::from_slice(body)
        .into_iter::<Req>()
        .next()
    {
        None => Ok(Req::default()),
        Some(Ok(request)) => Ok(request),
        Some(Err(e)) => Err(Status::invalid_argument(e.to_string())),
    }
}

/// The whole body of a unary or server-streaming call, within the size limit.
async fn read_body(body: HttpBody, config: GatewayConfig) -> Result<Bytes, Status> {
    let limit = config.max_message_bytes.saturating_mul(2);
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        // What gRPC answers for a message over the limit (the size is the JSON's here).
        Status::resource_exhausted(format!(
            "grpc: received message larger than max (> {limit} vs. {})",
            config.max_message_bytes
        ))
    })
}

async fn unary<S: Inner, Req, Res>(mut parts: CallParts<S>, method: &'static str) -> Response
where
    Req: prost::Message + DeserializeOwned + Default + Send + 'static,
    Res: prost::Message + Serialize + Default + Send + 'static,
{
    let answer = async {
        let request = parts.whole_body_request::<Req>().await?;
        let codec = metastore_proto::codec::SizedCodec::<Req, Res>::default();
        let response = parts
            .grpc
            .unary(request, PathAndQuery::from_static(method), codec)
            .await?;
        Ok::<Res, Status>(response.into_inner())
    };
    match answer.await.and_then(|message| to_json(&message)) {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(status) => unary_error(&status),
    }
}

async fn server_stream<S: Inner, Req, Res>(
    mut parts: CallParts<S>,
    method: &'static str,
) -> Response
where
    Req: prost::Message + DeserializeOwned + Default + Send + 'static,
    Res: prost::Message + Serialize + Default + Send + 'static,
{
    let opened = async {
        let request = parts.whole_body_request::<Req>().await?;
        let codec = metastore_proto::codec::SizedCodec::<Req, Res>::default();
        let response = parts
            .grpc
            .server_streaming(request, PathAndQuery::from_static(method), codec)
            .await?;
        Ok::<_, Status>(response.into_inner())
    };
    match opened.await {
        Ok(responses) => stream_response(responses),
        Err(status) => stream_error(&status),
    }
}

async fn bidi_stream<S: Inner, Req, Res>(mut parts: CallParts<S>, method: &'static str) -> Response
where
    Req: prost::Message + DeserializeOwned + Default + Send + 'static,
    Res: prost::Message + Serialize + Default + Send + 'static,
{
    let limit = parts.config.max_message_bytes.saturating_mul(2);
    let requests = json_values::<Req>(std::mem::take(&mut parts.body), limit);
    let request = parts.request(requests);
    let opened = async {
        ready(&mut parts.grpc).await?;
        let codec = metastore_proto::codec::SizedCodec::<Req, Res>::default();
        let response = parts
            .grpc
            .streaming(request, PathAndQuery::from_static(method), codec)
            .await?;
        Ok::<_, Status>(response.into_inner())
    };
    match opened.await {
        Ok(responses) => stream_response(responses),
        Err(status) => stream_error(&status),
    }
}

async fn ready<S: Inner>(grpc: &mut Grpc<S>) -> Result<(), Status> {
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("gateway: {}", e.into())))
}

/// The JSON values of a request body as they arrive, until its end or the first value that
/// does not parse (grpc-gateway logs that and half-closes the stream). A value may take at most
/// `limit` bytes: past that the request stream is closed, as for a value that does not parse
/// (the body is not read further, so a client cannot make the buffer grow without end).
fn json_values<Req: DeserializeOwned + Send + 'static>(
    body: HttpBody,
    limit: usize,
) -> impl Stream<Item = Req> + Send + 'static {
    let state = (body.into_data_stream(), ValueSplitter::default(), false);
    futures::stream::unfold(
        state,
        move |(mut chunks, mut split, mut ended)| async move {
            loop {
                match split.next_value() {
                    Ok(Some(bytes)) => match serde_json::from_slice::<Req>(&bytes) {
                        Ok(value) => return Some((value, (chunks, split, ended))),
                        Err(e) => {
                            tracing::debug!(error = %e, "gateway: a streamed request does not parse");
                            return None;
                        }
                    },
                    Ok(None) => {}
                    Err(NotAnObject) => {
                        tracing::debug!("gateway: a streamed request is not a JSON object");
                        return None;
                    }
                }
                if ended {
                    return None;
                }
                if split.pending() > limit {
                    tracing::warn!(
                    limit,
                    "gateway: a streamed request is larger than the limit; closing the request stream"
                );
                    return None;
                }
                match chunks.next().await {
                    Some(Ok(chunk)) => split.push(&chunk),
                    Some(Err(_)) | None => ended = true,
                }
            }
        },
    )
}

/// A streamed body's bytes that start something other than a JSON object.
struct NotAnObject;

/// Cuts a stream of bytes into top-level JSON objects, looking at each byte once (strings,
/// escapes and nesting tracked as it goes), so that a body arriving a byte at a time costs no
/// more than one arriving whole. Serde then parses each object alone.
#[derive(Default)]
struct ValueSplitter {
    buf: BytesMut,
    /// How far `buf` has been scanned.
    pos: usize,
    /// Where the object being scanned starts, once its `{` was seen.
    start: Option<usize>,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl ValueSplitter {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held for the value not complete yet.
    fn pending(&self) -> usize {
        self.buf.len()
    }

    fn next_value(&mut self) -> Result<Option<Bytes>, NotAnObject> {
        while self.pos < self.buf.len() {
            let b = self.buf[self.pos];
            self.pos += 1;
            let Some(start) = self.start else {
                if b.is_ascii_whitespace() {
                    continue;
                }
                if b != b'{' {
                    return Err(NotAnObject);
                }
                self.start = Some(self.pos - 1);
                self.depth = 1;
                continue;
            };
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let value = self.buf.split_to(self.pos).freeze().slice(start..);
                        self.pos = 0;
                        self.start = None;
                        return Ok(Some(value));
                    }
                }
                _ => {}
            }
        }
        if self.start.is_none() {
            // Only whitespace so far: nothing to keep.
            self.buf.clear();
            self.pos = 0;
        }
        Ok(None)
    }
}

/// A stream's answer: `{"result":…}` per message, each its own body frame (flushed at once),
/// then the error if the stream ends with one.
fn stream_response<Res>(responses: tonic::codec::Streaming<Res>) -> Response
where
    Res: prost::Message + Serialize + Default + Send + 'static,
{
    let frames = futures::stream::unfold(Some(responses), |responses| async move {
        let mut responses = responses?;
        let frame = match responses.message().await {
            Ok(Some(message)) => match to_json(&message) {
                Ok(json) => {
                    let mut line = br#"{"result":"#.to_vec();
                    line.extend_from_slice(&json);
                    line.extend_from_slice(b"}\n");
                    Some((Bytes::from(line), Some(responses)))
                }
                Err(status) => Some((stream_error_line(&status), None)),
            },
            Ok(None) => None,
            Err(status) => Some((stream_error_line(&status), None)),
        };
        frame.map(|(bytes, next)| (Ok::<_, Infallible>(bytes), next))
    });
    json_response(StatusCode::OK, HttpBody::from_stream(frames))
}

/// A message as JSON. pbjson refuses to write an enum value it does not know; that is the
/// server's fault, answered as an internal error rather than an empty success.
fn to_json<T: Serialize>(message: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(message)
        .map_err(|e| Status::internal(format!("gateway: cannot write the answer as JSON: {e}")))
}

fn json_response(status: StatusCode, body: impl Into<HttpBody>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.into(),
    )
        .into_response()
}

/// grpc-gateway v1's `HTTPStatusFromCode`.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A unary call's error, as grpc-gateway v1's `DefaultHTTPError` writes it.
fn unary_error(status: &Status) -> Response {
    let body = serde_json::json!({
        "error": status.message(),
        "message": status.message(),
        "code": status.code() as i32,
    });
    // etcd's field order (serde_json's maps sort their keys).
    let body = format!(
        r#"{{"error":{},"message":{},"code":{}}}"#,
        body["error"], body["message"], body["code"]
    );
    json_response(http_status(status.code()), body)
}

/// A stream's error line, as grpc-gateway v1's `handleForwardResponseStreamError` writes it.
fn stream_error_line(status: &Status) -> Bytes {
    let http = http_status(status.code());
    let line = format!(
        r#"{{"error":{{"grpc_code":{},"http_code":{},"message":{},"http_status":{}}}}}"#,
        status.code() as i32,
        http.as_u16(),
        serde_json::Value::from(status.message()),
        serde_json::Value::from(http.canonical_reason().unwrap_or("")),
    );
    Bytes::from(line + "\n")
}

/// A stream that failed before its first message: the error line under the error's status.
fn stream_error(status: &Status) -> Response {
    json_response(http_status(status.code()), stream_error_line(status))
}

/// grpc-gateway's answer for a path it has no route for.
fn not_found() -> Response {
    with_cors(crate::http::text_error(StatusCode::NOT_FOUND, "Not Found"))
}

/// Go's answer to a method the route does not take (no `Allow` header, as grpc-gateway).
fn method_not_allowed() -> Response {
    with_cors(crate::http::text_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
    ))
}

/// etcd wraps the gateway in a CORS handler that allows every origin.
fn with_cors(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Objects are cut where they end, however the bytes arrive (strings holding braces and
    /// escaped quotes included); what is not an object is refused; an unfinished one waits.
    #[test]
    fn streamed_values_are_cut_as_they_arrive() {
        let body = br#" {"a":"}{\"","b":[{}]}  {"c":1}
{"d":{"e":"\\"}}{"#;
        let expected = [
            r#"{"a":"}{\"","b":[{}]}"#,
            r#"{"c":1}"#,
            r#"{"d":{"e":"\\"}}"#,
        ];
        for chunk_size in [1, 3, body.len()] {
            let mut split = ValueSplitter::default();
            let mut values = Vec::new();
            for chunk in body.chunks(chunk_size) {
                split.push(chunk);
                while let Ok(Some(value)) = split.next_value() {
                    values.push(String::from_utf8(value.to_vec()).unwrap());
                }
            }
            assert_eq!(values, expected, "chunks of {chunk_size}");
            assert_eq!(split.pending(), 1, "the unfinished object is held");
        }
        let mut split = ValueSplitter::default();
        split.push(b"  [1]");
        assert!(split.next_value().is_err());
    }

    /// Every `post:` path of the vendored .proto files has a route, and no route is made up.
    #[test]
    fn routes_are_the_proto_annotations() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto/etcd");
        let files = [
            "api/etcdserverpb/rpc.proto",
            "server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
            "server/etcdserver/api/v3election/v3electionpb/v3election.proto",
        ];
        let mut annotated = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
            for line in text.lines() {
                if let Some(rest) = line.trim().strip_prefix("post: \"/v3/") {
                    annotated.push(rest.trim_end_matches('"').to_string());
                }
            }
        }
        annotated.sort();
        let mut routed: Vec<String> = PATHS.iter().map(|p| p.to_string()).collect();
        routed.sort();
        assert_eq!(annotated, routed);
    }

    #[test]
    fn requests_decode_as_grpc_gateway_does() {
        let request: pb::RangeRequest =
            decode_one(br#"{"key":"Zm9v","limit":"5","sort_order":"DESCEND","x":1} junk"#).unwrap();
        assert_eq!(request.key, b"foo");
        assert_eq!(request.limit, 5);
        assert_eq!(
            request.sort_order,
            pb::range_request::SortOrder::Descend as i32
        );
        assert_eq!(
            decode_one::<pb::RangeRequest>(b"  ").unwrap(),
            pb::RangeRequest::default()
        );
        let error = decode_one::<pb::RangeRequest>(br#"{"key":5}"#).unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
    }

    #[test]
    fn errors_are_written_as_grpc_gateway_v1() {
        let status =
            Status::out_of_range("etcdserver: mvcc: required revision is a future revision");
        assert_eq!(
            stream_error_line(&status),
            Bytes::from_static(
                b"{\"error\":{\"grpc_code\":11,\"http_code\":400,\"message\":\"etcdserver: mvcc: \
                  required revision is a future revision\",\"http_status\":\"Bad Request\"}}\n"
            )
        );
        assert_eq!(unary_error(&status).status(), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::PermissionDenied), StatusCode::FORBIDDEN);
    }
}
