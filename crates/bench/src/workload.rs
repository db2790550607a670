//! The closed-loop workloads `run` drives (put, range, txn-put, txn-mixed, mixed and
//! lease-keepalive): the keys and values the writers use (`KeyGen`, `make_key`) and the one
//! request each workload sends per turn (`Work::send`).

use metastore_proto::etcdserverpb::request_op::Request as Op;
use metastore_proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest};
use rand::Rng;

use crate::cli::KeyArgs;
use crate::lease::KeepAlive;
use crate::unary::UnaryConn;

/// Which keys and values a write workload uses.
#[derive(Clone)]
pub(crate) struct KeyGen {
    key_size: usize,
    value: Vec<u8>,
    key_space: u64,
    sequential: bool,
    /// Added to the request number of sequential keys.
    first: u64,
}

impl KeyGen {
    pub(crate) fn new(args: &KeyArgs) -> Self {
        KeyGen {
            key_size: args.key_size.max(1),
            value: vec![b'v'; args.val_size],
            key_space: args.key_space_size.max(1),
            sequential: args.sequential_keys,
            first: 0,
        }
    }

    /// Sequential keys start at key number `first`.
    pub(crate) fn starting_at(mut self, first: u64) -> Self {
        self.first = first;
        self
    }

    pub(crate) fn key(&self, n: u64) -> Vec<u8> {
        let k = if self.sequential {
            self.first.wrapping_add(n) % self.key_space
        } else {
            rand::rng().random_range(0..self.key_space)
        };
        make_key(k, self.key_size)
    }

    pub(crate) fn put(&self, n: u64) -> PutRequest {
        PutRequest {
            key: self.key(n),
            value: self.value.clone(),
            ..Default::default()
        }
    }
}

/// What one worker sends.
#[derive(Clone)]
pub(crate) enum Work {
    Put(KeyGen),
    Range(RangeRequest),
    TxnPut(KeyGen, usize),
    TxnMixed(KeyGen, f64),
    Mixed(KeyGen, f64, bool),
    LeaseKeepalive,
}

impl Work {
    /// Request number `n` of this workload: on `kv` for the key-value workloads, a round trip of
    /// `keepalive` for `lease-keepalive`.
    pub(crate) async fn send(
        &self,
        n: u64,
        kv: Option<&mut UnaryConn>,
        keepalive: Option<&mut KeepAlive>,
    ) -> Result<(), tonic::Status> {
        match (self, kv) {
            (Work::Put(keys), Some(kv)) => kv.put(keys.put(n)).await.map(|_| ()),
            (Work::Range(req), Some(kv)) => kv.range_summary(req.clone()).await.map(|_| ()),
            (Work::TxnPut(keys, ops), Some(kv)) => {
                // Distinct keys within one txn (etcd refuses duplicates).
                let base = if keys.sequential {
                    n * *ops as u64
                } else {
                    rand::rng().random_range(0..keys.key_space)
                };
                let success = (0..*ops as u64)
                    .map(|i| RequestOp {
                        request: Some(Op::RequestPut(PutRequest {
                            key: make_key((base + i) % keys.key_space, keys.key_size),
                            value: keys.value.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                kv.txn(TxnRequest {
                    success,
                    ..Default::default()
                })
                .await
                .map(|_| ())
            }
            (Work::TxnMixed(keys, rw_ratio), Some(kv)) => {
                let read = rand::rng().random_bool(rw_ratio / (rw_ratio + 1.0));
                let op = if read {
                    Op::RequestRange(RangeRequest {
                        key: keys.key(n),
                        ..Default::default()
                    })
                } else {
                    Op::RequestPut(keys.put(n))
                };
                let txn = TxnRequest {
                    success: vec![RequestOp { request: Some(op) }],
                    ..Default::default()
                };
                kv.txn(txn).await.map(|_| ())
            }
            (Work::Mixed(keys, read_ratio, serializable), Some(kv)) => {
                if rand::rng().random_bool(read_ratio.clamp(0.0, 1.0)) {
                    let req = RangeRequest {
                        key: keys.key(n),
                        serializable: *serializable,
                        ..Default::default()
                    };
                    kv.range_summary(req).await.map(|_| ())
                } else {
                    kv.put(keys.put(n)).await.map(|_| ())
                }
            }
            (Work::LeaseKeepalive, _) => match keepalive {
                Some(k) => k.round_trip().await,
                None => Err(tonic::Status::internal("no lease")),
            },
            (_, None) => Err(tonic::Status::internal("no connection")),
        }
    }
}

pub(crate) fn make_key(n: u64, size: usize) -> Vec<u8> {
    // etcd's benchmark writes the key number as fixed-width binary; decimal keeps keys readable.
    let digits = format!("{n:0width$}", width = size.max(1));
    digits.as_bytes()[digits.len() - size..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_requested_size() {
        assert_eq!(make_key(7, 8), b"00000007");
        assert_eq!(make_key(123_456, 3), b"456");
        assert_eq!(make_key(0, 1), b"0");
    }

    #[test]
    fn sequential_keys_go_on_from_the_first_key() {
        let args = KeyArgs {
            key_size: 4,
            val_size: 1,
            key_space_size: 100,
            sequential_keys: true,
        };
        let keys = KeyGen::new(&args).starting_at(98);
        assert_eq!(
            [keys.key(0), keys.key(1), keys.key(2)],
            [b"0098".to_vec(), b"0099".to_vec(), b"0000".to_vec()]
        );
    }
}
