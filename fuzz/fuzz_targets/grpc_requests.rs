#![no_main]
//! See [`metastore_fuzz::grpc_requests`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore_fuzz::grpc_requests(data));
