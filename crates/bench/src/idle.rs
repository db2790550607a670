//! Watchers no write matches (`--idle-watchers`): opened before a workload starts and held open
//! until it ends, so that the workload measures what a write costs beside many watchers on other
//! keys (a write should cost what its matching watchers cost, not what all watchers cost).

use anyhow::{bail, Context, Result};
use metastore_proto::etcdserverpb::watch_client::WatchClient;
use metastore_proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};
use tokio::task::JoinHandle;

use crate::endpoints::connect;

/// The open streams; dropping this closes them.
pub(crate) struct IdleWatchers {
    streams: Vec<JoinHandle<()>>,
}

impl Drop for IdleWatchers {
    fn drop(&mut self) {
        for stream in &self.streams {
            stream.abort();
        }
    }
}

/// The key idle watcher `n` watches: nobody writes under this prefix.
pub(crate) fn idle_key(n: usize) -> Vec<u8> {
    format!("metastore-bench-idle/{n:08}").into_bytes()
}

/// Opens `watchers` watchers, each on its own key, over `streams` streams spread over
/// `conns` connections to `endpoints`, and returns once every one is created.
pub(crate) async fn open(
    endpoints: &[String],
    conns: usize,
    watchers: usize,
    streams: usize,
) -> Result<IdleWatchers> {
    let channels = connect(endpoints, conns).await?;
    let streams = streams.clamp(1, watchers.max(1));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(streams);
    let mut open = IdleWatchers {
        streams: Vec::with_capacity(streams),
    };
    let mut next = 0;
    for s in 0..streams {
        let per_stream = watchers / streams + usize::from(s < watchers % streams);
        let (tx, body) = tokio::sync::mpsc::channel(per_stream.max(1));
        for _ in 0..per_stream {
            tx.send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(
                    WatchCreateRequest {
                        key: idle_key(next),
                        ..Default::default()
                    },
                )),
            })
            .await?;
            next += 1;
        }
        let mut client = WatchClient::new(channels[s % channels.len()].clone());
        let mut answers = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(body))
            .await
            .context("opening an idle watch stream")?
            .into_inner();
        let ready = ready_tx.clone();
        open.streams.push(tokio::spawn(async move {
            // Held so that the stream stays open.
            let _requests = tx;
            let mut created = 0;
            loop {
                match answers.message().await {
                    Ok(Some(answer)) if answer.created => {
                        created += 1;
                        if created == per_stream {
                            let _ = ready.send(Ok(())).await;
                        }
                    }
                    Ok(Some(answer)) if !answer.events.is_empty() => {
                        let _ = ready
                            .send(Err("an idle watcher received an event".to_string()))
                            .await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(status) => {
                        let _ = ready.send(Err(status.to_string())).await;
                        break;
                    }
                }
            }
        }));
    }
    drop(ready_tx);
    for _ in 0..streams {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => bail!("idle watchers: {e}"),
            None => bail!("an idle watch stream ended before its watchers were created"),
        }
    }
    Ok(open)
}
