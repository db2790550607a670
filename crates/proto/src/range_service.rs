//! [`KvServer`]: the KV service, whose Range answers are encoded as HTTP/2 flow control takes
//! them ([`RangeBody`]) instead of whole before the first byte is sent.
//!
//! tonic encodes a unary answer into one buffer, then hands it to HTTP/2, which sends it as the
//! client's flow-control window allows. A list of 5,000 values of 2 KiB is a 10 MiB answer:
//! with 100 clients listing, a gigabyte of encoded answers waited for their windows beside the
//! key-values they were encoded from (the peak RSS of the lists row), and every byte was copied
//! once more into that buffer. [`RangeBody`] writes the answer a piece at a time, when hyper
//! asks for the next piece, which it does once the previous one has window to go; it drops
//! each key-value once written. The bytes on the wire are the same: one gRPC message (the
//! 5-byte prefix, then [`RangeFrame`]'s encoding, which is prost's `RangeResponse`), then the
//! `grpc-status: 0` trailer.
//!
//! The request side is tonic's: its decoder, with the same size limit; a compressed request
//! gets tonic's answer, as no service here accepts compression. The other KV methods go to the
//! generated server unchanged.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::Frame;
use prost::bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::codec::{Codec, Streaming};
use tonic::codegen::{http, BoxFuture, Service, StdError};
use tonic::Status;

use crate::codec::SizedCodec;
use crate::etcdserverpb::RangeRequest;
use crate::range_frame::{k_v_server, Kv, RangeFrame};

/// Range's route.
const RANGE_PATH: &str = "/etcdserverpb.KV/Range";

/// The size a piece of an answer is cut at (a key-value larger than this is a piece of its
/// own): large enough that a piece costs one pass through HTTP/2, small enough that a list
/// in flight holds little beyond its client's window.
pub const PIECE_BYTES: usize = 64 * 1024;

/// The largest message grpc-go sends, etcd's server included (`math.MaxInt32`).
const MAX_SEND_MESSAGE_BYTES: usize = i32::MAX as usize;

/// The KV service (`etcdserverpb.KV`): Range answered with a [`RangeBody`], every other method
/// by the generated server.
pub struct KvServer<T> {
    inner: Arc<T>,
    generated: k_v_server::KVServer<T>,
    max_decoding_message_size: Option<usize>,
}

impl<T: Kv> KvServer<T> {
    pub fn new(inner: T) -> Self {
        let inner = Arc::new(inner);
        KvServer {
            generated: k_v_server::KVServer::from_arc(inner.clone()),
            inner,
            max_decoding_message_size: None,
        }
    }

    /// The largest request message decoded, for every method (tonic's setting of that name).
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.generated = self.generated.max_decoding_message_size(limit);
        self.max_decoding_message_size = Some(limit);
        self
    }
}

impl<T> Clone for KvServer<T> {
    fn clone(&self) -> Self {
        KvServer {
            inner: self.inner.clone(),
            generated: self.generated.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
        }
    }
}

impl<T> tonic::server::NamedService for KvServer<T> {
    const NAME: &'static str = "etcdserverpb.KV";
}

impl<T, B> Service<http::Request<B>> for KvServer<T>
where
    T: Kv,
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != RANGE_PATH {
            return self.generated.call(req);
        }
        let inner = self.inner.clone();
        let limit = self.max_decoding_message_size;
        Box::pin(async move {
            Ok(range(inner, req, limit)
                .await
                .unwrap_or_else(Status::into_http))
        })
    }
}

/// Serves one Range call.
async fn range<T: Kv, B>(
    inner: Arc<T>,
    req: http::Request<B>,
    limit: Option<usize>,
) -> Result<http::Response<tonic::body::Body>, Status>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    if let Some(encoding) = req.headers().get("grpc-encoding") {
        if encoding != "identity" {
            return Err(unsupported_encoding(encoding));
        }
    }
    let (mut parts, body) = req.into_parts();
    let decoder = SizedCodec::<RangeFrame, RangeRequest>::default().decoder();
    let mut stream = Streaming::new_request(decoder, body, None, limit);
    let message = stream
        .message()
        .await?
        .ok_or_else(|| Status::internal("Missing request message."))?;
    if let Some(trailers) = stream.trailers().await? {
        parts.headers.extend(trailers.into_headers());
    }
    let request = tonic::Request::from_http(http::Request::from_parts(parts, message));

    let (metadata, frame, extensions) = inner.range(request).await?.into_parts();
    let body = RangeBody::new(frame)?;
    let mut headers = metadata.into_headers();
    for reserved in [
        "te",
        "content-type",
        "grpc-message",
        "grpc-message-type",
        "grpc-status",
    ] {
        headers.remove(reserved);
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    let mut resp = http::Response::new(tonic::body::Body::new(body));
    *resp.version_mut() = http::Version::HTTP_2;
    *resp.headers_mut() = headers;
    *resp.extensions_mut() = extensions;
    Ok(resp)
}

/// tonic's answer to a request compressed with an encoding the service does not accept.
fn unsupported_encoding(encoding: &http::HeaderValue) -> Status {
    let name = String::from_utf8_lossy(encoding.as_bytes());
    let mut status = Status::unimplemented(format!(
        "Content is compressed with `{name}` which isn't supported"
    ));
    status.metadata_mut().insert(
        "grpc-accept-encoding",
        tonic::metadata::MetadataValue::from_static("identity"),
    );
    status
}

/// The body of a Range answer: its gRPC message written in pieces of about [`PIECE_BYTES`] as
/// they are asked for, then the `grpc-status: 0` trailer.
#[derive(Debug)]
pub struct RangeBody {
    frame: RangeFrame,
    /// The message's encoded length, written in the first piece's prefix.
    len: usize,
    /// The key-values written so far, `frame.head.kvs` first, then `frame.encoded`.
    written: usize,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing written yet.
    Start,
    /// The prefix and header are written; key-values (and the last fields) remain.
    KeyValues,
    /// The message is written; the trailer remains.
    Trailer,
    Done,
}

impl RangeBody {
    /// The body of `frame`; an answer larger than grpc-go sends gets its error.
    pub fn new(frame: RangeFrame) -> Result<Self, Status> {
        Self::with_limit(frame, MAX_SEND_MESSAGE_BYTES)
    }

    fn with_limit(frame: RangeFrame, limit: usize) -> Result<Self, Status> {
        let len = frame.encoded_len();
        if len > limit {
            return Err(Status::resource_exhausted(format!(
                "grpc: trying to send message larger than max ({len} vs. {limit})"
            )));
        }
        Ok(RangeBody {
            frame,
            len,
            written: 0,
            state: State::Start,
        })
    }

    /// The next piece of the message: at least one field, then whole fields while they fit in
    /// [`PIECE_BYTES`].
    fn next_piece(&mut self) -> Bytes {
        let mut buf = BytesMut::new();
        if self.state == State::Start {
            buf.reserve((self.len + 5).min(PIECE_BYTES));
            buf.put_u8(0);
            buf.put_u32(self.len as u32);
            self.frame.encode_head(&mut buf);
            self.state = State::KeyValues;
        }
        while self.written < self.frame.kv_count() {
            let size = self.frame.kv_encoded_len(self.written);
            if !buf.is_empty() && buf.len() + size > PIECE_BYTES {
                return buf.freeze();
            }
            buf.reserve(size);
            self.frame.encode_kv(self.written, &mut buf);
            self.frame.release_kv(self.written);
            self.written += 1;
        }
        self.frame.encode_tail(&mut buf);
        self.state = State::Trailer;
        buf.freeze()
    }
}

impl http_body::Body for RangeBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        Poll::Ready(match this.state {
            State::Start | State::KeyValues => Some(Ok(Frame::data(this.next_piece()))),
            State::Trailer => {
                this.state = State::Done;
                let mut trailers = http::HeaderMap::with_capacity(1);
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                Some(Ok(Frame::trailers(trailers)))
            }
            State::Done => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcdserverpb::RangeResponse;
    use crate::mvccpb::KeyValue;
    use http_body::Body as _;
    use prost::encoding;

    fn kv(i: usize, value: usize) -> KeyValue {
        KeyValue {
            key: format!("key/{i:05}").into_bytes(),
            create_revision: 2 + i as i64,
            mod_revision: 300 + i as i64,
            version: 1 + (i % 3) as i64,
            value: vec![(i % 251) as u8; value],
            lease: (i % 2) as i64 * 7,
        }
    }

    /// The pieces and the trailer of `frame`'s body.
    fn pieces(frame: RangeFrame) -> (Vec<Bytes>, http::HeaderMap) {
        let mut body = RangeBody::new(frame).unwrap();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut data = Vec::new();
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(piece) => data.push(piece),
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap();
                        assert!(!body.is_end_stream() || body.state == State::Done);
                        assert!(matches!(
                            Pin::new(&mut body).poll_frame(&mut cx),
                            Poll::Ready(None)
                        ));
                        assert!(body.is_end_stream());
                        return (data, trailers);
                    }
                },
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn the_pieces_are_the_grpc_message_of_the_response() {
        // The frame tests' answers, and two of many pieces.
        let mut responses = crate::range_frame::tests::responses();
        let header = responses[1].header.clone();
        let sizes = [
            0usize,
            1,
            100,
            2048,
            PIECE_BYTES - 20,
            PIECE_BYTES,
            3 * PIECE_BYTES,
        ];
        responses.push(RangeResponse {
            header: header.clone(),
            kvs: (0..40).map(|i| kv(i, sizes[i % sizes.len()])).collect(),
            more: true,
            count: 900,
        });
        responses.push(RangeResponse {
            header,
            kvs: (0..500).map(|i| kv(i, 2048)).collect(),
            more: false,
            count: 500,
        });
        for resp in responses {
            let message = resp.encode_to_vec();
            let mut expected = vec![0u8];
            expected.extend_from_slice(&(message.len() as u32).to_be_bytes());
            expected.extend_from_slice(&message);
            for split in [0, resp.kvs.len() / 3, resp.kvs.len()] {
                let frame = RangeFrame::split(&resp, split);
                let (data, trailers) = pieces(frame);
                assert_eq!(data.concat(), expected, "split at {split}");
                assert_eq!(trailers.len(), 1);
                assert_eq!(trailers["grpc-status"], "0");
                // Pieces are cut at whole key-values: only a piece of one key-value may
                // exceed the size.
                let largest = resp
                    .kvs
                    .iter()
                    .map(|kv| encoding::message::encoded_len(2, kv))
                    .max()
                    .unwrap_or(0);
                for piece in &data {
                    assert!(piece.len() <= PIECE_BYTES.max(largest + 5 + 64));
                    assert!(!piece.is_empty());
                }
                // Of equal key-values, every piece but the last is full.
                if resp.kvs.len() == 500 {
                    assert!(data.len() > expected.len() / PIECE_BYTES);
                    for piece in &data[..data.len() - 1] {
                        assert!(piece.len() > PIECE_BYTES - largest, "{}", piece.len());
                    }
                }
            }
        }
    }

    #[test]
    fn an_answer_larger_than_the_limit_is_resource_exhausted() {
        let frame = RangeFrame::from(RangeResponse {
            kvs: vec![kv(1, 100)],
            ..Default::default()
        });
        let len = frame.encoded_len();
        assert!(RangeBody::with_limit(frame.clone(), len).is_ok());
        let status = RangeBody::with_limit(frame, len - 1).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            format!(
                "grpc: trying to send message larger than max ({len} vs. {})",
                len - 1
            )
        );
    }

    /// A KV service whose Range answers `limit` key-values, or `NotFound` for the key `none`.
    /// Its other methods answer `Unimplemented` "not in this test": the test calls Put and
    /// expects that answer, which shows the other methods reach the generated server.
    struct Fixed;

    #[tonic::async_trait]
    impl Kv for Fixed {
        async fn range(
            &self,
            r: tonic::Request<RangeRequest>,
        ) -> Result<tonic::Response<RangeFrame>, Status> {
            let r = r.into_inner();
            if r.key == b"none" {
                return Err(Status::not_found("no such range"));
            }
            let resp = RangeResponse {
                kvs: (0..r.limit as usize).map(|i| kv(i, 2048)).collect(),
                count: r.limit,
                ..Default::default()
            };
            Ok(tonic::Response::new(RangeFrame::split(
                &resp,
                1.min(resp.kvs.len()),
            )))
        }
        async fn put(
            &self,
            _: tonic::Request<crate::etcdserverpb::PutRequest>,
        ) -> Result<tonic::Response<crate::etcdserverpb::PutResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn delete_range(
            &self,
            _: tonic::Request<crate::etcdserverpb::DeleteRangeRequest>,
        ) -> Result<tonic::Response<crate::etcdserverpb::DeleteRangeResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn txn(
            &self,
            _: tonic::Request<crate::etcdserverpb::TxnRequest>,
        ) -> Result<tonic::Response<crate::etcdserverpb::TxnResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn compact(
            &self,
            _: tonic::Request<crate::etcdserverpb::CompactionRequest>,
        ) -> Result<tonic::Response<crate::etcdserverpb::CompactionResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// One call of `path` with `req` as its message and `headers`: the answer's headers, its
    /// data and its trailers.
    async fn call(
        path: &str,
        req: &RangeRequest,
        headers: &[(&'static str, &'static str)],
    ) -> (http::HeaderMap, Vec<u8>, Option<http::HeaderMap>) {
        let message = req.encode_to_vec();
        let mut body = vec![0u8];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
        let mut request = http::Request::post(path)
            .header("content-type", "application/grpc")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap();
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, http::HeaderValue::from_static(value));
        }
        let mut server = KvServer::new(Fixed).max_decoding_message_size(1024);
        let (parts, mut body) = server.call(request).await.unwrap().into_parts();
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            match frame.unwrap().into_data() {
                Ok(piece) => data.extend_from_slice(&piece),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        (parts.headers, data, trailers)
    }

    #[tokio::test]
    async fn the_service_answers_range_with_pieces_and_errors_as_tonic_does() {
        let range = |key: &str, limit: i64| RangeRequest {
            key: key.into(),
            limit,
            ..Default::default()
        };
        let path = RANGE_PATH;
        let (headers, data, trailers) = call(path, &range("k", 100), &[]).await;
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        let resp = RangeResponse::decode(&data[5..]).unwrap();
        assert_eq!(
            u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize,
            data.len() - 5
        );
        assert_eq!(resp.kvs.len(), 100);
        assert_eq!(resp.kvs[99], kv(99, 2048));

        // An error is a trailers-only answer.
        let (headers, data, trailers) = call(path, &range("none", 1), &[]).await;
        assert!(data.is_empty() && trailers.is_none());
        let status = Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "no such range");

        // A compressed request, which no service here accepts.
        let (headers, _, _) = call(path, &range("k", 1), &[("grpc-encoding", "gzip")]).await;
        assert_eq!(headers["grpc-status"], "12");
        assert_eq!(headers["grpc-accept-encoding"], "identity");
        let (headers, _, trailers) =
            call(path, &range("k", 1), &[("grpc-encoding", "identity")]).await;
        assert!(headers.get("grpc-status").is_none());
        assert_eq!(trailers.unwrap()["grpc-status"], "0");

        // A request over the decoding limit gets tonic's answer.
        let (headers, _, _) = call(path, &range(&"k".repeat(2000), 1), &[]).await;
        assert_eq!(headers["grpc-status"], "11", "{headers:?}");

        // Other methods go to the generated server.
        let (headers, _, _) = call("/etcdserverpb.KV/Put", &range("k", 1), &[]).await;
        let status = Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(status.message(), "not in this test");
    }
}
