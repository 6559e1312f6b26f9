//! Arbitrary input for the Azure protocol's parsers; see `relay::azure::fuzzing::run_control` for what the input is.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    relay::azure::fuzzing::run_control(data);
});
