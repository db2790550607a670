//! Project automation, in Rust rather than shell scripts (`cargo xtask <command>`).
//!
//! - `run [ARGS…]`: check system prerequisites, build the server in release mode and start it
//!   (single member, memory engine, `127.0.0.1:2379` unless ARGS say otherwise).
//! - `test`: check prerequisites (libclang for RocksDB, etcd + etcdctl for differential tests),
//!   then run every test of the workspace.
//! - `ci`: formatting check, clippy with `-D warnings`, `cargo deny`, then `test`.
//! - `bench [--quick]`: MetaStore (both engines) beside etcd, 1 and 3 members, written to
//!   `bench/results/<date>.md` (see `bench.rs`).
//!
//! Missing Debian packages are installed when running as root on Debian/Ubuntu; elsewhere the exact
//! command to run is printed and xtask stops.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

mod bench;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("ci") => ci(),
        Some("bench") => bench::bench(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <run [server flags…] | test [test filter…] | ci | bench [--quick]>");
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

/// A directory holding `protoc`, a link to the vendored compiler.
fn vendored_protoc_dir() -> Option<PathBuf> {
    let protoc = protoc_bin_vendored::protoc_bin_path().ok()?;
    let dir = workspace_root().join("target").join("xtask-bin");
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

/// A system prerequisite: how to find it and which Debian package brings it.
struct Prereq {
    what: &'static str,
    package: &'static str,
    present: fn() -> bool,
}

fn libclang_present() -> bool {
    if let Ok(dir) = env::var("LIBCLANG_PATH") {
        if Path::new(&dir).exists() {
            return true;
        }
    }
    let dirs = [
        "/usr/lib",
        "/usr/lib64",
        "/usr/local/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
    ];
    let has_libclang = |dir: &Path| {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("libclang"))
            })
            .unwrap_or(false)
    };
    if dirs.iter().any(|d| has_libclang(Path::new(d))) {
        return true;
    }
    // Debian keeps it under /usr/lib/llvm-N/lib
    std::fs::read_dir("/usr/lib")
        .map(|rd| {
            rd.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("llvm-")
                    && has_libclang(&e.path().join("lib"))
            })
        })
        .unwrap_or(false)
}

fn in_path(name: &str) -> bool {
    env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|p| p.join(name).is_file()))
        .unwrap_or(false)
}

const LIBCLANG: Prereq = Prereq {
    what: "libclang (RocksDB bindings)",
    package: "libclang-dev",
    present: libclang_present,
};
const ETCD: Prereq = Prereq {
    what: "etcd (differential tests)",
    package: "etcd-server",
    present: || in_path("etcd"),
};
const ETCDCTL: Prereq = Prereq {
    what: "etcdctl (client tests)",
    package: "etcd-client",
    present: || in_path("etcdctl"),
};

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

fn ensure(prereqs: &[Prereq]) -> Result<()> {
    let missing: Vec<&Prereq> = prereqs.iter().filter(|p| !(p.present)()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|p| p.package).collect();
    let names: Vec<&str> = missing.iter().map(|p| p.what).collect();
    let command = format!("apt-get install -y {}", packages.join(" "));
    if !(is_root() && in_path("apt-get")) {
        bail!(
            "missing system prerequisites: {}.\nInstall them with:\n    sudo apt-get update && sudo {command}\n(on other systems install the equivalents: libclang, etcd 3.4+ with etcdctl), then run xtask again",
            names.join(", ")
        );
    }
    eprintln!(
        "xtask: installing missing prerequisites ({}): {command}",
        names.join(", ")
    );
    let mut update = Command::new("apt-get");
    update.arg("update").arg("-qq");
    status(update)?;
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq"])
        .args(&packages);
    status(install)?;
    if let Some(still) = prereqs.iter().find(|p| !(p.present)()) {
        bail!(
            "{} is still missing after installing {}",
            still.what,
            still.package
        );
    }
    Ok(())
}

fn run(server_args: &[String]) -> Result<()> {
    ensure(&[LIBCLANG])?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--package",
        "metastore-server",
        "--bin",
        "metastore",
        "--",
    ])
    .args(server_args);
    status(cmd)
}

fn test(filter: &[String]) -> Result<()> {
    ensure(&[LIBCLANG, ETCD, ETCDCTL])?;
    let nextest = cargo()
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut cmd = cargo();
    if nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    cmd.args(filter);
    status(cmd)
}

fn ci() -> Result<()> {
    ensure(&[LIBCLANG, ETCD, ETCDCTL])?;
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    status(fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    status(clippy)?;
    deny()?;
    test(&[])
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
