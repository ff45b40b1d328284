//! Rooms: one live yrs document per active document id, shared by every connection subscribed to
//! it, with the document's head cursor and its subscribers' outbound queues.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use driftsync_engine::doc::load_document;
use driftsync_engine::store::Store;
use driftsync_protocol::{Cursor, ServerFrame, CLOSE_RESYNC};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use yrs::Doc;

/// The server's documents never edit; any valid client id will do for them.
const SERVER_CLIENT_ID: u64 = 1;

/// The registry of rooms.
#[derive(Default)]
pub(crate) struct Rooms {
    map: Mutex<HashMap<String, Arc<Room>>>,
}

impl Rooms {
    /// The room for `id`, created (not yet loaded) on first use.
    pub(crate) fn get(&self, id: &str) -> Arc<Room> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(id.to_string()).or_insert_with(|| {
            Arc::new(Room {
                id: id.to_string(),
                state: Default::default(),
            })
        }))
    }

}

/// One document's live state. The async mutex serialises everything done to the document.
pub(crate) struct Room {
    pub(crate) id: String,
    pub(crate) state: tokio::sync::Mutex<Option<RoomState>>,
}

/// A loaded room.
pub(crate) struct RoomState {
    pub(crate) doc: Doc,
    /// Cursor of the last update stored for this document.
    pub(crate) head: Cursor,
    pub(crate) subscribers: HashMap<u64, Subscriber>,
}

/// A connection subscribed to a room.
pub(crate) struct Subscriber {
    pub(crate) user: String,
    pub(crate) out: Outbound,
}

impl Room {
    /// Loads the room from the store if it is not loaded yet. A load failure refuses the room:
    /// it is never served (nor later stored) as an empty document.
    pub(crate) async fn ensure_loaded<'a, S: Store>(
        &self,
        state: &'a mut Option<RoomState>,
        store: &S,
    ) -> driftsync_engine::Result<&'a mut RoomState> {
        if state.is_none() {
            let stored = store.load(&self.id).await?.unwrap_or_default();
            let doc = load_document(&self.id, &stored, SERVER_CLIENT_ID)?;
            *state = Some(RoomState {
                doc,
                head: stored.head,
                subscribers: HashMap::new(),
            });
        }
        state
            .as_mut()
            .ok_or_else(|| driftsync_engine::Error::Invalid("room state vanished".into()))
    }
}

impl Room {
    /// Replaces the live document with what the store holds, keeping the subscribers. Used when
    /// the live document may hold something that is not stored (a refused update, a failed
    /// commit). If the reload fails, every subscriber is told to resync and the room is unloaded.
    pub(crate) async fn reload<S: Store>(&self, state: &mut Option<RoomState>, store: &S) {
        let reloaded = async {
            let stored = store.load(&self.id).await?.unwrap_or_default();
            Ok::<_, driftsync_engine::Error>((load_document(&self.id, &stored, SERVER_CLIENT_ID)?, stored.head))
        }
        .await;
        match (reloaded, state.as_mut()) {
            (Ok((doc, head)), Some(live)) => {
                live.doc = doc;
                live.head = head;
            }
            (Ok(_), None) => {}
            (Err(e), _) => {
                tracing::error!(doc = %self.id, error = %e, "reload failed; unloading the room");
                if let Some(live) = state.take() {
                    for sub in live.subscribers.values() {
                        sub.out.ctl.close(CLOSE_RESYNC);
                    }
                }
            }
        }
    }
}

impl RoomState {
    /// Sends `frame` to every subscriber but `except`. A subscriber whose queue is full is told
    /// to resync and dropped from the room: never silently left behind.
    pub(crate) fn broadcast(&mut self, except: u64, frame: &ServerFrame) {
        let bytes = frame.encode();
        self.subscribers
            .retain(|session, sub| *session == except || sub.out.send_bytes(bytes.clone()));
    }
}

/// Closes a connection from anywhere, with a WebSocket close code.
pub(crate) struct ConnCtl {
    pub(crate) token: CancellationToken,
    code: AtomicU16,
}

impl ConnCtl {
    pub(crate) fn new(token: CancellationToken) -> Self {
        ConnCtl {
            token,
            code: AtomicU16::new(driftsync_protocol::CLOSE_GOING_AWAY),
        }
    }

    /// Asks the connection to close with `code` (the first code asked for wins).
    pub(crate) fn close(&self, code: u16) {
        if !self.token.is_cancelled() {
            self.code.store(code, Ordering::Relaxed);
            self.token.cancel();
        }
    }

    pub(crate) fn code(&self) -> u16 {
        self.code.load(Ordering::Relaxed)
    }
}

/// A connection's bounded outbound queue.
#[derive(Clone)]
pub(crate) struct Outbound {
    pub(crate) tx: mpsc::Sender<Vec<u8>>,
    pub(crate) ctl: Arc<ConnCtl>,
}

impl Outbound {
    /// Queues a frame; on overflow closes the connection with [`CLOSE_RESYNC`] and returns false.
    pub(crate) fn send(&self, frame: &ServerFrame) -> bool {
        self.send_bytes(frame.encode())
    }

    pub(crate) fn send_bytes(&self, bytes: Vec<u8>) -> bool {
        match self.tx.try_send(bytes) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("slow consumer: outbound queue full, closing with resync");
                self.ctl.close(CLOSE_RESYNC);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}
