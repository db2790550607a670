//! Watch streams.
//!
//! Owns: [`WatchStream`], one client's handle (creates, cancels, progress requests and the
//! periodic progress notification; dropping it removes its watchers), and the hub's side of
//! each: opening and closing a stream, creating a watcher (its id, its start, synced or not),
//! cancelling one, and the progress of a whole stream.

use foldhash::{HashSet, HashSetExt};
use std::sync::Arc;

use metastore_proto::etcdserverpb::{
    watch_create_request::FilterType, WatchCreateRequest, WatchResponse,
};
use metastore_proto::watch_frame::WatchFrame;
use tokio::sync::mpsc::{self, OwnedPermit};

use crate::response::response;
use crate::watcher::{StreamState, Watcher};
use crate::{
    HubInner, WatchError, WatchHub, DUPLICATE_ID, EMPTY_RANGE, PROGRESS_ALL_WATCHERS, STREAM_BUFFER,
};

impl WatchHub {
    /// Opens a watch stream whose responses arrive on the returned receiver.
    pub fn open_stream(self: &Arc<Self>) -> (WatchStream, mpsc::Receiver<WatchFrame>) {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut inner = self.lock_from_task();
        let id = inner.next_stream_id;
        inner.next_stream_id += 1;
        inner.streams.insert(
            id,
            StreamState {
                next_watch_id: 0,
                ids: HashSet::new(),
            },
        );
        (
            WatchStream {
                hub: self.clone(),
                id,
                tx,
            },
            rx,
        )
    }

    fn create(
        &self,
        stream_id: u64,
        req: WatchCreateRequest,
        permit: OwnedPermit<WatchFrame>,
        tx: mpsc::Sender<WatchFrame>,
    ) {
        let mut inner = self.lock_from_task();
        let (now, live_from) = {
            let queue = self.queue.lock();
            (
                queue.notified_rev,
                inner.dispatched_rev.max(queue.gap_through),
            )
        };
        let Some(stream) = inner.streams.get_mut(&stream_id) else {
            return;
        };
        let range_end = match req.range_end.as_slice() {
            [] => None,
            [0] => Some(Vec::new()),
            end => Some(end.to_vec()),
        };
        let refuse = |reason: &str| {
            let mut resp = response(now, -1);
            resp.created = true;
            resp.canceled = true;
            resp.cancel_reason = reason.to_string();
            resp
        };
        if range_end
            .as_ref()
            .is_some_and(|end| !end.is_empty() && req.key.as_slice() >= end.as_slice())
        {
            permit.send(refuse(EMPTY_RANGE).into());
            return;
        }
        let watch_id = if req.watch_id == 0 {
            while stream.ids.contains(&stream.next_watch_id) {
                stream.next_watch_id += 1;
            }
            stream.next_watch_id += 1;
            stream.next_watch_id - 1
        } else if stream.ids.contains(&req.watch_id) {
            permit.send(refuse(DUPLICATE_ID).into());
            return;
        } else {
            req.watch_id
        };
        stream.ids.insert(watch_id);
        let next_rev = if req.start_revision > 0 {
            req.start_revision
        } else {
            now + 1
        };
        let watcher = Watcher {
            key: req.key,
            range_end,
            next_rev,
            prev_kv: req.prev_kv,
            no_put: req.filters.contains(&(FilterType::Noput as i32)),
            no_delete: req.filters.contains(&(FilterType::Nodelete as i32)),
            fragment: req.fragment,
            progress_notify: req.progress_notify,
            tx,
        };
        let mut created = response(now, watch_id);
        created.created = true;
        permit.send(created.into());
        let key = (stream_id, watch_id);
        // Revisions after `live_from` are queued for the synced watchers: one that needs
        // nothing older gets them there, even if it was created after they were applied.
        if next_rev > live_from {
            inner.synced.insert(key, watcher);
        } else {
            inner.unsynced.insert(key, watcher);
            drop(inner);
            self.wake_sync();
        }
    }

    fn cancel(&self, stream_id: u64, watch_id: i64, permit: OwnedPermit<WatchFrame>) {
        let mut inner = self.lock_from_task();
        let now = self.queue.lock().notified_rev;
        if inner.remove((stream_id, watch_id)) {
            let mut resp = response(now, watch_id);
            resp.canceled = true;
            permit.send(resp.into());
        }
    }

    /// The revision up to which every watcher of the stream has been sent everything.
    fn stream_progress(inner: &HubInner, stream_id: u64, notified: i64) -> Option<i64> {
        let stream = inner.streams.get(&stream_id)?;
        let least = stream
            .ids
            .iter()
            .filter_map(|id| inner.progress(&(stream_id, *id), notified))
            .min();
        Some(least.unwrap_or(notified))
    }

    fn close_stream(&self, stream_id: u64) {
        let mut inner = self.lock_from_task();
        if let Some(stream) = inner.streams.remove(&stream_id) {
            for id in stream.ids {
                inner.synced.remove((stream_id, id));
                inner.unsynced.remove((stream_id, id));
            }
        }
    }
}

/// One client watch stream: creates, cancels and progress requests. Dropping it removes its
/// watchers.
pub struct WatchStream {
    hub: Arc<WatchHub>,
    id: u64,
    tx: mpsc::Sender<WatchFrame>,
}

impl WatchStream {
    /// Creates a watcher and queues its `created` response ahead of any of its events.
    pub async fn create(&self, req: WatchCreateRequest) -> Result<(), WatchError> {
        let permit = self
            .tx
            .clone()
            .reserve_owned()
            .await
            .map_err(|_| WatchError::Closed)?;
        let _gate = self.hub.task_gate.acquire().await;
        self.hub.create(self.id, req, permit, self.tx.clone());
        Ok(())
    }

    /// Resolves once the stream's responses are no longer read (the client went away).
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Queues a response made outside the hub (a create refused before it reached the hub).
    pub async fn send(&self, resp: WatchResponse) -> Result<(), WatchError> {
        self.tx
            .send(resp.into())
            .await
            .map_err(|_| WatchError::Closed)
    }

    /// Cancels a watcher of this stream; an unknown id is ignored, as etcd does.
    pub async fn cancel(&self, watch_id: i64) -> Result<(), WatchError> {
        let permit = self
            .tx
            .clone()
            .reserve_owned()
            .await
            .map_err(|_| WatchError::Closed)?;
        let _gate = self.hub.task_gate.acquire().await;
        self.hub.cancel(self.id, watch_id, permit);
        Ok(())
    }

    /// Answers a WatchProgressRequest: a response for every watcher of the stream
    /// (`watch_id` -1) at the revision up to which all of them have been sent everything.
    pub async fn request_progress(&self) -> Result<(), WatchError> {
        let permit = self
            .tx
            .clone()
            .reserve_owned()
            .await
            .map_err(|_| WatchError::Closed)?;
        // Under the hub's lock, which dispatch holds for a whole revision: the response is
        // queued after every event it speaks for.
        let _gate = self.hub.task_gate.acquire().await;
        let inner = self.hub.lock_from_task();
        let notified = self.hub.queue.lock().notified_rev;
        if let Some(rev) = WatchHub::stream_progress(&inner, self.id, notified) {
            permit.send(response(rev, PROGRESS_ALL_WATCHERS).into());
        }
        Ok(())
    }

    /// The periodic progress notification: an empty response to every synced watcher created
    /// with `progress_notify`, at the revision up to which it has been sent everything (so not
    /// past revisions still queued for dispatch). Skipped for watchers whose stream is full.
    pub fn progress_notify(&self) {
        let inner = self.hub.lock_from_task();
        let notified = self.hub.queue.lock().notified_rev;
        let Some(stream) = inner.streams.get(&self.id) else {
            return;
        };
        for id in &stream.ids {
            let key = (self.id, *id);
            if let Some(w) = inner.synced.get(&key) {
                if w.progress_notify {
                    let rev = inner.progress(&key, notified).unwrap_or(notified);
                    let _ = w.tx.try_send(response(rev, *id).into());
                }
            }
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.hub.close_stream(self.id);
    }
}
