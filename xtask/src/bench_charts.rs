//! The SVG charts of a `cargo xtask bench` report, drawn with plotters from the report's own
//! Markdown tables (so `cargo xtask bench-charts FILE.md` draws them again for any report):
//!
//! - `<stem>-throughput.svg`: requests/s of every workload row, etcd beside both engines, one
//!   panel per topology (1 member, 3 members);
//! - `<stem>-p99.svg`: the p99 latency of every row, laid out alike;
//! - `<stem>-put-latency-cdf.svg`: the latency CDF of put at 100 clients, one panel per topology,
//!   when the report has that row's latency distribution (reports from before it do not).
//!
//! Both axes of values are logarithmic: a row's three servers differ by up to 10x and rows by
//! 1000x, so a linear axis would flatten most bars.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The servers of every row, in the report's column order.
pub const SERVERS: [&str; 3] = ["etcd", "memory", "rocksdb"];

/// One colour per server (etcd, memory, rocksdb): blue, orange, green, told apart in colour-blind
/// palettes too.
const COLORS: [RGBColor; 3] = [
    RGBColor(0x33, 0x66, 0xaa),
    RGBColor(0xee, 0x77, 0x22),
    RGBColor(0x22, 0x99, 0x55),
];

/// The workload whose latency distribution the report keeps, for the CDF chart.
pub const CDF_WORKLOAD: &str = "put, 100 clients";

/// The header line of the workload tables `cargo xtask bench` writes.
pub const WORKLOAD_HEADER: &str = "| workload | etcd req/s | memory req/s | ratio | rocksdb req/s | ratio | p99 ms etcd / memory / rocksdb |";

/// The header line of the latency distribution tables.
pub const PERCENTILE_HEADER: &str = "| percentile | etcd ms | memory ms | rocksdb ms |";

/// One workload row: throughput and p99 of each server.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub label: String,
    pub per_sec: [f64; 3],
    pub p99_ms: [f64; 3],
}

/// One topology's section of a report.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// The section's title, e.g. `1 member`.
    pub title: String,
    pub rows: Vec<Row>,
    /// `(percentile, latency of each server in ms)` of [`CDF_WORKLOAD`], ascending; empty when
    /// the report has no distribution.
    pub percentiles: Vec<(f64, [f64; 3])>,
}

fn cells(line: &str) -> Vec<&str> {
    line.trim()
        .trim_start_matches('|')
        .trim_end_matches('|')
        .split('|')
        .map(str::trim)
        .collect()
}

fn number(cell: &str, line: &str) -> Result<f64> {
    cell.parse()
        .with_context(|| format!("{cell:?} is not a number in {line:?}"))
}

/// The topologies of a report: every `## ` section that holds a workload table.
pub fn parse_report(markdown: &str) -> Result<Vec<Topology>> {
    let mut topologies: Vec<Topology> = Vec::new();
    let mut title = String::new();
    // Which table the lines being read belong to.
    #[derive(PartialEq)]
    enum Table {
        None,
        Workloads,
        Percentiles,
    }
    let mut table = Table::None;
    for line in markdown.lines() {
        let line = line.trim_end();
        if let Some(heading) = line.strip_prefix("## ") {
            title = heading.trim().to_string();
            table = Table::None;
            continue;
        }
        if !line.starts_with('|') {
            table = Table::None;
            continue;
        }
        if line.starts_with("|---") {
            continue;
        }
        if line == WORKLOAD_HEADER || line == PERCENTILE_HEADER {
            if topologies.last().is_none_or(|t| t.title != title) {
                topologies.push(Topology {
                    title: title.clone(),
                    rows: Vec::new(),
                    percentiles: Vec::new(),
                });
            }
            table = if line == WORKLOAD_HEADER {
                Table::Workloads
            } else {
                Table::Percentiles
            };
            continue;
        }
        let Some(topology) = topologies.last_mut() else {
            continue;
        };
        let c = cells(line);
        match table {
            Table::None => {}
            Table::Workloads => {
                if c.len() != 7 {
                    bail!("a workload row has 7 cells: {line:?}");
                }
                let p99: Vec<&str> = c[6].split('/').map(str::trim).collect();
                if p99.len() != 3 {
                    bail!("three p99 figures expected: {line:?}");
                }
                topology.rows.push(Row {
                    label: c[0].to_string(),
                    per_sec: [
                        number(c[1], line)?,
                        number(c[2], line)?,
                        number(c[4], line)?,
                    ],
                    p99_ms: [
                        number(p99[0], line)?,
                        number(p99[1], line)?,
                        number(p99[2], line)?,
                    ],
                });
            }
            Table::Percentiles => {
                if c.len() != 4 {
                    bail!("a percentile row has 4 cells: {line:?}");
                }
                topology.percentiles.push((
                    number(c[0], line)?,
                    [
                        number(c[1], line)?,
                        number(c[2], line)?,
                        number(c[3], line)?,
                    ],
                ));
            }
        }
    }
    topologies.retain(|t| !t.rows.is_empty());
    if topologies.is_empty() {
        bail!("no workload table (a line {WORKLOAD_HEADER:?}) in the report");
    }
    Ok(topologies)
}

/// A log axis from a power of ten below the smallest value to the one at or above the largest
/// times `headroom`.
fn log_bounds(values: impl Iterator<Item = f64>, headroom: f64) -> Option<(f64, f64)> {
    let positive: Vec<f64> = values.filter(|v| v.is_finite() && *v > 0.0).collect();
    let min = positive.iter().copied().reduce(f64::min)?;
    let max = positive.iter().copied().reduce(f64::max)?;
    let mut lo = 10f64.powf(min.log10().floor());
    // A bar of the smallest figure stays visible.
    if min / lo < 1.5 {
        lo /= 10.0;
    }
    let hi = 10f64.powf((max * headroom).log10().ceil());
    Some((lo, hi.max(lo * 10.0)))
}

/// An axis figure: `1k`, `10k`, `1M` for counts, else as [`short`].
fn axis_figure(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", short(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", short(v / 1e3))
    } else {
        short(v)
    }
}

/// A figure without trailing zeros: `64487`, `10.8`, `0.35`.
fn short(v: f64) -> String {
    let text = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

const FONT: &str = "sans-serif";
const WIDTH: u32 = 1100;
/// Room left of the bars for the longest workload label.
const LABEL_AREA: u32 = 320;
/// Height of one workload row (its three bars).
const ROW_PX: u32 = 36;

/// Horizontal bars: every row of every topology, one bar per server, on a log axis.
fn bars(
    title: &str,
    axis: &str,
    topologies: &[Topology],
    value: impl Fn(&Row) -> [f64; 3],
) -> Result<String> {
    let all = topologies
        .iter()
        .flat_map(|t| t.rows.iter().flat_map(&value));
    let Some((lo, hi)) = log_bounds(all, 2.0) else {
        bail!("{title}: no positive figure to draw");
    };
    let most_rows = topologies.iter().map(|t| t.rows.len()).max().unwrap_or(0) as u32;
    let panel_height = most_rows * ROW_PX + 110;
    let height = 50 + panel_height * topologies.len() as u32;
    let mut svg = String::new();
    {
        let whole = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        whole.fill(&WHITE)?;
        let titled = whole.titled(title, (FONT, 22))?;
        let panels = titled.split_evenly((topologies.len(), 1));
        for (panel, topology) in panels.iter().zip(topologies) {
            let n = topology.rows.len() as f64;
            let mut chart = ChartBuilder::on(panel)
                .caption(&topology.title, (FONT, 18))
                .margin(10)
                .margin_right(40)
                .x_label_area_size(45)
                .y_label_area_size(LABEL_AREA)
                .build_cartesian_2d((lo..hi).log_scale(), -0.5f64..n - 0.5)?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .disable_y_axis()
                .x_desc(axis)
                .x_label_formatter(&|v| axis_figure(*v))
                .label_style((FONT, 13))
                .draw()?;
            for (s, server) in SERVERS.iter().enumerate() {
                let color = COLORS[s];
                let mut bars = Vec::new();
                for (i, row) in topology.rows.iter().enumerate() {
                    let v = value(row)[s];
                    if !(v.is_finite() && v > 0.0) {
                        continue;
                    }
                    // Row 0 at the top; within a row etcd, memory, rocksdb from top to bottom.
                    let center = n - 1.0 - i as f64;
                    let top = center + 0.375 - 0.25 * s as f64;
                    bars.push(Rectangle::new([(lo, top - 0.22), (v, top)], color.filled()));
                }
                chart
                    .draw_series(bars)?
                    .label(*server)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                    });
                for (i, row) in topology.rows.iter().enumerate() {
                    let v = value(row)[s];
                    if !(v.is_finite() && v > 0.0) {
                        continue;
                    }
                    let center = n - 1.0 - i as f64;
                    let middle = center + 0.265 - 0.25 * s as f64;
                    let (x, y) = chart.backend_coord(&(v, middle));
                    let style = TextStyle::from((FONT, 11).into_font())
                        .pos(Pos::new(HPos::Left, VPos::Center));
                    whole.draw(&Text::new(short(v), (x + 4, y), style))?;
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font((FONT, 14))
                .draw()?;
            // The workload labels, right-aligned left of their rows.
            for (i, row) in topology.rows.iter().enumerate() {
                let (x, y) = chart.backend_coord(&(lo, n - 1.0 - i as f64));
                let style = TextStyle::from((FONT, 14).into_font())
                    .pos(Pos::new(HPos::Right, VPos::Center));
                whole.draw(&Text::new(row.label.clone(), (x - 8, y), style))?;
            }
        }
        whole.present()?;
    }
    Ok(svg)
}

/// Requests/s of every row (higher is better).
pub fn throughput_svg(topologies: &[Topology]) -> Result<String> {
    bars(
        "Throughput, etcd beside MetaStore's two engines (higher is better)",
        "requests/s (log scale)",
        topologies,
        |row| row.per_sec,
    )
}

/// p99 latency of every row (lower is better).
pub fn p99_svg(topologies: &[Topology]) -> Result<String> {
    bars(
        "p99 latency, etcd beside MetaStore's two engines (lower is better)",
        "p99 latency, ms (log scale)",
        topologies,
        |row| row.p99_ms,
    )
}

/// The latency CDF of [`CDF_WORKLOAD`], one panel per topology that has its distribution; `None`
/// when none has.
pub fn cdf_svg(topologies: &[Topology]) -> Result<Option<String>> {
    let with: Vec<&Topology> = topologies
        .iter()
        .filter(|t| !t.percentiles.is_empty())
        .collect();
    let all = with
        .iter()
        .flat_map(|t| t.percentiles.iter().flat_map(|(_, ms)| *ms));
    let Some((lo, hi)) = log_bounds(all, 1.0) else {
        return Ok(None);
    };
    let mut svg = String::new();
    {
        let whole = SVGBackend::with_string(&mut svg, (WIDTH, 520)).into_drawing_area();
        whole.fill(&WHITE)?;
        let titled = whole.titled(
            &format!("Latency CDF of {CDF_WORKLOAD}: share of requests answered within a latency"),
            (FONT, 20),
        )?;
        let panels = titled.split_evenly((1, with.len()));
        for (panel, topology) in panels.iter().zip(&with) {
            let mut chart = ChartBuilder::on(panel)
                .caption(&topology.title, (FONT, 18))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(55)
                .build_cartesian_2d((lo..hi).log_scale(), 0f64..100.0)?;
            chart
                .configure_mesh()
                .x_desc("latency, ms (log scale)")
                .y_desc("requests, %")
                .x_label_formatter(&|v| short(*v))
                .y_label_formatter(&|v| format!("{v:.0}"))
                .label_style((FONT, 13))
                .draw()?;
            for (s, server) in SERVERS.iter().enumerate() {
                let color = COLORS[s];
                let points: Vec<(f64, f64)> = topology
                    .percentiles
                    .iter()
                    .map(|(percent, ms)| (ms[s], *percent))
                    .filter(|(ms, _)| ms.is_finite() && *ms > 0.0)
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                    .label(*server)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart.draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font((FONT, 14))
                .draw()?;
        }
        whole.present()?;
    }
    Ok(Some(svg))
}

/// The chart files of the report `md` (same directory, its name's stem and a suffix), and the
/// charts' titles for links.
pub fn chart_files(md: &Path) -> [(&'static str, PathBuf); 3] {
    let stem = md
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let beside = |suffix: &str| md.with_file_name(format!("{stem}-{suffix}.svg"));
    [
        ("throughput", beside("throughput")),
        ("p99 latency", beside("p99")),
        (
            "latency CDF of put at 100 clients",
            beside("put-latency-cdf"),
        ),
    ]
}

/// Draws the charts of the report `md` next to it; returns the files written (the CDF only if
/// the report has the distribution).
pub fn write_charts(md: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(md).with_context(|| format!("reading {}", md.display()))?;
    let topologies = parse_report(&text).with_context(|| format!("reading {}", md.display()))?;
    let [(_, throughput), (_, p99), (_, cdf)] = chart_files(md);
    let mut written = Vec::new();
    for (file, svg) in [
        (throughput, Some(throughput_svg(&topologies)?)),
        (p99, Some(p99_svg(&topologies)?)),
        (cdf, cdf_svg(&topologies)?),
    ] {
        if let Some(svg) = svg {
            std::fs::write(&file, svg).with_context(|| format!("writing {}", file.display()))?;
            written.push(file);
        }
    }
    Ok(written)
}

/// `cargo xtask bench-charts REPORT.md…`: draw the charts of reports written before.
pub fn bench_charts(args: &[String]) -> Result<()> {
    if args.is_empty() {
        bail!("usage: cargo xtask bench-charts bench/results/<date>.md…");
    }
    for md in args {
        for file in write_charts(Path::new(md))? {
            eprintln!("xtask bench-charts: wrote {}", file.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two topologies as `cargo xtask bench` writes them, the second without a distribution.
    const REPORT: &str = "# MetaStore vs etcd, 2026-01-01

## 1 member

| workload | etcd req/s | memory req/s | ratio | rocksdb req/s | ratio | p99 ms etcd / memory / rocksdb |
|---|---|---|---|---|---|---|
| put, 1 client | 3362 | 4608 | 1.37 | 4445 | 1.32 | 0.5 / 0.3 / 0.3 |
| put, 100 clients | 30807 | 64487 | 2.09 | 65449 | 2.12 | 10.8 / 4.0 / 4.5 |
| lease keep-alive, 100 clients | 63192 | 390086 | 6.17 | 374814 | 5.93 | 8.7 / 0.9 / 1.5 |

Latency distribution of put, 100 clients:

| percentile | etcd ms | memory ms | rocksdb ms |
|---|---|---|---|
| 0 | 0.4 | 0.2 | 0.25 |
| 50 | 3.1 | 1.4 | 1.5 |
| 99 | 10.8 | 4.0 | 4.5 |
| 100 | 31.2 | 12.9 | 15.0 |

| server | peak RSS per member (MB) | data on disk, all members (MB) |
|---|---|---|
| etcd | 307 | 284.4 |

## 3 members

| workload | etcd req/s | memory req/s | ratio | rocksdb req/s | ratio | p99 ms etcd / memory / rocksdb |
|---|---|---|---|---|---|---|
| put, 1 client | 1687 | 1949 | 1.16 | 1880 | 1.11 | 1.1 / 0.8 / 0.9 |
| put, 100 clients | 13512 | 30311 | 2.24 | 29050 | 2.15 | 22.2 / 8.5 / 9.6 |
| lease keep-alive, 100 clients | 29051 | 132813 | 4.57 | 144029 | 4.96 | 19.1 / 2.1 / 1.9 |

## One member holding 1000000 keys of 256-byte values

| server | write req/s | peak RSS after writing (MB) | data on disk (MB) | restart (s) | RSS ratio | restart ratio |
|---|---|---|---|---|---|---|
| etcd | 29133 | 498 | 823.7 | 3.62 | — | — |
";

    /// Every `<text>` of a well-formed SVG document, panicking if it is not one.
    fn texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).expect("well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.tag_name().name() == "text")
            .map(|n| n.text().unwrap_or_default().trim().to_string())
            .collect()
    }

    #[test]
    fn reads_the_tables_of_a_report() {
        let topologies = parse_report(REPORT).unwrap();
        let titles: Vec<&str> = topologies.iter().map(|t| t.title.as_str()).collect();
        assert_eq!(titles, ["1 member", "3 members"]);
        assert_eq!(
            topologies[1].rows[1],
            Row {
                label: "put, 100 clients".into(),
                per_sec: [13512.0, 30311.0, 29050.0],
                p99_ms: [22.2, 8.5, 9.6],
            }
        );
        assert_eq!(topologies[0].percentiles.len(), 4);
        assert_eq!(topologies[0].percentiles[3], (100.0, [31.2, 12.9, 15.0]));
        assert!(topologies[1].percentiles.is_empty());
        assert!(parse_report("# nothing here\n").is_err());
        let damaged = REPORT.replace("| 30807 |", "| fast |");
        assert!(parse_report(&damaged).is_err());
    }

    #[test]
    fn bar_charts_name_every_row_series_and_topology() {
        let topologies = parse_report(REPORT).unwrap();
        for (svg, figure) in [
            (throughput_svg(&topologies).unwrap(), "390086"),
            (p99_svg(&topologies).unwrap(), "22.2"),
        ] {
            let texts = texts(&svg);
            for expected in [
                "put, 1 client",
                "put, 100 clients",
                "lease keep-alive, 100 clients",
                "etcd",
                "memory",
                "rocksdb",
                "1 member",
                "3 members",
                figure,
            ] {
                assert!(
                    texts.iter().any(|t| t == expected),
                    "{expected:?} missing from {texts:?}"
                );
            }
            // 3 rows x 3 servers x 2 topologies, and the 3 legend marks of each panel.
            let bars = svg.matches("<rect").count();
            assert!(bars >= 18 + 6, "{bars} rectangles");
        }
    }

    #[test]
    fn the_cdf_draws_one_line_per_server_where_the_distribution_is() {
        let topologies = parse_report(REPORT).unwrap();
        let svg = cdf_svg(&topologies).unwrap().expect("a CDF");
        let texts = texts(&svg);
        for expected in ["etcd", "memory", "rocksdb", "1 member"] {
            assert!(texts.iter().any(|t| t == expected), "{expected:?} missing");
        }
        assert!(
            !texts.iter().any(|t| t == "3 members"),
            "3 members has no distribution"
        );
        // One polyline per server (plus the legend's lines).
        assert!(svg.matches("<polyline").count() >= 3, "{svg}");

        let without: Vec<Topology> = topologies
            .into_iter()
            .map(|t| Topology {
                percentiles: Vec::new(),
                ..t
            })
            .collect();
        assert!(cdf_svg(&without).unwrap().is_none());
    }

    #[test]
    fn writes_the_charts_beside_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("2026-01-01.md");
        std::fs::write(&md, REPORT).unwrap();
        let written = write_charts(&md).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "2026-01-01-throughput.svg",
                "2026-01-01-p99.svg",
                "2026-01-01-put-latency-cdf.svg"
            ]
        );
        for file in written {
            texts(&std::fs::read_to_string(file).unwrap());
        }
    }
}
