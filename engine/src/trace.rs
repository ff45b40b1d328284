//! Editing traces for tests and benchmarks (feature `test-support`).
//!
//! An editing trace is a recorded sequence of text edits — `(position, delete count, inserted
//! text)` patches — that replays from a start text to a known end text. The project uses the
//! `automerge-paper` trace (the one behind the crdt-benchmarks "B4" benchmark: 259,778
//! single-character edits of a LaTeX paper) to check that a real editing history survives the
//! engine and the store unchanged, and to measure how fast it goes through them.
//!
//! The trace file is data, not code: it lives outside the repository, in
//! `<workspace root>/../shared/traces/`, and [`default_trace_path`] finds it there (or where the
//! environment variable `DRIFTSYNC_TRACE` says). Code using it must cope with its absence: tests
//! skip with a message, benchmarks fall back to [`synthetic`].
//!
//! File format (gzipped JSON, the format of Joseph Gentle's editing-traces collection):
//! `{"startContent": "...", "endContent": "...", "txns": [{"patches": [[pos, del, "ins"], ...]}]}`.
//! Positions count Unicode code points. [`apply_patch`] passes them to yrs, whose driftsync
//! documents count UTF-16 code units, so it is exact only for text without characters outside
//! the Basic Multilingual Plane — [`Trace::is_ascii`] tells whether a trace is safe (the
//! automerge-paper trace is pure ASCII).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use yrs::{Doc, Text, TextRef};

use crate::doc::edit;
use crate::{Error, Result};

/// The environment variable that overrides [`default_trace_path`].
pub const TRACE_ENV: &str = "DRIFTSYNC_TRACE";

/// A replayable editing trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// The text before the first patch.
    pub start: String,
    /// The text after the last patch.
    pub end: String,
    /// The patches in order: `(position, delete count, inserted text)`, positions in code points.
    /// Each patch deletes first, then inserts at the same position. Transactions of the file are
    /// flattened: a transaction with several patches contributes them one after the other.
    pub patches: Vec<(u32, u32, String)>,
}

impl Trace {
    /// Whether the start text and every inserted string are ASCII, so that code-point positions
    /// equal the UTF-16 positions driftsync documents use.
    pub fn is_ascii(&self) -> bool {
        self.start.is_ascii() && self.patches.iter().all(|(_, _, ins)| ins.is_ascii())
    }

    /// Replays the patches on a plain `String` (no CRDT), as a reference result; for a consistent
    /// trace it equals [`Trace::end`]. Positions past the end are clamped to the end rather than
    /// panicking.
    pub fn replay_plain(&self) -> String {
        let ascii = self.is_ascii();
        let mut text = self.start.clone();
        for (pos, del, ins) in &self.patches {
            let start = byte_offset(&text, *pos as usize, ascii);
            let end = start + byte_offset(&text[start..], *del as usize, ascii);
            text.replace_range(start..end, ins);
        }
        text
    }
}

/// The byte offset of code point `chars` in `text`, or the text's length when it has fewer.
/// `ascii` says that the text is known to be ASCII, where code points are bytes.
fn byte_offset(text: &str, chars: usize, ascii: bool) -> usize {
    if ascii {
        return chars.min(text.len());
    }
    text.char_indices().nth(chars).map_or(text.len(), |(i, _)| i)
}

/// The JSON file as it is on disk.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TraceFile {
    start_content: String,
    end_content: String,
    txns: Vec<TraceTxn>,
}

/// One transaction of the file.
#[derive(Deserialize)]
struct TraceTxn {
    patches: Vec<(u32, u32, String)>,
}

/// Where the automerge-paper (B4) trace is expected: the path in the environment variable
/// [`TRACE_ENV`] if set, otherwise `<workspace root>/../shared/traces/automerge-paper.json.gz`,
/// the workspace root being the parent of this crate's manifest directory.
pub fn default_trace_path() -> PathBuf {
    if let Some(path) = std::env::var_os(TRACE_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().unwrap_or(manifest);
    let beside = workspace.parent().unwrap_or(workspace);
    beside.join("shared").join("traces").join("automerge-paper.json.gz")
}

/// Loads a trace file: gzipped JSON if its name ends in `.gz`, plain JSON otherwise.
///
/// A file that is not a trace is an [`std::io::ErrorKind::InvalidData`] error.
pub fn load(path: impl AsRef<Path>) -> std::io::Result<Trace> {
    let path = path.as_ref();
    let file = File::open(path)?;
    let mut json = Vec::new();
    if path.extension().is_some_and(|ext| ext == "gz") {
        flate2::read::GzDecoder::new(BufReader::new(file)).read_to_end(&mut json)?;
    } else {
        BufReader::new(file).read_to_end(&mut json)?;
    }
    let parsed: TraceFile = serde_json::from_slice(&json)?;
    Ok(Trace {
        start: parsed.start_content,
        end: parsed.end_content,
        patches: parsed.txns.into_iter().flat_map(|txn| txn.patches).collect(),
    })
}

/// A deterministic synthetic trace of `n` single-character edits, for when the real trace is
/// absent. It imitates a person writing: runs of 1–60 typed characters, half of the runs followed
/// by 1–50 backspaces (about 70 % inserts and 30 % deletes in all, as in B4; 259,778 edits end
/// in about 104,000 characters, as B4 does), at a cursor that moves with the typing and before
/// one run in twenty jumps to a random place. Short runs or uniformly random positions would
/// fragment the text far more than real editing does, and yrs, whose index lookups walk the
/// text's items, would take minutes instead of seconds. The text is ASCII and [`Trace::end`] is
/// computed by [`Trace::replay_plain`].
pub fn synthetic(n: usize, seed: u64) -> Trace {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz      eeettaoin.,\n";
    let mut rng = StdRng::seed_from_u64(seed);
    let mut patches = Vec::with_capacity(n);
    let mut len: u32 = 0;
    let mut cursor: u32 = 0;
    while patches.len() < n {
        if rng.random_bool(0.05) {
            cursor = rng.random_range(0..=len);
        }
        for _ in 0..rng.random_range(1..=60usize) {
            let c = ALPHABET[rng.random_range(0..ALPHABET.len())] as char;
            patches.push((cursor, 0, c.to_string()));
            cursor += 1;
            len += 1;
        }
        if rng.random_bool(0.5) {
            for _ in 0..rng.random_range(1..=50u32).min(cursor) {
                cursor -= 1;
                patches.push((cursor, 1, String::new()));
                len -= 1;
            }
        }
    }
    patches.truncate(n);
    let mut trace = Trace {
        start: String::new(),
        end: String::new(),
        patches,
    };
    trace.end = trace.replay_plain();
    trace
}

/// Applies one patch to the text `text` of `doc` in one yrs transaction and returns the update
/// that transaction produced (the way an editor emits one update per keystroke).
///
/// Positions are passed to yrs unchanged (see the module docs about code points and UTF-16). A
/// patch reaching past the end of the text is an [`Error::Invalid`] and changes nothing.
pub fn apply_patch(doc: &Doc, text: &TextRef, patch: &(u32, u32, String)) -> Result<Vec<u8>> {
    let (pos, del, ins) = (patch.0, patch.1, patch.2.as_str());
    let (outcome, update) = edit(doc, |txn| {
        let len = text.len(txn);
        if pos.checked_add(del).is_none_or(|end| end > len) {
            return Err(Error::Invalid(format!(
                "patch {pos}+{del} is past the end of the text ({len})"
            )));
        }
        if del > 0 {
            text.remove_range(txn, pos, del);
        }
        if !ins.is_empty() {
            text.insert(txn, pos, ins);
        }
        Ok(())
    });
    outcome.map(|()| update)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::{new_doc, text, TEXT_ROOT};

    #[test]
    fn synthetic_traces_replay_through_yrs() {
        let trace = synthetic(5_000, 7);
        assert_eq!(trace, synthetic(5_000, 7), "the same seed gives the same trace");
        assert!(trace.is_ascii());
        assert!(trace.patches.iter().any(|p| p.1 == 1), "some deletions");
        let doc = new_doc(1).unwrap();
        let root = doc.get_or_insert_text(TEXT_ROOT);
        for patch in &trace.patches {
            apply_patch(&doc, &root, patch).unwrap();
        }
        assert_eq!(text(&doc), trace.end);
    }

    #[test]
    fn out_of_range_patches_are_errors() {
        let doc = new_doc(1).unwrap();
        let root = doc.get_or_insert_text(TEXT_ROOT);
        apply_patch(&doc, &root, &(0, 0, "ab".into())).unwrap();
        assert!(apply_patch(&doc, &root, &(3, 0, "x".into())).is_err());
        assert!(apply_patch(&doc, &root, &(1, 2, String::new())).is_err());
        assert_eq!(text(&doc), "ab");
    }

    #[test]
    fn files_load_plain_and_gzipped() {
        use std::io::Write;
        let json = r#"{"startContent":"","endContent":"hi","txns":[{"patches":[[0,0,"hx"]]},{"patches":[[1,1,""],[1,0,"i"]]}]}"#;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("t.json");
        std::fs::write(&plain, json).unwrap();
        let gz = dir.path().join("t.json.gz");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all(json.as_bytes()).unwrap();
        enc.finish().unwrap();
        for path in [plain, gz] {
            let trace = load(&path).unwrap();
            assert_eq!(trace.patches.len(), 3);
            assert_eq!(trace.replay_plain(), "hi");
            assert_eq!(trace.end, "hi");
        }
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{}").unwrap();
        assert_eq!(load(&bad).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }
}
