//! The command line (clap): the options every workload shares (`Global`), the key options of
//! the write workloads (`KeyArgs`) and one subcommand per workload (`Cmd`).

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "metastore-bench",
    about = "Benchmark an etcd v3 compatible endpoint"
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct Global {
    /// gRPC endpoints (comma-separated); connections are spread over them.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub(crate) endpoints: Vec<String>,
    /// Total number of gRPC connections.
    #[arg(long, global = true, default_value_t = 1)]
    pub(crate) conns: usize,
    /// Total number of concurrent clients (spread over the connections).
    #[arg(long, global = true, default_value_t = 1)]
    pub(crate) clients: usize,
    /// Total number of requests.
    #[arg(long, global = true, default_value_t = 10_000)]
    pub(crate) total: u64,
    /// Stop after this many seconds even if `--total` is not reached (0 = no time limit).
    #[arg(long, global = true, default_value_t = 600)]
    pub(crate) max_secs: u64,
    /// Maximum requests per second over all clients (0 = unlimited).
    #[arg(long, global = true, default_value_t = 0)]
    pub(crate) rate: u64,
    /// Print the summary as one JSON object.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// No progress bar.
    #[arg(long, global = true)]
    pub(crate) no_progress: bool,
    /// Send every request to the leader only (asks each endpoint's Status first).
    #[arg(long, global = true)]
    pub(crate) target_leader: bool,
    /// Speak etcd's HTTP/JSON gateway (`POST /v3/kv/put`, `/v3/kv/range`, `/v3/kv/txn` over
    /// HTTP/1.1, one connection per client: HTTP/1.1 does not multiplex) instead of gRPC.
    #[arg(long, global = true)]
    pub(crate) gateway: bool,
    /// Threads of the load generator's runtime (0 = twice the cores, at least 4). With one
    /// thread per core on a machine shared with the servers, a descheduled thread holds back
    /// every response queued on it: at 1000 clients that doubled the p99 measured against a
    /// fast server, while a slow one (etcd) measured the same either way.
    #[arg(long, global = true, default_value_t = 0)]
    pub(crate) threads: usize,
    /// Before the workload starts, open this many watchers on keys nobody writes
    /// (`metastore-bench-idle/<n>`), over `--idle-watch-streams` streams, and keep them open
    /// until it ends: what a write costs with many watchers that do not match it.
    #[arg(long, global = true, default_value_t = 0)]
    pub(crate) idle_watchers: usize,
    /// Streams the idle watchers share.
    #[arg(long, global = true, default_value_t = 100)]
    pub(crate) idle_watch_streams: usize,
    /// Seconds into the run at which one Compact is sent (0 = none); the summary then reports
    /// how long it took to answer (`compact_ms`).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub(crate) compact_after_secs: f64,
    /// The revision `--compact-after-secs` compacts to (0 = the store's revision when the run
    /// starts).
    #[arg(long, global = true, default_value_t = 0)]
    pub(crate) compact_revision: i64,
}

/// Keys and values written by the write workloads.
#[derive(Args, Debug, Clone)]
pub(crate) struct KeyArgs {
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    pub(crate) key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8)]
    pub(crate) val_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 1)]
    pub(crate) key_space_size: u64,
    /// Use keys in order instead of at random.
    #[arg(long)]
    pub(crate) sequential_keys: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
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
        /// Number of the first key (with `--sequential-keys`: runs that go on where an earlier
        /// one stopped).
        #[arg(long, default_value_t = 0)]
        first_key: u64,
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
    /// Transactions of `--txn-ops` puts each.
    TxnPut {
        #[command(flatten)]
        keys: KeyArgs,
        /// Puts per transaction.
        #[arg(long, default_value_t = 1)]
        txn_ops: usize,
    },
    /// Transactions that each read or write one key, `--rw-ratio` reads per write.
    TxnMixed {
        #[command(flatten)]
        keys: KeyArgs,
        /// Reads per write (e.g. 9 for 90% reads).
        #[arg(long, default_value_t = 1.0)]
        rw_ratio: f64,
    },
    /// Plain Range and Put requests on one key space, `--read-ratio` of them reads.
    Mixed {
        #[command(flatten)]
        keys: KeyArgs,
        /// Share of reads, 0 to 1.
        #[arg(long, default_value_t = 0.9)]
        read_ratio: f64,
        /// Consistency of the reads: `l` or `s`.
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
    },
    /// Each client keeps one lease alive; every keep-alive round trip is a request.
    LeaseKeepalive,
    /// etcd's `benchmark watch`: `--streams` streams of `--watch-per-stream` watchers each on
    /// `--watched-key-total` keys (watcher i watches key i modulo the key count), their creation
    /// timed from the create request to its `created` answer; then `--put-total` puts, cycling
    /// over the watched keys, by `--clients` writers at `--put-rate`, and every event timed from
    /// sending its put to the watcher receiving it.
    Watch {
        /// Watch streams.
        #[arg(long, default_value_t = 10)]
        streams: usize,
        /// Watchers per stream.
        #[arg(long, default_value_t = 100)]
        watch_per_stream: usize,
        /// Distinct keys watched.
        #[arg(long, default_value_t = 1)]
        watched_key_total: usize,
        /// Puts to the watched keys.
        #[arg(long, default_value_t = 1000)]
        put_total: u64,
        /// Puts per second (0 = as fast as the writers go).
        #[arg(long, default_value_t = 0)]
        put_rate: u64,
        /// Key size in bytes.
        #[arg(long, default_value_t = 32)]
        key_size: usize,
        /// Value size in bytes (at least 20: the value carries the put's sequence number).
        #[arg(long, default_value_t = 32)]
        val_size: usize,
    },
    /// Catch-up of unsynced watchers: `--total` puts cycling over `--watched-key-total` keys
    /// (by `--clients` writers), then `--watchers` watchers over `--streams` streams, watcher i
    /// on key i modulo the key count, all from the revision before the first put: each must
    /// receive its key's whole history. Throughput is events delivered per second from the first
    /// create to the last event; latency is each watcher's time from its create to its last event.
    WatchCatchup {
        /// Watchers in all.
        #[arg(long, default_value_t = 10_000)]
        watchers: usize,
        /// Watch streams the watchers share.
        #[arg(long, default_value_t = 100)]
        streams: usize,
        /// Distinct keys written and watched.
        #[arg(long, default_value_t = 1000)]
        watched_key_total: usize,
        /// Value size in bytes.
        #[arg(long, default_value_t = 32)]
        val_size: usize,
    },
    /// Watch event throughput and latency: `--watchers` watchers on `--keys` keys (watcher i on
    /// key i modulo the count) over `--watch-streams` streams, while `--clients` writers put
    /// `--total` times, cycling over the keys. Latency is from sending the put to each
    /// watcher's event.
    WatchLatency {
        /// Watchers in all.
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// Watch streams the watchers share.
        #[arg(long, default_value_t = 10)]
        watch_streams: usize,
        /// Distinct keys watched and written.
        #[arg(long, default_value_t = 1)]
        keys: usize,
        /// Value size in bytes.
        #[arg(long, default_value_t = 32)]
        val_size: usize,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Consistency {
    L,
    S,
}
