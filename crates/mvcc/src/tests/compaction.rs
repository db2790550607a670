//! Background compaction: the apply returns at once, the worker deletes in bounded batches, and
//! nothing a reader sees depends on how far it got.
//!
//! The compaction worker's backend writes go through [`Gate`], which counts them and can hold
//! them one at a time or fail them (a crash between two batches), so every intermediate state is
//! reached deterministically.

use std::io::Read;
use std::time::Duration;

use metastore_storage::{ReadView, SizeInfo, StorageError, Visit, WriteOp};
use parking_lot::{Condvar, Mutex};

use super::*;

/// What one of the worker's backend batches held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchInfo {
    /// Revisions deleted from the `key` bucket (by point or range deletions).
    deletes: usize,
    /// Range deletions in it.
    ranges: usize,
    /// Every other op (only `finishedCompactRev` is expected).
    others: usize,
    /// Whether it wrote `finishedCompactRev`.
    finished_mark: bool,
}

#[derive(Default)]
struct GateState {
    /// Worker writes wait for a permit.
    held: bool,
    permits: usize,
    /// Worker writes fail (and change nothing).
    failing: bool,
    /// Worker writes that reached the engine, in order.
    batches: Vec<BatchInfo>,
}

/// A memory backend that counts the compaction worker's writes and can hold or fail them.
struct Gate {
    engine: Arc<MemBackend>,
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    fn new(engine: Arc<MemBackend>) -> Arc<Gate> {
        Arc::new(Gate {
            engine,
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
        })
    }

    fn hold(&self) {
        self.state.lock().held = true;
    }

    fn release(&self) {
        self.state.lock().held = false;
        self.changed.notify_all();
    }

    fn fail(&self) {
        self.state.lock().failing = true;
        self.changed.notify_all();
    }

    /// Let one held batch through and wait until the engine has it.
    fn step(&self) {
        let mut st = self.state.lock();
        let before = st.batches.len();
        st.permits += 1;
        self.changed.notify_all();
        while st.batches.len() == before {
            self.changed.wait(&mut st);
        }
    }

    fn batches(&self) -> Vec<BatchInfo> {
        self.state.lock().batches.clone()
    }
}

impl Backend for Gate {
    fn engine_name(&self) -> &'static str {
        "gated-memory"
    }
    fn buckets(&self) -> Vec<&'static str> {
        self.engine.buckets()
    }
    fn values_in_memory(&self) -> bool {
        self.engine.values_in_memory()
    }
    fn write(&self, batch: WriteBatch) -> metastore_storage::Result<()> {
        if std::thread::current().name() != Some("mvcc-compactor") {
            return self.engine.write(batch);
        }
        let mut st = self.state.lock();
        while st.held && st.permits == 0 && !st.failing {
            self.changed.wait(&mut st);
        }
        if st.failing {
            return Err(StorageError::Engine("simulated crash".into()));
        }
        if st.held {
            st.permits -= 1;
        }
        let mut info = BatchInfo {
            deletes: 0,
            ranges: 0,
            others: 0,
            finished_mark: false,
        };
        let view = self.engine.snapshot()?;
        for op in batch.ops() {
            match op {
                WriteOp::Delete { bucket: "key", .. } => info.deletes += 1,
                WriteOp::DeleteRange {
                    bucket: "key",
                    start,
                    end,
                } => {
                    info.deletes +=
                        view.scan("key", ScanRange::between(start, Some(end)), &mut |_, _| {
                            Visit::Continue
                        })?;
                    info.ranges += 1;
                }
                WriteOp::Put {
                    bucket: "meta",
                    key,
                    ..
                } if key.as_slice() == FINISHED_COMPACT_KEY => {
                    info.finished_mark = true;
                    info.others += 1;
                }
                _ => info.others += 1,
            }
        }
        self.engine.write(batch)?;
        st.batches.push(info);
        self.changed.notify_all();
        Ok(())
    }
    fn snapshot(&self) -> metastore_storage::Result<Arc<dyn ReadView>> {
        self.engine.snapshot()
    }
    fn size(&self) -> metastore_storage::Result<SizeInfo> {
        self.engine.size()
    }
    fn defragment(&self) -> metastore_storage::Result<()> {
        self.engine.defragment()
    }
    fn import(&self, reader: &mut dyn Read) -> metastore_storage::Result<()> {
        self.engine.import(reader)
    }
}

/// Opens the gate when dropped. Declared after the harness, it is dropped before it: a test that
/// fails while the worker is held then fails instead of hanging in the store's drop, which waits
/// for the worker.
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Small batches, no pause: many steps, quickly.
const SMALL: CompactionConfig = CompactionConfig {
    batch_limit: 16,
    sleep_interval: Duration::ZERO,
};

fn engine() -> Arc<MemBackend> {
    Arc::new(MemBackend::new(&["key", "meta", "app"]))
}

/// A harness whose worker writes go through `gate`, paced by `config`.
fn gated(gate: &Arc<Gate>, config: CompactionConfig) -> Harness {
    let h = Harness::on(gate.clone());
    h.store.set_compaction_config(config);
    h
}

/// 40 keys over 600 requests: updates, deletions and re-creations, a txn. Returns the revision
/// to compact at (about two thirds in).
fn history(h: &mut Harness) -> i64 {
    let mut compact_at = 0;
    for i in 0..600 {
        let key = format!("k{:02}", (i * 7) % 40);
        if i % 11 == 0 {
            h.del(&key, "");
        } else if i % 97 == 0 {
            h.txn(TxnRequest {
                compare: vec![],
                success: vec![op_put(&key, "txn"), op_put("other", &i.to_string())],
                failure: vec![],
            })
            .unwrap();
        } else {
            h.put(&key, &i.to_string());
        }
        if i == 400 {
            compact_at = h.store.current_revision();
        }
    }
    compact_at
}

/// After the compaction point: more writes, ending with every key deleted, so that HashKV at the
/// current revision keeps nothing (etcd then filters nothing: the case where a half-done
/// compaction would show).
fn tail(h: &mut Harness) {
    for i in 0..30 {
        h.put(&format!("k{:02}", i % 40), "tail");
    }
    h.del("\0", "\0");
}

/// Everything a reader can ask at or above `from`: ranges at every revision, the history as
/// events, HashKV at every revision above `from` and at 0.
fn observe(store: &Store, from: i64) -> Vec<String> {
    let current = store.current_revision();
    let mut seen = Vec::new();
    for rev in from..=current {
        let all = RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision: rev,
            ..Default::default()
        };
        seen.push(format!("{rev}: {:?}", store.range(&all).unwrap()));
        let count = RangeRequest {
            count_only: true,
            ..all
        };
        seen.push(format!("{rev}: {:?}", store.range(&count).unwrap().count));
        if rev > from {
            seen.push(format!("{rev}: {:?}", store.hash_kv(rev).unwrap()));
        }
    }
    seen.push(format!("{:?}", store.history(from, current, 0).unwrap()));
    seen.push(format!("{:?}", store.hash_kv(0).unwrap()));
    seen
}

fn meta(h: &Harness, name: &[u8]) -> Option<i64> {
    let view = h.backend.snapshot().unwrap();
    view.get("meta", name)
        .unwrap()
        .map(|v| Revision::from_key(&v).unwrap().0.main)
}

/// A [`gated`] harness with [`SMALL`] batches holding the [`history`] (then the [`tail`] if
/// `with_tail`), and the revision to compact at. Bound as `let (gate, mut h, _open, c) = …`,
/// the opener is dropped before the harness, as [`OpenOnDrop`] needs.
fn gated_history(with_tail: bool) -> (Arc<Gate>, Harness, OpenOnDrop, i64) {
    let gate = Gate::new(engine());
    let mut h = gated(&gate, SMALL);
    let open = OpenOnDrop(gate.clone());
    let c = history(&mut h);
    if with_tail {
        tail(&mut h);
    }
    (gate, h, open, c)
}

/// Holds the gate, then schedules a compaction at `c`: the worker waits for `gate.step()`.
fn schedule_held(gate: &Gate, h: &mut Harness, c: i64) -> Applied {
    gate.hold();
    h.schedule_compaction(c).unwrap()
}

/// What a store that compacts the same history synchronously (one big batch) keeps.
fn reference(compact_at: &[i64], with_tail: bool) -> Harness {
    let mut h = Harness::new();
    let c = history(&mut h);
    assert_eq!(c, compact_at[0]);
    if with_tail {
        tail(&mut h);
    }
    for &rev in compact_at {
        h.compact(rev).unwrap();
    }
    h
}

#[test]
fn applying_a_compaction_returns_before_the_history_is_deleted() {
    let (gate, mut h, _open, c) = gated_history(true);
    let stored_before = h.stored_revisions();

    let applied = schedule_held(&gate, &mut h, c);
    assert_eq!(applied.revision, h.store.current_revision());
    // Scheduled durably, in force for readers, nothing deleted yet.
    assert_eq!(h.store.compact_revision(), c);
    assert_eq!(h.store.finished_compact_revision(), -1);
    assert_eq!(meta(&h, SCHEDULED_COMPACT_KEY), Some(c));
    assert_eq!(meta(&h, FINISHED_COMPACT_KEY), None);
    assert_eq!(h.stored_revisions(), stored_before);
    assert!(gate.batches().is_empty());
    let err = h.get_at("k01", c - 1).unwrap_err();
    assert_eq!(
        err.etcd_message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert!(matches!(h.compact(c), Err(MvccError::Compacted)));
    assert!(matches!(
        h.store.history(c - 1, c, 0),
        Err(MvccError::Compacted)
    ));
    // The apply thread goes on while the worker is held.
    let rev = h.put("after", "compaction").revision;
    assert_eq!(h.get("after").unwrap().mod_revision, rev);

    gate.release();
    assert!(h.store.wait_compaction(c).unwrap());
    assert_eq!(h.store.finished_compact_revision(), c);
    assert_eq!(meta(&h, FINISHED_COMPACT_KEY), Some(c));
    let mut expected = reference(&[c], true);
    expected.put("after", "compaction");
    assert_eq!(h.stored_revisions(), expected.stored_revisions());
    assert!(h.stored_revisions().len() < stored_before.len());
}

#[test]
fn the_worker_deletes_in_bounded_batches_and_marks_the_last() {
    let (gate, mut h, _open, c) = gated_history(false);
    let visited = h.stored_revisions().iter().filter(|r| r.0 <= c).count();
    let before = h.stored_revisions().len();
    h.compact(c).unwrap();
    let deleted = before - h.stored_revisions().len();

    let batches = gate.batches();
    // One batch per `batch_limit` revisions walked, the last one short (maybe empty).
    assert_eq!(batches.len(), visited / SMALL.batch_limit + 1);
    assert!(batches.iter().all(|b| b.deletes <= SMALL.batch_limit));
    assert_eq!(batches.iter().map(|b| b.deletes).sum::<usize>(), deleted);
    let (last, earlier) = batches.split_last().unwrap();
    assert!(last.finished_mark && last.others == 1);
    assert!(earlier.iter().all(|b| !b.finished_mark && b.others == 0));
    assert!(deleted > 10 * SMALL.batch_limit, "a history worth batching");
    // Runs of superseded revisions go as range deletions: far fewer ops than revisions.
    let ranges: usize = batches.iter().map(|b| b.ranges).sum();
    assert!(
        ranges > 0 && ranges * 4 < deleted,
        "{ranges} ranges for {deleted} revisions"
    );
}

#[test]
fn readers_see_the_same_answers_at_every_step_of_a_compaction() {
    let (gate, mut h, _open, c) = gated_history(true);
    let hash_before = h.store.hash_kv(c).unwrap();
    schedule_held(&gate, &mut h, c);

    let during = observe(&h.store, c);
    let mut steps = 0;
    while h.store.finished_compact_revision() < c {
        gate.step();
        steps += 1;
        assert_eq!(observe(&h.store, c), during, "after batch {steps}");
    }
    assert!(steps > 10, "{steps} batches");
    gate.release();

    // Finished: the same answers, the same as a store that compacted in one go, and the hash at
    // the compact revision is the one before compacting.
    assert_eq!(observe(&h.store, c), during);
    let expected = reference(&[c], true);
    assert_eq!(observe(&expected.store, c), during);
    assert_eq!(h.store.hash_kv(c).unwrap().hash, hash_before.hash);
    assert_eq!(
        h.store.hash_kv(c).unwrap(),
        expected.store.hash_kv(c).unwrap()
    );
}

#[test]
fn hash_kv_at_the_compact_revision_waits_for_the_running_compaction() {
    let (gate, mut h, _open, c) = gated_history(false);
    let before = h.store.hash_kv(c).unwrap();
    schedule_held(&gate, &mut h, c);
    for _ in 0..3 {
        gate.step();
    }
    let Harness { backend, store, .. } = h;
    let store = Arc::new(store);
    let _open_first = OpenOnDrop(gate.clone());
    let (started, asking) = std::sync::mpsc::channel();
    let asked = {
        let store = store.clone();
        let started = started.clone();
        std::thread::spawn(move || {
            started.send(()).unwrap();
            store.hash_kv(c).unwrap()
        })
    };
    let waited = {
        let store = store.clone();
        std::thread::spawn(move || {
            started.send(()).unwrap();
            let finished = store.wait_compaction(c).unwrap();
            (finished, store.finished_compact_revision())
        })
    };
    asking.recv().unwrap();
    asking.recv().unwrap();
    // Neither may answer before the job is done; the job cannot finish before its last batch.
    while !gate.batches().last().is_some_and(|b| b.finished_mark) {
        let answered = asked.is_finished() || waited.is_finished();
        assert!(!answered || store.finished_compact_revision() == c);
        gate.step();
    }
    assert_eq!(asked.join().unwrap(), before);
    assert_eq!(waited.join().unwrap(), (true, c));
    // Asked fresh instead (what a store that restarted mid-compaction answers), the value differs:
    // the waiting is what makes the answer the same on every member.
    let fresh = Harness::on(backend);
    assert!(fresh.store.wait_compaction(c).is_ok());
    assert_ne!(fresh.store.hash_kv(c).unwrap().hash, before.hash);
}

#[test]
fn a_second_compaction_queues_behind_the_first() {
    let (gate, mut h, _open, c1) = gated_history(true);
    let c2 = h.store.current_revision() - 3;
    schedule_held(&gate, &mut h, c1);
    gate.step();
    h.schedule_compaction(c2).unwrap();
    assert_eq!(h.store.compact_revision(), c2);
    assert!(matches!(h.get_at("k01", c2 - 1), Err(MvccError::Compacted)));
    assert_eq!(meta(&h, SCHEDULED_COMPACT_KEY), Some(c2));
    gate.release();
    assert!(h.store.wait_compaction(c2).unwrap());
    // The first finished first, then the second: each wrote its mark in its last batch.
    let marks: Vec<_> = gate
        .batches()
        .iter()
        .enumerate()
        .filter(|(_, b)| b.finished_mark)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(marks.len(), 2);
    assert_eq!(meta(&h, FINISHED_COMPACT_KEY), Some(c2));

    // Each kept the hash a store compacting one at a time computes.
    let expected = reference(&[c1, c2], true);
    assert_eq!(h.stored_revisions(), expected.stored_revisions());
    for rev in [c1, c2] {
        assert_eq!(
            h.store.hash_kv(rev).unwrap(),
            expected.store.hash_kv(rev).unwrap(),
            "rev {rev}"
        );
    }
}

#[test]
fn a_restart_mid_compaction_resumes_and_finishes() {
    let expected = {
        let mut h = Harness::new();
        let c = history(&mut h);
        h.compact(c).unwrap();
        h.stored_revisions()
    };
    for crash_after in [0, 1, 7] {
        let engine = engine();
        let gate = Gate::new(engine.clone());
        let mut h = gated(&gate, SMALL);
        let _open = OpenOnDrop(gate.clone());
        let c = history(&mut h);
        let answers = observe(&h.store, c);
        schedule_held(&gate, &mut h, c);
        for _ in 0..crash_after {
            gate.step();
        }
        gate.fail();
        assert!(h.store.wait_compaction(c).is_err());
        assert_eq!(gate.batches().len(), crash_after);
        drop(h);

        // Open the same data again, as a restart does: the compaction resumes and finishes.
        let gate = Gate::new(engine);
        let reopened = Harness::on(gate.clone());
        assert_eq!(reopened.store.compact_revision(), c);
        assert!(matches!(
            reopened.get_at("k01", c - 1),
            Err(MvccError::Compacted)
        ));
        assert!(
            reopened.store.wait_compaction(c).unwrap(),
            "after {crash_after}"
        );
        assert_eq!(meta(&reopened, FINISHED_COMPACT_KEY), Some(c));
        assert_eq!(reopened.stored_revisions(), expected);
        // The reopened store answers as the one before the restart did, except HashKV, whose
        // compact revision changed with the compaction.
        let strip = |v: Vec<String>| -> Vec<String> {
            v.into_iter().filter(|s| !s.contains("HashKv")).collect()
        };
        assert_eq!(strip(observe(&reopened.store, c)), strip(answers));
    }
}

#[test]
fn a_snapshot_taken_mid_compaction_restores_and_resumes() {
    let (gate, mut h, _open, c) = gated_history(true);
    schedule_held(&gate, &mut h, c);
    for _ in 0..5 {
        gate.step();
    }
    let mut stream = Vec::new();
    let view = h.backend.snapshot().unwrap();
    metastore_storage::export_snapshot(&*view, &["key", "meta", "app"], &mut stream).unwrap();
    drop(view);
    gate.release();
    assert!(h.store.wait_compaction(c).unwrap());

    let restored_engine = engine();
    restored_engine.import(&mut stream.as_slice()).unwrap();
    let restored = Harness::on(restored_engine);
    assert_eq!(restored.store.compact_revision(), c);
    assert_eq!(observe(&restored.store, c), observe(&h.store, c));
    assert!(restored.store.wait_compaction(c).unwrap());
    assert_eq!(restored.stored_revisions(), h.stored_revisions());
    assert_eq!(
        restored.store.hash_kv(0).unwrap(),
        h.store.hash_kv(0).unwrap()
    );
}

#[test]
fn a_dropped_store_stops_its_worker_and_waiters() {
    let (gate, mut h, _open, c) = gated_history(false);
    assert!(!h.store.wait_compaction(c).unwrap(), "nothing scheduled");
    h.store.pause_compaction(true);
    h.schedule_compaction(c).unwrap();
    let store = Arc::new(h.store);
    let waiter = {
        let store = store.clone();
        std::thread::spawn(move || store.wait_compaction(c).unwrap())
    };
    store.stop_compaction();
    assert!(!waiter.join().unwrap());
    assert!(gate.batches().is_empty());
    assert_eq!(store.finished_compact_revision(), -1);
    // Applied after the stop: scheduled durably, left to the next open.
    let next = store.current_revision();
    store
        .apply_write(
            WriteRequest::Compact(CompactionRequest {
                revision: next,
                physical: false,
            }),
            &leases,
            10_000,
            WriteBatch::new(),
        )
        .unwrap();
    assert!(!store.wait_compaction(next).unwrap());
    drop(store);
    let reopened = Harness::on(h.backend.clone());
    assert!(reopened.store.wait_compaction(next).unwrap());
}

/// The scenario on the memory engine: 1M revisions over 10,000 keys, compacted at 900k
/// while puts and reads go on. Prints timings, asserts nothing about them. Run with
/// `cargo test --release -p metastore-mvcc measure_ -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_compaction_of_a_million_revisions() {
    use std::time::Instant;
    let mut h = Harness::new();
    let value = "v".repeat(100);
    let started = Instant::now();
    for i in 0..1_000_000 {
        h.put(&format!("/registry/pods/{:05}", i % 10_000), &value);
    }
    eprintln!("history: {:?}", started.elapsed());
    let c = 900_000;
    let t = Instant::now();
    h.schedule_compaction(c).unwrap();
    let apply = t.elapsed();

    let store = Arc::new(h.store);
    let reader = {
        let store = store.clone();
        std::thread::spawn(move || {
            let (mut n, mut worst) = (0u64, Duration::ZERO);
            while store.finished_compact_revision() < c {
                let t = Instant::now();
                store
                    .range(&RangeRequest {
                        key: format!("/registry/pods/{:05}", n % 10_000).into_bytes(),
                        ..Default::default()
                    })
                    .unwrap();
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (n, worst)
        })
    };
    // Puts pod `n % 10_000` at raft index `index`.
    let put_pod = |n: u64, index: u64| {
        let pod = put_req(&format!("/registry/pods/{:05}", n % 10_000), &value);
        store
            .apply_write(WriteRequest::Put(pod), &leases, index, WriteBatch::new())
            .unwrap();
    };
    let (mut puts, mut worst) = (0u64, Duration::ZERO);
    let mut index = h.applied_index;
    while store.finished_compact_revision() < c {
        index += 1;
        let t = Instant::now();
        put_pod(puts, index);
        worst = worst.max(t.elapsed());
        puts += 1;
    }
    let job = t.elapsed();
    let (reads, worst_read) = reader.join().unwrap();
    eprintln!(
        "apply of Compact: {apply:?}; background job: {job:?}; during it {puts} puts \
         (slowest {worst:?}), {reads} reads (slowest {worst_read:?})"
    );
    // The same loop without a compaction running, for comparison.
    let (mut base, mut worst) = (0u64, Duration::ZERO);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        index += 1;
        let p = Instant::now();
        put_pod(base, index);
        worst = worst.max(p.elapsed());
        base += 1;
    }
    eprintln!("no compaction, 3 s: {base} puts (slowest {worst:?})");
    let t = Instant::now();
    let hash = store.hash_kv(c).unwrap();
    eprintln!(
        "HashKV at the compact revision (stored): {:?} {hash:?}",
        t.elapsed()
    );
}
