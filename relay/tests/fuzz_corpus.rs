//! Replays the committed fuzz corpus (`fuzz/corpus/azure_messages`)
//! through the function the fuzz target calls, on stable Rust.

use std::path::PathBuf;

use relay::azure::fuzzing;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/azure_messages")
}

#[test]
fn replay_azure_messages_corpus() {
    let dir = corpus_dir();
    if std::env::var_os("RELAY_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in fuzzing::seed_inputs() {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let seeds = fuzzing::seed_inputs();
    assert!(
        files.len() >= seeds.len(),
        "corpus has {} files, fewer than the {} seeds; run with RELAY_WRITE_SEEDS=1",
        files.len(),
        seeds.len()
    );
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let result = std::panic::catch_unwind(|| fuzzing::run_messages(&data));
        assert!(result.is_ok(), "{} panicked a decoder", file.display());
    }
}

/// A cheap stand-in for the fuzzer on stable Rust: seeded random mutations
/// of the seeds (bit flips, byte changes, splices, truncation).
#[test]
fn mutated_seeds_never_panic() {
    let seeds: Vec<Vec<u8>> = fuzzing::seed_inputs().into_iter().map(|(_, b)| b).collect();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let iterations: u64 = std::env::var("RELAY_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    for i in 0..iterations {
        let mut input = seeds[(next() % seeds.len() as u64) as usize].clone();
        if next() % 3 == 0 {
            let other = &seeds[(next() % seeds.len() as u64) as usize];
            input.extend_from_slice(other);
        }
        for _ in 0..(1 + next() % 8) {
            if input.is_empty() {
                break;
            }
            let at = (next() % input.len() as u64) as usize;
            match next() % 4 {
                0 => input[at] ^= 1 << (next() % 8),
                1 => input[at] = next() as u8,
                2 => input.truncate(at),
                _ => input.insert(at, next() as u8),
            }
        }
        let result = std::panic::catch_unwind(|| fuzzing::run_messages(&input));
        assert!(
            result.is_ok(),
            "iteration {i} panicked on input {:02x?}",
            input
        );
    }
}
