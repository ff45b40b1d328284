//! The Python bindings, generated from the built library, run the chat scenario
//! (`ffi/tests/python/scenario.py`) with `python3` against servers on loopback.

mod support;

use std::process::{Command, Stdio};
use std::time::Instant;

use support::{generate, generating, profile_dir, program, skip, Servers};

#[test]
fn python_chat_scenario_through_the_generated_bindings() {
    let Some(python) = program(&["python3"]) else {
        skip("python3 is not installed");
        return;
    };
    let out = profile_dir().join("ffi-bindings").join("python");
    {
        let _one = generating();
        generate(uniffi::TargetLanguage::Python, &out);
        // The generated module loads the library from its own directory.
        let lib = support::cdylib();
        std::fs::copy(&lib, out.join(lib.file_name().expect("a file name"))).expect("copy the library");
    }
    let servers = Servers::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let output = Command::new(python)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/scenario.py"))
        .env("PYTHONPATH", &out)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs(servers.env(scratch.path()))
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "python scenario ({:.1} s):\n{stdout}{stderr}",
        started.elapsed().as_secs_f64()
    );
    assert!(output.status.success(), "the Python scenario failed");
    assert!(stdout.contains(" passed, 0 failed"), "no summary line");
}
