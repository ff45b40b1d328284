#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| driftsync_engine::fuzz::native_server_frame(data));
