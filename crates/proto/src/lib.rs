//! etcd's v3 wire protocol and MetaStore's internal messages.
//!
//! Owns: the Rust types generated from `proto/` (etcdserverpb, mvccpb, authpb, v3lockpb,
//! v3electionpb) with tonic clients and servers, and `metastorepb` (the raft entry payload).
//! Must not depend on any other MetaStore crate. Field numbers come from etcd's own .proto files,
//! so every etcd client interoperates. The etcd packages also implement serde's `Serialize` and
//! `Deserialize` as protobuf's JSON mapping with the .proto field names (pbjson), which the
//! HTTP/JSON gateway speaks.

#![allow(clippy::all, missing_docs)]

pub mod codec;
pub mod range_frame;
pub mod range_service;
pub mod watch_frame;

/// Key-value and event types (`mvccpb`).
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

/// Users, roles and permissions (`authpb`).
pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

/// The etcd v3 services and their messages (`etcdserverpb`).
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

/// The lock service (`v3lockpb`).
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

/// The election service (`v3electionpb`).
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

/// MetaStore's internal messages: the payload of a raft log entry.
pub mod metastorepb {
    tonic::include_proto!("metastorepb");
}
