//! Every request message the services take, decoded and validated from arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = geomatch::grpc::fuzz::requests(data);
});
