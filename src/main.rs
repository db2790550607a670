//! `metastore`: an etcd v3 compatible key-value store. Everything is in the `metastore-server`
//! library (`crates/server`); this binary picks the allocator and calls it.

/// glibc's allocator spent 15–20% of a loaded leader's CPU in malloc/free; mimalloc's
/// thread-local free lists suit the many small, short-lived allocations of the request path.
/// The `system-allocator` feature keeps libc's malloc, which heap profilers (heaptrack) hook.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    metastore_server::main()
}
