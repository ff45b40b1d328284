//! Push notification webhooks: their configuration, their Standard Webhooks signature, their
//! payload, one attempt over HTTP and what its answer means (delivered, retried with backoff,
//! stopped, dead letter). No state and no store: `push.rs` runs the delivery task around it
//! (ARCHITECTURE.md, "Push notifications").
//!
//! Nothing here panics on what a receiver answers; the secret never reaches a log line nor a
//! `Debug` output, and neither does the webhook URL's query (which may hold a token).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use driftsync_engine::store::{DueNotification, PushOutcome};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use sha2::{Digest, Sha256};

/// The default [`PushConfig::grace`].
pub const DEFAULT_PUSH_GRACE: Duration = Duration::from_secs(3);

/// A webhook secret: one or more HMAC keys (several while rotating). Its `Debug` shows no key.
#[derive(Clone)]
pub struct PushSecret {
    keys: Vec<Vec<u8>>,
}

impl fmt::Debug for PushSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PushSecret({} key(s), redacted)", self.keys.len())
    }
}

/// The shortest key accepted, in bytes (Standard Webhooks' secrets are 24 to 64 bytes).
pub const MIN_SECRET_BYTES: usize = 16;

impl PushSecret {
    /// Parses `--push-webhook-secret`: space-separated values, each `whsec_<base64>` (the
    /// Standard Webhooks form) or bare base64, of at least [`MIN_SECRET_BYTES`] bytes. Every
    /// value signs each webhook (a receiver holding any one of them verifies it), so a secret
    /// is rotated by adding the new one, updating receivers, then removing the old one.
    pub fn parse(value: &str) -> Result<PushSecret, String> {
        let mut keys = Vec::new();
        for (i, part) in value.split_whitespace().enumerate() {
            let encoded = part.strip_prefix("whsec_").unwrap_or(part);
            let key = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| format!("webhook secret value {} is not whsec_<base64> (nor base64)", i + 1))?;
            if key.len() < MIN_SECRET_BYTES {
                return Err(format!(
                    "webhook secret value {} holds {} bytes; at least {MIN_SECRET_BYTES} are needed",
                    i + 1,
                    key.len()
                ));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("the webhook secret is empty".into());
        }
        Ok(PushSecret { keys })
    }

    /// The `webhook-signature` header of a message: `v1,<base64 HMAC-SHA256 of
    /// "{id}.{timestamp}.{body}">` per key, separated by spaces.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut signatures = Vec::with_capacity(self.keys.len());
        for key in &self.keys {
            // HMAC takes keys of any length.
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
                continue;
            };
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            signatures.push(format!("v1,{signature}"));
        }
        signatures.join(" ")
    }
}

/// Where and how notifications are delivered ([`crate::Config::push`]).
#[derive(Clone)]
pub struct PushConfig {
    /// The webhook: `http://` or `https://` (Mozilla's roots).
    pub url: Uri,
    /// The signing secret(s).
    pub secret: PushSecret,
    /// How long after a member's first unseen message the notification waits
    /// ([`DEFAULT_PUSH_GRACE`]): a member who comes back meanwhile gets none. Keep it well above
    /// [`poll`](Self::poll), the time another instance takes to notice a member connected there.
    pub grace: Duration,
    /// Whether the webhook carries the latest message's text (otherwise only its id and sender;
    /// the text is then not even kept in the outbox).
    pub include_text: bool,
    /// How long one attempt may take, connection included.
    pub timeout: Duration,
    /// The first retry's delay bound; doubled per attempt up to [`backoff_max`](Self::backoff_max).
    pub backoff_base: Duration,
    /// The largest delay between two attempts.
    pub backoff_max: Duration,
    /// Full jitter: each delay is uniform between zero and its bound (off: the bound itself, for
    /// tests that check the schedule).
    pub jitter: bool,
    /// A notification still undelivered this long after its first message becomes a dead letter.
    pub max_age: Duration,
    /// How often the outbox is looked at (due notifications, members connected here).
    pub poll: Duration,
    /// Attempts in flight at once, per instance.
    pub max_in_flight: usize,
    /// TLS for `https://` webhooks; `None`: Mozilla's roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushConfig")
            .field("url", &redacted(&self.url))
            .field("secret", &self.secret)
            .field("grace", &self.grace)
            .field("include_text", &self.include_text)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PushConfig {
    /// The defaults for `url` and `secret`: a 3 s grace, no text, 10 s per attempt, backoff from
    /// 1 s to an hour with full jitter, for up to a day, the outbox looked at every 500 ms, 64
    /// attempts in flight.
    pub fn new(url: &str, secret: PushSecret) -> Result<PushConfig, String> {
        let url: Uri = url.parse().map_err(|_| "the webhook URL is not a URL".to_string())?;
        match url.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err("the webhook URL must start with http:// or https://".into()),
        }
        if url.host().is_none_or(str::is_empty) {
            return Err("the webhook URL has no host".into());
        }
        Ok(PushConfig {
            url,
            secret,
            grace: DEFAULT_PUSH_GRACE,
            include_text: false,
            timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(3600),
            jitter: true,
            max_age: Duration::from_secs(24 * 3600),
            poll: Duration::from_millis(500),
            max_in_flight: 64,
            tls: None,
        })
    }
}

/// The URL as logs show it: scheme, host, port and path, never the query.
pub(crate) fn redacted(url: &Uri) -> String {
    format!(
        "{}://{}{}",
        url.scheme_str().unwrap_or("?"),
        url.authority().map_or("", |a| a.as_str()),
        url.path()
    )
}

/// The webhook id of a notification: stable across retries, instances and restarts (it derives
/// from the room, the user and the first message it covers), and header-safe whatever the ids
/// hold.
pub(crate) fn webhook_id(due: &DueNotification) -> String {
    let mut hash = Sha256::new();
    for part in [&due.room, &due.user, &due.first_id] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let hex: String = digest[..16].iter().map(|byte| format!("{byte:02x}")).collect();
    format!("msg_{hex}")
}

/// The JSON body of a notification's webhook.
pub(crate) fn payload(due: &DueNotification, id: &str, include_text: bool, now_ms: u64) -> Vec<u8> {
    let mut latest = serde_json::json!({ "id": due.latest_id, "sender": due.latest_sender });
    if include_text {
        latest["text"] = serde_json::Value::String(due.latest_text.clone());
    }
    let body = serde_json::json!({
        "type": "chat.unread",
        "id": id,
        "room": due.room,
        "user": due.user,
        "unread": due.unread,
        "latest": latest,
        "timestamp": rfc3339(now_ms),
    });
    body.to_string().into_bytes()
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for ms since the Unix epoch.
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// What one attempt got.
#[derive(Debug)]
pub(crate) enum Answer {
    /// An HTTP status and the delay `Retry-After` asked for, if any.
    Status(u16, Option<Duration>),
    /// No answer within the timeout.
    TimedOut,
    /// No answer: connection refused, TLS, a broken response.
    Failed(String),
}

/// What became of an attempt, for metrics: `delivered`, `retry`, `throttled`, `timeout`,
/// `error`, `gone`, `dead`, `online`, `expired`.
pub(crate) fn settle(
    config: &PushConfig,
    due: &DueNotification,
    answer: &Answer,
    now_ms: u64,
) -> (PushOutcome, &'static str) {
    let retry = |error: String, after: Option<Duration>, label: &'static str| {
        let age = now_ms.saturating_sub(due.created_at);
        let max_age = u64::try_from(config.max_age.as_millis()).unwrap_or(u64::MAX);
        if age >= max_age {
            return (
                PushOutcome::Dead {
                    error: format!("gave up after {} attempts: {error}", due.attempts),
                },
                "expired",
            );
        }
        let delay = backoff(config, due.attempts, after);
        let delay = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        (
            PushOutcome::Retry {
                at_ms: now_ms.saturating_add(delay),
                error,
            },
            label,
        )
    };
    match *answer {
        Answer::Status(status, _) if (200..300).contains(&status) => (PushOutcome::Delivered, "delivered"),
        Answer::Status(410, _) => (PushOutcome::Gone, "gone"),
        Answer::Status(status @ (408 | 429), after) => retry(format!("HTTP {status}"), after, "throttled"),
        Answer::Status(status, _) if (400..500).contains(&status) => (
            PushOutcome::Dead {
                error: format!("HTTP {status}"),
            },
            "dead",
        ),
        Answer::Status(status, after) => retry(format!("HTTP {status}"), after, "retry"),
        Answer::TimedOut => retry("timed out".into(), None, "timeout"),
        Answer::Failed(ref error) => retry(error.clone(), None, "error"),
    }
}

/// The delay before the next attempt after `attempts` attempts: exponential from
/// [`PushConfig::backoff_base`] up to [`PushConfig::backoff_max`], with full jitter, and never
/// shorter than what `Retry-After` asked (itself at most the maximum delay).
fn backoff(config: &PushConfig, attempts: u64, retry_after: Option<Duration>) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1).min(40)).unwrap_or(40);
    let bound = config
        .backoff_base
        .saturating_mul(2u32.saturating_pow(exponent.min(31)))
        .min(config.backoff_max);
    let delay = if config.jitter {
        let bound_ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::random_range(0..=bound_ms))
    } else {
        bound
    };
    match retry_after {
        Some(after) => delay.max(after.min(config.backoff_max)),
        None => delay,
    }
}

/// `Retry-After`: delta-seconds or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// POSTs one signed webhook and reads the status (the body is not read beyond its first 64 KiB).
pub(crate) async fn post(
    config: &PushConfig,
    tls: &Arc<rustls::ClientConfig>,
    id: &str,
    timestamp: u64,
    body: Vec<u8>,
) -> Answer {
    let signature = config.secret.sign(id, timestamp, &body);
    match tokio::time::timeout(config.timeout, exchange(config, tls, id, timestamp, signature, body)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => Answer::Failed(error),
        Err(_) => Answer::TimedOut,
    }
}

async fn exchange(
    config: &PushConfig,
    tls: &Arc<rustls::ClientConfig>,
    id: &str,
    timestamp: u64,
    signature: String,
    body: Vec<u8>,
) -> Result<Answer, String> {
    let url = &config.url;
    let https = url.scheme_str() == Some("https");
    let host = url.host().ok_or("no host")?;
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let connect_host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::net::TcpStream::connect((connect_host, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let request = hyper::Request::post(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, url.authority().map_or(host, |a| a.as_str()))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("driftsync/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::CONNECTION, "close")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("request: {e}"))?;
    if https {
        let name =
            rustls::pki_types::ServerName::try_from(connect_host.to_string()).map_err(|e| format!("TLS name: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(hyper_util::rt::TokioIo::new(stream), request).await
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), request).await
    }
}

async fn send<T>(io: T, request: hyper::Request<Full<Bytes>>) -> Result<Answer, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let connection = tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"));
    let answer = match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let after = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(retry_after);
            // A little of the body, so that a receiver that answers before reading ours is
            // not reset; never more.
            let mut body = http_body_util::Limited::new(response.into_body(), 64 * 1024);
            let _ = tokio::time::timeout(Duration::from_secs(1), body.frame()).await;
            Ok(Answer::Status(status, after))
        }
        Err(e) => Err(e),
    };
    connection.abort();
    answer
}

/// The default TLS configuration: Mozilla's roots, *ring*.
pub(crate) fn default_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // ring, as everywhere in driftsync (rustls deprecates its provider for its lack of
    // post-quantum key exchange; aws-lc-rs needs cmake and nasm).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(attempts: u64) -> DueNotification {
        DueNotification {
            room: "chat/r".into(),
            user: "bob".into(),
            first_id: "m1".into(),
            unread: 2,
            latest_id: "m2".into(),
            latest_sender: "alice".into(),
            latest_text: "hi".into(),
            created_at: 1_000,
            attempts,
            version: 1,
        }
    }

    fn config() -> PushConfig {
        let secret = PushSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let mut config = PushConfig::new("http://127.0.0.1:9/hook?token=x", secret).unwrap();
        config.jitter = false;
        config
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (and of its libraries' tests).
        let secret = PushSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        // Rotation: one signature per key.
        let two =
            PushSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw  MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(two.sign("a", 1, b"b").split(' ').count(), 2);
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        assert!(PushSecret::parse("").is_err());
        assert!(PushSecret::parse("whsec_!!!").is_err());
        assert!(PushSecret::parse("whsec_c2hvcnQ=").is_err(), "5 bytes");
        let secret = PushSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert!(!format!("{secret:?}").contains("MfKQ"));
        let shown = format!("{:?}", config());
        assert!(!shown.contains("token=x") && !shown.contains("MfKQ"), "{shown}");
        assert!(PushConfig::new("ftp://x/", secret.clone()).is_err());
        assert!(PushConfig::new("not a url", secret).is_err());
    }

    #[test]
    fn outcomes_by_status() {
        let config = config();
        let now = 10_000;
        let outcome = |status: u16| settle(&config, &due(1), &Answer::Status(status, None), now).0;
        assert_eq!(outcome(200), PushOutcome::Delivered);
        assert_eq!(outcome(204), PushOutcome::Delivered);
        assert_eq!(outcome(410), PushOutcome::Gone);
        assert!(matches!(outcome(400), PushOutcome::Dead { .. }));
        assert!(matches!(outcome(404), PushOutcome::Dead { .. }));
        for status in [408, 429, 500, 503, 302] {
            assert!(matches!(outcome(status), PushOutcome::Retry { .. }), "{status}");
        }
        assert!(matches!(
            settle(&config, &due(1), &Answer::TimedOut, now).0,
            PushOutcome::Retry { .. }
        ));
        // A day after the first message: a dead letter instead of another retry.
        let late = 1_000 + 24 * 3600 * 1000;
        assert!(matches!(
            settle(&config, &due(30), &Answer::Status(500, None), late).0,
            PushOutcome::Dead { .. }
        ));
    }

    #[test]
    fn backoff_grows_is_bounded_and_honours_retry_after() {
        let mut config = config();
        assert_eq!(backoff(&config, 1, None), Duration::from_secs(1));
        assert_eq!(backoff(&config, 2, None), Duration::from_secs(2));
        assert_eq!(backoff(&config, 5, None), Duration::from_secs(16));
        assert_eq!(backoff(&config, 100, None), Duration::from_secs(3600));
        assert_eq!(
            backoff(&config, 1, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(
            backoff(&config, 1, Some(Duration::from_secs(10 * 3600))),
            Duration::from_secs(3600)
        );
        config.jitter = true;
        for attempts in 1..20 {
            assert!(backoff(&config, attempts, None) <= Duration::from_secs(3600));
        }
        assert_eq!(retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn payload_and_id() {
        let due = due(1);
        let id = webhook_id(&due);
        assert!(id.starts_with("msg_") && id.len() == 36);
        assert_eq!(
            id,
            webhook_id(&DueNotification {
                attempts: 5,
                unread: 9,
                ..due.clone()
            })
        );
        assert_ne!(
            id,
            webhook_id(&DueNotification {
                first_id: "m9".into(),
                ..due.clone()
            })
        );
        let body: serde_json::Value = serde_json::from_slice(&payload(&due, &id, false, 1_700_000_000_123)).unwrap();
        assert_eq!(body["type"], "chat.unread");
        assert_eq!(body["unread"], 2);
        assert_eq!(body["latest"]["sender"], "alice");
        assert!(body["latest"].get("text").is_none());
        assert_eq!(body["timestamp"], "2023-11-14T22:13:20.123Z");
        let body: serde_json::Value = serde_json::from_slice(&payload(&due, &id, true, 0)).unwrap();
        assert_eq!(body["latest"]["text"], "hi");
        assert_eq!(body["timestamp"], "1970-01-01T00:00:00.000Z");
    }
}
