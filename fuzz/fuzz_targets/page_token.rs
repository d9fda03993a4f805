//! Page tokens from arbitrary strings: refused cleanly unless genuine.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let accepted = geomatch::grpc::fuzz::page_token(token);
        assert!(!accepted || token.is_empty(), "forged token accepted: {token:?}");
    }
});
