//! A y-websocket client replica, sans-IO, behaving like a stock Yjs `WebsocketProvider`: on
//! connect it sends its SyncStep1 (and its awareness state); it answers the server's SyncStep1
//! with a SyncStep2; it applies SyncStep2 and Update messages; every local change goes out as
//! an Update while connected; its awareness state is renewed every 15 s, and remote states not
//! renewed for 30 s are dropped from its view (y-protocols' `outdatedTimeout`).

use std::collections::BTreeMap;

use driftsync_engine::doc::{new_doc, state_vector};
use driftsync_engine::sync::{apply_remote, missing_for, Limits};
use driftsync_protocol::yjs::{AwarenessEntry, YMessage};
use yrs::Doc;

/// How often a Yjs client renews its awareness state (y-protocols: `outdatedTimeout / 2`).
pub const AWARENESS_RENEW_MS: u64 = 15_000;
/// After how long without a renewal a Yjs client drops a remote state.
pub const AWARENESS_OUTDATED_MS: u64 = 30_000;

/// A Yjs client on one document.
#[derive(Debug)]
pub struct YjsReplica {
    /// The document id it is connected to.
    pub doc_id: String,
    doc: Doc,
    /// Its yrs (and awareness) client id.
    pub client_id: u64,
    connected: bool,
    /// Whether the server's SyncStep2 arrived on this connection.
    pub synced: bool,
    awareness_clock: u64,
    awareness_state: Option<String>,
    last_renewal_ms: u64,
    /// Remote awareness: client id → (clock, state, when last renewed, in sim ms).
    view: BTreeMap<u64, (u64, Option<String>, u64)>,
}

impl YjsReplica {
    /// A Yjs client of `doc_id` with client id `client_id` (1..2^53).
    pub fn new(doc_id: &str, client_id: u64) -> YjsReplica {
        YjsReplica {
            doc_id: doc_id.to_string(),
            doc: new_doc(client_id).unwrap_or_else(|_| Doc::new()),
            client_id,
            connected: false,
            synced: false,
            awareness_clock: 0,
            awareness_state: None,
            last_renewal_ms: 0,
            view: BTreeMap::new(),
        }
    }

    /// The yrs document.
    pub fn doc(&self) -> &Doc {
        &self.doc
    }

    /// Whether a connection is up.
    pub fn connected(&self) -> bool {
        self.connected
    }

    fn own_awareness(&self) -> YMessage {
        YMessage::Awareness(vec![AwarenessEntry {
            client_id: self.client_id,
            clock: self.awareness_clock,
            state: self.awareness_state.clone(),
        }])
    }

    /// A connection opened at `now_ms`: what the provider sends first.
    pub fn connect(&mut self, now_ms: u64) -> Vec<YMessage> {
        self.connected = true;
        self.synced = false;
        self.view.clear();
        let mut out = vec![YMessage::SyncStep1(state_vector(&self.doc))];
        if self.awareness_state.is_some() {
            self.last_renewal_ms = now_ms;
            out.push(self.own_awareness());
        }
        out
    }

    /// The connection is gone.
    pub fn disconnect(&mut self) {
        self.connected = false;
        self.synced = false;
        self.view.clear();
    }

    /// A message from the server at `now_ms`; returns the answers.
    pub fn receive(&mut self, message: YMessage, now_ms: u64) -> Result<Vec<YMessage>, String> {
        match message {
            YMessage::SyncStep1(sv) => {
                let sv = driftsync_engine::doc::decode_state_vector(&sv)
                    .map_err(|e| format!("bad state vector from the server: {e}"))?;
                Ok(vec![YMessage::SyncStep2(missing_for(&self.doc, &sv))])
            }
            YMessage::SyncStep2(update) | YMessage::Update(update) => {
                apply_remote(&self.doc, &update, &Limits::default())
                    .map_err(|e| format!("an update from the server does not apply: {e}"))?;
                self.synced = true;
                Ok(Vec::new())
            }
            YMessage::Awareness(entries) => {
                for entry in entries {
                    if entry.client_id == self.client_id {
                        continue;
                    }
                    let known = self.view.get(&entry.client_id).map(|(clock, _, _)| *clock);
                    if known.is_none_or(|clock| entry.clock > clock || (entry.clock == clock && entry.state.is_none()))
                    {
                        self.view.insert(entry.client_id, (entry.clock, entry.state, now_ms));
                    }
                }
                Ok(Vec::new())
            }
            YMessage::QueryAwareness => Ok(if self.awareness_state.is_some() {
                vec![self.own_awareness()]
            } else {
                Vec::new()
            }),
            YMessage::Auth(auth) => Err(format!("the server refused the Yjs client: {auth:?}")),
        }
    }

    /// A local change (already applied): what to send.
    pub fn write(&mut self, update: Vec<u8>) -> Vec<YMessage> {
        if self.connected && !driftsync_engine::doc::is_empty_update(&update) {
            vec![YMessage::Update(update)]
        } else {
            Vec::new()
        }
    }

    /// A re-send of the whole state, as a provider re-syncing does.
    pub fn resend(&self) -> Vec<YMessage> {
        if self.connected {
            vec![YMessage::Update(driftsync_engine::doc::encode_state(&self.doc))]
        } else {
            Vec::new()
        }
    }

    /// Sets (or with `None` clears) the awareness state at `now_ms`.
    pub fn set_awareness(&mut self, state: Option<String>, now_ms: u64) -> Vec<YMessage> {
        self.awareness_clock += 1;
        self.awareness_state = state;
        self.last_renewal_ms = now_ms;
        if self.connected {
            vec![self.own_awareness()]
        } else {
            Vec::new()
        }
    }

    /// Whether a state is set (then renewed).
    pub fn has_awareness(&self) -> bool {
        self.awareness_state.is_some()
    }

    /// Time passes: renew the own state every 15 s, drop remote states silent for 30 s.
    pub fn tick(&mut self, now_ms: u64, renew: bool) -> Vec<YMessage> {
        self.view
            .retain(|_, (_, state, at)| state.is_some() && now_ms.saturating_sub(*at) < AWARENESS_OUTDATED_MS);
        if renew
            && self.connected
            && self.awareness_state.is_some()
            && now_ms >= self.last_renewal_ms + AWARENESS_RENEW_MS
        {
            self.awareness_clock += 1;
            self.last_renewal_ms = now_ms;
            return vec![self.own_awareness()];
        }
        Vec::new()
    }

    /// The remote presence this client shows: client id → state.
    pub fn presence(&self) -> BTreeMap<u64, String> {
        self.view
            .iter()
            .filter_map(|(id, (_, state, _))| state.clone().map(|s| (*id, s)))
            .collect()
    }
}
