//! [`InMemoryChannelLayer`]: the channel layer for one process.
//!
//! Fan-out is the hot path: a `group_send` to N members is N deliveries, each a push by the
//! sender and a receive by the member's subscription, so the design is about the cost of one
//! delivery. It is an uncontended lock and unlock on each side, on one cache line per member, plus
//! the member's copy of the `Bytes` handle; no clock read, allocation, virtual call or wake-up per
//! member unless that member needs one. (`benches/fanout.rs` measures it against a bare
//! `tokio::sync::broadcast`, which does no per-member work at all when sending.)
//!
//! - **Registry.** One mutex (channels and groups) guards only map edits and lookups; it is a std
//!   `Mutex` because no critical section awaits or does I/O, and it is never held while a message
//!   is queued.
//! - **Group snapshots.** Each group keeps a lazily rebuilt snapshot (`Arc<Snapshot>`) of its
//!   members. `group_send` clones that `Arc` under the registry lock (O(1)), releases the lock,
//!   then queues the message on each member. Joins and leaves only invalidate the snapshot, so
//!   churn costs O(1) per change and the next send pays one rebuild (O(n log n): the members are
//!   sorted by address, so that the send walks memory forwards and the hardware prefetches the
//!   next inboxes). The snapshot remembers its oldest membership, so a send checks
//!   `group_expiry` once, not per member, until some membership can actually have lapsed.
//! - **Inboxes.** Each channel is its own small mutex-guarded FIFO with a capacity, so senders to
//!   different channels never contend, a full channel drops for that member only (counted in the
//!   report, the layer's stats and the subscription's `missed()`), and memory is bounded by
//!   capacity whatever senders do. The mutex, the oldest message, the length and the flags share
//!   one cache line (see [`Inbox`]); the rest of a longer queue and a parked receiver's waker are
//!   behind a second lock that only the slow paths take.
//! - **Why not a shared log.** A per-group log read by members at their own cursors makes a send
//!   O(1) for a broadcast, but not here: a channel belongs to many groups (its user, its rooms,
//!   presence) and takes direct sends too, and capacity, drop accounting (the report counts the
//!   drops of *this* send, and `missed()` must move at once) and per-sender order are all per
//!   channel. So a send would still touch every member to check and count its capacity, and a
//!   receive would have to merge several logs; the per-member push is not dearer than that check.
//! - **Receiving.** The subscription holds the inbox's reading end itself ([`LocalReceiver`]), not
//!   a boxed `Stream`: no pointer to chase and no virtual call, so the fast path of a receive (a
//!   lock, taking the oldest message, an unlock) is inlined into the caller.
//! - **Payloads and wake-ups.** Messages are `Bytes`: queuing one on ten thousand channels bumps a
//!   reference count ten thousand times and copies nothing. Only a receiver that is parked (its
//!   last poll found the queue empty) has a waker to wake, and it is woken outside the locks.
//! - **Clock.** Time is a `u64` count of nanoseconds since the layer was made, read from
//!   `tokio::time::Instant` (so tests can pause and advance it) once per send, not per member.
//!   Expiry is checked by senders (an expired message at the front of a queue is dropped, so it
//!   never takes a place a new message needs) and by receivers. A receiver would otherwise have
//!   to read the clock for every message it takes, which costs more than all the rest of a
//!   delivery; instead the layer keeps a *freshness horizon*, see [`Core`]: while it holds, a
//!   message stamped at or after `trusted_from` is known to be unexpired and the receiver takes
//!   it without reading the clock; an older message, or any message while no horizon holds,
//!   makes the receiver read the clock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
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
#[derive(Clone)]
pub struct InMemoryChannelLayer {
    shared: Arc<Shared>,
}

impl Default for InMemoryChannelLayer {
    fn default() -> Self {
        Self::new(LayerConfig::default())
    }
}

struct Shared {
    config: LayerConfig,
    registry: Mutex<Registry>,
    core: Arc<Core>,
}

/// A point in time: nanoseconds since the layer was made ([`Core::epoch`]).
type Tick = u64;

/// A tick no message ever carries: "trust nothing", "never renew".
const NEVER: Tick = Tick::MAX;

/// Below this expiry the freshness horizon is not worth a timer: receivers always read the clock.
const MIN_HORIZON_EXPIRY: Duration = Duration::from_millis(10);

/// The longest a horizon reaches ahead, so that a huge expiry still gets a sane timer.
const MAX_HORIZON: Duration = Duration::from_secs(3600);

fn ticks(duration: Duration) -> Tick {
    Tick::try_from(duration.as_nanos()).unwrap_or(NEVER)
}

/// What every channel of a layer shares: the clock, the settings a delivery needs, the counters
/// and the freshness horizon.
///
/// # The freshness horizon
///
/// The layer may promise "it is not yet `until`": a watchdog task sleeps on a Tokio timer until
/// `until` and, unless a sender has pushed `until` further meanwhile, withdraws the promise when
/// it wakes. While the promise holds, a message stamped at or after `trusted_from = until -
/// expiry` cannot have expired yet (it is younger than `until - trusted_from = expiry`), so a
/// receiver compares two integers instead of reading the clock.
///
/// - Senders keep the horizon ahead: every send has read the clock anyway, and once it passes
///   `renew_at` (half way through the current period) the send moves `until` to `now + period`,
///   `period` being half the expiry, and starts the watchdog if none runs. That is one mutex
///   lock per half period per layer, not per send.
/// - Without a Tokio runtime (no watchdog can run) no horizon is made, and a runtime that shuts
///   down drops its watchdog, which withdraws the promise. In a runtime built without timers the
///   watchdog's sleep panics (Tokio catches it, and reports it, in the watchdog's task); the
///   promise is withdrawn and the layer makes no more horizons.
/// - The promise is as good as the runtime's timers: expiry on receive can be late by as much as
///   the watchdog's wake-up is, which matters only if the runtime stops running its timers (a
///   task that never yields, a current-thread runtime nobody drives) for longer than a period
///   while receives go on. It errs one way only: a message past its expiry may still be
///   delivered, a fresh one is never dropped. Senders never rely on the horizon.
/// - Under a paused Tokio clock (tests) the watchdog is one more timer, which auto-advance may
///   jump to when nothing else is pending.
struct Core {
    epoch: Instant,
    expiry: Tick,
    group_expiry: Tick,
    /// Half the expiry (capped at [`MAX_HORIZON`]), or zero when horizons are off.
    period: Tick,
    /// Messages stamped at or after this tick are unexpired while the horizon holds; [`NEVER`]
    /// when there is none.
    trusted_from: AtomicU64,
    /// A sender whose clock reads at least this renews the horizon.
    renew_at: AtomicU64,
    horizon: Mutex<Horizon>,
    group_send_dropped: AtomicU64,
    expired_messages: AtomicU64,
    expired_memberships: AtomicU64,
}

#[derive(Default)]
struct Horizon {
    /// The promise: it is not yet this tick (meaningful while `trusted_from` is not [`NEVER`]).
    until: Tick,
    /// Whether a watchdog task is alive (it keeps the promise honest).
    watchdog: bool,
    /// A watchdog panicked (no timers in that runtime): make no more horizons.
    disabled: bool,
}

impl Core {
    fn new(config: &LayerConfig) -> Self {
        let horizons = config.expiry >= MIN_HORIZON_EXPIRY;
        Self {
            epoch: Instant::now(),
            expiry: ticks(config.expiry),
            group_expiry: ticks(config.group_expiry),
            period: if horizons {
                ticks((config.expiry / 2).min(MAX_HORIZON))
            } else {
                0
            },
            trusted_from: AtomicU64::new(NEVER),
            renew_at: AtomicU64::new(if horizons { 0 } else { NEVER }),
            horizon: Mutex::default(),
            group_send_dropped: AtomicU64::new(0),
            expired_messages: AtomicU64::new(0),
            expired_memberships: AtomicU64::new(0),
        }
    }

    fn now(&self) -> Tick {
        ticks(Instant::now().saturating_duration_since(self.epoch))
    }

    /// A sender read the clock: keep the horizon ahead of it. One atomic load, except once per
    /// half period.
    #[inline]
    fn sending_at(self: &Arc<Self>, now: Tick) {
        if now >= self.renew_at.load(Ordering::Relaxed) {
            self.renew_horizon(now);
        }
    }

    #[cold]
    fn renew_horizon(self: &Arc<Self>, now: Tick) {
        let mut horizon = lock(&self.horizon);
        if horizon.disabled || now < self.renew_at.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to run a watchdog in: no horizon from here; try again later.
            self.renew_at
                .store(now.saturating_add(self.period / 2), Ordering::Relaxed);
            return;
        };
        horizon.until = now.saturating_add(self.period);
        self.trusted_from
            .store(horizon.until.saturating_sub(self.expiry), Ordering::Release);
        self.renew_at
            .store(now.saturating_add(self.period / 2), Ordering::Relaxed);
        if !horizon.watchdog {
            horizon.watchdog = true;
            // Unlocked first: a runtime that is shutting down drops the task inside `spawn`,
            // and the guard's drop takes this lock (holding it here deadlocked the thread).
            drop(horizon);
            // The guard is moved into the future now, so even a task that is never polled
            // (its runtime shuts down first) withdraws the promise when it is dropped.
            runtime.spawn(watchdog(WatchdogGuard(Arc::clone(self))));
        }
    }

    /// Whether the message stamped `at` must be dropped as expired. `now` is read at most once
    /// per caller, and only if the horizon cannot vouch for the message.
    #[inline]
    fn expired(&self, at: Tick, now: &mut Option<Tick>) -> bool {
        if at >= self.trusted_from.load(Ordering::Acquire) {
            return false;
        }
        let now = *now.get_or_insert_with(|| self.now());
        now.saturating_sub(at) >= self.expiry
    }
}

/// Sleeps until the horizon's `until`, again as long as senders keep pushing it further, and
/// withdraws the promise (through the guard) once the clock has caught up with it. The clock is
/// checked before each sleep, not only after: a timer whose deadline has already passed fires
/// only on the runtime's next turn of its timers, and until then receivers would go on trusting.
async fn watchdog(guard: WatchdogGuard) {
    let core = &guard.0;
    loop {
        let until = lock(&core.horizon).until;
        if core.now() >= until {
            break;
        }
        let Some(deadline) = core.epoch.checked_add(Duration::from_nanos(until)) else {
            break;
        };
        tokio::time::sleep_until(deadline).await;
    }
}

/// Withdraws the horizon's promise when its watchdog ends, however it ends: caught up, dropped
/// with its runtime, or panicked (then no more horizons are made).
struct WatchdogGuard(Arc<Core>);

impl Drop for WatchdogGuard {
    fn drop(&mut self) {
        let core = &self.0;
        let mut horizon = lock(&core.horizon);
        core.trusted_from.store(NEVER, Ordering::Release);
        horizon.watchdog = false;
        if std::thread::panicking() {
            horizon.disabled = true;
            core.renew_at.store(NEVER, Ordering::Relaxed);
        } else if !horizon.disabled {
            // The next send makes a new horizon (and a new watchdog).
            core.renew_at.store(0, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct Registry {
    channels: HashMap<String, ChannelEntry>,
    groups: HashMap<String, Group>,
}

struct ChannelEntry {
    inbox: Arc<Inbox>,
    /// The groups this channel belongs to, so that dropping its subscription leaves them all.
    groups: HashSet<String>,
}

#[derive(Default)]
struct Group {
    members: HashMap<String, Member>,
    /// The members as a shareable list; `None` after a change until the next `group_send`.
    snapshot: Option<Arc<Snapshot>>,
}

#[derive(Clone)]
struct Member {
    inbox: Arc<Inbox>,
    added: Tick,
}

/// A group's members as one `group_send` sees them.
struct Snapshot {
    members: Box<[Member]>,
    /// The oldest `added` among them: until it is `group_expiry` old, no membership has lapsed
    /// and a send skips the per-member check.
    oldest_added: Tick,
}

impl Snapshot {
    fn new(members: &HashMap<String, Member>) -> Self {
        let mut members: Vec<Member> = members.values().cloned().collect();
        // In address order, not hash order: inboxes made one after another tend to sit one
        // after another in memory, so a send walks memory forwards and the hardware prefetches
        // the next members' lines (it cannot guess a random order). Delivery order across
        // members means nothing, so this costs only the sort, once per membership change.
        members.sort_unstable_by_key(|m| Arc::as_ptr(&m.inbox).addr());
        let members = members.into_boxed_slice();
        let oldest_added = members.iter().map(|m| m.added).min().unwrap_or(NEVER);
        Self {
            members,
            oldest_added,
        }
    }
}

/// One channel's pending messages; the subscription polls it directly.
///
/// Laid out for fan-out. The first cache line (the 64-byte alignment makes it a line of its
/// own) is the mutex and everything a push to, or a pop from, a short queue needs: the oldest
/// message, the length, the flags and the layer's [`Core`]. A `group_send` to ten thousand
/// members touches ten thousand lines, and the receive that follows touches the same ones, not
/// two or three times as many. The rest (the messages behind the oldest one, the parked
/// receiver's waker, the capacity) is on the next lines, behind a second mutex, and only the
/// slow paths go there: a queue that already holds a message, a receiver that parks or must be
/// woken. That mutex is only ever locked with the first one held, so the two cannot deadlock.
#[repr(C, align(64))]
struct Inbox {
    state: Mutex<InboxState>,
    more: Mutex<More>,
    /// Needed only when the queue is not empty (an empty queue always has room).
    capacity: u32,
    name: String,
    /// Messages dropped because this inbox was full; shared with the subscription.
    missed: Arc<AtomicU64>,
    /// To leave the registry when the subscription goes away.
    shared: Weak<Shared>,
}

/// At most 56 bytes, so that with the mutex's own word it fits one cache line.
struct InboxState {
    /// The oldest pending message; `None` exactly when the queue is empty.
    head: Option<Pending>,
    /// Pending messages, `head` included.
    len: u32,
    closed: bool,
    /// The receiver's last poll found nothing and left its waker in `More::waker`.
    parked: bool,
    /// Here rather than beside the mutex so that a receive reads no other line of the inbox.
    core: Arc<Core>,
}

// The point of the layout above; a field added to `InboxState` must keep it.
const _: () = assert!(std::mem::size_of::<Mutex<InboxState>>() <= 64);

/// The slow-path part of an inbox.
#[derive(Default)]
struct More {
    /// The messages behind `InboxState::head`, oldest first.
    queue: VecDeque<Pending>,
    waker: Option<Waker>,
}

struct Pending {
    /// When it was queued.
    at: Tick,
    message: Bytes,
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

impl Inbox {
    fn new(name: String, capacity: usize, shared: &Arc<Shared>) -> Self {
        Self {
            state: Mutex::new(InboxState {
                head: None,
                len: 0,
                closed: false,
                parked: false,
                core: Arc::clone(&shared.core),
            }),
            more: Mutex::default(),
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            name,
            missed: Arc::default(),
            shared: Arc::downgrade(shared),
        }
    }

    /// Queues `message`. The common case of fan-out (an open, empty queue whose receiver is not
    /// parked) is a lock, one store of the message and an unlock, inlined into the send loop;
    /// everything else is [`push_slow`](Self::push_slow).
    #[inline(always)]
    fn push(&self, now: Tick, message: Bytes) -> Result<(), PushError> {
        let mut state = lock(&self.state);
        if state.len == 0 && !state.closed && !state.parked {
            state.head = Some(Pending { at: now, message });
            state.len = 1;
            return Ok(());
        }
        self.push_slow(state, now, message)
    }

    #[inline(never)]
    fn push_slow(
        &self,
        mut state: MutexGuard<'_, InboxState>,
        now: Tick,
        message: Bytes,
    ) -> Result<(), PushError> {
        if state.closed {
            return Err(PushError::Closed);
        }
        let pending = Pending { at: now, message };
        let mut more = lock(&self.more);
        if state.len > 0 {
            self.drop_expired(&mut state, &mut more, now);
        }
        if state.len >= self.capacity {
            self.missed.fetch_add(1, Ordering::Relaxed);
            return Err(PushError::Full);
        }
        if state.head.is_none() {
            state.head = Some(pending);
        } else {
            more.queue.push_back(pending);
        }
        state.len += 1;
        let waker = if state.parked {
            state.parked = false;
            more.waker.take()
        } else {
            None
        };
        drop(more);
        drop(state);
        // Wake outside the locks so the woken task does not immediately contend on them.
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Takes the oldest message; the next one, if any, moves up from `more`.
    #[inline(always)]
    fn pop(&self, state: &mut InboxState) -> Option<Pending> {
        let head = state.head.take()?;
        state.len -= 1;
        if state.len > 0 {
            self.refill(state);
        }
        Some(head)
    }

    #[inline(never)]
    fn refill(&self, state: &mut InboxState) {
        state.head = lock(&self.more).queue.pop_front();
    }

    /// Messages are queued in time order, so the expired ones are all at the front. The sender
    /// has read the clock already; this is an integer comparison per message looked at.
    fn drop_expired(&self, state: &mut InboxState, more: &mut More, now: Tick) {
        let expiry = state.core.expiry;
        let mut dropped = 0;
        while state
            .head
            .as_ref()
            .is_some_and(|head| now.saturating_sub(head.at) >= expiry)
        {
            state.head = more.queue.pop_front();
            state.len -= 1;
            dropped += 1;
        }
        if dropped > 0 {
            state
                .core
                .expired_messages
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Drops every pending message.
    fn clear(&self, state: &mut InboxState) {
        state.head = None;
        state.len = 0;
        lock(&self.more).queue.clear();
    }

    fn close(&self) {
        let waker = {
            let mut state = lock(&self.state);
            state.closed = true;
            state.parked = false;
            self.clear(&mut state);
            lock(&self.more).waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Everything a receive's fast path leaves: expired messages, an empty or closed queue.
    /// With `cx`, an empty queue parks the receiver (its waker is kept for the next push);
    /// without, it only reports that nothing is there.
    #[cold]
    #[inline(never)]
    fn recv_slow(&self, cx: Option<&mut Context<'_>>) -> Poll<Option<Bytes>> {
        let mut state = lock(&self.state);
        let mut now = None;
        let mut expired = 0;
        let next = loop {
            match self.pop(&mut state) {
                Some(pending) if state.core.expired(pending.at, &mut now) => expired += 1,
                other => break other,
            }
        };
        let poll = match (next, cx) {
            (Some(pending), _) => Poll::Ready(Some(pending.message)),
            (None, _) if state.closed => Poll::Ready(None),
            (None, None) => Poll::Pending,
            (None, Some(cx)) => {
                let mut more = lock(&self.more);
                match &mut more.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                if more.queue.capacity() > 4 {
                    // Empty, and its receiver goes to sleep: a burst is over, and an idle
                    // channel keeps no room for the next one.
                    more.queue = VecDeque::new();
                }
                state.parked = true;
                Poll::Pending
            }
        };
        if expired > 0 {
            state
                .core
                .expired_messages
                .fetch_add(expired, Ordering::Relaxed);
        }
        poll
    }

    /// A receive's fast path: the oldest message, if it is within the freshness horizon. A lock,
    /// a comparison, taking the message and an unlock.
    #[inline(always)]
    fn take_trusted(&self) -> Option<Bytes> {
        let mut state = lock(&self.state);
        let trusted_from = state.core.trusted_from.load(Ordering::Acquire);
        if state.head.as_ref()?.at < trusted_from {
            return None;
        }
        self.pop(&mut state).map(|head| head.message)
    }
}

/// The reading end of a channel, held by its [`Subscription`] (which calls it directly: no box
/// and no virtual call between a subscription and its inbox, so the whole of a receive's fast
/// path can be inlined into the caller). Dropping it unregisters the channel.
pub(crate) struct LocalReceiver {
    inbox: Arc<Inbox>,
}

impl LocalReceiver {
    /// Like [`Stream::poll_next`](futures::Stream::poll_next).
    #[inline]
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        match self.inbox.take_trusted() {
            Some(message) => Poll::Ready(Some(message)),
            None => self.inbox.recv_slow(Some(cx)),
        }
    }

    /// The next message if one is already queued, like a poll that leaves no waker behind.
    #[inline]
    pub(crate) fn try_recv(&self) -> Option<Bytes> {
        match self.inbox.take_trusted() {
            Some(message) => Some(message),
            None => match self.inbox.recv_slow(None) {
                Poll::Ready(message) => message,
                Poll::Pending => None,
            },
        }
    }
}

impl Drop for LocalReceiver {
    fn drop(&mut self) {
        let inbox = &*self.inbox;
        if let Some(shared) = inbox.shared.upgrade() {
            let mut registry = lock(&shared.registry);
            if let Some(entry) = registry.channels.remove(&inbox.name) {
                for group_name in entry.groups {
                    registry.remove_member(&group_name, &inbox.name);
                }
            }
        }
        inbox.close();
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
            entry.inbox.close();
        }
    }
}

impl InMemoryChannelLayer {
    /// A layer with the given settings.
    pub fn new(config: LayerConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                core: Arc::new(Core::new(&config)),
                config,
                registry: Mutex::default(),
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
    #[cfg(feature = "redis")]
    pub(crate) fn has_members(&self, group: &str) -> bool {
        lock(&self.shared.registry).groups.contains_key(group)
    }

    /// Removes the lapsed memberships of `group_name`, unless they were refreshed (re-added
    /// after `cutoff`) while the send ran without the lock.
    fn remove_lapsed(&self, group_name: &str, lapsed: &[Arc<Inbox>], cutoff: Tick) {
        let mut registry = lock(&self.shared.registry);
        let Registry { channels, groups } = &mut *registry;
        let Some(group) = groups.get_mut(group_name) else {
            return;
        };
        for inbox in lapsed {
            let still_lapsed = group
                .members
                .get(&inbox.name)
                .is_some_and(|m| m.added <= cutoff && Arc::ptr_eq(&m.inbox, inbox));
            if still_lapsed {
                group.members.remove(&inbox.name);
                group.snapshot = None;
                if let Some(entry) = channels.get_mut(&inbox.name) {
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
        let inbox = Arc::new(Inbox::new(
            name.clone(),
            config.capacity_for(&name),
            &self.shared,
        ));
        registry.channels.insert(
            name.clone(),
            ChannelEntry {
                inbox: Arc::clone(&inbox),
                groups: HashSet::new(),
            },
        );
        drop(registry);
        let missed = Arc::clone(&inbox.missed);
        Ok(Subscription::local(name, LocalReceiver { inbox }, missed))
    }

    async fn send(&self, channel: &str, message: Bytes) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let inbox = lock(&self.shared.registry)
            .channels
            .get(channel)
            .map(|entry| Arc::clone(&entry.inbox));
        let inbox = inbox.ok_or_else(|| LayerError::NoSuchChannel(channel.to_owned()))?;
        let core = &self.shared.core;
        let now = core.now();
        core.sending_at(now);
        match inbox.push(now, message) {
            Ok(()) => Ok(()),
            Err(PushError::Full) => Err(LayerError::ChannelFull(channel.to_owned())),
            Err(PushError::Closed) => Err(LayerError::NoSuchChannel(channel.to_owned())),
        }
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let added = self.shared.core.now();
        let mut registry = lock(&self.shared.registry);
        let entry = registry
            .channels
            .get_mut(channel)
            .ok_or_else(|| LayerError::NoSuchChannel(channel.to_owned()))?;
        entry.groups.insert(group.to_owned());
        let member = Member {
            inbox: Arc::clone(&entry.inbox),
            added,
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
        let snapshot = {
            let mut registry = lock(&self.shared.registry);
            match registry.groups.get_mut(group) {
                None => return Ok(GroupSendReport::default()),
                Some(g) => Arc::clone(
                    g.snapshot
                        .get_or_insert_with(|| Arc::new(Snapshot::new(&g.members))),
                ),
            }
        };
        let core = &self.shared.core;
        let now = core.now();
        core.sending_at(now);
        let mut report = GroupSendReport::default();
        let mut lapsed = Vec::new();
        // Until the oldest membership is `group_expiry` old none can have lapsed, and the loop
        // is only the pushes.
        let check_lapsed = now.saturating_sub(snapshot.oldest_added) >= core.group_expiry;
        for member in snapshot.members.iter() {
            if check_lapsed && now.saturating_sub(member.added) >= core.group_expiry {
                lapsed.push(Arc::clone(&member.inbox));
                continue;
            }
            match member.inbox.push(now, message.clone()) {
                Ok(()) => report.delivered += 1,
                Err(PushError::Full) => report.dropped_full += 1,
                // The subscriber went away after the snapshot was taken: it is no member now.
                Err(PushError::Closed) => {}
            }
        }
        if report.dropped_full > 0 {
            core.group_send_dropped
                .fetch_add(report.dropped_full as u64, Ordering::Relaxed);
            tracing::debug!(
                group,
                dropped = report.dropped_full,
                "group_send skipped full channels"
            );
        }
        if !lapsed.is_empty() {
            report.expired_members = lapsed.len();
            core.expired_memberships
                .fetch_add(lapsed.len() as u64, Ordering::Relaxed);
            self.remove_lapsed(group, &lapsed, now.saturating_sub(core.group_expiry));
        }
        Ok(report)
    }

    async fn flush(&self) -> Result<(), LayerError> {
        let mut registry = lock(&self.shared.registry);
        registry.groups.clear();
        for entry in registry.channels.values_mut() {
            entry.groups.clear();
            let inbox = &entry.inbox;
            inbox.clear(&mut lock(&inbox.state));
        }
        Ok(())
    }

    fn stats(&self) -> LayerStats {
        let core = &self.shared.core;
        LayerStats {
            group_send_dropped: core.group_send_dropped.load(Ordering::Relaxed),
            expired_messages: core.expired_messages.load(Ordering::Relaxed),
            expired_memberships: core.expired_memberships.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::{InMemoryChannelLayer, NEVER};
    use crate::layer::{ChannelLayer, LayerConfig};

    fn layer(expiry: Duration) -> InMemoryChannelLayer {
        InMemoryChannelLayer::new(LayerConfig::default().with_expiry(expiry))
    }

    /// A send made while its runtime shuts down (from a task's drop, as connection cleanup
    /// does) used to spawn the watchdog under the horizon's lock; the closed runtime drops the
    /// task inside `spawn`, the guard's drop took the same lock, and the thread hung.
    #[test]
    fn a_send_while_the_runtime_shuts_down_does_not_hang() {
        struct SendOnDrop(InMemoryChannelLayer, String);
        impl Drop for SendOnDrop {
            fn drop(&mut self) {
                let send = self.0.send(&self.1, Bytes::from_static(b"bye"));
                let _ = futures::executor::block_on(send);
            }
        }
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_time()
                .build()
                .unwrap();
            let layer = layer(Duration::from_secs(60));
            let sub = runtime.block_on(layer.new_channel("conn")).unwrap();
            let on_drop = SendOnDrop(layer.clone(), sub.name().to_owned());
            // Never finishes: dropped, and so sending, when the runtime shuts down.
            runtime.spawn(async move {
                let _on_drop = on_drop;
                std::future::pending::<()>().await;
            });
            drop(runtime);
            let _ = done.send(());
            drop(sub);
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the runtime's shutdown hung"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn layer_horizon_vouches_for_fresh_messages_and_lapses_without_sends() {
        let layer = layer(Duration::from_secs(60));
        let mut sub = layer.new_channel("conn").await.unwrap();
        layer
            .send(sub.name(), Bytes::from_static(b"fresh"))
            .await
            .unwrap();
        // The send made a horizon, so this receive needs no clock.
        assert_ne!(
            layer
                .shared
                .core
                .trusted_from
                .load(super::Ordering::Relaxed),
            NEVER
        );
        assert_eq!(sub.try_recv().as_deref(), Some(&b"fresh"[..]));

        // Nothing is sent after this one, so only the watchdog can tell receivers that time
        // went by.
        layer
            .send(sub.name(), Bytes::from_static(b"stale"))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(sub.try_recv(), None);
        assert_eq!(layer.stats().expired_messages, 1);
    }

    #[test]
    fn layer_works_and_expires_in_a_runtime_without_timers() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let layer = layer(Duration::from_millis(200));
            let mut sub = layer.new_channel("conn").await.unwrap();
            layer
                .send(sub.name(), Bytes::from_static(b"x"))
                .await
                .unwrap();
            // Let the watchdog run: it cannot sleep here (its panic, caught by Tokio, is
            // expected in this test's output), and the layer gives horizons up for good.
            tokio::task::yield_now().await;
            let core = &layer.shared.core;
            assert_eq!(core.trusted_from.load(super::Ordering::Relaxed), NEVER);
            let _ = sub.try_recv();
            layer
                .send(sub.name(), Bytes::from_static(b"a"))
                .await
                .unwrap();
            assert_eq!(core.trusted_from.load(super::Ordering::Relaxed), NEVER);
            assert_eq!(sub.try_recv().as_deref(), Some(&b"a"[..]));
            layer
                .send(sub.name(), Bytes::from_static(b"b"))
                .await
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(sub.try_recv(), None);
            assert!(layer.stats().expired_messages >= 1);
        });
    }

    #[test]
    fn layer_works_and_expires_outside_any_runtime() {
        futures::executor::block_on(async {
            let layer = layer(Duration::from_millis(50));
            let mut sub = layer.new_channel("conn").await.unwrap();
            layer
                .send(sub.name(), Bytes::from_static(b"a"))
                .await
                .unwrap();
            assert_eq!(sub.recv().await.as_deref(), Some(&b"a"[..]));
            layer
                .send(sub.name(), Bytes::from_static(b"b"))
                .await
                .unwrap();
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(sub.try_recv(), None);
            assert_eq!(layer.stats().expired_messages, 1);
        });
    }
}
