//! Write batches survive a process crash whole or not at all.
//!
//! The parent test re-runs this test binary as a child that executes only [`child_writer`]: it
//! writes multi-key batches across two buckets in a loop and reports each acknowledged batch on
//! stdout. The parent SIGKILLs it at a random point, reopens the database and checks that every
//! batch is fully present or fully absent, and that every acknowledged batch is present.
//!
//! In unlogged mode ([`RocksBackend::with_sync_writes`] off, as MetaStore's server opens it) the
//! child acknowledges batches only once `sync` has flushed them to table files.

mod common;
use common::ChildTest;

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use metastore_storage::{Backend, ScanRange, Visit, WriteBatch};
use metastore_storage_rocks::RocksBackend;

/// Set in the child's environment to the database directory it writes to.
const CHILD_DIR_ENV: &str = "METASTORE_ROCKS_CHILD_DIR";
/// Set in the child's environment when it writes unsynced and syncs every few batches.
const CHILD_UNLOGGED_ENV: &str = "METASTORE_ROCKS_CHILD_UNLOGGED";
/// An unlogged child syncs after this many batches.
const BATCHES_PER_SYNC: u64 = 3;
/// Marks the child's progress lines, `acked <n>`, among libtest's output.
const ACK_PREFIX: &str = "acked ";
const BUCKETS: &[&str] = &["alpha", "beta"];
const KEYS_PER_BATCH: u64 = 50;
/// Pairs per batch: the keys plus the marker.
const PAIRS_PER_BATCH: usize = KEYS_PER_BATCH as usize + 1;
const ROUNDS: usize = 4;
/// Bound on every wait for the child, and on how long a forgotten child keeps writing.
const TIMEOUT: Duration = Duration::from_secs(60);

fn value_for(n: u64, i: u64) -> Vec<u8> {
    // Large enough that a batch takes a while to write, so kills land inside writes too.
    format!("batch {n} key {i} ").repeat(16).into_bytes()
}

/// Batch `n`: keys `b{n}-{i}`, even `i` in alpha and odd `i` in beta, plus a marker `m{n}` in beta.
fn batch(n: u64) -> WriteBatch {
    let mut b = WriteBatch::new();
    for i in 0..KEYS_PER_BATCH {
        let bucket = if i % 2 == 0 { "alpha" } else { "beta" };
        b.put(bucket, format!("b{n}-{i}"), value_for(n, i));
    }
    b.put("beta", format!("m{n}"), n.to_string());
    b
}

/// Which batch a stored pair belongs to, checking that it is the pair that batch wrote.
fn batch_of(bucket: &str, key: &[u8], value: &[u8]) -> u64 {
    let key = std::str::from_utf8(key).expect("keys are UTF-8");
    if let Some(n) = key.strip_prefix('m') {
        let n: u64 = n.parse().expect("marker key");
        assert_eq!(bucket, "beta", "marker {key} in the wrong bucket");
        assert_eq!(
            value,
            n.to_string().as_bytes(),
            "marker {key} has a wrong value"
        );
        return n;
    }
    let (n, i) = key
        .strip_prefix('b')
        .and_then(|rest| rest.split_once('-'))
        .expect("batch key");
    let (n, i): (u64, u64) = (
        n.parse().expect("batch number"),
        i.parse().expect("key index"),
    );
    assert_eq!(
        bucket,
        if i % 2 == 0 { "alpha" } else { "beta" },
        "{key} in the wrong bucket"
    );
    assert_eq!(value, value_for(n, i), "{key} has a wrong value");
    n
}

/// A number in `0..bound`, different on every call: jitter for the kill point, no more.
fn random_below(bound: u64) -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % bound
}

/// Runs only in the child process; a no-op in an ordinary test run.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let unlogged = std::env::var_os(CHILD_UNLOGGED_ENV).is_some();
    let be = RocksBackend::open(Path::new(&dir), BUCKETS)
        .expect("child: open")
        .with_sync_writes(!unlogged);
    let deadline = Instant::now() + TIMEOUT;
    let mut stdout = std::io::stdout().lock();
    let mut n = 0u64;
    while Instant::now() < deadline {
        be.write(batch(n)).expect("child: write");
        if unlogged {
            if !(n + 1).is_multiple_of(BATCHES_PER_SYNC) {
                n += 1;
                continue;
            }
            be.sync().expect("child: sync");
        }
        // A write error means the parent is gone: stop quietly.
        if writeln!(stdout, "{ACK_PREFIX}{n}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return;
        }
        n += 1;
    }
}

/// Runs the child until it has acknowledged `target` batches (bounded by [`TIMEOUT`]), kills
/// it, and returns the highest batch number it acknowledged.
fn run_child_and_kill(dir: &Path, target: u64, unlogged: bool) -> u64 {
    let mut envs = vec![(CHILD_DIR_ENV, dir.as_os_str())];
    if unlogged {
        envs.push((CHILD_UNLOGGED_ENV, std::ffi::OsStr::new("1")));
    }
    let child = ChildTest::spawn("child_writer", &envs);
    // libtest may print its own `test child_writer ... ` in front of the first line.
    let ack = |line: &str| -> Option<u64> {
        let at = line.find(ACK_PREFIX)?;
        line[at + ACK_PREFIX.len()..].parse().ok()
    };
    let deadline = Instant::now() + TIMEOUT;
    let mut acked = None;
    while acked.is_none_or(|n| n + 1 < target) {
        match child
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(line) => acked = ack(&line).or(acked),
            Err(_) => break,
        }
    }
    // Jitter so the kill does not always land at the same point of the next write.
    std::thread::sleep(Duration::from_micros(random_below(2000)));
    let (exited_early, status, lines) = child.kill();
    // Acknowledgements printed before the kill are still in the pipe.
    acked = lines.try_iter().filter_map(|l| ack(&l)).last().or(acked);
    assert!(
        !exited_early,
        "child exited on its own with {status} (its stderr is above)"
    );
    let acked = acked.expect("child acknowledged no batch within the timeout");
    assert!(
        acked + 1 >= target,
        "child acknowledged only {} of {target} batches in time",
        acked + 1
    );
    acked
}

#[test]
fn batches_are_all_or_nothing_after_sigkill() {
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().expect("temporary directory");
        let target = 1 + random_below(60);
        let acked = run_child_and_kill(dir.path(), target, false);
        let survivors = surviving_batches(dir.path(), round);
        // Every acknowledged batch, plus at most the one in flight at the kill.
        assert!(
            survivors == acked + 1 || survivors == acked + 2,
            "round {round}: {survivors} batches survived, {} were acknowledged",
            acked + 1
        );
    }
}

/// Unlogged writes live in the memtables only; every batch written before a `sync` survives the
/// kill, whole in both column families (a `sync` that did not flush would lose them all: the
/// memtables hold every batch of the test).
#[test]
fn unlogged_batches_survive_sigkill_once_synced() {
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().expect("temporary directory");
        let target = BATCHES_PER_SYNC * (1 + random_below(20));
        let acked = run_child_and_kill(dir.path(), target, true);
        let survivors = surviving_batches(dir.path(), round);
        assert!(
            survivors > acked,
            "round {round}: {survivors} batches survived, {} were synced",
            acked + 1
        );
    }
}

/// Reopens the database a killed child wrote, checks that every batch in it is whole and that
/// they are a prefix of the batches written, and returns how many there are.
fn surviving_batches(dir: &Path, round: usize) -> u64 {
    let be = RocksBackend::open(dir, BUCKETS).expect("reopen after the crash");
    let view = be.snapshot().unwrap();
    let mut pairs_per_batch: BTreeMap<u64, usize> = BTreeMap::new();
    for bucket in BUCKETS {
        view.scan(bucket, ScanRange::all(), &mut |k, v| {
            *pairs_per_batch.entry(batch_of(bucket, k, v)).or_default() += 1;
            Visit::Continue
        })
        .unwrap();
    }
    for (n, pairs) in &pairs_per_batch {
        assert_eq!(
            *pairs, PAIRS_PER_BATCH,
            "round {round}: batch {n} is partially present"
        );
    }
    // Batches were written one after another, so the survivors are a prefix.
    let present: Vec<u64> = pairs_per_batch.keys().copied().collect();
    let expected_prefix: Vec<u64> = (0..present.len() as u64).collect();
    assert_eq!(
        present, expected_prefix,
        "round {round}: surviving batches are not a prefix"
    );
    present.len() as u64
}
