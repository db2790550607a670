//! The watch workloads (`watch`, like etcd's `benchmark watch`, and `watch-latency`): watchers
//! over a number of streams, then writers putting to the watched keys, every event timed from
//! the moment its put was sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use metastore_proto::etcdserverpb::watch_client::WatchClient;
use metastore_proto::etcdserverpb::{watch_request, PutRequest, WatchCreateRequest, WatchRequest};

use crate::cli::Global;
use crate::endpoints::{connect, leader_endpoint};
use crate::report::{report, Latencies};

/// What a watch benchmark creates and writes (`watch` and `watch-latency`).
pub(crate) struct WatchSpec {
    pub(crate) streams: usize,
    /// Watchers in all, spread over the streams; watcher `i` watches `keys[i % keys.len()]`.
    pub(crate) watchers: usize,
    pub(crate) keys: Vec<Vec<u8>>,
    /// Put `n` writes `keys[n % keys.len()]`.
    pub(crate) puts: u64,
    /// Puts per second; 0 = no limit.
    pub(crate) rate: u64,
    pub(crate) val_size: usize,
    /// Report the watchers' creation first (`watch`).
    pub(crate) creation_summary: bool,
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
pub(crate) async fn watch_bench(mut global: Global, spec: WatchSpec) -> Result<()> {
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
        report(&global, &creations.merged()?, 0, None, elapsed, &[]);
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
    report(&global, &histogram, errors, first_error, elapsed, &[]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::make_key;

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
}
