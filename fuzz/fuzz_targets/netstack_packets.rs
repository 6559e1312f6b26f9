//! Arbitrary bytes through netstack's whole packet path: classification,
//! smoltcp's interface poll with live sockets, the flow table and a stream.
//! See `netstack::fuzzing` for how the input is read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    netstack::fuzzing::run_packets(data);
});
