//! Who owns each yrs client id: authorship.
//!
//! yrs identifies a struct by `(client id, clock)` alone and ignores a struct it already has, so
//! whoever writes first under a client id at given clocks decides what every replica keeps there.
//! Client ids are public (every chat message carries its sender's), so a room member could write
//! under somebody else's id at their next clocks and make that person's later, acknowledged
//! changes vanish. Hence: a client id belongs to the first writer (a token's user) that uses it —
//! bound durably in the store ([`Store::claim_client`]), so every instance on a shared store
//! agrees — and only its owner's pushes may carry new structs under it. The native `Hello`'s
//! client id (which keys the batch deduplication) must be the user's too.
//!
//! Bindings never change, so this cache of them is never stale; it is bounded in entries and
//! simply starts over when full (a miss costs one indexed read).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use driftsync_engine::store::Store;

/// The most bindings kept in memory (about 100 bytes each).
const MAX_CACHED: usize = 64 * 1024;

/// Whether a writer may write under a client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// The client id is the writer's (bound now, or before).
    Mine,
    /// Somebody else bound it first.
    Taken,
}

/// A cache of the store's client id bindings.
#[derive(Default)]
pub(crate) struct Owners {
    cache: Mutex<HashMap<u64, Arc<str>>>,
}

impl Owners {
    /// Binds `client_id` to `user` unless it is bound already, and tells whether it is `user`'s.
    pub(crate) async fn claim<S: Store>(
        &self,
        store: &S,
        client_id: u64,
        user: &str,
    ) -> driftsync_engine::Result<Ownership> {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&client_id)
            .cloned();
        let owner = match cached {
            Some(owner) => owner,
            None => {
                let owner: Arc<str> = Arc::from(store.claim_client(client_id, user).await?);
                let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
                cache.insert(client_id, Arc::clone(&owner));
                owner
            }
        };
        Ok(if &*owner == user {
            Ownership::Mine
        } else {
            Ownership::Taken
        })
    }
}

#[cfg(test)]
mod tests {
    use driftsync_engine::store::SqliteStore;

    use super::*;

    #[tokio::test]
    async fn the_first_writer_owns_a_client_id_for_good() {
        let store = SqliteStore::open_in_memory().await.unwrap();
        let owners = Owners::default();
        assert_eq!(owners.claim(&store, 42, "ada").await.unwrap(), Ownership::Mine);
        assert_eq!(owners.claim(&store, 42, "bob").await.unwrap(), Ownership::Taken);
        assert_eq!(owners.claim(&store, 42, "ada").await.unwrap(), Ownership::Mine);
        // Another instance (another cache) on the same store agrees.
        let other = Owners::default();
        assert_eq!(other.claim(&store, 42, "bob").await.unwrap(), Ownership::Taken);
        assert_eq!(other.claim(&store, 43, "bob").await.unwrap(), Ownership::Mine);
        assert_eq!(owners.claim(&store, 43, "ada").await.unwrap(), Ownership::Taken);
    }
}
