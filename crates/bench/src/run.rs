//! The driver of the closed-loop workloads: `--clients` workers sharing `--total` requests over
//! `--conns` connections, paced by `--rate` and cut off by `--max-secs`, with the progress bar,
//! then the summary. Around them, when asked: idle watchers held open during the run
//! (`--idle-watchers`) and one Compact sent during it (`--compact-after-secs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::{CompactionRequest, RangeRequest};
use tokio::task::JoinHandle;

use crate::cli::Global;
use crate::endpoints::{connect, leader_endpoint};
use crate::idle;
use crate::lease::KeepAlive;
use crate::report::{report, Latencies};
use crate::unary::connect_unary;
use crate::workload::Work;

struct Outcome {
    errors: u64,
    first_error: Option<String>,
}

pub(crate) async fn run(mut global: Global, work: Work) -> Result<()> {
    if global.endpoints.is_empty() {
        bail!("--endpoints is empty");
    }
    if global.target_leader {
        global.endpoints = vec![leader_endpoint(&global.endpoints).await?];
    }
    // Keep-alive streams need tonic's channel; every other workload is unary.
    let streaming = matches!(work, Work::LeaseKeepalive);
    let channels = if streaming {
        connect(&global.endpoints, global.conns).await?
    } else {
        Vec::new()
    };
    let unary = if streaming {
        Vec::new()
    } else {
        connect_unary(
            &global.endpoints,
            global.conns,
            global.clients,
            global.gateway,
        )
        .await?
    };
    let idle = if global.idle_watchers > 0 {
        Some(
            idle::open(
                &global.endpoints,
                global.conns,
                global.idle_watchers,
                global.idle_watch_streams,
            )
            .await?,
        )
    } else {
        None
    };
    let compaction = if global.compact_after_secs > 0.0 {
        Some(compact_later(&global).await?)
    } else {
        None
    };
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::new());
    let start = Instant::now();
    let deadline = (global.max_secs > 0).then(|| start + Duration::from_secs(global.max_secs));

    let bar = if global.no_progress || global.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(global.total)
    };
    let mut workers = Vec::new();
    for c in 0..global.clients.max(1) {
        let mut kv = unary.get(c % unary.len().max(1)).cloned();
        let issued = issued.clone();
        let done = done.clone();
        let latencies = latencies.clone();
        let work = work.clone();
        let (total, rate) = (global.total, global.rate);
        let lease_channel = channels.get(c % channels.len().max(1)).cloned();
        workers.push(tokio::spawn(async move {
            let mut keepalive = match (&work, lease_channel) {
                (Work::LeaseKeepalive, Some(channel)) => Some(KeepAlive::start(channel).await),
                _ => None,
            };
            let mut out = Outcome {
                errors: 0,
                first_error: None,
            };
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= total || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if rate > 0 {
                    let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let began = Instant::now();
                let result = work.send(n, kv.as_mut(), keepalive.as_mut()).await;
                let micros = began.elapsed().as_micros().max(1) as u64;
                match result {
                    Ok(()) => {
                        latencies.record(c, micros);
                    }
                    Err(status) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| {
                            format!("{:?}: {}", status.code(), status.message())
                        });
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            out
        }));
    }
    let ticker = {
        let bar = bar.clone();
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut errors = 0;
    let mut first_error = None;
    for w in workers {
        let out = w.await?;
        errors += out.errors;
        if first_error.is_none() {
            first_error = out.first_error;
        }
    }
    ticker.abort();
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    drop(idle);
    let mut extra = Vec::new();
    if let Some(compaction) = compaction {
        let answered = compaction.await?.context("the compaction failed")?;
        extra.push(("compact_ms", answered.as_secs_f64() * 1000.0));
    }
    report(
        &global,
        &latencies.merged()?,
        errors,
        first_error,
        elapsed,
        &extra,
    );
    Ok(())
}

/// Sends one Compact `--compact-after-secs` from now (to `--compact-revision`, or to the
/// revision the store has now) and answers how long it took to be answered.
async fn compact_later(global: &Global) -> Result<JoinHandle<Result<Duration>>> {
    let channel = connect(&global.endpoints, 1).await?.remove(0);
    let mut kv = KvClient::new(channel);
    let revision = match global.compact_revision {
        0 => kv
            .range(RangeRequest {
                key: b"metastore-bench-compact".to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .header
            .map_or(0, |h| h.revision),
        r => r,
    };
    let after = Duration::from_secs_f64(global.compact_after_secs);
    Ok(tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let sent = Instant::now();
        kv.compact(CompactionRequest {
            revision,
            physical: false,
        })
        .await?;
        Ok(sent.elapsed())
    }))
}
