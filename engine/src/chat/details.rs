//! The optional parts of a chat message — its kind, metadata, attachments and the message it
//! replies to — and the keys of reactions: their shapes and bounds, as rooms write them and the
//! guard checks them. Everything is plain `Any` (JSON-like) data, so plain Yjs clients read and
//! write it without knowing yrs types.

use std::collections::{BTreeMap, HashMap};

use yrs::Any;

/// Most metadata entries on one message.
pub const MAX_METADATA_ENTRIES: usize = 32;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_BYTES: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_BYTES: usize = 4096;
/// Most attachments on one message.
pub const MAX_ATTACHMENTS: usize = 16;
/// Longest attachment URL, in bytes.
pub const MAX_URL_BYTES: usize = 4096;
/// Longest MIME type, in bytes.
pub const MAX_MIME_BYTES: usize = 255;
/// Longest reaction (an emoji, perhaps with modifiers), in bytes.
pub const MAX_REACTION_BYTES: usize = 64;
/// Longest message id a reply or a reaction may name, in bytes (UUIDs take 36).
pub const MAX_MESSAGE_ID_BYTES: usize = 64;
/// Largest attachment size, width or height that stays exact in JavaScript (2^53 − 1).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// What a message is. Stored in the `kind` field; absent means `text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Kind {
    /// A text message.
    #[default]
    Text,
    /// An image (its attachments hold it).
    Image,
    /// A video.
    Video,
    /// Any other file.
    File,
    /// Written by the server only: joins, leaves, renames. A client's is refused.
    System,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 5] = [Kind::Text, Kind::Image, Kind::Video, Kind::File, Kind::System];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Image => "image",
            Kind::Video => "video",
            Kind::File => "file",
            Kind::System => "system",
        }
    }

    /// The kind a stored name means, if any.
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A file a message refers to; its bytes live elsewhere (`url`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attachment {
    /// Where the bytes are.
    pub url: String,
    /// Their MIME type, `type/subtype`.
    pub mime: String,
    /// Their size in bytes.
    pub size: u64,
    /// Their SHA-256, 64 lowercase hex digits.
    pub sha256: Option<String>,
    /// Pixels, for images and videos.
    pub width: Option<u64>,
    /// Pixels, for images and videos.
    pub height: Option<u64>,
}

impl Attachment {
    /// Checks the bounds and shapes above.
    pub fn check(&self) -> Result<(), String> {
        if self.url.is_empty() || self.url.len() > MAX_URL_BYTES || self.url.chars().any(char::is_control) {
            return Err(format!(
                "an attachment's url must be 1 to {MAX_URL_BYTES} bytes without control characters"
            ));
        }
        let mime_ok = self.mime.len() <= MAX_MIME_BYTES
            && self.mime.split_once('/').is_some_and(|(t, s)| {
                let token = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
                token(t) && s.split(';').next().is_some_and(|s| token(s.trim()))
            });
        if !mime_ok {
            return Err(format!(
                "an attachment's mime must be type/subtype, at most {MAX_MIME_BYTES} bytes"
            ));
        }
        if self.size > MAX_SAFE_INTEGER {
            return Err("an attachment's size must be below 2^53".into());
        }
        if let Some(hash) = &self.sha256 {
            if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err("an attachment's sha256 must be 64 lowercase hex digits".into());
            }
        }
        if self.width.is_some_and(|w| w > MAX_SAFE_INTEGER) || self.height.is_some_and(|h| h > MAX_SAFE_INTEGER) {
            return Err("an attachment's width and height must be below 2^53".into());
        }
        Ok(())
    }

    /// The stored form: `{url, mime, size[, sha256][, width][, height]}`.
    pub fn to_any(&self) -> Any {
        let mut map = HashMap::from([
            ("url".to_string(), Any::from(self.url.as_str())),
            ("mime".to_string(), Any::from(self.mime.as_str())),
            ("size".to_string(), Any::from(self.size as f64)),
        ]);
        if let Some(hash) = &self.sha256 {
            map.insert("sha256".into(), Any::from(hash.as_str()));
        }
        if let Some(width) = self.width {
            map.insert("width".into(), Any::from(width as f64));
        }
        if let Some(height) = self.height {
            map.insert("height".into(), Any::from(height as f64));
        }
        Any::from(map)
    }

    /// Reads the stored form, checked.
    pub fn from_any(value: &Any) -> Result<Attachment, String> {
        let Any::Map(map) = value else {
            return Err("an attachment must be an object".into());
        };
        let string = |key: &str| match map.get(key) {
            Some(Any::String(s)) => Ok(Some(s.to_string())),
            None | Some(Any::Null | Any::Undefined) => Ok(None),
            Some(_) => Err(format!("an attachment's {key} must be a string")),
        };
        let number = |key: &str| match map.get(key) {
            Some(v @ Any::Number(_)) => any_u64(v)
                .map(Some)
                .ok_or_else(|| format!("an attachment's {key} must be a whole number")),
            None | Some(Any::Null | Any::Undefined) => Ok(None),
            Some(_) => Err(format!("an attachment's {key} must be a number")),
        };
        let attachment = Attachment {
            url: string("url")?.ok_or("an attachment needs a url")?,
            mime: string("mime")?.ok_or("an attachment needs a mime type")?,
            size: number("size")?.ok_or("an attachment needs a size")?,
            sha256: string("sha256")?,
            width: number("width")?,
            height: number("height")?,
        };
        attachment.check()?;
        Ok(attachment)
    }
}

/// Checks a message's metadata: at most [`MAX_METADATA_ENTRIES`] string entries, keys and values
/// within their bounds.
pub fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), String> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(format!("at most {MAX_METADATA_ENTRIES} metadata entries"));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_BYTES {
            return Err(format!("metadata keys are 1 to {MAX_METADATA_KEY_BYTES} bytes"));
        }
        if value.len() > MAX_METADATA_VALUE_BYTES {
            return Err(format!("metadata values are at most {MAX_METADATA_VALUE_BYTES} bytes"));
        }
    }
    Ok(())
}

/// The stored form of metadata: a flat object of strings.
pub(crate) fn metadata_to_any(metadata: &BTreeMap<String, String>) -> Any {
    Any::from(
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), Any::from(v.as_str())))
            .collect::<HashMap<_, _>>(),
    )
}

/// Reads stored metadata, checked.
pub(crate) fn metadata_from_any(value: &Any) -> Result<BTreeMap<String, String>, String> {
    let Any::Map(map) = value else {
        return Err("metadata must be an object of strings".into());
    };
    let mut out = BTreeMap::new();
    for (key, value) in map.iter() {
        let Any::String(value) = value else {
            return Err(format!("metadata {key} must be a string"));
        };
        out.insert(key.clone(), value.to_string());
    }
    check_metadata(&out)?;
    Ok(out)
}

/// Reads stored attachments (an array), checked.
pub(crate) fn attachments_from_any(value: &Any) -> Result<Vec<Attachment>, String> {
    let Any::Array(items) = value else {
        return Err("attachments must be an array".into());
    };
    if items.len() > MAX_ATTACHMENTS {
        return Err(format!("at most {MAX_ATTACHMENTS} attachments"));
    }
    items.iter().map(Attachment::from_any).collect()
}

/// The stored form of attachments.
pub(crate) fn attachments_to_any(attachments: &[Attachment]) -> Any {
    Any::from(attachments.iter().map(Attachment::to_any).collect::<Vec<_>>())
}

/// Checks a message id named by a reply or a reaction.
pub(crate) fn check_message_ref(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_MESSAGE_ID_BYTES || id.contains('/') {
        return Err(format!("a message id is 1 to {MAX_MESSAGE_ID_BYTES} bytes without '/'"));
    }
    Ok(())
}

/// Checks a reaction: 1 to [`MAX_REACTION_BYTES`] bytes, no `/`, no whitespace or control
/// characters.
pub fn check_reaction(reaction: &str) -> Result<(), String> {
    if reaction.is_empty()
        || reaction.len() > MAX_REACTION_BYTES
        || reaction.contains('/')
        || reaction.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "a reaction is 1 to {MAX_REACTION_BYTES} bytes without '/', spaces or control characters"
        ));
    }
    Ok(())
}

/// The key of one user's reaction to a message: `"{message}/{reaction}/{user}"` (message ids
/// and reactions hold no `/`; user ids may).
pub fn reaction_key(message: &str, reaction: &str, user: &str) -> String {
    format!("{message}/{reaction}/{user}")
}

/// Splits a reaction key into message, reaction and user, checked.
pub fn parse_reaction_key(key: &str) -> Result<(&str, &str, &str), String> {
    let mut parts = key.splitn(3, '/');
    let (Some(message), Some(reaction), Some(user)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("reaction key {key:?} is not message/reaction/user"));
    };
    check_message_ref(message)?;
    check_reaction(reaction)?;
    if user.is_empty() {
        return Err(format!("reaction key {key:?} names no user"));
    }
    Ok((message, reaction, user))
}

/// A whole number in `value` below 2^53 (yrs reads lib0's integers and floats alike as
/// `Number`).
pub(crate) fn any_u64(value: &Any) -> Option<u64> {
    match value {
        Any::Number(n) => n
            .as_i64()
            .and_then(|v| u64::try_from(v).ok())
            .filter(|&v| v <= MAX_SAFE_INTEGER),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_ones_are_not_kinds() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(Kind::parse("sticker"), None);
        assert_eq!(Kind::default(), Kind::Text);
    }

    #[test]
    fn attachments_round_trip_and_bad_ones_are_refused() {
        let good = Attachment {
            url: "https://cdn.example/cat.png".into(),
            mime: "image/png".into(),
            size: 12_345,
            sha256: Some("a".repeat(64)),
            width: Some(640),
            height: Some(480),
        };
        assert_eq!(Attachment::from_any(&good.to_any()), Ok(good.clone()));
        let minimal = Attachment {
            url: "https://x/y".into(),
            mime: "application/pdf".into(),
            size: 0,
            ..Default::default()
        };
        assert_eq!(Attachment::from_any(&minimal.to_any()), Ok(minimal));
        for bad in [
            Attachment {
                url: String::new(),
                ..good.clone()
            },
            Attachment {
                mime: "png".into(),
                ..good.clone()
            },
            Attachment {
                mime: "image/".into(),
                ..good.clone()
            },
            Attachment {
                sha256: Some("XYZ".into()),
                ..good.clone()
            },
            Attachment {
                size: 1 << 60,
                ..good.clone()
            },
            Attachment {
                url: "https://x/\n".into(),
                ..good.clone()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
            assert!(Attachment::from_any(&bad.to_any()).is_err(), "{bad:?}");
        }
        assert!(Attachment::from_any(&Any::from("https://x")).is_err());
        let many = vec![good.clone(); MAX_ATTACHMENTS + 1];
        assert!(attachments_from_any(&attachments_to_any(&many)).is_err());
        assert_eq!(
            attachments_from_any(&attachments_to_any(std::slice::from_ref(&good))),
            Ok(vec![good])
        );
    }

    #[test]
    fn metadata_is_bounded_strings() {
        let meta = BTreeMap::from([("w".to_string(), "640".to_string())]);
        assert_eq!(metadata_from_any(&metadata_to_any(&meta)), Ok(meta));
        let many: BTreeMap<_, _> = (0..=MAX_METADATA_ENTRIES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(check_metadata(&many).is_err());
        let long = BTreeMap::from([("k".to_string(), "v".repeat(MAX_METADATA_VALUE_BYTES + 1))]);
        assert!(check_metadata(&long).is_err());
        let number = Any::from(HashMap::from([("k".to_string(), Any::from(1.0))]));
        assert!(metadata_from_any(&number).is_err());
    }

    #[test]
    fn reaction_keys_split_at_the_first_two_slashes() {
        assert_eq!(parse_reaction_key("m1/👍/ada"), Ok(("m1", "👍", "ada")));
        assert_eq!(parse_reaction_key("m1/👍/org/ada"), Ok(("m1", "👍", "org/ada")));
        assert_eq!(reaction_key("m1", "🎉", "bob"), "m1/🎉/bob");
        for bad in ["m1/👍", "m1//ada", "/👍/ada", "m1/👍/", "m1/a b/ada"] {
            assert!(parse_reaction_key(bad).is_err(), "{bad}");
        }
        assert!(check_reaction(&"x".repeat(MAX_REACTION_BYTES + 1)).is_err());
    }
}
