//! The scale sections of `cargo xtask bench` (issue 24): how each cost grows with the work, not
//! one size only. Each section starts its own clusters, MetaStore beside etcd in the same run:
//! - `watchers`: put throughput with 100,000 idle watchers on other keys beside the same run
//!   without them, and 10,000 unsynced watchers catching up 100,000 revisions;
//! - `lists`: ranges of 5,000 keys of 2 KiB (pages of 500 and whole), 10 and 100 clients,
//!   linearizable and serializable, with each server's peak RSS;
//! - `compaction`: put latency at 100 clients on 3 members while 1M revisions are compacted,
//!   beside the same load without compaction; the compaction's duration and leader changes;
//! - `large`: 10M keys of 256 bytes written to one member in steps of 1M, with the write
//!   throughput and range p99 of each step, RSS and the restart time (RocksDB and etcd, whose
//!   quota stops it first).

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::{
    dir_size, peak_rss_kb, run_workload_with, start, status_kb, write_results, Cluster, Measured,
    Server, Workload, PUT, SERVERS,
};

/// The machine and mode of a run.
pub(crate) struct Scale<'a> {
    pub(crate) quick: bool,
    pub(crate) bin: &'a Path,
    pub(crate) work: &'a Path,
}

/// Puts over 10,000 keys: the history the compaction section builds and compacts.
const PUT_10K: &[&str] = &[
    "put",
    "--key-size",
    "8",
    "--val-size",
    "256",
    "--key-space-size",
    "10000",
];

/// Sequential 16-byte keys, for runs that go on where the last one stopped (`--first-key`).
const LARGE_PUT: &[&str] = &[
    "put",
    "--key-size",
    "16",
    "--val-size",
    "256",
    "--sequential-keys",
    "--key-space-size",
    "100000000",
];

impl Scale<'_> {
    fn scale(&self, n: usize) -> usize {
        if self.quick {
            n / 10
        } else {
            n
        }
    }

    /// The three servers side by side, `members` each.
    fn side_by_side(&self, members: usize, section: &str) -> Result<Vec<Cluster>> {
        SERVERS
            .iter()
            .map(|&server| self.cluster(server, members, section))
            .collect()
    }

    fn cluster(&self, server: Server, members: usize, section: &str) -> Result<Cluster> {
        eprintln!(
            "xtask bench {section}: starting {} with {members} member(s)",
            server.name()
        );
        let token = format!(
            "bench-{section}-{}-{members}-{}",
            server.name(),
            std::process::id()
        );
        start(server, members, self.bin, self.work, &token)
    }

    /// Each workload against the three clusters in turn, rotating which goes first (as the
    /// standard suite does): `rows[workload][server]`.
    fn rotate(
        &self,
        clusters: &[Cluster],
        workloads: &[(Workload, Vec<String>)],
    ) -> Result<Vec<Vec<Measured>>> {
        let mut rows: Vec<Vec<Option<Measured>>> = workloads
            .iter()
            .map(|_| SERVERS.iter().map(|_| None).collect())
            .collect();
        for (i, (w, extra)) in workloads.iter().enumerate() {
            for turn in 0..SERVERS.len() {
                let s = (i + turn) % SERVERS.len();
                let m = run_workload_with(self.bin, &clusters[s].endpoints, w, extra)?;
                eprintln!(
                    "  {:<8} {:<56} {:>10.0} req/s  p99 {:.2} ms  errors {}",
                    SERVERS[s].name(),
                    w.label,
                    m.per_sec,
                    m.p99_ms,
                    m.errors
                );
                rows[i][s] = Some(m);
            }
        }
        Ok(rows
            .into_iter()
            .map(|row| row.into_iter().flatten().collect())
            .collect())
    }

    /// Idle watchers beside puts; unsynced watchers catching up.
    pub(crate) fn watchers(&self, report: &mut String) -> Result<()> {
        let idle = self.scale(100_000);
        let (catchup_watchers, revisions) = (self.scale(10_000), self.scale(100_000));
        writeln!(report, "## Watchers at scale (1 member)\n")?;
        writeln!(report, "Put at 100 clients over 10 connections, with no watcher and then with {idle} watchers open on keys nobody writes (100 streams, held open during the run). Catch-up: {revisions} puts over 1000 keys, then {catchup_watchers} watchers (100 streams, {} per key) created from the revision before the first put; each receives its key's whole history ({} events in all); the row's throughput is events per second from the first create to the last event.\n", catchup_watchers / 1000, revisions as u64 * catchup_watchers as u64 / 1000)?;
        let clusters = self.side_by_side(1, "watchers")?;
        let put = |label: &'static str| Workload {
            label,
            clients: 100,
            conns: 10,
            total: self.scale(100_000),
            args: PUT,
        };
        let workloads = vec![
            (put("put, 100 clients, no watchers"), Vec::new()),
            (
                put(if self.quick {
                    "put, 100 clients, 10,000 idle watchers"
                } else {
                    "put, 100 clients, 100,000 idle watchers"
                }),
                strings(&[
                    "--idle-watchers",
                    &idle.to_string(),
                    "--idle-watch-streams",
                    "100",
                ]),
            ),
            (
                Workload {
                    label: if self.quick {
                        "watch catch-up: 1,000 watchers, 10,000 revisions"
                    } else {
                        "watch catch-up: 10,000 watchers, 100,000 revisions"
                    },
                    clients: 100,
                    conns: 10,
                    total: revisions,
                    args: &["watch-catchup"],
                },
                strings(&[
                    "--watchers",
                    &catchup_watchers.to_string(),
                    "--streams",
                    "100",
                    "--watched-key-total",
                    "1000",
                ]),
            ),
        ];
        let rows = self.rotate(&clusters, &workloads)?;
        drop(clusters);
        let plain: Vec<Workload> = workloads.into_iter().map(|(w, _)| w).collect();
        write_results(report, &plain, &rows)?;
        let (without, with, catchup) = (&rows[0], &rows[1], &rows[2]);
        let mut lines = Vec::new();
        for (s, server) in SERVERS.iter().enumerate() {
            lines.push(format!(
                "{}: put with idle watchers {:.2}x of without, catch-up {:.2} s{}",
                server.name(),
                with[s].per_sec / without[s].per_sec,
                catchup[s].get("catchup_seconds"),
                if s == 0 {
                    String::new()
                } else {
                    format!(
                        " ({:.2}x etcd's time)",
                        catchup[s].get("catchup_seconds") / catchup[0].get("catchup_seconds")
                    )
                }
            ));
        }
        writeln!(report, "{}.\n", lines.join("; "))?;
        Ok(())
    }

    /// Ranges of 5,000 keys of 2 KiB.
    pub(crate) fn lists(&self, report: &mut String) -> Result<()> {
        writeln!(report, "## Lists: 5,000 keys of 2 KiB (1 member)\n")?;
        writeln!(report, "Kubernetes' LIST: a range over 5,000 keys of 2 KiB values, in pages of 500 (`--limit 500`, one 1 MiB answer) and whole (one 10 MiB answer). Peak RSS is each member's, from its start to the end of this section.\n")?;
        let clusters = self.side_by_side(1, "lists")?;
        let load = Workload {
            label: "load",
            clients: 10,
            conns: 10,
            total: 5000,
            args: &[
                "put",
                "--key-size",
                "8",
                "--val-size",
                "2048",
                "--sequential-keys",
                "--key-space-size",
                "5000",
            ],
        };
        for cluster in &clusters {
            let m = run_workload_with(self.bin, &cluster.endpoints, &load, &[])?;
            if m.errors > 0 {
                bail!("loading the lists' keys failed: {}", m.json);
            }
        }
        const PAGE_L: &[&str] = &["range", "00000000", "00005000", "--limit", "500"];
        const PAGE_S: &[&str] = &[
            "range",
            "00000000",
            "00005000",
            "--limit",
            "500",
            "--consistency",
            "s",
        ];
        const WHOLE_L: &[&str] = &["range", "00000000", "00005000"];
        const WHOLE_S: &[&str] = &["range", "00000000", "00005000", "--consistency", "s"];
        let row =
            |label: &'static str, clients: usize, total: usize, args: &'static [&'static str]| {
                (
                    Workload {
                        label,
                        clients,
                        conns: clients.min(10),
                        total: self.scale(total),
                        args,
                    },
                    Vec::new(),
                )
            };
        let workloads = vec![
            row(
                "list pages of 500, linearizable, 10 clients",
                10,
                5_000,
                PAGE_L,
            ),
            row(
                "list pages of 500, linearizable, 100 clients",
                100,
                10_000,
                PAGE_L,
            ),
            row(
                "list pages of 500, serializable, 10 clients",
                10,
                5_000,
                PAGE_S,
            ),
            row(
                "list pages of 500, serializable, 100 clients",
                100,
                10_000,
                PAGE_S,
            ),
            row("list whole, linearizable, 10 clients", 10, 500, WHOLE_L),
            row("list whole, linearizable, 100 clients", 100, 1_000, WHOLE_L),
            row("list whole, serializable, 10 clients", 10, 500, WHOLE_S),
            row("list whole, serializable, 100 clients", 100, 1_000, WHOLE_S),
        ];
        let rows = self.rotate(&clusters, &workloads)?;
        let rss: Vec<u64> = clusters
            .iter()
            .map(|c| peak_rss_kb(&c.children[0]))
            .collect();
        drop(clusters);
        let plain: Vec<Workload> = workloads.into_iter().map(|(w, _)| w).collect();
        write_results(report, &plain, &rows)?;
        writeln!(report, "| server | peak RSS (MB) | RSS ratio |")?;
        writeln!(report, "|---|---|---|")?;
        for (s, server) in SERVERS.iter().enumerate() {
            writeln!(
                report,
                "| {} | {:.0} | {} |",
                server.name(),
                rss[s] as f64 / 1024.0,
                if s == 0 {
                    "—".to_string()
                } else {
                    format!("{:.2}", rss[s] as f64 / rss[0].max(1) as f64)
                }
            )?;
        }
        writeln!(report)?;
        Ok(())
    }

    /// Put latency while a large history is compacted, on 3 members.
    pub(crate) fn compaction(&self, report: &mut String) -> Result<()> {
        let revisions = self.scale(1_000_000);
        let secs = if self.quick { 5 } else { 15 };
        writeln!(
            report,
            "## Compaction of {revisions} revisions on 3 members, under put load\n"
        )?;
        writeln!(report, "{revisions} puts over 10,000 keys (1000 clients), then put at 100 clients for {secs} s without compaction (steady), then again for {secs} s with one Compact to the revision the run started at, sent 1 s in. \"Compact answered\" is the Compact call's latency; \"compaction took\" is the longest, over the members, of the time their compaction ran (`etcd_debugging_mvcc_db_compaction_total_duration_milliseconds`, pauses between batches included); leader changes are counted over both runs by `etcd_server_leader_changes_seen_total`.\n")?;
        writeln!(report, "| server | steady p99 / max ms | compacting p99 / max ms | p99 compacting / steady | put req/s steady / compacting | Compact answered ms | compaction took s | leader changes |")?;
        writeln!(report, "|---|---|---|---|---|---|---|---|")?;
        let mut p99s = Vec::new();
        for server in SERVERS {
            let cluster = self.cluster(server, 3, "compaction")?;
            let load = Workload {
                label: "history",
                clients: 1000,
                conns: 100,
                total: revisions,
                args: PUT_10K,
            };
            let m = run_workload_with(self.bin, &cluster.endpoints, &load, &[])?;
            if m.errors > 0 {
                bail!("writing the history failed: {}", m.json);
            }
            let run = Workload {
                label: "put",
                clients: 100,
                conns: 10,
                total: 1_000_000_000,
                args: PUT_10K,
            };
            let timed = strings(&["--max-secs", &secs.to_string()]);
            let before = Metrics::read(&cluster)?;
            let steady = run_workload_with(self.bin, &cluster.endpoints, &run, &timed)?;
            let mut compacting_args = timed.clone();
            compacting_args.extend(strings(&["--compact-after-secs", "1"]));
            let compacting =
                run_workload_with(self.bin, &cluster.endpoints, &run, &compacting_args)?;
            // Wait for every member to finish its compaction.
            let deadline = Instant::now() + Duration::from_secs(600);
            let after = loop {
                let now = Metrics::read(&cluster)?;
                let done = now
                    .compactions
                    .iter()
                    .zip(&before.compactions)
                    .all(|((count, _), (was, _))| count > was);
                if done {
                    break now;
                }
                if Instant::now() > deadline {
                    bail!("{}: a member did not finish its compaction", server.name());
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            let took_ms = after
                .compactions
                .iter()
                .zip(&before.compactions)
                .map(|((_, sum), (_, was))| sum - was)
                .fold(0.0, f64::max);
            writeln!(
                report,
                "| {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} | {:.0} / {:.0} | {:.1} | {:.2} | {} |",
                server.name(),
                steady.p99_ms,
                steady.get("max_ms"),
                compacting.p99_ms,
                compacting.get("max_ms"),
                compacting.p99_ms / steady.p99_ms,
                steady.per_sec,
                compacting.per_sec,
                compacting.get("compact_ms"),
                took_ms / 1000.0,
                after.leader_changes - before.leader_changes,
            )?;
            p99s.push(compacting.p99_ms);
            drop(cluster);
        }
        writeln!(
            report,
            "\np99 while compacting, MetaStore / etcd: memory {:.2}, rocksdb {:.2}.\n",
            p99s[1] / p99s[0],
            p99s[2] / p99s[0]
        )?;
        Ok(())
    }

    /// Many keys on one member, written in steps.
    pub(crate) fn large_keyspace(&self, report: &mut String) -> Result<()> {
        let step = self.scale(1_000_000);
        let steps = 10;
        writeln!(
            report,
            "## A large keyspace: up to {} keys of 256 bytes on one member\n",
            step * steps
        )?;
        writeln!(report, "Written in steps of {step} sequential 16-byte keys (1000 clients over 100 connections); after each step, 20,000 linearizable ranges of one random written key at 100 clients, and the member's RSS. etcd runs with an 8 GiB quota (`--quota-backend-bytes`, its documented maximum): it stops where its database reaches it. Then the member is SIGKILLed and restarted on its data; restart is until a write goes through.\n")?;
        let servers = [Server::Etcd, Server::Rocksdb];
        // Per server: the rows of each step (keys, put/s, range p99, RSS MB), and the end.
        let mut steps_of = Vec::new();
        let mut ends = Vec::new();
        for server in servers {
            let mut cluster = self.cluster(server, 1, "large")?;
            let mut rows = Vec::new();
            let mut stopped = None;
            for k in 0..steps {
                let put = Workload {
                    label: "write",
                    clients: 1000,
                    conns: 100,
                    total: step,
                    args: LARGE_PUT,
                };
                let first = (k * step).to_string();
                let m = run_workload_with(
                    self.bin,
                    &cluster.endpoints,
                    &put,
                    &strings(&["--first-key", &first]),
                )?;
                if m.errors > 0 {
                    stopped = Some(format!(
                        "stopped in step {}: {} of {step} puts failed (quota)",
                        k + 1,
                        m.errors
                    ));
                    break;
                }
                let read = Workload {
                    label: "read",
                    clients: 100,
                    conns: 10,
                    total: self.scale(20_000),
                    args: &["mixed", "--read-ratio", "1", "--key-size", "16"],
                };
                let keys = ((k + 1) * step).to_string();
                let r = run_workload_with(
                    self.bin,
                    &cluster.endpoints,
                    &read,
                    &strings(&["--key-space-size", &keys]),
                )?;
                rows.push((
                    (k + 1) * step,
                    m.per_sec,
                    r.p99_ms,
                    rss_kb(&cluster.children[0]),
                ));
                eprintln!(
                    "  {:<8} {:>9} keys  put {:>8.0}/s  range p99 {:.2} ms  RSS {:.0} MB",
                    server.name(),
                    (k + 1) * step,
                    m.per_sec,
                    r.p99_ms,
                    rss_kb(&cluster.children[0]) as f64 / 1024.0
                );
            }
            let peak = peak_rss_kb(&cluster.children[0]);
            let disk = dir_size(&cluster.dirs[0]);
            let restart = cluster.kill_and_restart()?.as_secs_f64();
            drop(cluster);
            steps_of.push(rows);
            ends.push((peak, disk, restart, stopped));
        }
        writeln!(report, "| keys | etcd put/s | etcd range p99 ms | etcd RSS MB | rocksdb put/s | rocksdb range p99 ms | rocksdb RSS MB |")?;
        writeln!(report, "|---|---|---|---|---|---|---|")?;
        for k in 0..steps {
            let cell = |rows: &Vec<(usize, f64, f64, u64)>| match rows.get(k) {
                Some((_, per_sec, p99, rss)) => {
                    format!("{per_sec:.0} | {p99:.1} | {:.0}", *rss as f64 / 1024.0)
                }
                None => "— | — | —".to_string(),
            };
            writeln!(
                report,
                "| {} | {} | {} |",
                (k + 1) * step,
                cell(&steps_of[0]),
                cell(&steps_of[1])
            )?;
        }
        writeln!(report)?;
        writeln!(
            report,
            "| server | keys written | peak RSS MB | data on disk MB | restart s | |"
        )?;
        writeln!(report, "|---|---|---|---|---|---|")?;
        for ((server, rows), (peak, disk, restart, stopped)) in
            servers.iter().zip(&steps_of).zip(&ends)
        {
            writeln!(
                report,
                "| {} | {} | {:.0} | {:.0} | {:.2} | {} |",
                server.name(),
                rows.last().map_or(0, |r| r.0),
                *peak as f64 / 1024.0,
                *disk as f64 / 1e6,
                restart,
                stopped.as_deref().unwrap_or("")
            )?;
        }
        let rocks = &steps_of[1];
        if let (Some(first), Some(last)) = (rocks.first(), rocks.last()) {
            writeln!(
                report,
                "\nrocksdb, last step / first step: put throughput {:.2}x, range p99 {:.2}x.\n",
                last.1 / first.1,
                last.2 / first.2
            )?;
        }
        Ok(())
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// The resident set of a process now, in KiB.
fn rss_kb(child: &Child) -> u64 {
    status_kb(child, "VmRSS:")
}

/// The figures of a cluster's `/metrics` this file compares.
struct Metrics {
    /// Leader changes seen, summed over the members.
    leader_changes: f64,
    /// Per member: compactions finished, and their total duration in ms.
    compactions: Vec<(f64, f64)>,
}

impl Metrics {
    fn read(cluster: &Cluster) -> Result<Metrics> {
        let mut metrics = Metrics {
            leader_changes: 0.0,
            compactions: Vec::new(),
        };
        for endpoint in &cluster.endpoints {
            let text = http_get(endpoint, "/metrics")?;
            metrics.leader_changes += sample(&text, "etcd_server_leader_changes_seen_total");
            const COMPACTION: &str =
                "etcd_debugging_mvcc_db_compaction_total_duration_milliseconds";
            metrics.compactions.push((
                sample(&text, &format!("{COMPACTION}_count")),
                sample(&text, &format!("{COMPACTION}_sum")),
            ));
        }
        Ok(metrics)
    }
}

/// The sum of the samples of metric `name` in a Prometheus text exposition (0 if none).
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.chars().next()? {
                ' ' => rest,
                '{' => &rest[rest.find('}')? + 1..],
                _ => return None,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// The body of `GET path` on `endpoint` (host:port), over HTTP/1.1.
fn http_get(endpoint: &str, path: &str) -> Result<String> {
    let mut stream = std::net::TcpStream::connect(endpoint)
        .with_context(|| format!("connecting to {endpoint}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP answer from {endpoint}{path}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "GET {endpoint}{path}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_over_labels_and_other_metrics_ignored() {
        let text = "# TYPE etcd_server_leader_changes_seen_total counter\n\
etcd_server_leader_changes_seen_total 2\n\
etcd_server_leader_changes_seen_total_other 7\n\
grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\"} 10\n\
grpc_server_handled_total{grpc_code=\"Unavailable\",grpc_method=\"Put\"} 3\n";
        assert_eq!(sample(text, "etcd_server_leader_changes_seen_total"), 2.0);
        assert_eq!(sample(text, "grpc_server_handled_total"), 13.0);
        assert_eq!(sample(text, "etcd_mvcc_db_total_size_in_bytes"), 0.0);
    }
}
