#![no_main]
//! See [`metastore_fuzz::entry_apply`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore_fuzz::entry_apply(data));
