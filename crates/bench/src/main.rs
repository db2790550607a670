//! `metastore-bench`: a load generator for any etcd v3 endpoint (MetaStore or etcd), in the style
//! of etcd's `tools/benchmark`. Every run is bounded by `--total` (and optionally `--max-secs`).
//!
//! This file owns the process: the allocator, the runtime, and turning the parsed command into a
//! workload. The rest lives in one module each:
//! - `cli`: the command-line arguments;
//! - `unary`: the HTTP/2 client of the unary calls; `endpoints`: tonic channels and the
//!   leader lookup;
//! - `workload`: what each closed-loop workload sends, `run`: the driver that sends it;
//! - `lease`: the lease keep-alive workload; `watch`: the watch workloads; `catchup`: unsynced
//!   watchers catching up with history; `idle`: watchers that no write matches, held open
//!   during any workload (`--idle-watchers`);
//! - `report`: latency histograms and the summary.

mod catchup;
mod cli;
mod endpoints;
mod idle;
mod lease;
mod report;
mod run;
mod unary;
mod watch;
mod workload;

use anyhow::Result;
use clap::Parser;
use metastore_proto::etcdserverpb::RangeRequest;

use crate::catchup::{catchup_bench, CatchupSpec};
use crate::cli::{Cli, Cmd, Consistency, KeyArgs};
use crate::run::run;
use crate::watch::{watch_bench, WatchSpec};
use crate::workload::{make_key, KeyGen, Work};

/// The allocator the server uses, so that both sides of a run spend alike on allocation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match cli.global.threads {
        0 => std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .saturating_mul(2)
            .max(4),
        n => n,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(threads).enable_all();
    // Requests that clients of one connection issue together then leave in one write, as Go's
    // gRPC client sends them (see .cargo/config.toml).
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    runtime.build()?.block_on(run_command(cli))
}

async fn run_command(cli: Cli) -> Result<()> {
    let work = match cli.command {
        Cmd::Put {
            key_size,
            val_size,
            key_space_size,
            sequential_keys,
            first_key,
        } => Work::Put(
            KeyGen::new(&KeyArgs {
                key_size,
                val_size,
                key_space_size,
                sequential_keys,
            })
            .starting_at(first_key),
        ),
        Cmd::TxnPut { keys, txn_ops } => Work::TxnPut(KeyGen::new(&keys), txn_ops.max(1)),
        Cmd::TxnMixed { keys, rw_ratio } => Work::TxnMixed(KeyGen::new(&keys), rw_ratio.max(0.0)),
        Cmd::Mixed {
            keys,
            read_ratio,
            consistency,
        } => Work::Mixed(
            KeyGen::new(&keys),
            read_ratio,
            matches!(consistency, Consistency::S),
        ),
        Cmd::LeaseKeepalive => Work::LeaseKeepalive,
        Cmd::WatchCatchup {
            watchers,
            streams,
            watched_key_total,
            val_size,
        } => {
            let spec = CatchupSpec {
                watchers,
                streams,
                keys: (0..watched_key_total.max(1) as u64)
                    .map(|i| {
                        let mut key = b"metastore-bench-catchup/".to_vec();
                        key.extend(make_key(i, 8));
                        key
                    })
                    .collect(),
                val_size,
            };
            return catchup_bench(cli.global, spec).await;
        }
        Cmd::WatchLatency {
            watchers,
            watch_streams,
            keys,
            val_size,
        } => {
            let spec = WatchSpec {
                streams: watch_streams,
                watchers,
                keys: (0..keys.max(1))
                    .map(|k| format!("metastore-bench-watch-latency/{k}").into_bytes())
                    .collect(),
                puts: cli.global.total,
                rate: cli.global.rate,
                val_size,
                creation_summary: false,
            };
            return watch_bench(cli.global, spec).await;
        }
        Cmd::Watch {
            streams,
            watch_per_stream,
            watched_key_total,
            put_total,
            put_rate,
            key_size,
            val_size,
        } => {
            let spec = WatchSpec {
                streams,
                watchers: streams.saturating_mul(watch_per_stream),
                keys: (0..watched_key_total.max(1) as u64)
                    .map(|i| make_key(i, key_size.max(1)))
                    .collect(),
                puts: put_total,
                rate: put_rate,
                val_size,
                creation_summary: true,
            };
            return watch_bench(cli.global, spec).await;
        }
        Cmd::Range {
            key,
            end,
            consistency,
            limit,
        } => Work::Range(RangeRequest {
            key: key.into_bytes(),
            range_end: end.map(String::into_bytes).unwrap_or_default(),
            serializable: matches!(consistency, Consistency::S),
            limit,
            ..Default::default()
        }),
    };
    run(cli.global, work).await
}
