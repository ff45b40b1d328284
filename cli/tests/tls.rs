//! `driftsync serve --tls-cert --tls-key` terminates TLS itself, with a self-signed certificate
//! made by the test: `driftsync client … sync --server wss://… --ca-cert` syncs through it, the
//! same without `--ca-cert` fails with a clear TLS error, and `/healthz` answers over HTTPS.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn driftsync(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_driftsync"))
        .current_dir(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run driftsync")
}

#[tokio::test]
async fn serve_terminates_tls_and_the_client_trusts_an_extra_ca() {
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_driftsync"))
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", "data"])
        .env("DRIFTSYNC_TLS_CERT", &cert)
        .env("DRIFTSYNC_TLS_KEY", &key)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start driftsync serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Server(child);
    let addr = line
        .trim()
        .strip_prefix("driftsync listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line:?}"))
        .to_string();
    let url = format!("wss://{addr}");

    let ada = ["client", "--store", "ada.db", "--user", "ada"];
    let sent = driftsync(
        dir.path(),
        &[&ada[..], &["chat", "send", "chat/x", "over TLS"]].concat(),
    );
    assert!(sent.status.success());

    // Mozilla's roots alone do not trust a self-signed certificate.
    let refused = driftsync(dir.path(), &[&ada[..], &["sync", "--server", &url, "--once"]].concat());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("TLS failed") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    // Plain WebSocket to a TLS port gets nowhere either.
    let plain = driftsync(
        dir.path(),
        &[&ada[..], &["sync", "--server", &format!("ws://{addr}"), "--once"]].concat(),
    );
    assert!(!plain.status.success());

    let cert_arg = cert.to_string_lossy().into_owned();
    let synced = driftsync(
        dir.path(),
        &[&ada[..], &["sync", "--server", &url, "--ca-cert", &cert_arg, "--once"]].concat(),
    );
    assert!(synced.status.success(), "{}", String::from_utf8_lossy(&synced.stderr));
    let listed = driftsync(dir.path(), &[&ada[..], &["chat", "list", "chat/x", "--json"]].concat());
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(json[0]["delivery"], "acknowledged");

    // The plain HTTP endpoints are served over TLS too.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(made.cert.der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.ok();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer}");
}
