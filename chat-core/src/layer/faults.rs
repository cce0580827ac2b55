//! [`FaultyLayer`]: a channel layer that misbehaves on purpose (cargo feature `testing`).
//!
//! It wraps any layer and, on command, delays each `group_send` by a random time (so messages
//! from different senders overtake each other, as they do between nodes), silently loses a share
//! of them (as Redis pub/sub does across a reconnect), fails every call (as a layer whose server
//! is down does), or tells its subscriptions that delivery was interrupted (as a layer does once
//! its connection is made again). The Channels specification suggests such a mode for testing what a
//! consumer does when the layer is imperfect; the engine's ordering and repair tests run on it.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use super::{ChannelLayer, GroupSendReport, LayerError, LayerStats, Subscription};

/// A layer that delays, loses or refuses on command. Cheap to clone: clones share the faults.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use chat_core::layer::{ChannelLayer, FaultyLayer, InMemoryChannelLayer};
///
/// let layer = FaultyLayer::new(Arc::new(InMemoryChannelLayer::default()));
/// layer.delay_group_sends(Duration::from_millis(5));
/// layer.lose_group_sends(0.1);
/// let shared: Arc<dyn ChannelLayer> = Arc::new(layer.clone());
/// # drop(shared);
/// ```
#[derive(Clone)]
pub struct FaultyLayer {
    inner: Arc<dyn ChannelLayer>,
    faults: Arc<Faults>,
}

struct Faults {
    max_delay_micros: AtomicU64,
    /// Probability of losing a `group_send`, in millionths.
    loss_per_million: AtomicU64,
    failing: AtomicBool,
    lost: AtomicU64,
    random: Mutex<u64>,
    interruptions: watch::Sender<u64>,
}

impl Faults {
    /// xorshift64*: plenty for spreading faults, and no dependency.
    fn next(&self) -> u64 {
        let mut state = self.random.lock().unwrap_or_else(PoisonError::into_inner);
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn check(&self) -> Result<(), LayerError> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(LayerError::Unavailable("fault injected: layer down".into()));
        }
        Ok(())
    }
}

impl FaultyLayer {
    /// Wraps `inner`, behaving well until told otherwise.
    pub fn new(inner: Arc<dyn ChannelLayer>) -> Self {
        Self {
            inner,
            faults: Arc::new(Faults {
                max_delay_micros: AtomicU64::new(0),
                loss_per_million: AtomicU64::new(0),
                failing: AtomicBool::new(false),
                lost: AtomicU64::new(0),
                random: Mutex::new(RandomState::new().hash_one(0u64) | 1),
                interruptions: watch::channel(0).0,
            }),
        }
    }

    /// Delays each `group_send` by a random time up to `max` (zero: no delay).
    pub fn delay_group_sends(&self, max: Duration) {
        let micros = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
        self.faults
            .max_delay_micros
            .store(micros, Ordering::Relaxed);
    }

    /// Silently loses each `group_send` with this probability (0 to 1): it reports success and
    /// delivers to nobody.
    pub fn lose_group_sends(&self, probability: f64) {
        let per_million = (probability.clamp(0.0, 1.0) * 1_000_000.0) as u64;
        self.faults
            .loss_per_million
            .store(per_million, Ordering::Relaxed);
    }

    /// While `true`, every call fails with [`LayerError::Unavailable`].
    pub fn fail(&self, failing: bool) {
        self.faults.failing.store(failing, Ordering::Relaxed);
    }

    /// Tells every subscription made through this layer that delivery was interrupted (unless
    /// the wrapped layer reports its own interruptions).
    pub fn interrupt(&self) {
        self.faults.interruptions.send_modify(|count| *count += 1);
    }

    /// How many `group_send`s were lost on purpose so far.
    pub fn lost(&self) -> u64 {
        self.faults.lost.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl ChannelLayer for FaultyLayer {
    async fn new_channel(&self, prefix: &str) -> Result<Subscription, LayerError> {
        self.faults.check()?;
        let subscription = self.inner.new_channel(prefix).await?;
        if subscription.reports_interruptions() {
            return Ok(subscription);
        }
        Ok(subscription.with_interruptions(self.faults.interruptions.subscribe()))
    }

    async fn send(&self, channel: &str, message: Bytes) -> Result<(), LayerError> {
        self.faults.check()?;
        self.inner.send(channel, message).await
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        self.faults.check()?;
        self.inner.group_add(group, channel).await
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        self.faults.check()?;
        self.inner.group_discard(group, channel).await
    }

    async fn group_send(&self, group: &str, message: Bytes) -> Result<GroupSendReport, LayerError> {
        self.faults.check()?;
        let max_delay = self.faults.max_delay_micros.load(Ordering::Relaxed);
        if max_delay > 0 {
            let delay = self.faults.next() % (max_delay + 1);
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        let loss = self.faults.loss_per_million.load(Ordering::Relaxed);
        if loss > 0 && self.faults.next() % 1_000_000 < loss {
            self.faults.lost.fetch_add(1, Ordering::Relaxed);
            return Ok(GroupSendReport::default());
        }
        self.inner.group_send(group, message).await
    }

    async fn flush(&self) -> Result<(), LayerError> {
        self.inner.flush().await
    }

    fn stats(&self) -> LayerStats {
        self.inner.stats()
    }
}
