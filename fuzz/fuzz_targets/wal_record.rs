#![no_main]
//! See [`metastore_fuzz::wal_record`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore_fuzz::wal_record(data));
