//! A snapshot import killed at any point never leaves a mix of old and new content
//! (issue 22, item 5).
//!
//! The parent test re-runs this test binary as a child that executes only [`child_importer`]:
//! it imports a snapshot with small batches and, at the chosen [`ImportStep`], optionally
//! flushes the memtables (the worst case: a RocksDB flush right after that batch), reports on
//! stdout and waits. The parent SIGKILLs it there, reopens the database, and checks every
//! bucket: exactly the old content before the import changed anything, exactly the new content
//! once it completed, and empty in between (the open found the import marker and discarded
//! the partial content, so the raft layer imports the snapshot again), never a mix. It does so
//! for every step, every batch boundary included, in both write modes.

mod common;
use common::ChildTest;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use metastore_storage::{export_snapshot, Backend, ScanRange, WriteBatch};
use metastore_storage_rocks::{ImportStep, RocksBackend, IMPORT_MARKER};

const CHILD_DIR_ENV: &str = "METASTORE_IMPORT_CHILD_DIR";
const CHILD_SNAPSHOT_ENV: &str = "METASTORE_IMPORT_CHILD_SNAPSHOT";
const CHILD_STOP_ENV: &str = "METASTORE_IMPORT_CHILD_STOP";
const CHILD_UNLOGGED_ENV: &str = "METASTORE_IMPORT_CHILD_UNLOGGED";
const CHILD_FLUSH_ENV: &str = "METASTORE_IMPORT_CHILD_FLUSH";
/// The child's line once it stands at the stop step.
const STOPPED: &str = "stopped-at-step";
/// The first bucket plays MetaStore's `meta` bucket: its key sorts first in the stream and so
/// lands in the first batch, as `meta/consistent_index` did in the defect.
const BUCKETS: &[&str] = &["alpha", "beta"];
/// Small batches, so that the snapshot below needs several.
const BATCH_BYTES: usize = 4096;
const NEW_PAIRS: usize = 120;
/// Bound on every wait for the child, and on how long a forgotten child waits to be killed.
const TIMEOUT: Duration = Duration::from_secs(60);

type Content = BTreeMap<(String, Vec<u8>), Vec<u8>>;

fn old_batch() -> WriteBatch {
    let mut b = WriteBatch::new();
    b.put("alpha", b"consistent_index".to_vec(), b"7".to_vec());
    for i in 0..40 {
        b.put(
            "beta",
            format!("old-{i:03}"),
            format!("old value {i}").repeat(4),
        );
    }
    b
}

fn new_batch() -> WriteBatch {
    let mut b = WriteBatch::new();
    b.put("alpha", b"consistent_index".to_vec(), b"900".to_vec());
    for i in 0..NEW_PAIRS {
        let bucket = if i % 3 == 0 { "alpha" } else { "beta" };
        b.put(
            bucket,
            format!("new-{i:03}"),
            format!("new value {i} ").repeat(10),
        );
    }
    b
}

fn content(be: &dyn Backend) -> Content {
    let view = be.snapshot().expect("snapshot");
    let mut out = Content::new();
    for bucket in BUCKETS {
        for (k, v) in view.collect(bucket, ScanRange::all()).expect("scan") {
            out.insert((bucket.to_string(), k), v);
        }
    }
    out
}

fn expected(batch: WriteBatch) -> Content {
    let dir = tempfile::tempdir().unwrap();
    let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
    be.write(batch).unwrap();
    content(&be)
}

/// The database the child starts from: the old content, durable.
fn prepare_old(dir: &Path) {
    let be = RocksBackend::open(dir, BUCKETS).unwrap();
    be.write(old_batch()).unwrap();
    be.sync().unwrap();
}

/// Writes the snapshot stream of the new content to `path`.
fn write_new_snapshot(path: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
    be.write(new_batch()).unwrap();
    let view = be.snapshot().unwrap();
    let mut out = File::create(path).unwrap();
    export_snapshot(&*view, BUCKETS, &mut out).unwrap();
    out.sync_all().unwrap();
}

fn step_name(step: ImportStep) -> String {
    match step {
        ImportStep::Verified => "verified".into(),
        ImportStep::MarkerWritten => "marker".into(),
        ImportStep::BatchWritten(n) => format!("batch-{n}"),
        ImportStep::Synced => "synced".into(),
        ImportStep::Done => "done".into(),
    }
}

/// Every step an import of the new snapshot passes, in order, found by running one.
fn all_steps(snapshot: &Path) -> Vec<ImportStep> {
    let dir = tempfile::tempdir().unwrap();
    prepare_old(dir.path());
    let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
    let mut steps = Vec::new();
    be.import_stepwise(
        &mut File::open(snapshot).unwrap(),
        BATCH_BYTES,
        &mut |step| steps.push(step),
    )
    .unwrap();
    assert_eq!(content(&be), expected(new_batch()));
    steps
}

/// Runs only in the child process; a no-op in an ordinary test run.
#[test]
fn child_importer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let snapshot = std::env::var_os(CHILD_SNAPSHOT_ENV).expect("child: snapshot path");
    let stop = std::env::var(CHILD_STOP_ENV).expect("child: stop step");
    let flush = std::env::var_os(CHILD_FLUSH_ENV).is_some();
    let be = RocksBackend::open(Path::new(&dir), BUCKETS)
        .expect("child: open")
        .with_sync_writes(std::env::var_os(CHILD_UNLOGGED_ENV).is_none());
    let mut reader = File::open(snapshot).expect("child: open snapshot");
    be.import_stepwise(&mut reader, BATCH_BYTES, &mut |step| {
        if step_name(step) != stop {
            return;
        }
        if flush {
            be.sync().expect("child: flush");
        }
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{STOPPED}");
        let _ = stdout.flush();
        // Wait for the parent's SIGKILL; a forgotten child gives up after the timeout.
        std::thread::sleep(TIMEOUT);
        std::process::exit(3);
    })
    .expect("child: import");
    panic!("child: the import never reached step {stop}");
}

/// Runs the child until it stands at `stop`, then SIGKILLs it.
fn run_child_and_kill(dir: &Path, snapshot: &Path, stop: &str, unlogged: bool, flush: bool) {
    let mut envs = vec![
        (CHILD_DIR_ENV, dir.as_os_str()),
        (CHILD_SNAPSHOT_ENV, snapshot.as_os_str()),
        (CHILD_STOP_ENV, std::ffi::OsStr::new(stop)),
    ];
    if unlogged {
        envs.push((CHILD_UNLOGGED_ENV, std::ffi::OsStr::new("1")));
    }
    if flush {
        envs.push((CHILD_FLUSH_ENV, std::ffi::OsStr::new("1")));
    }
    let child = ChildTest::spawn("child_importer", &envs);
    // libtest may print its own `test child_importer ... ` in front of the line.
    let deadline = std::time::Instant::now() + TIMEOUT.saturating_sub(Duration::from_secs(1));
    let mut reached = false;
    while let Ok(line) = child
        .lines
        .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        if line.contains(STOPPED) {
            reached = true;
            break;
        }
    }
    let (exited_early, status, _) = child.kill();
    assert!(
        reached && !exited_early,
        "child did not stop at step {stop} ({status}; its stderr is above)"
    );
}

/// Kills an import at every step in one write mode and checks what a reopen finds.
fn kill_at_every_step(unlogged: bool, flush: bool) {
    let files = tempfile::tempdir().unwrap();
    let snapshot = files.path().join("new.snap");
    write_new_snapshot(&snapshot);
    let steps = all_steps(&snapshot);
    let batches = steps
        .iter()
        .filter(|s| matches!(s, ImportStep::BatchWritten(_)))
        .count();
    assert!(
        batches >= 4,
        "the snapshot needs only {batches} batches: too few boundaries to test"
    );
    let (old, new) = (expected(old_batch()), expected(new_batch()));
    for step in steps {
        let dir = tempfile::tempdir().unwrap();
        prepare_old(dir.path());
        run_child_and_kill(dir.path(), &snapshot, &step_name(step), unlogged, flush);
        let be = RocksBackend::open(dir.path(), BUCKETS).expect("reopen after the crash");
        let found = content(&be);
        let what = format!("killed at {step:?} (unlogged {unlogged}, flushed {flush})");
        match step {
            ImportStep::Verified => assert!(found == old, "{what}: not the old content"),
            ImportStep::Done => assert!(found == new, "{what}: not the new content"),
            // The marker was durable: the open discarded the partial content. An applied index
            // of 0 makes the raft layer import the snapshot again.
            _ => {
                assert!(
                found.is_empty(),
                "{what}: {} pairs survived an interrupted import, {} of them from the new content",
                found.len(),
                found.iter().filter(|(k, v)| new.get(*k) == Some(*v)).count()
            )
            }
        }
        assert!(
            !dir.path().join(IMPORT_MARKER).exists(),
            "{what}: the marker is still there after the reopen"
        );
        drop(be);
        // The repaired database takes the snapshot again and then holds exactly the new content,
        // also after one more reopen.
        let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
        be.import(&mut File::open(&snapshot).unwrap())
            .expect("import again");
        drop(be);
        let be = RocksBackend::open(dir.path(), BUCKETS).unwrap();
        assert!(
            content(&be) == new,
            "{what}: the import after the repair did not give the new content"
        );
    }
}

#[test]
fn import_killed_at_every_step_logged_writes() {
    kill_at_every_step(false, false);
}

#[test]
fn import_killed_at_every_step_unlogged_writes() {
    kill_at_every_step(true, false);
}

/// The defect's case: RocksDB flushed the memtables right after the batch (the one holding the
/// consistent index, among others) and the process was then killed.
#[test]
fn import_killed_after_a_flush_at_every_step() {
    kill_at_every_step(true, true);
}
