//! grpc-go's answer to a request message over the receive limit.
//!
//! Every client-port service decodes at most `--max-request-bytes` plus gRPC's overhead per
//! message, as etcd's server-wide `grpc.MaxRecvMsgSize`. tonic refuses a larger message with
//! `OutOfRange` and a message of its own; etcd clients see grpc-go's `ResourceExhausted` and
//! `grpc: received message larger than max (N vs. M)`. [`OversizeLayer`] rewrites the one into
//! the other, so both answer alike.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::{Code, Status};

/// The start of tonic's refusal of a message over the decoding limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// grpc-go's status for a message of `found` bytes over a `limit`, from tonic's refusal; any
/// other status is left alone.
fn as_grpc_go(status: &Status) -> Option<Status> {
    if status.code() != Code::OutOfRange {
        return None;
    }
    // "…found {len} bytes, the limit is: {limit} bytes"
    let rest = status.message().strip_prefix(TONIC_TOO_LARGE)?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    let (found, limit) = (found.parse::<u64>().ok()?, limit.parse::<u64>().ok()?);
    Some(Status::resource_exhausted(format!(
        "grpc: received message larger than max ({found} vs. {limit})"
    )))
}

/// The tower layer in front of the client-port services (see the module's description).
#[derive(Clone, Copy, Debug, Default)]
pub struct OversizeLayer;

impl<S> tower_layer::Layer<S> for OversizeLayer {
    type Service = OversizeService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        OversizeService { inner }
    }
}

/// The service [`OversizeLayer`] builds.
#[derive(Clone, Debug)]
pub struct OversizeService<S> {
    inner: S,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for OversizeService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // A refused decode is a trailers-only response: the status is in the headers.
            match Status::from_header_map(response.headers())
                .as_ref()
                .and_then(as_grpc_go)
            {
                Some(status) => Ok(status.into_http()),
                None => Ok(response),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonic_refusal_becomes_grpc_go_refusal() {
        let tonic = Status::out_of_range(
            "Error, decoded message length too large: found 614406 bytes, the limit is: 525312 bytes",
        );
        let go = as_grpc_go(&tonic).unwrap();
        assert_eq!(go.code(), Code::ResourceExhausted);
        assert_eq!(
            go.message(),
            "grpc: received message larger than max (614406 vs. 525312)"
        );
        // etcd's own OutOfRange answers (compacted, future revision) stay as they are.
        let compacted =
            Status::out_of_range("etcdserver: mvcc: required revision has been compacted");
        assert!(as_grpc_go(&compacted).is_none());
    }
}
