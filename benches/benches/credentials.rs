//! Micro-benchmarks of what the relay and the peers do with credentials:
//! parsing a connection string, signing a SAS token, and the relay's check of
//! a token against an HC's rules (a good token, one signed with the
//! secondary key, and a forged one, which must cost about the same).
//!
//! `cargo bench -p hybridlink-benches --bench credentials`

use std::hint::black_box;
use std::str::FromStr;

use criterion::{Criterion, criterion_group, criterion_main};
use proto::connection_string::ConnectionString;
use proto::key::{Key, Right};
use proto::name::HcName;
use proto::sas::{self, RuleKeys};

const NOW: u64 = 1_800_000_000;

fn credentials(c: &mut Criterion) {
    let send_primary = Key::generate().expect("key");
    let send_secondary = Key::generate().expect("key");
    let listen_primary = Key::generate().expect("key");
    let listen_secondary = Key::generate().expect("key");
    let text = format!(
        "Endpoint=sb://relay.example:9443/;SharedAccessKeyName=send;SharedAccessKey={};\
         EntityPath=payroll;CertificateSha256={}",
        send_primary.as_str(),
        "ab".repeat(32)
    );
    let cs = ConnectionString::from_str(&text).expect("a valid connection string");
    let hc = HcName::from_str("payroll").expect("name");
    let rules = [
        RuleKeys {
            name: "send",
            right: Right::Send,
            primary: &send_primary,
            secondary: &send_secondary,
        },
        RuleKeys {
            name: "listen",
            right: Right::Listen,
            primary: &listen_primary,
            secondary: &listen_secondary,
        },
    ];
    let good = cs.token(NOW + 3600);
    let secondary = sas::sign(&cs.resource_uri(), "send", &send_secondary, NOW + 3600);
    let forged = sas::sign(&cs.resource_uri(), "send", &listen_primary, NOW + 3600);

    let mut g = c.benchmark_group("credentials");
    g.bench_function("parse a connection string", |b| {
        b.iter(|| ConnectionString::from_str(black_box(&text)).expect("valid"))
    });
    g.bench_function("sign a SAS token", |b| {
        b.iter(|| black_box(&cs).token(black_box(NOW + 3600)))
    });
    g.bench_function("verify a token (primary key)", |b| {
        b.iter(|| sas::verify(black_box(&good), &hc, Right::Send, &rules, NOW).expect("valid"))
    });
    g.bench_function("verify a token (secondary key)", |b| {
        b.iter(|| sas::verify(black_box(&secondary), &hc, Right::Send, &rules, NOW).expect("valid"))
    });
    g.bench_function("refuse a forged token", |b| {
        b.iter(|| {
            sas::verify(black_box(&forged), &hc, Right::Send, &rules, NOW).expect_err("forged")
        })
    });
    g.finish();
}

criterion_group!(benches, credentials);
criterion_main!(benches);
