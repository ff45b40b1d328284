//! Every input in `fixtures/crashers/` (see its README: what yrs 0.28 does with each) goes through
//! `decode_update`, `decode_state_vector` and `apply_bytes` without a panic, an abort or a large
//! allocation, each well under a second, with the outcome listed here.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use driftsync_engine::doc;
use driftsync_engine::validate::{self, ErrorKind};

/// Generous: this guards against regressions (seconds and gigabytes before the checker), it is
/// not a benchmark.
const BOUND: Duration = Duration::from_secs(1);

/// What each file is, and which check refuses it (`None`: a valid update, applied).
enum Expect {
    StateVector(ErrorKind),
    Update(Option<ErrorKind>),
}

fn expectations() -> Vec<(&'static str, Expect)> {
    use Expect::*;
    vec![
        ("sv-huge-count.bin", StateVector(ErrorKind::IntegerTooLarge)),
        ("sv-1g-count.bin", StateVector(ErrorKind::CountTooLarge)),
        ("update-huge-client-count.bin", Update(Some(ErrorKind::IntegerTooLarge))),
        (
            "update-nested-any-map-counts.bin",
            Update(Some(ErrorKind::CountTooLarge)),
        ),
        ("update-deep-any-array.bin", Update(Some(ErrorKind::AnyTooDeep))),
        ("update-clock-overflow-gc.bin", Update(Some(ErrorKind::ClockOverflow))),
        (
            "update-clock-overflow-two-gc.bin",
            Update(Some(ErrorKind::ClockOverflow)),
        ),
        (
            "update-delete-range-overflow.bin",
            Update(Some(ErrorKind::ClockOverflow)),
        ),
        (
            "update-any-int-shift-overflow.bin",
            Update(Some(ErrorKind::VarIntTooLong)),
        ),
        (
            "update-any-int-negate-overflow.bin",
            Update(Some(ErrorKind::IntegerTooLarge)),
        ),
        ("update-client-id-2pow53.bin", Update(Some(ErrorKind::ClientIdTooLarge))),
        ("update-u32-varint-wrap.bin", Update(Some(ErrorKind::IntegerTooLarge))),
        ("update-json-content.bin", Update(Some(ErrorKind::JsonContent))),
        ("update-clock-2pow31-gap.bin", Update(Some(ErrorKind::ClockOverflow))),
        ("update-subdoc-leak.bin", Update(Some(ErrorKind::SubdocContent))),
        // Valid: the checker cannot refuse it (see the README); kept small enough to stay cheap.
        ("update-squash-quadratic-10k.bin", Update(None)),
    ]
}

fn crashers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/crashers")
}

fn timed<T>(what: &str, name: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let result = f();
    let elapsed = start.elapsed();
    assert!(elapsed < BOUND, "{what}({name}) took {elapsed:?}");
    result
}

#[test]
fn every_crasher_is_refused_quickly_without_panicking() {
    let expectations = expectations();
    let readme = std::fs::read_to_string(crashers_dir().join("README.md")).unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(crashers_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !name.ends_with(".bin") {
            continue;
        }
        seen += 1;
        let (_, expect) = expectations
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} has no expectation in engine/tests/crashers.rs"));
        assert!(
            readme.contains(&format!("`{name}`")),
            "{name} has no entry in fixtures/crashers/README.md"
        );
        let bytes = std::fs::read(&path).unwrap();

        // Every file through every entry point.
        let as_sv = timed("decode_state_vector", &name, || doc::decode_state_vector(&bytes));
        let as_update = timed("decode_update", &name, || doc::decode_update(&bytes));
        let fresh = doc::new_doc(1).unwrap();
        let applied = timed("apply_bytes", &name, || doc::apply_bytes(&fresh, &bytes));

        match expect {
            Expect::StateVector(kind) => {
                assert!(as_sv.is_err(), "{name} decoded as a state vector");
                assert_eq!(
                    validate::check_state_vector(&bytes).unwrap_err().kind(),
                    *kind,
                    "{name}"
                );
                assert!(as_update.is_err() && applied.is_err(), "{name}");
            }
            Expect::Update(Some(kind)) => {
                assert!(as_update.is_err(), "{name} decoded as an update");
                assert!(applied.is_err(), "{name} applied");
                assert_eq!(validate::check_update(&bytes).unwrap_err().kind(), *kind, "{name}");
                assert!(as_sv.is_err(), "{name}");
            }
            Expect::Update(None) => {
                as_update.unwrap_or_else(|e| panic!("{name}: {e}"));
                applied.unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }
    assert_eq!(seen, expectations.len(), "a listed crasher file is missing");
}

/// The reported bombs, timed on their own: the checker answers in microseconds.
#[test]
fn the_reported_bombs_cost_microseconds() {
    let sv = std::fs::read(crashers_dir().join("sv-huge-count.bin")).unwrap();
    let update = std::fs::read(crashers_dir().join("update-huge-client-count.bin")).unwrap();
    assert_eq!(sv, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert_eq!(
        update,
        [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x65, 0x01, 0x1d, 0x01]
    );
    let start = Instant::now();
    for _ in 0..10_000 {
        assert!(doc::decode_state_vector(&sv).is_err());
        assert!(doc::decode_update(&update).is_err());
    }
    let each = start.elapsed() / 20_000;
    eprintln!("a refused bomb costs {each:?}");
    assert!(each < Duration::from_millis(1), "{each:?}");
}
