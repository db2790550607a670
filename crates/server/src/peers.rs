//! Serving the peer port (`--listen-peer-urls`): metastore-peer's [`PeerService`] (raft traffic,
//! streamed snapshots, membership queries, requests forwarded to the leader), with the `--peer-*`
//! TLS when the peer URLs are `https://`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use metastore_lease::Lessor;
use metastore_peer::{LeaseHandler, PeerService};
use metastore_state_machine::StoreHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::info;

use crate::config::Config;
use crate::context::Member;
use crate::shutdown::ServerTask;
use crate::urls;

/// The leader's side of forwarded lease requests, and this member's HashKV for the leader's
/// corruption check.
struct Leases(Arc<Lessor>, StoreHandle);

impl LeaseHandler for Leases {
    fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64), tonic::Status> {
        let h = self
            .1
            .current()
            .hash_kv(revision)
            .map_err(|e| metastore_api_context::mvcc_status(&e))?;
        Ok((h.hash, h.compact_revision, h.hash_revision))
    }

    fn renew(&self, id: i64) -> Option<i64> {
        self.0.renew(id).ok()
    }

    fn ttl(&self, id: i64) -> Option<(i64, i64)> {
        self.0
            .time_to_live(id)
            .map(|s| (s.remaining_ttl_secs, s.granted_ttl_secs))
    }
}

/// Binds `--listen-peer-urls`, so that a taken port fails before anything starts.
pub async fn bind(cfg: &Config) -> Result<Vec<(SocketAddr, TcpListener)>> {
    let mut listeners = Vec::new();
    for url in urls::parse_tcp("--listen-peer-urls", &cfg.listen_peer_urls)? {
        let urls::Bind::Tcp(addr) = url.bind("--listen-peer-urls").await? else {
            unreachable!("parse_tcp refuses unix URLs")
        };
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for peers on {}", url.text))?;
        listeners.push((addr, listener));
    }
    Ok(listeners)
}

/// Serves peers on `listeners` until `stop` turns true (shutting down aborts them sooner).
pub fn serve(
    member: &Member,
    listeners: Vec<(SocketAddr, TcpListener)>,
    tls: Option<&TlsAcceptor>,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<ServerTask>> {
    let ctx = &member.ctx;
    let members = &ctx.members;
    let mut servers = Vec::new();
    let members_source: metastore_peer::MemberSource = {
        let members = members.clone();
        Arc::new(move || members.list())
    };
    for (addr, listener) in listeners {
        info!(address = %addr, "serving peer traffic");
        let peer = PeerService::new(
            ctx.cluster_id,
            ctx.member_id,
            ctx.raft.clone(),
            members_source.clone(),
            {
                let members = members.clone();
                Arc::new(move |id| !members.is_removed(id))
            },
            Arc::new(Leases(member.lessor.clone(), ctx.store.clone())),
            {
                let network = member.network.clone();
                Arc::new(move |from| {
                    let network = network.clone();
                    Box::pin(async move { network.confirm_removal(from).await })
                })
            },
        );
        let stopped = {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        };
        let router = tonic::transport::Server::builder().add_service(peer.grpc());
        // Raft streams are served on their own; gRPC connections go on to tonic.
        servers.push(match tls {
            None => {
                let incoming = crate::clients::nodelay_incoming(listener);
                let incoming = peer.route(Box::pin(incoming), stop.clone());
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
            }
            Some(tls) => {
                let incoming = crate::clients::tls_incoming(
                    Box::pin(crate::clients::nodelay_incoming(listener)),
                    tls.clone(),
                    stop.clone(),
                );
                let incoming = peer.route(incoming, stop.clone());
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
            }
        });
    }
    Ok(servers)
}
