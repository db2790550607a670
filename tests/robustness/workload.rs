//! The clients of a robustness run: KV clients (put, delete, get, range, compare-and-swap), lease
//! clients (grant, attached puts, keep-alive, revoke or let expire) and watchers that reconnect
//! with `start_revision` = last seen + 1. Each records what it did in a [`history`] structure.
//!
//! Every client talks to a member chosen by its seeded generator for each operation, through one
//! channel per member (rebuilt when a restart moved the member to other ports).
//!
//! [`history`]: super::history

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::lease_client::LeaseClient;
use metastore_proto::etcdserverpb::request_op::Request as TxnOp;
use metastore_proto::etcdserverpb::response_op::Response as TxnResp;
use metastore_proto::etcdserverpb::watch_client::WatchClient;
use metastore_proto::etcdserverpb::{
    watch_request, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchRequest,
};
use metastore_proto::mvccpb::{event::EventType, KeyValue};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};

use super::checker::LEASE_PREFIX;
use super::history::{
    Bytes, Event, EventKind, Expect, LeaseLife, Op, Outcome, Request, Seen, WatchLog,
};

/// How long a client waits for one answer before it records the outcome as unknown.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// A watch stream that brings nothing for this long is given up and opened again elsewhere
/// (a member cut off from its peers keeps its stream open but silent).
const WATCH_IDLE: Duration = Duration::from_secs(4);
/// The keys of the KV clients.
pub const KV_PREFIX: &[u8] = b"kv/";

/// What the clients share with the run: where the members are, when to stop, the clock.
pub struct Shared {
    pub endpoints: RwLock<Vec<String>>,
    /// Clients stop issuing operations.
    pub stop: AtomicBool,
    /// Watchers stop even if they have not seen their end marker.
    pub stop_watchers: AtomicBool,
    pub t0: Instant,
}

impl Shared {
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// One lazily connected channel per member.
struct Channels {
    shared: Arc<Shared>,
    cached: HashMap<usize, (String, Channel)>,
}

impl Channels {
    fn new(shared: Arc<Shared>) -> Channels {
        Channels {
            shared,
            cached: HashMap::new(),
        }
    }

    fn members(&self) -> usize {
        self.shared.endpoints.read().unwrap().len()
    }

    fn get(&mut self, member: usize) -> Channel {
        let url = self.shared.endpoints.read().unwrap()[member].clone();
        if let Some((cached_url, channel)) = self.cached.get(&member) {
            if *cached_url == url {
                return channel.clone();
            }
        }
        let channel = Endpoint::from_shared(url.clone())
            .expect("endpoint URL")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        self.cached.insert(member, (url, channel.clone()));
        channel
    }
}

/// The name of the `n`th hot key of the KV clients.
pub fn kv_key(n: usize) -> Bytes {
    format!("kv/{n:02}").into_bytes()
}

/// The end of the range of keys starting with `prefix` (etcd's prefix range_end).
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
    }
}

fn seen(kvs: &[KeyValue]) -> Vec<Seen> {
    kvs.iter()
        .map(|kv| Seen {
            key: kv.key.clone(),
            value: kv.value.clone(),
            mod_revision: kv.mod_revision,
        })
        .collect()
}

/// Sends `request` through `channel`; the outcome as the client learns it.
pub async fn execute(channel: Channel, request: &Request) -> Outcome {
    let mut kv = KvClient::new(channel);
    let result = match request {
        Request::Put { key, value, lease } => bounded(kv.put(PutRequest {
            key: key.clone(),
            value: value.clone(),
            lease: *lease,
            ..Default::default()
        }))
        .await
        .map(|r| Outcome::Put {
            revision: r.header.map_or(0, |h| h.revision),
        }),
        Request::Delete { key } => bounded(kv.delete_range(DeleteRangeRequest {
            key: key.clone(),
            ..Default::default()
        }))
        .await
        .map(|r| Outcome::Delete {
            revision: r.header.map_or(0, |h| h.revision),
            deleted: r.deleted,
        }),
        Request::Get { key } => bounded(kv.range(RangeRequest {
            key: key.clone(),
            ..Default::default()
        }))
        .await
        .map(|r| Outcome::Read {
            revision: r.header.map_or(0, |h| h.revision),
            kvs: seen(&r.kvs),
        }),
        Request::Range { prefix } => bounded(kv.range(RangeRequest {
            key: prefix.clone(),
            range_end: prefix_end(prefix),
            ..Default::default()
        }))
        .await
        .map(|r| Outcome::Read {
            revision: r.header.map_or(0, |h| h.revision),
            kvs: seen(&r.kvs),
        }),
        Request::Cas { key, expect, value } => {
            let (target, target_union) = match expect {
                Expect::Value(v) => (CompareTarget::Value, TargetUnion::Value(v.clone())),
                Expect::ModRevision(r) => (CompareTarget::Mod, TargetUnion::ModRevision(*r)),
            };
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Equal as i32,
                    target: target as i32,
                    key: key.clone(),
                    target_union: Some(target_union),
                    ..Default::default()
                }],
                success: vec![RequestOp {
                    request: Some(TxnOp::RequestPut(PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        ..Default::default()
                    })),
                }],
                failure: vec![RequestOp {
                    request: Some(TxnOp::RequestRange(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    })),
                }],
            };
            bounded(kv.txn(txn)).await.map(|r| {
                let kvs = r
                    .responses
                    .iter()
                    .find_map(|op| match &op.response {
                        Some(TxnResp::ResponseRange(range)) => Some(seen(&range.kvs)),
                        _ => None,
                    })
                    .unwrap_or_default();
                Outcome::Cas {
                    revision: r.header.map_or(0, |h| h.revision),
                    succeeded: r.succeeded,
                    kvs,
                }
            })
        }
    };
    result.unwrap_or_else(Outcome::Unknown)
}

/// Runs `request` through member `member` and records it.
async fn record(
    channels: &mut Channels,
    client: usize,
    member: usize,
    request: Request,
    ops: &mut Vec<Op>,
) -> Outcome {
    let channel = channels.get(member);
    let call = channels.shared.now();
    let outcome = execute(channel, &request).await;
    let ret = channels.shared.now();
    ops.push(Op {
        client,
        call,
        ret,
        request,
        outcome: outcome.clone(),
    });
    outcome
}

/// A KV client: until told to stop, a seeded mix of operations on `keys` hot keys.
pub async fn kv_client(client: usize, seed: u64, keys: usize, shared: Arc<Shared>) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut channels = Channels::new(shared.clone());
    let mut ops = Vec::new();
    // What this client last learned of each key, to make compare-and-swaps that may succeed.
    let mut known: HashMap<Bytes, Option<(Bytes, i64)>> = HashMap::new();
    let mut written = 0u64;
    while !shared.stopped() {
        let member = rng.random_range(0..channels.members());
        let key = kv_key(rng.random_range(0..keys));
        let mut fresh_value = || {
            written += 1;
            format!("c{client}-{written}").into_bytes()
        };
        let request = match rng.random_range(0..100) {
            0..30 => Request::Get { key: key.clone() },
            30..35 => Request::Range {
                prefix: KV_PREFIX.to_vec(),
            },
            35..60 => Request::Put {
                key: key.clone(),
                value: fresh_value(),
                lease: 0,
            },
            60..70 => Request::Delete { key: key.clone() },
            _ => {
                let last = known.get(&key).cloned().flatten();
                let expect = match (last, rng.random_bool(0.5)) {
                    (Some((value, _)), true) => Expect::Value(value),
                    (Some((_, mod_revision)), false) => Expect::ModRevision(mod_revision),
                    (None, _) => Expect::ModRevision(0),
                };
                Request::Cas {
                    key: key.clone(),
                    expect,
                    value: fresh_value(),
                }
            }
        };
        let outcome = record(&mut channels, client, member, request.clone(), &mut ops).await;
        if let Outcome::Unknown(_) = outcome {
            // As a client would back off: a member that is down refuses at once, and retrying
            // at full speed only fills the history with refusals.
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..100))).await;
        }
        let entry = |kvs: &[Seen]| kvs.first().map(|s| (s.value.clone(), s.mod_revision));
        match (&request, &outcome) {
            (Request::Range { .. }, Outcome::Read { kvs, .. }) => {
                for s in kvs {
                    known.insert(s.key.clone(), Some((s.value.clone(), s.mod_revision)));
                }
            }
            (Request::Get { key }, Outcome::Read { kvs, .. })
            | (
                Request::Cas { key, .. },
                Outcome::Cas {
                    succeeded: false,
                    kvs,
                    ..
                },
            ) => {
                known.insert(key.clone(), entry(kvs));
            }
            (Request::Put { key, value, .. }, Outcome::Put { revision })
            | (Request::Cas { key, value, .. }, Outcome::Cas { revision, .. }) => {
                known.insert(key.clone(), Some((value.clone(), *revision)));
            }
            (Request::Delete { key }, Outcome::Delete { .. }) => {
                known.insert(key.clone(), None);
            }
            _ => {}
        }
    }
    ops
}

/// A lease client: grants a lease (with an id it chose, so that an unanswered grant is still
/// known), attaches keys, keeps it alive a few times, then revokes it or lets it expire.
pub async fn lease_client(
    client: usize,
    seed: u64,
    shared: Arc<Shared>,
) -> (Vec<Op>, Vec<LeaseLife>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut channels = Channels::new(shared.clone());
    let mut ops = Vec::new();
    let mut leases = Vec::new();
    let mut n = 0u64;
    while !shared.stopped() {
        n += 1;
        let ttl: i64 = rng.random_range(2..=4);
        let id = ((client as i64 + 1) << 32) | n as i64;
        let mut life = LeaseLife {
            id,
            grant_call: shared.now(),
            ..Default::default()
        };
        let member = rng.random_range(0..channels.members());
        let mut lease = LeaseClient::new(channels.get(member));
        let grant = bounded(lease.lease_grant(LeaseGrantRequest { ttl, id })).await;
        if let Ok(resp) = &grant {
            if resp.error.is_empty() {
                life.granted = Some((life.grant_call, resp.ttl));
            }
        }
        for k in 0..rng.random_range(1..=3) {
            let key = [LEASE_PREFIX, format!("{client}/{n}-{k}").as_bytes()].concat();
            let request = Request::Put {
                key,
                value: format!("l{client}-{n}-{k}").into_bytes(),
                lease: id,
            };
            let member = rng.random_range(0..channels.members());
            record(&mut channels, client, member, request, &mut ops).await;
        }
        for _ in 0..rng.random_range(0..=3) {
            tokio::time::sleep(Duration::from_millis(ttl as u64 * 1000 / 3)).await;
            let member = rng.random_range(0..channels.members());
            let sent = shared.now();
            if let Some(ttl) = keep_alive(channels.get(member), id).await {
                life.keepalives.push((sent, ttl));
            }
        }
        if rng.random_bool(0.5) {
            life.revoke_call = Some(shared.now());
            let member = rng.random_range(0..channels.members());
            let mut lease = LeaseClient::new(channels.get(member));
            let _ = bounded(lease.lease_revoke(LeaseRevokeRequest { id })).await;
        }
        leases.push(life);
    }
    (ops, leases)
}

/// One keep-alive of lease `id`; the TTL answered, if the lease was found.
async fn keep_alive(channel: Channel, id: i64) -> Option<i64> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(LeaseKeepAliveRequest { id }).await.ok()?;
    let mut lease = LeaseClient::new(channel);
    let exchange = async {
        let mut stream = lease
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .ok()?
            .into_inner();
        stream.message().await.ok().flatten()
    };
    let resp = tokio::time::timeout(OP_TIMEOUT, exchange).await.ok()??;
    drop(tx);
    (resp.ttl > 0).then_some(resp.ttl)
}

/// A watcher of `prefix` from `first_revision` until it sees a put of `end_key` (or is told to
/// stop): reopens its watch on another member at the revision after the last event it saw,
/// after any error, cancel or silence.
pub async fn watcher(
    seed: u64,
    prefix: Bytes,
    end_key: Bytes,
    first_revision: i64,
    shared: Arc<Shared>,
) -> WatchLog {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut channels = Channels::new(shared.clone());
    let mut log = WatchLog {
        prefix: prefix.clone(),
        first_revision,
        ..Default::default()
    };
    let mut next = first_revision;
    'watches: while !shared.stop_watchers.load(Ordering::Relaxed) {
        let member = rng.random_range(0..channels.members());
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: prefix.clone(),
                    range_end: prefix_end(&prefix),
                    start_revision: next,
                    ..Default::default()
                },
            )),
        };
        if tx.send(create).await.is_err() {
            continue;
        }
        let mut client = WatchClient::new(channels.get(member));
        let opened = tokio::time::timeout(
            OP_TIMEOUT,
            client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
        if let Ok(Ok(stream)) = opened {
            let mut stream = stream.into_inner();
            while let Ok(Ok(Some(resp))) = tokio::time::timeout(WATCH_IDLE, stream.message()).await
            {
                for e in &resp.events {
                    let kv = e.kv.clone().unwrap_or_default();
                    let event = Event {
                        revision: kv.mod_revision,
                        kind: if e.r#type == EventType::Delete as i32 {
                            EventKind::Delete
                        } else {
                            EventKind::Put
                        },
                        key: kv.key,
                        value: kv.value,
                        mod_revision: kv.mod_revision,
                        lease: kv.lease,
                    };
                    next = next.max(event.revision + 1);
                    let end = event.kind == EventKind::Put && event.key == end_key;
                    log.events.push((shared.now(), event));
                    if end {
                        log.ended_at = Some(log.events.last().map_or(0, |(_, e)| e.revision));
                        break 'watches;
                    }
                }
                if resp.canceled || shared.stop_watchers.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
        drop(tx);
        log.reconnects += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log
}
