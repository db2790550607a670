//! Compiles the .proto files under the workspace's `proto/` with the vendored protoc, so that a
//! fresh machine needs no system protoc, and generates the serde impls of etcd's packages for
//! the HTTP/JSON gateway from the same descriptors.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script binary compiled in one checkout may be reused for another.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // tonic-prost-build reads the compiler from PROTOC.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let files = [
        "etcd/api/mvccpb/kv.proto",
        "etcd/api/authpb/auth.proto",
        "etcd/api/etcdserverpb/rpc.proto",
        "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
        "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
        "metastore/internal.proto",
        "metastore/peer.proto",
    ];
    let paths: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
    let descriptors_path = out.join("descriptors.bin");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Messages encoded into a buffer of their exact size (src/codec.rs).
        .codec_path("crate::codec::SizedCodec")
        .file_descriptor_set_path(&descriptors_path)
        .compile_protos(&paths, &[root.clone(), well_known])?;

    // The Watch service again, over responses whose events are encoded once and shared
    // (src/watch_frame.rs): same route and request type, and the same bytes on the wire.
    let watch = tonic_build::manual::Service::builder()
        .name("Watch")
        .package("etcdserverpb")
        .method(
            tonic_build::manual::Method::builder()
                .name("watch")
                .route_name("Watch")
                .input_type("crate::etcdserverpb::WatchRequest")
                .output_type("crate::watch_frame::WatchFrame")
                .codec_path("crate::codec::SizedCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    // The KV service again, with Range answering responses whose key-values may be the stored
    // encodings (src/range_frame.rs): same routes and request types, same bytes on the wire.
    let unary = |name: &str, route: &str, input: &str, output: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::etcdserverpb::{input}"))
            .output_type(output)
            .codec_path("crate::codec::SizedCodec")
            .build()
    };
    let kv = tonic_build::manual::Service::builder()
        .name("KV")
        .package("etcdserverpb")
        .method(unary(
            "range",
            "Range",
            "RangeRequest",
            "crate::range_frame::RangeFrame",
        ))
        .method(unary(
            "put",
            "Put",
            "PutRequest",
            "crate::etcdserverpb::PutResponse",
        ))
        .method(unary(
            "delete_range",
            "DeleteRange",
            "DeleteRangeRequest",
            "crate::etcdserverpb::DeleteRangeResponse",
        ))
        .method(unary(
            "txn",
            "Txn",
            "TxnRequest",
            "crate::etcdserverpb::TxnResponse",
        ))
        .method(unary(
            "compact",
            "Compact",
            "CompactionRequest",
            "crate::etcdserverpb::CompactionResponse",
        ))
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[watch, kv]);

    // etcd's gateway (grpc-gateway v1, jsonpb with OrigName) writes the .proto field names.
    let descriptors = std::fs::read(&descriptors_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[
            ".mvccpb",
            ".authpb",
            ".etcdserverpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
