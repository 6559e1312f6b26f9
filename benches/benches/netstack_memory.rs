//! Micro-benchmark of the netstack over an in-memory device: in-order TCP
//! segments from the client go through the engine and smoltcp into the
//! caller's stream, which is read dry after each one (no tun, no kernel).
//! `netstack_tun` measures the same stack behind a real tun.
//!
//! `cargo bench -p hybridlink-benches --bench netstack_memory`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use netstack::fuzzing::Bulk;

fn inbound(c: &mut Criterion) {
    let mut g = c.benchmark_group("netstack in memory");
    for segment in [1460usize, 16 * 1024, 65535 - 40] {
        const SEGMENTS: usize = 64;
        g.throughput(Throughput::Bytes((segment * SEGMENTS) as u64));
        let mut flow = Bulk::new(segment);
        g.bench_function(format!("inbound, {segment}-byte segments"), |b| {
            b.iter(|| {
                let read = flow.inbound(SEGMENTS);
                assert_eq!(read, segment * SEGMENTS, "every byte reaches the stream");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, inbound);
criterion_main!(benches);
