//! Auth and TLS through real clients: etcd-client with user and password, etcdctl with `--user`
//! and with `--cacert/--cert/--key`, and raw gRPC calls that walk the per-RPC rule table.
//!
//! The key-permission scenario also runs against Debian's etcd 3.4 where the two agree; where
//! MetaStore deliberately follows etcd 3.5/3.6 (stricter lease, cluster and maintenance rules,
//! nested txns checked) only MetaStore runs that part.

use crate::support;

use std::str::FromStr;
use std::time::{Duration, Instant};

use etcd_client::{
    AlarmAction, AlarmType, Client, Compare, CompareOp, ConnectOptions, GetOptions, Permission,
    PutOptions, TxnOp, WatchOptions,
};
use metastore_auth::needs::{Rule, RPC_RULES};
use metastore_proto::etcdserverpb as pb;
use prost::Message;
use support::cluster::Cluster;
use support::{Kind, Server};
use tonic::transport::Channel;

const BCRYPT: [&str; 2] = ["--bcrypt-cost", "4"];

fn extra(kind: Kind, more: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = more.iter().map(|s| s.to_string()).collect();
    if kind != Kind::Etcd {
        flags.extend(BCRYPT.iter().map(|s| s.to_string()));
    }
    flags
}

/// A connected gRPC channel to `endpoint`.
async fn connect(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn start(kind: Kind, more: &[&str]) -> Server {
    let flags = extra(kind, more);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start_with(kind, &flags).await
}

/// [`start`], then [`set_up_users`]; returns the server and its endpoint.
async fn start_with_users(kind: Kind, more: &[&str]) -> (Server, String) {
    let server = start(kind, more).await;
    let ep = server.endpoint();
    set_up_users(&ep).await;
    (server, ep)
}

async fn anonymous(endpoint: &str) -> Client {
    Client::connect([endpoint], None).await.expect("connect")
}

async fn as_user(endpoint: &str, user: &str, password: &str) -> Result<Client, etcd_client::Error> {
    Client::connect(
        [endpoint],
        Some(ConnectOptions::new().with_user(user, password)),
    )
    .await
}

/// The gRPC message of an etcd-client error.
fn message(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    }
}

fn code(e: &etcd_client::Error) -> Option<tonic::Code> {
    match e {
        etcd_client::Error::GRpcStatus(s) => Some(s.code()),
        _ => None,
    }
}

/// Creates root (with the root role), `reader` (READ on prefix /a/) for alice, `bw` (READWRITE on
/// [/b/, /c/)) for bob, carol without roles; then enables auth.
async fn set_up_users(endpoint: &str) {
    let c = anonymous(endpoint).await;
    let mut auth = c.auth_client();
    auth.user_add("root", "rootpw", None).await.unwrap();
    auth.role_add("root").await.unwrap();
    auth.user_grant_role("root", "root").await.unwrap();
    auth.role_add("reader").await.unwrap();
    auth.role_grant_permission("reader", Permission::read("/a/").with_prefix())
        .await
        .unwrap();
    auth.role_add("bw").await.unwrap();
    auth.role_grant_permission("bw", Permission::read_write("/b/").with_range_end("/c/"))
        .await
        .unwrap();
    for (user, pw, role) in [
        ("alice", "alicepw", Some("reader")),
        ("bob", "bobpw", Some("bw")),
        ("carol", "carolpw", None),
    ] {
        auth.user_add(user, pw, None).await.unwrap();
        if let Some(role) = role {
            auth.user_grant_role(user, role).await.unwrap();
        }
    }
    c.kv_client().put("/a/x", "1", None).await.unwrap();
    c.kv_client().put("/b/x", "1", None).await.unwrap();
    auth.auth_enable().await.unwrap();
}

/// Takes READ on the /a/ prefix away from role `reader` (alice's).
async fn revoke_reader_prefix(root: &mut Client) {
    let prefix = etcd_client::RoleRevokePermissionOptions::new().with_prefix();
    root.role_revoke_permission("reader", "/a/", Some(prefix))
        .await
        .unwrap();
}

const USER_EMPTY: &str = "etcdserver: user name is empty";
const DENIED: &str = "etcdserver: permission denied";
const INVALID_TOKEN: &str = "etcdserver: invalid auth token";

/// Key permissions, user management and their errors, as etcd 3.4 answers them too.
async fn key_permissions(kind: Kind) {
    let (_server, ep) = start_with_users(kind, &[]).await;

    // No credentials.
    let mut anon = anonymous(&ep).await;
    let e = anon.get("/a/x", None).await.unwrap_err();
    assert_eq!(
        (message(&e), code(&e)),
        (USER_EMPTY.into(), Some(tonic::Code::InvalidArgument))
    );
    // Wrong password, unknown user.
    for (user, pw) in [("alice", "wrong"), ("nobody", "x")] {
        let e = as_user(&ep, user, pw).await.err().expect("refused");
        assert_eq!(
            message(&e),
            "etcdserver: authentication failed, invalid user ID or password",
            "{kind:?}"
        );
        assert_eq!(code(&e), Some(tonic::Code::InvalidArgument));
    }

    // alice: READ on /a/ only.
    let mut alice = as_user(&ep, "alice", "alicepw").await.unwrap();
    let got = alice.get("/a/x", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"1");
    alice
        .get("/a/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    for e in [
        alice.put("/a/x", "2", None).await.unwrap_err(),
        alice.get("/b/x", None).await.unwrap_err(),
        alice
            .get("/a/", Some(GetOptions::new().with_range("/b")))
            .await
            .unwrap_err(),
        alice.delete("/a/x", None).await.unwrap_err(),
    ] {
        assert_eq!(
            (message(&e), code(&e)),
            (DENIED.into(), Some(tonic::Code::PermissionDenied)),
            "{kind:?}"
        );
    }
    // A txn needs read on its compares and what each branch's ops need.
    let txn = etcd_client::Txn::new()
        .when([Compare::value("/a/x", CompareOp::Equal, "1")])
        .and_then([TxnOp::get("/a/x", None)]);
    assert!(alice.txn(txn).await.unwrap().succeeded());
    let txn = etcd_client::Txn::new()
        .when([Compare::value("/a/x", CompareOp::Equal, "1")])
        .and_then([TxnOp::get("/a/x", None)])
        .or_else([TxnOp::put("/a/x", "3", None)]);
    assert_eq!(message(&alice.txn(txn).await.unwrap_err()), DENIED);

    // bob: READWRITE on [/b/, /c/).
    let mut bob = as_user(&ep, "bob", "bobpw").await.unwrap();
    bob.put("/b/y", "2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    bob.delete("/b/y", None).await.unwrap();
    assert_eq!(message(&bob.get("/a/x", None).await.unwrap_err()), DENIED);
    assert_eq!(
        message(&bob.put("/d", "x", None).await.unwrap_err()),
        DENIED
    );

    // Watch: refused at create, as a created-and-canceled watcher.
    let mut stream = alice
        .watch("/b/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let resp = stream.message().await.unwrap().expect("a refusal");
    assert!(resp.created() && resp.canceled(), "{kind:?}: {resp:?}");
    assert_eq!(
        resp.cancel_reason(),
        "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    );
    let mut stream = alice
        .watch("/a/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let resp = stream.message().await.unwrap().expect("created");
    assert!(resp.created() && !resp.canceled(), "{kind:?}: {resp:?}");
    bob.put("/b/z", "not seen by alice", None).await.unwrap();
    let mut root = as_user(&ep, "root", "rootpw").await.unwrap();
    root.put("/a/w", "seen", None).await.unwrap();
    let resp = stream.message().await.unwrap().expect("event");
    assert_eq!(resp.events()[0].kv().unwrap().key(), b"/a/w");

    // User management: root only, except reading oneself and one's own roles.
    assert_eq!(message(&alice.user_list().await.unwrap_err()), DENIED);
    assert_eq!(message(&alice.auth_disable().await.unwrap_err()), DENIED);
    assert_eq!(
        message(&alice.user_add("eve", "x", None).await.unwrap_err()),
        DENIED
    );
    assert_eq!(message(&alice.user_get("bob").await.unwrap_err()), DENIED);
    assert_eq!(alice.user_get("alice").await.unwrap().roles(), ["reader"]);
    alice.role_get("reader").await.unwrap();
    assert_eq!(message(&alice.role_get("bw").await.unwrap_err()), DENIED);
    assert_eq!(
        root.user_list().await.unwrap().users(),
        ["alice", "bob", "carol", "root"]
    );
    assert_eq!(
        root.role_list().await.unwrap().roles(),
        ["bw", "reader", "root"]
    );
    for (e, text) in [
        (
            root.user_add("alice", "x", None).await.unwrap_err(),
            "etcdserver: user name already exists",
        ),
        (
            root.user_get("nobody").await.unwrap_err(),
            "etcdserver: user name not found",
        ),
        (
            root.role_add("bw").await.unwrap_err(),
            "etcdserver: role name already exists",
        ),
        (
            root.role_get("nobody").await.unwrap_err(),
            "etcdserver: role name not found",
        ),
        (
            root.user_revoke_role("carol", "bw").await.unwrap_err(),
            "etcdserver: role is not granted to the user",
        ),
        (
            root.user_delete("root").await.unwrap_err(),
            "etcdserver: invalid auth management",
        ),
        (
            root.user_revoke_role("root", "root").await.unwrap_err(),
            "etcdserver: invalid auth management",
        ),
        (
            root.role_revoke_permission("reader", "/a/", None)
                .await
                .unwrap_err(),
            "etcdserver: permission is not granted to the role",
        ),
    ] {
        assert_eq!(message(&e), text, "{kind:?}");
    }

    // A revoked permission takes effect at once for the same session.
    revoke_reader_prefix(&mut root).await;
    assert_eq!(message(&alice.get("/a/x", None).await.unwrap_err()), DENIED);
    // A password change ends the old password's sessions.
    root.user_change_password("bob", "newpw").await.unwrap();
    assert!(as_user(&ep, "bob", "bobpw").await.is_err());
    let mut bob = as_user(&ep, "bob", "newpw").await.unwrap();
    bob.get("/b/x", None).await.unwrap();

    // Disabling needs root; afterwards anyone may read.
    root.auth_disable().await.unwrap();
    anon.get("/a/x", None).await.unwrap();
}

per_kind!(key_permissions);

/// What MetaStore checks beyond etcd 3.4, as etcd 3.5/3.6 do: nested txns, leases' keys,
/// maintenance and cluster calls; state and rules survive a restart.
async fn stricter_rules_and_restart(kind: Kind) {
    let (mut server, ep) = start_with_users(kind, &[]).await;
    let mut root = as_user(&ep, "root", "rootpw").await.unwrap();
    let mut alice = as_user(&ep, "alice", "alicepw").await.unwrap();
    let mut carol = as_user(&ep, "carol", "carolpw").await.unwrap();
    let mut anon = anonymous(&ep).await;

    // A nested txn is checked like the outer one (etcd 3.4.23 let it through).
    let inner = etcd_client::Txn::new().and_then([TxnOp::put("/a/x", "owned", None)]);
    let outer = etcd_client::Txn::new().and_then([TxnOp::txn(inner)]);
    assert_eq!(message(&carol.txn(outer).await.unwrap_err()), DENIED);
    assert_eq!(root.get("/a/x", None).await.unwrap().kvs()[0].value(), b"1");

    // A lease's keys guard its revoke, its keep-alive and listing its keys.
    let lease = root.lease_grant(60, None).await.unwrap().id();
    root.put("/a/leased", "v", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    assert_eq!(
        message(&carol.lease_revoke(lease).await.unwrap_err()),
        DENIED
    );
    assert_eq!(
        message(
            &carol
                .lease_time_to_live(
                    lease,
                    Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys())
                )
                .await
                .unwrap_err()
        ),
        DENIED
    );
    // etcd-client sends the first keep-alive while opening the stream, so the refusal may
    // arrive either as the answer to opening it or as its first message.
    let refusal = match carol.lease_keep_alive(lease).await {
        Err(e) => e,
        Ok((mut keeper, mut responses)) => {
            keeper.keep_alive().await.unwrap();
            responses.message().await.unwrap_err()
        }
    };
    assert_eq!(message(&refusal), DENIED);
    assert_eq!(
        message(&anon.lease_grant(60, None).await.unwrap_err()),
        USER_EMPTY
    );
    carol.lease_grant(60, None).await.unwrap();

    // Maintenance and cluster: root, except Status and MemberList for any user.
    carol.status().await.unwrap();
    carol.member_list().await.unwrap();
    assert_eq!(message(&anon.status().await.unwrap_err()), USER_EMPTY);
    for e in [
        carol.hash_kv(0).await.unwrap_err(),
        carol.defragment().await.unwrap_err(),
        carol.compact(1, None).await.unwrap_err(),
        carol.member_remove(1).await.unwrap_err(),
        carol
            .alarm(AlarmAction::Deactivate, AlarmType::Nospace, None)
            .await
            .unwrap_err(),
    ] {
        assert_eq!(message(&e), DENIED, "{kind:?}");
    }
    support::alarm_list(&mut carol).await.unwrap();
    root.hash_kv(0).await.unwrap();
    // A --no-password user cannot log in with a password (etcd's own text and code).
    root.user_add(
        "svc",
        "",
        Some(etcd_client::UserAddOptions::new().with_no_pwd()),
    )
    .await
    .unwrap();
    let e = as_user(&ep, "svc", "x").await.err().unwrap();
    assert_eq!(
        message(&e),
        "auth: authentication failed, password was given for no password user"
    );
    assert_eq!(code(&e), Some(tonic::Code::Unknown));
    let revision = auth_status(&ep).await.auth_revision;

    // Restart: the state is replicated and persisted; tokens are not.
    server.restart().await;
    let mut alice2 = as_user(&ep, "alice", "alicepw").await.unwrap();
    alice2.get("/a/x", None).await.unwrap();
    assert_eq!(
        message(&alice2.put("/a/x", "2", None).await.unwrap_err()),
        DENIED
    );
    let status = auth_status(&ep).await;
    assert!(status.enabled);
    assert_eq!(status.auth_revision, revision);
    assert_eq!(
        message(&anonymous(&ep).await.get("/a/x", None).await.unwrap_err()),
        USER_EMPTY
    );
    // The old session's token died with the process; etcd-client does not log in again.
    let e = alice.get("/a/x", None).await.unwrap_err();
    assert_eq!(message(&e), INVALID_TOKEN);
    assert_eq!(code(&e), Some(tonic::Code::Unauthenticated));
}

per_engine!(stricter_rules_and_restart);

// ---- raw calls with a token: the rule table, token expiry ----

/// A codec that passes message bytes through, so one client can call any method.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Calls `path` with `body`; for streaming methods, the first message (or `None` if none came
/// within a second: the call was admitted and is waiting).
async fn call(
    channel: &Channel,
    token: Option<&str>,
    path: &str,
    body: Vec<u8>,
) -> Result<Option<Vec<u8>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let method = tonic::codegen::http::uri::PathAndQuery::from_str(path).unwrap();
    fn with<T>(mut r: tonic::Request<T>, token: Option<&str>) -> tonic::Request<T> {
        if let Some(t) = token {
            r.metadata_mut().insert("token", t.parse().unwrap());
        }
        r
    }
    let bidi = [
        "/etcdserverpb.Watch/Watch",
        "/etcdserverpb.Lease/LeaseKeepAlive",
    ];
    let server_streaming = [
        "/etcdserverpb.Maintenance/Snapshot",
        "/v3electionpb.Election/Observe",
        "/grpc.health.v1.Health/Watch",
    ];
    let mut stream = if bidi.contains(&path) {
        let req = with(
            tonic::Request::new(tokio_stream::iter(vec![body]).chain(tokio_stream::pending())),
            token,
        );
        grpc.streaming(req, method, RawCodec).await?.into_inner()
    } else if server_streaming.contains(&path) {
        grpc.server_streaming(with(tonic::Request::new(body), token), method, RawCodec)
            .await?
            .into_inner()
    } else {
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            grpc.unary(with(tonic::Request::new(body), token), method, RawCodec),
        )
        .await;
        return match resp {
            Ok(r) => r.map(|r| Some(r.into_inner())),
            Err(_) => Ok(None),
        };
    };
    match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
        Ok(m) => m,
        Err(_) => Ok(None),
    }
}

use tokio_stream::StreamExt as _;

/// The body of a Range of `key`.
fn range_body(key: &str) -> Vec<u8> {
    pb::RangeRequest {
        key: key.into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The body of a Put of `key` = `v`.
fn put_body(key: &str) -> Vec<u8> {
    pb::PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A request body for each method that touches key `/k` (or names user alice / role reader),
/// so that key rules have something to check.
fn body_for(path: &str, lease: i64) -> Vec<u8> {
    let method = path.rsplit('/').next().unwrap();
    let k = b"/k".to_vec();
    match path {
        p if p.starts_with("/etcdserverpb.KV/") => match method {
            "Range" => range_body("/k"),
            "Put" => put_body("/k"),
            "DeleteRange" => pb::DeleteRangeRequest {
                key: k,
                ..Default::default()
            }
            .encode_to_vec(),
            "Txn" => pb::TxnRequest {
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        key: k,
                        ..Default::default()
                    })),
                }],
                ..Default::default()
            }
            .encode_to_vec(),
            _ => pb::CompactionRequest {
                revision: 1,
                physical: false,
            }
            .encode_to_vec(),
        },
        "/etcdserverpb.Watch/Watch" => pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: k,
                    ..Default::default()
                },
            )),
        }
        .encode_to_vec(),
        "/etcdserverpb.Lease/LeaseRevoke" => pb::LeaseRevokeRequest { id: lease }.encode_to_vec(),
        "/etcdserverpb.Lease/LeaseKeepAlive" => {
            pb::LeaseKeepAliveRequest { id: lease }.encode_to_vec()
        }
        "/etcdserverpb.Lease/LeaseTimeToLive" => pb::LeaseTimeToLiveRequest {
            id: lease,
            keys: true,
        }
        .encode_to_vec(),
        "/etcdserverpb.Lease/LeaseGrant" => {
            pb::LeaseGrantRequest { ttl: 60, id: 0 }.encode_to_vec()
        }
        // A learner: adding it leaves the quorum alone.
        "/etcdserverpb.Cluster/MemberAdd" => pb::MemberAddRequest {
            peer_ur_ls: vec!["http://127.0.0.1:9".into()],
            is_learner: true,
        }
        .encode_to_vec(),
        "/etcdserverpb.Maintenance/Alarm" => pb::AlarmRequest {
            action: pb::alarm_request::AlarmAction::Deactivate as i32,
            member_id: 0,
            alarm: pb::AlarmType::Nospace as i32,
        }
        .encode_to_vec(),
        "/etcdserverpb.Maintenance/Downgrade" => pb::DowngradeRequest {
            action: 0,
            version: "3.5".into(),
        }
        .encode_to_vec(),
        "/etcdserverpb.Auth/Authenticate" => pb::AuthenticateRequest {
            name: "carol".into(),
            password: "carolpw".into(),
        }
        .encode_to_vec(),
        "/etcdserverpb.Auth/UserGet" => pb::AuthUserGetRequest {
            name: "alice".into(),
        }
        .encode_to_vec(),
        "/etcdserverpb.Auth/RoleGet" => pb::AuthRoleGetRequest {
            role: "reader".into(),
        }
        .encode_to_vec(),
        "/etcdserverpb.Auth/UserAdd" => pb::AuthUserAddRequest {
            name: format!("u{}", rand::random::<u32>()),
            password: "x".into(),
            ..Default::default()
        }
        .encode_to_vec(),
        "/etcdserverpb.Auth/RoleAdd" => pb::AuthRoleAddRequest {
            name: format!("r{}", rand::random::<u32>()),
        }
        .encode_to_vec(),
        p if p.starts_with("/v3lockpb.Lock/") => match method {
            "Lock" => metastore_proto::v3lockpb::LockRequest { name: k, lease }.encode_to_vec(),
            _ => metastore_proto::v3lockpb::UnlockRequest {
                key: b"/k/x".to_vec(),
            }
            .encode_to_vec(),
        },
        p if p.starts_with("/v3electionpb.Election/") => {
            use metastore_proto::v3electionpb as e;
            let leader = Some(e::LeaderKey {
                name: k.clone(),
                key: b"/k/x".to_vec(),
                rev: 1,
                lease,
            });
            match method {
                "Campaign" => e::CampaignRequest {
                    name: k,
                    lease,
                    value: b"v".to_vec(),
                }
                .encode_to_vec(),
                "Proclaim" => e::ProclaimRequest {
                    leader,
                    value: b"v".to_vec(),
                }
                .encode_to_vec(),
                "Resign" => e::ResignRequest { leader }.encode_to_vec(),
                _ => e::LeaderRequest { name: k }.encode_to_vec(),
            }
        }
        _ => Vec::new(),
    }
}

/// Whether a call's outcome is an auth refusal with `text`.
fn refused_with(outcome: &Result<Option<Vec<u8>>, tonic::Status>, path: &str, text: &str) -> bool {
    match outcome {
        Err(s) => s.message() == text,
        Ok(Some(bytes)) if path == "/etcdserverpb.Watch/Watch" => {
            let resp = pb::WatchResponse::decode(bytes.as_slice()).unwrap();
            resp.canceled && resp.cancel_reason.ends_with(text)
        }
        Ok(_) => false,
    }
}

fn auth_refusal(outcome: &Result<Option<Vec<u8>>, tonic::Status>, path: &str) -> bool {
    refused_with(outcome, path, USER_EMPTY)
        || refused_with(outcome, path, DENIED)
        || refused_with(outcome, path, INVALID_TOKEN)
}

async fn token_of(channel: &Channel, user: &str, password: &str) -> String {
    let mut auth = pb::auth_client::AuthClient::new(channel.clone());
    auth.authenticate(pb::AuthenticateRequest {
        name: user.into(),
        password: password.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .token
}

/// AuthStatus as root.
async fn auth_status(ep: &str) -> pb::AuthStatusResponse {
    let channel = connect(ep).await;
    let token = token_of(&channel, "root", "rootpw").await;
    let mut req = tonic::Request::new(pb::AuthStatusRequest {});
    req.metadata_mut().insert("token", token.parse().unwrap());
    pb::auth_client::AuthClient::new(channel)
        .auth_status(req)
        .await
        .unwrap()
        .into_inner()
}

/// Walks `RPC_RULES` (the table docs/auth.md prints): every method, called anonymously, by a user
/// without roles and by root, is refused or admitted as its rule says.
#[tokio::test]
async fn every_rpc_follows_the_rule_table() {
    let (_server, ep) = start_with_users(Kind::Memory, &[]).await;
    let channel = connect(&ep).await;
    let root = token_of(&channel, "root", "rootpw").await;
    let carol = token_of(&channel, "carol", "carolpw").await;
    // A lease holding /k, for the lease rules.
    let mut root_client = as_user(&ep, "root", "rootpw").await.unwrap();
    let lease = root_client.lease_grant(600, None).await.unwrap().id();
    root_client
        .put("/k", "v", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();

    let mut failures = Vec::new();
    for (path, rule, _) in RPC_RULES {
        let anon = call(&channel, None, path, body_for(path, lease)).await;
        let by_carol = call(&channel, Some(&carol), path, body_for(path, lease)).await;
        let (anon_ok, carol_ok) = match rule {
            Rule::Open => (!auth_refusal(&anon, path), !auth_refusal(&by_carol, path)),
            Rule::Authenticated => (
                refused_with(&anon, path, USER_EMPTY),
                !auth_refusal(&by_carol, path),
            ),
            Rule::Admin | Rule::Keys | Rule::SelfOrAdmin => (
                refused_with(&anon, path, USER_EMPTY),
                refused_with(&by_carol, path, DENIED),
            ),
        };
        if !anon_ok {
            failures.push(format!("{path} ({rule:?}) anonymous: {anon:?}"));
        }
        if !carol_ok {
            failures.push(format!("{path} ({rule:?}) carol: {by_carol:?}"));
        }
    }
    // Root last (it changes things), and AuthDisable at the very end.
    for (path, rule, _) in RPC_RULES
        .iter()
        .filter(|(p, _, _)| !p.ends_with("/AuthDisable"))
    {
        let outcome = call(&channel, Some(&root), path, body_for(path, lease)).await;
        if auth_refusal(&outcome, path) {
            failures.push(format!("{path} ({rule:?}) root: {outcome:?}"));
        }
    }
    let outcome = call(
        &channel,
        Some(&root),
        "/etcdserverpb.Auth/AuthDisable",
        Vec::new(),
    )
    .await;
    assert!(outcome.is_ok(), "root disables auth: {outcome:?}");
    assert!(
        failures.is_empty(),
        "{} rule violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every method the client port serves is in the table (an unknown method would need root).
#[test]
fn the_rule_table_covers_every_served_method() {
    let protos = [
        include_str!("../proto/etcd/api/etcdserverpb/rpc.proto"),
        include_str!("../proto/etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto"),
        include_str!(
            "../proto/etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto"
        ),
    ];
    let mut missing = Vec::new();
    for proto in protos {
        let package = proto
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("package ")
                    .map(|p| p.trim_end_matches(';').to_string())
            })
            .unwrap();
        let mut service = String::new();
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap().to_string();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap().trim();
                let path = format!("/{package}.{service}/{method}");
                if !RPC_RULES.iter().any(|(p, _, _)| *p == path) {
                    missing.push(path);
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "methods missing from RPC_RULES: {missing:?}"
    );
    // docs/auth.md prints the table: every row, with its requirement.
    let doc = include_str!("../docs/auth.md");
    for (path, _, needs) in RPC_RULES {
        let row = format!("| `{path}` | {needs} |");
        assert!(doc.contains(&row), "docs/auth.md lacks the row {row}");
    }
}

/// `--auth-token` for ES256 JWTs living `ttl`, with a fresh key pair written to `dir`.
fn jwt_spec(dir: &std::path::Path, ttl: &str) -> String {
    let (private, public) = support::tls::jwt_keys(dir);
    format!(
        "jwt,pub-key={},priv-key={},sign-method=ES256,ttl={ttl}",
        public.display(),
        private.display()
    )
}

/// Reads `/a/x` with a raw Range call carrying `token`.
async fn read_a_x(channel: &Channel, token: &str) -> Result<Option<Vec<u8>>, tonic::Status> {
    call(
        channel,
        Some(token),
        "/etcdserverpb.KV/Range",
        range_body("/a/x"),
    )
    .await
}

/// Simple tokens die after `--auth-token-ttl` of disuse; JWT tokens expire by their `exp` and go
/// stale when the auth store changes.
#[tokio::test]
async fn tokens_expire() {
    let (server, ep) = start_with_users(Kind::Memory, &["--auth-token-ttl", "2"]).await;
    let channel = connect(&ep).await;
    let token = token_of(&channel, "alice", "alicepw").await;
    // Each use extends it.
    for _ in 0..3 {
        read_a_x(&channel, &token).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let e = read_a_x(&channel, &token).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::Unauthenticated, INVALID_TOKEN)
    );
    drop(server);

    let dir = tempfile::tempdir().unwrap();
    let spec = jwt_spec(dir.path(), "3s");
    let (_server, ep) = start_with_users(Kind::Rocks, &["--auth-token", &spec]).await;
    let channel = connect(&ep).await;
    let token = token_of(&channel, "alice", "alicepw").await;
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    read_a_x(&channel, &token).await.unwrap();
    // A tampered token is refused.
    let tampered = format!("{token}x");
    let e = read_a_x(&channel, &tampered).await.unwrap_err();
    assert_eq!(e.message(), INVALID_TOKEN);
    // Any auth change makes the token stale for key operations.
    let mut root = as_user(&ep, "root", "rootpw").await.unwrap();
    root.role_add("another").await.unwrap();
    let e = read_a_x(&channel, &token).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::InvalidArgument,
            "etcdserver: revision of auth store is old"
        )
    );
    let token = token_of(&channel, "alice", "alicepw").await;
    read_a_x(&channel, &token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(4200)).await;
    let e = read_a_x(&channel, &token).await.unwrap_err();
    assert_eq!(e.message(), INVALID_TOKEN);
}

/// Authenticate is rate-limited per user: a burst of wrong passwords gets `too many requests`,
/// and other users are unaffected.
#[tokio::test]
async fn authenticate_is_rate_limited_per_user() {
    let (_server, ep) = start_with_users(Kind::Memory, &[]).await;
    let channel = connect(&ep).await;
    let mut auth = pb::auth_client::AuthClient::new(channel.clone());
    let mut limited = 0;
    for _ in 0..40 {
        let e = auth
            .authenticate(pb::AuthenticateRequest {
                name: "alice".into(),
                password: "guess".into(),
            })
            .await
            .unwrap_err();
        if e.message() == "etcdserver: too many requests" {
            assert_eq!(e.code(), tonic::Code::ResourceExhausted);
            limited += 1;
        } else {
            assert_eq!(
                e.message(),
                "etcdserver: authentication failed, invalid user ID or password"
            );
        }
    }
    assert!(limited > 0, "40 rapid attempts were never limited");
    token_of(&channel, "bob", "bobpw").await;
}

/// Every service, Auth included, takes at most `--max-request-bytes` plus gRPC's overhead
/// (512 KiB) per message, as etcd's server-wide limit: more gets ResourceExhausted and grpc-go's
/// `received message larger than max` before anything is decoded or stored.
async fn oversized_requests_are_refused_by_every_service(kind: Kind) {
    let server = start(kind, &["--max-request-bytes", "1024"]).await;
    let channel = connect(&server.endpoint()).await;
    let body = pb::AuthenticateRequest {
        name: "n".repeat(600 * 1024),
        password: "p".into(),
    }
    .encode_to_vec();
    for path in [
        "/etcdserverpb.Auth/Authenticate",
        "/etcdserverpb.Auth/UserAdd",
        "/etcdserverpb.Maintenance/Status",
        "/etcdserverpb.Cluster/MemberAdd",
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.Lease/LeaseGrant",
        "/v3lockpb.Lock/Lock",
        "/v3electionpb.Election/Campaign",
    ] {
        let e = call(&channel, None, path, body.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{path}: {e:?}");
        assert!(
            e.message()
                .starts_with("grpc: received message larger than max ("),
            "{path}: {e:?}"
        );
    }
    // Below the limit the same services answer as usual.
    let e = call(
        &channel,
        None,
        "/etcdserverpb.Auth/Authenticate",
        pb::AuthenticateRequest {
            name: "n".repeat(1000),
            password: "p".into(),
        }
        .encode_to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.message(), "etcdserver: authentication is not enabled");
}

per_kind!(oversized_requests_are_refused_by_every_service);

/// Simple tokens that no entry of this member's log could have issued (not etcd's form, or an
/// index far ahead of what it applied) are refused at once with etcd's `invalid auth token`
/// while the member applies nothing: they are not held until the applied index reaches them.
#[tokio::test]
async fn forged_simple_tokens_are_refused_at_once() {
    let server = start(Kind::Memory, &[]).await;
    let ep = server.endpoint();
    set_up_users(&ep).await;
    let channel = connect(&ep).await;
    let token = token_of(&channel, "alice", "alicepw").await;
    let (prefix, index) = token.split_once('.').unwrap();
    let index: u64 = index.parse().unwrap();
    for forged in [
        "garbage".to_string(),
        format!("x.{}", index + 1),
        format!("{prefix}x.{}", index + 1),
        format!("{prefix}.+{}", index + 1),
        format!("{prefix}.{}", index + 10_000_000),
        format!("{prefix}.{}", u64::MAX),
    ] {
        // `call` gives up after 5 s and answers `None` for a call still held.
        let outcome = call(
            &channel,
            Some(&forged),
            "/etcdserverpb.KV/Range",
            body_for("/etcdserverpb.KV/Range", 0),
        )
        .await;
        let e = outcome.expect_err(&format!("{forged}: held or admitted"));
        assert_eq!(
            (e.code(), e.message()),
            (
                tonic::Code::Unauthenticated,
                "etcdserver: invalid auth token"
            ),
            "{forged}"
        );
    }
    // The real token still names alice, who may not read /k.
    let e = call(
        &channel,
        Some(&token),
        "/etcdserverpb.KV/Range",
        body_for("/etcdserverpb.KV/Range", 0),
    )
    .await
    .unwrap_err();
    assert_eq!(e.message(), DENIED);
}

/// `step`, which must finish within 10 s.
async fn within<T>(step: impl std::future::Future<Output = T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(10), step)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 10 s"))
}

/// Opens a bidirectional stream with `first` already queued (grpc-go, etcd, sends the response
/// headers with the first answer) and waits for that answer: the sender, the stream, the answer.
async fn open_stream<Req, Resp, Call>(
    first: Req,
    open: impl FnOnce(tokio_stream::wrappers::ReceiverStream<Req>) -> Call,
    what: &str,
) -> (tokio::sync::mpsc::Sender<Req>, tonic::Streaming<Resp>, Resp)
where
    Call: std::future::Future<
        Output = Result<tonic::Response<tonic::Streaming<Resp>>, tonic::Status>,
    >,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.unwrap();
    let mut stream = within(
        open(tokio_stream::wrappers::ReceiverStream::new(rx)),
        &format!("opening {what}"),
    )
    .await
    .unwrap()
    .into_inner();
    let answer = within(stream.message(), &format!("the first answer on {what}"))
        .await
        .unwrap()
        .unwrap();
    (tx, stream, answer)
}

/// A request on an open stream is checked with the credentials as they are now: after bob's
/// password changed (which invalidates his simple tokens), a watch create on the stream he
/// opened is refused as etcd refuses it (created and canceled, invalid auth token), and so is a
/// keep-alive (MetaStore, which checks keep-alives as etcd 3.6 does; etcd 3.4 does not).
async fn open_streams_check_credentials_on_each_request(kind: Kind) {
    let server = start(kind, &[]).await;
    let ep = server.endpoint();
    set_up_users(&ep).await;
    let channel = connect(&ep).await;
    let token = token_of(&channel, "bob", "bobpw").await;
    fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut().insert("token", token.parse().unwrap());
        r
    }
    let create = |key: &str| pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: key.into(),
                ..Default::default()
            },
        )),
    };
    // A stream of bob's: `$client::$method` called with his token.
    macro_rules! bobs_stream {
        ($client:ty, $method:ident, $first:expr, $what:expr) => {
            open_stream(
                $first,
                |requests| {
                    let mut client = <$client>::new(channel.clone());
                    let request = with_token(&token, requests);
                    async move { client.$method(request).await }
                },
                $what,
            )
            .await
        };
    }
    let (watch_tx, mut watches, first) = bobs_stream!(
        pb::watch_client::WatchClient<_>,
        watch,
        create("/b/1"),
        "a watch stream"
    );
    assert!(first.created && !first.canceled, "{first:?}");

    // A lease bob renews on a stream of his (MetaStore only: etcd 3.4's keep-alive is open).
    let root = as_user(&ep, "root", "rootpw").await.unwrap();
    let lease = within(root.lease_client().grant(60, None), "a lease grant")
        .await
        .unwrap()
        .id();
    let (keep_tx, mut keep_alives, renewed) = bobs_stream!(
        pb::lease_client::LeaseClient<_>,
        lease_keep_alive,
        pb::LeaseKeepAliveRequest { id: lease },
        "a keep-alive stream"
    );
    assert_eq!((renewed.id, renewed.ttl), (lease, 60));

    within(
        root.auth_client().user_change_password("bob", "newpw"),
        "the password change",
    )
    .await
    .unwrap();

    watch_tx.send(create("/b/2")).await.unwrap();
    let refused = within(watches.message(), "the second watch create")
        .await
        .unwrap()
        .unwrap();
    assert!(refused.created && refused.canceled, "{refused:?}");
    assert_eq!(
        refused.cancel_reason,
        "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"
    );
    if kind != Kind::Etcd {
        keep_tx
            .send(pb::LeaseKeepAliveRequest { id: lease })
            .await
            .unwrap();
        let e = within(keep_alives.message(), "the second keep-alive")
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                tonic::Code::Unauthenticated,
                "etcdserver: invalid auth token"
            )
        );
    }
}

per_kind!(open_streams_check_credentials_on_each_request);

// ---- etcdctl with --user ----

fn etcdctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["--dial-timeout=3s", "--command-timeout=5s"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("etcdctl (installed by `cargo xtask test`)")
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "etcdctl failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn failed(out: std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "etcdctl succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// etcdctl commands, to run as root, that give alice READ on the /a/ prefix (role `reader`) and
/// write /a/x = 1.
const READER_SETUP: [&[&str]; 5] = [
    &["role", "add", "reader"],
    &[
        "role",
        "grant-permission",
        "--prefix",
        "reader",
        "read",
        "/a/",
    ],
    &["user", "add", "alice:alicepw"],
    &["user", "grant-role", "alice", "reader"],
    &["put", "/a/x", "1"],
];

#[tokio::test]
async fn etcdctl_user_flags() {
    let server = start(Kind::Rocks, &[]).await;
    let ep = server.endpoint();
    ok(etcdctl(&ep, &["user", "add", "root:rootpw"]));
    // etcdctl's auth enable creates the root role and grants it when the server asks for it.
    ok(etcdctl(&ep, &["auth", "enable"]));
    for args in READER_SETUP {
        ok(etcdctl(&ep, &[&["--user", "root:rootpw"], args].concat()));
    }
    assert_eq!(
        ok(etcdctl(
            &ep,
            &[
                "--user",
                "alice:alicepw",
                "get",
                "/a/x",
                "--print-value-only"
            ]
        )),
        "1\n"
    );
    assert!(failed(etcdctl(
        &ep,
        &["--user", "alice:alicepw", "put", "/a/x", "2"]
    ))
    .contains("etcdserver: permission denied"));
    assert!(failed(etcdctl(&ep, &["get", "/a/x"])).contains("etcdserver: user name is empty"));
    assert!(
        failed(etcdctl(&ep, &["--user", "alice:wrong", "get", "/a/x"]))
            .contains("authentication failed")
    );
    let role = ok(etcdctl(
        &ep,
        &["--user", "root:rootpw", "role", "get", "reader"],
    ));
    assert!(role.contains("[/a/, /a0) (prefix /a/)"), "{role}");
    assert!(failed(etcdctl(
        &ep,
        &["--user", "alice:alicepw", "auth", "disable"]
    ))
    .contains("permission denied"));
    ok(etcdctl(&ep, &["--user", "root:rootpw", "auth", "disable"]));
    ok(etcdctl(&ep, &["put", "/a/x", "3"]));
}

// ---- TLS ----

/// `https://` client URL with `--client-cert-auth`: certificates from the trusted CA get in and
/// their CN is the user; a certificate from another CA, or none, is rejected at the handshake.
#[tokio::test]
async fn mutual_tls_and_certificate_users() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::Ca::new(dir.path(), "client");
    let rogue = support::tls::Ca::new(dir.path(), "rogue");
    let server_cert = ca.leaf(dir.path(), "server", "metastore");
    let root_cert = ca.leaf(dir.path(), "root", "root");
    let alice_cert = ca.leaf(dir.path(), "alice", "alice");
    let rogue_root = rogue.leaf(dir.path(), "rogue-root", "root");

    let port = support::free_port();
    let peer = support::free_port();
    let url = format!("https://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut child = std::process::Command::new(support::metastore_bin())
        .args(["--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("default={peer_url}")])
        .arg("--cert-file")
        .arg(&server_cert.cert)
        .arg("--key-file")
        .arg(&server_cert.key)
        .arg("--trusted-ca-file")
        .arg(&ca.cert_path)
        .args(["--client-cert-auth", "--bcrypt-cost", "4"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tls = |leaf: &support::tls::Leaf| -> Vec<String> {
        vec![
            format!("--cacert={}", ca.cert_path.display()),
            format!("--cert={}", leaf.cert.display()),
            format!("--key={}", leaf.key.display()),
        ]
    };
    let run = |leaf: Option<&support::tls::Leaf>, args: &[&str]| {
        let mut all: Vec<String> = leaf
            .map(&tls)
            .unwrap_or_else(|| vec![format!("--cacert={}", ca.cert_path.display())]);
        all.extend(args.iter().map(|s| s.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        etcdctl(&url, &all)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run(Some(&root_cert), &["put", "ready", "1"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "TLS server did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ok(run(Some(&root_cert), &["user", "add", "root:rootpw"]));
    for args in READER_SETUP {
        ok(run(Some(&root_cert), args));
    }
    ok(run(Some(&root_cert), &["auth", "enable"]));

    // The certificate's CN is the user when no token is sent.
    ok(run(Some(&root_cert), &["user", "list"]));
    ok(run(Some(&root_cert), &["put", "/a/x", "2"]));
    assert_eq!(
        ok(run(
            Some(&alice_cert),
            &["get", "/a/x", "--print-value-only"]
        )),
        "2\n"
    );
    assert!(failed(run(Some(&alice_cert), &["put", "/a/x", "3"])).contains("permission denied"));
    assert!(failed(run(Some(&alice_cert), &["user", "list"])).contains("permission denied"));
    // A token wins over the certificate.
    assert!(failed(run(
        Some(&root_cert),
        &["--user", "alice:alicepw", "put", "/a/x", "4"]
    ))
    .contains("permission denied"));

    // A certificate from another CA, or none at all, does not get in.
    let mut rogue_args = vec![
        format!("--cacert={}", ca.cert_path.display()),
        format!("--cert={}", rogue_root.cert.display()),
        format!("--key={}", rogue_root.key.display()),
    ];
    rogue_args.extend(["get".to_string(), "/a/x".to_string()]);
    let rogue_args: Vec<&str> = rogue_args.iter().map(String::as_str).collect();
    failed(etcdctl(&url, &rogue_args));
    failed(run(None, &["get", "/a/x"]));

    // etcd-client over TLS with alice's certificate.
    let options = ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(
                std::fs::read(&ca.cert_path).unwrap(),
            ))
            .identity(etcd_client::Identity::from_pem(
                std::fs::read(&alice_cert.cert).unwrap(),
                std::fs::read(&alice_cert.key).unwrap(),
            )),
    );
    let mut client = Client::connect([url.as_str()], Some(options))
        .await
        .unwrap();
    assert_eq!(
        client.get("/a/x", None).await.unwrap().kvs()[0].value(),
        b"2"
    );
    assert_eq!(
        message(&client.put("/a/x", "5", None).await.unwrap_err()),
        DENIED
    );
    let _ = child.kill();
    let _ = child.wait();
}

// ---- 3 members ----

/// A 3-member cluster whose peers speak TLS (with peer certificate authentication) forms and
/// replicates; auth state is replicated, and a revoked permission takes effect at once on every
/// member.
#[tokio::test]
async fn three_members_peer_tls_and_revocation_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::Ca::new(dir.path(), "peer");
    let peer_cert = ca.leaf(dir.path(), "peer", "member");
    support::cluster::use_https_peers();
    let (cert, key, cafile) = (
        peer_cert.cert.display().to_string(),
        peer_cert.key.display().to_string(),
        ca.cert_path.display().to_string(),
    );
    let mut cluster = Cluster::start(
        Kind::Memory,
        3,
        &[
            "--peer-cert-file",
            &cert,
            "--peer-key-file",
            &key,
            "--peer-trusted-ca-file",
            &cafile,
            "--peer-client-cert-auth",
            "--bcrypt-cost",
            "4",
        ],
    )
    .await;
    cluster.wait_leader().await;
    set_up_users(&cluster.endpoint(0)).await;
    let mut root = as_user(&cluster.endpoint(0), "root", "rootpw")
        .await
        .unwrap();
    let mut readers = Vec::new();
    for i in 0..3 {
        let mut alice = as_user(&cluster.endpoint(i), "alice", "alicepw")
            .await
            .unwrap();
        assert_eq!(
            alice.get("/a/x", None).await.unwrap().kvs()[0].value(),
            b"1"
        );
        readers.push(alice);
    }
    root.put("/a/x", "replicated", None).await.unwrap();
    // A simple token issued through one member works on every member (each issued it when
    // applying the Authenticate entry).
    let ch0 = connect(&cluster.endpoint(0)).await;
    let token = token_of(&ch0, "alice", "alicepw").await;
    for i in 1..3 {
        let ch = connect(&cluster.endpoint(i)).await;
        read_a_x(&ch, &token)
            .await
            .unwrap_or_else(|e| panic!("member {i} refused member 0's token: {e:?}"));
    }
    revoke_reader_prefix(&mut root).await;
    for (i, alice) in readers.iter_mut().enumerate() {
        let e = alice.get("/a/x", None).await.unwrap_err();
        assert_eq!(message(&e), DENIED, "member {i} still lets alice read");
    }
    for i in 0..3 {
        let mut root = as_user(&cluster.endpoint(i), "root", "rootpw")
            .await
            .unwrap();
        let got = root.get("/a/x", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"replicated", "member {i}");
    }
}

/// JWT tokens are signed by the member that authenticates and verified by any member holding the
/// same key.
#[tokio::test]
async fn jwt_tokens_work_on_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let spec = jwt_spec(dir.path(), "1m");
    let cluster = Cluster::start(
        Kind::Rocks,
        3,
        &["--auth-token", &spec, "--bcrypt-cost", "4"],
    )
    .await;
    set_up_users(&cluster.endpoint(0)).await;
    let ch0 = connect(&cluster.endpoint(0)).await;
    let token = token_of(&ch0, "bob", "bobpw").await;
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let put = put_body("/b/jwt");
    let denied = put_body("/a/jwt");
    for i in 0..3 {
        let ch = connect(&cluster.endpoint(i)).await;
        call(&ch, Some(&token), "/etcdserverpb.KV/Put", put.clone())
            .await
            .unwrap_or_else(|e| panic!("member {i} refused the token: {e:?}"));
        let e = call(&ch, Some(&token), "/etcdserverpb.KV/Put", denied.clone())
            .await
            .unwrap_err();
        assert_eq!(e.message(), DENIED, "member {i}");
    }
}
