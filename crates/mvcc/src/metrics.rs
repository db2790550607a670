//! etcd's backend commit metric, recorded through the `metrics` facade (the binary installs the
//! exporter; without one it costs nothing).

use std::sync::LazyLock;
use std::time::Instant;

use metastore_storage::{Backend, WriteBatch};
use metrics::{histogram, Histogram};

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
