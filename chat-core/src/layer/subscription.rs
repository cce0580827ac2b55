//! [`Subscription`]: the reading end of a channel, owned by one consumer.
//!
//! It is backend-neutral: a backend hands over any `Stream` of messages whose `Drop` releases the
//! channel, and the subscription adds the name and the conveniences (`recv`, `try_recv`).
//!
//! The one exception is the in-memory layer, whose reading end the subscription holds and calls
//! directly ([`LocalReceiver`]) instead of through a boxed `Stream`: a fan-out to thousands of
//! subscriptions is a receive on each, and the box (a pointer to chase, a cache miss more at that
//! scale) and the virtual call (which keeps the receive from being inlined) cost about as much as
//! the receive itself. Every networked layer fans out through an in-memory one too.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::noop_waker_ref;
use futures::Stream;
use tokio::sync::watch;

use super::memory::LocalReceiver;

/// Length of the random part of a name made by `new_channel`.
pub(crate) const SUFFIX_LEN: usize = 16;

/// The messages sent to one channel, in the order they were queued.
///
/// Dropping it removes the channel from the layer and from every group, so a consumer that goes
/// away leaves nothing behind. The stream ends only when the layer itself is gone.
pub struct Subscription {
    name: String,
    source: Source,
    missed: Arc<AtomicU64>,
    interruptions: Option<watch::Receiver<u64>>,
}

/// Where a subscription's messages come from. Either way, dropping it releases the channel.
enum Source {
    Stream(Pin<Box<dyn Stream<Item = Bytes> + Send>>),
    Local(LocalReceiver),
}

impl Subscription {
    /// Wraps a backend's message stream. The stream's `Drop` must release the channel. The
    /// backend adds one to `missed` for every message meant for this channel that it had to drop
    /// because the channel was full.
    pub fn new(
        name: String,
        stream: impl Stream<Item = Bytes> + Send + 'static,
        missed: Arc<AtomicU64>,
    ) -> Self {
        Self {
            name,
            source: Source::Stream(Box::pin(stream)),
            missed,
            interruptions: None,
        }
    }

    /// Wraps the in-memory layer's reading end, with the same contract as [`new`](Self::new).
    pub(crate) fn local(name: String, receiver: LocalReceiver, missed: Arc<AtomicU64>) -> Self {
        Self {
            name,
            source: Source::Local(receiver),
            missed,
            interruptions: None,
        }
    }

    #[inline]
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        match &mut self.source {
            Source::Local(receiver) => receiver.poll_recv(cx),
            Source::Stream(stream) => stream.as_mut().poll_next(cx),
        }
    }

    /// Lets the backend say when delivery to this channel was interrupted: a networked layer
    /// whose connection broke and was made again bumps the value, because what was sent to the
    /// channel meanwhile may be lost without being counted in [`missed`](Self::missed).
    pub fn with_interruptions(mut self, interruptions: watch::Receiver<u64>) -> Self {
        self.interruptions = Some(interruptions);
        self
    }

    /// Whether the backend reports interruptions at all.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn reports_interruptions(&self) -> bool {
        self.interruptions.is_some()
    }

    /// A handle that tells when delivery to this channel was interrupted (see
    /// [`Interruptions`]); kept apart from the subscription so one task can wait on both.
    pub fn interruptions(&self) -> Interruptions {
        Interruptions(self.interruptions.clone())
    }

    /// How many messages meant for this channel were dropped because it was full. A consumer that
    /// must not miss anything (a chat connection) treats a non-zero count as "too slow".
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// The drop counter itself, for a layer that wraps another layer's subscription.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn missed_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.missed)
    }

    /// The channel's name: give it to `send` or `group_add`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for the next message; `None` once the layer is gone.
    #[inline]
    pub async fn recv(&mut self) -> Option<Bytes> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    /// The next message if one is already queued, without waiting.
    #[inline]
    pub fn try_recv(&mut self) -> Option<Bytes> {
        match &mut self.source {
            Source::Local(receiver) => receiver.try_recv(),
            Source::Stream(stream) => {
                let mut cx = Context::from_waker(noop_waker_ref());
                match stream.as_mut().poll_next(&mut cx) {
                    Poll::Ready(message) => message,
                    Poll::Pending => None,
                }
            }
        }
    }
}

/// Tells a subscriber when delivery was interrupted: the layer lost its connection and made it
/// again, so messages sent to the channel meanwhile may be gone without being counted in
/// [`Subscription::missed`]. A consumer that must not miss anything then checks what it may
/// have missed (a chat connection reads its conversations' news from the history store).
#[derive(Debug)]
pub struct Interruptions(Option<watch::Receiver<u64>>);

impl Interruptions {
    /// Completes at the next interruption (never, for a backend that cannot be interrupted).
    pub async fn next(&mut self) {
        match &mut self.0 {
            Some(interruptions) => {
                if interruptions.changed().await.is_err() {
                    // The layer is gone: nothing will be interrupted any more.
                    self.0 = None;
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl Stream for Subscription {
    type Item = Bytes;

    #[inline]
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.poll_message(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Makes `{prefix}.{16 random letters and digits}`. The randomness comes from the standard
/// library's per-process random hash keys mixed with a counter: unique within the process by the
/// counter and, with overwhelming probability, across processes by the keys.
pub(crate) fn unique_channel_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let state = RandomState::new();
    let mut name = String::with_capacity(prefix.len() + 1 + SUFFIX_LEN);
    name.push_str(prefix);
    name.push('.');
    let mut word = 0u64;
    for i in 0..SUFFIX_LEN {
        if i % 8 == 0 {
            let mut hasher = state.build_hasher();
            hasher.write_u64(n);
            hasher.write_usize(i);
            word = hasher.finish();
        }
        name.push(char::from(
            ALPHABET[(word % ALPHABET.len() as u64) as usize],
        ));
        word /= ALPHABET.len() as u64;
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_and_valid() {
        let names: HashSet<String> = (0..10_000).map(|_| unique_channel_name("c")).collect();
        assert_eq!(names.len(), 10_000);
        for name in names.iter().take(100) {
            assert!(super::super::validate_channel_name(name).is_ok(), "{name}");
            assert_eq!(name.len(), 2 + SUFFIX_LEN);
        }
    }
}
