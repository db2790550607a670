#![no_main]
//! See [`metastore_fuzz::conf_change`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore_fuzz::conf_change(data));
