//! Where the Ready loop runs: as a task of the multi-thread tokio runtime that started the node
//! (the server's), or on a thread of its own when there is no such runtime.
//!
//! **Why a task.** Every request the loop serves arrives from a task (a gRPC handler, a peer
//! stream) and every answer goes back to one (the waiting handler, the peer sender). A loop on a
//! thread of its own pays a thread wake-up at each of those handoffs, 20–35 µs each on the
//! machines measured; six of them sit on the path of a linearizable read on 3 members (issue
//! 24's profile). Handoffs between tasks of one runtime cost 7–11 µs, as a woken task usually
//! runs on the worker that woke it.
//!
//! **What it must not do on a worker.** A runtime worker that blocks stops every task queued on
//! it. The loop therefore runs in place only what is short and touches no disk: draining
//! commands, stepping messages, heartbeats, ReadIndex rounds. A round that writes the log
//! (entries, a snapshot, an fsync) or applies entries runs through [`blocking`]
//! (`block_in_place`: the worker's queue is handed to another thread first), and so do the
//! snapshot bookkeeping and the final stop.
//!
//! The thread host keeps the earlier behaviour for callers without a multi-thread runtime
//! (tests, tools): a current-thread runtime of its own only waits for commands and ticks.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::{self, JoinHandle};

use parking_lot::{Condvar, Mutex};
use tokio::runtime::{Handle, RuntimeFlavor};

use crate::RaftError;

tokio::task_local! {
    /// Inside a Ready loop: its id. A handle dropped by the loop itself must not wait for it.
    static LOOP_ID: u64;
}

/// Ids of loops, unique in the process (several members can share one in tests).
static NEXT_LOOP_ID: AtomicU64 = AtomicU64::new(1);

/// Runs `f`, which may block (disk, long CPU work), without holding up the tasks of a runtime
/// worker: on a multi-thread runtime through `block_in_place`, elsewhere in place.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    if on_multi_thread_runtime() {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Whether the caller runs on (or inside `block_in_place` of) a multi-thread tokio runtime.
pub(super) fn on_multi_thread_runtime() -> bool {
    Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
}

/// Set once the loop has ended, whether it returned or its task was dropped (a runtime shutting
/// down drops its tasks).
#[derive(Default)]
pub(super) struct Stopped {
    done: Mutex<bool>,
    changed: Condvar,
}

impl Stopped {
    fn set(&self) {
        *self.done.lock() = true;
        self.changed.notify_all();
    }

    fn wait(&self) {
        let mut done = self.done.lock();
        while !*done {
            self.changed.wait(&mut done);
        }
    }
}

/// Sets [`Stopped`] when dropped with the loop's future.
struct SetOnDrop(Arc<Stopped>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.set();
    }
}

/// A running loop: its id, whether it ended, and its thread when it has one.
pub(super) struct Host {
    id: u64,
    stopped: Arc<Stopped>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Host {
    /// Starts `run` (the loop) on the current multi-thread runtime, or on a thread named `name`
    /// with a runtime of its own. A panic in the loop aborts the process, as a panic in etcd's
    /// raft loop takes etcd down: a member whose loop died would otherwise go on answering
    /// health checks SERVING and serving frozen serializable reads with no consensus behind
    /// them; aborted, it is restarted by its supervisor from its WAL and snapshots like after
    /// any crash. (The panic message was already printed by the panic hook.)
    pub(super) fn start<F>(name: String, member_id: u64, run: F) -> Result<Host, RaftError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let id = NEXT_LOOP_ID.fetch_add(1, Ordering::Relaxed);
        let stopped = Arc::new(Stopped::default());
        let guard = SetOnDrop(Arc::clone(&stopped));
        let run = AbortOnPanic {
            inner: Box::pin(LOOP_ID.scope(id, async move {
                let _guard = guard;
                run.await;
            })),
            member_id,
        };
        let thread = if on_multi_thread_runtime() {
            tokio::spawn(run);
            None
        } else {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| {
                    RaftError::Raft(format!("cannot build the raft loop's runtime: {e}"))
                })?;
            let handle = thread::Builder::new()
                .name(name)
                .spawn(move || runtime.block_on(run))
                .map_err(|e| RaftError::Raft(format!("cannot start the raft loop thread: {e}")))?;
            Some(handle)
        };
        Ok(Host {
            id,
            stopped,
            thread: Mutex::new(thread),
        })
    }

    /// Waits for the loop to end (it was told to). Returns at once when called from the loop
    /// itself (a handle dropped there), and when `dropping` (the last handle is being dropped)
    /// a loop that runs as a task: a runtime that is shutting down drops its tasks one by one,
    /// and a worker waiting there for the loop's task could wait for ever. Such a loop ends on
    /// its own at its next command; [`crate::RaftNode::shutdown`] is the way to wait for it.
    pub(super) fn wait(&self, dropping: bool) {
        if LOOP_ID.try_with(|id| *id == self.id).unwrap_or(false) {
            return;
        }
        if dropping && self.thread.lock().is_none() {
            return;
        }
        blocking(|| self.stopped.wait());
        let handle = self.thread.lock().take();
        if let Some(handle) = handle {
            // The loop ended (above): this returns at once; a panic aborted the process.
            let _ = handle.join();
        }
    }
}

/// Aborts the process when the loop panics (see [`Host::start`]).
struct AbortOnPanic<F> {
    inner: Pin<Box<F>>,
    member_id: u64,
}

impl<F: Future<Output = ()>> Future for AbortOnPanic<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = self.inner.as_mut();
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                tracing::error!(
                    member_id = format_args!("{:x}", self.member_id),
                    "the raft loop panicked; aborting the process"
                );
                std::process::abort();
            }
        }
    }
}
