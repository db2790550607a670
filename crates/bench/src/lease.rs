//! The lease workload (`lease-keepalive`): `KeepAlive`, one lease kept alive over one
//! keep-alive stream, each round trip one request.

use metastore_proto::etcdserverpb::lease_client::LeaseClient;
use metastore_proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest};
use tonic::transport::Channel;

/// One lease kept alive over one stream: each round trip is a request.
pub(crate) struct KeepAlive {
    id: i64,
    tx: tokio::sync::mpsc::Sender<LeaseKeepAliveRequest>,
    rx: tonic::Streaming<metastore_proto::etcdserverpb::LeaseKeepAliveResponse>,
}

impl KeepAlive {
    pub(crate) async fn start(channel: Channel) -> KeepAlive {
        let mut lease = LeaseClient::new(channel);
        let id = lease
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
            .await
            .map(|r| r.into_inner().id)
            .unwrap_or(0);
        let (tx, body) = tokio::sync::mpsc::channel(1);
        // etcd (grpc-go) sends the response headers with the first response: queue a request
        // before waiting for the call, or both sides wait for each other.
        let _ = tx.send(LeaseKeepAliveRequest { id }).await;
        let mut rx = lease
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(body))
            .await
            .map(|r| r.into_inner())
            .expect("lease keep-alive stream");
        let _ = rx.message().await;
        KeepAlive { id, tx, rx }
    }

    pub(crate) async fn round_trip(&mut self) -> Result<(), tonic::Status> {
        self.tx
            .send(LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| tonic::Status::unavailable("keep-alive stream closed"))?;
        match self.rx.message().await? {
            Some(r) if r.ttl > 0 => Ok(()),
            Some(_) => Err(tonic::Status::not_found("lease expired")),
            None => Err(tonic::Status::unavailable("keep-alive stream closed")),
        }
    }
}
