//! The RocksDB engine passes the whole storage conformance kit.

use std::sync::Arc;

use metastore_storage::{backend_conformance, conformance::BUCKETS, Backend};
use metastore_storage_rocks::RocksBackend;

/// A backend in a fresh temporary directory; the guard removes the directory when dropped.
/// The kit drops the guard before the backend, which is harmless on Unix: RocksDB's open files
/// stay usable after their directory is removed.
fn open() -> (Arc<dyn Backend>, Box<dyn std::any::Any>) {
    let dir = tempfile::tempdir().expect("create temporary directory");
    let backend = RocksBackend::open(dir.path(), BUCKETS).expect("open RocksDB");
    (Arc::new(backend), Box::new(dir))
}

backend_conformance!(open);
