//! Live inboxes: which connections of this instance follow which user's inbox, and waking them
//! when it may have changed.
//!
//! The inbox itself lives in the store's chat index (written in the transaction that stores
//! each chat update, see `engine::store`), so it is the same whichever instance reads it. What
//! travels is only a nudge — "user U's inbox may have changed" — from the room that stored the
//! change to the connections following U: directly on this instance, and to the other
//! instances through the fan-out (`Fanout::publish_inbox`). A woken connection reads what
//! changed after the version it last sent, so nudges are idempotent: a lost one delays an
//! entry until the next change, a resync of the fan-out (`Inbound::Resync`) wakes every
//! follower, and a reconnecting device asks from its last version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// The connections following each user's inbox on this instance.
#[derive(Debug, Default)]
pub(crate) struct Inboxes {
    users: Mutex<HashMap<String, Vec<(u64, Arc<Notify>)>>>,
}

impl Inboxes {
    /// Connection `session` follows `user`'s inbox; it is woken through the returned handle.
    pub(crate) fn follow(&self, user: &str, session: u64) -> Arc<Notify> {
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        let followers = users.entry(user.to_string()).or_default();
        if let Some((_, notify)) = followers.iter().find(|(s, _)| *s == session) {
            return Arc::clone(notify);
        }
        let notify = Arc::new(Notify::new());
        followers.push((session, Arc::clone(&notify)));
        notify
    }

    /// Connection `session` no longer follows `user`'s inbox (it closed).
    pub(crate) fn unfollow(&self, user: &str, session: u64) {
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(followers) = users.get_mut(user) {
            followers.retain(|(s, _)| *s != session);
            if followers.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Wakes the connections following these users' inboxes (a wake-up while one is reading
    /// makes it read once more).
    pub(crate) fn wake(&self, users: &[String]) {
        let followed = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        for user in users {
            for (_, notify) in followed.get(user).into_iter().flatten() {
                notify.notify_one();
            }
        }
    }

    /// Wakes every follower (after the fan-out may have lost nudges).
    pub(crate) fn wake_all(&self) {
        let followed = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, notify) in followed.values().flatten() {
            notify.notify_one();
        }
    }

    /// How many connections follow an inbox here.
    #[cfg(test)]
    pub(crate) fn followers(&self) -> usize {
        self.users
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_are_woken_and_forgotten() {
        let inboxes = Inboxes::default();
        let a = inboxes.follow("alice", 1);
        let again = inboxes.follow("alice", 1);
        assert!(Arc::ptr_eq(&a, &again));
        let b = inboxes.follow("bob", 2);
        inboxes.wake(&["alice".to_string()]);
        a.notified().await;
        assert!(tokio::time::timeout(std::time::Duration::from_millis(20), b.notified())
            .await
            .is_err());
        inboxes.wake_all();
        b.notified().await;
        inboxes.unfollow("alice", 1);
        inboxes.unfollow("bob", 2);
        assert_eq!(inboxes.followers(), 0);
    }
}
