//! `cargo xtask bench`: MetaStore (both engines) beside real etcd on this machine, in one run.
//!
//! Builds the release binaries (and checks the server's size, as `cargo xtask size` does), then
//! for each topology (1 member, 3 members on loopback) starts a fresh cluster of each server
//! (etcd, MetaStore memory, MetaStore RocksDB) with fsync on, runs each standard workload with
//! `metastore-bench` against the three in turn, records each member's peak RSS and the data
//! directories' size, stops them, and writes `bench/results/<date>.md` with MetaStore/etcd
//! ratios and the latency distribution of put at 100 clients, then the SVG charts drawn from it
//! (`bench_charts.rs`) beside it. Every server gets the same flags (etcd's names).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{
    bench_charts, bench_scale, cargo, check_release_size, ensure, status, target_dir,
    workspace_root, CXX, ETCD, ETCDCTL, LIBCLANG,
};

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Server {
    Etcd,
    Memory,
    Rocksdb,
}

impl Server {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Server::Etcd => "etcd",
            Server::Memory => "memory",
            Server::Rocksdb => "rocksdb",
        }
    }
}

pub(crate) const SERVERS: [Server; 3] = [Server::Etcd, Server::Memory, Server::Rocksdb];

/// One workload: a label and `metastore-bench` arguments (after the global ones).
pub(crate) struct Workload {
    pub(crate) label: &'static str,
    pub(crate) clients: usize,
    pub(crate) conns: usize,
    pub(crate) total: usize,
    pub(crate) args: &'static [&'static str],
}

pub(crate) const PUT: &[&str] = &[
    "put",
    "--key-size",
    "8",
    "--val-size",
    "256",
    "--key-space-size",
    "100000",
];

/// `PUT` through etcd's HTTP/JSON gateway.
const GATEWAY_PUT: &[&str] = &[
    "put",
    "--key-size",
    "8",
    "--val-size",
    "256",
    "--key-space-size",
    "100000",
    "--gateway",
];

/// The standard suite. Put and range totals are those of etcd's documented benchmark
/// (`op-guide/performance.md`: 10,000 requests for one client, 100,000 for many), so that a run
/// lasts seconds and not one: start-up effects and the machine's drift then weigh less.
fn workloads(quick: bool) -> Vec<Workload> {
    let scale = |n: usize| if quick { n / 10 } else { n };
    vec![
        Workload {
            label: "put, 1 client",
            clients: 1,
            conns: 1,
            total: scale(10_000),
            args: PUT,
        },
        Workload {
            label: "put, 100 clients",
            clients: 100,
            conns: 10,
            total: scale(100_000),
            args: PUT,
        },
        Workload {
            label: "put, 1000 clients",
            clients: 1000,
            conns: 100,
            total: scale(100_000),
            args: PUT,
        },
        Workload {
            label: "range linearizable, 1 client",
            clients: 1,
            conns: 1,
            total: scale(10_000),
            args: &["range", "00000001"],
        },
        Workload {
            label: "range linearizable, 1000 clients",
            clients: 1000,
            conns: 100,
            total: scale(100_000),
            args: &["range", "00000001"],
        },
        Workload {
            label: "range serializable, 1 client",
            clients: 1,
            conns: 1,
            total: scale(10_000),
            args: &["range", "00000001", "--consistency", "s"],
        },
        Workload {
            label: "range serializable, 1000 clients",
            clients: 1000,
            conns: 100,
            total: scale(100_000),
            args: &["range", "00000001", "--consistency", "s"],
        },
        Workload {
            label: "txn of 1 put, 100 clients",
            clients: 100,
            conns: 10,
            total: scale(30_000),
            args: &[
                "txn-put",
                "--key-size",
                "8",
                "--val-size",
                "256",
                "--key-space-size",
                "100000",
            ],
        },
        Workload {
            label: "90% range / 10% put, 100 clients",
            clients: 100,
            conns: 10,
            total: scale(50_000),
            args: &[
                "mixed",
                "--read-ratio",
                "0.9",
                "--key-size",
                "8",
                "--val-size",
                "256",
                "--key-space-size",
                "100000",
            ],
        },
        // The JSON gateway: one HTTP/1.1 connection per client (`conns` is not used).
        Workload {
            label: "gateway (HTTP/JSON) put, 100 clients",
            clients: 100,
            conns: 100,
            total: scale(100_000),
            args: GATEWAY_PUT,
        },
        Workload {
            label: "gateway (HTTP/JSON) range linearizable, 100 clients",
            clients: 100,
            conns: 100,
            total: scale(100_000),
            args: &["range", "00000001", "--gateway"],
        },
        Workload {
            label: "lease keep-alive, 100 clients",
            clients: 100,
            conns: 10,
            total: scale(50_000),
            args: &["lease-keepalive"],
        },
        Workload {
            label: "watch: events/s to 1000 watchers on 10 keys, 10 writers",
            clients: 10,
            conns: 10,
            total: scale(20_000),
            args: &[
                "watch-latency",
                "--watchers",
                "1000",
                "--keys",
                "10",
                "--watch-streams",
                "10",
            ],
        },
    ]
}

/// A result line of `metastore-bench --json`.
pub(crate) struct Measured {
    pub(crate) per_sec: f64,
    pub(crate) p99_ms: f64,
    pub(crate) errors: u64,
    /// `(percentile, ms)` pairs of the latency distribution, ascending.
    pub(crate) percentiles: Vec<(f64, f64)>,
    /// The whole line, for the figures particular to a workload (`max_ms`, `compact_ms`, …).
    pub(crate) json: String,
}

impl Measured {
    /// A number of the JSON line (NaN when absent).
    pub(crate) fn get(&self, field: &str) -> f64 {
        json_number(&self.json, field).unwrap_or(f64::NAN)
    }
}

pub(crate) fn json_number(json: &str, field: &str) -> Option<f64> {
    let tag = format!("\"{field}\":");
    let start = json.find(&tag)? + tag.len();
    let text: String = json[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-' || *c == 'e')
        .collect();
    text.parse().ok()
}

/// The `[[percentile,ms],…]` array `field` of a `metastore-bench --json` line (empty if absent).
fn json_pairs(json: &str, field: &str) -> Vec<(f64, f64)> {
    let tag = format!("\"{field}\":[");
    let Some(start) = json.find(&tag).map(|i| i + tag.len()) else {
        return Vec::new();
    };
    let Some(len) = json[start..].find("]]") else {
        return Vec::new();
    };
    json[start..start + len]
        .split("],")
        .filter_map(|pair| {
            let (p, ms) = pair.trim_start_matches('[').split_once(',')?;
            Some((p.trim().parse().ok()?, ms.trim().parse().ok()?))
        })
        .collect()
}

pub(crate) struct Cluster {
    pub(crate) children: Vec<Child>,
    pub(crate) dirs: Vec<PathBuf>,
    pub(crate) endpoints: Vec<String>,
    /// How each member was started (program, arguments, log file), to start it again.
    specs: Vec<(PathBuf, Vec<String>, PathBuf)>,
}

fn spawn((program, args, log): &(PathBuf, Vec<String>, PathBuf)) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

impl Cluster {
    /// Waits until a write goes through. etcdctl is started only once every member accepts TCP
    /// connections: started earlier, its gRPC reconnect backoff (1 s, then longer), not the
    /// server, decided when it first got through, which rounded restart times up by as much as
    /// 2.4 s even with a 250 ms dial timeout. A connected attempt waits up to a minute for its
    /// answer, so that the time is the server's, not a multiple of etcdctl's 5 s command timeout.
    fn wait_ready(&self, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if Instant::now() > deadline {
                bail!("{what} did not become ready");
            }
            let listening = self.endpoints.iter().all(|endpoint| {
                endpoint.parse().is_ok_and(|addr| {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
                })
            });
            if !listening {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let ok = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", self.endpoints.join(",")))
                .args([
                    "--dial-timeout=250ms",
                    "--command-timeout=60s",
                    "put",
                    "bench-ready",
                    "1",
                ])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs every member, starts them again on their data, and returns how long it took
    /// until a write went through.
    pub(crate) fn kill_and_restart(&mut self) -> Result<Duration> {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let started = Instant::now();
        self.children = self.specs.iter().map(spawn).collect::<Result<_>>()?;
        self.wait_ready("the restarted cluster")?;
        Ok(started.elapsed())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port for a member to listen on, below the kernel's ephemeral range, never the same twice in
/// a run. A port from that range (a bind to port 0, as before) could be handed by the kernel to an
/// outgoing connection, a running member's or a client's, before the member bound it: once a
/// bench cluster started a member short ("Address already in use") and every request sent to
/// it failed.
fn free_port() -> Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_from.saturating_sub(FIRST).max(1);
    // Runs started side by side begin at different ports.
    let start = std::process::id() % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = FIRST + (start + n) % span;
        let port = u16::try_from(port).context("port out of range")?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between {FIRST} and {ephemeral_from}")
}

pub(crate) fn start(
    server: Server,
    members: usize,
    bin: &Path,
    work: &Path,
    token: &str,
) -> Result<Cluster> {
    let ports: Vec<(u16, u16)> = (0..members)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("b{i}=http://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut cluster = Cluster {
        children: Vec::new(),
        dirs: Vec::new(),
        endpoints: Vec::new(),
        specs: Vec::new(),
    };
    for (i, (client, peer)) in ports.iter().enumerate() {
        let dir = work.join(format!("{}-{members}-{i}", server.name()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = work.join(format!("{}-{members}-{i}.log", server.name()));
        let (program, mut args) = match server {
            Server::Etcd => (PathBuf::from("etcd"), Vec::new()),
            Server::Memory | Server::Rocksdb => (
                bin.join("metastore"),
                vec!["--storage-engine".to_string(), server.name().to_string()],
            ),
        };
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        for arg in [
            "--name",
            &format!("b{i}"),
            "--data-dir",
            &dir.display().to_string(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &initial,
            "--initial-cluster-token",
            token,
            "--quota-backend-bytes",
            "8589934592",
        ] {
            args.push(arg.to_string());
        }
        let spec = (program, args, log);
        cluster.children.push(spawn(&spec)?);
        cluster.specs.push(spec);
        cluster.dirs.push(dir);
        cluster.endpoints.push(format!("127.0.0.1:{client}"));
    }
    // Ready when every member answers and a write goes through.
    cluster.wait_ready(&format!(
        "{} ({members} members; logs in {})",
        server.name(),
        work.display()
    ))?;
    Ok(cluster)
}

fn run_workload(bin: &Path, endpoints: &[String], w: &Workload) -> Result<Measured> {
    run_workload_with(bin, endpoints, w, &[])
}

/// `w` with `extra` arguments after its own (options of its subcommand, or global ones).
pub(crate) fn run_workload_with(
    bin: &Path,
    endpoints: &[String],
    w: &Workload,
    extra: &[String],
) -> Result<Measured> {
    let mut bench = Command::new(bin.join("metastore-bench"));
    bench.args(["--endpoints", &endpoints.join(",")]);
    // One connection goes to the first endpoint, which the election made leader or follower
    // (a follower adds a hop to every request): one client of 3 members talks to the leader, as
    // in etcd's documented "write to leader" row, so every server is measured in the same role.
    if w.conns == 1 && endpoints.len() > 1 {
        bench.arg("--target-leader");
    }
    let out = bench
        .args([
            "--clients",
            &w.clients.to_string(),
            "--conns",
            &w.conns.to_string(),
        ])
        .args(["--total", &w.total.to_string(), "--json"])
        .args(w.args)
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .context("running metastore-bench")?;
    if !out.status.success() {
        bail!("metastore-bench {} failed", w.label);
    }
    let json = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(Measured {
        per_sec: json_number(&json, "requests_per_sec").context("no throughput in bench output")?,
        p99_ms: json_number(&json, "p99_ms").unwrap_or(f64::NAN),
        errors: json_number(&json, "errors").unwrap_or(0.0) as u64,
        percentiles: json_pairs(&json, "percentiles_ms"),
        json,
    })
}

pub(crate) fn peak_rss_kb(child: &Child) -> u64 {
    status_kb(child, "VmHWM:")
}

/// A figure in KiB of `/proc/<pid>/status` (`VmHWM:` the peak RSS, `VmRSS:` the RSS now); 0 if
/// the process is gone.
pub(crate) fn status_kb(child: &Child, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The workload table of one topology (`rows[workload][server]`, servers in `SERVERS` order),
/// then the latency distribution of [`bench_charts::CDF_WORKLOAD`] when every server reported
/// one: the tables [`bench_charts::parse_report`] reads. True if the distribution was written.
pub(crate) fn write_results(
    report: &mut String,
    workloads: &[Workload],
    rows: &[Vec<Measured>],
) -> Result<bool> {
    writeln!(report, "{}", bench_charts::WORKLOAD_HEADER)?;
    writeln!(report, "|---|---|---|---|---|---|---|")?;
    let mut written = false;
    for (w, measured) in workloads.iter().zip(rows) {
        let (e, m, r) = (&measured[0], &measured[1], &measured[2]);
        writeln!(
            report,
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.1} / {:.1} / {:.1} |",
            w.label,
            e.per_sec,
            m.per_sec,
            m.per_sec / e.per_sec,
            r.per_sec,
            r.per_sec / e.per_sec,
            e.p99_ms,
            m.p99_ms,
            r.p99_ms
        )?;
    }
    writeln!(report)?;
    // The latency distribution the CDF chart draws.
    if let Some(i) = workloads
        .iter()
        .position(|w| w.label == bench_charts::CDF_WORKLOAD)
    {
        let [e, m, r] = [&rows[i][0], &rows[i][1], &rows[i][2]].map(|x| &x.percentiles);
        if !e.is_empty() && e.len() == m.len() && e.len() == r.len() {
            writeln!(
                report,
                "Latency distribution of {}:\n",
                bench_charts::CDF_WORKLOAD
            )?;
            writeln!(report, "{}", bench_charts::PERCENTILE_HEADER)?;
            writeln!(report, "|---|---|---|---|")?;
            for ((p, e), ((_, m), (_, r))) in e.iter().zip(m.iter().zip(r)) {
                writeln!(report, "| {p} | {e:.3} | {m:.3} | {r:.3} |")?;
            }
            writeln!(report)?;
            written = true;
        }
    }
    Ok(written)
}

/// The sections of a run, in the report's order: the standard workloads on 1 and 3 members, a
/// member holding many keys, then the scale rows (`bench_scale.rs`).
pub(crate) const SECTIONS: [&str; 6] = [
    "standard",
    "keys",
    "watchers",
    "lists",
    "compaction",
    "large",
];

/// `cargo xtask bench`'s arguments.
const BENCH_USAGE: &str = "usage: cargo xtask bench [--quick] [--only SECTION,…]\n\
    Builds release binaries, measures MetaStore (memory and RocksDB engines) beside etcd and \
    writes bench/results/<date>.md with its charts (about 25 minutes on 2 cores).\n\
    --quick: fewer requests per row.\n\
    --only: these sections";

/// What `cargo xtask bench` was asked: `None` for help (`--help`, `-h`), else whether quick and
/// which sections. Anything else is an error, so that a mistyped or unknown argument never
/// starts a 25-minute run.
fn bench_args(args: &[String]) -> Result<Option<(bool, Vec<&'static str>)>> {
    let mut quick = false;
    let mut only = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--help" | "-h" => return Ok(None),
            "--quick" => quick = true,
            "--only" => only = Some(rest.next().context("--only needs a list of sections")?),
            other => bail!("unknown argument {other:?}\n{BENCH_USAGE} {SECTIONS:?}"),
        }
    }
    Ok(Some((quick, sections(only)?)))
}

/// The sections `--only a,b` names (every section without it).
fn sections(only: Option<&String>) -> Result<Vec<&'static str>> {
    let Some(list) = only else {
        return Ok(SECTIONS.to_vec());
    };
    list.split(',')
        .map(|name| {
            SECTIONS
                .iter()
                .find(|s| **s == name.trim())
                .copied()
                .with_context(|| {
                    format!("no bench section {name:?}; the sections are {SECTIONS:?}")
                })
        })
        .collect()
}

/// `stem`, or `stem-2`, `stem-3`, … when a report of that name is in `dir` already: a second run
/// on the same day keeps the first one's report (an earlier note may cite it).
fn unused_stem(dir: &Path, stem: &str) -> String {
    std::iter::once(stem.to_string())
        .chain((2..).map(|n| format!("{stem}-{n}")))
        .find(|s| !dir.join(format!("{s}.md")).exists())
        .unwrap_or_else(|| stem.to_string())
}

/// `cargo xtask bench [--quick] [--only SECTION,…]`.
pub fn bench(args: &[String]) -> Result<()> {
    let Some((quick, sections)) = bench_args(args)? else {
        println!("{BENCH_USAGE} {SECTIONS:?}");
        return Ok(());
    };
    let wants = |section: &str| sections.contains(&section);
    ensure(&[LIBCLANG, CXX, ETCD, ETCDCTL])?;
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "metastore",
        "-p",
        "metastore-bench",
    ]);
    status(build)?;
    let bin = target_dir().join("release");
    check_release_size(&bin.join("metastore"))?;
    let work = std::env::temp_dir().join(format!("metastore-xtask-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let workloads = workloads(quick);

    let mut report = String::new();
    let date = Command::new("date").arg("+%Y-%m-%d").output()?;
    let date = String::from_utf8_lossy(&date.stdout).trim().to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let etcd_version = Command::new("etcd").arg("--version").output()?;
    let etcd_version = String::from_utf8_lossy(&etcd_version.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    writeln!(report, "# MetaStore vs etcd, {date}\n")?;
    writeln!(
        report,
        "Machine: {cpu}, {cores} cores; {etcd_version}. Command: `cargo xtask bench{}{}`.",
        if quick { " --quick" } else { "" },
        if sections.len() == SECTIONS.len() {
            String::new()
        } else {
            format!(" --only {}", sections.join(","))
        }
    )?;
    // A partial run is named after its sections, beside the day's full run.
    let stem = if sections.len() == SECTIONS.len() {
        date.clone()
    } else {
        format!("{date}-{}", sections.join("-"))
    };
    let results = workspace_root().join("bench").join("results");
    let md_file = results.join(format!("{}.md", unused_stem(&results, &stem)));
    let mut has_distribution = false;
    writeln!(report, "Every server runs with fsync, members on loopback, the load generator on the same machine (its runtime has twice as many threads as there are cores, see `metastore-bench --help`). 8-byte keys, 256-byte values. The three servers of a topology run side by side, each idle while another is measured, and every workload runs against the three in turn (rotating which goes first), so that the machine's speed drifting during the run affects all three alike. With 3 members, one client talks to the leader (`--target-leader`); more clients are spread over all members. Ratios are MetaStore / etcd (throughput: higher is better; p99: lower is better).\n")?;

    let topologies: &[usize] = if wants("standard") { &[1, 3] } else { &[] };
    for &members in topologies {
        writeln!(
            report,
            "## {members} member{}\n",
            if members > 1 { "s" } else { "" }
        )?;
        // The three servers run side by side and each workload runs against each of them in
        // turn, rotating which goes first: the machine's speed drifts over minutes on shared
        // cores, and measuring etcd and MetaStore seconds apart keeps that drift out of the
        // ratios. An idle cluster costs under 2% of one core.
        let mut clusters = Vec::new();
        for server in SERVERS {
            eprintln!(
                "xtask bench: starting {} with {members} member(s)",
                server.name()
            );
            let token = format!("bench-{}-{members}-{}", server.name(), std::process::id());
            clusters.push(start(server, members, &bin, &work, &token)?);
        }
        let mut rows: Vec<Vec<Option<Measured>>> = workloads
            .iter()
            .map(|_| SERVERS.iter().map(|_| None).collect())
            .collect();
        for (i, w) in workloads.iter().enumerate() {
            for turn in 0..SERVERS.len() {
                let s = (i + turn) % SERVERS.len();
                let cluster = &clusters[s];
                if w.args[0] == "range" {
                    // The key the range workloads read.
                    let _ = Command::new("etcdctl")
                        .env("ETCDCTL_API", "3")
                        .arg(format!("--endpoints={}", cluster.endpoints.join(",")))
                        .args(["put", "00000001", &"v".repeat(256)])
                        .output();
                }
                let m = run_workload(&bin, &cluster.endpoints, w)?;
                eprintln!(
                    "  {:<8} {:<36} {:>10.0} req/s  p99 {:.2} ms  errors {}",
                    SERVERS[s].name(),
                    w.label,
                    m.per_sec,
                    m.p99_ms,
                    m.errors
                );
                rows[i][s] = Some(m);
            }
        }
        let mut footprint = Vec::new();
        for (server, cluster) in SERVERS.into_iter().zip(clusters) {
            let rss: Vec<u64> = cluster.children.iter().map(peak_rss_kb).collect();
            let disk: u64 = cluster.dirs.iter().map(|d| dir_size(d)).sum();
            footprint.push((server, rss, disk));
            drop(cluster);
        }
        let rows: Vec<Vec<Measured>> = rows
            .into_iter()
            .map(|row| row.into_iter().flatten().collect())
            .collect();
        has_distribution |= write_results(&mut report, &workloads, &rows)?;
        writeln!(
            report,
            "| server | peak RSS per member (MB) | data on disk, all members (MB) |"
        )?;
        writeln!(report, "|---|---|---|")?;
        for (server, rss, disk) in &footprint {
            let rss: Vec<String> = rss
                .iter()
                .map(|kb| format!("{:.0}", *kb as f64 / 1024.0))
                .collect();
            writeln!(
                report,
                "| {} | {} | {:.1} |",
                server.name(),
                rss.join(" / "),
                *disk as f64 / 1e6
            )?;
        }
        writeln!(report)?;
    }
    if wants("keys") {
        many_keys(&mut report, quick, &bin, &work)?;
    }
    let scale = bench_scale::Scale {
        quick,
        bin: &bin,
        work: &work,
    };
    if wants("watchers") {
        scale.watchers(&mut report)?;
    }
    if wants("lists") {
        scale.lists(&mut report)?;
    }
    if wants("compaction") {
        scale.compaction(&mut report)?;
    }
    if wants("large") {
        scale.large_keyspace(&mut report)?;
    }
    writeln!(report, "The watch rows count events delivered per second; their p99 is the delay from sending a put (or, catching up, creating the watcher) to the watcher receiving its event. RSS and restart ratios are MetaStore / etcd (lower is better).")?;

    // The charts drawn from this report's workload tables once it is written (bench_charts.rs);
    // the compaction and large-keyspace sections have none of their own.
    let has_tables = report.contains(bench_charts::WORKLOAD_HEADER);
    if has_tables {
        writeln!(report, "\n## Charts\n")?;
        let [throughput, p99, cdf] = bench_charts::chart_files(&md_file);
        let mut charts = vec![throughput, p99];
        if has_distribution {
            charts.push(cdf);
        }
        for (title, chart) in charts {
            let name = chart.file_name().unwrap_or_default().to_string_lossy();
            writeln!(report, "![{title}]({name})\n")?;
        }
    }

    if let Some(dir) = md_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&md_file, &report)?;
    let _ = std::fs::remove_dir_all(&work);
    println!("{report}");
    eprintln!("xtask bench: wrote {}", md_file.display());
    if has_tables {
        for chart in bench_charts::write_charts(&md_file)? {
            eprintln!("xtask bench: wrote {}", chart.display());
        }
    }
    Ok(())
}

/// A member holding many keys: peak RSS after writing them, and the time to restart it.
fn many_keys(report: &mut String, quick: bool, bin: &Path, work: &Path) -> Result<()> {
    let keys: usize = if quick { 100_000 } else { 1_000_000 };
    writeln!(
        report,
        "## One member holding {keys} keys of 256-byte values\n"
    )?;
    writeln!(report, "Written by 1000 clients over 100 connections (sequential keys), then the member is SIGKILLed and started again on its data; restart time is until a write goes through.\n")?;
    writeln!(report, "| server | write req/s | peak RSS after writing (MB) | data on disk (MB) | restart (s) | RSS ratio | restart ratio |")?;
    writeln!(report, "|---|---|---|---|---|---|---|")?;
    let load = Workload {
        label: "load",
        clients: 1000,
        conns: 100,
        total: keys,
        args: &[
            "put",
            "--key-size",
            "16",
            "--val-size",
            "256",
            "--sequential-keys",
            "--key-space-size",
            "100000000",
        ],
    };
    let mut baseline: Option<(u64, f64)> = None;
    for server in SERVERS {
        eprintln!("xtask bench: {} holding {keys} keys", server.name());
        let token = format!("bench-load-{}-{}", server.name(), std::process::id());
        let mut cluster = start(server, 1, bin, work, &token)?;
        let m = run_workload(bin, &cluster.endpoints, &load)?;
        let rss = peak_rss_kb(&cluster.children[0]);
        let disk = dir_size(&cluster.dirs[0]);
        let restart = cluster.kill_and_restart()?.as_secs_f64();
        let (rss_ratio, restart_ratio) = match baseline {
            None => {
                baseline = Some((rss, restart));
                ("—".to_string(), "—".to_string())
            }
            Some((e_rss, e_restart)) => (
                format!("{:.2}", rss as f64 / e_rss.max(1) as f64),
                format!("{:.2}", restart / e_restart.max(0.001)),
            ),
        };
        writeln!(
            report,
            "| {} | {:.0} | {:.0} | {:.1} | {:.2} | {rss_ratio} | {restart_ratio} |",
            server.name(),
            m.per_sec,
            rss as f64 / 1024.0,
            disk as f64 / 1e6,
            restart
        )?;
        drop(cluster);
    }
    writeln!(report)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second run on the same day writes beside the first report, not over it.
    #[test]
    fn reports_of_the_same_day_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(unused_stem(dir.path(), "2026-12-07"), "2026-12-07");
        std::fs::write(dir.path().join("2026-12-07.md"), "first").unwrap();
        // Charts alone do not take a name; a report does.
        std::fs::write(dir.path().join("2026-12-07-2-p99.svg"), "").unwrap();
        assert_eq!(unused_stem(dir.path(), "2026-12-07"), "2026-12-07-2");
        std::fs::write(dir.path().join("2026-12-07-2.md"), "second").unwrap();
        assert_eq!(unused_stem(dir.path(), "2026-12-07"), "2026-12-07-3");
        assert_eq!(
            unused_stem(dir.path(), "2026-12-07-lists"),
            "2026-12-07-lists"
        );
    }

    /// Member ports come from below the kernel's ephemeral range (where outgoing connections
    /// take theirs), and a run never hands the same one out twice.
    #[test]
    fn member_ports_are_distinct_and_below_the_ephemeral_range() {
        let ephemeral_from: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768);
        let ports: Vec<u16> = (0..20).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        assert!(
            ports.iter().all(|p| *p >= 10_000 && *p < ephemeral_from),
            "{ports:?}"
        );
    }

    #[test]
    fn bench_arguments_are_checked_before_anything_runs() {
        let args = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(
            bench_args(&args(&[])).unwrap(),
            Some((false, SECTIONS.to_vec()))
        );
        assert_eq!(
            bench_args(&args(&["--quick", "--only", "lists,keys"])).unwrap(),
            Some((true, vec!["lists", "keys"]))
        );
        assert_eq!(bench_args(&args(&["--help"])).unwrap(), None);
        assert_eq!(bench_args(&args(&["--only", "lists", "-h"])).unwrap(), None);
        let unknown = bench_args(&args(&["--qiuck"])).unwrap_err().to_string();
        assert!(
            unknown.contains("unknown argument \"--qiuck\""),
            "{unknown}"
        );
        assert!(bench_args(&args(&["--only"])).is_err());
        assert!(bench_args(&args(&["--only", "lists,nope"])).is_err());
    }

    #[test]
    fn reads_the_percentiles_of_a_bench_line() {
        let line = "{\"requests\":100,\"p99_ms\":4.500,\"percentiles_ms\":[[0,0.210],[50,1.400],[99.9,12.000],[100,15.100]],\"clients\":100}";
        assert_eq!(
            json_pairs(line, "percentiles_ms"),
            [(0.0, 0.21), (50.0, 1.4), (99.9, 12.0), (100.0, 15.1)]
        );
        assert_eq!(json_number(line, "p99_ms"), Some(4.5));
        assert!(json_pairs("{\"requests\":1}", "percentiles_ms").is_empty());
    }

    /// What `bench` writes for a topology is what the charts read back.
    #[test]
    fn the_charts_read_the_tables_bench_writes() {
        let measured = |per_sec: f64, p99_ms: f64| Measured {
            per_sec,
            p99_ms,
            errors: 0,
            percentiles: vec![(0.0, p99_ms / 10.0), (50.0, p99_ms / 3.0), (99.0, p99_ms)],
            json: String::new(),
        };
        let workloads = workloads(true);
        let rows: Vec<Vec<Measured>> = (0..workloads.len())
            .map(|i| {
                let i = i as f64;
                vec![
                    measured(1000.0 + i, 10.0 + i),
                    measured(2000.0 + i, 4.0 + i),
                    measured(3000.0 + i, 5.0 + i),
                ]
            })
            .collect();
        let mut report = String::from("# report\n\n## 3 members\n\n");
        assert!(write_results(&mut report, &workloads, &rows).unwrap());
        let topologies = bench_charts::parse_report(&report).unwrap();
        assert_eq!(topologies.len(), 1);
        let t = &topologies[0];
        assert_eq!(t.title, "3 members");
        assert_eq!(t.rows.len(), workloads.len());
        let put = workloads
            .iter()
            .position(|w| w.label == bench_charts::CDF_WORKLOAD)
            .unwrap();
        assert_eq!(t.rows[put].label, bench_charts::CDF_WORKLOAD);
        let p = put as f64;
        assert_eq!(t.rows[put].per_sec, [1000.0 + p, 2000.0 + p, 3000.0 + p]);
        assert_eq!(t.rows[put].p99_ms, [10.0 + p, 4.0 + p, 5.0 + p]);
        assert_eq!(t.percentiles.len(), 3);
        assert_eq!(t.percentiles[2], (99.0, [10.0 + p, 4.0 + p, 5.0 + p]));
        assert!(bench_charts::cdf_svg(&topologies).unwrap().is_some());

        // Without a distribution (an older metastore-bench), no table and no CDF.
        let mut bare = rows;
        for row in &mut bare {
            for m in row {
                m.percentiles.clear();
            }
        }
        let mut report = String::from("## 1 member\n\n");
        assert!(!write_results(&mut report, &workloads, &bare).unwrap());
        let topologies = bench_charts::parse_report(&report).unwrap();
        assert!(bench_charts::cdf_svg(&topologies).unwrap().is_none());
    }
}
