//! Project automation, in Rust rather than shell scripts (`cargo xtask <command>`).
//!
//! - `run [--] [ARGS…]`: check system prerequisites, build the server in release mode, check the
//!   binary's size (see `size`) and start it in the foreground, from the workspace root, with ARGS
//!   (single member, memory engine, `127.0.0.1:2379` unless ARGS say otherwise).
//! - `size`: build the server in release mode and fail if its binary is over 40 MB, so that debug
//!   info does not creep back into release builds (`bench` checks it too).
//! - `test`: check prerequisites (libclang and a C++ compiler for RocksDB, etcd + etcdctl for the
//!   differential and client tests), then run every test of the workspace.
//! - `ci`: formatting check, clippy with `-D warnings`, `cargo deny`, then `test`, then the fuzz
//!   targets built and their corpus replayed (stable).
//! - `robustness [--seed N] [--seeds K] [--duration S] [--engine memory|rocksdb|both|etcd]
//!   [--faults KIND,…]`: the robustness suite's long run (`tests/robustness`), K seeds from N
//!   (default: one random seed), S seconds of faults each (default 120), on one engine, both,
//!   or etcd itself (the control: what etcd fails is the suite's fault, not MetaStore's).
//!   Each run's output goes to `<target>/robustness/<engine>-seed-<N>.log`; the figures and the
//!   verdict of every run are printed at the end.
//! - `bench [--quick]`: MetaStore (both engines) beside etcd, 1 and 3 members, written to
//!   `bench/results/<date>.md` (see `bench.rs`) with SVG charts beside it (`bench_charts.rs`).
//! - `bench-charts REPORT.md…`: draw the charts of reports written before.
//! - `fuzz [TARGET…] [--runs N | --seconds S] [--no-sanitizer]`: the fuzz targets of `fuzz/` under cargo-fuzz and
//!   nightly, one after the other (see `fuzz.rs`); `ci` builds them on stable and replays their
//!   corpus instead.
//!
//! Prerequisites are looked for the way the build and the tests look for them (`prereq.rs`).
//! Missing Debian packages are installed when running as root on Debian/Ubuntu; otherwise xtask
//! names what is missing, prints the exact command to run and stops.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context, Result};

mod bench;
mod bench_charts;
mod bench_scale;
mod etcd35;
mod fuzz;
mod prereq;

use prereq::{ensure, CURL, CXX, ETCD, ETCDCTL, LIBCLANG, PROMTOOL};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("size") => size(),
        Some("test") => test(&args[1..]),
        Some("ci") => ci(),
        Some("bench") => bench::bench(&args[1..]),
        Some("bench-charts") => bench_charts::bench_charts(&args[1..]),
        Some("robustness") => robustness(&args[1..]),
        Some("etcd35") => etcd35::ensure(&target_dir()).map(|dir| println!("{}", dir.display())),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <run [--] [server flags…] | size | test [test filter…] | ci | bench [--quick] | bench-charts REPORT.md… | robustness [--seed N] [--seeds K] [--duration S] [--engine memory|rocksdb|both|etcd] [--faults KIND,…] | etcd35 | fuzz [target…] [--runs N | --seconds S] [--no-sanitizer]>");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The checkout xtask was started from. Read at run time (cargo run sets CARGO_MANIFEST_DIR):
/// with a shared target directory, a binary built in one checkout may be run for another.
fn workspace_root() -> PathBuf {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(manifest_dir)
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    // etcd-client (used by the tests) compiles etcd's protos with the `protoc` it finds on PATH;
    // give it the vendored one so that no system protoc is needed. Not through $PROTOC: raft-rs's
    // build script refuses any $PROTOC newer than 3.x, while it ignores an unsuitable PATH protoc
    // and uses its own.
    if let Some(dir) = vendored_protoc_dir() {
        let path = env::var_os("PATH").unwrap_or_default();
        let joined = env::join_paths(std::iter::once(dir).chain(env::split_paths(&path)));
        if let Ok(joined) = joined {
            cmd.env("PATH", joined);
        }
        cmd.env_remove("PROTOC");
    }
    cmd
}

/// A directory holding `protoc`, a link to the vendored compiler. In the target directory, so
/// that checkouts sharing one (`CARGO_TARGET_DIR`) give the build the same `PATH`: RocksDB's
/// build script runs again, for minutes, whenever `PATH` changes.
fn vendored_protoc_dir() -> Option<PathBuf> {
    let protoc = protoc_bin_vendored::protoc_bin_path().ok()?;
    // Not `target_dir()`: it runs `cargo metadata` through `cargo()`, which comes here.
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(|dir| workspace_root().join(dir))
        .unwrap_or_else(|| workspace_root().join("target"));
    let dir = target.join("xtask-bin");
    let link = dir.join("protoc");
    if std::fs::read_link(&link).ok().as_deref() != Some(protoc.as_path()) {
        std::fs::create_dir_all(&dir).ok()?;
        let _ = std::fs::remove_file(&link);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&protoc, &link).ok()?;
        #[cfg(not(unix))]
        std::fs::copy(&protoc, &link).ok()?;
    }
    Some(dir)
}

fn status(mut cmd: Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !st.success() {
        bail!("{:?} failed with {st}", cmd.get_program());
    }
    Ok(())
}

/// The largest `metastore` release binary `run`, `size` and `bench` accept. Built without debug
/// info the server is about 30 MB; RocksDB's C++ compiled with `-g` once made it 512 MB. The limit
/// leaves room to grow and catches debug info creeping back into `[profile.release]`.
const MAX_SERVER_BYTES: u64 = 40_000_000;

const MB: f64 = 1_000_000.0;

/// Builds the server in release mode; the path of the binary.
fn build_server() -> Result<PathBuf> {
    ensure(&[LIBCLANG, CXX])?;
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "--package",
        "metastore",
        "--bin",
        "metastore",
    ]);
    status(build)?;
    Ok(target_dir().join("release").join("metastore"))
}

/// Cargo's target directory, as `cargo metadata` reports it (this honours `CARGO_TARGET_DIR` and
/// `build.target-dir`); failing that `$CARGO_TARGET_DIR`, else `target/` of the workspace.
pub(crate) fn target_dir() -> PathBuf {
    let metadata = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .ok()
        .filter(|out| out.status.success());
    let dir = metadata
        .and_then(|out| json_string(&String::from_utf8_lossy(&out.stdout), "target_directory"));
    if let Some(dir) = dir {
        return PathBuf::from(dir);
    }
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The string value of the first `"field":` in `json`, unescaped.
fn json_string(json: &str, field: &str) -> Option<String> {
    let tag = format!("\"{field}\":");
    let rest = json[json.find(&tag)? + tag.len()..].trim_start();
    let mut chars = rest.strip_prefix('"')?.chars();
    let mut value = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(value),
            '\\' => value.push(match chars.next()? {
                'n' => '\n',
                't' => '\t',
                'r' => '\r',
                'b' => '\u{8}',
                'f' => '\u{c}',
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?
                }
                c => c, // \" \\ \/
            }),
            c => value.push(c),
        }
    }
}

/// Fails unless the release binary at `bin` is within [`MAX_SERVER_BYTES`].
pub(crate) fn check_release_size(bin: &Path) -> Result<()> {
    let len = std::fs::metadata(bin)
        .with_context(|| format!("reading the size of {}", bin.display()))?
        .len();
    let verdict = size_verdict(len);
    if let Ok(size) = &verdict {
        eprintln!("xtask: {}: {size}", bin.display());
    }
    verdict
        .map(drop)
        .with_context(|| format!("{} is too large", bin.display()))
}

fn size_verdict(len: u64) -> Result<String> {
    let size = format!(
        "{:.1} MB (limit {:.0} MB)",
        len as f64 / MB,
        MAX_SERVER_BYTES as f64 / MB
    );
    if len > MAX_SERVER_BYTES {
        bail!(
            "{size}: has debug info come back into [profile.release] of Cargo.toml? (The limit is MAX_SERVER_BYTES in xtask/src/main.rs.)"
        );
    }
    Ok(size)
}

/// `cargo xtask size`: builds the server in release mode and checks the size of its binary.
fn size() -> Result<()> {
    check_release_size(&build_server()?)
}

/// The server's arguments in `cargo xtask run [--] ARGS`: one leading `--`, the user's separator
/// (as the README writes it), is dropped; any further `--` goes to the server.
fn server_args(args: &[String]) -> &[String] {
    match args.split_first() {
        Some((first, rest)) if first == "--" => rest,
        _ => args,
    }
}

/// The server started by `cargo xtask run`, from the workspace root (where its default data
/// directory, `default.metastore`, then lands, ignored by git).
fn server_command(bin: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(server_args(args)).current_dir(workspace_root());
    cmd
}

fn run(args: &[String]) -> Result<()> {
    let bin = build_server()?;
    check_release_size(&bin)?;
    let cmd = server_command(&bin, args);
    eprintln!("xtask: running {cmd:?}");
    exec(cmd)
}

/// Replaces xtask with `cmd`: the server keeps the terminal in the foreground, takes Ctrl-C
/// itself, and its exit status is that of `cargo xtask run` (cargo run also replaces itself).
#[cfg(unix)]
fn exec(mut cmd: Command) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not start {:?}", cmd.get_program()))
}

#[cfg(not(unix))]
fn exec(mut cmd: Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("could not start {:?}", cmd.get_program()))?;
    std::process::exit(st.code().unwrap_or(1))
}

/// Features the tests are built with: the crash points of tests/failpoints.rs.
const TEST_FEATURES: &str = "metastore/failpoints";

/// What the tests are built with (after `nextest run` or `test`).
const TEST_ARGS: &[&str] = &["--workspace", "--features", TEST_FEATURES];

/// What `ci` runs clippy with (before `-- -D warnings`). The test profile, identical to dev here,
/// because cargo keys build-script outputs by profile name: with the build-override of the root
/// Cargo.toml, clippy and the tests share every build script's run, so a fresh machine compiles
/// RocksDB's C++ once (test `clippy_and_the_tests_share_every_build_script_run`).
const CLIPPY_ARGS: &[&str] = &[
    "--profile",
    "test",
    "--workspace",
    "--all-targets",
    "--features",
    TEST_FEATURES,
];

fn test(filter: &[String]) -> Result<()> {
    ensure(&[LIBCLANG, CXX, ETCD, ETCDCTL, PROMTOOL, CURL])?;
    let nextest = cargo()
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut cmd = cargo();
    if nextest {
        cmd.args(["nextest", "run"]);
    } else {
        cmd.arg("test");
    }
    // The crash-recovery tests need the crash points compiled in (release builds never have them).
    cmd.args(TEST_ARGS).arg("--no-fail-fast");
    cmd.args(filter);
    match etcd35::ensure(&target_dir()) {
        Ok(dir) => {
            cmd.env(etcd35::DIR_VAR, dir);
        }
        // The rest of the suite still runs; tests/etcd35.rs fails, pointing here.
        Err(e) => eprintln!(
            "xtask: warning: no etcd 3.5, so tests/etcd35.rs will fail: {e:#}\n\
             (it is downloaded from deb.debian.org into the target directory, etcd-3.5/)"
        ),
    }
    status(cmd)
}

/// What `cargo xtask robustness` was asked for.
#[derive(Debug, PartialEq)]
struct RobustnessArgs {
    first_seed: u64,
    seeds: u64,
    duration_secs: u64,
    engines: Vec<&'static str>,
    faults: Option<String>,
}

fn robustness_args(args: &[String]) -> Result<RobustnessArgs> {
    let mut parsed = RobustnessArgs {
        first_seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs()),
        seeds: 1,
        duration_secs: 120,
        engines: vec!["memory"],
        faults: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{flag} needs a value"))
                .map(String::as_str)
        };
        match flag.as_str() {
            "--seed" => parsed.first_seed = value()?.parse().context("--seed: a number")?,
            "--seeds" => parsed.seeds = value()?.parse().context("--seeds: a number")?,
            "--duration" => {
                parsed.duration_secs = value()?.parse().context("--duration: seconds")?
            }
            "--engine" => {
                parsed.engines = match value()? {
                    "memory" => vec!["memory"],
                    "rocksdb" => vec!["rocksdb"],
                    "both" => vec!["memory", "rocksdb"],
                    // etcd 3.4 itself under the same clients and faults: the suite's control
                    "etcd" => vec!["etcd"],
                    other => bail!("--engine: memory, rocksdb, both or etcd, not {other}"),
                }
            }
            "--faults" => parsed.faults = Some(value()?.to_string()),
            other => bail!("robustness: unknown argument {other}"),
        }
    }
    Ok(parsed)
}

/// `cargo xtask robustness`: the ignored `robustness::long_run` test once per engine and seed.
fn robustness(args: &[String]) -> Result<()> {
    let args = robustness_args(args)?;
    ensure(&[LIBCLANG, CXX, ETCD, ETCDCTL])?;
    let logs = target_dir().join("robustness");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut verdicts = Vec::new();
    for engine in &args.engines {
        for seed in args.first_seed..args.first_seed + args.seeds {
            let mut cmd = cargo();
            cmd.args([
                "nextest",
                "run",
                "--workspace",
                "--no-capture",
                "--run-ignored",
                "only",
                "--features",
                TEST_FEATURES,
                "-E",
                "test(=robustness::long_run)",
            ]);
            cmd.env("METASTORE_ROBUSTNESS_SEED", seed.to_string())
                .env(
                    "METASTORE_ROBUSTNESS_DURATION",
                    args.duration_secs.to_string(),
                )
                .env("METASTORE_ROBUSTNESS_ENGINE", engine);
            if let Some(faults) = &args.faults {
                cmd.env("METASTORE_ROBUSTNESS_FAULTS", faults);
            }
            eprintln!(
                "xtask: robustness {engine} seed {seed} ({} s)",
                args.duration_secs
            );
            let out = cmd
                .output()
                .with_context(|| format!("could not start {cmd:?}"))?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let log = logs.join(format!("{engine}-seed-{seed}.log"));
            std::fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
            let figures = text
                .lines()
                .find(|l| l.starts_with("robustness figures:"))
                .unwrap_or("(no figures: the run stopped before its checks)")
                .to_string();
            let verdict = if out.status.success() { "PASS" } else { "FAIL" };
            eprintln!("xtask: {verdict} {engine} seed {seed}: {figures}");
            verdicts.push((
                out.status.success(),
                format!("{verdict} {figures} [{}]", log.display()),
            ));
        }
    }
    eprintln!("xtask: robustness summary:");
    for (_, line) in &verdicts {
        eprintln!("  {line}");
    }
    let failed = verdicts.iter().filter(|(ok, _)| !ok).count();
    if failed > 0 {
        bail!("{failed} of {} robustness runs failed", verdicts.len());
    }
    Ok(())
}

fn ci() -> Result<()> {
    ensure(&[LIBCLANG, CXX, ETCD, ETCDCTL, PROMTOOL, CURL])?;
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    status(fmt)?;
    let mut fmt_fuzz = cargo();
    fmt_fuzz
        .args(["fmt", "--manifest-path"])
        .arg(workspace_root().join("fuzz").join("Cargo.toml"))
        .args(["--", "--check"]);
    status(fmt_fuzz)?;
    let mut clippy = cargo();
    clippy
        .arg("clippy")
        .args(CLIPPY_ARGS)
        .args(["--", "-D", "warnings"]);
    status(clippy)?;
    deny()?;
    test(&[])?;
    fuzz::fuzz_check()
}

/// `cargo deny` for licences, bans and sources, then advisories. The advisory database is cloned
/// from GitHub, which machines limited to package registries cannot reach: there the advisories
/// check is reported as skipped; anywhere else its findings fail the run.
fn deny() -> Result<()> {
    let installed = cargo()
        .args(["deny", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !installed {
        let mut install = cargo();
        install.args(["install", "--locked", "cargo-deny"]);
        status(install).context("installing cargo-deny")?;
    }
    let mut check = cargo();
    check.args(["deny", "check", "bans", "licenses", "sources"]);
    status(check)?;
    let out = cargo()
        .args(["deny", "check", "advisories"])
        .output()
        .context("running cargo deny check advisories")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprintln!("xtask: advisories ok");
        Ok(())
    } else if stderr.contains("failed to fetch advisory database") {
        eprintln!("xtask: advisories NOT checked: the advisory database (github.com/RustSec/advisory-db) is unreachable from this machine");
        Ok(())
    } else {
        eprintln!("{stderr}");
        bail!("cargo deny check advisories reported findings")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The build-script runs of `cargo <command> <args>`, by a digest of the unit and of
    /// everything it depends on (what decides whether cargo can reuse its output), with the
    /// package each belongs to. From cargo's unit graph, which resolves without building.
    fn build_script_runs(command: &str, args: &[&str]) -> BTreeMap<Vec<u8>, String> {
        use sha2::{Digest, Sha256};
        let out = cargo()
            // --unit-graph is unstable; this only asks cargo for its plan.
            .env("RUSTC_BOOTSTRAP", "1")
            .arg(command)
            .args(args)
            .args(["--unit-graph", "-Z", "unstable-options"])
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "cargo {command} --unit-graph: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let graph: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a unit graph");
        let units = graph["units"].as_array().expect("units");
        fn digest(
            units: &[serde_json::Value],
            i: usize,
            memo: &mut Vec<Option<Vec<u8>>>,
        ) -> Vec<u8> {
            if let Some(d) = &memo[i] {
                return d.clone();
            }
            let unit = &units[i];
            let mut deps: Vec<Vec<u8>> = unit["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .map(|d| digest(units, d["index"].as_u64().expect("index") as usize, memo))
                .collect();
            deps.sort();
            let mut hasher = Sha256::new();
            for field in ["pkg_id", "mode", "profile", "features"] {
                // serde_json's maps are sorted by key, so equal profiles print alike.
                hasher.update(unit[field].to_string());
            }
            hasher.update(unit["target"]["name"].to_string());
            for d in deps {
                hasher.update(d);
            }
            let d = hasher.finalize().to_vec();
            memo[i] = Some(d.clone());
            d
        }
        let mut memo = vec![None; units.len()];
        (0..units.len())
            .filter(|&i| units[i]["mode"] == "run-custom-build")
            .map(|i| {
                let pkg = units[i]["pkg_id"].as_str().unwrap_or_default().to_string();
                (digest(units, i, &mut memo), pkg)
            })
            .collect()
    }

    /// A cold target directory (a fresh machine's CI) compiles each build script once, not
    /// once for clippy and again for the tests: RocksDB's C++ alone takes about 10 minutes.
    #[test]
    fn clippy_and_the_tests_share_every_build_script_run() {
        let lint = build_script_runs("check", CLIPPY_ARGS);
        let tests = build_script_runs("test", &[&["--no-run"], TEST_ARGS].concat());
        assert!(tests.values().any(|pkg| pkg.contains("librocksdb-sys")));
        let twice: Vec<&String> = tests
            .iter()
            .filter(|(d, _)| !lint.contains_key(*d))
            .map(|(_, pkg)| pkg)
            .collect();
        assert!(
            twice.is_empty(),
            "build scripts the tests run again after clippy: {twice:?}"
        );
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn run_args_with_or_without_separator() {
        let flags = strings(&["--storage-engine", "rocksdb", "--data-dir", "/tmp/x"]);
        let with = strings(&["--", "--storage-engine", "rocksdb", "--data-dir", "/tmp/x"]);
        assert_eq!(server_args(&with), flags);
        assert_eq!(server_args(&flags), flags);
        assert_eq!(server_args(&[]), strings(&[]));
        assert_eq!(server_args(&strings(&["--"])), strings(&[]));
        // only the first `--` is the separator
        assert_eq!(
            server_args(&strings(&["--", "--", "x"])),
            strings(&["--", "x"])
        );
    }

    #[test]
    fn server_command_runs_the_binary_with_the_flags() {
        let bin = Path::new("/t/release/metastore");
        for args in [
            strings(&["--", "--storage-engine", "rocksdb"]),
            strings(&["--storage-engine", "rocksdb"]),
        ] {
            let cmd = server_command(bin, &args);
            assert_eq!(cmd.get_program(), bin.as_os_str());
            let got: Vec<_> = cmd.get_args().collect();
            assert_eq!(got, ["--storage-engine", "rocksdb"]);
            assert_eq!(cmd.get_current_dir(), Some(workspace_root().as_path()));
        }
    }

    #[test]
    fn robustness_arguments() {
        let parsed = robustness_args(&strings(&[
            "--seed",
            "7",
            "--seeds",
            "3",
            "--duration",
            "30",
            "--engine",
            "both",
            "--faults",
            "KillLeader",
        ]))
        .unwrap();
        assert_eq!(
            parsed,
            RobustnessArgs {
                first_seed: 7,
                seeds: 3,
                duration_secs: 30,
                engines: vec!["memory", "rocksdb"],
                faults: Some("KillLeader".into()),
            }
        );
        let defaults = robustness_args(&[]).unwrap();
        assert_eq!((defaults.seeds, defaults.duration_secs), (1, 120));
        assert_eq!(defaults.engines, vec!["memory"]);
        assert!(robustness_args(&strings(&["--engine", "bbolt"])).is_err());
        assert!(robustness_args(&strings(&["--seed"])).is_err());
        assert!(robustness_args(&strings(&["--verbose"])).is_err());
    }

    #[test]
    fn size_limit_is_40_mb() {
        assert!(size_verdict(31 * 1024 * 1024).is_ok());
        assert!(size_verdict(MAX_SERVER_BYTES).is_ok());
        let err = size_verdict(MAX_SERVER_BYTES + 1).unwrap_err().to_string();
        assert!(err.contains("limit 40 MB"), "{err}");
        assert!(size_verdict(512 * 1024 * 1024).is_err());
    }

    #[test]
    fn check_release_size_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("metastore");
        std::fs::write(&bin, b"\x7fELF").unwrap();
        assert!(check_release_size(&bin).is_ok());
        std::fs::File::create(&bin)
            .unwrap()
            .set_len(MAX_SERVER_BYTES + 1)
            .unwrap();
        let err = format!("{:#}", check_release_size(&bin).unwrap_err());
        assert!(
            err.contains("too large") && err.contains("MAX_SERVER_BYTES"),
            "{err}"
        );
        assert!(check_release_size(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn target_directory_from_cargo_metadata() {
        let json = r#"{"packages":[],"target_directory":"/srv/a \"b\"\\c\u00e9/t","version":1}"#;
        assert_eq!(
            json_string(json, "target_directory").as_deref(),
            Some("/srv/a \"b\"\\c\u{e9}/t")
        );
        assert_eq!(json_string(json, "workspace_root"), None);
        assert_eq!(
            json_string(r#"{"target_directory":"/unterminated"#, "target_directory"),
            None
        );
    }
}
