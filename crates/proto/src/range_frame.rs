//! [`RangeFrame`]: a `RangeResponse` whose key-values may be the stored encodings themselves,
//! and the KV service that answers Range with it.
//!
//! mvcc stores each revision as an encoded `mvccpb.KeyValue`. A plain range (no sorting other
//! than by key, no revision filters, values wanted) answers exactly those key-values, so their
//! stored bytes can go into the answer as they are: no decoding into a `KeyValue`, no copy of
//! its key and value, no encoding again. A large answer (Kubernetes' LIST: thousands of values
//! of kilobytes) was decoded, copied and encoded value by value.
//!
//! The bytes on the wire are those of the same `RangeResponse`: fields in field-number order
//! (header, kvs, more, count), each key-value as field 2 (tag, length, the stored encoding,
//! which prost wrote). The generated KV service is typed on `RangeResponse`; [`Kv`] is the same
//! service (`/etcdserverpb.KV/*`) generated with Range over [`RangeFrame`] (build.rs), served by
//! [`crate::range_service::KvServer`].

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::etcdserverpb::RangeResponse;
use crate::mvccpb::KeyValue;

/// `RangeResponse`'s field numbers.
const HEADER_FIELD: u32 = 1;
const KVS_FIELD: u32 = 2;
const MORE_FIELD: u32 = 3;
const COUNT_FIELD: u32 = 4;

/// A Range answer: `head`'s header, `more` and `count`, and its key-values — `head.kvs`
/// (decoded), then `encoded` (stored encodings of `mvccpb.KeyValue`, sent as they are).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RangeFrame {
    /// The answer, with any key-values that were decoded.
    pub head: RangeResponse,
    /// Encoded `mvccpb.KeyValue`s, after `head.kvs` (possibly sharing the storage engine's
    /// memory).
    pub encoded: Vec<Bytes>,
}

impl RangeFrame {
    /// How many key-values it holds.
    pub fn kv_count(&self) -> usize {
        self.head.kvs.len() + self.encoded.len()
    }

    /// The response it encodes, every key-value decoded.
    pub fn into_response(self) -> Result<RangeResponse, DecodeError> {
        let mut resp = self.head;
        for kv in &self.encoded {
            resp.kvs.push(KeyValue::decode(&kv[..])?);
        }
        Ok(resp)
    }
}

#[cfg(test)]
impl RangeFrame {
    /// `resp` as a frame whose key-values from `split` on are stored encodings.
    pub(crate) fn split(resp: &RangeResponse, split: usize) -> Self {
        RangeFrame {
            head: RangeResponse {
                kvs: resp.kvs[..split].to_vec(),
                ..resp.clone()
            },
            encoded: resp.kvs[split..]
                .iter()
                .map(|kv| kv.encode_to_vec().into())
                .collect(),
        }
    }
}

impl From<RangeResponse> for RangeFrame {
    fn from(head: RangeResponse) -> Self {
        RangeFrame {
            head,
            encoded: Vec::new(),
        }
    }
}

/// The encoding in parts, for writers that send it a piece at a time
/// ([`crate::range_service::RangeBody`]): the fields before the key-values, key-value `i`
/// (`head.kvs` first, then `encoded`), the fields after them.
impl RangeFrame {
    pub(crate) fn encode_head(&self, buf: &mut impl BufMut) {
        if let Some(header) = &self.head.header {
            encoding::message::encode(HEADER_FIELD, header, buf);
        }
    }

    pub(crate) fn kv_encoded_len(&self, i: usize) -> usize {
        match i.checked_sub(self.head.kvs.len()) {
            None => encoding::message::encoded_len(KVS_FIELD, &self.head.kvs[i]),
            Some(j) => stored_len(&self.encoded[j]),
        }
    }

    pub(crate) fn encode_kv(&self, i: usize, buf: &mut impl BufMut) {
        match i.checked_sub(self.head.kvs.len()) {
            None => encoding::message::encode(KVS_FIELD, &self.head.kvs[i], buf),
            Some(j) => {
                let kv = &self.encoded[j];
                encoding::encode_key(KVS_FIELD, WireType::LengthDelimited, buf);
                encoding::encode_varint(kv.len() as u64, buf);
                buf.put_slice(kv);
            }
        }
    }

    /// Frees key-value `i` once written (it then encodes as empty).
    pub(crate) fn release_kv(&mut self, i: usize) {
        match i.checked_sub(self.head.kvs.len()) {
            None => self.head.kvs[i] = KeyValue::default(),
            Some(j) => self.encoded[j] = Bytes::new(),
        }
    }

    pub(crate) fn encode_tail(&self, buf: &mut impl BufMut) {
        if self.head.more {
            encoding::bool::encode(MORE_FIELD, &self.head.more, buf);
        }
        if self.head.count != 0 {
            encoding::int64::encode(COUNT_FIELD, &self.head.count, buf);
        }
    }
}

/// The length of a stored encoding written as a `kvs` field.
fn stored_len(kv: &[u8]) -> usize {
    encoding::key_len(KVS_FIELD) + encoding::encoded_len_varint(kv.len() as u64) + kv.len()
}

impl Message for RangeFrame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.encode_head(buf);
        for i in 0..self.kv_count() {
            self.encode_kv(i, buf);
        }
        self.encode_tail(buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != KVS_FIELD {
            return self.head.merge_field(tag, wire_type, buf, ctx);
        }
        let mut kv = Bytes::new();
        encoding::bytes::merge(wire_type, &mut kv, buf, ctx)?;
        self.encoded.push(kv);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        let encoded: usize = self.encoded.iter().map(|kv| stored_len(kv)).sum();
        self.head.encoded_len() + encoded
    }

    fn clear(&mut self) {
        self.head.clear();
        self.encoded.clear();
    }
}

// `kv_server`: the KV service with Range answering [`RangeFrame`]s (generated by build.rs with
// tonic-build's manual builder; the same routes and types as etcd's otherwise).
include!(concat!(env!("OUT_DIR"), "/etcdserverpb.KV.rs"));

pub use k_v_server::KV as Kv;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::etcdserverpb::ResponseHeader;

    fn kv(i: u8, value: usize) -> KeyValue {
        KeyValue {
            key: vec![b'k', i],
            create_revision: 2 + i as i64,
            mod_revision: 300 + i as i64,
            version: i as i64,
            value: vec![i; value],
            lease: if i % 2 == 0 { 0 } else { 7 },
        }
    }

    pub(crate) fn responses() -> Vec<RangeResponse> {
        let header = Some(ResponseHeader {
            cluster_id: 1 << 62,
            member_id: 5,
            revision: 400,
            raft_term: 2,
        });
        vec![
            RangeResponse::default(),
            RangeResponse {
                header: header.clone(),
                count: 3,
                ..Default::default()
            },
            RangeResponse {
                header: header.clone(),
                kvs: vec![kv(1, 0)],
                more: false,
                count: 1,
            },
            RangeResponse {
                header,
                kvs: (0..50).map(|i| kv(i, 40 * i as usize)).collect(),
                more: true,
                count: 900,
            },
        ]
    }

    #[test]
    fn a_frame_of_stored_encodings_encodes_as_its_response() {
        for resp in responses() {
            for split in 0..=resp.kvs.len() {
                let frame = RangeFrame::split(&resp, split);
                assert_eq!(frame.kv_count(), resp.kvs.len());
                assert_eq!(
                    frame.encode_to_vec(),
                    resp.encode_to_vec(),
                    "split at {split}"
                );
                assert_eq!(frame.encoded_len(), resp.encoded_len());
                assert_eq!(frame.clone().into_response().unwrap(), resp);
            }
            let decoded = RangeFrame::decode(&resp.encode_to_vec()[..]).unwrap();
            assert_eq!(decoded.into_response().unwrap(), resp);
            assert_eq!(
                RangeFrame::from(resp.clone()).encode_to_vec(),
                resp.encode_to_vec()
            );
        }
    }
}
