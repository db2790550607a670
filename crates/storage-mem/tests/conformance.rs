//! The memory engine passes the whole storage conformance kit.

use std::sync::Arc;

use metastore_storage::{backend_conformance, conformance::BUCKETS, Backend};
use metastore_storage_mem::MemBackend;

fn open() -> (Arc<dyn Backend>, Box<dyn std::any::Any>) {
    (Arc::new(MemBackend::new(BUCKETS)), Box::new(()))
}

backend_conformance!(open);
