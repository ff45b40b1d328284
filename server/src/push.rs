//! Push notifications for members who are offline: the delivery task of each instance, around
//! the store's push outbox (`driftsync_engine::store::push`; ARCHITECTURE.md, "Push
//! notifications"). The webhook itself — configuration, signature, payload, one attempt — is
//! `webhook.rs`.
//!
//! The store writes a due notification per offline member in the transaction that stores a
//! chat message; this task cancels what members connected here no longer need, claims due
//! notifications under a lease (several instances on one PostgreSQL share the work, each
//! notification goes to one), POSTs each, and records the outcome. Attempts in flight are
//! bounded ([`PushConfig::max_in_flight`]).

use std::sync::Arc;
use std::time::Duration;

use driftsync_engine::store::{DueNotification, PushOutcome, PushSettings, Store};
use tokio::task::JoinSet;

use crate::instance::Shared;
use crate::webhook::{default_tls, now_ms, payload, post, redacted, settle, webhook_id, Answer};
pub use crate::webhook::{PushConfig, PushSecret, DEFAULT_PUSH_GRACE, MIN_SECRET_BYTES};

/// How many pending notifications one look at the outbox checks against the members connected
/// here.
const PENDING_SCAN: usize = 512;

/// How many users stopped by a 410 one look checks.
const STOPPED_SCAN: usize = 1024;

/// Turns the store's outbox on and runs the delivery task until shutdown (see the module docs).
pub(crate) fn start<S: Store>(shared: &Arc<Shared<S>>) {
    let Some(config) = shared.config.push.clone() else {
        return;
    };
    shared.store.set_push(Some(PushSettings {
        grace_ms: u64::try_from(config.grace.as_millis()).unwrap_or(u64::MAX),
        include_text: config.include_text,
    }));
    let tls = match config.tls.clone().map_or_else(default_tls, Ok) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(error = %e, "push notifications: no TLS configuration; webhooks will not be delivered");
            return;
        }
    };
    tracing::info!(url = %redacted(&config.url), grace = ?config.grace, "push notifications on");
    let shared2 = Arc::clone(shared);
    shared.tasks.spawn(async move {
        run(shared2, config, tls).await;
    });
}

async fn run<S: Store>(shared: Arc<Shared<S>>, config: PushConfig, tls: Arc<rustls::ClientConfig>) {
    let mut attempts: JoinSet<()> = JoinSet::new();
    let mut tick = tokio::time::interval(config.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lease = config.timeout.saturating_add(Duration::from_secs(30));
    let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break,
            Some(_) = attempts.join_next(), if !attempts.is_empty() => continue,
            _ = tick.tick() => {}
        }
        if let Err(e) = cancel_seen(&shared).await {
            tracing::warn!(error = %e, "push notifications: store failed reading the outbox");
            shared.metrics.store_errors.inc();
            continue;
        }
        let room_for = config.max_in_flight.saturating_sub(attempts.len());
        if room_for > 0 {
            let now = now_ms();
            match shared
                .store
                .push_claim(now, now.saturating_add(lease_ms), room_for)
                .await
            {
                Ok(claimed) => {
                    for due in claimed {
                        let shared = Arc::clone(&shared);
                        let config = config.clone();
                        let tls = Arc::clone(&tls);
                        attempts.spawn(async move { attempt(&shared, &config, &tls, due).await });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "push notifications: store failed claiming due notifications");
                    shared.metrics.store_errors.inc();
                }
            }
        }
        match shared.store.push_stats().await {
            Ok(stats) => {
                let metrics = &shared.metrics;
                metrics.push_queue.set(i64::try_from(stats.pending).unwrap_or(i64::MAX));
                metrics
                    .push_dead_letters
                    .set(i64::try_from(stats.dead).unwrap_or(i64::MAX));
                let age = stats
                    .oldest_created_ms
                    .map_or(0, |oldest| now_ms().saturating_sub(oldest));
                metrics.push_oldest_age.set(age as f64 / 1000.0);
            }
            Err(e) => tracing::debug!(error = %e, "push notifications: no outbox stats"),
        }
    }
    // In-flight attempts are dropped: their leases expire and they are tried again (by another
    // instance, or after a restart) under the same webhook id.
    attempts.abort_all();
}

/// Cancels the pending notifications of members connected here, and lifts the 410 stop of users
/// connected here: whichever instance holds a member's connection does it, within one poll.
async fn cancel_seen<S: Store>(shared: &Shared<S>) -> driftsync_engine::Result<()> {
    let pending = shared.store.push_pending(PENDING_SCAN).await?;
    let mut seen = Vec::new();
    for due in pending {
        if shared.rooms.user_in_room(&due.room, &due.user).await {
            seen.push((due.room, due.user));
        }
    }
    let mut back = Vec::new();
    let stopped = shared.store.push_stopped(STOPPED_SCAN).await?;
    if !stopped.is_empty() {
        let online = shared.rooms.users_subscribed().await;
        back = stopped.into_iter().filter(|user| online.contains(user)).collect();
    }
    if !seen.is_empty() || !back.is_empty() {
        tracing::debug!(
            seen = seen.len(),
            back = back.len(),
            "push notifications: members connected here"
        );
        shared.store.push_seen(&seen, &back).await?;
    }
    Ok(())
}

/// One attempt at one claimed notification, and its outcome recorded.
async fn attempt<S: Store>(
    shared: &Shared<S>,
    config: &PushConfig,
    tls: &Arc<rustls::ClientConfig>,
    due: DueNotification,
) {
    let id = webhook_id(&due);
    let (outcome, label) = if shared.rooms.user_in_room(&due.room, &due.user).await {
        (PushOutcome::Online, "online")
    } else {
        let now = now_ms();
        let body = payload(&due, &id, config.include_text, now);
        let answer = post(config, tls, &id, now / 1000, body).await;
        let settled = settle(config, &due, &answer, now_ms());
        match (&settled.0, &answer) {
            (PushOutcome::Delivered, Answer::Status(status, _)) => {
                tracing::debug!(id, room = %due.room, user = %due.user, unread = due.unread, status, "push notification delivered");
            }
            (PushOutcome::Retry { at_ms, .. }, answer) => {
                tracing::warn!(id, room = %due.room, user = %due.user, attempt = due.attempts, ?answer, retry_in_ms = at_ms.saturating_sub(now_ms()), "push notification failed; will retry");
            }
            (PushOutcome::Gone, _) => {
                tracing::info!(id, user = %due.user, "push webhook answered 410 Gone: no notifications for this user until they connect again");
            }
            (PushOutcome::Dead { error }, _) => {
                tracing::warn!(id, room = %due.room, user = %due.user, error = %error, "push notification dead-lettered");
            }
            _ => {}
        }
        settled
    };
    shared
        .metrics
        .push_attempts
        .get_or_create(&vec![("result".to_string(), label.to_string())])
        .inc();
    if let Err(e) = shared.store.push_finish(&due, &outcome, now_ms()).await {
        // The lease runs out and the notification is tried again (same id): at least once.
        tracing::warn!(id, error = %e, "push notifications: store failed recording an attempt");
        shared.metrics.store_errors.inc();
    }
}
