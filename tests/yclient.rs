//! A stock Yjs client (yjs + y-websocket in node, `tests/js/yclient.mjs`) driven from Rust
//! tests. The node packages are installed at pinned versions on first use into
//! `target/node-yjs/` (git-ignored).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::TestServer;

/// How long one step may take: generous, nothing here is a timing assertion.
pub const STEP: Duration = Duration::from_secs(20);

/// A pinned npm package: the name it is installed under, what `npm install` is given, and the
/// version its `package.json` must say (exact, or a prefix before a dot).
pub struct Package {
    /// The directory under `node_modules` (an alias for a second version of a package).
    pub name: &'static str,
    /// The install spec, e.g. `yjs@13.6.27` or `alias@npm:pkg@1.2.3`.
    pub spec: &'static str,
    /// The version installed.
    pub version: &'static str,
}

/// The packages of the stock Yjs client.
const YJS_PACKAGES: [Package; 3] = [
    Package {
        name: "yjs",
        spec: "yjs@13.6.27",
        version: "13.6.27",
    },
    Package {
        name: "y-websocket",
        spec: "y-websocket@3.1.0",
        version: "3.1.0",
    },
    Package {
        name: "ws",
        spec: "ws@8",
        version: "8",
    },
];

// ---------------------------------------------------------------------------------------------
// Node setup and the stock client.

/// `target/node-yjs`, with the stock Yjs client's packages installed; `None` when node or npm
/// is missing.
pub fn node_modules_dir() -> Option<PathBuf> {
    npm_modules("node-yjs", &YJS_PACKAGES)
}

/// Whether `node` and `npm` run here.
pub fn node_and_npm() -> bool {
    let works = |program: &str| {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    works("node") && works("npm")
}

/// `target/NAME`, with `packages` installed (once: later calls find them); `None` when node or
/// npm is missing.
pub fn npm_modules(name: &str, packages: &[Package]) -> Option<PathBuf> {
    // Tests run on parallel threads of one process: install once, the others wait for it.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !node_and_npm() {
        return None;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent");
    let dir = workspace.join("target").join(name);
    if installed(&dir, packages) {
        return Some(dir);
    }
    // Installed into a fresh directory and renamed into place, so that a concurrent or
    // interrupted install never leaves a half-filled directory behind.
    let staging = workspace
        .join("target")
        .join(format!("{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).expect("create the npm staging directory");
    std::fs::write(
        staging.join("package.json"),
        "{\"name\":\"driftsync-node-tests\",\"private\":true}\n",
    )
    .expect("write package.json");
    let started = Instant::now();
    // No time limit: a slow first install must not fail the test.
    let output = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--save-exact", "--loglevel=error"])
        .args(packages.iter().map(|p| p.spec))
        .current_dir(&staging)
        .stdin(Stdio::null())
        .output()
        .expect("run npm install");
    assert!(
        output.status.success(),
        "npm install failed in {}:\n{}\n{}",
        staging.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("npm install took {:.1} s", started.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::rename(&staging, &dir).is_err() {
        // Someone else installed it meanwhile: use theirs.
        let _ = std::fs::remove_dir_all(&staging);
    }
    assert!(
        installed(&dir, packages),
        "the node packages are not in {}",
        dir.display()
    );
    Some(dir)
}

/// Whether `dir` holds the pinned packages.
fn installed(dir: &Path, packages: &[Package]) -> bool {
    packages.iter().all(|p| {
        let manifest = dir.join("node_modules").join(p.name).join("package.json");
        let Ok(text) = std::fs::read_to_string(manifest) else {
            return false;
        };
        let Ok(json) = serde_json::from_str::<Value>(&text) else {
            return false;
        };
        json["version"]
            .as_str()
            .is_some_and(|v| v == p.version || v.starts_with(&format!("{}.", p.version)))
    })
}

/// A stock Yjs client in a node process, and what it has reported so far.
pub struct YClient {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Value>,
    /// Its awareness (and yrs) client id.
    pub client_id: u64,
    /// The provider's synced flag.
    pub synced: bool,
    /// The text of the document's `Y.Text` named `text`.
    pub text: String,
    /// Awareness states it knows, by client id.
    pub awareness: HashMap<u64, Value>,
    /// The last "watchdog" report: when the provider last received a message (ms), and whether
    /// it was connected.
    pub watchdog: Option<(u64, bool)>,
}

impl YClient {
    /// Starts `tests/js/yclient.mjs` against `server`'s `/yjs` endpoint, room `room`.
    pub async fn start(modules: &Path, server: &TestServer, room: &str) -> YClient {
        YClient::start_at(modules, &server.url(), room).await
    }

    /// Starts `tests/js/yclient.mjs` against the server at `base` (`ws://host:port`), room `room`.
    pub async fn start_at(modules: &Path, base: &str, room: &str) -> YClient {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("js").join("yclient.mjs");
        let mut child = Command::new("node")
            .arg(script)
            .arg(modules)
            .arg(format!("{base}/yjs"))
            .arg(room)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let (tx, events) = mpsc::channel(1024);
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str::<Value>(&line).unwrap_or(Value::String(line));
                if tx.blocking_send(event).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[yclient] {line}");
            }
        });
        let stdin = child.stdin.take();
        let mut client = YClient {
            child,
            stdin,
            events,
            client_id: 0,
            synced: false,
            text: String::new(),
            awareness: HashMap::new(),
            watchdog: None,
        };
        client.until("its client id", |c| c.client_id != 0).await;
        client
    }

    /// Sends one command line.
    pub fn command(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the client is running");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to the node client");
    }

    /// Processes reported events until `done` holds, failing the test after [`STEP`].
    pub async fn until(&mut self, what: &str, mut done: impl FnMut(&YClient) -> bool) {
        let deadline = tokio::time::Instant::now() + STEP;
        while !done(self) {
            let event = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => panic!("the node client exited while waiting for {what}"),
                Err(_) => panic!("timed out waiting for the node client: {what} (text {:?})", self.text),
            };
            match event["event"].as_str() {
                Some("client") => self.client_id = event["clientId"].as_u64().unwrap_or_default(),
                Some("synced") => {
                    self.synced = event["synced"].as_bool().unwrap_or_default();
                    self.text = event["text"].as_str().unwrap_or_default().to_owned();
                }
                Some("text") => self.text = event["text"].as_str().unwrap_or_default().to_owned(),
                Some("awareness") => {
                    self.awareness = event["states"]
                        .as_object()
                        .map(|states| {
                            states
                                .iter()
                                .filter_map(|(id, state)| Some((id.parse().ok()?, state.clone())))
                                .collect()
                        })
                        .unwrap_or_default();
                }
                Some("watchdog") => {
                    let last = event["lastMessage"].as_u64().unwrap_or_default();
                    self.watchdog = Some((last, event["connected"].as_bool().unwrap_or_default()));
                }
                Some("error") => panic!("the node client reported an error: {event}"),
                _ => {}
            }
        }
    }

    /// Kills the process: the server sees the connection drop without any goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for YClient {
    fn drop(&mut self) {
        self.kill();
    }
}
