#![no_main]
//! See [`metastore_fuzz::snapshot_metastore`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore_fuzz::snapshot_metastore(data));
