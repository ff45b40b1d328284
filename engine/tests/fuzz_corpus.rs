//! The fuzz target bodies (`driftsync_engine::fuzz`, run by cargo-fuzz from `fuzz/`) over every
//! fixture file, then over a seeded random mutation loop: bit flips, byte overwrites,
//! truncations, splices of two inputs, inflated varints, duplicated and deleted ranges.
//!
//! The loop runs `DRIFTSYNC_FUZZ_ITERATIONS` inputs (default 20,000) and prints its seed; a
//! failure prints the seed, the input and the target. Rerun one with `DRIFTSYNC_SEED=<seed>`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use driftsync_engine::{doc, fuzz, validate};
use driftsync_protocol::yjs::YMessage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A fuzz target: its cargo-fuzz name and its body.
type Target = (&'static str, fn(&[u8]));

/// Every target body, by its cargo-fuzz name.
const TARGETS: [Target; 5] = [
    ("native_client_frame", fuzz::native_client_frame),
    ("native_server_frame", fuzz::native_server_frame),
    ("yjs_message", fuzz::yjs_message),
    ("state_vector", fuzz::state_vector),
    ("update_apply", fuzz::update_apply),
];

/// Mutation seeds longer than this are left out of the loop (they are still run whole once).
const MAX_SEED_LEN: usize = 4096;

fn fixture_files() -> Vec<(String, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let mut files = Vec::new();
    for dir in ["wire", "yjs", "crashers"] {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .collect();
        entries.sort();
        for path in entries {
            let name = format!("{dir}/{}", path.file_name().unwrap().to_string_lossy());
            files.push((name, std::fs::read(&path).unwrap()));
        }
    }
    assert!(files.len() > 20, "fixtures not found");
    files
}

/// Valid yrs bytes to mutate besides the fixtures: the payloads of the y-websocket fixtures, and
/// updates and state vectors of a small document touching text, maps, deletions.
fn generated_seeds(files: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (_, bytes) in files {
        if let Ok(YMessage::SyncStep1(b) | YMessage::SyncStep2(b) | YMessage::Update(b)) =
            YMessage::decode(bytes, usize::MAX)
        {
            seeds.push(b);
        }
    }
    let a = doc::new_doc(1).unwrap();
    let b = doc::new_doc((1 << 53) - 1).unwrap();
    seeds.push(doc::text_insert(&a, 0, "héllo 🌍").unwrap());
    seeds.push(doc::map_set(
        &a,
        "k",
        vec![yrs::Any::from(1), yrs::Any::from("x"), yrs::Any::Null],
    ));
    doc::apply_bytes(&b, &doc::encode_state(&a)).unwrap();
    seeds.push(doc::text_insert(&b, 3, "ab").unwrap());
    seeds.push(doc::text_delete(&b, 1, 3).unwrap());
    seeds.push(doc::map_remove(&b, "k"));
    seeds.push(doc::encode_state(&b));
    seeds.push(doc::state_vector(&b));
    seeds
}

/// One random mutation of `input` (`other` is a second input to splice from).
fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        let len = out.len();
        match rng.random_range(0..8) {
            // Flip a bit.
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            // Overwrite a byte with an interesting value.
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x0a, 0x75, 0x76, 0x08, 0x07][rng.random_range(0..10)];
            }
            // Truncate.
            2 if len > 0 => out.truncate(rng.random_range(0..len)),
            // Splice: a prefix of this input, then a suffix of the other.
            3 if !other.is_empty() => {
                let cut = rng.random_range(0..=len);
                let from = rng.random_range(0..other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            // Inflate a varint: insert a long or huge one.
            4 => {
                let i = rng.random_range(0..=len);
                let varint: &[u8] = match rng.random_range(0..4) {
                    0 => &[0xff, 0xff, 0xff, 0xff, 0x0f],
                    1 => &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f],
                    2 => &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00],
                    _ => &[0x81, 0x80, 0x00],
                };
                out.splice(i..i, varint.iter().copied());
            }
            // Duplicate a range.
            5 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len.min(a + 64));
                let chunk = out[a..b].to_vec();
                let at = rng.random_range(0..=len);
                out.splice(at..at, chunk);
            }
            // Delete a range.
            6 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len.min(a + 16));
                out.drain(a..b);
            }
            // Insert random bytes.
            _ => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(i..i, bytes);
            }
        }
    }
    out
}

/// Runs every body on `input`; on a panic, says which body, which input, and how to rerun.
fn run_all(input: &[u8], context: &dyn Fn() -> String) {
    for (name, body) in TARGETS {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(input))) {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            eprintln!(
                "fuzz target {name} FAILED: {message}\n  {}\n  input ({} bytes): {}",
                context(),
                input.len(),
                hex(input)
            );
            std::panic::resume_unwind(panic);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_fixture_passes_every_target() {
    for (name, bytes) in fixture_files() {
        run_all(&bytes, &|| format!("fixture {name}"));
    }
}

#[test]
fn mutated_inputs_pass_every_target() {
    let seed: u64 = match std::env::var("DRIFTSYNC_SEED") {
        Ok(seed) => seed.parse().expect("DRIFTSYNC_SEED is a u64"),
        Err(_) => rand::random(),
    };
    let iterations: usize = std::env::var("DRIFTSYNC_FUZZ_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    eprintln!("fuzz_corpus: {iterations} mutated inputs, seed {seed}");
    let files = fixture_files();
    let mut corpus: Vec<Vec<u8>> = files
        .iter()
        .map(|(_, b)| b.clone())
        .filter(|b| b.len() <= MAX_SEED_LEN)
        .collect();
    corpus.extend(generated_seeds(&files));
    let mut rng = StdRng::seed_from_u64(seed);
    // Panics that the engine catches on purpose (inside `doc::apply`) would print a message each;
    // a failing body reports itself through `run_all` instead.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let (mut updates, mut state_vectors) = (0, 0);
    let result = catch_unwind(AssertUnwindSafe(|| {
        for i in 0..iterations {
            let input = &corpus[rng.random_range(0..corpus.len())];
            let other = &corpus[rng.random_range(0..corpus.len())];
            let mutated = mutate(&mut rng, input, other);
            run_all(&mutated, &|| {
                format!("mutation #{i} of seed {seed}; rerun with DRIFTSYNC_SEED={seed}")
            });
            updates += usize::from(validate::check_update(&mutated).is_ok());
            state_vectors += usize::from(validate::check_state_vector(&mutated).is_ok());
        }
    }));
    std::panic::set_hook(default_hook);
    eprintln!("fuzz_corpus: {updates} mutated inputs were valid updates, {state_vectors} valid state vectors");
    if let Err(panic) = result {
        eprintln!("fuzz_corpus FAILED with seed {seed}; rerun with DRIFTSYNC_SEED={seed}");
        std::panic::resume_unwind(panic);
    }
}
