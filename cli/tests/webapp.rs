//! The web app at `/` (`web/`): its JavaScript chat module's unit tests, what that module writes
//! checked by the server's chat rules, the committed bundle being what the sources build, and
//! the page itself in a real browser (Debian's chromium driven by playwright-core) against the
//! real `driftsync serve` binary and the real CLI.
//!
//! They need Node with npm (the packages come from `web/package-lock.json`, installed by
//! `npm ci`) and, for the browser, `/usr/bin/chromium` (or `DRIFTSYNC_CHROMIUM`). Without them
//! they print "skipped: …" — except under `CI=true`, where `.ci/run` installs both and a missing
//! one is a failure.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use driftsync_engine::chat::{ChatGuard, ChatRoom};
use driftsync_engine::doc::{apply_bytes, new_doc};

/// `web/` in the workspace.
fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .join("web")
}

/// Says why a test cannot run: a skip on a developer's machine, a failure in CI.
fn missing(what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} (CI=true: .ci/run installs it)");
    }
    println!("skipped: {what}");
}

/// Installs `web/node_modules` from the lockfile (`npm ci`) once, if it is missing or older
/// than the lockfile. `None` (after saying so) without node and npm.
fn node_modules() -> Option<PathBuf> {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _installing = INSTALL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !driftsync_tests::yclient::node_and_npm() {
        missing("node and npm are needed for the web app's tests");
        return None;
    }
    let web = web_dir();
    let modified = |path: PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let installed = modified(web.join("node_modules/.package-lock.json"));
    let locked = modified(web.join("package-lock.json"));
    if installed.is_none() || installed < locked {
        let output = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&web)
            .stdin(Stdio::null())
            .output()
            .expect("run npm ci");
        assert!(
            output.status.success(),
            "npm ci failed in {}:\n{}\n{}",
            web.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Some(web)
}

/// Runs `node ARGS` in `web/`; panics with its output unless it succeeds. Returns stdout.
fn node(web: &Path, args: &[&str]) -> String {
    let output = Command::new("node")
        .args(args)
        .current_dir(web)
        .stdin(Stdio::null())
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "node {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn the_chat_module_passes_its_unit_tests() {
    let Some(web) = node_modules() else { return };
    let out = node(&web, &["--test", "test/"]);
    println!("{out}");
    assert!(out.contains("# fail 0"), "{out}");
}

/// What the JavaScript module writes is what the Rust engine reads, and the server's chat rules
/// (`ChatGuard`, for the writing user) accept it: a message, an edit, a receipt, a deletion, an
/// image with metadata, an attachment and a reply, a reaction, a delivery receipt.
#[test]
fn what_the_chat_module_writes_passes_the_chat_rules() {
    let Some(web) = node_modules() else { return };
    let script = r#"
        import * as Y from 'yjs'
        import { ChatRoom } from './src/chat.js'
        const doc = new Y.Doc()
        const updates = []
        doc.on('update', (u) => updates.push(Buffer.from(u).toString('hex')))
        const room = new ChatRoom(doc, { user: 'ada', device: 'web-1' })
        const id = room.send('hello from JavaScript')
        room.edit(id, 'hello from JavaScript!')
        room.markRead(id)
        const gone = room.send('to be deleted')
        room.delete(gone)
        const photo = room.send('a cat', {
          kind: 'image',
          meta: { caption: 'Tom' },
          attachments: [{ url: 'https://cdn.example/cat.png', mime: 'image/png', size: 48213, width: 800, height: 600 }],
          replyTo: id,
        })
        room.react(photo, '👍')
        room.markDelivered(photo)
        console.log(JSON.stringify({ id, gone, photo, client: doc.clientID, updates }))
    "#;
    let out = node(&web, &["--input-type=module", "-e", script]);
    let written: serde_json::Value = serde_json::from_str(out.trim()).expect("the script's JSON line");
    let updates: Vec<Vec<u8>> = written["updates"]
        .as_array()
        .expect("updates")
        .iter()
        .map(|u| hex_decode(u.as_str().expect("hex")))
        .collect();
    assert_eq!(updates.len(), 8);

    let server = new_doc(1).expect("doc");
    let guard = ChatGuard::attach(&server);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    for update in &updates {
        apply_bytes(&server, update).expect("applies");
        guard.check(Some("ada"), now).expect("the chat rules accept it for ada");
    }
    // The same updates, claimed by another user, are refused.
    let other = new_doc(2).expect("doc");
    let strict = ChatGuard::attach(&other);
    apply_bytes(&other, &updates[0]).expect("applies");
    assert!(strict.check(Some("bob"), now).is_err(), "bob may not send as ada");

    let room = ChatRoom::new(server);
    let messages = room.messages();
    let id = written["id"].as_str().expect("id");
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[0].id, id);
    assert_eq!(messages[0].author, "ada");
    assert_eq!(messages[0].device, "web-1");
    assert_eq!(messages[0].client, written["client"].as_u64().expect("client"));
    assert_eq!(messages[0].text, "hello from JavaScript!");
    assert!(messages[0].edited_ms.is_some());
    assert!(messages[1].deleted && messages[1].text.is_empty());
    assert_eq!(room.receipt("ada").expect("ada's receipt").message, id);
    // The image with its attachment, reply and reaction, as native clients show it.
    let photo_id = written["photo"].as_str().expect("photo");
    let photo = room.message(photo_id).expect("the photo");
    assert_eq!(photo.kind, driftsync_engine::chat::Kind::Image);
    assert_eq!(photo.metadata.get("caption").map(String::as_str), Some("Tom"));
    assert_eq!(photo.reply_to.as_deref(), Some(id));
    assert_eq!(
        photo.attachments,
        vec![driftsync_engine::chat::Attachment {
            url: "https://cdn.example/cat.png".into(),
            mime: "image/png".into(),
            size: 48213,
            sha256: None,
            width: Some(800),
            height: Some(600),
        }]
    );
    assert_eq!(
        room.reactions(photo_id),
        std::collections::BTreeMap::from([("👍".to_string(), vec!["ada".to_string()])])
    );
    assert_eq!(room.delivered_to(&photo.sort), vec!["ada".to_string()]);
}

fn hex_decode(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex digits"))
        .collect()
}

/// The committed bundle (`web/dist/`, which the server embeds) is what the sources build:
/// the build is deterministic and nobody forgot `npm run build`.
#[test]
fn the_committed_bundle_is_what_the_sources_build() {
    let Some(web) = node_modules() else { return };
    let out = tempfile::tempdir().expect("temp dir");
    let dir = out.path().to_str().expect("utf-8 path");
    node(&web, &["build.mjs", "--out", dir]);
    for file in ["index.html", "app.js", "app.css"] {
        let built = std::fs::read(out.path().join(file)).expect("built file");
        let committed = std::fs::read(web.join("dist").join(file)).expect("committed file");
        assert!(
            built == committed,
            "web/dist/{file} is not what the sources build: run `npm run build` in web/ and commit"
        );
    }
    let weight = driftsync_server::page_weight_gzipped();
    println!("the page weighs {weight} bytes gzipped");
    assert!(weight < 300 * 1024);
}

/// Starts `driftsync serve` on a free loopback port with its data in `dir` and `extra` flags.
fn serve(dir: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftsync"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start driftsync serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line
        .trim()
        .strip_prefix("driftsync listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line:?}"))
        .to_owned();
    (child, format!("http://{addr}"))
}

/// Two browser contexts on one document and room: text, chat with authors, saved and read
/// states, read only once in view, presence and typing; one goes offline, edits, sends,
/// reloads offline and comes back: both converge in the same order; the CLI's message shows in
/// the page and the CLI prints the page's text; on a server with a secret the page asks for a
/// token and writes as its user. Writes the README's screenshot to
/// `target/webapp/two-windows.png` (`DRIFTSYNC_UPDATE_SCREENSHOT=1`: to `docs/`).
#[test]
fn the_web_app_in_a_real_browser() {
    let chromium = std::env::var("DRIFTSYNC_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        missing(&format!("no chromium at {chromium} (apt-get install chromium)"));
        return;
    }
    let Some(web) = node_modules() else { return };
    let work = tempfile::tempdir().expect("temp dir");
    let (mut server, url) = serve(&work.path().join("server"), &[]);
    let secret = "web-app-test-secret-0123456789abcdef";
    let (mut guarded, guarded_url) = serve(&work.path().join("guarded"), &["--secret", secret]);
    let token = Command::new(env!("CARGO_BIN_EXE_driftsync"))
        .args(["token", "--secret", secret, "--user", "erin", "--docs", "*"])
        .output()
        .expect("mint a token");
    assert!(token.status.success(), "driftsync token failed");
    let token = String::from_utf8(token.stdout).expect("utf-8 token");
    let workspace = web.parent().expect("web/ has a parent");
    let screenshot = if std::env::var("DRIFTSYNC_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        workspace.join("docs/two-windows.png")
    } else {
        let dir = workspace.join("target/webapp");
        std::fs::create_dir_all(&dir).expect("target/webapp");
        dir.join("two-windows.png")
    };
    let status = Command::new("node")
        .arg("e2e/browser.mjs")
        .args([
            "--server",
            &url,
            "--cli",
            env!("CARGO_BIN_EXE_driftsync"),
            "--chromium",
            &chromium,
        ])
        .args(["--auth-server", &guarded_url, "--auth-token", token.trim()])
        .arg("--work")
        .arg(work.path())
        .arg("--screenshot")
        .arg(&screenshot)
        .current_dir(&web)
        .stdin(Stdio::null())
        .status()
        .expect("run node");
    for child in [&mut server, &mut guarded] {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(status.success(), "the browser scenario failed (its steps are above)");
}
