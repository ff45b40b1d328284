//! The web app at `/`: a collaborative editor and a chat (sources in `web/`, built by npm into
//! `web/dist/`, which is committed and embedded here so that `cargo build` never needs Node).
//!
//! Caching: `index.html` is revalidated on every load (`no-cache` with an `ETag`); it names the
//! script and the style sheet with a hash of their content (`/assets/app.js?v=HASH`), and a
//! request carrying the current hash may be cached for a year (`immutable`); any other is
//! revalidated. Each asset is gzipped once, on first use, and sent so to browsers that accept it.
//! Every page response carries a content-security policy that allows scripts, styles and
//! connections to this origin only (styles also inline: CodeMirror injects its own), no framing,
//! and no referrer: the page's address may hold a token.

use std::io::Write;
use std::sync::LazyLock;

use axum::http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    REFERRER_POLICY, VARY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// The page's content-security policy.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    /// The first 16 hex digits of its SHA-256, as `web/build.mjs` writes them into `index.html`.
    hash: String,
    /// Its gzip encoding, made once.
    gzip: Vec<u8>,
}

impl Asset {
    fn new(body: &'static [u8], content_type: &'static str) -> Asset {
        let digest = Sha256::digest(body);
        let hash = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        // Writing into a Vec cannot fail.
        let gzip = encoder
            .write_all(body)
            .and_then(|()| encoder.finish())
            .unwrap_or_default();
        Asset {
            body,
            content_type,
            hash,
            gzip,
        }
    }

    /// The response to a GET with `headers`; `immutable` when the URL names this content.
    fn respond(&self, headers: &HeaderMap, immutable: bool) -> Response {
        let etag = format!("\"{}\"", self.hash);
        let cache = if immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        };
        let mut response = if headers
            .get(IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|tag| tag.trim().trim_start_matches("W/") == etag))
        {
            StatusCode::NOT_MODIFIED.into_response()
        } else if accepts_gzip(headers) && !self.gzip.is_empty() {
            let mut response = self.gzip.clone().into_response();
            response
                .headers_mut()
                .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            response
        } else {
            self.body.into_response()
        };
        let out = response.headers_mut();
        out.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        out.insert(CACHE_CONTROL, HeaderValue::from_static(cache));
        out.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        if let Ok(etag) = HeaderValue::from_str(&etag) {
            out.insert(ETAG, etag);
        }
        out.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
        out.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        out.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        out.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        response
    }
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|p| p.trim().replace(' ', "") == "q=0");
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

static INDEX: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_bytes!("../../web/dist/index.html"), "text/html; charset=utf-8"));
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_bytes!("../../web/dist/app.js"),
        "text/javascript; charset=utf-8",
    )
});
static STYLE: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_bytes!("../../web/dist/app.css"), "text/css; charset=utf-8"));

/// `GET /`: the page.
pub(crate) async fn index(headers: HeaderMap) -> Response {
    INDEX.respond(&headers, false)
}

/// `GET /assets/app.js` and `GET /assets/app.css`.
pub(crate) async fn asset(uri: Uri, headers: HeaderMap) -> Response {
    let asset: &Asset = match uri.path() {
        "/assets/app.js" => &SCRIPT,
        "/assets/app.css" => &STYLE,
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let current = uri
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("v=")))
        .is_some_and(|v| v == asset.hash);
    asset.respond(&headers, current)
}

/// The sizes the page costs a browser: every asset gzipped, in bytes.
pub fn page_weight_gzipped() -> usize {
    [&*INDEX, &*SCRIPT, &*STYLE].iter().map(|a| a.gzip.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_the_assets_by_their_hashes() {
        let html = std::str::from_utf8(INDEX.body).unwrap();
        assert!(
            html.contains(&format!("/assets/app.js?v={}", SCRIPT.hash)),
            "rebuild web/: npm run build"
        );
        assert!(
            html.contains(&format!("/assets/app.css?v={}", STYLE.hash)),
            "rebuild web/: npm run build"
        );
    }

    #[test]
    fn the_page_weighs_less_than_300_kb_gzipped() {
        let weight = page_weight_gzipped();
        assert!(weight < 300 * 1024, "the page weighs {weight} bytes gzipped");
    }

    #[test]
    fn gzip_is_sent_only_to_browsers_that_accept_it() {
        let mut headers = HeaderMap::new();
        assert!(!accepts_gzip(&headers));
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip, deflate, br"));
        assert!(accepts_gzip(&headers));
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("br, gzip;q=0"));
        assert!(!accepts_gzip(&headers));
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        assert!(!accepts_gzip(&headers));
    }

    #[test]
    fn a_known_etag_is_answered_not_modified() {
        let mut headers = HeaderMap::new();
        headers.insert(
            IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"{}\"", SCRIPT.hash)).unwrap(),
        );
        let response = SCRIPT.respond(&headers, true);
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(response.headers()[CACHE_CONTROL], "public, max-age=31536000, immutable");
        let response = SCRIPT.respond(&HeaderMap::new(), false);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CACHE_CONTROL], "no-cache");
        assert!(response.headers()[CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
    }
}
