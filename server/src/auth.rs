//! Authorization: HS256-signed JSON Web Tokens naming a user, the documents they may open, and
//! whether they may write them.
//!
//! A token's claims ([`Claims`]) are `sub` (the user id), `docs` (document patterns), `write`
//! (`false`: read-only), `exp` (expiry, seconds since the Unix epoch) and optionally `iat`. A
//! pattern is an exact document id, or a prefix followed by `*` (`chat/*` matches every id that
//! starts with `chat/`); `*` alone matches every document.
//!
//! [`Auth`] holds the server's secret. Without one the server runs *open*: every connection may
//! read and write every document as user [`OPEN_USER`], and no identity is vouched for, so the
//! chat rules that depend on who writes cannot be enforced. The binary only allows that on a
//! loopback address.
//!
//! Expiry is checked with no leeway: a token is valid up to and including its `exp` second.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use driftsync_protocol::{DocId, ErrorCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The user of every connection to an open server (one without a secret).
pub const OPEN_USER: &str = "anonymous";

/// The claims of a driftsync token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Document patterns: exact ids, prefixes ending in `*`, or `*` for every document.
    pub docs: Vec<String>,
    /// Whether the token may write (`false`: read-only).
    pub write: bool,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
    /// When the token was issued, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// What a grant allows on one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// Receive the document and its updates.
    Read,
    /// Read, and push updates.
    Write,
}

/// What a verified token (or an open server) allows a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user id (the token's subject; [`OPEN_USER`] on an open server).
    pub user: String,
    /// The document patterns.
    pub patterns: Vec<String>,
    /// Whether writes are allowed.
    pub write: bool,
    /// Expiry in seconds since the Unix epoch; `None` for an open grant, which never expires and
    /// vouches for no one.
    pub expires_at: Option<u64>,
}

impl Grant {
    /// The grant of every connection to an open server: read and write everything.
    pub fn open() -> Grant {
        Grant {
            user: OPEN_USER.to_string(),
            patterns: vec!["*".to_string()],
            write: true,
            expires_at: None,
        }
    }

    /// What this grant allows on `doc`, or `None` for no access.
    pub fn access(&self, doc: &DocId) -> Option<Access> {
        if !self.patterns.iter().any(|p| pattern_matches(p, doc.as_str())) {
            return None;
        }
        Some(if self.write { Access::Write } else { Access::Read })
    }

    /// The user a token vouches for: `None` for an open grant, whose user is not authenticated.
    pub fn identity(&self) -> Option<&str> {
        self.expires_at.map(|_| self.user.as_str())
    }

    /// Whether the grant has expired at `now` (seconds since the Unix epoch).
    pub fn is_expired_at(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|exp| exp < now)
    }

    /// Whether the grant has expired by now.
    pub fn is_expired(&self) -> bool {
        self.is_expired_at(now_secs())
    }
}

/// Whether `pattern` matches document id `doc`: `*` matches everything, `prefix*` every id
/// starting with `prefix`, anything else only the identical id (a `*` elsewhere is literal).
pub fn pattern_matches(pattern: &str, doc: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => doc.starts_with(prefix),
        None => pattern == doc,
    }
}

/// The server's token verifier; [`Auth::default`] (no secret) runs open.
#[derive(Clone, Default)]
pub struct Auth {
    keys: Option<Arc<Keys>>,
}

struct Keys {
    decoding: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Auth").field("open", &self.is_open()).finish()
    }
}

impl Auth {
    /// Verifies tokens signed with `secret`, or runs open when it is `None`.
    pub fn new(secret: Option<&str>) -> Auth {
        match secret {
            Some(secret) => Auth::with_secret(secret),
            None => Auth::open(),
        }
    }

    /// No secret: every connection reads and writes everything as [`OPEN_USER`].
    pub fn open() -> Auth {
        Auth { keys: None }
    }

    /// Verifies HS256 tokens signed with `secret`.
    pub fn with_secret(secret: &str) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        // `exp` is checked by `verify_at`, against the clock it is given.
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let keys = Keys {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        };
        Auth {
            keys: Some(Arc::new(keys)),
        }
    }

    /// Whether the server runs without a secret.
    pub fn is_open(&self) -> bool {
        self.keys.is_none()
    }

    /// Verifies a token. An open server accepts anything (an empty token included) and returns
    /// [`Grant::open`]. Otherwise a missing or malformed token, a bad signature, another
    /// algorithm than HS256 or an empty subject is [`ErrorCode::Unauthorized`]; a well-signed
    /// token past its `exp` is [`ErrorCode::TokenExpired`].
    pub fn verify(&self, token: &str) -> Result<Grant, ErrorCode> {
        self.verify_at(token, now_secs())
    }

    /// [`Auth::verify`] at `now` (Unix seconds): a token is valid through its `exp` second.
    pub fn verify_at(&self, token: &str, now: u64) -> Result<Grant, ErrorCode> {
        let Some(keys) = &self.keys else {
            return Ok(Grant::open());
        };
        if token.is_empty() {
            return Err(ErrorCode::Unauthorized);
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &keys.decoding, &keys.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => ErrorCode::TokenExpired,
                _ => ErrorCode::Unauthorized,
            })?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(ErrorCode::Unauthorized);
        }
        if claims.exp < now {
            return Err(ErrorCode::TokenExpired);
        }
        Ok(Grant {
            user: claims.sub,
            patterns: claims.docs,
            write: claims.write,
            expires_at: Some(claims.exp),
        })
    }
}

/// A token could not be signed.
#[derive(Debug, thiserror::Error)]
#[error("cannot sign the token: {0}")]
pub struct MintError(String);

/// Signs `claims` with `secret` (HS256).
pub fn sign(secret: &str, claims: &Claims) -> Result<String, MintError> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| MintError(e.to_string()))
}

/// Mints a token for `user` on the documents matching `docs`, writable or read-only, valid for
/// `ttl` from now.
pub fn mint(secret: &str, user: &str, docs: &[String], write: bool, ttl: Duration) -> Result<String, MintError> {
    let now = now_secs();
    let claims = Claims {
        sub: user.to_string(),
        docs: docs.to_vec(),
        write,
        exp: now.saturating_add(ttl.as_secs()),
        iat: Some(now),
    };
    sign(secret, &claims)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-secret";

    fn doc(s: &str) -> DocId {
        DocId::new(s).unwrap()
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "ada".into(),
            docs: vec!["chat/*".into(), "notes/1".into()],
            write: true,
            exp,
            iat: None,
        }
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "anything/at/all"));
        assert!(pattern_matches("chat/*", "chat/general"));
        assert!(pattern_matches("chat/*", "chat/"));
        assert!(!pattern_matches("chat/*", "chat"));
        assert!(!pattern_matches("chat/*", "notes/chat/x"));
        assert!(pattern_matches("notes/1", "notes/1"));
        assert!(!pattern_matches("notes/1", "notes/10"));
        assert!(!pattern_matches("notes/*/x", "notes/a/x"));
        assert!(pattern_matches("notes/*/x", "notes/*/x"));
        assert!(!pattern_matches("", "a"));
    }

    #[test]
    fn a_good_token_grants_its_documents() {
        let auth = Auth::new(Some(SECRET));
        let token = mint(
            SECRET,
            "ada",
            &["chat/*".into(), "notes/1".into()],
            true,
            Duration::from_secs(60),
        )
        .unwrap();
        let grant = auth.verify(&token).unwrap();
        assert_eq!(grant.user, "ada");
        assert_eq!(grant.identity(), Some("ada"));
        assert_eq!(grant.access(&doc("chat/general")), Some(Access::Write));
        assert_eq!(grant.access(&doc("notes/1")), Some(Access::Write));
        assert_eq!(grant.access(&doc("notes/2")), None);
        assert!(!grant.is_expired());
        assert!(grant.is_expired_at(grant.expires_at.unwrap() + 1));

        let read_only = mint(SECRET, "bob", &["*".into()], false, Duration::from_secs(60)).unwrap();
        let grant = auth.verify(&read_only).unwrap();
        assert_eq!(grant.access(&doc("anything")), Some(Access::Read));
    }

    #[test]
    fn refusals() {
        let auth = Auth::new(Some(SECRET));
        assert_eq!(auth.verify(""), Err(ErrorCode::Unauthorized));
        assert_eq!(auth.verify("not a token"), Err(ErrorCode::Unauthorized));
        assert_eq!(auth.verify("a.b.c"), Err(ErrorCode::Unauthorized));
        // Expired, with no leeway.
        let expired = sign(SECRET, &claims(now_secs() - 2)).unwrap();
        assert_eq!(auth.verify(&expired), Err(ErrorCode::TokenExpired));
        // Signed with another secret: refused even when also expired.
        let forged = sign("other-secret", &claims(now_secs() + 60)).unwrap();
        assert_eq!(auth.verify(&forged), Err(ErrorCode::Unauthorized));
        let forged_expired = sign("other-secret", &claims(now_secs() - 60)).unwrap();
        assert_eq!(auth.verify(&forged_expired), Err(ErrorCode::Unauthorized));
        // Another algorithm, even with the right secret, and the unsigned "none" algorithm.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims(now_secs() + 60),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(auth.verify(&hs512), Err(ErrorCode::Unauthorized));
        let good = sign(SECRET, &claims(now_secs() + 60)).unwrap();
        let payload = good.split('.').nth(1).unwrap();
        assert_eq!(
            auth.verify(&format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.")),
            Err(ErrorCode::Unauthorized)
        );
        // A tampered payload breaks the signature.
        let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
        let other = sign(
            "x",
            &Claims {
                sub: "mallory".into(),
                ..claims(now_secs() + 60)
            },
        )
        .unwrap();
        parts[1] = other.split('.').nth(1).unwrap().to_string();
        assert_eq!(auth.verify(&parts.join(".")), Err(ErrorCode::Unauthorized));
        // Missing claims and an empty subject.
        let empty_sub = sign(
            SECRET,
            &Claims {
                sub: String::new(),
                ..claims(now_secs() + 60)
            },
        )
        .unwrap();
        assert_eq!(auth.verify(&empty_sub), Err(ErrorCode::Unauthorized));
        let no_docs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "sub": "ada", "write": true, "exp": now_secs() + 60 }),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(auth.verify(&no_docs), Err(ErrorCode::Unauthorized));
    }

    #[test]
    fn open_mode_accepts_anything() {
        let auth = Auth::default();
        assert!(auth.is_open());
        for token in ["", "garbage"] {
            let grant = auth.verify(token).unwrap();
            assert_eq!(grant, Grant::open());
            assert_eq!(grant.identity(), None);
            assert_eq!(grant.access(&doc("chat/x")), Some(Access::Write));
            assert!(!grant.is_expired());
        }
        assert_eq!(format!("{:?}", Auth::new(Some(SECRET))), "Auth { open: false }");
    }
}
