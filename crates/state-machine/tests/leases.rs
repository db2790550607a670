//! Leases as the state machine applies them: grants and revokes are deterministic and persisted
//! with the applied index, keys follow their lease, a revoke deletes them in one revision (seen by
//! watchers), and the table with its attachments is rebuilt on open and on snapshot restore.

mod common;
use common::count;

use std::sync::Arc;

use metastore_proto::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, WatchCreateRequest,
};
use metastore_proto::metastorepb::internal_raft_request::Request;
use metastore_proto::watch_frame::WatchFrame;
use metastore_raft_node::StateMachine;
use metastore_state_machine::{buckets, encode_request, ApplyError, KvStateMachine, Output};
use metastore_storage::Backend;
use metastore_storage_mem::MemBackend;
use metastore_watch::WatchStream;
use tokio::sync::mpsc::Receiver;

fn put(key: &str, lease: i64) -> Vec<u8> {
    encode_request(Request::Put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        lease,
        ..Default::default()
    }))
}

fn grant(id: i64, ttl: i64) -> Vec<u8> {
    encode_request(Request::LeaseGrant(LeaseGrantRequest { id, ttl }))
}

fn revoke(id: i64) -> Vec<u8> {
    encode_request(Request::LeaseRevoke(LeaseRevokeRequest { id }))
}

/// A watch stream with one watcher on [k, l), created; keep the stream to keep the watcher.
async fn watch_k_to_l(sm: &KvStateMachine) -> (WatchStream, Receiver<WatchFrame>) {
    let (stream, mut responses) = sm.watch_hub().open_stream();
    stream
        .create(WatchCreateRequest {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(responses.recv().await.unwrap().head.created);
    (stream, responses)
}

#[tokio::test]
async fn grant_attach_revoke_and_reopen() {
    let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(&buckets()));
    let mut sm = KvStateMachine::open(backend.clone()).unwrap();
    sm.lessor().set_min_ttl_secs(2);
    let (_stream, _responses) = watch_k_to_l(&sm).await;

    match sm.apply(1, 1, &grant(10, 1)) {
        Ok(Output::LeaseGrant { id, ttl_secs }) => assert_eq!((id, ttl_secs), (10, 2)),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        sm.apply(2, 1, &grant(10, 5)),
        Err(ApplyError::Lease(metastore_lease::LeaseError::Exists))
    ));
    assert!(sm.apply(3, 1, &grant(20, 30)).is_ok());
    for (i, key) in ["k1", "k2", "k3"].into_iter().enumerate() {
        assert!(sm.apply(4 + i as u64, 1, &put(key, 10)).is_ok());
    }
    // k3 moves to lease 20: a revoke of 10 must leave it.
    assert!(sm.apply(7, 1, &put("k3", 20)).is_ok());
    assert!(matches!(
        sm.apply(8, 1, &put("k4", 99)),
        Err(ApplyError::Mvcc(metastore_mvcc::MvccError::LeaseNotFound))
    ));
    assert_eq!(sm.applied_index(), 8);

    // Reopen on the same backend: leases and attachments come back.
    drop(sm);
    let mut sm = KvStateMachine::open(backend.clone()).unwrap();
    assert_eq!(sm.lessor().leases(), vec![10, 20]);
    assert_eq!(
        sm.lessor().attached_keys(10).unwrap(),
        vec![b"k1".to_vec(), b"k2".to_vec()]
    );
    let (_stream, mut responses) = watch_k_to_l(&sm).await;
    let revision = match sm.apply(9, 1, &revoke(10)) {
        Ok(Output::LeaseRevoke { revision }) => revision,
        other => panic!("unexpected {other:?}"),
    };
    let deleted = responses.recv().await.unwrap().into_response().unwrap();
    assert_eq!(deleted.events.len(), 2, "both keys in one response");
    assert!(deleted
        .events
        .iter()
        .all(|e| e.kv.as_ref().unwrap().mod_revision == revision));
    assert_eq!(count(&sm, "k", "l"), 1);
    assert!(matches!(
        sm.apply(10, 1, &revoke(10)),
        Err(ApplyError::Lease(metastore_lease::LeaseError::NotFound))
    ));

    // A snapshot restore rebuilds the table from the snapshot's content.
    let mut snapshot = Vec::new();
    (sm.snapshot())(&mut snapshot).unwrap();
    let other: Arc<dyn Backend> = Arc::new(MemBackend::new(&buckets()));
    let mut restored = KvStateMachine::open(other).unwrap();
    restored.restore(10, 1, &mut snapshot.as_slice()).unwrap();
    assert_eq!(restored.lessor().leases(), vec![20]);
    assert_eq!(
        restored.lessor().attached_keys(20).unwrap(),
        vec![b"k3".to_vec()]
    );

    // A put without a lease detaches the key (the put does not read the previous value; the
    // lessor knows each key's lease), and so does a delete.
    assert!(restored.apply(11, 1, &put("k5", 20)).is_ok());
    assert!(restored.apply(12, 1, &put("k3", 0)).is_ok());
    assert_eq!(
        restored.lessor().attached_keys(20).unwrap(),
        vec![b"k5".to_vec()]
    );
    let delete_k5 = encode_request(Request::DeleteRange(DeleteRangeRequest {
        key: b"k5".to_vec(),
        ..Default::default()
    }));
    assert!(restored.apply(13, 1, &delete_k5).is_ok());
    assert!(restored.lessor().attached_keys(20).unwrap().is_empty());
    // Revoking lease 20 now deletes nothing: k3 left it.
    assert!(restored.apply(14, 1, &revoke(20)).is_ok());
    assert_eq!(count(&restored, "k3", ""), 1);
}
