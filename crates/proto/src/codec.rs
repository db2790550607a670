//! The gRPC codec of every generated service and client: tonic-prost's, except that a message
//! is encoded into a buffer reserved at its exact encoded size.
//!
//! tonic's buffer starts at 8 KiB and grows by doubling while prost writes into it, so a large
//! message (a Range answer of 5,000 values of 2 KiB is 10 MiB) was copied about once more in
//! reallocations and briefly held up to twice its size: the profile of a 100-client list showed
//! a tenth of the server's CPU in those copies. prost computes nested lengths anyway; one more
//! walk over the message to size it costs no copy. The bytes are prost's: every client test
//! (etcdctl, Go's clientv3, the differential suites) decodes them.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder};

/// [`tonic_prost::ProstCodec`] with [`SizedEncoder`].
#[derive(Debug, Clone)]
pub struct SizedCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for SizedCodec<T, U> {
    fn default() -> Self {
        SizedCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for SizedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder { _pd: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::default().decoder()
    }
}

/// Encodes a message into a buffer first grown to hold exactly its encoding.
#[derive(Debug, Clone)]
pub struct SizedEncoder<T> {
    _pd: PhantomData<T>,
}

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // `Message::encode` would compute the length a second time only to check that the
        // buffer has room, which `reserve` has just made: a watch response's head was sized
        // twice per watcher (4% of the server's CPU with 1000 watchers on 10 keys).
        buf.reserve(item.encoded_len());
        item.encode_raw(buf);
        Ok(())
    }
}
