//! Differential test for Watch and Lease: one script of watch-stream requests, writes and lease
//! calls runs against real etcd and against MetaStore on each engine; every response must match
//! field by field, apart from the cluster id, member id and raft term in headers (and a lease's
//! remaining TTL, which depends on timing and is compared as "positive", and the order of
//! attached keys and of responses to different watchers, which etcd leaves to Go map order).

use crate::support;

use std::time::Duration;

use metastore_proto::etcdserverpb::lease_client::LeaseClient;
use metastore_proto::etcdserverpb::request_op::Request as Op;
use metastore_proto::etcdserverpb::watch_client::WatchClient;
use metastore_proto::etcdserverpb::watch_create_request::FilterType;
use metastore_proto::etcdserverpb::watch_request::RequestUnion;
use metastore_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RequestOp,
    ResponseHeader, TxnRequest, WatchCancelRequest, WatchCreateRequest, WatchProgressRequest,
    WatchRequest, WatchResponse,
};
use support::Server;
use tokio::sync::mpsc;
use tonic::Streaming;

fn scrub(h: &mut Option<ResponseHeader>) {
    if let Some(h) = h {
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
    }
}

fn status_line(status: tonic::Status) -> String {
    format!("ERROR {:?}: {}", status.code(), status.message())
}

struct Stream {
    requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl Stream {
    /// Opens a stream with its first create request already queued: etcd (Go gRPC) sends the
    /// response headers only with its first message.
    async fn open(server: &Server, first: WatchCreateRequest) -> Stream {
        let mut client = WatchClient::connect(server.endpoint()).await.unwrap();
        let (requests, rx) = mpsc::channel(16);
        requests
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(first)),
            })
            .await
            .unwrap();
        let responses = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Stream {
            requests,
            responses,
        }
    }

    async fn send(&self, request: RequestUnion) {
        self.requests
            .send(WatchRequest {
                request_union: Some(request),
            })
            .await
            .unwrap();
    }

    /// Every response that arrives until the stream stays quiet for a while (etcd syncs
    /// unsynced watchers every 100 ms).
    /// Responses to different watchers for one revision come in no defined order (etcd walks a
    /// Go map), so each drained group is sorted.
    async fn drain(&mut self, out: &mut Vec<String>, what: &str) {
        let mut group = Vec::new();
        while let Ok(message) =
            tokio::time::timeout(Duration::from_millis(400), self.responses.message()).await
        {
            let mut resp = message.unwrap().expect("stream open");
            scrub(&mut resp.header);
            group.push(format!("{what}: {resp:?}"));
        }
        group.sort();
        out.extend(group);
    }
}

fn create(key: &str, end: &[u8]) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.into(),
        range_end: end.to_vec(),
        ..Default::default()
    }
}

async fn put(server: &Server, key: &str, value: &str, lease: i64) -> String {
    let mut kv = server.kv().await;
    let req = PutRequest {
        key: key.into(),
        value: value.into(),
        lease,
        ..Default::default()
    };
    match kv.put(req).await {
        Ok(r) => {
            let mut r = r.into_inner();
            scrub(&mut r.header);
            format!("{r:?}")
        }
        Err(s) => status_line(s),
    }
}

async fn run(server: &Server) -> Vec<String> {
    let mut out = Vec::new();
    let mut kv = server.kv().await;
    for (k, v) in [("a", "1"), ("a/b", "2"), ("c", "3")] {
        out.push(put(server, k, v, 0).await);
    }
    let txn = TxnRequest {
        success: vec![
            RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: b"a".to_vec(),
                    value: b"4".to_vec(),
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                    key: b"c".to_vec(),
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    };
    kv.txn(txn).await.unwrap();

    // Watch: history with prev_kv, ids chosen by the server and the client, duplicates, empty
    // ranges, filters, progress, cancel, live events.
    let mut history = create("a", b"b");
    history.start_revision = 2;
    history.prev_kv = true;
    let mut stream = Stream::open(server, history).await;
    stream.drain(&mut out, "history").await;
    let mut chosen = create("c", b"");
    chosen.watch_id = 5;
    chosen.filters = vec![FilterType::Nodelete as i32];
    stream
        .send(RequestUnion::CreateRequest(chosen.clone()))
        .await;
    stream.drain(&mut out, "client id").await;
    stream.send(RequestUnion::CreateRequest(chosen)).await;
    stream.drain(&mut out, "duplicate id").await;
    stream
        .send(RequestUnion::CreateRequest(create("b", b"a")))
        .await;
    stream.drain(&mut out, "empty range").await;
    let mut all = create("\0", b"\0");
    all.filters = vec![FilterType::Noput as i32];
    stream.send(RequestUnion::CreateRequest(all)).await;
    stream.drain(&mut out, "all keys, no puts").await;
    out.push(put(server, "c", "5", 0).await);
    out.push(put(server, "a/x", "6", 0).await);
    stream.drain(&mut out, "live puts").await;
    kv.delete_range(support::delete_req("a", "d"))
        .await
        .unwrap();
    stream.drain(&mut out, "live deletes").await;
    stream
        .send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
        .await;
    stream.drain(&mut out, "progress").await;
    stream
        .send(RequestUnion::CancelRequest(WatchCancelRequest {
            watch_id: 5,
        }))
        .await;
    stream
        .send(RequestUnion::CancelRequest(WatchCancelRequest {
            watch_id: 99,
        }))
        .await;
    stream.drain(&mut out, "cancel").await;
    kv.compact(CompactionRequest {
        revision: 6,
        physical: true,
    })
    .await
    .unwrap();
    let mut compacted = create("a", b"b");
    compacted.start_revision = 3;
    stream.send(RequestUnion::CreateRequest(compacted)).await;
    stream.drain(&mut out, "compacted start").await;

    // Lease.
    let mut lease = LeaseClient::connect(server.endpoint()).await.unwrap();
    let grant = |id, ttl| LeaseGrantRequest { id, ttl };
    for (id, ttl) in [(100, 1), (100, 10), (200, 9_000_000_001), (300, 60)] {
        out.push(match lease.lease_grant(grant(id, ttl)).await {
            Ok(r) => {
                let mut r = r.into_inner();
                scrub(&mut r.header);
                format!("grant {id}: {r:?}")
            }
            Err(s) => format!("grant {id}: {}", status_line(s)),
        });
    }
    let mut leased = create("l", b"m");
    leased.prev_kv = true;
    stream.send(RequestUnion::CreateRequest(leased)).await;
    stream.drain(&mut out, "lease watcher").await;
    out.push(put(server, "l1", "x", 300).await);
    out.push(put(server, "l2", "y", 300).await);
    out.push(put(server, "l3", "z", 999).await);
    for (id, keys) in [(300, true), (300, false), (12345, true)] {
        let req = LeaseTimeToLiveRequest { id, keys };
        out.push(match lease.lease_time_to_live(req).await {
            Ok(r) => {
                let mut r = r.into_inner();
                scrub(&mut r.header);
                if r.ttl > 0 {
                    r.ttl = 1;
                }
                // etcd lists attached keys in Go map order.
                r.keys.sort();
                format!("ttl {id}: {r:?}")
            }
            Err(s) => format!("ttl {id}: {}", status_line(s)),
        });
    }
    let mut leases = lease
        .lease_leases(LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    scrub(&mut leases.header);
    leases.leases.sort_by_key(|l| l.id);
    out.push(format!("leases: {leases:?}"));
    let (tx, rx) = mpsc::channel(4);
    tx.send(LeaseKeepAliveRequest { id: 300 }).await.unwrap();
    let mut keepalive = lease
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for id in [300, 4242] {
        if id != 300 {
            tx.send(LeaseKeepAliveRequest { id }).await.unwrap();
        }
        let mut r = keepalive.message().await.unwrap().unwrap();
        scrub(&mut r.header);
        out.push(format!("keepalive {id}: {r:?}"));
    }
    for id in [300, 300] {
        out.push(match lease.lease_revoke(LeaseRevokeRequest { id }).await {
            Ok(r) => {
                let mut r = r.into_inner();
                scrub(&mut r.header);
                format!("revoke {id}: {r:?}")
            }
            Err(s) => format!("revoke {id}: {}", status_line(s)),
        });
    }
    stream.drain(&mut out, "revoke events").await;
    out
}

differential!(run);
