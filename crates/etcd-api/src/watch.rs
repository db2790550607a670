//! The Watch service: one bidirectional stream carries any number of watchers.
//!
//! Requests (create, cancel, progress) are read by a task per stream and handed to the stream's
//! [`WatchStream`]; responses come from the hub's bounded per-stream channel, with the header's
//! cluster, member and term filled in here. They are [`WatchFrame`]s, their events encoded once
//! by the hub for every watcher they go to; the service is the one generated over them
//! (`metastore_proto::watch_frame::watch_server`), which puts the same bytes on the wire as a
//! `WatchResponse`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use metastore_proto::etcdserverpb::watch_request::RequestUnion;
use metastore_proto::etcdserverpb::{WatchRequest, WatchResponse};
use metastore_proto::watch_frame::watch_server::Watch;
use metastore_proto::watch_frame::WatchFrame;
use metastore_watch::WatchHub;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

use metastore_auth::Need;

use metastore_api_context::{Caller, ServerContext};

/// etcd's answer to a watch create the caller may not read: created and canceled at once, the
/// reason being the gRPC error's text as Go prints it.
fn refused(ctx: &ServerContext, status: &Status) -> WatchResponse {
    WatchResponse {
        header: Some(ctx.header(0)),
        watch_id: -1,
        created: true,
        canceled: true,
        cancel_reason: format!(
            "rpc error: code = {} desc = {}",
            go_code_name(status.code()),
            status.message()
        ),
        ..Default::default()
    }
}

/// gRPC code names as grpc-go prints them.
fn go_code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::Unauthenticated => "Unauthenticated",
        _ => "Unknown",
    }
}

/// etcd's default `--experimental-watch-progress-notify-interval`.
pub const DEFAULT_PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(600);

/// etcd's Watch service.
pub struct WatchService {
    ctx: ServerContext,
    hub: Arc<WatchHub>,
    progress_notify_interval: Duration,
}

impl WatchService {
    /// A Watch service over the member's watch hub; watchers created with `progress_notify` get
    /// an empty response every `progress_notify_interval`.
    pub fn new(ctx: ServerContext, hub: Arc<WatchHub>, progress_notify_interval: Duration) -> Self {
        WatchService {
            ctx,
            hub,
            progress_notify_interval: progress_notify_interval.max(Duration::from_millis(1)),
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<WatchFrame, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ResponseStream;

    async fn watch(
        &self,
        request: GrpcRequest<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.ctx.refuse_on_learner()?;
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let (stream, rx) = self.hub.open_stream();
        let interval = self.progress_notify_interval;
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let mut ticker =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            // As etcd's: the end of the client's requests (its half-close) does not end the
            // stream; its watchers keep answering until the client goes away.
            let mut requests_open = true;
            loop {
                tokio::select! {
                    message = inbound.message(), if requests_open => {
                        let req = match message {
                            Ok(Some(req)) => req,
                            Ok(None) => {
                                requests_open = false;
                                continue;
                            }
                            Err(_) => break,
                        };
                        let handled = match req.request_union {
                            Some(RequestUnion::CreateRequest(create)) => {
                                // etcd checks read permission once, when the watcher is created,
                                // with the stream's credentials as they are now, and answers a
                                // refusal as a created-and-canceled watcher.
                                let needs = [Need::Read(&create.key, &create.range_end)];
                                match ctx.authorize_on_stream(&caller, &needs) {
                                    Ok(_) => stream.create(create).await,
                                    Err(status) => stream.send(refused(&ctx, &status)).await,
                                }
                            }
                            Some(RequestUnion::CancelRequest(cancel)) => {
                                stream.cancel(cancel.watch_id).await
                            }
                            Some(RequestUnion::ProgressRequest(_)) => stream.request_progress().await,
                            None => Ok(()),
                        };
                        if handled.is_err() {
                            break;
                        }
                    }
                    _ = ticker.tick() => stream.progress_notify(),
                    () = stream.closed() => break,
                }
            }
            // Dropping the stream removes its watchers and ends the response stream.
            drop(stream);
        });
        let ctx = self.ctx.clone();
        let responses =
            tokio_stream::wrappers::ReceiverStream::new(rx).map(move |mut frame: WatchFrame| {
                if let Some(header) = frame.head.header.as_mut() {
                    header.cluster_id = ctx.cluster_id;
                    header.member_id = ctx.member_id;
                    header.raft_term = ctx.raft.with_status(|s| s.term);
                }
                Ok(frame)
            });
        Ok(Response::new(Box::pin(responses)))
    }
}
