//! Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature, off in every build of
//! the server): the WAL's record framing and replay, opening a WAL directory, and a raft node
//! over an in-memory log ([`RaftHarness`]) that takes peer messages and membership changes the
//! way the raft loop does. Not an API: nothing else may use it.

use std::path::Path;

pub use crate::node::fuzz_hooks::RaftHarness;
pub use crate::wal::fuzz_hooks::WalSummary;
use crate::WalError;

/// The WAL's record types (entry, hard state, snapshot marker).
pub const WAL_RECORD_TYPES: [u8; 3] = crate::wal::fuzz_hooks::RECORD_TYPES;

/// A WAL record of `record_type` carrying `payload`, with its length and checksum.
pub fn wal_frame(record_type: u8, payload: &[u8]) -> Vec<u8> {
    crate::wal::fuzz_hooks::frame(record_type, payload)
}

/// Replays one segment's bytes as opening the WAL does (`is_last`: the segment written to,
/// whose torn tail is cut off rather than refused).
pub fn wal_replay(data: &[u8], is_last: bool) -> Result<WalSummary, String> {
    crate::wal::fuzz_hooks::replay(data, is_last)
}

/// Opens the WAL in `dir` as a starting member does.
pub fn wal_open(dir: &Path) -> Result<WalSummary, WalError> {
    crate::wal::fuzz_hooks::open(dir)
}
