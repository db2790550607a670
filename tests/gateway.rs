//! etcd's HTTP/JSON gateway (`/v3/…`) on the client port, differentially: one sequence of HTTP
//! requests (every path family, the error cases, both client streams and the observe stream,
//! with auth off and on) runs against etcd 3.4's gateway and against MetaStore on each engine,
//! and the answers — HTTP status and JSON body — must match once the member-specific values
//! (cluster and member ids, raft terms, URLs, tokens, sizes) are scrubbed.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::Server;

/// How long one answer (or one line of a stream) may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// Keys whose values depend on the member, the run or the engine: replaced by their kind.
const SCRUBBED: &[&str] = &[
    "cluster_id",
    "member_id",
    "raft_term",
    "raftTerm",
    "raftIndex",
    "raftAppliedIndex",
    "leader",
    "dbSize",
    "dbSizeInUse",
    "peerURLs",
    "clientURLs",
    "token",
    "blob",
    "remaining_bytes",
    "hash",
];

/// Fields MetaStore's services answer as etcd 3.5 and 3.6 do (over gRPC too), which etcd 3.4
/// lacks: Status' newer fields; the storage version in each Snapshot message; the header of
/// Alarm answers; the revision in MemberList's header. Dropped from both sides.
const NEWER_THAN_3_4: &[&str] = &["storageVersion", "dbSizeQuota", "downgradeInfo"];
const HEADER_SINCE_3_5: &[&str] = &["/v3/maintenance/alarm", "/v3/cluster/member/list"];

/// Replaces the values under [`SCRUBBED`] keys by a placeholder (and the server's version in a
/// Status answer); a response header keeps its revision (the one part of it both servers must
/// agree on).
fn scrub(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !NEWER_THAN_3_4.contains(&k.as_str()));
            if map.contains_key("blob") {
                map.remove("version");
            }
            let is_status = map.contains_key("dbSize");
            // A lease's remaining TTL depends on when it is asked.
            let is_time_to_live = map.contains_key("grantedTTL");
            // A member's id is derived from its peer URLs (free ports).
            let is_member = map.contains_key("peerURLs");
            for (key, v) in map.iter_mut() {
                if key == "header" {
                    if let Value::Object(header) = v {
                        header.retain(|k, _| k == "revision");
                    }
                } else if SCRUBBED.contains(&key.as_str())
                    || (is_status && key == "version")
                    || (is_time_to_live && key == "TTL")
                    || (is_member && key == "ID")
                {
                    *v = Value::String("<scrubbed>".into());
                } else {
                    scrub(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// One HTTP/1.1 request on a fresh connection; the response with its body still to read.
async fn send(
    port: u16,
    path: &str,
    method: &str,
    token: Option<&str>,
    body: impl hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
) -> hyper::Response<Incoming> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    exchange(tcp, path, method, token, body).await
}

/// One HTTP/1.1 request on `io`; the response with its body still to read.
async fn exchange(
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    path: &str,
    method: &str,
    token: Option<&str>,
    body: impl hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
) -> hyper::Response<Incoming> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1");
    if let Some(token) = token {
        request = request.header("authorization", token);
    }
    let request = request.body(body).expect("request");
    tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(request))
        .await
        .unwrap_or_else(|_| panic!("{path}: no answer"))
        .expect("send request")
}

/// `POST path` with `body`: the status and the whole body.
async fn post(server: &Server, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    call(server, path, "POST", token, body).await
}

async fn call(
    server: &Server,
    path: &str,
    method: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let body = Full::new(Bytes::from(body.to_string()));
    let response = send(server.client_port, path, method, token, body).await;
    let status = response.status().as_u16();
    let bytes = tokio::time::timeout(ANSWER_TIMEOUT, response.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("{path}: the body did not end"))
        .expect("read body")
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The JSON answer of `path` scrubbed, or the text as it is when it is not JSON.
fn scrubbed(path: &str, body: &str) -> String {
    match serde_json::from_str::<Value>(body.trim()) {
        Ok(mut value) => {
            scrub(&mut value);
            if HEADER_SINCE_3_5.contains(&path) {
                if let Some(map) = value.as_object_mut() {
                    map.remove("header");
                }
                if let Some(map) = value.get_mut("result").and_then(Value::as_object_mut) {
                    map.remove("header");
                }
            }
            value.to_string()
        }
        Err(_) => body.trim().to_string(),
    }
}

/// The JSON field of `body` at `pointer` (`/token`), as a string.
fn field(body: &str, pointer: &str) -> String {
    let value: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"));
    match value.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        other => panic!("{pointer} of {body}: {other:?}"),
    }
}

/// An open stream call: request lines go in as the server reads them, answer lines come out.
/// The answer is awaited at the first line read: etcd writes its status with its first message.
struct Stream {
    path: String,
    requests: Option<mpsc::Sender<Result<Frame<Bytes>, Infallible>>>,
    answer: Option<tokio::task::JoinHandle<hyper::Response<Incoming>>>,
    status: u16,
    body: Option<Incoming>,
    pending: Vec<u8>,
}

impl Stream {
    async fn open(server: &Server, path: &str, token: Option<&str>) -> Stream {
        let (tx, rx) = mpsc::channel(16);
        let body = StreamBody::new(ReceiverStream::new(rx));
        let (port, target, token) = (
            server.client_port,
            path.to_string(),
            token.map(String::from),
        );
        let answer =
            tokio::spawn(async move { send(port, &target, "POST", token.as_deref(), body).await });
        Stream {
            path: path.to_string(),
            requests: Some(tx),
            answer: Some(answer),
            status: 0,
            body: None,
            pending: Vec::new(),
        }
    }

    /// The answer's body, awaiting the answer (and noting its status) the first time.
    async fn body(&mut self) -> &mut Incoming {
        if let Some(answer) = self.answer.take() {
            let response = answer.await.expect("the request task");
            self.status = response.status().as_u16();
            self.body = Some(response.into_body());
        }
        self.body.as_mut().expect("an answer")
    }

    async fn send(&self, json: &str) {
        let frame = Frame::data(Bytes::from(json.to_string()));
        let requests = self.requests.as_ref().expect("request body still open");
        requests.send(Ok(frame)).await.expect("stream open");
    }

    /// Ends the request body (the client's half-close).
    fn close_requests(&mut self) {
        self.requests = None;
    }

    /// The next answer line, scrubbed (the first after the answer's status); `None` at the end
    /// of the answer.
    async fn line(&mut self) -> Option<String> {
        let first = self.answer.is_some();
        let line = self.next_line().await;
        if first {
            return Some(format!("HTTP {}: {line:?}", self.status));
        }
        line
    }

    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Some(scrubbed(&self.path, &String::from_utf8_lossy(&line)));
            }
            let body = self.body().await;
            let frame = tokio::time::timeout(ANSWER_TIMEOUT, body.frame())
                .await
                .expect("a stream line in time");
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => panic!("reading the stream: {e}"),
                None if self.pending.is_empty() => return None,
                None => {
                    let rest = std::mem::take(&mut self.pending);
                    return Some(scrubbed(&self.path, &String::from_utf8_lossy(&rest)));
                }
            }
        }
    }
}

/// Unary calls: (path, body). Every path family, the older prefix, and the errors etcd answers
/// from its services (future and compacted revisions, missing lease, empty key, lease and member
/// ids that do not exist) and from its gateway (unknown paths, `/v3alpha`, GET).
const UNARY: &[(&str, &str)] = &[
    ("/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#),
    (
        "/v3/kv/put",
        r#"{"key":"Zm9v","value":"YmF6","prev_kv":true}"#,
    ),
    ("/v3/kv/range", r#"{"key":"Zm9v"}"#),
    ("/v3beta/kv/range", r#"{"key":"Zm9v","keysOnly":true}"#),
    // Unknown fields are ignored; enums by name or number; 64-bit integers as strings or numbers.
    (
        "/v3/kv/range",
        r#"{"key":"AA==","range_end":"AA==","sort_order":"DESCEND","sort_target":2,"limit":"5","bogus":1}"#,
    ),
    ("/v3/kv/range", r#"{"key":"Zm9v","revision":100}"#),
    ("/v3/kv/range", ""),
    ("/v3/kv/range", r#"{"key":"Zm9v"} trailing"#),
    (
        "/v3/kv/put",
        r#"{"key":"Zm9v","value":"eA==","lease":"12345"}"#,
    ),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"key":"Zm9v","result":"EQUAL","target":"VALUE","value":"YmF6"}],"success":[{"request_range":{"key":"Zm9v"}},{"request_put":{"key":"YQ==","value":"MQ=="}}],"failure":[{"requestDeleteRange":{"key":"Zm9v"}}]}"#,
    ),
    ("/v3/kv/put", r#"{"key":"Yg==","value":"Mg=="}"#),
    ("/v3/kv/deleterange", r#"{"key":"Yg==","prev_kv":true}"#),
    ("/v3/kv/compaction", r#"{"revision":"3","physical":true}"#),
    ("/v3/kv/range", r#"{"key":"Zm9v","revision":"2"}"#),
    ("/v3/kv/compaction", r#"{"revision":"99"}"#),
    ("/v3/lease/grant", r#"{"TTL":"60","ID":"1000"}"#),
    ("/v3/lease/grant", r#"{"TTL":60,"ID":1000}"#),
    (
        "/v3/kv/put",
        r#"{"key":"bA==","value":"MQ==","lease":"1000"}"#,
    ),
    ("/v3/lease/timetolive", r#"{"ID":"1000","keys":true}"#),
    ("/v3/kv/lease/timetolive", r#"{"ID":"77"}"#),
    ("/v3/lease/leases", "{}"),
    ("/v3/kv/lease/leases", "{}"),
    ("/v3/lease/grant", r#"{"TTL":"60","ID":"2000"}"#),
    ("/v3/lease/revoke", r#"{"ID":"2000"}"#),
    ("/v3/kv/lease/revoke", r#"{"ID":"2000"}"#),
    ("/v3/maintenance/status", "{}"),
    ("/v3/maintenance/alarm", r#"{"action":"GET"}"#),
    ("/v3/maintenance/defragment", "{}"),
    ("/v3/maintenance/hash", "{}"),
    ("/v3/maintenance/transfer-leadership", r#"{"targetID":"5"}"#),
    ("/v3/cluster/member/list", "{}"),
    ("/v3/cluster/member/promote", r#"{"ID":"5"}"#),
    ("/v3/cluster/member/remove", r#"{"ID":"5"}"#),
    (
        "/v3/cluster/member/update",
        r#"{"ID":"5","peerURLs":["http://127.0.0.1:1"]}"#,
    ),
    ("/v3/cluster/member/add", r#"{"peerURLs":["not a url"]}"#),
    (
        "/v3/election/campaign",
        r#"{"name":"ZWw=","lease":"1000","value":"djE="}"#,
    ),
    ("/v3/election/leader", r#"{"name":"ZWw="}"#),
    ("/v3/election/leader", r#"{"name":"bm9uZQ=="}"#),
    ("/v3/nope", "{}"),
    ("/v3alpha/kv/range", r#"{"key":"Zm9v"}"#),
];

/// Bodies the gateway cannot decode: etcd answers code 3 (InvalidArgument) and HTTP 400 with the
/// message of Go's JSON decoder, which MetaStore's (serde's) words differently; the status and
/// code are compared, not the words.
const UNDECODABLE: &[&str] = &[
    r#"{"key": "#,
    r#"{"key":5}"#,
    r#"{"key":"Zm9v","sort_order":"BLAH"}"#,
    r#"{"key":"Zm9v","limit":1.5}"#,
    r#"[1]"#,
];

/// Auth on: (name, path, which token, body), run in order after enabling auth.
const AUTH: &[(&str, &str, Who, &str)] = &[
    ("no token", "/v3/kv/range", Who::Nobody, r#"{"key":"Zm9v"}"#),
    ("bad token", "/v3/kv/range", Who::Bad, r#"{"key":"Zm9v"}"#),
    ("root reads", "/v3/kv/range", Who::Root, r#"{"key":"Zm9v"}"#),
    ("bob reads a", "/v3/kv/range", Who::Bob, r#"{"key":"YQ=="}"#),
    (
        "bob reads foo",
        "/v3/kv/range",
        Who::Bob,
        r#"{"key":"Zm9v"}"#,
    ),
    (
        "bob writes foo",
        "/v3/kv/put",
        Who::Bob,
        r#"{"key":"Zm9v","value":"eA=="}"#,
    ),
    ("bob lists users", "/v3/auth/user/list", Who::Bob, "{}"),
    ("root lists users", "/v3/auth/user/list", Who::Root, "{}"),
    (
        "root gets bob",
        "/v3/auth/user/get",
        Who::Root,
        r#"{"name":"bob"}"#,
    ),
    ("root lists roles", "/v3/auth/role/list", Who::Root, "{}"),
    (
        "root gets r",
        "/v3/auth/role/get",
        Who::Root,
        r#"{"role":"r"}"#,
    ),
    (
        "bad password",
        "/v3/auth/authenticate",
        Who::Nobody,
        r#"{"name":"bob","password":"no"}"#,
    ),
    (
        "revoke perm",
        "/v3/auth/role/revoke",
        Who::Root,
        r#"{"role":"r","key":"YQ==","range_end":"Yg=="}"#,
    ),
    (
        "bob reads a again",
        "/v3/kv/range",
        Who::Bob,
        r#"{"key":"YQ=="}"#,
    ),
    (
        "changepw",
        "/v3/auth/user/changepw",
        Who::Root,
        r#"{"name":"bob","password":"pw2"}"#,
    ),
    (
        "revoke role",
        "/v3/auth/user/revoke",
        Who::Root,
        r#"{"name":"bob","role":"r"}"#,
    ),
    (
        "delete role",
        "/v3/auth/role/delete",
        Who::Root,
        r#"{"role":"r"}"#,
    ),
    (
        "delete bob",
        "/v3/auth/user/delete",
        Who::Root,
        r#"{"name":"bob"}"#,
    ),
    ("disable", "/v3/auth/disable", Who::Root, "{}"),
    (
        "open again",
        "/v3/kv/range",
        Who::Nobody,
        r#"{"key":"Zm9v"}"#,
    ),
];

/// Whose token an auth step sends.
#[derive(Clone, Copy, Debug)]
enum Who {
    Nobody,
    Bad,
    Root,
    Bob,
}

/// The auth set-up (auth off), all through the gateway.
const AUTH_SETUP: &[(&str, &str)] = &[
    ("/v3/auth/user/add", r#"{"name":"root","password":"pw"}"#),
    ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
    ("/v3/auth/user/add", r#"{"name":"bob","password":"pw"}"#),
    ("/v3/auth/role/add", r#"{"name":"r"}"#),
    (
        "/v3/auth/role/grant",
        r#"{"name":"r","perm":{"permType":"READWRITE","key":"YQ==","range_end":"Yg=="}}"#,
    ),
    ("/v3/auth/user/grant", r#"{"user":"bob","role":"r"}"#),
    ("/v3/auth/enable", "{}"),
];

/// The whole script against one server, as comparable lines.
async fn script(server: &Server) -> Vec<String> {
    let mut lines = Vec::new();
    for (path, body) in UNARY {
        let (status, answer) = post(server, path, None, body).await;
        lines.push(format!(
            "{path} {body}: {status} {}",
            scrubbed(path, &answer)
        ));
    }
    for body in UNDECODABLE {
        let (status, answer) = post(server, "/v3/kv/range", None, body).await;
        let code = serde_json::from_str::<Value>(&answer)
            .ok()
            .map(|v| v["code"].clone());
        lines.push(format!("undecodable {body}: {status} code {code:?}"));
    }
    let (status, answer) = call(server, "/v3/kv/range", "GET", None, "").await;
    lines.push(format!("GET: {status} {answer:?}"));
    lines.extend(oversized(server).await);
    lines.extend(watch_stream(server).await);
    lines.extend(keepalive_stream(server).await);
    lines.extend(snapshot_and_observe(server).await);
    lines.extend(auth(server).await);
    lines
}

/// A put over `--max-request-bytes` (1.5 MiB by default: etcd's own error) and one over gRPC's
/// message limit (that limit plus 512 KiB: grpc-go's words).
async fn oversized(server: &Server) -> Vec<String> {
    let mut lines = Vec::new();
    for value_bytes in [1_599_999, 2_499_999] {
        let value = base64_of_x(value_bytes);
        let body = format!(r#"{{"key":"YQ==","value":"{value}"}}"#);
        let (status, answer) = post(server, "/v3/kv/put", None, &body).await;
        lines.push(format!(
            "put of {value_bytes} bytes: {status} {}",
            scrubbed("/v3/kv/put", &answer)
        ));
    }
    lines
}

/// `n` bytes of `x` in base64 (`eHh4` per three).
fn base64_of_x(n: usize) -> String {
    assert_eq!(n % 3, 0, "whole base64 quads only");
    "eHh4".repeat(n / 3)
}

/// One stream call whose requests are all sent first: etcd's gateway (Go's HTTP/1.1 server)
/// writes no answer before the request body has ended. Its first `lines` answer lines.
async fn stream_lines(
    server: &Server,
    path: &str,
    token: Option<&str>,
    requests: &str,
    lines: usize,
) -> (Stream, Vec<String>) {
    let mut stream = Stream::open(server, path, token).await;
    stream.send(requests).await;
    stream.close_requests();
    let mut answers = Vec::new();
    for _ in 0..lines {
        answers.push(format!("{path} {requests}: {:?}", stream.line().await));
    }
    (stream, answers)
}

/// `/v3/watch`: a watch from revision 3 (its history) that stays open after the request body
/// ended and sees a put; one from the compacted revision 1; a progress request and a cancel;
/// requests cut by one that does not parse (the stream is half-closed, not failed).
async fn watch_stream(server: &Server) -> Vec<String> {
    let mut lines = Vec::new();
    let history = r#"{"create_request":{"key":"Zm9v","start_revision":"3"}}"#;
    let (mut watch, answers) = stream_lines(server, "/v3/watch", None, history, 2).await;
    lines.extend(answers);
    post(
        server,
        "/v3/kv/put",
        None,
        r#"{"key":"Zm9v","value":"bGl2ZQ=="}"#,
    )
    .await;
    lines.push(format!(
        "watch after the body ended: {:?}",
        watch.line().await
    ));

    let compacted = r#"{"create_request":{"key":"Zm9v","start_revision":1}}"#;
    lines.extend(
        stream_lines(server, "/v3/watch", None, compacted, 2)
            .await
            .1,
    );
    let requests = r#"{"create_request":{"key":"YmFy"}} {"progress_request":{}}
        {"cancel_request":{"watch_id":"0"}}"#;
    lines.extend(stream_lines(server, "/v3/watch", None, requests, 3).await.1);

    let junk = r#"{"create_request":{"key":"YmFy"}} {"create_request":5}"#;
    let (mut broken, answers) = stream_lines(server, "/v3/watch", None, junk, 1).await;
    lines.extend(answers);
    post(
        server,
        "/v3/kv/put",
        None,
        r#"{"key":"YmFy","value":"Mg=="}"#,
    )
    .await;
    lines.push(format!("watch then junk: {:?}", broken.line().await));
    lines
}

/// `/v3/lease/keepalive`: two renewals (id as string and as number), an unknown lease, and the
/// end of the answer after the request body's end.
async fn keepalive_stream(server: &Server) -> Vec<String> {
    let requests = r#"{"ID":"1000"} {"ID":1000} {"ID":"77"}"#;
    let path = "/v3/lease/keepalive";
    let (mut keepalive, mut lines) = stream_lines(server, path, None, requests, 3).await;
    lines.push(format!("keepalive end: {:?}", keepalive.line().await));
    lines
}

/// `/v3/maintenance/snapshot` (its lines, blobs scrubbed, up to the last) and
/// `/v3/election/observe` (the current leader, then a proclaimed value), then the lock and the
/// election released.
async fn snapshot_and_observe(server: &Server) -> Vec<String> {
    let mut lines = Vec::new();
    let mut snapshot = Stream::open(server, "/v3/maintenance/snapshot", None).await;
    snapshot.close_requests();
    lines.push(format!("snapshot: {:?}", snapshot.line().await));
    while snapshot.line().await.is_some() {}

    let mut observe = Stream::open(server, "/v3/election/observe", None).await;
    observe.send(r#"{"name":"ZWw="}"#).await;
    observe.close_requests();
    lines.push(format!("observe: {:?}", observe.line().await));
    let (_, leader) = post(server, "/v3/election/leader", None, r#"{"name":"ZWw="}"#).await;
    let leader_key = field(&leader, "/kv/key");
    let proclaim = format!(
        r#"{{"leader":{{"name":"ZWw=","key":"{leader_key}","rev":"{}","lease":"1000"}},"value":"djI="}}"#,
        field(&leader, "/kv/create_revision")
    );
    let (status, answer) = post(server, "/v3/election/proclaim", None, &proclaim).await;
    lines.push(format!(
        "proclaim: {status} {}",
        scrubbed("/v3/election/proclaim", &answer)
    ));
    lines.push(format!("observe: {:?}", observe.line().await));
    let resign = proclaim.replace(r#","value":"djI="}"#, "}");
    let (status, answer) = post(server, "/v3/election/resign", None, &resign).await;
    lines.push(format!(
        "resign: {status} {}",
        scrubbed("/v3/election/resign", &answer)
    ));

    let (_, lock) = post(
        server,
        "/v3/lock/lock",
        None,
        r#"{"name":"bG9jaw==","lease":"1000"}"#,
    )
    .await;
    let unlock = format!(r#"{{"key":"{}"}}"#, field(&lock, "/key"));
    let (status, answer) = post(server, "/v3/lock/unlock", None, &unlock).await;
    lines.push(format!(
        "unlock: {status} {}",
        scrubbed("/v3/lock/unlock", &answer)
    ));
    lines
}

/// Auth through the gateway: set up users and roles, enable, then every rule the gRPC API
/// applies, with the token in the `Authorization` header; a watch refused for bob.
async fn auth(server: &Server) -> Vec<String> {
    let mut lines = Vec::new();
    for (path, body) in AUTH_SETUP {
        let (status, answer) = post(server, path, None, body).await;
        lines.push(format!(
            "{path} {body}: {status} {}",
            scrubbed(path, &answer)
        ));
    }
    let token_of = |answer: &str| field(answer, "/token");
    let credentials = r#"{"name":"root","password":"pw"}"#;
    let (_, root) = post(server, "/v3/auth/authenticate", None, credentials).await;
    let root = token_of(&root);
    let credentials = r#"{"name":"bob","password":"pw"}"#;
    let (_, bob) = post(server, "/v3/auth/authenticate", None, credentials).await;
    let bob = token_of(&bob);

    let refused = r#"{"create_request":{"key":"Zm9v"}}"#;
    lines.extend(
        stream_lines(server, "/v3/watch", Some(&bob), refused, 1)
            .await
            .1,
    );

    for (name, path, who, body) in AUTH {
        let token = match who {
            Who::Nobody => None,
            Who::Bad => Some("not-a-token"),
            Who::Root => Some(root.as_str()),
            Who::Bob => Some(bob.as_str()),
        };
        let (status, answer) = post(server, path, token, body).await;
        lines.push(format!("{name}: {status} {}", scrubbed(path, &answer)));
    }
    lines
}

differential!(script);

/// What MetaStore's gateway does beyond etcd 3.4's: the paths etcd 3.5 added (HashKV, AuthStatus)
/// answer what the same RPC answers over gRPC; a stream answers before its request body ends
/// (etcd's Go HTTP/1.1 server waits for the end); `--max-request-bytes` bounds a JSON request as
/// it bounds a gRPC one.
async fn beyond_etcd_3_4(kind: crate::support::Kind) {
    use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    use metastore_proto::etcdserverpb::HashKvRequest;

    let server = Server::start_with(kind, &["--max-request-bytes", "1024"]).await;
    post(
        &server,
        "/v3/kv/put",
        None,
        r#"{"key":"Zm9v","value":"YmFy"}"#,
    )
    .await;

    let (status, answer) = post(&server, "/v3/maintenance/hashkv", None, "{}").await;
    let mut maintenance = MaintenanceClient::connect(server.endpoint()).await.unwrap();
    let grpc = maintenance
        .hash_kv(HashKvRequest { revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let json: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(json["hash"], Value::from(grpc.hash), "{answer}");
    assert_eq!(json["hash_revision"], Value::from("2"), "{answer}");

    let (status, answer) = post(&server, "/v3/auth/status", None, "{}").await;
    assert_eq!(
        (status, scrubbed("", &answer)),
        (200, r#"{"header":{"revision":"2"}}"#.into())
    );

    let mut watch = Stream::open(&server, "/v3/watch", None).await;
    watch.send(r#"{"create_request":{"key":"Zm9v"}}"#).await;
    let created = watch.line().await.expect("created");
    assert!(created.contains(r#"\"created\":true"#), "{created}");
    post(
        &server,
        "/v3/kv/put",
        None,
        r#"{"key":"Zm9v","value":"YmF6"}"#,
    )
    .await;
    let event = watch.line().await.expect("an event");
    assert!(
        event.contains(r#""mod_revision":"3","value":"YmF6""#),
        "{event}"
    );
    watch.send(r#"{"progress_request":{}}"#).await;
    let progress = watch.line().await.expect("a progress answer");
    assert!(progress.contains(r#""watch_id":"-1""#), "{progress}");

    let big = format!(r#"{{"key":"YQ==","value":"{}"}}"#, base64_of_x(1500));
    let (status, answer) = post(&server, "/v3/kv/put", None, &big).await;
    assert_eq!(
        (status, answer.as_str()),
        (
            400,
            r#"{"error":"etcdserver: request is too large","message":"etcdserver: request is too large","code":3}"#
        )
    );
}

per_engine!(beyond_etcd_3_4);

/// Over `https://` with `--client-cert-auth`, the gateway takes the user from the client
/// certificate's CN, through the same auth layer as gRPC: root's certificate may write, bob's
/// may not; a plain request without a token is refused as etcd refuses it.
#[tokio::test]
async fn client_certificate_users_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::support::tls::Ca::new(dir.path(), "gateway");
    let server_cert = ca.leaf(dir.path(), "server", "server");
    let root_cert = ca.leaf(dir.path(), "root", "root");
    let bob_cert = ca.leaf(dir.path(), "bob", "bob");
    let tls_port = crate::support::free_port();
    let https = format!("https://127.0.0.1:{tls_port}");
    let flags = [
        "--listen-client-urls",
        &https,
        "--cert-file",
        server_cert.cert.to_str().unwrap(),
        "--key-file",
        server_cert.key.to_str().unwrap(),
        "--trusted-ca-file",
        ca.cert_path.to_str().unwrap(),
        "--client-cert-auth",
    ];
    let server = Server::start_with(crate::support::Kind::Memory, &flags).await;
    for (path, body) in AUTH_SETUP {
        let (status, answer) = post(&server, path, None, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
    }
    let put = r#"{"key":"Zm9v","value":"YmFy"}"#;
    let (status, answer) = put_over_tls(&ca, &root_cert, tls_port, put).await;
    assert_eq!(
        (status, scrubbed("", &answer)),
        (200, r#"{"header":{"revision":"2"}}"#.into())
    );
    assert_eq!(
        put_over_tls(&ca, &bob_cert, tls_port, put).await,
        (
            403,
            r#"{"error":"etcdserver: permission denied","message":"etcdserver: permission denied","code":7}"#
                .to_string()
        )
    );
    let (status, answer) = post(&server, "/v3/kv/put", None, put).await;
    assert_eq!(
        (status, answer.as_str()),
        (
            400,
            r#"{"error":"etcdserver: user name is empty","message":"etcdserver: user name is empty","code":3}"#
        )
    );
}

/// `POST /v3/kv/put` with `body` over TLS to `port`, presenting `leaf`: the status and body.
async fn put_over_tls(
    ca: &crate::support::tls::Ca,
    leaf: &crate::support::tls::Leaf,
    port: u16,
    body: &str,
) -> (u16, String) {
    let (connector, name) = ca.client_connector(b"http/1.1", leaf);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let body = Full::new(Bytes::from(body.to_string()));
    let response = exchange(tls, "/v3/kv/put", "POST", None, body).await;
    let status = response.status().as_u16();
    let answer = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&answer).into_owned())
}
