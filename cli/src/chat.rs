//! `driftsync chat ROOM`: an interactive terminal chat over a live session.
//!
//! Every message typed is stored locally first (so it works offline) and pushed when connected.
//! Incoming messages, edits, deletions, read receipts of one's own messages, typing and presence
//! are printed as they arrive; messages shown are marked read. On a terminal, input is read key
//! by key so other users see "typing…"; when stdin is not a terminal (scripts, tests) it is read
//! line by line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use driftsync_client::{ChatEntry, Client, ConnectionState, Event, Options, Session};
use tokio::sync::mpsc;

/// Arguments of `driftsync chat`.
#[derive(clap::Args)]
pub(crate) struct ChatArgs {
    /// The room: a document id, e.g. `chat/general` (chat rules are enforced in `chat/` rooms).
    room: String,
    /// The server's base URL (`ws://host:port`, or `wss://host:port` for TLS).
    #[arg(long, env = "DRIFTSYNC_SERVER")]
    server: String,
    /// A CA certificate (PEM) to trust for `wss://`, besides Mozilla's roots: a private
    /// deployment's CA or a self-signed server certificate.
    #[arg(long, env = "DRIFTSYNC_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// The client's SQLite store file (created if missing).
    #[arg(long, env = "DRIFTSYNC_STORE")]
    store: PathBuf,
    /// The user this client acts for.
    #[arg(long, env = "DRIFTSYNC_USER")]
    user: String,
    /// The access token (empty for an open server).
    #[arg(long, env = "DRIFTSYNC_TOKEN", default_value = "", hide_env_values = true)]
    token: String,
    /// Read stdin line by line even on a terminal (no typing indicator is sent).
    #[arg(long)]
    line_mode: bool,
}

const HELP: &str = "commands: /reply ID TEXT, /react ID EMOJI, /unreact ID EMOJI, /edit ID TEXT, /delete ID, /read, \
                    /who, /members, /leave, /history [N], /quit (IDs: the #xxxxxx shown)";

/// What the input side produces.
enum Input {
    /// A key was pressed in the message being typed.
    Keystroke,
    /// A finished line.
    Line(String),
    /// End of input (Ctrl-D, Ctrl-C, closed stdin).
    End,
}

/// One JSON object describing a session event (used by `driftsync client … sync`).
pub(crate) fn event_json(event: &Event) -> serde_json::Value {
    use serde_json::json;
    match event {
        Event::Connected { session } => json!({"event": "connected", "session": session}),
        Event::Disconnected { reason, retry_in } => json!({
            "event": "disconnected",
            "reason": reason,
            "retry_in_ms": retry_in.map(|d| d.as_millis() as u64),
        }),
        Event::Synced => json!({"event": "synced"}),
        Event::RemoteChange { doc } => json!({"event": "remote_change", "doc": doc}),
        Event::Acknowledged { doc, batch } => json!({"event": "acknowledged", "doc": doc, "batch": batch}),
        Event::Presence { doc, peer, user, state } => {
            json!({"event": "presence", "doc": doc, "peer": peer, "user": user, "state": state})
        }
        Event::Typing {
            doc,
            peer,
            user,
            typing,
        } => {
            json!({"event": "typing", "doc": doc, "peer": peer, "user": user, "typing": typing})
        }
        Event::Error { message, code, doc } => json!({
            "event": "error",
            "message": message,
            "code": code.map(|c| format!("{c:?}")),
            "doc": doc,
        }),
        Event::Lagged { missed } => json!({"event": "lagged", "missed": missed}),
        Event::Inbox { version, rooms, more } => json!({
            "event": "inbox",
            "version": version,
            "more": more,
            "rooms": rooms.iter().map(|r| json!({
                "room": r.room.as_str(), "joined": r.joined, "unread": r.unread,
                "last": r.last.as_ref().map(|m| json!({
                    "id": m.id, "author": m.author, "kind": m.kind, "text": m.text, "time": m.at_ms,
                })),
            })).collect::<Vec<_>>(),
        }),
        Event::Members { room, members } => json!({
            "event": "members",
            "room": room,
            "members": members.iter().map(|m| json!({
                "user": m.user, "joined": m.joined, "at": m.at_ms, "status": m.status,
                "last_seen": m.last_seen_ms,
            })).collect::<Vec<_>>(),
        }),
    }
}

/// `#` and the last six characters of a message id (the random part of a UUIDv7).
fn short(id: &str) -> String {
    let tail = id.len().saturating_sub(6);
    format!("#{}", id.get(tail..).unwrap_or(id))
}

/// `HH:MM` (UTC) of a time in milliseconds.
fn clock(ms: u64) -> String {
    let minutes = (ms / 60_000) % (24 * 60);
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// The terminal: prints lines, keeping the message being typed on the last line in raw mode.
struct Screen {
    raw: bool,
    prompt: String,
    draft: String,
}

impl Screen {
    fn line(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.raw {
            let _ = write!(
                out,
                "\r\x1b[2K{}\r\n{}{}",
                text.replace('\n', "\r\n"),
                self.prompt,
                self.draft
            );
        } else {
            let _ = writeln!(out, "{text}");
        }
        let _ = out.flush();
    }

    fn redraw(&mut self) {
        if self.raw {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[2K{}{}", self.prompt, self.draft);
            let _ = out.flush();
        }
    }
}

/// What has been shown of the room, to print only what changed.
#[derive(Default)]
struct View {
    /// Per message id: (text, deleted, edited).
    shown: HashMap<String, (String, bool, Option<u64>)>,
    /// Own messages shown as not yet acknowledged.
    unsaved: HashSet<String>,
    /// Readers already reported per own message.
    readers: HashMap<String, Vec<String>>,
    /// Own messages reported delivered.
    delivered: HashSet<String>,
    /// Reactions shown per message.
    reactions: HashMap<String, String>,
    /// Who is typing (user → typing).
    typing: BTreeMap<String, bool>,
    /// Present connections: peer → user.
    present: BTreeMap<u64, String>,
    /// Whether the history was shown already.
    started: bool,
    /// Whether the last connection report said online.
    online: Option<bool>,
}

impl View {
    fn format(entry: &ChatEntry, me: &str) -> String {
        let m = &entry.message;
        if m.kind == driftsync_engine::chat::Kind::System {
            // The server's join and leave lines.
            return format!("[{}] * {}", clock(m.created_ms), m.text);
        }
        let mut line = format!("[{}] {} {}: ", clock(m.created_ms), short(&m.id), m.author);
        if let Some(to) = &m.reply_to {
            line.push_str(&format!("↪ {} ", short(to)));
        }
        if m.kind != driftsync_engine::chat::Kind::Text {
            line.push_str(&format!("[{}] ", m.kind));
        }
        if m.deleted {
            line.push_str("(deleted)");
        } else {
            line.push_str(&m.text);
            if m.edited_ms.is_some() {
                line.push_str(" (edited)");
            }
            for a in &m.attachments {
                line.push_str(&format!(" 📎 {} ({}, {} B)", a.url, a.mime, a.size));
            }
        }
        let reactions = Self::reactions(entry);
        if !reactions.is_empty() {
            line.push_str("  ");
            line.push_str(&reactions);
        }
        if m.author == me && !entry.delivered {
            line.push_str("  …");
        }
        line
    }

    /// A message's reactions as `👍2 🎉1`.
    fn reactions(entry: &ChatEntry) -> String {
        entry
            .reactions
            .iter()
            .map(|(r, users)| format!("{r}{}", users.len()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Prints new, edited and deleted messages, saves, and new readers of own messages.
    fn update(&mut self, screen: &mut Screen, entries: &[ChatEntry], me: &str, history: usize) {
        let first_time = !self.started;
        self.started = true;
        let skip = if first_time {
            entries.len().saturating_sub(history)
        } else {
            0
        };
        for entry in entries.iter().skip(skip) {
            let m = &entry.message;
            let state = (m.text.clone(), m.deleted, m.edited_ms);
            match self.shown.get(&m.id) {
                None => screen.line(&Self::format(entry, me)),
                Some(old) if *old != state => {
                    screen.line(&format!("  ~ {}", Self::format(entry, me)));
                }
                Some(_) => {}
            }
            self.shown.insert(m.id.clone(), state);
            if m.author == me {
                if !entry.delivered {
                    self.unsaved.insert(m.id.clone());
                } else if self.unsaved.remove(&m.id) {
                    screen.line(&format!("  ✓ {} saved on the server", short(&m.id)));
                }
                if !entry.delivered_to.is_empty() && self.delivered.insert(m.id.clone()) && !first_time {
                    screen.line(&format!(
                        "  ✓✓ {} delivered to {}",
                        short(&m.id),
                        entry.delivered_to.join(", ")
                    ));
                }
                let others: Vec<String> = entry.read_by.iter().filter(|u| *u != me).cloned().collect();
                let known = self.readers.entry(m.id.clone()).or_default();
                let new: Vec<String> = others.iter().filter(|u| !known.contains(u)).cloned().collect();
                if !new.is_empty() && !first_time {
                    screen.line(&format!("  ✓ {} read by {}", short(&m.id), new.join(", ")));
                }
                *known = others;
            }
            let reactions = Self::reactions(entry);
            let before = self.reactions.insert(m.id.clone(), reactions.clone());
            if before.is_some_and(|before| before != reactions) && !first_time {
                let shown = if reactions.is_empty() {
                    "none".to_string()
                } else {
                    reactions
                };
                screen.line(&format!("  reactions on {}: {shown}", short(&m.id)));
            }
        }
        for entry in entries.iter().take(skip) {
            let m = &entry.message;
            self.shown
                .insert(m.id.clone(), (m.text.clone(), m.deleted, m.edited_ms));
            if m.author == me {
                let others = entry.read_by.iter().filter(|u| *u != me).cloned().collect();
                self.readers.insert(m.id.clone(), others);
            }
        }
    }
}

/// Finds the message whose id ends with `tag` (with or without `#`).
fn find<'a>(entries: &'a [ChatEntry], tag: &str) -> Option<&'a ChatEntry> {
    let tag = tag.trim_start_matches('#');
    if tag.is_empty() {
        return None;
    }
    entries.iter().rev().find(|e| e.message.id.ends_with(tag))
}

/// Runs the chat until the input ends or `stop` fires.
pub(crate) async fn run(args: ChatArgs, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let room = args.room.clone();
    driftsync_protocol::DocId::new(room.as_str()).map_err(|e| anyhow::anyhow!("invalid room {room:?}: {e}"))?;
    let client = Client::open(&args.store, &args.user)
        .await
        .with_context(|| format!("cannot open the client store {}", args.store.display()))?;
    let me = args.user.clone();
    let mut options = Options::new(&args.server).token(&args.token).documents([&room]);
    if let Some(tls) = crate::client_tls(args.ca_cert.as_deref())? {
        options = options.tls(tls);
    }
    // Opening a room joins it (offline too): its members' inboxes list it, and the server
    // announces the join once it arrives.
    let mut client = client;
    client.chat_join(&room).await?;
    let session = Session::start(client, options);
    let mut events = session.events();
    let raw = !args.line_mode && std::io::IsTerminal::is_terminal(&std::io::stdin()) && enable_raw();
    let mut screen = Screen {
        raw,
        prompt: "> ".into(),
        draft: String::new(),
    };
    let (input_tx, mut input) = mpsc::channel(64);
    std::thread::spawn(move || if raw { read_keys(input_tx) } else { read_lines(input_tx) });

    screen.line(&format!("driftsync chat {room} as {me} — {HELP}"));
    let mut view = View::default();
    refresh(&session, &room, &me, &mut view, &mut screen, 50).await?;
    let _ = session
        .set_presence(&room, Some(serde_json::json!({ "user": me }).to_string()))
        .await;
    screen.redraw();
    tokio::pin!(stop);
    let result = loop {
        tokio::select! {
            () = &mut stop => break Ok(()),
            key = input.recv() => match key {
                None | Some(Input::End) => break Ok(()),
                Some(Input::Keystroke) => {
                    let _ = session.keystroke(&room).await;
                }
                Some(Input::Line(line)) => {
                    if let Some(draft) = line.strip_prefix('\u{0}') {
                        // Raw mode: the draft changed; show it.
                        screen.draft = draft.to_string();
                        screen.redraw();
                        continue;
                    }
                    screen.draft.clear();
                    match command(&session, &room, &me, line.trim(), &mut view, &mut screen).await {
                        Ok(true) => {}
                        Ok(false) => break Ok(()),
                        Err(e) => screen.line(&format!("! {e:#}")),
                    }
                    screen.redraw();
                }
            },
            event = events.recv() => {
                let Some(event) = event else { break Ok(()) };
                if let Err(e) = on_event(&session, &room, &me, event, &mut view, &mut screen).await {
                    screen.line(&format!("! {e:#}"));
                }
                screen.redraw();
            }
        }
    };
    if raw {
        disable_raw();
        println!();
    }
    // Flush what is pending and leave (the server removes this device's presence).
    let _ = session.shutdown().await;
    result
}

async fn refresh(
    session: &Session,
    room: &str,
    me: &str,
    view: &mut View,
    screen: &mut Screen,
    history: usize,
) -> anyhow::Result<()> {
    let entries = session.client().await.chat_list(room).await?;
    view.update(screen, &entries, me, history);
    // What is on screen has been read.
    if entries.iter().any(|e| e.message.author != me) {
        let latest = entries.last().map(|e| e.message.id.clone());
        let receipts = session.client().await.chat_receipts(room).await?;
        let mine = receipts.get(me).map(|r| r.message.clone());
        if latest.is_some() && latest != mine {
            session.chat_mark_read(room, latest.as_deref()).await?;
        }
    }
    Ok(())
}

/// Handles one typed line; false to quit.
async fn command(
    session: &Session,
    room: &str,
    me: &str,
    line: &str,
    view: &mut View,
    screen: &mut Screen,
) -> anyhow::Result<bool> {
    if line.is_empty() {
        return Ok(true);
    }
    if !line.starts_with('/') {
        session.chat_send(room, line).await?;
        refresh(session, room, me, view, screen, 0).await?;
        return Ok(true);
    }
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    let entries = session.client().await.chat_list(room).await?;
    match cmd {
        "/quit" | "/exit" => return Ok(false),
        "/help" => screen.line(HELP),
        "/edit" => {
            let (tag, text) = rest.trim().split_once(' ').context("usage: /edit ID TEXT")?;
            let entry = find(&entries, tag).with_context(|| format!("no message {tag}"))?;
            session.chat_edit(room, &entry.message.id, text.trim()).await?;
            refresh(session, room, me, view, screen, 0).await?;
        }
        "/reply" => {
            let (tag, text) = rest.trim().split_once(' ').context("usage: /reply ID TEXT")?;
            let entry = find(&entries, tag).with_context(|| format!("no message {tag}"))?;
            let message = driftsync_engine::chat::NewMessage {
                reply_to: Some(entry.message.id.clone()),
                ..driftsync_engine::chat::NewMessage::text(text.trim())
            };
            session.chat_send_message(room, &message).await?;
            refresh(session, room, me, view, screen, 0).await?;
        }
        "/react" | "/unreact" => {
            let (tag, emoji) = rest
                .trim()
                .split_once(' ')
                .with_context(|| format!("usage: {cmd} ID EMOJI"))?;
            let entry = find(&entries, tag).with_context(|| format!("no message {tag}"))?;
            session
                .chat_react(room, &entry.message.id, emoji.trim(), cmd == "/react")
                .await?;
            refresh(session, room, me, view, screen, 0).await?;
        }
        "/delete" => {
            let entry = find(&entries, rest.trim()).with_context(|| format!("no message {}", rest.trim()))?;
            session.chat_delete(room, &entry.message.id).await?;
            refresh(session, room, me, view, screen, 0).await?;
        }
        "/read" => {
            session.chat_mark_read(room, None).await?;
        }
        "/who" => {
            let mut users: Vec<&str> = view.present.values().map(String::as_str).collect();
            users.sort_unstable();
            users.dedup();
            let state = match session.state() {
                ConnectionState::Synced | ConnectionState::Connected => "online",
                _ => "offline",
            };
            screen.line(&format!("* you are {state}; here: {}", users.join(", ")));
        }
        "/members" => {
            // Answered by an `Event::Members` (status and last seen from the server).
            if session.members(room).await.is_err() {
                screen.line("! the session has stopped");
            }
        }
        "/leave" => {
            session.chat_leave(room).await?;
            screen.line("* you left the room (it stays on this device); /quit to close");
        }
        "/history" => {
            let n: usize = rest.trim().parse().unwrap_or(20);
            for entry in entries.iter().skip(entries.len().saturating_sub(n)) {
                screen.line(&View::format(entry, me));
            }
        }
        other => screen.line(&format!("! unknown command {other}; {HELP}")),
    }
    Ok(true)
}

async fn on_event(
    session: &Session,
    room: &str,
    me: &str,
    event: Event,
    view: &mut View,
    screen: &mut Screen,
) -> anyhow::Result<()> {
    match event {
        Event::Connected { .. } => {
            view.online = Some(true);
            screen.line("* connected");
        }
        // Reported once per outage, not at every retry.
        Event::Disconnected { reason, .. } if view.online != Some(false) => {
            view.online = Some(false);
            view.present.clear();
            view.typing.clear();
            screen.line(&format!(
                "* offline ({reason}); messages are kept here and sent when the server is back"
            ));
        }
        Event::Synced | Event::Lagged { .. } => refresh(session, room, me, view, screen, 0).await?,
        Event::RemoteChange { doc } | Event::Acknowledged { doc, .. } if doc == room => {
            refresh(session, room, me, view, screen, 0).await?;
        }
        Event::Typing {
            doc,
            peer,
            user,
            typing,
            ..
        } if doc == room && user != me => {
            // On an open server, the name the peer announced with its presence.
            let user = match view.present.get(&peer) {
                Some(name) if user == driftsync_server::auth::OPEN_USER => name.clone(),
                _ => user,
            };
            let was = view.typing.insert(user.clone(), typing).unwrap_or(false);
            if typing && !was {
                screen.line(&format!("* {user} is typing…"));
            }
        }
        Event::Presence { doc, peer, user, state } if doc == room => match state {
            Some(state) => {
                // An open server knows no names: use the one the other client announced.
                let user = if user == driftsync_server::auth::OPEN_USER {
                    serde_json::from_str::<serde_json::Value>(&state)
                        .ok()
                        .and_then(|v| v.get("user").and_then(|u| u.as_str()).map(str::to_string))
                        .unwrap_or(user)
                } else {
                    user
                };
                if view.present.insert(peer, user.clone()).is_none() && user != me {
                    screen.line(&format!("* {user} is here"));
                }
            }
            None => {
                if let Some(user) = view.present.remove(&peer).filter(|u| u != me) {
                    view.typing.remove(&user);
                    screen.line(&format!("* {user} left"));
                }
            }
        },
        Event::Error { message, .. } => screen.line(&format!("! {message}")),
        Event::Members { room: of, members } if of == room => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let listed: Vec<String> = members
                .iter()
                .filter(|m| m.joined)
                .map(|m| match (&m.status, m.last_seen_ms) {
                    (Some(status), _) => format!("{} ({status})", m.user),
                    (None, Some(seen)) => {
                        format!("{} (last seen {} min ago)", m.user, now.saturating_sub(seen) / 60_000)
                    }
                    (None, None) => format!("{} (offline)", m.user),
                })
                .collect();
            screen.line(&format!("* members: {}", listed.join(", ")));
        }
        _ => {}
    }
    Ok(())
}

/// Line mode: one `Input::Line` per line of stdin.
fn read_lines(tx: mpsc::Sender<Input>) {
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        match stdin.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = line.trim_end_matches(['\r', '\n']).to_string();
                if tx.blocking_send(Input::Line(text)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.blocking_send(Input::End);
}

fn enable_raw() -> bool {
    crossterm::terminal::enable_raw_mode().is_ok()
}

fn disable_raw() {
    let _ = crossterm::terminal::disable_raw_mode();
}

/// Raw mode: a keystroke event per key and the edited draft (as a line starting with NUL), and
/// a line on Enter.
fn read_keys(tx: mpsc::Sender<Input>) {
    use crossterm::event::{read, Event as Term, KeyCode, KeyEventKind, KeyModifiers};
    let mut draft = String::new();
    while let Ok(event) = read() {
        let Term::Key(key) = event else { continue };
        if key.kind == KeyEventKind::Release {
            continue;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let sent = match key.code {
            KeyCode::Char('c') | KeyCode::Char('d') if ctrl => break,
            KeyCode::Char(c) => {
                draft.push(c);
                tx.blocking_send(Input::Keystroke)
                    .and_then(|_| tx.blocking_send(Input::Line(format!("\u{0}{draft}"))))
            }
            KeyCode::Backspace => {
                draft.pop();
                tx.blocking_send(Input::Line(format!("\u{0}{draft}")))
            }
            KeyCode::Enter => tx.blocking_send(Input::Line(std::mem::take(&mut draft))),
            _ => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = tx.blocking_send(Input::End);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_and_clock() {
        assert_eq!(short("0192f0c4-7a3e-7b4c-9d2e-1f2a3b4c5d6e"), "#4c5d6e");
        assert_eq!(short("abc"), "#abc");
        assert_eq!(clock(0), "00:00");
        assert_eq!(clock((13 * 60 + 7) * 60_000 + 59_999), "13:07");
        assert_eq!(clock(86_400_000 + 60_000), "00:01");
    }
}
