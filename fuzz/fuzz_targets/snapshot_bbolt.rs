#![no_main]
//! See [`metastore_fuzz::snapshot_bbolt`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore_fuzz::snapshot_bbolt(data));
