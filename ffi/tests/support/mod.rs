//! What the binding tests share: the built library, bindings generated from it, servers on
//! loopback (one with a secret, one with TLS and a certificate made now), and skipping — which
//! fails instead under `CI=true`, so CI cannot skip silently.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use driftsync_tests::TestServer;

/// The secret of the test server with tokens.
pub const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

/// Says why a test cannot run: "skipped: …" and `false`, or a failure under `CI=true`.
pub fn skip(reason: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true, so this test may not skip: {reason}");
    }
    eprintln!("skipped: {reason}");
    false
}

/// The directory cargo builds into for this profile (`target/debug`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    // target/debug/deps/bindings-xxxx
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// The library as the apps load it (`libdriftsync_ffi.so`, `.dylib` on macOS), built by cargo
/// alongside this test.
pub fn cdylib() -> PathBuf {
    let name = if cfg!(target_os = "macos") {
        "libdriftsync_ffi.dylib"
    } else if cfg!(windows) {
        "driftsync_ffi.dll"
    } else {
        "libdriftsync_ffi.so"
    };
    let dir = profile_dir();
    [dir.join(name), dir.join("deps").join(name)]
        .into_iter()
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("{name} is not in {}: cargo builds it with the tests", dir.display()))
}

/// Generates `language`'s bindings from the built library into `out` (emptied first),
/// unformatted (what is committed under bindings/ is generated the same way).
pub fn generate(language: uniffi::TargetLanguage, out: &Path) {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).expect("create the bindings directory");
    let options = uniffi::GenerateOptions {
        languages: vec![language],
        source: camino::Utf8PathBuf::from_path_buf(cdylib()).expect("a UTF-8 path"),
        out_dir: camino::Utf8PathBuf::from_path_buf(out.to_path_buf()).expect("a UTF-8 path"),
        config_override: None,
        format: false,
        crate_filter: None,
        metadata_no_deps: true,
    };
    uniffi::generate(options).expect("generate the bindings");
}

/// A program that runs (`--version` answers), if any of `candidates` does.
pub fn program(candidates: &[&str]) -> Option<String> {
    candidates.iter().find_map(|p| {
        std::process::Command::new(p)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| p.to_string())
    })
}

/// The servers a scenario runs against, in this process on their own runtime.
pub struct Servers {
    /// `ws://127.0.0.1:port`: tokens required (signed with [`SECRET`]).
    pub url: String,
    /// `wss://127.0.0.1:port`: open, TLS with a certificate made at start.
    pub tls_url: String,
    /// That certificate, PEM.
    pub ca_pem: String,
    /// `ws://127.0.0.1:port` where nothing listens.
    pub dead_url: String,
    _servers: Vec<TestServer>,
    _dirs: Vec<tempfile::TempDir>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A self-signed certificate for `127.0.0.1` and `localhost`: (certificate PEM, key PEM).
pub fn self_signed() -> (String, String) {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("make a certificate");
    (made.cert.pem(), made.signing_key.serialize_pem())
}

/// A token for `user` on every document.
pub fn token(user: &str) -> String {
    driftsync_server::mint(SECRET, user, &["*".to_string()], true, Duration::from_secs(3600)).expect("mint")
}

impl Servers {
    /// Starts them.
    pub fn start() -> Servers {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the servers' runtime");
        let (ca_pem, key_pem) = self_signed();
        let tls = driftsync_server::tls_server_config(ca_pem.as_bytes(), key_pem.as_bytes()).expect("TLS config");
        let (servers, dirs, dead_url) = runtime.block_on(async {
            let (dir, store) = driftsync_tests::sqlite_store().await;
            let config = driftsync_server::Config {
                auth: driftsync_server::Auth::new(Some(SECRET)),
                ..Default::default()
            };
            let plain = TestServer::start(store, config).await;
            let (tls_dir, tls_store) = driftsync_tests::sqlite_store().await;
            let config = driftsync_server::Config {
                tls: Some(tls),
                ..Default::default()
            };
            let secure = TestServer::start(tls_store, config).await;
            let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let dead_url = format!("ws://{}", dead.local_addr().expect("addr"));
            drop(dead);
            (vec![plain, secure], vec![dir, tls_dir], dead_url)
        });
        Servers {
            url: servers[0].url(),
            tls_url: format!("wss://{}", servers[1].addr),
            ca_pem,
            dead_url,
            _servers: servers,
            _dirs: dirs,
            runtime: Some(runtime),
        }
    }

    /// The environment a scenario script reads (see ffi/tests/python/scenario.py), with its
    /// scratch files in `dir`.
    pub fn env(&self, dir: &Path) -> Vec<(String, String)> {
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &self.ca_pem).expect("write the CA");
        vec![
            ("DRIFTSYNC_URL".into(), self.url.clone()),
            ("DRIFTSYNC_TOKEN_ADA".into(), token("ada")),
            ("DRIFTSYNC_TOKEN_BOB".into(), token("bob")),
            ("DRIFTSYNC_DEAD_URL".into(), self.dead_url.clone()),
            ("DRIFTSYNC_TLS_URL".into(), self.tls_url.clone()),
            ("DRIFTSYNC_TLS_CA".into(), ca.to_string_lossy().into_owned()),
            ("DRIFTSYNC_DIR".into(), dir.to_string_lossy().into_owned()),
        ]
    }
}

/// One test at a time generates into the shared bindings directory.
pub fn generating() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| Mutex::new(()))
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
