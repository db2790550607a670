//! Shutting down: waiting for a signal (SIGINT, SIGTERM) or for this member's removal from its
//! cluster, then stopping the servers and the raft node, in that order.

use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;

use crate::context::{self, Member};
use crate::leader_duties;

/// A spawned gRPC server (peer or client port).
pub type ServerTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// Resolves on SIGINT or SIGTERM, or once this member was removed from the cluster; a removal is
/// recorded in `member_dir`, so that the member refuses to start again.
pub async fn wait(member: &Member, member_dir: &Path) {
    let member_id = member.ctx.member_id;
    tokio::select! {
        _ = signal() => info!("shutting down"),
        _ = leader_duties::removed(member.ctx.raft.clone(), member.network.clone()) => {
            tracing::warn!(
                member_id = %format!("{member_id:x}"),
                "this member was removed from the cluster; shutting down"
            );
            let removed_marker = context::removed_marker(member_dir);
            if let Err(e) = std::fs::write(&removed_marker, format!("{member_id:x}\n")) {
                tracing::error!(error = %e, "cannot record the removal");
            }
        }
    }
}

/// How long a stopping leader waits for its transferee to lead (etcd: the request timeout).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);

/// As etcd's leader does when it stops: hand leadership to the most up-to-date voter first, so
/// that the others elect no one after an election timeout of silence. Proposals already in the
/// log are committed by the new leader; a single member, or a transfer that does not finish in
/// time, just stops.
async fn hand_over_leadership(member: &Member) {
    let raft = &member.ctx.raft;
    let status = raft.status();
    if !status.is_leader {
        return;
    }
    let Some(target) = status
        .membership
        .voters
        .iter()
        .copied()
        .filter(|id| *id != status.member_id)
        .max_by_key(|id| status.progress.get(id).copied().unwrap_or(0))
    else {
        return;
    };
    let started = std::time::Instant::now();
    info!(transferee = %format!("{target:x}"), "leader stopping: transferring leadership");
    let outcome = match raft.transfer_leader(target) {
        Ok(()) => raft.wait_leader_is(target, TRANSFER_TIMEOUT).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(()) => info!(
            transferee = %format!("{target:x}"),
            took_ms = started.elapsed().as_millis() as u64,
            "leadership transferred before stopping"
        ),
        Err(e) => tracing::warn!(error = %e, "leadership transfer before stopping failed"),
    }
}

/// Stops the servers (`stop` tells the client servers), then the raft node; a leader first
/// hands over its leadership.
pub async fn stop(
    member: &Member,
    peer_servers: Vec<ServerTask>,
    client_servers: Vec<ServerTask>,
    stop: watch::Sender<bool>,
) {
    hand_over_leadership(member).await;
    // Peers keep long-lived streams open and retry anyway: no grace for them. Clients get a
    // moment to finish what is in flight (watch streams would hold a graceful stop forever).
    for server in &peer_servers {
        server.abort();
    }
    let _ = stop.send(true);
    for server in client_servers {
        let abort = server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    member.ctx.raft.shutdown();
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
