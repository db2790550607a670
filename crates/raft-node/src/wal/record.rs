//! The record framing of a segment file:
//!
//! ```text
//! [u32 payload length LE][u32 CRC-32 LE of type byte and payload][u8 type][payload]
//! ```
//!
//! with a payload that is a protobuf-encoded raft `Entry`, `HardState` or `SnapshotMetadata` (a
//! snapshot marker). Owns encoding and decoding one record; it must not know about files,
//! segments or what a torn record is (see [`super::replay`]).

use super::WalError;

/// Length of a record's header: payload length, checksum, type.
pub(super) const RECORD_HEADER_LEN: usize = 9;
pub(super) const RECORD_ENTRY: u8 = 1;
pub(super) const RECORD_HARD_STATE: u8 = 2;
pub(super) const RECORD_SNAPSHOT: u8 = 3;

pub(super) fn encode_record(
    buf: &mut Vec<u8>,
    record_type: u8,
    what: &'static str,
    payload: &[u8],
) -> Result<(), WalError> {
    let len = u32::try_from(payload.len()).map_err(|_| WalError::Encode {
        what,
        reason: format!("{} bytes exceed the 4 GiB record limit", payload.len()),
    })?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[record_type]);
    hasher.update(payload);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&hasher.finalize().to_le_bytes());
    buf.push(record_type);
    buf.extend_from_slice(payload);
    Ok(())
}

pub(super) fn encode_message(
    buf: &mut Vec<u8>,
    record_type: u8,
    what: &'static str,
    msg: &dyn protobuf::Message,
) -> Result<(), WalError> {
    let payload = msg.write_to_bytes().map_err(|e| WalError::Encode {
        what,
        reason: e.to_string(),
    })?;
    encode_record(buf, record_type, what, &payload)
}

/// Why a record could not be decoded.
pub(super) enum DecodeError {
    /// The record runs past the end of the file.
    Incomplete,
    /// The checksum does not match; `end` is where the record would end.
    Checksum { end: usize },
}

/// Decodes the record at the start of `data`: (type, payload, record length).
pub(super) fn decode_record(data: &[u8]) -> Result<(u8, &[u8], usize), DecodeError> {
    if data.len() < RECORD_HEADER_LEN {
        return Err(DecodeError::Incomplete);
    }
    let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let crc = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
    let end = RECORD_HEADER_LEN
        .checked_add(len)
        .ok_or(DecodeError::Incomplete)?;
    if data.len() < end {
        return Err(DecodeError::Incomplete);
    }
    let record_type = data[8];
    let payload = &data[RECORD_HEADER_LEN..end];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[record_type]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Err(DecodeError::Checksum { end });
    }
    Ok((record_type, payload, end))
}
