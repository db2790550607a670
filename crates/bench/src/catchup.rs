//! `watch-catchup`: watchers created behind the store's revision (unsynced) catching up with
//! the history they missed. Writers first put `--total` times over the keys; then the watchers
//! are created from the revision before the first put, and each must receive its key's whole
//! history. Every event is timed from its watcher's create request, so the slowest event is the
//! time the last watcher took to catch up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::watch_client::WatchClient;
use metastore_proto::etcdserverpb::{
    watch_request, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};

use crate::cli::Global;
use crate::endpoints::{connect, leader_endpoint};
use crate::report::{report, Latencies};

/// What `watch-catchup` writes and watches.
pub(crate) struct CatchupSpec {
    pub(crate) watchers: usize,
    pub(crate) streams: usize,
    /// Put `n` writes `keys[n % keys.len()]`; watcher `i` watches `keys[i % keys.len()]`.
    pub(crate) keys: Vec<Vec<u8>>,
    pub(crate) val_size: usize,
}

/// Puts of `total` that write key `key` of `keys`.
fn puts_to(key: usize, keys: usize, total: u64) -> u64 {
    total / keys as u64 + u64::from((key as u64) < total % keys as u64)
}

pub(crate) async fn catchup_bench(mut global: Global, spec: CatchupSpec) -> Result<()> {
    if global.target_leader {
        global.endpoints = vec![leader_endpoint(&global.endpoints).await?];
    }
    if spec.keys.is_empty() {
        bail!("no key to watch");
    }
    let channels = connect(&global.endpoints, global.conns).await?;
    let mut kv = KvClient::new(channels[0].clone());
    let before = kv
        .range(RangeRequest {
            key: spec.keys[0].clone(),
            ..Default::default()
        })
        .await
        .context("reading the revision before the history")?
        .into_inner()
        .header
        .map_or(0, |h| h.revision);

    // The history the watchers will catch up with.
    let keys = Arc::new(spec.keys);
    let issued = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for c in 0..global.clients.max(1) {
        let mut kv = KvClient::new(channels[c % channels.len()].clone());
        let (issued, keys, total) = (issued.clone(), keys.clone(), global.total);
        let value = vec![b'v'; spec.val_size];
        writers.push(tokio::spawn(async move {
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return Ok::<(), tonic::Status>(());
                }
                let put = PutRequest {
                    key: keys[(n % keys.len() as u64) as usize].clone(),
                    value: value.clone(),
                    ..Default::default()
                };
                kv.put(put).await?;
            }
        }));
    }
    for w in writers {
        let written: Result<(), tonic::Status> = w.await?;
        written.context("writing the history")?;
    }

    let streams = spec.streams.clamp(1, spec.watchers.max(1));
    let latencies = Arc::new(Latencies::new());
    let received = Arc::new(AtomicU64::new(0));
    let expected: u64 = (0..spec.watchers)
        .map(|i| puts_to(i % keys.len(), keys.len(), global.total))
        .sum();
    let start = Instant::now();
    let mut listeners = Vec::new();
    let mut next = 0;
    for s in 0..streams {
        let per_stream = spec.watchers / streams + usize::from(s < spec.watchers % streams);
        // The key index of each of this stream's watchers, in creation order: the server
        // answers a stream's creates in the order they were sent.
        let watched: Vec<usize> = (next..next + per_stream).map(|i| i % keys.len()).collect();
        next += per_stream;
        let (tx, body) = tokio::sync::mpsc::channel(per_stream.max(1));
        let sent = Instant::now();
        for &key in &watched {
            tx.send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(
                    WatchCreateRequest {
                        key: keys[key].clone(),
                        start_revision: before + 1,
                        ..Default::default()
                    },
                )),
            })
            .await?;
        }
        let mut client = WatchClient::new(channels[s % channels.len()].clone());
        let mut answers = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(body))
            .await?
            .into_inner();
        let (latencies, received, keys) = (latencies.clone(), received.clone(), keys.clone());
        let total = global.total;
        listeners.push(tokio::spawn(async move {
            let _keep_open = tx;
            // Events still due, by watch id.
            let mut due: HashMap<i64, u64> = HashMap::new();
            let mut created = 0;
            let mut finished = 0;
            while finished < per_stream {
                let answer = match answers.message().await {
                    Ok(Some(answer)) => answer,
                    Ok(None) => bail!("a watch stream ended"),
                    Err(status) => bail!("a watch stream failed: {status}"),
                };
                if answer.created {
                    let Some(&key) = watched.get(created) else {
                        bail!("more watchers created than requested");
                    };
                    created += 1;
                    let events = puts_to(key, keys.len(), total);
                    if events == 0 {
                        finished += 1;
                    } else {
                        due.insert(answer.watch_id, events);
                    }
                }
                if answer.events.is_empty() {
                    continue;
                }
                let micros = sent.elapsed().as_micros().max(1) as u64;
                let Some(left) = due.get_mut(&answer.watch_id) else {
                    bail!("events for watch {} before it was created", answer.watch_id);
                };
                let got = answer.events.len() as u64;
                if got > *left {
                    bail!(
                        "watch {} received more events than its key's history",
                        answer.watch_id
                    );
                }
                *left -= got;
                for _ in 0..got {
                    latencies.record(s, micros);
                }
                received.fetch_add(got, Ordering::Relaxed);
                if *left == 0 {
                    finished += 1;
                }
            }
            Ok(())
        }));
    }
    let mut first_error = None;
    let deadline = Duration::from_secs(global.max_secs.max(1));
    for listener in listeners {
        let outcome =
            tokio::time::timeout(deadline.saturating_sub(start.elapsed()), listener).await;
        let failure = match outcome {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e.to_string()),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("the watchers did not catch up within --max-secs".to_string()),
        };
        if first_error.is_none() {
            first_error = failure;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    if first_error.is_none() && got < expected {
        first_error = Some(format!(
            "{} of {expected} events not received",
            expected - got
        ));
    }
    let errors = u64::from(first_error.is_some());
    report(
        &global,
        &latencies.merged()?,
        errors,
        first_error,
        elapsed,
        &[("catchup_seconds", elapsed)],
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puts_are_spread_over_the_keys_in_turn() {
        assert_eq!(
            (0..3).map(|k| puts_to(k, 3, 7)).collect::<Vec<_>>(),
            [3, 2, 2]
        );
        assert_eq!(puts_to(4, 5, 3), 0);
    }
}
