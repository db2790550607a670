//! Reaching the endpoints through tonic: the channels the streaming workloads (lease keep-alive,
//! watch) use, and finding the leader for `--target-leader`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::StatusRequest;
use tonic::transport::{Channel, Endpoint};

pub(crate) async fn connect(endpoints: &[String], conns: usize) -> Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(conns);
    for i in 0..conns.max(1) {
        let ep = &endpoints[i % endpoints.len()];
        let uri = if ep.starts_with("http") {
            ep.clone()
        } else {
            format!("http://{ep}")
        };
        let channel = Endpoint::from_shared(uri.clone())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to {uri}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// The endpoint of the member that leads, as each endpoint's Status says (waits up to 10 s for
/// an election).
pub(crate) async fn leader_endpoint(endpoints: &[String]) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for ep in endpoints {
            let channel = connect(std::slice::from_ref(ep), 1).await?.remove(0);
            let Ok(status) = MaintenanceClient::new(channel)
                .status(StatusRequest {})
                .await
            else {
                continue;
            };
            let status = status.into_inner();
            let member = status.header.map(|h| h.member_id).unwrap_or(0);
            if status.leader != 0 && status.leader == member {
                return Ok(ep.clone());
            }
        }
        if Instant::now() >= deadline {
            bail!("no endpoint among {endpoints:?} is the leader");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
