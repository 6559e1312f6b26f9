//! Replays the committed fuzz corpora of the Azure protocol
//! (`fuzz/corpus/azure_*`) through the functions the fuzz targets call, on
//! stable Rust, and runs seeded mutations of the seeds as a cheap stand-in
//! for the fuzzer. `AZURE_WRITE_SEEDS=1` rewrites the seed files.

use std::path::PathBuf;

use relay::azure::fuzzing;

/// A fuzz target's name and the function it calls.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 4] = [
    ("request", fuzzing::run_request),
    ("control", fuzzing::run_control),
    ("frames", fuzzing::run_frames),
    ("messages", fuzzing::run_messages),
];

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../fuzz/corpus/azure_{target}"))
}

#[test]
fn replay_the_azure_corpora() {
    let seeds = fuzzing::seed_inputs();
    if std::env::var_os("AZURE_WRITE_SEEDS").is_some() {
        for (name, target, bytes) in &seeds {
            let dir = corpus_dir(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
    for (target, run) in TARGETS {
        let dir = corpus_dir(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let wanted = seeds.iter().filter(|(_, t, _)| *t == target).count();
        assert!(
            files.len() >= wanted,
            "{} has {} files, fewer than its {wanted} seeds; run with AZURE_WRITE_SEEDS=1",
            dir.display(),
            files.len()
        );
        for file in &files {
            let data = std::fs::read(file).unwrap();
            let result = std::panic::catch_unwind(|| run(&data));
            assert!(result.is_ok(), "{} broke an invariant", file.display());
        }
    }
}

/// Bit flips, byte changes, splices and truncations of the seeds.
#[test]
fn mutated_seeds_keep_the_invariants() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let iterations: u64 = std::env::var("AZURE_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    for (target, run) in TARGETS {
        let seeds: Vec<Vec<u8>> = fuzzing::seed_inputs()
            .into_iter()
            .filter(|(_, t, _)| *t == target)
            .map(|(_, _, b)| b)
            .collect();
        for i in 0..iterations {
            let mut input = seeds[(next() % seeds.len() as u64) as usize].clone();
            if next() % 4 == 0 {
                let other = &seeds[(next() % seeds.len() as u64) as usize];
                input.extend_from_slice(other);
            }
            for _ in 0..(1 + next() % 6) {
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
            let result = std::panic::catch_unwind(|| run(&input));
            assert!(
                result.is_ok(),
                "{target}, iteration {i}: broke an invariant on {:02x?}",
                input
            );
        }
    }
}
