//! `cargo xtask fuzz [TARGET…] [--runs N | --seconds S] [--no-sanitizer]`: runs the fuzz targets
//! of `fuzz/` with cargo-fuzz (libFuzzer, AddressSanitizer) on the nightly toolchain, one target
//! after the other, each for N executions or S seconds (default: 60 seconds), with libFuzzer's
//! memory limits so that an allocation sized by untrusted input fails the run.
//! `--no-sanitizer` builds without AddressSanitizer (`-s none`): 3-7 times the executions per
//! second, for long campaigns. The code fuzzed is safe Rust; what is lost is the check of
//! `-malloc_limit_mb`, which the fuzz crate's allocator does in every build
//! (`metastore_fuzz::MAX_ALLOCATION`). Installs cargo-fuzz
//! when it is missing; the nightly toolchain must be installed (rustup names the command).
//!
//! `fuzz_check` is what CI runs instead (stable, no cargo-fuzz): the targets built as plain
//! binaries and every file of `fuzz/corpus/` replayed through the target bodies
//! (`fuzz/tests/corpus.rs`).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, status, workspace_root};

/// libFuzzer's limits: a run fails when the process's RSS passes the first, or when one
/// allocation is larger than the second.
const RSS_LIMIT_MB: u32 = 2048;
const MALLOC_LIMIT_MB: u32 = 512;

/// How long each target runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budget {
    Runs(u64),
    Seconds(u64),
}

/// What `cargo xtask fuzz` was asked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FuzzArgs {
    pub targets: Vec<String>,
    pub budget: Budget,
    /// AddressSanitizer on (the default) or off.
    pub sanitizer: bool,
}

pub(crate) fn parse_args(args: &[String]) -> Result<FuzzArgs> {
    let mut targets = Vec::new();
    let mut budget = Budget::Seconds(60);
    let mut sanitizer = true;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |flag: &str| -> Result<u64> {
            let value = it
                .next()
                .with_context(|| format!("{flag} needs a number"))?;
            value
                .parse()
                .with_context(|| format!("{flag} {value}: not a number"))
        };
        match arg.as_str() {
            "--runs" => budget = Budget::Runs(number("--runs")?),
            "--seconds" => budget = Budget::Seconds(number("--seconds")?),
            "--no-sanitizer" => sanitizer = false,
            flag if flag.starts_with('-') => bail!("unknown flag {flag}"),
            target => targets.push(target.to_string()),
        }
    }
    Ok(FuzzArgs {
        targets,
        budget,
        sanitizer,
    })
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// The targets: the files of `fuzz/fuzz_targets/`.
pub(crate) fn all_targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut targets: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(str::to_string)
        })
        .collect();
    targets.sort();
    Ok(targets)
}

/// libFuzzer's arguments for one run.
pub(crate) fn libfuzzer_args(budget: Budget) -> Vec<String> {
    let mut args = vec![
        format!("-rss_limit_mb={RSS_LIMIT_MB}"),
        format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"),
        // A single input that takes this long is reported as a hang.
        "-timeout=30".to_string(),
        "-print_final_stats=1".to_string(),
        // LeakSanitizer's scan after inputs that leave allocations behind (a state machine's
        // threads, caches) took 60% of the time; what input makes stay is bounded by the limits.
        "-detect_leaks=0".to_string(),
    ];
    args.push(match budget {
        Budget::Runs(n) => format!("-runs={n}"),
        Budget::Seconds(s) => format!("-max_total_time={s}"),
    });
    args
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = nightly_cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !installed {
        let mut install = cargo();
        install.args(["install", "--locked", "cargo-fuzz"]);
        status(install).context("installing cargo-fuzz")?;
    }
    Ok(())
}

fn ensure_nightly() -> Result<()> {
    let out = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup toolchain list (cargo-fuzz needs rustup's nightly toolchain)")?;
    if !String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        bail!("cargo-fuzz needs the nightly toolchain: rustup toolchain install nightly");
    }
    Ok(())
}

/// rustup's `cargo` (which takes `+nightly`; `$CARGO` is the stable toolchain's own binary),
/// with the environment [`cargo`] sets up, in `fuzz/`.
fn nightly_cargo() -> Command {
    let base = cargo();
    let mut cmd = Command::new("cargo");
    for (key, value) in base.get_envs() {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    cmd.env_remove("CARGO").current_dir(fuzz_dir());
    cmd
}

pub(crate) fn fuzz(args: &[String]) -> Result<()> {
    let FuzzArgs {
        targets,
        budget,
        sanitizer,
    } = parse_args(args)?;
    let known = all_targets()?;
    let targets = if targets.is_empty() {
        known.clone()
    } else {
        targets
    };
    if let Some(unknown) = targets.iter().find(|t| !known.contains(t)) {
        bail!("no fuzz target {unknown} (targets: {})", known.join(", "));
    }
    ensure_nightly()?;
    ensure_cargo_fuzz()?;
    for target in &targets {
        let mut run = nightly_cargo();
        // AddressSanitizer's leak report at exit would fail a clean run (see -detect_leaks).
        run.env("ASAN_OPTIONS", "detect_leaks=0");
        // Overflow checks and debug assertions on. No `cfg(fuzzing)`: nothing here uses it, and
        // it turns on h2's fuzz module, which the vendored h2 does not build with its lints.
        run.args([
            "+nightly",
            "fuzz",
            "run",
            "--debug-assertions",
            "--no-cfg-fuzzing",
        ]);
        if !sanitizer {
            run.args(["--sanitizer", "none"]);
        }
        run.arg(target).arg("--").args(libfuzzer_args(budget));
        // The root's rustflags (tokio_unstable for the server) are not wanted here; cargo-fuzz
        // sets its own RUSTFLAGS, which replace them anyway.
        status(run).with_context(|| format!("fuzz target {target}"))?;
    }
    Ok(())
}

/// CI's check of the fuzz targets on stable: they build, and the corpus replays through them.
pub(crate) fn fuzz_check() -> Result<()> {
    let mut test = cargo();
    test.current_dir(fuzz_dir())
        .args(["test", "--manifest-path"])
        .arg(fuzz_dir().join("Cargo.toml"));
    status(test).context("building the fuzz targets and replaying their corpus")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fuzz_arguments() {
        assert_eq!(
            parse_args(&[]).unwrap(),
            FuzzArgs {
                targets: vec![],
                budget: Budget::Seconds(60),
                sanitizer: true,
            }
        );
        assert_eq!(
            parse_args(&strings(&["wal_record", "--runs", "10000000"])).unwrap(),
            FuzzArgs {
                targets: strings(&["wal_record"]),
                budget: Budget::Runs(10_000_000),
                sanitizer: true,
            }
        );
        assert_eq!(
            parse_args(&strings(&["--seconds", "5", "a", "b"]))
                .unwrap()
                .budget,
            Budget::Seconds(5)
        );
        assert!(
            !parse_args(&strings(&["--no-sanitizer", "wal_open"]))
                .unwrap()
                .sanitizer
        );
        assert!(parse_args(&strings(&["--runs"])).is_err());
        assert!(parse_args(&strings(&["--runs", "many"])).is_err());
        assert!(parse_args(&strings(&["--jobs", "2"])).is_err());
    }

    #[test]
    fn libfuzzer_limits_and_budget() {
        let args = libfuzzer_args(Budget::Runs(7));
        assert!(args.contains(&"-rss_limit_mb=2048".to_string()));
        assert!(args.contains(&"-malloc_limit_mb=512".to_string()));
        assert_eq!(args.last().unwrap(), "-runs=7");
        assert_eq!(
            libfuzzer_args(Budget::Seconds(9)).last().unwrap(),
            "-max_total_time=9"
        );
    }

    #[test]
    fn every_target_has_a_seed_corpus() {
        let targets = all_targets().unwrap();
        assert!(targets.len() >= 8, "{targets:?}");
        for target in targets {
            let dir = fuzz_dir().join("corpus").join(&target);
            let seeds = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
                .count();
            assert!(seeds > 0, "no seeds in {}", dir.display());
        }
    }
}
