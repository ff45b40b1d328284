//! The Kotlin bindings, generated from the built library, compiled with `kotlinc` (the npm
//! package `kotlin-compiler`, pinned, installed on first use into `target/node-kotlin`) and run
//! on the JVM with JNA (Debian's `libjna-java`): the chat scenario of
//! `ffi/tests/kotlin/Scenario.kt` against servers on loopback. The compiled jar is kept and
//! reused while the bindings and the scenario are unchanged (compiling takes tens of seconds).

mod support;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use driftsync_tests::yclient::{npm_modules, Package};
use support::{generate, generating, profile_dir, program, skip, Servers};

/// The Kotlin compiler, pinned (it ships kotlin-stdlib and kotlinx-coroutines-core-jvm).
const KOTLIN: [Package; 1] = [Package {
    name: "kotlin-compiler",
    spec: "kotlin-compiler@2.3.21",
    version: "2.3.21",
}];

/// JNA's jar: `DRIFTSYNC_JNA_JAR`, or where Debian's `libjna-java` puts it.
fn jna_jar() -> Option<PathBuf> {
    std::env::var_os("DRIFTSYNC_JNA_JAR")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/usr/share/java/jna.jar")])
        .find(|p| p.exists())
}

fn hash_files(files: &[&Path]) -> String {
    let mut hasher = DefaultHasher::new();
    for file in files {
        std::fs::read(file).expect("read a source").hash(&mut hasher);
    }
    format!("{:016x}", hasher.finish())
}

#[test]
fn kotlin_chat_scenario_on_the_jvm_through_the_generated_bindings() {
    let Some(java) = program(&["java"]) else {
        skip("java is not installed");
        return;
    };
    let Some(jna) = jna_jar() else {
        skip("JNA is not installed (apt-get install libjna-java)");
        return;
    };
    let Some(node) = npm_modules("node-kotlin", &KOTLIN) else {
        skip("node and npm are needed to install the Kotlin compiler");
        return;
    };
    let kotlin = node.join("node_modules/kotlin-compiler");
    let kotlinc = kotlin.join("bin/kotlinc");
    let coroutines = kotlin.join("lib/kotlinx-coroutines-core-jvm.jar");
    let stdlib = kotlin.join("lib/kotlin-stdlib.jar");
    assert!(
        coroutines.exists() && stdlib.exists(),
        "the Kotlin compiler lacks its libraries"
    );

    let base = profile_dir().join("ffi-bindings");
    let out = base.join("kotlin");
    {
        let _one = generating();
        generate(uniffi::TargetLanguage::Kotlin, &out);
    }
    let bindings = out.join("uniffi/driftsync/driftsync.kt");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kotlin/Scenario.kt");
    let jar = base.join("kotlin-scenario.jar");
    let stamp = base.join("kotlin-scenario.hash");
    let hash = hash_files(&[&bindings, &scenario]);
    if !jar.exists() || std::fs::read_to_string(&stamp).ok().as_deref() != Some(hash.as_str()) {
        let started = Instant::now();
        let classpath = std::env::join_paths([&jna, &coroutines]).expect("a classpath");
        let output = Command::new(&kotlinc)
            .arg(&bindings)
            .arg(&scenario)
            .arg("-classpath")
            .arg(&classpath)
            .args(["-nowarn", "-d"])
            .arg(&jar)
            .stdin(Stdio::null())
            .output()
            .expect("run kotlinc");
        assert!(
            output.status.success(),
            "kotlinc failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(&stamp, &hash).expect("write the stamp");
        eprintln!("kotlinc took {:.1} s", started.elapsed().as_secs_f64());
    }

    let servers = Servers::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let lib = support::cdylib();
    let classpath = std::env::join_paths([&jar, &jna, &coroutines, &stdlib]).expect("a classpath");
    let started = Instant::now();
    let output = Command::new(java)
        .arg("-classpath")
        .arg(&classpath)
        .arg(format!(
            "-Djna.library.path={}",
            lib.parent().expect("the library's directory").display()
        ))
        .arg("ScenarioKt")
        .envs(servers.env(scratch.path()))
        .stdin(Stdio::null())
        .output()
        .expect("run java");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "kotlin scenario ({:.1} s):\n{stdout}{stderr}",
        started.elapsed().as_secs_f64()
    );
    assert!(output.status.success(), "the Kotlin scenario failed");
    assert!(stdout.contains(" passed, 0 failed"), "no summary line");
}
