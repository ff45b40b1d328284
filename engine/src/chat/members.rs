//! Membership of a chat room, and the facts a server indexes about each change to a room.
//!
//! * Root `Y.Map` [`MEMBERS_ROOT`] (`"members"`): key = user id, value = a plain object
//!   `{ state: "joined" | "left", at: milliseconds }`. A user writes only their own entry (so
//!   joining works offline, like every other write); the server answers a change of state with
//!   a `system` message ("alice joined").
//! * [`ChatFacts`]: what one accepted update did to a room that a server's index must know —
//!   new messages (with their sort key, author and a preview), changed or deleted ones, read
//!   receipts raised and membership changes. [`ChatGuard`](super::ChatGuard) collects them while
//!   it judges an update; the store writes them in the transaction that stores the update
//!   (`Append::chat`), so the index never disagrees with the log.

use std::collections::HashMap;

use yrs::types::{EntryChange, Event};
use yrs::{Any, Out, TransactionMut};

use super::Touch;

/// The root map of members: user id → `{state, at}`.
pub const MEMBERS_ROOT: &str = "members";

/// The longest preview of a message's text an index keeps, in bytes.
pub const MAX_PREVIEW_BYTES: usize = 280;

/// A member of a room, as the `members` map says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The user id.
    pub user: String,
    /// Joined (`true`) or left.
    pub joined: bool,
    /// When they joined or left (milliseconds since the Unix epoch, their device's clock).
    pub at_ms: u64,
}

/// A new message, as an index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFact {
    /// Its id.
    pub id: String,
    /// Its sort key.
    pub sort: String,
    /// Its author.
    pub author: String,
    /// Its kind (`text`, `image`, …, `system`).
    pub kind: String,
    /// The start of its text, at most [`MAX_PREVIEW_BYTES`].
    pub preview: String,
    /// Its sender's wall clock at sending (milliseconds).
    pub created_ms: u64,
    /// Deleted already.
    pub deleted: bool,
}

impl MessageFact {
    /// Whether it counts as unread for members other than its author: not deleted, not a
    /// system message.
    pub fn counted(&self) -> bool {
        !self.deleted && self.kind != super::Kind::System.as_str()
    }
}

/// A message changed after it was sent (edited or deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditFact {
    /// Its id.
    pub id: String,
    /// Its sort key.
    pub sort: String,
    /// The start of its text now.
    pub preview: String,
    /// Deleted now.
    pub deleted: bool,
}

/// A read receipt raised: `user` has read up to the message with sort key `sort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFact {
    /// The user.
    pub user: String,
    /// The sort key read up to.
    pub sort: String,
}

/// A user joined or left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFact {
    /// The user.
    pub user: String,
    /// Joined now (`false`: left).
    pub joined: bool,
    /// When (their clock, milliseconds).
    pub at_ms: u64,
}

/// What accepted updates did to a room that an index keeps (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatFacts {
    /// New messages.
    pub messages: Vec<MessageFact>,
    /// Messages edited or deleted (the last state of each).
    pub edits: Vec<EditFact>,
    /// Read receipts raised (the highest per user).
    pub reads: Vec<ReadFact>,
    /// Membership changes.
    pub members: Vec<MemberFact>,
}

impl ChatFacts {
    /// Nothing to index.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.edits.is_empty() && self.reads.is_empty() && self.members.is_empty()
    }

    /// Adds `other`'s facts after these.
    pub fn extend(&mut self, other: ChatFacts) {
        self.messages.extend(other.messages);
        self.edits.extend(other.edits);
        self.reads.extend(other.reads);
        self.members.extend(other.members);
        self.normalize();
    }

    /// One entry per edited message (its last state), per reader (their highest sort) and per
    /// member (their last change), in a fixed order.
    pub fn normalize(&mut self) {
        let mut edits: HashMap<String, EditFact> = HashMap::new();
        for edit in self.edits.drain(..) {
            edits.insert(edit.id.clone(), edit);
        }
        self.edits = edits.into_values().collect();
        self.edits.sort_by(|a, b| a.id.cmp(&b.id));
        let mut reads: HashMap<String, String> = HashMap::new();
        for read in self.reads.drain(..) {
            let entry = reads.entry(read.user).or_default();
            if read.sort > *entry {
                *entry = read.sort;
            }
        }
        self.reads = reads.into_iter().map(|(user, sort)| ReadFact { user, sort }).collect();
        self.reads.sort_by(|a, b| a.user.cmp(&b.user));
        let mut members: HashMap<String, MemberFact> = HashMap::new();
        for member in self.members.drain(..) {
            members.insert(member.user.clone(), member);
        }
        self.members = members.into_values().collect();
        self.members.sort_by(|a, b| a.user.cmp(&b.user));
        self.messages.sort_by(|a, b| a.sort.cmp(&b.sort));
        self.messages.dedup_by(|a, b| a.id == b.id);
    }
}

/// The text cut to at most [`MAX_PREVIEW_BYTES`], on a character boundary.
pub fn preview(text: &str) -> String {
    if text.len() <= MAX_PREVIEW_BYTES {
        return text.to_string();
    }
    let mut end = MAX_PREVIEW_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The users whose entry in the room's `members` map says `joined`.
pub fn joined_members(doc: &yrs::Doc) -> Vec<String> {
    use yrs::{Map, Transact};
    let members = doc.get_or_insert_map(MEMBERS_ROOT);
    let txn = doc.transact();
    members
        .iter(&txn)
        .filter(|(_, value)| member_from(value).is_some_and(|(joined, _)| joined))
        .map(|(user, _)| user.to_string())
        .collect()
}

/// A member entry's value: `{state, at}`.
pub(crate) fn member_value(joined: bool, at_ms: u64) -> Any {
    Any::from(HashMap::from([
        ("state".to_string(), Any::from(if joined { "joined" } else { "left" })),
        ("at".to_string(), Any::from(at_ms as f64)),
    ]))
}

/// Reads a member entry's value: `(joined, at)`, `None` if it is not `{state, at}`.
pub(crate) fn member_from(value: &Out) -> Option<(bool, u64)> {
    let Out::Any(Any::Map(fields)) = value else { return None };
    let joined = match fields.get("state") {
        Some(Any::String(state)) if &**state == "joined" => true,
        Some(Any::String(state)) if &**state == "left" => false,
        _ => return None,
    };
    let at = fields.get("at").and_then(super::any_u64)?;
    Some((joined, at))
}

/// Records what one event under the `members` root did: every key belongs to the user it
/// names, who sets it to `{state, at}` and never removes it.
pub(crate) fn member_touches(
    txn: &TransactionMut<'_>,
    event: &Event,
    out: &mut Vec<Touch>,
    facts: &mut Vec<MemberFact>,
) {
    let Event::Map(map_event) = event else {
        out.push(Touch::Forbidden("a change below the members map".into()));
        return;
    };
    if !event.path().is_empty() {
        out.push(Touch::Forbidden("a change inside a member entry".into()));
        return;
    }
    for (key, change) in map_event.keys(txn) {
        out.push(Touch::Owner {
            user: Some(key.to_string()),
            what: format!("changing the membership of {key}"),
        });
        match change {
            EntryChange::Inserted(new) | EntryChange::Updated(_, new) => match member_from(new) {
                Some((joined, at_ms)) => {
                    let was = match change {
                        EntryChange::Updated(old, _) => member_from(old).map(|(joined, _)| joined),
                        _ => None,
                    };
                    // A first entry saying "left" (never a member) changes nothing to announce.
                    if was != Some(joined) && (joined || was.is_some()) {
                        facts.push(MemberFact {
                            user: key.to_string(),
                            joined,
                            at_ms,
                        });
                    }
                }
                None => out.push(Touch::Forbidden(format!(
                    "member {key} is not {{state: \"joined\" | \"left\", at}}"
                ))),
            },
            EntryChange::Removed(_) => out.push(Touch::Forbidden(format!("removing member {key}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_cut_on_character_boundaries() {
        let text = "é".repeat(200);
        let cut = preview(&text);
        assert!(cut.len() <= MAX_PREVIEW_BYTES);
        assert_eq!(cut.len(), MAX_PREVIEW_BYTES);
        assert_eq!(preview("short"), "short");
    }

    #[test]
    fn facts_normalize_to_one_entry_per_key() {
        let mut facts = ChatFacts::default();
        for sort in ["b", "c", "a"] {
            facts.reads.push(ReadFact {
                user: "u".into(),
                sort: sort.into(),
            });
        }
        facts.members.push(MemberFact {
            user: "u".into(),
            joined: true,
            at_ms: 1,
        });
        facts.members.push(MemberFact {
            user: "u".into(),
            joined: false,
            at_ms: 2,
        });
        facts.normalize();
        assert_eq!(
            facts.reads,
            vec![ReadFact {
                user: "u".into(),
                sort: "c".into()
            }]
        );
        assert_eq!(facts.members.len(), 1);
        assert!(!facts.members[0].joined);
    }
}
