//! A connection's bounded outbound queue: many senders (the rooms it is subscribed to, its own
//! reader), one receiver (its writer).
//!
//! tokio's `mpsc` channel allocates its first block of 32 slots and its cache-padded state when
//! it is created: 1.3 KB for every connection, idle or not. This queue costs about 200 bytes
//! while it is short; it grows with the backlog (never beyond its capacity) and gives the memory
//! back once drained.
//!
//! It is bounded twice: in items (`capacity`) and in bytes (`max_bytes`, the sum of the weights
//! senders give their items — what the queued frames cost to hold). A sender that must not
//! wait ([`Sender::try_send_weighted`]: a room broadcasting) is refused when either bound is
//! reached; a connection's own reader answering a request waits for room instead
//! ([`Sender::send_waiting`]), so that a request with a large answer is paced by the peer's
//! reading, never buffered whole.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// A drained queue keeps at most this many slots.
const KEEP_SLOTS: usize = 8;

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes the receiver: an item arrived, or the last sender left.
    ready: Notify,
    /// Wakes senders waiting for room: the queue fell to half its byte bound, or closed.
    space: Notify,
}

struct State<T> {
    /// The items with their weights.
    items: VecDeque<(T, usize)>,
    capacity: usize,
    /// The sum of the queued items' weights.
    bytes: usize,
    /// The most `bytes` may reach (an item alone in the queue is taken whatever its weight).
    max_bytes: usize,
    senders: usize,
    receiver_alive: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why an item was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrySendError {
    /// The queue holds `capacity` items.
    Full,
    /// The receiver is gone.
    Closed,
}

/// Queues items; cloned for every place that sends.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// Takes items in the order they were queued.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue of at most `capacity` items.
pub(crate) fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            capacity,
            bytes: 0,
            max_bytes: usize::MAX,
            senders: 1,
            receiver_alive: true,
        }),
        ready: Notify::new(),
        space: Notify::new(),
    });
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver { shared },
    )
}

impl<T> Sender<T> {
    /// Bounds the queue's bytes as well as its items.
    pub(crate) fn set_max_bytes(&self, max_bytes: usize) {
        self.shared.lock().max_bytes = max_bytes;
    }

    /// Queues `item` (weighing nothing) unless the queue is full or its receiver is gone.
    #[cfg(test)]
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError> {
        self.try_send_weighted(item, 0)
    }

    /// Queues `item`, which costs `weight` bytes to hold, unless the queue is full (in items or
    /// bytes) or its receiver is gone; never waits.
    pub(crate) fn try_send_weighted(&self, item: T, weight: usize) -> Result<(), TrySendError> {
        let mut state = self.shared.lock();
        if !state.receiver_alive {
            return Err(TrySendError::Closed);
        }
        if state.items.len() >= state.capacity
            || (!state.items.is_empty() && state.bytes.saturating_add(weight) > state.max_bytes)
        {
            return Err(TrySendError::Full);
        }
        state.bytes += weight;
        state.items.push_back((item, weight));
        drop(state);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Queues `item` once the queue holds at most half its bounds (the other half stays free
    /// for broadcasts, which never wait), waiting for the receiver to take items until then.
    /// Fails only when the receiver is gone. Cancel-safe: nothing is queued unless it returns.
    pub(crate) async fn send_waiting(&self, item: T, weight: usize) -> Result<(), TrySendError> {
        loop {
            let space = self.shared.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mut state = self.shared.lock();
                if !state.receiver_alive {
                    return Err(TrySendError::Closed);
                }
                if state.items.is_empty()
                    || (state.items.len() < state.capacity / 2
                        && state.bytes.saturating_add(weight) <= state.max_bytes / 2)
                {
                    state.bytes += weight;
                    state.items.push_back((item, weight));
                    drop(state);
                    self.shared.ready.notify_one();
                    return Ok(());
                }
            }
            space.await;
        }
    }

    /// Bytes queued now.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.shared.lock().bytes
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        let last = state.senders == 0;
        drop(state);
        if last {
            self.shared.ready.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        Self::pop(&self.shared, &mut self.shared.lock())
    }

    /// The next item, waiting for one; `None` once every sender is gone and the queue is
    /// drained. Cancel-safe: an item is taken only when it is returned.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut state = self.shared.lock();
                if let Some(item) = Self::pop(&self.shared, &mut state) {
                    return Some(item);
                }
                if state.senders == 0 {
                    return None;
                }
            }
            // A wake-up sent between the check and the wait is kept by `Notify` as a permit.
            self.shared.ready.notified().await;
        }
    }

    /// Takes the first item; a drained queue keeps at most [`KEEP_SLOTS`] slots.
    fn pop(shared: &Shared<T>, state: &mut State<T>) -> Option<T> {
        let (item, weight) = state.items.pop_front()?;
        state.bytes -= weight;
        if state.items.is_empty() && state.items.capacity() > KEEP_SLOTS {
            state.items.shrink_to(KEEP_SLOTS);
        }
        if state.bytes <= state.max_bytes / 2 && state.items.len() <= state.capacity / 2 {
            shared.space.notify_waiters();
        }
        Some(item)
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver_alive = false;
        // Dropped outside the lock: an item's drop must not run under it.
        let items = std::mem::take(&mut state.items);
        state.bytes = 0;
        drop(state);
        drop(items);
        self.shared.space.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_come_out_in_order_up_to_the_capacity() {
        let (tx, mut rx) = channel(3);
        for i in 0..3 {
            assert_eq!(tx.try_send(i), Ok(()));
        }
        assert_eq!(tx.try_send(3), Err(TrySendError::Full));
        assert_eq!(rx.recv().await, Some(0));
        assert_eq!(tx.try_send(3), Ok(()));
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn recv_waits_for_an_item_and_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = channel(8);
        let other = tx.clone();
        let task = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = rx.recv().await {
                got.push(item);
            }
            got
        });
        tokio::task::yield_now().await;
        tx.try_send(1).unwrap();
        drop(tx);
        tokio::task::yield_now().await;
        other.try_send(2).unwrap();
        drop(other);
        assert_eq!(task.await.unwrap(), vec![1, 2]);
    }

    #[tokio::test]
    async fn a_dropped_receiver_closes_the_queue() {
        let (tx, rx) = channel(8);
        tx.try_send(Arc::new(1)).unwrap();
        let item = Arc::new(2);
        tx.try_send(Arc::clone(&item)).unwrap();
        drop(rx);
        assert_eq!(tx.try_send(Arc::new(3)), Err(TrySendError::Closed));
        assert_eq!(
            Arc::strong_count(&item),
            1,
            "queued items are dropped with the receiver"
        );
    }

    #[tokio::test]
    async fn bytes_are_bounded_and_answers_wait_for_room() {
        let (tx, mut rx) = channel::<u32>(100);
        tx.set_max_bytes(1000);
        // An item alone is taken whatever its weight, so a large frame can always go out.
        assert_eq!(tx.try_send_weighted(0, 5000), Ok(()));
        assert_eq!(tx.try_send_weighted(1, 1), Err(TrySendError::Full));
        assert_eq!(rx.try_recv(), Some(0));
        assert_eq!(tx.try_send_weighted(1, 600), Ok(()));
        assert_eq!(tx.try_send_weighted(2, 400), Ok(()));
        assert_eq!(tx.try_send_weighted(3, 1), Err(TrySendError::Full), "the byte bound");
        assert_eq!(tx.queued_bytes(), 1000);
        // An answer waits until the queue is down to half its bound.
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send_waiting(4, 100).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(tx.queued_bytes(), 500);
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(4));
        // A waiting answer fails once the receiver is gone.
        tx.try_send_weighted(5, 1000).unwrap();
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send_waiting(6, 100).await })
        };
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(TrySendError::Closed));
    }

    #[tokio::test]
    async fn a_drained_queue_gives_its_memory_back() {
        let (tx, mut rx) = channel(1024);
        for i in 0..1000 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert!(rx.shared.lock().items.capacity() <= KEEP_SLOTS);
    }

    #[tokio::test]
    async fn many_senders_on_other_threads_lose_nothing() {
        let (tx, mut rx) = channel(1 << 16);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000u32 {
                        tx.try_send((t, i)).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let mut last = [None; 4];
        let mut count = 0;
        while let Some((t, i)) = rx.recv().await {
            assert!(last[t as usize].is_none_or(|prev| prev < i), "per sender order");
            last[t as usize] = Some(i);
            count += 1;
        }
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(count, 20_000);
    }
}
