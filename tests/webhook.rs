//! An in-process webhook receiver for the push notification tests: HTTP/1.1 (or HTTPS with a
//! fresh self-signed certificate) on 127.0.0.1 and a free port, checking every request's Standard Webhooks signature, and
//! answering each as planned — a status (with `Retry-After`), or never (a hang). Unplanned
//! requests get 200.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use driftsync_engine::chat::{Author, ChatRoom};
use driftsync_engine::doc::new_doc;
use driftsync_protocol::DocId;
use driftsync_server::mint;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use yrs::{Any, Map, Transact};

use crate::NativeClient;

/// The HS256 secret the push tests' servers verify tokens with.
pub const TOKEN_SECRET: &str = "push-test-secret-push-test-secret-32b";

/// The chat room of the push tests.
pub fn chat_room() -> DocId {
    DocId::new("chat/push-room").expect("a document id")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as u64
}

/// A test secret in the Standard Webhooks form (32 bytes).
pub const WEBHOOK_SECRET: &str = "whsec_dGhpcyBpcyBhIDMyLWJ5dGUgdGVzdCBrZXkgZm9yIHB1c2g=";

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Plan {
    /// This status, with `Retry-After: seconds` if given.
    Status(u16, Option<u64>),
    /// Reads the request and never answers.
    Hang,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// When it arrived.
    pub at: Instant,
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: String,
    /// `webhook-signature`.
    pub signature: String,
    /// The raw body.
    pub body: Vec<u8>,
    /// The body as JSON (`Null` if it is not).
    pub json: serde_json::Value,
    /// Whether a signature verified against [`WEBHOOK_SECRET`] and the timestamp was within
    /// five minutes.
    pub verified: bool,
    /// What it was answered (`None`: hung).
    pub answered: Option<u16>,
}

#[derive(Default)]
struct State {
    plans: VecDeque<Plan>,
    received: Vec<Received>,
}

/// The receiver; dropping it stops it.
pub struct WebhookReceiver {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
    /// `http` or `https`.
    scheme: &'static str,
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Verifies a Standard Webhooks signature header with `secret` (`whsec_…`).
pub fn verify(secret: &str, id: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|key| base64::engine::general_purpose::STANDARD.decode(key).ok())
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
        return false;
    };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    signature.split(' ').any(|part| {
        part.strip_prefix("v1,")
            .and_then(|sig| base64::engine::general_purpose::STANDARD.decode(sig).ok())
            .is_some_and(|sig| sig.as_slice() == expected.as_slice())
    })
}

impl WebhookReceiver {
    /// Starts a receiver on 127.0.0.1, port 0.
    pub async fn start() -> WebhookReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let _ = serve(stream, state).await;
                });
            }
        });
        WebhookReceiver {
            addr,
            state,
            task,
            scheme: "http",
        }
    }

    /// Starts a receiver speaking HTTPS on 127.0.0.1, port 0, with a fresh self-signed
    /// certificate for 127.0.0.1; returns it with a client configuration that trusts it.
    pub async fn start_tls() -> (WebhookReceiver, Arc<rustls::ClientConfig>) {
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
        let cert = made.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::try_from(made.signing_key.serialize_der()).expect("key");
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, acceptor) = (Arc::clone(&shared), acceptor.clone());
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = serve(stream, state).await;
                    }
                });
            }
        });
        let receiver = WebhookReceiver {
            addr,
            state,
            task,
            scheme: "https",
        };
        (receiver, Arc::new(client))
    }

    /// The webhook URL.
    pub fn url(&self) -> String {
        format!("{}://{}/hooks/driftsync?token=t0ps3cret", self.scheme, self.addr)
    }

    /// Plans the answers to the next requests, in order.
    pub fn plan(&self, plans: impl IntoIterator<Item = Plan>) {
        self.state.lock().unwrap().plans.extend(plans);
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// Waits (at most `within`) until `count` requests arrived; returns them all.
    pub async fn wait_for(&self, count: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let received = self.received();
            if received.len() >= count || Instant::now() >= deadline {
                return received;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn serve<S>(mut stream: S, state: Arc<Mutex<State>>) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > 1 << 20 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim().to_string())
            .unwrap_or_default()
    };
    let length: usize = header("content-length").parse().unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..].to_vec();
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let fresh = timestamp.parse::<u64>().is_ok_and(|ts| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        now.abs_diff(ts) <= 300
    });
    let verified = fresh && verify(WEBHOOK_SECRET, &id, &timestamp, &body, &signature);
    let plan = state
        .lock()
        .unwrap()
        .plans
        .pop_front()
        .unwrap_or(Plan::Status(200, None));
    let answered = match plan {
        Plan::Status(status, _) => Some(status),
        Plan::Hang => None,
    };
    state.lock().unwrap().received.push(Received {
        at: Instant::now(),
        json: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        id,
        timestamp,
        signature,
        body,
        verified,
        answered,
    });
    match plan {
        Plan::Status(status, retry_after) => {
            let retry = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
            let response = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n{retry}Connection: close\r\n\r\n");
            stream.write_all(response.as_bytes()).await?;
            stream.shutdown().await?;
        }
        Plan::Hang => {
            // Keeps the connection open without answering, until the client gives up.
            let _ = stream.read(&mut chunk).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    }
    Ok(())
}

/// A chat member of the push tests: a user with a client id of their own, who writes their
/// membership and sends messages through a native connection.
pub struct ChatMember {
    /// The user (the token's subject).
    pub user: &'static str,
    /// Their client id (membership is written under `client_id + 1,000,000`).
    pub client_id: u64,
    /// Their replica of the room, for sending messages (`None` until they send).
    chat: Option<ChatRoom>,
    batch: u64,
}

impl ChatMember {
    /// A member who has not joined yet.
    pub fn new(user: &'static str, client_id: u64) -> ChatMember {
        ChatMember {
            user,
            client_id,
            chat: None,
            batch: 0,
        }
    }

    /// A token for the `chat/*` rooms.
    pub fn token(&self) -> String {
        mint(
            TOKEN_SECRET,
            self.user,
            &["chat/*".into()],
            true,
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    /// Connects and subscribes to the room.
    pub async fn connect(&self, url: &str) -> NativeClient {
        let mut client = NativeClient::connect(url, &self.token(), self.client_id).await;
        client.resume_from_scratch(&chat_room()).await;
        client
    }

    /// Writes their own membership ("joined") into the room.
    pub async fn join(&mut self, url: &str) {
        // Membership under a client id of its own, so it never depends on the messages.
        let doc = new_doc(self.client_id + 1_000_000).unwrap();
        let members = doc.get_or_insert_map("members");
        let update = {
            let mut txn = doc.transact_mut();
            let entry = Any::Map(Arc::new(HashMap::from([
                ("state".to_string(), Any::String("joined".into())),
                ("at".to_string(), Any::Number(yrs::Number::Int(now_ms() as i64))),
            ])));
            members.insert(&mut txn, self.user, entry);
            txn.encode_update_v1()
        };
        // The membership client id is this user's too.
        let mut side = NativeClient::connect(url, &self.token(), self.client_id + 1_000_000).await;
        side.resume_from_scratch(&chat_room()).await;
        side.push(&chat_room(), 1, update).await.expect("membership stored");
    }

    /// Sends a message; returns its id.
    pub async fn send(&mut self, client: &mut NativeClient, text: &str) -> String {
        let chat = self
            .chat
            .get_or_insert_with(|| ChatRoom::new(new_doc(self.client_id).unwrap()));
        let author = Author {
            user: self.user.into(),
            device: format!("{}-device", self.user),
        };
        let (id, update) = chat.send(&author, text, now_ms());
        self.batch += 1;
        client
            .push(&chat_room(), self.batch, update)
            .await
            .expect("message stored");
        id
    }
}
