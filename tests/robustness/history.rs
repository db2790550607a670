//! What the clients of a robustness run recorded: every KV operation with its call and return
//! times and outcome, every lease's life, and every event each watcher received.
//!
//! Times are offsets from the start of the run on the test process's monotonic clock, so that
//! "A returned before B was called" compares two numbers.

use std::time::Duration;

/// A key or a value (the workload's keys and values are ASCII, which keeps messages readable).
pub type Bytes = Vec<u8>;

/// The precondition of a compare-and-swap (a Txn whose one compare guards one put).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// `value(key) == v`; etcd fails a value compare on a key that does not exist.
    Value(Bytes),
    /// `mod_revision(key) == r`; a missing key has mod_revision 0 (so 0 means "absent").
    ModRevision(i64),
}

/// A request of the workload. Every value written is unique in the run, which lets the checker
/// tell which request produced an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Put {
        key: Bytes,
        value: Bytes,
        lease: i64,
    },
    Delete {
        key: Bytes,
    },
    /// A linearizable Range of one key.
    Get {
        key: Bytes,
    },
    /// A linearizable Range of every key in [`prefix`, prefix end).
    Range {
        prefix: Bytes,
    },
    /// Txn: if `expect` holds, put `value`, else get `key`.
    Cas {
        key: Bytes,
        expect: Expect,
        value: Bytes,
    },
}

impl Request {
    /// The value this request writes, if it writes one.
    pub fn written_value(&self) -> Option<&Bytes> {
        match self {
            Request::Put { value, .. } | Request::Cas { value, .. } => Some(value),
            _ => None,
        }
    }
}

/// A key as a read saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub key: Bytes,
    pub value: Bytes,
    pub mod_revision: i64,
}

/// What the server answered. `revision` is always the response header's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An error or no answer in time: the request may or may not have taken effect.
    Unknown(String),
    Put {
        revision: i64,
    },
    Delete {
        revision: i64,
        deleted: i64,
    },
    /// Get and Range: the keys found, in key order.
    Read {
        revision: i64,
        kvs: Vec<Seen>,
    },
    /// `kvs` is what the else-branch's get found (empty when the put was made).
    Cas {
        revision: i64,
        succeeded: bool,
        kvs: Vec<Seen>,
    },
}

/// One operation of one client.
#[derive(Debug, Clone)]
pub struct Op {
    pub client: usize,
    pub call: Duration,
    /// When the answer came; for an unknown outcome, when the client gave up (the operation
    /// may still take effect later: the checker treats its end as infinite).
    pub ret: Duration,
    pub request: Request,
    pub outcome: Outcome,
}

impl Op {
    pub fn is_unknown(&self) -> bool {
        matches!(self.outcome, Outcome::Unknown(_))
    }
}

/// What a client saw of one lease.
#[derive(Debug, Clone, Default)]
pub struct LeaseLife {
    pub id: i64,
    /// When the grant was sent and the TTL it answered (None: no answer, the lease may exist).
    pub granted: Option<(Duration, i64)>,
    pub grant_call: Duration,
    /// Acknowledged keep-alives: when each was sent and the TTL it answered (> 0).
    pub keepalives: Vec<(Duration, i64)>,
    /// When a revoke was first sent (whatever its outcome).
    pub revoke_call: Option<Duration>,
}

/// The kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One event of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: i64,
    pub kind: EventKind,
    pub key: Bytes,
    pub value: Bytes,
    pub mod_revision: i64,
    pub lease: i64,
}

/// What one watcher received over its whole life (across reconnects).
#[derive(Debug, Clone, Default)]
pub struct WatchLog {
    pub prefix: Bytes,
    /// The start_revision of its first watch.
    pub first_revision: i64,
    /// Events with the time they were received.
    pub events: Vec<(Duration, Event)>,
    pub reconnects: usize,
    /// The revision of the end marker's put, once received (the run's last event of interest).
    pub ended_at: Option<i64>,
}
