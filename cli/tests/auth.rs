//! The real binary: `driftsync token` mints tokens the server accepts, `driftsync serve --secret`
//! requires them, and an open server refuses to listen beyond loopback.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use driftsync_protocol::{ClientFrame, DocId, ErrorCode, ServerFrame, CLOSE_UNAUTHORIZED, PROTOCOL_VERSION};
use driftsync_server::auth::now_secs;
use driftsync_server::{Access, Auth};
use driftsync_tests::NativeClient;

/// Secrets of the length `driftsync` asks for (at least 32 bytes).
const S3CRET: &str = "s3cret-s3cret-s3cret-s3cret-s3cret";
const OTHER: &str = "other-other-other-other-other-other";
const FROM_ENV: &str = "from-env-from-env-from-env-from-env";
const SERVE_SECRET: &str = "serve-secret-serve-secret-serve-secret";

fn driftsync(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_driftsync"));
    command
        .args(args)
        .env_remove("DRIFTSYNC_SECRET")
        .env("RUST_LOG", "warn");
    command
}

fn stdout_line(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout.clone()).unwrap();
    assert_eq!(text.lines().count(), 1, "one line: {text:?}");
    text.trim().to_string()
}

#[test]
fn token_mints_what_the_server_verifies() {
    let output = driftsync(&[
        "token",
        "--secret",
        S3CRET,
        "--user",
        "ada",
        "--docs",
        "chat/*, notes/1",
        "--ttl",
        "2h",
    ])
    .output()
    .unwrap();
    let grant = Auth::new(Some(S3CRET)).verify(&stdout_line(&output)).unwrap();
    assert_eq!(grant.user, "ada");
    assert_eq!(grant.patterns, vec!["chat/*".to_string(), "notes/1".to_string()]);
    assert!(grant.write);
    let expires = grant.expires_at.unwrap();
    assert!((now_secs() + 7100..=now_secs() + 7200).contains(&expires), "{expires}");
    assert!(Auth::new(Some(OTHER)).verify(&stdout_line(&output)).is_err());

    // The secret from the environment, read-only, and the default lifetime of a day.
    let output = driftsync(&["token", "--user", "bob", "--docs", "*", "--read-only"])
        .env("DRIFTSYNC_SECRET", FROM_ENV)
        .output()
        .unwrap();
    let grant = Auth::new(Some(FROM_ENV)).verify(&stdout_line(&output)).unwrap();
    assert_eq!(grant.access(&DocId::new("any/doc").unwrap()), Some(Access::Read));
    assert!(grant.expires_at.unwrap() > now_secs() + 86_000);

    // Bad input: one line on stderr, a non-zero exit.
    for args in [
        &["token", "--secret", "", "--user", "ada", "--docs", "*"][..],
        &[
            "token", "--secret", S3CRET, "--user", "ada", "--docs", "*", "--ttl", "soon",
        ],
        &["token", "--user", "ada", "--docs", "*"],
    ] {
        let output = driftsync(args).output().unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn an_open_server_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let output = driftsync(&["serve", "--listen", "0.0.0.0:0", "--data-dir", data])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.contains("without a secret"), "{stderr}");
}

#[test]
fn a_short_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let short = "only-31-bytes-long-secret-12345";
    assert_eq!(short.len(), 31);
    let mut serve_env = driftsync(&["serve", "--listen", "127.0.0.1:0", "--data-dir", data]);
    serve_env.env("DRIFTSYNC_SECRET", short);
    let commands = [
        (
            "token",
            driftsync(&["token", "--secret", short, "--user", "ada", "--docs", "*"]),
        ),
        ("serve (env)", serve_env),
        (
            "serve (flag)",
            driftsync(&[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data,
                "--secret",
                short,
            ]),
        ),
    ];
    for (name, mut command) in commands {
        let output = command.output().unwrap();
        assert!(!output.status.success(), "{name} accepted a short secret");
        assert!(output.stdout.is_empty(), "{name}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{name}: one line: {stderr:?}");
        assert!(stderr.contains("at least 32"), "{name}: {stderr}");
        assert!(!stderr.contains(short), "{name} printed the secret: {stderr}");
    }
}

#[tokio::test]
async fn serve_with_a_secret_requires_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let mut server = driftsync(&["serve", "--listen", "127.0.0.1:0", "--data-dir", data])
        .env("DRIFTSYNC_SECRET", SERVE_SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("driftsync listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line:?}"));
    let url = format!("ws://{addr}");

    let mut refused = NativeClient::connect_raw(&url).await;
    refused
        .send(&ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token: String::new(),
            client_id: 5,
        })
        .await;
    assert_eq!(
        refused.recv().await,
        Some(ServerFrame::Error {
            code: ErrorCode::Unauthorized,
            doc: None,
            batch: None
        })
    );
    assert_eq!(refused.close_code().await, Some(CLOSE_UNAUTHORIZED));

    let token = driftsync(&["token", "--secret", SERVE_SECRET, "--user", "ada", "--docs", "*"])
        .output()
        .unwrap();
    NativeClient::connect(&url, &stdout_line(&token), 6).await;

    server.kill().unwrap();
    server.wait().unwrap();
}
