#![no_main]
//! See [`metastore_fuzz::peer_message`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore_fuzz::peer_message(data));
