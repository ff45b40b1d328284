//! The Swift bindings are committed (`bindings/swift/`: the Swift package's sources and the
//! headers that go into the XCFramework); this regenerates them from the built library and
//! fails if they differ, so they always match the Rust API. Compiling them needs a Swift
//! toolchain (Xcode), which the Linux CI machine has not: that part is left to the iOS build
//! (bindings/README.md). `DRIFTSYNC_BLESS=1` rewrites the committed files.

mod support;

use std::path::Path;

use support::{generate, generating, profile_dir};

/// Where each generated file is committed, relative to `bindings/swift/`.
const FILES: [(&str, &str); 3] = [
    ("driftsync.swift", "Sources/Driftsync/driftsync.swift"),
    ("driftsyncFFI.h", "Headers/driftsyncFFI.h"),
    // An XCFramework's headers directory names its module map module.modulemap.
    ("driftsyncFFI.modulemap", "Headers/module.modulemap"),
];

#[test]
fn committed_swift_bindings_match_the_rust_api() {
    let out = profile_dir().join("ffi-bindings").join("swift");
    {
        let _one = generating();
        generate(uniffi::TargetLanguage::Swift, &out);
    }
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bindings/swift");
    let bless = std::env::var("DRIFTSYNC_BLESS").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for (generated, path) in FILES {
        let fresh = std::fs::read_to_string(out.join(generated)).expect("a generated file");
        let target = committed.join(path);
        if std::fs::read_to_string(&target).ok().as_deref() == Some(fresh.as_str()) {
            continue;
        }
        if bless {
            std::fs::create_dir_all(target.parent().expect("a directory")).expect("create the directory");
            std::fs::write(&target, fresh).expect("write the bindings");
            eprintln!("blessed bindings/swift/{path}");
        } else {
            stale.push(path);
        }
    }
    assert!(
        stale.is_empty(),
        "bindings/swift is out of date with the Rust API ({stale:?}); regenerate it with \
         DRIFTSYNC_BLESS=1 cargo test -p driftsync-ffi --test swift, and commit the result"
    );
    if support::program(&["swiftc"]).is_none() {
        eprintln!("note: no Swift toolchain here: the Swift bindings are checked, not compiled");
    }
}
