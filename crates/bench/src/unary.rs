//! The clients of the unary workloads: `UnaryConn`, one connection speaking unary gRPC calls
//! with the `h2` crate directly (`H2Conn`) or etcd's HTTP/JSON gateway over HTTP/1.1
//! (`JsonConn`), and `connect_unary`, which opens them over the endpoints.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use metastore_proto::etcdserverpb::{
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};

/// One HTTP/2 connection for unary gRPC calls, spoken with the `h2` crate directly. A unary
/// call is one message each way, so the request goes out as headers plus one data frame and the
/// answer is read as it arrives. tonic's `Channel` (a buffer task in front of the connection, a
/// body task per request) and then hyper's client (a dispatch channel and a spawned task per
/// request) each cost load-generator CPU, which on one machine is CPU taken from the servers:
/// at 3 members and 1000 clients the load generator had used about a third of the machine.
#[derive(Clone)]
pub(crate) struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    /// `scheme://authority` of the endpoint, the prefix of every request's URI.
    origin: Arc<str>,
}

fn transport_error(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::unavailable(e.to_string())
}

impl H2Conn {
    /// One unary call of `method` (`/package.Service/Method`).
    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &mut self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, tonic::Status> {
        let message = self.call_encoded(method, req).await?;
        Resp::decode(&message[..]).map_err(|e| tonic::Status::internal(e.to_string()))
    }

    /// One unary call of `method`: the answer's message, not decoded.
    async fn call_encoded<Req: prost::Message>(
        &mut self,
        method: &str,
        req: &Req,
    ) -> Result<Bytes, tonic::Status> {
        std::future::poll_fn(|cx| self.send.poll_ready(cx))
            .await
            .map_err(transport_error)?;
        let mut body = Vec::with_capacity(5 + req.encoded_len());
        body.push(0);
        body.extend_from_slice(&(req.encoded_len() as u32).to_be_bytes());
        req.encode(&mut body).map_err(transport_error)?;
        let request = http::Request::post(format!("{}{method}", self.origin))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(transport_error)?;
        let (response, mut stream) = self
            .send
            .send_request(request, false)
            .map_err(transport_error)?;
        stream
            .send_data(Bytes::from(body), true)
            .map_err(transport_error)?;
        let response = response.await.map_err(transport_error)?;
        let (parts, mut recv) = response.into_parts();
        // A trailers-only answer (an error) carries its status in the headers; tonic decodes the
        // percent-encoded `grpc-message`.
        if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
            return Err(if status.code() == tonic::Code::Ok {
                tonic::Status::internal("a trailers-only answer without a message")
            } else {
                status
            });
        }
        if parts.status != http::StatusCode::OK {
            return Err(tonic::Status::unknown(format!(
                "HTTP status {}",
                parts.status
            )));
        }
        let mut message = bytes::BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(transport_error)?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            if message.is_empty() && chunk.len() >= 5 {
                // The prefix gives the message's length: one allocation, no regrowth.
                let len = u32::from_be_bytes([chunk[1], chunk[2], chunk[3], chunk[4]]) as usize;
                message.reserve(5 + len);
            }
            message.extend_from_slice(&chunk);
        }
        let trailers = recv.trailers().await.map_err(transport_error)?;
        match trailers.as_ref().and_then(tonic::Status::from_header_map) {
            Some(status) if status.code() == tonic::Code::Ok => {}
            Some(status) => return Err(status),
            None => return Err(tonic::Status::internal("an answer without grpc-status")),
        }
        if message.len() < 5 || message[0] != 0 {
            return Err(tonic::Status::internal(
                "an answer that is not one uncompressed message",
            ));
        }
        Ok(message.freeze().slice(5..))
    }
}

/// What the load generator keeps of a Range answer: its fields, and how many key-values it
/// carried. The key-values are checked to be well-formed length-delimited fields and skipped,
/// not decoded: the load generator shares the machine with the server, and decoding a list of
/// 5,000 values of 2 KiB into 10,000 allocations had cost it about twice the CPU the server
/// spent answering, which capped both servers' throughput on the lists rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct RangeSummary {
    /// The answer without its key-values.
    pub(crate) head: RangeResponse,
    /// How many key-values it carried.
    pub(crate) kvs: usize,
}

impl RangeSummary {
    fn decode(mut buf: &[u8]) -> Result<Self, prost::DecodeError> {
        use prost::bytes::Buf;
        use prost::encoding::{self, WireType};
        use prost::Message;
        let mut summary = RangeSummary::default();
        while buf.has_remaining() {
            let (tag, wire_type) = encoding::decode_key(&mut buf)?;
            if tag != 2 {
                summary
                    .head
                    .merge_field(tag, wire_type, &mut buf, Default::default())?;
                continue;
            }
            encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
            encoding::skip_field(wire_type, tag, &mut buf, Default::default())?;
            summary.kvs += 1;
        }
        Ok(summary)
    }
}

impl From<RangeResponse> for RangeSummary {
    fn from(mut head: RangeResponse) -> Self {
        let kvs = std::mem::take(&mut head.kvs).len();
        RangeSummary { head, kvs }
    }
}

/// One HTTP/1.1 connection to etcd's JSON gateway; a call holds it until its answer is read.
#[derive(Clone)]
pub(crate) struct JsonConn {
    send: Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>,
    authority: Arc<str>,
}

impl JsonConn {
    /// `POST path` with `req` as JSON; the answer decoded, or the gateway's error as a status.
    async fn call<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, tonic::Status> {
        let body = serde_json::to_vec(req).map_err(transport_error)?;
        let request = http::Request::post(path)
            .header("host", &*self.authority)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(transport_error)?;
        let (status, answer) = {
            let mut send = self.send.lock().await;
            std::future::poll_fn(|cx| send.poll_ready(cx))
                .await
                .map_err(transport_error)?;
            let response = send.send_request(request).await.map_err(transport_error)?;
            let status = response.status();
            let answer = response.into_body().collect().await;
            (status, answer.map_err(transport_error)?.to_bytes())
        };
        if status != http::StatusCode::OK {
            // `{"error":…,"message":…,"code":N}`
            let error: serde_json::Value =
                serde_json::from_slice(&answer).map_err(transport_error)?;
            let code = error["code"].as_i64().unwrap_or(2) as i32;
            let message = error["message"].as_str().unwrap_or_default().to_string();
            return Err(tonic::Status::new(tonic::Code::from(code), message));
        }
        serde_json::from_slice(&answer).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// A connection of the unary workloads: gRPC, or etcd's JSON gateway (`--gateway`).
#[derive(Clone)]
pub(crate) enum UnaryConn {
    Grpc(H2Conn),
    Json(JsonConn),
}

impl UnaryConn {
    pub(crate) async fn put(&mut self, req: PutRequest) -> Result<PutResponse, tonic::Status> {
        match self {
            UnaryConn::Grpc(conn) => conn.call("/etcdserverpb.KV/Put", &req).await,
            UnaryConn::Json(conn) => conn.call("/v3/kv/put", &req).await,
        }
    }

    /// A Range call whose answer is summarized, not decoded ([`RangeSummary`]).
    pub(crate) async fn range_summary(
        &mut self,
        req: RangeRequest,
    ) -> Result<RangeSummary, tonic::Status> {
        match self {
            UnaryConn::Grpc(conn) => {
                let message = conn.call_encoded("/etcdserverpb.KV/Range", &req).await?;
                RangeSummary::decode(&message).map_err(|e| tonic::Status::internal(e.to_string()))
            }
            UnaryConn::Json(conn) => conn
                .call::<_, RangeResponse>("/v3/kv/range", &req)
                .await
                .map(RangeSummary::from),
        }
    }

    pub(crate) async fn txn(&mut self, req: TxnRequest) -> Result<TxnResponse, tonic::Status> {
        match self {
            UnaryConn::Grpc(conn) => conn.call("/etcdserverpb.KV/Txn", &req).await,
            UnaryConn::Json(conn) => conn.call("/v3/kv/txn", &req).await,
        }
    }
}

/// `conns` gRPC connections spread over `endpoints`, or with `gateway` one JSON gateway
/// connection per client.
pub(crate) async fn connect_unary(
    endpoints: &[String],
    conns: usize,
    clients: usize,
    gateway: bool,
) -> Result<Vec<UnaryConn>> {
    let conns = if gateway { clients } else { conns };
    let mut out = Vec::with_capacity(conns);
    for i in 0..conns.max(1) {
        let ep = &endpoints[i % endpoints.len()];
        let uri: http::Uri = if ep.starts_with("http") {
            ep.parse()?
        } else {
            format!("http://{ep}").parse()?
        };
        if uri.scheme_str() != Some("http") {
            bail!("{uri}: the load generator speaks plain http only");
        }
        let authority = uri.authority().context("endpoint without host")?.as_str();
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(authority),
        )
        .await
        .with_context(|| format!("connecting to {uri}: timed out"))?
        .with_context(|| format!("connecting to {uri}"))?;
        tcp.set_nodelay(true)?;
        if gateway {
            let (send, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .with_context(|| format!("HTTP/1.1 handshake with {uri}"))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            out.push(UnaryConn::Json(JsonConn {
                send: Arc::new(tokio::sync::Mutex::new(send)),
                authority: authority.into(),
            }));
            continue;
        }
        // Windows as hyper's client sets them by default, so that neither side waits on flow
        // control.
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .handshake::<_, Bytes>(tcp)
            .await
            .with_context(|| format!("HTTP/2 handshake with {uri}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        out.push(UnaryConn::Grpc(H2Conn {
            send,
            origin: format!("http://{authority}").into(),
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::kv_server::{Kv, KvServer};
    use metastore_proto::etcdserverpb::{
        CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
        ResponseHeader,
    };
    use metastore_proto::mvccpb::KeyValue;
    use tonic::{Request, Response, Status};

    /// A KV service whose answers are computed from the request, to check what the load
    /// generator's gRPC client sends and decodes.
    struct Echo;

    #[tonic::async_trait]
    impl Kv for Echo {
        async fn range(&self, r: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
            // `limit` values of 1 KiB each: large answers span many frames and window updates.
            let r = r.into_inner();
            let kvs = (0..r.limit)
                .map(|i| KeyValue {
                    key: [r.key.as_slice(), &i.to_be_bytes()].concat(),
                    value: vec![i as u8; 1024],
                    ..Default::default()
                })
                .collect();
            Ok(Response::new(RangeResponse {
                kvs,
                count: r.limit,
                ..Default::default()
            }))
        }

        async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
            let r = r.into_inner();
            Ok(Response::new(PutResponse {
                header: Some(ResponseHeader {
                    revision: r.value.len() as i64,
                    ..Default::default()
                }),
                prev_kv: Some(KeyValue {
                    key: r.key,
                    ..Default::default()
                }),
            }))
        }

        async fn delete_range(
            &self,
            _: Request<DeleteRangeRequest>,
        ) -> Result<Response<DeleteRangeResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
            Err(Status::invalid_argument(
                "etcdserver: duplicate key given in txn request",
            ))
        }

        async fn compact(
            &self,
            _: Request<CompactionRequest>,
        ) -> Result<Response<CompactionResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    #[test]
    fn a_range_summary_counts_key_values_and_keeps_the_rest() {
        let resp = RangeResponse {
            header: Some(ResponseHeader {
                revision: 9,
                ..Default::default()
            }),
            kvs: (0..7u8)
                .map(|i| KeyValue {
                    key: vec![i],
                    value: vec![i; 100 * i as usize],
                    ..Default::default()
                })
                .collect(),
            more: true,
            count: 12,
        };
        let bytes = prost::Message::encode_to_vec(&resp);
        let summary = RangeSummary::decode(&bytes).unwrap();
        assert_eq!(summary, RangeSummary::from(resp));
        assert_eq!(summary.kvs, 7);
        assert_eq!(summary.head.count, 12);
        assert!(summary.head.more);
        // A key-value cut short is an error, as a decode would be.
        assert!(RangeSummary::decode(&bytes[..bytes.len() - 5]).is_err());
    }

    #[tokio::test]
    async fn unary_calls_carry_requests_answers_and_errors() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(KvServer::new(Echo))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut conns = connect_unary(&[addr.to_string()], 2, 2, false)
            .await
            .unwrap();
        assert_eq!(conns.len(), 2);
        let conn = &mut conns[1];

        let put = conn
            .put(PutRequest {
                key: b"k1".to_vec(),
                value: vec![7; 300],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(put.header.unwrap().revision, 300);
        assert_eq!(put.prev_kv.unwrap().key, b"k1");

        // About 5 MiB: more than the stream's and the connection's flow-control windows.
        let summary = conn
            .range_summary(RangeRequest {
                key: b"r".to_vec(),
                limit: 5000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(summary.kvs, 5000);
        assert_eq!(summary.head.count, 5000);

        let err = conn.txn(TxnRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "etcdserver: duplicate key given in txn request"
        );

        // The connection still serves calls after an error, many at once.
        let calls: Vec<_> = (0..50)
            .map(|i| {
                let mut conn = conn.clone();
                tokio::spawn(async move {
                    conn.put(PutRequest {
                        value: vec![0; i],
                        ..Default::default()
                    })
                    .await
                })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            let put = call.await.unwrap();
            assert_eq!(put.unwrap().header.unwrap().revision, i as i64);
        }
    }
}
