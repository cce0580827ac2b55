//! `ref` de-duplication: a `send` or `direct` that repeats a `ref` the same user used within the
//! window is not delivered again, and its `ack` carries the first attempt's id.
//!
//! Each `(user, ref)` maps to a `OnceCell`: the first attempt initializes it by storing and
//! delivering; a repeat that arrives while the first is still running waits for it instead of
//! racing it; a first attempt that fails leaves the cell empty, so a retry really retries.
//! Memory is bounded by `capacity`: past it the oldest entries are forgotten early.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

type Key = (String, String);

pub(crate) struct Dedup {
    window: Duration,
    capacity: usize,
    state: Mutex<DedupState>,
}

#[derive(Default)]
struct DedupState {
    slots: HashMap<Key, (Instant, Arc<OnceCell<u64>>)>,
    /// Keys in insertion order, for expiry and eviction from the front.
    order: VecDeque<(Instant, Key)>,
}

impl Dedup {
    pub(crate) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            state: Mutex::default(),
        }
    }

    fn slot(&self, user: &str, reference: &str) -> Arc<OnceCell<u64>> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let DedupState { slots, order } = &mut *state;
        while let Some((added, _)) = order.front() {
            let expired = now.saturating_duration_since(*added) >= self.window;
            if !expired && order.len() < self.capacity {
                break;
            }
            if let Some((added, key)) = order.pop_front() {
                // Only remove the slot this queue entry was made for.
                if slots.get(&key).is_some_and(|(at, _)| *at == added) {
                    slots.remove(&key);
                }
            }
        }
        let key = (user.to_owned(), reference.to_owned());
        if let Some((_, cell)) = slots.get(&key) {
            return Arc::clone(cell);
        }
        let cell = Arc::new(OnceCell::new());
        slots.insert(key.clone(), (now, Arc::clone(&cell)));
        order.push_back((now, key));
        cell
    }

    /// Runs `deliver` unless `(user, reference)` already succeeded within the window; either way
    /// returns the id of the one delivery.
    pub(crate) async fn once<F, Fut, E>(
        &self,
        user: &str,
        reference: &str,
        deliver: F,
    ) -> Result<u64, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<u64, E>>,
    {
        let cell = self.slot(user, reference);
        cell.get_or_try_init(deliver).await.copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(start_paused = true)]
    async fn repeats_are_answered_with_the_first_id_until_the_window_ends() {
        let dedup = Dedup::new(Duration::from_secs(600), 100);
        let calls = AtomicU64::new(0);
        let deliver = || async { Ok::<_, ()>(calls.fetch_add(1, Ordering::SeqCst) + 100) };
        assert_eq!(dedup.once("alice", "r1", deliver).await, Ok(100));
        assert_eq!(dedup.once("alice", "r1", deliver).await, Ok(100));
        assert_eq!(
            dedup.once("bob", "r1", deliver).await,
            Ok(101),
            "refs are per user"
        );
        tokio::time::advance(Duration::from_secs(601)).await;
        assert_eq!(dedup.once("alice", "r1", deliver).await, Ok(102));
    }

    #[tokio::test]
    async fn a_failed_attempt_can_be_retried() {
        let dedup = Dedup::new(Duration::from_secs(600), 100);
        assert_eq!(
            dedup
                .once("a", "r", || async { Err::<u64, _>("down") })
                .await,
            Err("down")
        );
        assert_eq!(
            dedup.once("a", "r", || async { Ok::<_, &str>(7) }).await,
            Ok(7)
        );
    }

    #[tokio::test]
    async fn memory_is_bounded_by_capacity() {
        let dedup = Dedup::new(Duration::from_secs(600), 10);
        for i in 0..1_000 {
            dedup
                .once("a", &i.to_string(), || async { Ok::<_, ()>(i) })
                .await
                .ok();
        }
        let state = dedup.state.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(state.slots.len() <= 10 && state.order.len() <= 10);
    }
}
