//! `metastore-bench`: a load generator for any etcd v3 endpoint (MetaStore or etcd), in the style
//! of etcd's `tools/benchmark`. Every run is bounded by `--total` (and optionally `--max-secs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::{PutRequest, RangeRequest};
use rand::Rng;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(
    name = "metastore-bench",
    about = "Benchmark an etcd v3 compatible endpoint"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// gRPC endpoints (comma-separated); connections are spread over them.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:2379",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Total number of gRPC connections.
    #[arg(long, global = true, default_value_t = 1)]
    conns: usize,
    /// Total number of concurrent clients (spread over the connections).
    #[arg(long, global = true, default_value_t = 1)]
    clients: usize,
    /// Total number of requests.
    #[arg(long, global = true, default_value_t = 10_000)]
    total: u64,
    /// Stop after this many seconds even if `--total` is not reached (0 = no time limit).
    #[arg(long, global = true, default_value_t = 600)]
    max_secs: u64,
    /// Maximum requests per second over all clients (0 = unlimited).
    #[arg(long, global = true, default_value_t = 0)]
    rate: u64,
    /// Print the summary as one JSON object.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bar.
    #[arg(long, global = true)]
    no_progress: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Put keys.
    Put {
        /// Key size in bytes.
        #[arg(long, default_value_t = 8)]
        key_size: usize,
        /// Value size in bytes.
        #[arg(long, default_value_t = 8)]
        val_size: usize,
        /// Number of distinct keys written.
        #[arg(long, default_value_t = 1)]
        key_space_size: u64,
        /// Write keys in order instead of at random.
        #[arg(long)]
        sequential_keys: bool,
    },
    /// Range over a key or a key range.
    Range {
        /// Key to read.
        key: String,
        /// Range end (exclusive); omit for a single key.
        end: Option<String>,
        /// Consistency: `l` (linearizable) or `s` (serializable).
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
        /// Maximum keys returned per request (0 = no limit).
        #[arg(long, default_value_t = 0)]
        limit: i64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Consistency {
    L,
    S,
}

/// What one worker sends.
#[derive(Clone)]
enum Work {
    Put {
        key_size: usize,
        value: Vec<u8>,
        key_space: u64,
        sequential: bool,
    },
    Range(RangeRequest),
}

fn make_key(n: u64, size: usize) -> Vec<u8> {
    // etcd's benchmark writes the key number as fixed-width binary; decimal keeps keys readable.
    let digits = format!("{n:0width$}", width = size.max(1));
    digits.as_bytes()[digits.len() - size..].to_vec()
}

async fn connect(endpoints: &[String], conns: usize) -> Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(conns);
    for i in 0..conns.max(1) {
        let ep = &endpoints[i % endpoints.len()];
        let uri = if ep.starts_with("http") {
            ep.clone()
        } else {
            format!("http://{ep}")
        };
        let channel = Endpoint::from_shared(uri.clone())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to {uri}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

struct Outcome {
    histogram: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

async fn run(global: Global, work: Work) -> Result<()> {
    if global.endpoints.is_empty() {
        bail!("--endpoints is empty");
    }
    let channels = connect(&global.endpoints, global.conns).await?;
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = (global.max_secs > 0).then(|| start + Duration::from_secs(global.max_secs));

    let bar = if global.no_progress || global.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(global.total)
    };
    let mut workers = Vec::new();
    for c in 0..global.clients.max(1) {
        let mut kv = KvClient::new(channels[c % channels.len()].clone())
            .max_decoding_message_size(usize::MAX);
        let issued = issued.clone();
        let done = done.clone();
        let work = work.clone();
        let (total, rate) = (global.total, global.rate);
        workers.push(tokio::spawn(async move {
            let mut out = Outcome {
                histogram: Histogram::new_with_bounds(1, 60_000_000, 3)
                    .expect("valid histogram bounds"),
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
                let result = match &work {
                    Work::Put {
                        key_size,
                        value,
                        key_space,
                        sequential,
                    } => {
                        let k = if *sequential {
                            n % key_space
                        } else {
                            rand::rng().random_range(0..*key_space)
                        };
                        let req = PutRequest {
                            key: make_key(k, *key_size),
                            value: value.clone(),
                            ..Default::default()
                        };
                        kv.put(req).await.map(|_| ())
                    }
                    Work::Range(req) => kv.range(req.clone()).await.map(|_| ()),
                };
                let micros = began.elapsed().as_micros().max(1) as u64;
                match result {
                    Ok(()) => {
                        let _ = out.histogram.record(micros.min(60_000_000));
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
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    let mut first_error = None;
    for w in workers {
        let out = w.await?;
        histogram.add(&out.histogram)?;
        errors += out.errors;
        if first_error.is_none() {
            first_error = out.first_error;
        }
    }
    ticker.abort();
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    report(&global, &histogram, errors, first_error, elapsed);
    Ok(())
}

fn report(
    global: &Global,
    h: &Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    elapsed: f64,
) {
    let ok = h.len();
    let ms = |micros: u64| micros as f64 / 1000.0;
    let rps = if elapsed > 0.0 {
        ok as f64 / elapsed
    } else {
        0.0
    };
    if global.json {
        println!(
            "{{\"requests\":{ok},\"errors\":{errors},\"seconds\":{elapsed:.3},\"requests_per_sec\":{rps:.1},\
\"avg_ms\":{:.3},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3},\
\"clients\":{},\"conns\":{}}}",
            h.mean() / 1000.0,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max()),
            global.clients,
            global.conns,
        );
        return;
    }
    println!("Summary:");
    println!("  Total:        {elapsed:.4} secs.");
    println!("  Requests:     {ok} ok, {errors} failed");
    println!("  Slowest:      {:.4} ms.", ms(h.max()));
    println!("  Fastest:      {:.4} ms.", ms(h.min()));
    println!("  Average:      {:.4} ms.", h.mean() / 1000.0);
    println!("  Requests/sec: {rps:.1}");
    println!("\nLatency distribution:");
    for (label, q) in [("50%", 0.5), ("90%", 0.9), ("99%", 0.99), ("99.9%", 0.999)] {
        println!("  {label} in {:.4} ms.", ms(h.value_at_quantile(q)));
    }
    if let Some(e) = first_error {
        println!("\nFirst error: {e}");
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let work = match cli.command {
        Cmd::Put {
            key_size,
            val_size,
            key_space_size,
            sequential_keys,
        } => Work::Put {
            key_size: key_size.max(1),
            value: vec![b'v'; val_size],
            key_space: key_space_size.max(1),
            sequential: sequential_keys,
        },
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

#[cfg(test)]
mod tests {
    use super::make_key;

    #[test]
    fn keys_have_the_requested_size() {
        assert_eq!(make_key(7, 8), b"00000007");
        assert_eq!(make_key(123_456, 3), b"456");
        assert_eq!(make_key(0, 1), b"0");
    }
}
