//! The push outbox: chat notifications owed to members who are offline (`serve
//! --push-webhook-url`, ARCHITECTURE.md "Push notifications").
//!
//! The store keeps no HTTP: it writes a due notification per member in the same transaction as
//! the chat message that makes it due (statements added to an append by [`due_statements`]),
//! and gives a server's delivery task the SQL to claim due notifications under a lease, to
//! settle an attempt, and to cancel what members who came back no longer need. Both backends
//! run the same SQL, except that PostgreSQL's claim skips rows another instance has locked.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::sql::{Statement, Value};
use crate::chat::ChatFacts;
use crate::Result;

/// What the store needs to know to write due notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushSettings {
    /// How long after the commit of a member's first unseen message the notification becomes
    /// due (a member who comes back meanwhile gets none).
    pub grace_ms: u64,
    /// Whether the latest message's text is kept for the webhook (otherwise it is never stored
    /// in the outbox).
    pub include_text: bool,
}

/// A store's push switch: off until a server configures it.
#[derive(Debug, Default)]
pub(super) struct PushSwitch {
    /// `grace + 1`, 0 while off.
    grace: AtomicU64,
    include_text: AtomicBool,
}

impl PushSwitch {
    pub(super) fn set(&self, settings: Option<PushSettings>) {
        match settings {
            Some(settings) => {
                self.include_text.store(settings.include_text, Ordering::Relaxed);
                self.grace
                    .store(settings.grace_ms.saturating_add(1).min(u64::MAX - 1), Ordering::Release);
            }
            None => self.grace.store(0, Ordering::Release),
        }
    }

    /// The settings for an append committing about now.
    pub(super) fn plan(&self) -> Option<PushPlan> {
        let grace = self.grace.load(Ordering::Acquire);
        (grace > 0).then(|| PushPlan {
            now_ms: now_ms(),
            grace_ms: grace - 1,
            include_text: self.include_text.load(Ordering::Relaxed),
        })
    }
}

/// The push part of one append: its commit time and the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PushPlan {
    pub(super) now_ms: u64,
    pub(super) grace_ms: u64,
    pub(super) include_text: bool,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

/// A millisecond time for SQL.
pub(super) fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// One notification claimed for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueNotification {
    /// The chat room.
    pub room: String,
    /// The member to notify.
    pub user: String,
    /// The first message the notification covers: with the room and the user it names the
    /// notification, the same across retries.
    pub first_id: String,
    /// Messages of others since the member's last notification (or since they were last
    /// connected to the room).
    pub unread: u64,
    /// The latest message's id.
    pub latest_id: String,
    /// The latest message's author.
    pub latest_sender: String,
    /// The latest message's text, empty unless the store keeps texts ([`PushSettings`]).
    pub latest_text: String,
    /// When the first message it covers was committed, ms since the Unix epoch.
    pub created_at: u64,
    /// Attempts so far, this one included.
    pub attempts: u64,
    /// Changes with every message coalesced into the notification.
    pub version: i64,
}

/// A notification not yet delivered, as [`Store::push_pending`](super::Store::push_pending)
/// lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPush {
    /// The chat room.
    pub room: String,
    /// The member.
    pub user: String,
    /// Its next attempt, ms since the Unix epoch.
    pub due_at: u64,
}

/// The state of the outbox, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Notifications waiting for delivery (their first attempt or a retry).
    pub pending: u64,
    /// Dead letters: refused by the receiver for good, or out of retries.
    pub dead: u64,
    /// When the oldest pending notification's first message was committed.
    pub oldest_created_ms: Option<u64>,
}

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// The receiver took it (2xx): the notification is done (unless messages were coalesced into
    /// it during the attempt: those become a new notification, due at once).
    Delivered,
    /// Try again at `at_ms` (ms since the Unix epoch).
    Retry {
        /// When.
        at_ms: u64,
        /// Why the attempt failed (kept for operators).
        error: String,
    },
    /// Never again: a dead letter.
    Dead {
        /// Why.
        error: String,
    },
    /// The receiver said 410 Gone: nothing more for this user until they connect again.
    Gone,
    /// The member is connected to the room after all: the notification is dropped.
    Online,
}

/// Pending notifications, next due first: `$1` limit.
pub(super) const PENDING: &str = "SELECT room, user_id, due_at FROM push_due WHERE state = 0 \
     ORDER BY due_at LIMIT $1";

/// Counts for [`PushStats`].
pub(super) const STATS: &str = "SELECT CAST(COALESCE(SUM(CASE WHEN state = 0 THEN 1 ELSE 0 END), 0) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN state = 1 THEN 1 ELSE 0 END), 0) AS BIGINT), \
     MIN(CASE WHEN state = 0 THEN created_at END) FROM push_due";

/// Users told to stop: `$1` limit.
pub(super) const STOPPED: &str = "SELECT user_id FROM push_stopped ORDER BY user_id LIMIT $1";

/// The claim: `$1` now, `$2` lease until, `$3` limit; `{lock}` is `FOR UPDATE SKIP LOCKED` on
/// PostgreSQL (several instances claim concurrently, each row goes to one), nothing on SQLite
/// (one writer).
pub(super) fn claim_sql(lock: &str) -> String {
    format!(
        "UPDATE push_due SET lease_until = $2, attempts = attempts + 1 \
         WHERE state = 0 AND due_at <= $1 AND lease_until <= $1 AND (room, user_id) IN \
         (SELECT room, user_id FROM push_due WHERE state = 0 AND due_at <= $1 AND lease_until <= $1 \
         ORDER BY due_at LIMIT $3{lock}) \
         RETURNING room, user_id, first_id, unread, latest_id, latest_sender, latest_text, created_at, attempts, version"
    )
}

/// A delivered notification deleted if nothing was coalesced into it meanwhile: `$1` room,
/// `$2` user, `$3` version.
pub(super) const DELIVERED: &str = "DELETE FROM push_due WHERE room = $1 AND user_id = $2 AND version = $3";

/// Otherwise what was coalesced during the attempt becomes a new notification (named by its
/// latest message), due at once: `$1` room, `$2` user, `$3` version, `$4` unread delivered.
pub(super) const DELIVERED_MORE: &str = "UPDATE push_due SET first_id = latest_id, \
     unread = CASE WHEN unread > $4 THEN unread - $4 ELSE unread END, attempts = 0, lease_until = 0, \
     last_error = '' WHERE room = $1 AND user_id = $2 AND version <> $3 AND state = 0";

/// Another attempt later: `$1` room, `$2` user, `$3` when, `$4` the error.
pub(super) const RETRY: &str = "UPDATE push_due SET due_at = $3, lease_until = 0, last_error = $4 \
     WHERE room = $1 AND user_id = $2 AND state = 0";

/// A dead letter: `$1` room, `$2` user, `$3` the error.
pub(super) const DEAD: &str = "UPDATE push_due SET state = 1, lease_until = 0, last_error = $3 \
     WHERE room = $1 AND user_id = $2";

/// 410: the user stopped (`$1` user, `$2` now) and their notifications dropped (`$1`).
pub(super) const STOP: &str = "INSERT INTO push_stopped (user_id, at) VALUES ($1, $2) \
     ON CONFLICT (user_id) DO NOTHING";
pub(super) const DROP_USER: &str = "DELETE FROM push_due WHERE user_id = $1";

/// A member connected to a room: `$1` room, `$2` user.
pub(super) const SEEN: &str = "DELETE FROM push_due WHERE room = $1 AND user_id = $2";

/// A user connected again after a 410: `$1` user.
pub(super) const RESUMED: &str = "DELETE FROM push_stopped WHERE user_id = $1";

/// The statements (each with its parameters, `$n` bound by number) that settle one attempt.
pub(super) fn finish_statements<'a>(
    due: &'a DueNotification,
    outcome: &'a PushOutcome,
    now: u64,
) -> Vec<(&'static str, Vec<Value<'a>>)> {
    let (room, user) = (Value::Text(&due.room), Value::Text(&due.user));
    match outcome {
        PushOutcome::Delivered => vec![
            (DELIVERED, vec![room, user, Value::Int(due.version)]),
            (
                DELIVERED_MORE,
                vec![room, user, Value::Int(due.version), Value::Int(ms(due.unread))],
            ),
        ],
        PushOutcome::Retry { at_ms, error } => {
            vec![(RETRY, vec![room, user, Value::Int(ms(*at_ms)), Value::Text(error)])]
        }
        PushOutcome::Dead { error } => vec![(DEAD, vec![room, user, Value::Text(error)])],
        PushOutcome::Gone => vec![(STOP, vec![user, Value::Int(ms(now))]), (DROP_USER, vec![user])],
        PushOutcome::Online => vec![(SEEN, vec![room, user])],
    }
}

/// The statements of [`Store::push_seen`](super::Store::push_seen).
pub(super) fn seen_statements<'a>(
    seen: &'a [(String, String)],
    users: &'a [String],
) -> Vec<(&'static str, Vec<Value<'a>>)> {
    let mut statements = Vec::with_capacity(seen.len() + users.len());
    for (room, user) in seen {
        statements.push((SEEN, vec![Value::Text(room), Value::Text(user)]));
    }
    for user in users {
        statements.push((RESUMED, vec![Value::Text(user)]));
    }
    statements
}

/// A row of the claim, checked.
#[allow(clippy::type_complexity)]
pub(super) fn claimed(
    (room, user, first_id, unread, latest_id, latest_sender, latest_text, created_at, attempts, version): (
        String,
        String,
        String,
        i64,
        String,
        String,
        String,
        i64,
        i64,
        i64,
    ),
) -> DueNotification {
    DueNotification {
        room,
        user,
        first_id,
        unread: u64::try_from(unread).unwrap_or(0),
        latest_id,
        latest_sender,
        latest_text,
        created_at: u64::try_from(created_at).unwrap_or(0),
        attempts: u64::try_from(attempts).unwrap_or(0),
        version,
    }
}

/// The upsert of one room's and author's messages into the outbox of every other joined member
/// (set-based, from `chat_members`): `$1` room, `$2` author, `$3` first message, `$4` count,
/// `$5` latest message, `$6` its text, `$7` commit time, `$8` due time.
///
/// A member with a pending notification has the messages coalesced into it: the count grows,
/// the latest message is replaced, and its name, creation and due time stay — a steady stream
/// of messages still gets a notification out. A dead letter starts over as a new notification.
/// `version` takes the commit time, or one more than it had, so it changes with every message
/// even across a row deleted and written again.
const DUE_UPSERT: &str = "INSERT INTO push_due (room, user_id, first_id, unread, latest_id, latest_sender, \
     latest_text, created_at, due_at, version) \
     SELECT m.room, m.user_id, $3, $4, $5, $2, $6, $7, $8, $7 FROM chat_members m \
     WHERE m.room = $1 AND m.joined = 1 AND m.user_id <> $2 \
     AND NOT EXISTS (SELECT 1 FROM push_stopped s WHERE s.user_id = m.user_id) \
     ON CONFLICT (room, user_id) DO UPDATE SET \
     first_id = CASE WHEN push_due.state = 0 THEN push_due.first_id ELSE excluded.first_id END, \
     unread = push_due.unread + excluded.unread, \
     latest_id = excluded.latest_id, latest_sender = excluded.latest_sender, latest_text = excluded.latest_text, \
     created_at = CASE WHEN push_due.state = 0 THEN push_due.created_at ELSE excluded.created_at END, \
     due_at = CASE WHEN push_due.state = 0 THEN push_due.due_at ELSE excluded.due_at END, \
     attempts = CASE WHEN push_due.state = 0 THEN push_due.attempts ELSE 0 END, \
     lease_until = CASE WHEN push_due.state = 0 THEN push_due.lease_until ELSE 0 END, \
     last_error = CASE WHEN push_due.state = 0 THEN push_due.last_error ELSE '' END, \
     version = CASE WHEN push_due.version >= excluded.version THEN push_due.version + 1 ELSE excluded.version END, \
     state = 0";

/// `sql` with its `$n` placeholders made anonymous (`?`, in order of appearance) and `values`
/// (bound to `$1`, `$2`, …) repeated and reordered to match: SQLite's statements of an append
/// take anonymous placeholders, and may run joined into one query (see `sql::values`).
fn anonymous<'a>(sql: &str, values: &[Value<'a>]) -> (String, Vec<Value<'a>>) {
    let mut out = String::with_capacity(sql.len());
    let mut bound = Vec::new();
    let mut chars = sql.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let mut digits = String::new();
        while let Some(&(_, d)) = chars.peek() {
            if !d.is_ascii_digit() {
                break;
            }
            digits.push(d);
            chars.next();
        }
        match digits.parse::<usize>().ok().and_then(|n| values.get(n.wrapping_sub(1))) {
            Some(value) => {
                out.push('?');
                bound.push(*value);
            }
            None => {
                out.push('$');
                out.push_str(&digits);
            }
        }
    }
    (out, bound)
}

/// The statements writing the due notifications of the chat messages stored by one append
/// (`facts`: each stored row's room and chat facts, in commit order): one upsert per room and
/// author, in the order of their latest messages, so the last one written is the room's latest.
/// System messages (joins, leaves) and messages deleted already notify nobody.
pub(super) fn due_statements<'a>(
    facts: &[(&'a str, &'a ChatFacts)],
    plan: &PushPlan,
    numbered: bool,
) -> Result<Vec<Statement<'a>>> {
    // Per room and author: count, first (lowest sort), latest (highest sort).
    struct Group<'a> {
        count: i64,
        first: (&'a str, &'a str),
        latest: (&'a str, &'a str, &'a str),
    }
    let mut groups: BTreeMap<(&'a str, &'a str), Group<'a>> = BTreeMap::new();
    for &(room, chat) in facts {
        for message in chat.messages.iter().filter(|message| message.counted()) {
            let key = (room, message.author.as_str());
            let text = if plan.include_text {
                message.preview.as_str()
            } else {
                ""
            };
            let group = groups.entry(key).or_insert(Group {
                count: 0,
                first: (message.sort.as_str(), message.id.as_str()),
                latest: (message.sort.as_str(), message.id.as_str(), text),
            });
            group.count += 1;
            if message.sort.as_str() < group.first.0 {
                group.first = (message.sort.as_str(), message.id.as_str());
            }
            if message.sort.as_str() >= group.latest.0 {
                group.latest = (message.sort.as_str(), message.id.as_str(), text);
            }
        }
    }
    let mut ordered: Vec<((&'a str, &'a str), Group<'a>)> = groups.into_iter().collect();
    ordered.sort_by(|a, b| a.1.latest.0.cmp(b.1.latest.0));
    let now = ms(plan.now_ms);
    let due = ms(plan.now_ms.saturating_add(plan.grace_ms));
    Ok(ordered
        .into_iter()
        .map(|((room, author), group)| {
            let values = [
                Value::Text(room),
                Value::Text(author),
                Value::Text(group.first.1),
                Value::Int(group.count),
                Value::Text(group.latest.1),
                Value::Text(group.latest.2),
                Value::Int(now),
                Value::Int(due),
            ];
            let (sql, values) = if numbered {
                (DUE_UPSERT.to_string(), values.to_vec())
            } else {
                anonymous(DUE_UPSERT, &values)
            };
            Statement::new(room, sql, 1, values)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_placeholders_follow_the_order_of_appearance() {
        let values = [Value::Int(1), Value::Int(2), Value::Int(3)];
        let (sql, bound) = anonymous("SELECT $3, $1 WHERE x = $3 AND y = '$' AND z = $12", &values);
        assert_eq!(sql, "SELECT ?, ? WHERE x = ? AND y = '$' AND z = $12");
        let ints: Vec<i64> = bound
            .iter()
            .map(|v| match v {
                Value::Int(i) => *i,
                _ => -1,
            })
            .collect();
        assert_eq!(ints, [3, 1, 3]);
    }
}
