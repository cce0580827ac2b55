//! [`InMemoryChannelLayer`]: the channel layer for one process.
//!
//! Concurrency design, because fan-out is the hot path:
//!
//! - One registry mutex (channels and groups) guards only map edits and lookups; it is a std
//!   `Mutex` because no critical section awaits or does I/O, and it is never held while a message
//!   is queued.
//! - Each group keeps a lazily rebuilt snapshot (`Arc<[Member]>`) of its members. `group_send`
//!   clones that `Arc` under the lock (O(1)), releases the lock, then queues the message on each
//!   member. Joins and leaves only invalidate the snapshot, so churn costs O(1) per change and
//!   the next send pays one rebuild.
//! - Each channel is its own small mutex-guarded `VecDeque` with a capacity, so senders to
//!   different channels never contend and memory is bounded by capacity whatever senders do.
//! - Message payloads are `Bytes`: queuing one on ten thousand channels bumps a reference count
//!   ten thousand times and copies nothing.
//!
//! Time is `tokio::time::Instant`, so tests can pause and advance the clock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use tokio::time::Instant;

use super::names::validate_prefix;
use super::subscription::unique_channel_name;
use super::{
    validate_channel_name, validate_group_name, ChannelLayer, GroupSendReport, LayerConfig,
    LayerError, LayerStats, Subscription,
};

/// A [`ChannelLayer`] that lives inside one process.
///
/// Cheap to clone: clones share the same channels and groups.
///
/// ```
/// use chat_core::layer::{InMemoryChannelLayer, LayerConfig};
/// let layer = InMemoryChannelLayer::new(LayerConfig::default().with_capacity(256));
/// let same_layer = layer.clone();
/// # drop(same_layer);
/// ```
#[derive(Clone, Default)]
pub struct InMemoryChannelLayer {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    config: LayerConfig,
    registry: Mutex<Registry>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    group_send_dropped: AtomicU64,
    expired_messages: AtomicU64,
    expired_memberships: AtomicU64,
}

#[derive(Default)]
struct Registry {
    channels: HashMap<String, ChannelEntry>,
    groups: HashMap<String, Group>,
}

struct ChannelEntry {
    queue: Arc<Queue>,
    /// The groups this channel belongs to, so that dropping its subscription leaves them all.
    groups: HashSet<String>,
}

#[derive(Default)]
struct Group {
    members: HashMap<String, Member>,
    /// The members as a shareable slice; `None` after a change until the next `group_send`.
    snapshot: Option<Arc<[Member]>>,
}

#[derive(Clone)]
struct Member {
    queue: Arc<Queue>,
    added: Instant,
}

/// One channel's pending messages.
struct Queue {
    name: String,
    capacity: usize,
    expiry: Duration,
    counters: Arc<Counters>,
    /// Messages dropped because this queue was full; shared with the subscription.
    missed: Arc<AtomicU64>,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<(Instant, Bytes)>,
    waker: Option<Waker>,
    closed: bool,
}

enum PushError {
    Full,
    Closed,
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data consistent at
/// each step, so a panic elsewhere does not make it unsafe to go on.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Queue {
    fn push(&self, now: Instant, message: Bytes) -> Result<(), PushError> {
        let waker = {
            let mut state = lock(&self.state);
            if state.closed {
                return Err(PushError::Closed);
            }
            self.drop_expired(&mut state, now);
            if state.items.len() >= self.capacity {
                self.missed.fetch_add(1, Ordering::Relaxed);
                return Err(PushError::Full);
            }
            state.items.push_back((now, message));
            state.waker.take()
        };
        // Wake outside the lock so the woken task does not immediately contend on it.
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Messages are queued in time order, so the expired ones are all at the front.
    fn drop_expired(&self, state: &mut QueueState, now: Instant) {
        let mut dropped = 0;
        while let Some((queued, _)) = state.items.front() {
            if now.saturating_duration_since(*queued) < self.expiry {
                break;
            }
            state.items.pop_front();
            dropped += 1;
        }
        if dropped > 0 {
            self.counters
                .expired_messages
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }

    fn close(&self) {
        let waker = {
            let mut state = lock(&self.state);
            state.closed = true;
            state.items.clear();
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The stream behind a memory [`Subscription`]; dropping it unregisters the channel.
struct Receiver {
    queue: Arc<Queue>,
    shared: Weak<Shared>,
}

impl Stream for Receiver {
    type Item = Bytes;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut state = lock(&self.queue.state);
        self.queue.drop_expired(&mut state, Instant::now());
        if let Some((_, message)) = state.items.pop_front() {
            return Poll::Ready(Some(message));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let mut registry = lock(&shared.registry);
            if let Some(entry) = registry.channels.remove(&self.queue.name) {
                for group_name in entry.groups {
                    registry.remove_member(&group_name, &self.queue.name);
                }
            }
        }
        self.queue.close();
    }
}

impl Registry {
    fn remove_member(&mut self, group_name: &str, channel: &str) {
        if let Some(group) = self.groups.get_mut(group_name) {
            if group.members.remove(channel).is_some() {
                group.snapshot = None;
            }
            if group.members.is_empty() {
                self.groups.remove(group_name);
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // End every live subscription's stream: nothing will ever be sent to it again.
        let registry = lock(&self.registry);
        for entry in registry.channels.values() {
            entry.queue.close();
        }
    }
}

impl InMemoryChannelLayer {
    /// A layer with the given settings.
    pub fn new(config: LayerConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                registry: Mutex::default(),
                counters: Arc::default(),
            }),
        }
    }

    /// The settings this layer runs with.
    pub fn config(&self) -> &LayerConfig {
        &self.shared.config
    }

    /// Whether `group` has any member (lapsed ones included until a `group_send` prunes them).
    /// A networked layer that fans out locally asks this to know when to stop listing this
    /// process as having members.
    pub(crate) fn has_members(&self, group: &str) -> bool {
        lock(&self.shared.registry).groups.contains_key(group)
    }

    /// Removes the lapsed memberships of `group_name`, unless they were refreshed (re-added
    /// after `cutoff`) while the send ran without the lock.
    fn remove_lapsed(&self, group_name: &str, lapsed: &[Arc<Queue>], cutoff: Instant) {
        let mut registry = lock(&self.shared.registry);
        let Registry { channels, groups } = &mut *registry;
        let Some(group) = groups.get_mut(group_name) else {
            return;
        };
        for queue in lapsed {
            let still_lapsed = group
                .members
                .get(&queue.name)
                .is_some_and(|m| m.added <= cutoff && Arc::ptr_eq(&m.queue, queue));
            if still_lapsed {
                group.members.remove(&queue.name);
                group.snapshot = None;
                if let Some(entry) = channels.get_mut(&queue.name) {
                    entry.groups.remove(group_name);
                }
            }
        }
        if group.members.is_empty() {
            groups.remove(group_name);
        }
    }
}

#[async_trait]
impl ChannelLayer for InMemoryChannelLayer {
    async fn new_channel(&self, prefix: &str) -> Result<Subscription, LayerError> {
        validate_prefix(prefix)?;
        let config = &self.shared.config;
        let mut registry = lock(&self.shared.registry);
        let name = loop {
            let candidate = unique_channel_name(prefix);
            if !registry.channels.contains_key(&candidate) {
                break candidate;
            }
        };
        let queue = Arc::new(Queue {
            name: name.clone(),
            capacity: config.capacity_for(&name),
            expiry: config.expiry,
            counters: Arc::clone(&self.shared.counters),
            missed: Arc::default(),
            state: Mutex::default(),
        });
        registry.channels.insert(
            name.clone(),
            ChannelEntry {
                queue: Arc::clone(&queue),
                groups: HashSet::new(),
            },
        );
        drop(registry);
        let missed = Arc::clone(&queue.missed);
        let receiver = Receiver {
            queue,
            shared: Arc::downgrade(&self.shared),
        };
        Ok(Subscription::new(name, receiver, missed))
    }

    async fn send(&self, channel: &str, message: Bytes) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let queue = lock(&self.shared.registry)
            .channels
            .get(channel)
            .map(|entry| Arc::clone(&entry.queue));
        let queue = queue.ok_or_else(|| LayerError::NoSuchChannel(channel.to_owned()))?;
        match queue.push(Instant::now(), message) {
            Ok(()) => Ok(()),
            Err(PushError::Full) => Err(LayerError::ChannelFull(channel.to_owned())),
            Err(PushError::Closed) => Err(LayerError::NoSuchChannel(channel.to_owned())),
        }
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let mut registry = lock(&self.shared.registry);
        let entry = registry
            .channels
            .get_mut(channel)
            .ok_or_else(|| LayerError::NoSuchChannel(channel.to_owned()))?;
        entry.groups.insert(group.to_owned());
        let member = Member {
            queue: Arc::clone(&entry.queue),
            added: Instant::now(),
        };
        let group = registry.groups.entry(group.to_owned()).or_default();
        group.members.insert(channel.to_owned(), member);
        group.snapshot = None;
        Ok(())
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let mut registry = lock(&self.shared.registry);
        if let Some(entry) = registry.channels.get_mut(channel) {
            entry.groups.remove(group);
        }
        registry.remove_member(group, channel);
        Ok(())
    }

    async fn group_send(&self, group: &str, message: Bytes) -> Result<GroupSendReport, LayerError> {
        validate_group_name(group)?;
        let snapshot =
            {
                let mut registry = lock(&self.shared.registry);
                match registry.groups.get_mut(group) {
                    None => return Ok(GroupSendReport::default()),
                    Some(g) => Arc::clone(g.snapshot.get_or_insert_with(|| {
                        g.members.values().cloned().collect::<Vec<_>>().into()
                    })),
                }
            };
        let now = Instant::now();
        let group_expiry = self.shared.config.group_expiry;
        let mut report = GroupSendReport::default();
        let mut lapsed = Vec::new();
        for member in snapshot.iter() {
            if now.saturating_duration_since(member.added) >= group_expiry {
                lapsed.push(Arc::clone(&member.queue));
                continue;
            }
            match member.queue.push(now, message.clone()) {
                Ok(()) => report.delivered += 1,
                Err(PushError::Full) => report.dropped_full += 1,
                // The subscriber went away after the snapshot was taken: it is no member now.
                Err(PushError::Closed) => {}
            }
        }
        let counters = &self.shared.counters;
        if report.dropped_full > 0 {
            counters
                .group_send_dropped
                .fetch_add(report.dropped_full as u64, Ordering::Relaxed);
            tracing::debug!(
                group,
                dropped = report.dropped_full,
                "group_send skipped full channels"
            );
        }
        if !lapsed.is_empty() {
            report.expired_members = lapsed.len();
            counters
                .expired_memberships
                .fetch_add(lapsed.len() as u64, Ordering::Relaxed);
            let cutoff = now.checked_sub(group_expiry).unwrap_or(now);
            self.remove_lapsed(group, &lapsed, cutoff);
        }
        Ok(report)
    }

    async fn flush(&self) -> Result<(), LayerError> {
        let mut registry = lock(&self.shared.registry);
        registry.groups.clear();
        for entry in registry.channels.values_mut() {
            entry.groups.clear();
            lock(&entry.queue.state).items.clear();
        }
        Ok(())
    }

    fn stats(&self) -> LayerStats {
        let c = &self.shared.counters;
        LayerStats {
            group_send_dropped: c.group_send_dropped.load(Ordering::Relaxed),
            expired_messages: c.expired_messages.load(Ordering::Relaxed),
            expired_memberships: c.expired_memberships.load(Ordering::Relaxed),
        }
    }
}
