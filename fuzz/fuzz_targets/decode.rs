//! Any bytes as a client frame: the decoder answers with a frame or a decoding error
//! (`bad_frame`, `unknown_type`), and never panics.

#![no_main]

use chat_core::protocol::{decode_with_ref, ErrorCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(error) = decode_with_ref(data) {
        assert!(
            matches!(error.code, ErrorCode::BadFrame | ErrorCode::UnknownType),
            "{:?}",
            error.code
        );
    }
});
