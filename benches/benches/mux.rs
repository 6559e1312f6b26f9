//! Micro-benchmarks of the stream multiplexer's frame codec and of one
//! stream's data path through two `proto::mux::Mux` state machines (no I/O).

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use proto::frame::{DEFAULT_MAX_PAYLOAD, Frame, StreamId};
use proto::mux::{Config, Event, Mux, Side};

const MIB: usize = 1024 * 1024;

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let payload = Bytes::from(vec![0xabu8; 64 * 1024]);
    let mut encoded = BytesMut::new();
    for i in 0..16 {
        Frame::Data {
            id: StreamId::new(2 * i + 1),
            data: payload.clone(),
        }
        .encode(&mut encoded);
    }
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("encode 16 x 64 KiB DATA", |b| {
        let mut out = BytesMut::with_capacity(2 * MIB);
        b.iter(|| {
            out.clear();
            for i in 0..16 {
                Frame::Data {
                    id: StreamId::new(2 * i + 1),
                    data: payload.clone(),
                }
                .encode(&mut out);
            }
            black_box(out.len())
        })
    });
    g.bench_function("decode 16 x 64 KiB DATA", |b| {
        b.iter(|| {
            let mut buf = encoded.clone();
            let mut n = 0;
            while let Some(f) = Frame::decode(&mut buf, DEFAULT_MAX_PAYLOAD).unwrap() {
                n += 1;
                black_box(f);
            }
            n
        })
    });
    let mut small = BytesMut::new();
    for i in 0..1000u32 {
        Frame::Window {
            id: StreamId::new(2 * i + 1),
            increment: 65536,
        }
        .encode(&mut small);
    }
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode 1000 WINDOW frames", |b| {
        b.iter(|| {
            let mut buf = small.clone();
            while let Some(f) = Frame::decode(&mut buf, DEFAULT_MAX_PAYLOAD).unwrap() {
                black_box(f);
            }
        })
    });
    g.finish();
}

/// One stream, client to server: `write` into the client, move the bytes,
/// `handle_input` and `read` on the server, repeat. Measures the state
/// machines' cost per byte (two copies: write and read).
fn stream_path(c: &mut Criterion) {
    let now = Instant::now();
    let cfg = Config {
        max_window: 16 * MIB as u32,
        ..Config::default()
    };
    let mut client = Mux::new(Side::Client, cfg.clone(), now);
    let mut server = Mux::new(Side::Server, cfg, now);
    let mut wire = BytesMut::new();
    let id = client.open(Bytes::from_static(b"bench")).unwrap();
    client.poll_transmit(&mut wire);
    server.handle_input(&mut wire, now);
    server.accept(id, Bytes::new()).unwrap();
    server.poll_transmit(&mut wire);
    client.handle_input(&mut wire, now);
    while client.poll_event().is_some() {}
    while server.poll_event().is_some() {}

    let data = vec![0x42u8; MIB];
    let mut sink = vec![0u8; 256 * 1024];
    let mut g = c.benchmark_group("mux");
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("1 MiB through write/transmit/input/read", |b| {
        b.iter(|| {
            let mut left = MIB;
            while left > 0 {
                let n = client.write(id, &data[MIB - left..]).unwrap_or(0);
                left -= n;
                client.poll_transmit(&mut wire);
                server.handle_input(&mut wire, now);
                while let Ok(k) = server.read(id, &mut sink, now) {
                    black_box(&sink[..k]);
                }
                server.poll_transmit(&mut wire);
                client.handle_input(&mut wire, now);
                while let Some(e) = client.poll_event() {
                    black_box(matches!(e, Event::Writable { .. }));
                }
                while server.poll_event().is_some() {}
            }
        })
    });
    g.finish();
}

criterion_group!(benches, codec, stream_path);
criterion_main!(benches);
