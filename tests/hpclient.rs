//! Stock Hocuspocus providers (`@hocuspocus/provider` 4.8 and 3.4 in node,
//! `tests/js/hpclient.mjs`) driven from Rust tests: one provider socket carrying any number of
//! documents. The node packages are installed at pinned versions on first use into
//! `target/node-hocuspocus/` (git-ignored), with y-websocket too, so one directory serves the
//! mixed tests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::yclient::{npm_modules, Package, STEP};

/// The pinned packages: both provider majors (3.x under an npm alias), Yjs, y-protocols, ws,
/// and y-websocket for tests mixing Yjs clients in.
const PACKAGES: [Package; 6] = [
    Package {
        name: "@hocuspocus/provider",
        spec: "@hocuspocus/provider@4.8.0",
        version: "4.8.0",
    },
    Package {
        name: "@hocuspocus/provider-v3",
        spec: "@hocuspocus/provider-v3@npm:@hocuspocus/provider@3.4.4",
        version: "3.4.4",
    },
    Package {
        name: "yjs",
        spec: "yjs@13.6.27",
        version: "13.6.27",
    },
    Package {
        name: "y-protocols",
        spec: "y-protocols@1.0.7",
        version: "1.0.7",
    },
    Package {
        name: "ws",
        spec: "ws@8",
        version: "8",
    },
    Package {
        name: "y-websocket",
        spec: "y-websocket@3.1.0",
        version: "3.1.0",
    },
];

/// `target/node-hocuspocus` with the pinned packages; `None` when node or npm is missing.
pub fn hocuspocus_modules_dir() -> Option<PathBuf> {
    npm_modules("node-hocuspocus", &PACKAGES)
}

/// What one provider (document) has reported.
#[derive(Debug, Default, Clone)]
pub struct Provider {
    /// Its awareness client id.
    pub client_id: u64,
    /// The scope of its last `Authenticated`, if any.
    pub scope: Option<String>,
    /// The reason of its last `PermissionDenied`, if any.
    pub denied: Option<String>,
    /// The provider's synced flag.
    pub synced: bool,
    /// The provider's `unsyncedChanges`, as last reported.
    pub unsynced: u64,
    /// The text of the document's `Y.Text` named `text`.
    pub text: String,
    /// Awareness states it knows, by client id.
    pub awareness: HashMap<u64, Value>,
    /// Stateless payloads received, in order.
    pub stateless: Vec<String>,
    /// The text when `unsyncedChanges` last came back to 0 after the provider had changes to
    /// send: what the server has acknowledged (stored).
    pub settled: Option<String>,
    /// Whether `unsyncedChanges` was above 0 since it last came back to 0.
    pending: bool,
}

/// A provider socket in a node process, and what its providers reported.
pub struct HpClient {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Value>,
    /// The provider package's major version.
    pub major: u64,
    /// Its providers, by the test's name for them.
    pub providers: HashMap<String, Provider>,
    /// How many times the socket closed.
    pub socket_closes: u64,
}

impl HpClient {
    /// Starts `tests/js/hpclient.mjs` against `url` (`ws://host:port/hocuspocus`) with the 4.x
    /// provider, or the 3.x one with `v3`.
    pub async fn start(modules: &Path, url: &str, v3: bool) -> HpClient {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("js").join("hpclient.mjs");
        let package = if v3 {
            "@hocuspocus/provider-v3"
        } else {
            "@hocuspocus/provider"
        };
        let mut child = Command::new("node")
            .arg(script)
            .arg(modules)
            .arg(url)
            .arg(package)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let (tx, events) = mpsc::channel(4096);
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
                eprintln!("[hpclient] {line}");
            }
        });
        let stdin = child.stdin.take();
        let mut client = HpClient {
            child,
            stdin,
            events,
            major: 0,
            providers: HashMap::new(),
            socket_closes: 0,
        };
        client.until("ready", |c| c.major != 0).await;
        client
    }

    /// Sends one command line.
    pub fn command(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the client is running");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to the node client");
    }

    /// A provider's state (default if it reported nothing yet).
    pub fn provider(&self, name: &str) -> Provider {
        self.providers.get(name).cloned().unwrap_or_default()
    }

    /// Processes reported events until `done` holds, failing the test after [`STEP`]. A
    /// provider that threw (it could not read a frame) fails the test at once.
    pub async fn until(&mut self, what: &str, mut done: impl FnMut(&HpClient) -> bool) {
        let deadline = tokio::time::Instant::now() + STEP;
        while !done(self) {
            let event = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => panic!("the node client exited while waiting for {what}"),
                Err(_) => panic!("timed out waiting for the node client: {what}: {:?}", self.providers),
            };
            self.take(&event);
        }
    }

    fn take(&mut self, event: &Value) {
        let kind = event["event"].as_str().unwrap_or_default();
        if kind == "ready" {
            self.major = event["major"].as_u64().unwrap_or_default();
            return;
        }
        if kind == "socketClose" {
            self.socket_closes += 1;
            return;
        }
        if kind == "error" {
            panic!("the node client reported an error: {event}");
        }
        let Some(name) = event["name"].as_str() else { return };
        let p = self.providers.entry(name.to_owned()).or_default();
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        match kind {
            "attached" => p.client_id = event["clientId"].as_u64().unwrap_or_default(),
            "authenticated" => {
                p.scope = Some(text(&event["scope"]));
                p.denied = None;
            }
            "authenticationFailed" => p.denied = Some(text(&event["reason"])),
            "synced" => {
                p.synced = event["synced"].as_bool().unwrap_or_default();
                p.text = text(&event["text"]);
            }
            "unsynced" => {
                p.unsynced = event["count"].as_u64().unwrap_or_default();
                if p.unsynced > 0 {
                    p.pending = true;
                } else if p.pending {
                    p.pending = false;
                    p.settled = Some(p.text.clone());
                }
            }
            "text" => p.text = text(&event["text"]),
            "awareness" => {
                p.awareness = event["states"]
                    .as_object()
                    .map(|states| {
                        states
                            .iter()
                            .filter_map(|(id, state)| Some((id.parse().ok()?, state.clone())))
                            .collect()
                    })
                    .unwrap_or_default();
            }
            "stateless" => p.stateless.push(text(&event["payload"])),
            _ => {}
        }
    }
}

impl Drop for HpClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
