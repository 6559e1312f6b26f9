//! Arbitrary bytes through the Azure protocol's decoders of untrusted
//! input: listeners' control messages and responses, WebSocket-mode and
//! plain HTTP request targets and headers. See `relay::azure::fuzzing` for
//! how the input is read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    relay::azure::fuzzing::run_messages(data);
});
