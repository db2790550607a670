//! etcd's backend commit metric and its counts of the operations the store serves, recorded
//! through the `metrics` facade (the binary installs the exporter; without one they cost
//! nothing). The handles are looked up once: recording is then an atomic add.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use metastore_storage::{Backend, WriteBatch};
use metrics::{counter, histogram, Counter, Histogram};

/// `etcd_disk_backend_commit_duration_seconds`: how long writing one batch of applied changes to
/// the engine takes (etcd times its bbolt commit; here the engine's atomic batch write, durable
/// as the engine makes it).
static BACKEND_COMMIT_SECONDS: LazyLock<Histogram> =
    LazyLock::new(|| histogram!("etcd_disk_backend_commit_duration_seconds"));

/// Writes `batch` to `backend`, timing it.
pub(crate) fn commit(backend: &dyn Backend, batch: WriteBatch) -> metastore_storage::Result<()> {
    let started = Instant::now();
    let result = backend.write(batch);
    BACKEND_COMMIT_SECONDS.record(started.elapsed().as_secs_f64());
    result
}

/// The operations one request performed, counted as etcd's `metricsTxnWrite` counts them: the
/// ranges, puts and deletions of a txn's executed branches (nested txns included), or the one
/// operation of a plain request.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OpCounts {
    pub(crate) ranges: u64,
    pub(crate) puts: u64,
    pub(crate) deletes: u64,
}

/// `etcd_mvcc_{range,put,delete,txn}_total`.
struct OpCounters {
    ranges: Counter,
    puts: Counter,
    deletes: Counter,
    txns: Counter,
}

static OP_COUNTERS: LazyLock<OpCounters> = LazyLock::new(|| OpCounters {
    ranges: counter!("etcd_mvcc_range_total"),
    puts: counter!("etcd_mvcc_put_total"),
    deletes: counter!("etcd_mvcc_delete_total"),
    txns: counter!("etcd_mvcc_txn_total"),
});

/// Counts the operations of one request served by this member. As in etcd, a request of more
/// than one operation also counts as a txn.
pub(crate) fn record_ops(ops: OpCounts) {
    let counters = &*OP_COUNTERS;
    if ops.ranges + ops.puts + ops.deletes > 1 {
        counters.txns.increment(1);
    }
    if ops.ranges > 0 {
        counters.ranges.increment(ops.ranges);
    }
    if ops.puts > 0 {
        counters.puts.increment(ops.puts);
    }
    if ops.deletes > 0 {
        counters.deletes.increment(ops.deletes);
    }
}

/// A background compaction finished: the revisions it deleted from the `key` bucket
/// (`etcd_debugging_mvcc_db_compaction_keys_total`) and how long it took from start to end,
/// pauses included (`etcd_debugging_mvcc_db_compaction_total_duration_milliseconds`).
pub(crate) fn compaction_finished(deleted: usize, took: Duration) {
    counter!("etcd_debugging_mvcc_db_compaction_keys_total").increment(deleted as u64);
    histogram!("etcd_debugging_mvcc_db_compaction_total_duration_milliseconds")
        .record(took.as_secs_f64() * 1000.0);
}
