//! Measuring and reporting: the latency histograms clients record into (`Latencies`) and the
//! summary printed at the end of a run, as text like etcd's benchmark or as one JSON object.

use anyhow::Result;
use hdrhistogram::Histogram;

use crate::cli::Global;

/// Longest latency a histogram holds, in microseconds; longer ones count as this.
const MAX_LATENCY_MICROS: u64 = 60_000_000;

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3).expect("valid histogram bounds")
}

/// Latencies recorded by many clients into a few shared histograms. One histogram of this range
/// and precision is about 200 KiB: one per client made 1000 clients allocate 200 MiB at start,
/// and the kernel's work supplying it, on the cores the servers share, delayed the first
/// requests of a run by up to 300 ms and set the p99 of short runs.
pub(crate) struct Latencies(Vec<parking_lot::Mutex<Histogram<u64>>>);

impl Latencies {
    /// Enough shards that runtime threads recording at once rarely meet on a lock.
    pub(crate) fn new() -> Latencies {
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get() * 4);
        Latencies(
            (0..shards)
                .map(|_| parking_lot::Mutex::new(latency_histogram()))
                .collect(),
        )
    }

    pub(crate) fn record(&self, client: usize, micros: u64) {
        let _ = self.0[client % self.0.len()]
            .lock()
            .record(micros.clamp(1, MAX_LATENCY_MICROS));
    }

    pub(crate) fn merged(&self) -> Result<Histogram<u64>> {
        let mut all = latency_histogram();
        for shard in &self.0 {
            all.add(&*shard.lock())?;
        }
        Ok(all)
    }
}

/// The percentiles `--json` lists in `percentiles_ms` (0: the fastest, 100: the slowest), each
/// with its quantile written out (99.9 / 100 is not 0.999 in floating point, and the histogram
/// would answer the next bucket): enough points for a latency CDF (`cargo xtask bench` plots the
/// one of put at 100 clients), denser in the tail.
pub(crate) const PERCENTILES: [(f64, f64); 17] = [
    (0.0, 0.0),
    (1.0, 0.01),
    (5.0, 0.05),
    (10.0, 0.1),
    (20.0, 0.2),
    (30.0, 0.3),
    (40.0, 0.4),
    (50.0, 0.5),
    (60.0, 0.6),
    (70.0, 0.7),
    (80.0, 0.8),
    (90.0, 0.9),
    (95.0, 0.95),
    (99.0, 0.99),
    (99.5, 0.995),
    (99.9, 0.999),
    (100.0, 1.0),
];

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// The one-line JSON summary of `--json`.
fn json_summary(
    global: &Global,
    h: &Histogram<u64>,
    errors: u64,
    elapsed: f64,
    rps: f64,
    extra: &[(&str, f64)],
) -> String {
    let percentiles: Vec<String> = PERCENTILES
        .iter()
        .map(|(percent, q)| format!("[{percent},{:.3}]", ms(h.value_at_quantile(*q))))
        .collect();
    let extra: String = extra
        .iter()
        .map(|(name, value)| format!(",\"{name}\":{value:.3}"))
        .collect();
    format!(
        "{{\"requests\":{},\"errors\":{errors},\"seconds\":{elapsed:.3},\"requests_per_sec\":{rps:.1},\
\"avg_ms\":{:.3},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3},\
\"percentiles_ms\":[{}],\"clients\":{},\"conns\":{}{extra}}}",
        h.len(),
        h.mean() / 1000.0,
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        percentiles.join(","),
        global.clients,
        global.conns,
    )
}

/// The summary of a run; `extra` are figures particular to the workload (name, value), added
/// to the JSON object and printed after the latencies.
pub(crate) fn report(
    global: &Global,
    h: &Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    elapsed: f64,
    extra: &[(&str, f64)],
) {
    let ok = h.len();
    let rps = if elapsed > 0.0 {
        ok as f64 / elapsed
    } else {
        0.0
    };
    if global.json {
        println!("{}", json_summary(global, h, errors, elapsed, rps, extra));
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
    for (name, value) in extra {
        println!("  {name}: {value:.3}");
    }
    if let Some(e) = first_error {
        println!("\nFirst error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn json_summary_lists_the_percentiles_of_the_recorded_latencies() {
        let cli = crate::cli::Cli::try_parse_from(["metastore-bench", "--json", "put"]).unwrap();
        let mut h = latency_histogram();
        // 1 ms to 1000 ms, one request each.
        for ms in 1..=1000u64 {
            h.record(ms * 1000).unwrap();
        }
        let line = json_summary(&cli.global, &h, 0, 2.0, 50.0, &[("compact_ms", 12.5)]);
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["requests"], 1000);
        assert_eq!(json["compact_ms"], 12.5);
        let points = json["percentiles_ms"].as_array().unwrap();
        assert_eq!(points.len(), PERCENTILES.len());
        let at = |percent: f64| {
            let point = points
                .iter()
                .find(|p| p[0].as_f64() == Some(percent))
                .unwrap_or_else(|| panic!("no {percent} in {line}"));
            point[1].as_f64().unwrap()
        };
        // The same figures as the named fields.
        for (percent, field) in [(50.0, "p50_ms"), (99.0, "p99_ms"), (99.9, "p999_ms")] {
            assert_eq!(Some(at(percent)), json[field].as_f64(), "{line}");
        }
        // The histogram keeps 3 significant digits.
        let expected = [(0.0, 1.0), (50.0, 500.0), (99.9, 999.0), (100.0, 1000.0)];
        for (percent, want_ms) in expected {
            let got = at(percent);
            assert!(
                (got - want_ms).abs() <= want_ms * 0.001,
                "p{percent}: {got} ms, not {want_ms}"
            );
        }
    }
}
