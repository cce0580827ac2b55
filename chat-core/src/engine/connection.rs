//! One connection: three cooperating loops in one task.
//!
//! - The **reader** decodes the client's frames, enforces the limits and runs each request.
//! - The **forwarder** drains the connection's channel-layer subscription (room messages, direct
//!   messages, presence, control) into the outbound queue, in order, skipping what is not for it,
//!   and repairs gaps from the history store.
//! - The **writer** drains the outbound queue into the socket.
//!
//! Every wake-up polls them in that order, so the writer takes in the same pass what the other
//! two queued, and their pushes wake nobody: a wake from inside the task would only send it to
//! the back of the run queue, a round of every busy connection later, once per delivery. A batch
//! of a single frame waits for the runtime's other ready tasks once (`yield_now`): immediate on an
//! idle server, a bigger write on a busy one.
//!
//! The outbound queue ([`Outgoing`]) is bounded in *bytes the client has not taken*
//! (`outbound_budget`), not in frames: a client that reads keeps it short however far behind the
//! server itself falls, so overload raises latency and never cuts a reader. Nothing ever waits
//! for room in it. A client over the budget, or one that takes nothing from a write for
//! `write_timeout`, is not reading and is closed with 1008. The writer takes many frames per
//! flush (up to 64 KiB), so a busy connection costs one syscall per batch, not per frame. When
//! the channel layer had to drop messages for this connection (its `conn.*` channel was full
//! because the server was behind), nothing is cut either: every conversation is checked against
//! the history store, which fills the gap in order.
//!
//! **Order.** Each conversation the connection takes part in (a joined room, a direct
//! conversation) has a [`Sequencer`]: messages leave in id order, each once, whatever order the
//! layer brought them in; a gap that does not close within `gap_grace` is read from the store
//! (paced by the room left in the outbound queue). When the channel layer says delivery to this
//! connection was interrupted (a Redis subscription was made again), every conversation is
//! checked against the store, since a loss with nothing after it would otherwise go unnoticed.
//! `member` and `presence` events pass an [`EdgeFilter`] so an older edge never lands after a
//! newer one. `docs/ordering.md` tells the whole story.
//!
//! **Joining** is gap-free and duplicate-free: the connection subscribes to the room's group
//! *before* reading history, buffers the room's live frames until `joined` is queued, then
//! delivers only what is newer than the history it sent. A resume (`since`) whose history was cut
//! by `resume_limit` leaves the room *behind*: its live messages are held back until the client
//! has paged to the end with `history` `after`, so the client's highest id seen stays safe to
//! resume from.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;

use super::envelope::{self, room_group, user_group, Envelope, Kind, Received, PRESENCE_GROUP};
use super::outgoing::{Outgoing, PushError};
use super::rate::TokenBucket;
use super::sequencer::{Frame, Sequencer};
use super::{
    ack_frame, direct_view, room_view, ChatError, CloseReason, Inbound, Inner, Outbound,
    Publication, Session,
};
use crate::layer::Subscription;
use crate::names::{is_valid_room_name, is_valid_user_name};
use crate::protocol::{
    decode_with_ref, ClientFrame, ErrorCode, FrameError, InboxItem, MemberEvent, PresenceStatus,
    ServerFrame, Target,
};
use crate::registry::{Departure, Page};
use crate::store::{Conversation, StoredMessage};

/// Most layer messages routed per wake-up, beyond the one that woke the connection.
const ROUTE_BATCH: usize = 63;
/// Most bytes one write to the socket takes (several frames, one flush).
const WRITE_BATCH: usize = 64 * 1024;
/// A batch of fewer frames than this (a single frame) waits once for the runtime's other ready
/// tasks, to take what arrives meanwhile.
const SMALL_BATCH: usize = 2;
/// How long the engine tries to deliver its close frame to a socket that may not be reading.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most messages one gap repair reads from the store at once.
const REPAIR_PAGE: usize = 100;
/// When the outbound queue is too full to repair into, look again after this long.
const REPAIR_PACE: Duration = Duration::from_millis(20);
/// After a store failure during a repair, try again after this long.
const REPAIR_RETRY: Duration = Duration::from_secs(1);

/// A conversation of this connection that may need a gap repaired.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Room(String),
    /// A direct conversation, by the other user.
    Direct(String),
    /// Delivery was interrupted: find the direct conversations with news in the store.
    Resync,
}

/// A room as this connection sees it.
struct Room {
    /// Tells a repair that finished after a leave and re-join that its room is another one now.
    generation: u64,
    /// The registry version of the member list sent in `joined`; older edges are old news.
    member_floor: u64,
    /// The member count as last heard (`joined`, `member_count`) and its registry version.
    /// Every crossing of `large_room` is announced with a count, so this says whether the room
    /// is large, which spares typing and read events there.
    count: usize,
    count_version: u64,
    /// More live frames arrived while joining than `connection_backlog`: the room is checked
    /// against the store once joined, instead of buffering without bound.
    overflowed: bool,
    state: RoomState,
}

enum RoomState {
    /// Subscribed, `joined` not yet sent: live frames wait here.
    Joining(Vec<Received>),
    /// Messages flow, in order.
    Live(Sequencer),
    /// A resume was cut short: messages wait in the store until the client pages to the end.
    Behind,
}

/// A direct conversation as this connection sees it.
struct Direct {
    sequencer: Sequencer,
    /// Ids this connection sent and was acked for, not yet passed: a repair must not echo them.
    own: BTreeSet<u64>,
}

/// What the reader and the forwarder share. Locked only for map edits and non-blocking queue
/// pushes, never across an await.
struct Shared {
    /// Boxed: a map allocates room for several entries at its first insert, and most
    /// connections are in one room. Looked up once per delivered room frame, so hashed with
    /// [`RoomHasher`] rather than SipHash (which was a tenth of the server's instructions).
    rooms: HashMap<String, Box<Room>, BuildHasherDefault<RoomHasher>>,
    directs: HashMap<String, Direct>,
    /// Each direct conversation's newest id when the connection opened: its order starts there.
    direct_heads: HashMap<String, u64>,
    /// Whether the connection asked for presence events (`who` with `watch: true`).
    watching: bool,
    /// The registry version of the last `online` reply; older presence edges are old news.
    presence_floor: u64,
    /// Conversations to look at for a gap, soonest first.
    repairs: BinaryHeap<Reverse<(Instant, Key)>>,
    generations: u64,
}

/// FxHash (rustc's own): a multiply and a rotate per 8 bytes. Not resistant to crafted
/// collisions, which is fine here: the keys are the rooms this connection joined itself, at most
/// `max_rooms_per_connection` of them, so colliding names slow down only their own connection.
#[derive(Default)]
struct RoomHasher(u64);

impl RoomHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for RoomHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.add(u64::from(byte));
    }

    fn finish(&self) -> u64 {
        // hashbrown takes its control bits from the top: mix the low bits up there.
        self.0.rotate_left(26)
    }
}

/// A refusal to report to the client as an `error` frame.
struct Refused {
    code: ErrorCode,
    message: String,
    /// For `rate_limited`: when the client may send again.
    retry_after_ms: Option<u64>,
}

impl Refused {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

impl From<ChatError> for Refused {
    fn from(error: ChatError) -> Self {
        if error.code() == ErrorCode::Unavailable {
            return unavailable(error);
        }
        Self::new(error.code(), error.to_string())
    }
}

/// The outcome of one request: `Ok` or a refusal for the client; a `CloseReason` ends the
/// connection.
type Handled = Result<Result<(), Refused>, CloseReason>;

struct Connection {
    inner: Arc<Inner>,
    user: String,
    channel: String,
    shared: Arc<Mutex<Shared>>,
    out: Arc<Outgoing>,
    /// Set by the reader when it scheduled a repair: the forwarder, polled after the reader in
    /// the same pass, looks at its repair schedule again. A flag rather than a `Notify`, whose
    /// waiter the forwarder would register and unregister on every delivery.
    repairs_changed: AtomicBool,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a new connection learns before it says `welcome`.
struct Opened {
    subscription: Subscription,
    direct_heads: HashMap<String, u64>,
    epoch: String,
}

/// A connection once it is set up: what its running phase borrows and its teardown consumes.
/// Kept apart from the phases' futures so that the one that lives as long as the connection
/// (running) holds references, not copies, and nothing the setup needed.
struct Started {
    connection: Connection,
    subscription: Subscription,
    lease_lost: tokio::sync::watch::Receiver<u64>,
    guard: CleanupGuard,
    /// The room to join first (`/ws/chat/{room}/`), taken by the running phase.
    room: Option<String>,
    /// Held until the connection is over: its place in the node's limits and gauge.
    _slot: super::admission::Slot,
}

pub(super) async fn serve<I, O>(
    inner: Arc<Inner>,
    session: Session,
    mut inbound: I,
    mut outbound: O,
) -> CloseReason
where
    I: Stream<Item = Inbound> + Send + Unpin,
    O: Sink<Outbound> + Send + Unpin,
{
    // Setup and teardown are boxed: an idle connection's future is its running phase alone,
    // with no room kept for the other two (an idle connection's memory is mostly this future).
    let mut started = match Box::pin(start(&inner, session)).await {
        Ok(started) => started,
        Err(reason) => {
            Box::pin(close(&mut outbound, reason)).await;
            inner.metrics.closed(reason);
            return reason;
        }
    };
    let reason = run(&mut started, &mut inbound, &mut outbound).await;
    Box::pin(finish(started, reason, &mut outbound)).await;
    reason
}

/// Sets the connection up: its channel, its registration (it is online from here on) and its
/// `welcome`, queued.
async fn start(inner: &Arc<Inner>, session: Session) -> Result<Started, CloseReason> {
    let Session { user, room, slot } = session;
    let slot = slot.unwrap_or_else(|| inner.admissions.take(&user, &inner.metrics));
    inner.metrics.connections_opened.increment(1);
    tracing::info!(user, ?room, "connection opened");
    let Opened {
        subscription,
        direct_heads,
        epoch,
    } = match open(inner, &user).await {
        Ok(opened) => opened,
        Err(error) => {
            tracing::error!(%error, user, "connection setup failed");
            return Err(CloseReason::Unavailable);
        }
    };
    let connection = Connection {
        inner: Arc::clone(inner),
        channel: subscription.name().to_owned(),
        user,
        shared: Arc::new(Mutex::new(Shared {
            rooms: HashMap::default(),
            directs: HashMap::new(),
            direct_heads,
            watching: false,
            presence_floor: 0,
            repairs: BinaryHeap::new(),
            generations: 0,
        })),
        out: Arc::new(Outgoing::new(inner.config.outbound_budget)),
        repairs_changed: AtomicBool::new(false),
    };
    // Subscribed before registering, so a lease loss announced from here on reaches us.
    let lease_lost = inner.lease_lost.subscribe();
    // If the connection's future is dropped mid-way (the adapter's task aborted), the guard
    // still takes the user out of the registry, so nobody stays "online" forever.
    let mut guard = CleanupGuard {
        connection: Some(connection.cleanup_handle()),
    };
    if connection.register().await.is_err() {
        guard.finish().await;
        return Err(CloseReason::Unavailable);
    }
    let welcome = ServerFrame::Welcome {
        user: connection.user.clone(),
        epoch,
    };
    if let Err(reason) = connection.push(welcome.encode()) {
        guard.finish().await;
        return Err(reason);
    }
    Ok(Started {
        connection,
        subscription,
        lease_lost,
        guard,
        room,
        _slot: slot,
    })
}

/// The connection's life: reader, forwarder and writer, until one of them ends it.
async fn run<I, O>(started: &mut Started, inbound: &mut I, outbound: &mut O) -> CloseReason
where
    I: Stream<Item = Inbound> + Send + Unpin,
    O: Sink<Outbound> + Send + Unpin,
{
    let Started {
        connection,
        subscription,
        lease_lost,
        room,
        ..
    } = started;
    let connection = &*connection;
    let read = async {
        if let Some(room) = room.take() {
            // Boxed, as every request is: an idle connection's future keeps no room for it.
            let joined = Box::pin(connection.join(room, None)).await;
            connection.respond(None, joined)?;
        }
        connection.read_loop(inbound, lease_lost).await
    };
    let either = |reason: Result<CloseReason, CloseReason>| reason.unwrap_or_else(|r| r);
    // In this order on every wake-up, so the writer sees what the reader and the forwarder
    // queued in the same pass: polled first, it would wait for them and be woken again, which
    // sends the task to the back of the run queue, a whole round of every busy connection
    // later, for each delivery.
    tokio::select! {
        biased;
        reason = read => either(reason),
        reason = connection.forward_loop(subscription) => either(reason),
        reason = write_loop(&connection.out, outbound, &connection.inner) => reason,
    }
}

/// Takes the connection out of the registry and closes the socket with `reason`.
async fn finish<O>(started: Started, reason: CloseReason, outbound: &mut O)
where
    O: Sink<Outbound> + Send + Unpin,
{
    let Started {
        connection,
        subscription,
        mut guard,
        ..
    } = started;
    // The layer forgets the channel before the registry forgets the connection.
    drop(subscription);
    guard.finish().await;
    tracing::info!(user = connection.user, ?reason, "connection closed");
    let out = &connection.out;
    if !matches!(
        reason,
        CloseReason::SlowConsumer | CloseReason::TransportError
    ) {
        // Frames already queued (the last error replies, say) go out before the close frame,
        // unless the client is the reason they could not.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain(out, outbound)).await;
    }
    out.close();
    close(outbound, reason).await;
    connection.inner.metrics.closed(reason);
}

async fn drain<O: Sink<Outbound> + Unpin>(out: &Outgoing, outbound: &mut O) {
    for frame in out.drain() {
        if outbound.feed(Outbound::Text(frame)).await.is_err() {
            return;
        }
    }
    let _ = outbound.flush().await;
}

/// Subscribes the new connection to its user's group, then reads where its direct
/// conversations stand: everything stored after that reaches it live.
async fn open(inner: &Arc<Inner>, user: &str) -> Result<Opened, ChatError> {
    inner.start().await?;
    let subscription = inner.layer.new_channel("conn").await?;
    inner
        .layer
        .group_add(&user_group(user), subscription.name())
        .await?;
    let direct_heads = inner.store.direct_heads(user).await?.into_iter().collect();
    let epoch = inner.store.epoch().await?;
    Ok(Opened {
        subscription,
        direct_heads,
        epoch,
    })
}

async fn close<O: Sink<Outbound> + Unpin>(outbound: &mut O, reason: CloseReason) {
    if let Some((code, text)) = reason.close_frame() {
        let frame = Outbound::Close { code, reason: text };
        if reason == CloseReason::SlowConsumer {
            // The client takes nothing: waiting for it would only hold the connection. The
            // frame is queued if the sink takes it now; the adapter may do better (ours drop
            // what is queued and keep the socket for `slow_close_grace`).
            let _ = futures::FutureExt::now_or_never(outbound.feed(frame));
            return;
        }
        // A client that is not reading may never take the close frame; give up after a moment.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, outbound.send(frame)).await;
    }
}

/// Writes what is queued to the socket in batches (several frames, one flush), and pings. A
/// batch the client takes nothing of for `write_timeout` closes the connection as too slow.
async fn write_loop<O: Sink<Outbound> + Unpin>(
    out: &Outgoing,
    outbound: &mut O,
    inner: &Inner,
) -> CloseReason {
    let config = &inner.config;
    let start = tokio::time::Instant::now() + config.ping_interval;
    let mut ping = tokio::time::interval_at(start, config.ping_interval);
    let mut batch = Vec::new();
    loop {
        let mut bytes = tokio::select! {
            bytes = out.take(&mut batch, WRITE_BATCH) => bytes,
            _ = ping.tick() => 0,
        };
        if bytes > 0 && batch.len() < SMALL_BATCH {
            // Let the rest of the runtime's ready tasks run once before writing: on an idle
            // server that is at once, and on a busy one more frames arrive meanwhile and go out
            // in the same write. (tokio runs a yielded task after the others already woken.)
            tokio::task::yield_now().await;
            bytes += out.take_now(&mut batch, WRITE_BATCH.saturating_sub(bytes));
        }
        inner.metrics.frames_out(&batch);
        let write = async {
            if batch.is_empty() {
                outbound.feed(Outbound::Ping).await?;
            }
            for frame in batch.drain(..) {
                outbound.feed(Outbound::Text(frame)).await?;
            }
            outbound.flush().await
        };
        // Most writes complete at once: a timer is armed only for one that has to wait, not for
        // every delivery.
        let written = {
            let mut write = std::pin::pin!(write);
            let first = futures::poll!(write.as_mut()).map(|result| result.is_ok());
            match first {
                Poll::Ready(ok) => Ok(ok),
                // Boxed with its timer: an idle connection's future keeps no room for either.
                Poll::Pending => Box::pin(tokio::time::timeout(config.write_timeout, write))
                    .await
                    .map(|result| result.is_ok()),
            }
        };
        match written {
            Ok(true) => out.written(bytes),
            Ok(false) => return CloseReason::TransportError,
            Err(_) => return CloseReason::SlowConsumer,
        }
        if batch.capacity() > 64 {
            // A burst is over: an idle connection keeps no room for the next one.
            batch = Vec::new();
        }
    }
}

/// What cleanup needs, detached from the connection so that a `Drop` can run it.
struct CleanupHandle {
    inner: Arc<Inner>,
    user: String,
    channel: String,
}

impl CleanupHandle {
    /// Takes the connection out of the registry and announces the edges that crossed. If the
    /// registry is unreachable, keeps trying in the background for a while: a membership left
    /// behind would show the user online until this node's lease ends.
    async fn run(self) {
        if self.try_once().await {
            return;
        }
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            while delay < self.inner.config.node_lease {
                tokio::time::sleep(delay).await;
                if self.try_once().await {
                    return;
                }
                delay *= 2;
            }
            tracing::error!(
                user = self.user,
                "could not take a closed connection out of the registry"
            );
        });
    }

    async fn try_once(&self) -> bool {
        match self
            .inner
            .registry
            .disconnect(&self.user, &self.channel)
            .await
        {
            Ok(departures) => {
                for departure in &departures {
                    self.inner.announce_departure(departure).await;
                }
                true
            }
            Err(error) => {
                tracing::warn!(%error, user = self.user, "registry disconnect failed");
                false
            }
        }
    }
}

struct CleanupGuard {
    connection: Option<CleanupHandle>,
}

impl CleanupGuard {
    async fn finish(&mut self) {
        if let Some(handle) = self.connection.take() {
            handle.run().await;
        }
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if let Some(handle) = self.connection.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(handle.run());
            }
        }
    }
}

fn check_room(room: &str) -> Result<(), Refused> {
    if is_valid_room_name(room) {
        Ok(())
    } else {
        Err(Refused::new(ErrorCode::InvalidName, "invalid room name"))
    }
}

fn check_peer(user: &str, peer: &str) -> Result<(), Refused> {
    if !is_valid_user_name(peer) {
        return Err(Refused::new(ErrorCode::InvalidName, "invalid user name"));
    }
    if peer == user {
        return Err(Refused::new(ErrorCode::InvalidTarget, "that is you"));
    }
    Ok(())
}

fn unavailable(error: impl std::fmt::Display) -> Refused {
    tracing::warn!(%error, "backend unavailable");
    Refused::new(ErrorCode::Unavailable, "temporarily unavailable, retry")
}

fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

impl Connection {
    fn cleanup_handle(&self) -> CleanupHandle {
        CleanupHandle {
            inner: Arc::clone(&self.inner),
            user: self.user.clone(),
            channel: self.channel.clone(),
        }
    }

    async fn register(&self) -> Result<(), ChatError> {
        let inner = &self.inner;
        let edge = inner
            .registry
            .connect(&inner.node, &self.user, &self.channel)
            .await?;
        if let Some(edge) = edge {
            inner
                .announce_presence(&self.user, PresenceStatus::Online, edge.version)
                .await;
        }
        Ok(())
    }

    /// Queues a frame for the client; a spent budget means the client stopped reading. Called
    /// only from the connection's task, whose writer runs after the reader and the forwarder in
    /// each pass (see `serve`), so it wakes nobody.
    fn push(&self, frame: Bytes) -> Result<(), CloseReason> {
        self.out.push_local(frame).map_err(|error| match error {
            PushError::Full => CloseReason::SlowConsumer,
            PushError::Closed => CloseReason::TransportError,
        })
    }

    /// Sends a refusal as an `error` frame.
    fn respond(&self, reference: Option<String>, handled: Handled) -> Result<(), CloseReason> {
        match handled? {
            Ok(()) => Ok(()),
            Err(Refused {
                code,
                message,
                retry_after_ms,
            }) => {
                self.inner.metrics.error(code);
                let frame = ServerFrame::Error {
                    code,
                    message,
                    reference,
                    retry_after_ms,
                };
                self.push(frame.encode())
            }
        }
    }

    fn is_in(&self, room: &str) -> bool {
        lock(&self.shared).rooms.contains_key(room)
    }

    fn check_member(&self, room: &str) -> Result<(), Refused> {
        check_room(room)?;
        if self.is_in(room) {
            Ok(())
        } else {
            Err(Refused::new(ErrorCode::NotMember, "join the room first"))
        }
    }

    /// Whether a layer message names this user or this connection as one to skip.
    fn excluded(&self, received: &Received) -> bool {
        received.exclude_user() == self.user.as_bytes()
            || received.exclude_connection() == self.channel.as_bytes()
    }

    fn sequencer_capacity(&self) -> usize {
        // Early arrivals waiting for a gap are bounded; anything beyond is read from the store.
        self.inner.config.reorder_window.max(1)
    }

    async fn read_loop<I>(
        &self,
        inbound: &mut I,
        lease_lost: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Result<CloseReason, CloseReason>
    where
        I: Stream<Item = Inbound> + Unpin,
    {
        let config = &self.inner.config;
        let mut bucket = TokenBucket::new(config.rate_per_second, config.rate_burst);
        let mut strikes = 0u32;
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut last_heard = Instant::now();
        let idle_check = config
            .idle_timeout
            .min(config.ping_interval)
            .max(Duration::from_millis(10));
        // One timer for both periodic duties (refreshing this node's memberships, checking
        // that the client is still heard from), set to whichever is due first: each timer is a
        // heap allocation that every idle connection would keep.
        let mut next_refresh = last_heard + config.membership_refresh;
        let mut next_idle_check = last_heard + idle_check;
        let mut timer = Box::pin(tokio::time::sleep_until(next_refresh.min(next_idle_check)));
        loop {
            if *shutdown.borrow_and_update() {
                return Ok(CloseReason::Shutdown);
            }
            let frame = tokio::select! {
                frame = inbound.next() => frame,
                _ = shutdown.changed() => continue,
                changed = lease_lost.changed() => {
                    if changed.is_ok() {
                        return Ok(CloseReason::LeaseLost);
                    }
                    continue;
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= next_idle_check {
                        if now.duration_since(last_heard) >= config.idle_timeout {
                            return Ok(CloseReason::PeerTimeout);
                        }
                        next_idle_check = now + idle_check;
                    }
                    if now >= next_refresh {
                        Box::pin(self.refresh_memberships()).await;
                        next_refresh = now + config.membership_refresh;
                    }
                    timer.as_mut().reset(next_refresh.min(next_idle_check));
                    continue;
                }
            };
            last_heard = Instant::now();
            let (text, binary) = match frame {
                None => return Ok(CloseReason::ClientClosed),
                Some(Inbound::Text(text)) => (text, false),
                Some(Inbound::Binary(data)) => (data, true),
                Some(Inbound::Pong) => continue,
                Some(Inbound::TooLarge) => return Ok(CloseReason::FrameTooLarge),
            };
            if text.len() > config.max_frame_bytes {
                return Ok(CloseReason::FrameTooLarge);
            }
            // Every frame costs a token, binary ones too, so no kind of frame floods for free.
            let frame = if binary {
                Err(FrameError {
                    code: ErrorCode::BadFrame,
                    message: "binary frames are not supported".into(),
                    reference: None,
                })
            } else {
                decode_with_ref(&text)
            };
            self.inner.metrics.frame_in(match &frame {
                Ok((frame, _)) => crate::metrics::in_type(frame),
                Err(_) => crate::metrics::IN_INVALID,
            });
            if !bucket.take() {
                strikes += 1;
                if strikes >= config.flood_close_after {
                    return Ok(CloseReason::Flood);
                }
                let reference = match &frame {
                    Ok((_, reference)) => reference.clone(),
                    Err(error) => error.reference.clone(),
                };
                // With when to try again, so a client can retry by itself rather than guess.
                let refusal = Refused {
                    retry_after_ms: bucket
                        .wait()
                        .map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)),
                    ..Refused::new(ErrorCode::RateLimited, "slow down")
                };
                self.respond(reference, Ok(Err(refusal)))?;
                continue;
            }
            strikes = 0;
            match frame {
                Err(error) => {
                    let refusal = Refused::new(error.code, error.message);
                    self.respond(error.reference, Ok(Err(refusal)))?;
                }
                Ok((frame, reference)) => {
                    // Boxed: a request's state (a join's history and member pages) lives on
                    // the heap while it runs, so an idle connection's task stays small.
                    let handled = Box::pin(self.handle(frame, reference.as_deref())).await;
                    self.respond(reference, handled)?;
                }
            }
        }
    }

    /// Runs one request; `reference` is its `ref`, which paged replies carry back.
    async fn handle(&self, frame: ClientFrame, reference: Option<&str>) -> Handled {
        match frame {
            ClientFrame::Join { room, since } => self.join(room, since).await,
            ClientFrame::Leave { room } => self.leave(room).await,
            ClientFrame::Send {
                room,
                body,
                reference,
            } => self.send(room, body, reference).await,
            ClientFrame::Direct {
                to,
                body,
                reference,
            } => self.direct(to, body, reference).await,
            ClientFrame::Typing { target } => Ok(self.typing(target).await),
            ClientFrame::Read { target, id } => Ok(self.read(target, id).await),
            ClientFrame::History {
                target,
                before,
                after,
                limit,
            } => self.history(target, before, after, limit, reference).await,
            ClientFrame::Inbox => self.inbox().await,
            ClientFrame::Who { watch, after } => self.who(watch, after).await,
            ClientFrame::Members { room, after, limit } => {
                self.members(room, after, limit, reference).await
            }
            ClientFrame::Ping => self.push(ServerFrame::Pong.encode()).map(Ok),
        }
    }

    async fn join(&self, room: String, since: Option<u64>) -> Handled {
        if let Err(refusal) = check_room(&room) {
            return Ok(Err(refusal));
        }
        let inner = &self.inner;
        if !self.is_in(&room) {
            let max = inner.config.max_rooms_per_connection;
            if lock(&self.shared).rooms.len() >= max {
                let message = format!("at most {max} rooms per connection");
                return Ok(Err(Refused::new(ErrorCode::TooManyRooms, message)));
            }
            if let Err(refusal) = inner.policy.allow_join(&self.user, &room).await {
                return Ok(Err(Refused::new(ErrorCode::Forbidden, refusal.0)));
            }
            // Subscribe first: from here on no live message of the room can be missed.
            {
                let mut shared = lock(&self.shared);
                shared.generations += 1;
                let room_state = Room {
                    generation: shared.generations,
                    member_floor: 0,
                    count: 0,
                    count_version: 0,
                    overflowed: false,
                    state: RoomState::Joining(Vec::new()),
                };
                shared.rooms.insert(room.clone(), Box::new(room_state));
            }
            if let Err(error) = self.enter(&room).await {
                self.leave_quietly(&room).await;
                return Ok(Err(unavailable(error)));
            }
        }
        let conversation = Conversation::room(room.as_str());
        let page = match since {
            Some(since) => {
                let limit = inner.config.resume_limit;
                inner.store.after(&conversation, since, limit).await
            }
            None => {
                let limit = inner.config.join_history;
                inner.store.before(&conversation, None, limit).await
            }
        };
        let first_page = Page::first(inner.config.members_page);
        let members = inner.registry.members_page(&room, first_page).await;
        let (page, members) = match (page, members) {
            (Ok(page), Ok(members)) => (page, members),
            (Err(error), _) => return self.join_failed(&room, error).await,
            (_, Err(error)) => return self.join_failed(&room, error).await,
        };
        let behind = since.is_some() && page.more;
        let joined = ServerFrame::Joined {
            room: room.clone(),
            members: members.users,
            member_count: members.count,
            history: page
                .messages
                .into_iter()
                .map(|m| room_view(&room, m))
                .collect(),
            more: page.more,
        };
        let joined = joined.encode();
        let capacity = self.sequencer_capacity();
        let now = Instant::now();
        let mut shared = lock(&self.shared);
        self.push(joined)?;
        let Some(entry) = shared.rooms.get_mut(&room) else {
            return Ok(Ok(()));
        };
        // Joining twice is harmless: an established room keeps its order.
        if let RoomState::Joining(waiting) = &mut entry.state {
            let waiting = std::mem::take(waiting);
            entry.member_floor = members.version;
            if members.version >= entry.count_version {
                entry.count = members.count;
                entry.count_version = members.version;
            }
            let overflowed = std::mem::take(&mut entry.overflowed);
            entry.state = if behind {
                RoomState::Behind
            } else {
                let mut sequencer = Sequencer::new(page.last_id, capacity);
                if overflowed {
                    // Frames were dropped while joining: read the store after the history.
                    let grace = inner.config.gap_grace;
                    sequencer.suspect(now.checked_sub(grace).unwrap_or(now));
                }
                RoomState::Live(sequencer)
            };
            if overflowed && !behind {
                shared.repairs.push(Reverse((now, Key::Room(room.clone()))));
            }
            for received in waiting {
                self.deliver_room(&mut shared, &room, received, now)?;
            }
            drop(shared);
            self.repairs_changed.store(true, Ordering::Relaxed);
        }
        Ok(Ok(()))
    }

    /// Subscribes to the room's group and registers the membership, announcing the user on the
    /// edge.
    async fn enter(&self, room: &str) -> Result<(), ChatError> {
        let inner = &self.inner;
        inner
            .layer
            .group_add(&room_group(room), &self.channel)
            .await?;
        if let Some(edge) = inner.registry.join(room, &self.user, &self.channel).await? {
            inner
                .announce_member(room, &self.user, MemberEvent::Join, edge)
                .await;
        }
        Ok(())
    }

    async fn join_failed(&self, room: &str, error: impl std::fmt::Display) -> Handled {
        self.leave_quietly(room).await;
        Ok(Err(unavailable(error)))
    }

    /// Leaves a room without replying; used by `leave` and to undo a failed join.
    async fn leave_quietly(&self, room: &str) {
        let was_in = lock(&self.shared).rooms.remove(room).is_some();
        if !was_in {
            return;
        }
        let inner = &self.inner;
        if let Err(error) = inner
            .layer
            .group_discard(&room_group(room), &self.channel)
            .await
        {
            tracing::warn!(%error, room, "group_discard failed");
        }
        match inner.registry.leave(room, &self.user, &self.channel).await {
            Ok(Some(edge)) => {
                let departure = Departure::Left {
                    room: room.to_owned(),
                    user: self.user.clone(),
                    version: edge.version,
                    count: edge.count,
                };
                inner.announce_departure(&departure).await;
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, room, "registry leave failed"),
        }
    }

    async fn leave(&self, room: String) -> Handled {
        if let Err(refusal) = check_room(&room) {
            return Ok(Err(refusal));
        }
        self.leave_quietly(&room).await;
        self.push(ServerFrame::Left { room }.encode()).map(Ok)
    }

    async fn send(&self, room: String, body: String, reference: Option<String>) -> Handled {
        if let Err(refusal) = self.check_member(&room) {
            return Ok(Err(refusal));
        }
        let inner = &self.inner;
        if let Err(error) = inner.check_body(&body) {
            return Ok(Err(error.into()));
        }
        if let Err(refusal) = inner.policy.allow_send(&self.user, &room, &body).await {
            return Ok(Err(Refused::new(ErrorCode::Forbidden, refusal.0)));
        }
        let reference = reference.as_deref();
        let published = inner
            .publish_room(&room, &self.user, &body, reference, Some(&self.out))
            .await;
        self.acknowledge(reference, published)
    }

    /// Acks a message once it is stored and published; one stored but not yet published is
    /// acked by the outbox when it gets through; one not stored is refused.
    fn acknowledge(
        &self,
        reference: Option<&str>,
        published: Result<Publication, ChatError>,
    ) -> Handled {
        match published {
            Ok(published) if published.delivered => self
                .push(ack_frame(reference, published.message.id))
                .map(Ok),
            Ok(_) => Ok(Ok(())),
            Err(error) => Ok(Err(error.into())),
        }
    }

    async fn direct(&self, to: String, body: String, reference: Option<String>) -> Handled {
        if let Err(refusal) = check_peer(&self.user, &to) {
            return Ok(Err(refusal));
        }
        let inner = &self.inner;
        if let Err(error) = inner.check_body(&body) {
            return Ok(Err(error.into()));
        }
        if let Err(refusal) = inner.policy.allow_direct(&self.user, &to, &body).await {
            return Ok(Err(Refused::new(ErrorCode::Forbidden, refusal.0)));
        }
        let reference = reference.as_deref();
        let stored = |id| self.own_direct(&to, id);
        let published = inner
            .publish_direct(
                &self.user,
                &to,
                &body,
                reference,
                Some((&self.channel, &self.out, &stored)),
            )
            .await;
        self.acknowledge(reference, published)
    }

    /// The newest id this connection knows of its direct conversation with `partner` (stored
    /// before it opened, delivered, or sent by it), or `None` when it knows of no message.
    fn newest_direct(&self, partner: &str) -> Option<u64> {
        let shared = lock(&self.shared);
        let known = match shared.directs.get(partner) {
            Some(direct) => {
                let own = direct.own.last().copied().unwrap_or(0);
                direct.sequencer.delivered().max(own)
            }
            None => shared.direct_heads.get(partner).copied().unwrap_or(0),
        };
        (known > 0).then_some(known)
    }

    /// Notes a direct message this connection sent, between storing and publishing it, so a
    /// gap repair never echoes it back (the sender gets an `ack` instead).
    fn own_direct(&self, partner: &str, id: u64) {
        let capacity = self.sequencer_capacity();
        let mut shared = lock(&self.shared);
        let Shared {
            directs,
            direct_heads,
            ..
        } = &mut *shared;
        if let Some(direct) = direct_entry(directs, direct_heads, partner, capacity) {
            if id > direct.sequencer.delivered() {
                direct.own.insert(id);
            }
        }
    }

    async fn typing(&self, target: Target) -> Result<(), Refused> {
        let (group, envelope) = match &target {
            Target::Room(room) => {
                self.check_member(room)?;
                if self.is_large(room) {
                    return Ok(());
                }
                let frame = ServerFrame::Typing {
                    room: Some(room.clone()),
                    to: None,
                    from: self.user.clone(),
                };
                let envelope = Envelope::room_event(room)
                    .excluding_user(&self.user)
                    .wrap(&frame.encode());
                (room_group(room), envelope)
            }
            Target::User(to) => {
                check_peer(&self.user, to)?;
                let frame = ServerFrame::Typing {
                    room: None,
                    to: Some(to.clone()),
                    from: self.user.clone(),
                };
                (
                    user_group(to),
                    Envelope::new(Kind::User).wrap(&frame.encode()),
                )
            }
        };
        self.inner
            .layer
            .group_send(&group, envelope)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn read(&self, target: Target, id: u64) -> Result<(), Refused> {
        let inner = &self.inner;
        let (group, conversation, id) = match &target {
            Target::Room(room) => {
                self.check_member(room)?;
                (room_group(room), Conversation::room(room.as_str()), id)
            }
            Target::User(with) => {
                check_peer(&self.user, with)?;
                // Only as far as the conversation goes: reading a conversation that does not
                // exist (a made-up user) stores nothing, and a position past its newest
                // message would hide the next ones as read.
                let Some(newest) = self.newest_direct(with) else {
                    return Ok(());
                };
                let id = id.min(newest);
                (user_group(with), Conversation::direct(&self.user, with), id)
            }
        };
        let position = inner
            .store
            .mark_read(&self.user, &conversation, id)
            .await
            .map_err(unavailable)?;
        let envelope = match target {
            Target::Room(room) => {
                if self.is_large(&room) {
                    // Stored, not announced (protocol 1.1).
                    return Ok(());
                }
                let frame = ServerFrame::Read {
                    room: Some(room.clone()),
                    with: None,
                    user: self.user.clone(),
                    id: position,
                };
                Envelope::room_event(&room)
                    .excluding_user(&self.user)
                    .wrap(&frame.encode())
            }
            Target::User(_) => {
                // The partner sees the conversation "with" the reader.
                let frame = ServerFrame::Read {
                    room: None,
                    with: Some(self.user.clone()),
                    user: self.user.clone(),
                    id: position,
                };
                Envelope::new(Kind::User).wrap(&frame.encode())
            }
        };
        inner
            .layer
            .group_send(&group, envelope)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn history(
        &self,
        target: Target,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u64>,
        reference: Option<&str>,
    ) -> Handled {
        let inner = &self.inner;
        let config = &inner.config;
        let limit = limit.map_or(config.history_default_limit, |l| {
            usize::try_from(l).unwrap_or(usize::MAX)
        });
        let limit = limit.clamp(1, config.history_max_limit.max(1));
        let conversation = match &target {
            Target::Room(room) => match self.check_member(room) {
                Ok(()) => Conversation::room(room.as_str()),
                Err(refusal) => return Ok(Err(refusal)),
            },
            Target::User(with) => match check_peer(&self.user, with) {
                // Always the caller's own conversation: nobody can read another pair's messages.
                Ok(()) => Conversation::direct(&self.user, with),
                Err(refusal) => return Ok(Err(refusal)),
            },
        };
        let page = match after {
            Some(after) => inner.store.after(&conversation, after, limit).await,
            None => inner.store.before(&conversation, before, limit).await,
        };
        let page = match page {
            Ok(page) => page,
            Err(error) => return Ok(Err(unavailable(error))),
        };
        let (more, last_id) = (page.more, page.last_id);
        let (room, with, messages) = match target {
            Target::Room(room) => {
                let messages = page
                    .messages
                    .into_iter()
                    .map(|m| room_view(&room, m))
                    .collect();
                (Some(room), None, messages)
            }
            Target::User(with) => {
                let messages = page.messages.into_iter().map(direct_view).collect();
                (None, Some(with), messages)
            }
        };
        let frame = ServerFrame::History {
            room: room.clone(),
            with,
            messages,
            more,
            reference: reference.map(str::to_owned),
        };
        let mut shared = lock(&self.shared);
        self.push(frame.encode())?;
        // A room left behind by a cut resume goes live once the client has paged to the end.
        if let (Some(room), Some(_), false) = (room, after, more) {
            if let Some(entry) = shared.rooms.get_mut(&room) {
                if matches!(entry.state, RoomState::Behind) {
                    let capacity = self.sequencer_capacity();
                    entry.state = RoomState::Live(Sequencer::new(last_id, capacity));
                }
            }
        }
        Ok(Ok(()))
    }

    async fn inbox(&self) -> Handled {
        let entries = match self.inner.store.inbox(&self.user).await {
            Ok(entries) => entries,
            Err(error) => return Ok(Err(unavailable(error))),
        };
        let conversations = entries
            .into_iter()
            .map(|e| InboxItem {
                with: e.with,
                last_id: e.last_id,
                read_id: e.read_id,
                unread: e.unread,
            })
            .collect();
        self.push(ServerFrame::Inbox { conversations }.encode())
            .map(Ok)
    }

    /// A page of a room's members (protocol 1.1).
    async fn members(
        &self,
        room: String,
        after: Option<String>,
        limit: Option<u64>,
        reference: Option<&str>,
    ) -> Handled {
        if let Err(refusal) = self.check_member(&room) {
            return Ok(Err(refusal));
        }
        let config = &self.inner.config;
        let limit = limit.map_or(config.members_page, |limit| {
            usize::try_from(limit).unwrap_or(usize::MAX)
        });
        let page = Page {
            after: after.as_deref(),
            limit: limit.clamp(1, config.members_max_page),
        };
        let listing = match self.inner.registry.members_page(&room, page).await {
            Ok(listing) => listing,
            Err(error) => return Ok(Err(unavailable(error))),
        };
        let frame = ServerFrame::Members {
            room,
            users: listing.users,
            count: listing.count,
            more: listing.more,
            reference: reference.map(str::to_owned),
        };
        self.push(frame.encode()).map(Ok)
    }

    /// Whether a joined room is large as this connection last heard.
    fn is_large(&self, room: &str) -> bool {
        let large = self.inner.config.large_room;
        lock(&self.shared)
            .rooms
            .get(room)
            .is_some_and(|entry| entry.count > large)
    }

    async fn who(&self, watch: Option<bool>, after: Option<String>) -> Handled {
        let layer = &self.inner.layer;
        let watched = match watch {
            Some(true) => layer.group_add(PRESENCE_GROUP, &self.channel).await,
            Some(false) => layer.group_discard(PRESENCE_GROUP, &self.channel).await,
            None => Ok(()),
        };
        if let Err(error) = watched {
            return Ok(Err(unavailable(error)));
        }
        if let Some(watch) = watch {
            lock(&self.shared).watching = watch;
        }
        let page = Page {
            after: after.as_deref(),
            limit: self.inner.config.online_page.max(1),
        };
        let online = match self.inner.registry.online_page(page).await {
            Ok(online) => online,
            Err(error) => return Ok(Err(unavailable(error))),
        };
        let mut shared = lock(&self.shared);
        self.push(
            ServerFrame::Online {
                users: online.users,
                count: online.count,
                more: online.more,
            }
            .encode(),
        )?;
        // Presence edges this reply already reflects are old news from now on.
        shared.presence_floor = shared.presence_floor.max(online.version);
        Ok(Ok(()))
    }

    /// Re-adds every group membership so that a long-lived connection outlasts `group_expiry`.
    async fn refresh_memberships(&self) {
        let mut groups: Vec<String> = {
            let shared = lock(&self.shared);
            let mut groups: Vec<String> =
                shared.rooms.keys().map(|room| room_group(room)).collect();
            if shared.watching {
                groups.push(PRESENCE_GROUP.to_owned());
            }
            groups
        };
        groups.push(user_group(&self.user));
        for group in groups {
            if let Err(error) = self.inner.layer.group_add(&group, &self.channel).await {
                tracing::warn!(%error, group, "membership refresh failed");
            }
        }
    }

    async fn forward_loop(
        &self,
        subscription: &mut Subscription,
    ) -> Result<CloseReason, CloseReason> {
        let mut interruptions = subscription.interruptions();
        let mut layer_missed = 0;
        loop {
            let next_repair = lock(&self.shared)
                .repairs
                .peek()
                .map(|Reverse((at, _))| *at);
            let repair_due = async {
                match next_repair {
                    // Boxed: repairs are rare, and an idle connection keeps no timer for them.
                    Some(at) => Box::pin(tokio::time::sleep_until(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = subscription.recv() => {
                    let Some(message) = message else {
                        // The layer is gone: nothing more can reach this connection.
                        return Ok(CloseReason::Shutdown);
                    };
                    {
                        let mut shared = lock(&self.shared);
                        let now = Instant::now();
                        if let Some(reason) = self.route(&mut shared, message, now)? {
                            return Ok(reason);
                        }
                        // Whatever else is queued, under the same lock and clock reading: under
                        // load, one wake-up routes many messages.
                        for _ in 0..ROUTE_BATCH {
                            let Some(message) = subscription.try_recv() else {
                                break;
                            };
                            if let Some(reason) = self.route(&mut shared, message, now)? {
                                return Ok(reason);
                            }
                        }
                    }
                    let missed = subscription.missed();
                    if missed > layer_missed {
                        self.inner.metrics.layer_dropped.increment(missed - layer_missed);
                        // The layer dropped messages meant for us: this connection fell behind
                        // the server (overload), not the client. Messages are in the store, so
                        // every conversation is checked against it, as after an interruption.
                        layer_missed = missed;
                        self.suspect_everything();
                    }
                }
                () = repair_due => Box::pin(self.repair_due()).await?,
                () = std::future::poll_fn(|_| {
                    if self.repairs_changed.swap(false, Ordering::Relaxed) {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                }) => {}
                () = interruptions.next() => self.suspect_everything(),
            }
        }
    }

    /// Delivers one layer message to this connection, or decides it is not for it. `Some` ends
    /// the connection.
    fn route(
        &self,
        shared: &mut Shared,
        message: Bytes,
        now: Instant,
    ) -> Result<Option<CloseReason>, CloseReason> {
        let Some(received) = envelope::unwrap(message) else {
            tracing::warn!("ignoring a channel-layer message that is not an engine envelope");
            return Ok(None);
        };
        match received.kind {
            Kind::Kick => return Ok(Some(CloseReason::Disconnected)),
            Kind::User => {
                if !self.excluded(&received) {
                    self.push(received.into_frame())?;
                }
            }
            Kind::Presence => {
                let Some(user) = text(received.second()) else {
                    return Ok(None);
                };
                let floor = shared.presence_floor;
                if shared.watching
                    && !self.excluded(&received)
                    && self
                        .inner
                        .admit_edge("", user, received.version, floor, now)
                {
                    self.push(received.into_frame())?;
                }
            }
            Kind::Room | Kind::Count => {
                let Some(room) = text(received.first()) else {
                    return Ok(None);
                };
                // One lookup per delivery: this is the hot path of every room message.
                let Shared { rooms, repairs, .. } = shared;
                match rooms.get_mut(room).map(|room| &mut **room) {
                    // Not (or no longer) in this room: a late frame after `leave`.
                    None => {}
                    Some(Room {
                        state: RoomState::Joining(waiting),
                        overflowed,
                        ..
                    }) => {
                        // The server is behind, not the client: drop and repair, never cut.
                        if waiting.len() < self.inner.config.connection_backlog {
                            waiting.push(received);
                        } else {
                            *overflowed = true;
                        }
                    }
                    Some(entry) => self.deliver_to(entry, repairs, received, now)?,
                }
            }
            Kind::Direct => self.deliver_direct(shared, received, now)?,
        }
        Ok(None)
    }

    /// A room frame for a room this connection has joined (or is done joining): a message goes
    /// through the room's sequencer, an edge through the edge filter, other events straight out.
    fn deliver_room(
        &self,
        shared: &mut Shared,
        room: &str,
        received: Received,
        now: Instant,
    ) -> Result<(), CloseReason> {
        let Shared { rooms, repairs, .. } = shared;
        match rooms.get_mut(room) {
            Some(entry) => self.deliver_to(entry, repairs, received, now),
            None => Ok(()),
        }
    }

    /// [`Connection::deliver_room`] once the room is found.
    fn deliver_to(
        &self,
        entry: &mut Room,
        repairs: &mut BinaryHeap<Reverse<(Instant, Key)>>,
        received: Received,
        now: Instant,
    ) -> Result<(), CloseReason> {
        let grace = self.inner.config.gap_grace;
        if received.kind == Kind::Count {
            // Counts travel by different paths too: an older one never replaces a newer one.
            if received.version < entry.count_version {
                return Ok(());
            }
            entry.count = usize::try_from(received.id).unwrap_or(usize::MAX);
            entry.count_version = received.version;
            return self.push(received.into_frame());
        }
        if received.id == 0 {
            if self.excluded(&received) {
                return Ok(());
            }
            if received.version > 0 {
                let (Some(room), Some(user)) = (text(received.first()), text(received.second()))
                else {
                    return Ok(());
                };
                let floor = entry.member_floor;
                if !self
                    .inner
                    .admit_edge(room, user, received.version, floor, now)
                {
                    return Ok(());
                }
            }
            return self.push(received.into_frame());
        }
        match &mut entry.state {
            RoomState::Live(sequencer) => {
                let opened =
                    sequencer.offer(received.id, Some(received.frame()), now, &mut |frame| {
                        self.push(frame)
                    })?;
                if opened {
                    if let Some(room) = text(received.first()) {
                        repairs.push(Reverse((now + grace, Key::Room(room.to_owned()))));
                    }
                }
            }
            // The client pages to these through `history`.
            RoomState::Behind => {}
            RoomState::Joining(waiting) => waiting.push(received),
        }
        Ok(())
    }

    /// A direct message for this user: in order within its conversation; the copy of a message
    /// this connection sent only moves the order along.
    fn deliver_direct(
        &self,
        shared: &mut Shared,
        received: Received,
        now: Instant,
    ) -> Result<(), CloseReason> {
        let (Some(from), Some(to)) = (text(received.first()), text(received.second())) else {
            return Ok(());
        };
        let partner = if from == self.user {
            to
        } else if to == self.user {
            from
        } else {
            return Ok(());
        };
        let frame = if received.exclude_connection() == self.channel.as_bytes() {
            None
        } else {
            Some(received.frame())
        };
        let capacity = self.sequencer_capacity();
        let grace = self.inner.config.gap_grace;
        let Shared {
            directs,
            direct_heads,
            repairs,
            ..
        } = shared;
        let Some(direct) = direct_entry(directs, direct_heads, partner, capacity) else {
            return Ok(());
        };
        let opened = direct
            .sequencer
            .offer(received.id, frame, now, &mut |frame| self.push(frame))?;
        if !direct.own.is_empty() {
            let delivered = direct.sequencer.delivered();
            direct.own.retain(|id| *id > delivered);
        }
        if opened {
            repairs.push(Reverse((now + grace, Key::Direct(partner.to_owned()))));
        }
        Ok(())
    }

    /// Delivery was interrupted: every live room is read from the store after what it delivered,
    /// and the direct conversations are looked up (a [`Key::Resync`]), all at once.
    fn suspect_everything(&self) {
        let now = Instant::now();
        let since = now.checked_sub(self.inner.config.gap_grace).unwrap_or(now);
        let mut shared = lock(&self.shared);
        let Shared { rooms, repairs, .. } = &mut *shared;
        for (name, room) in rooms.iter_mut() {
            if let RoomState::Live(sequencer) = &mut room.state {
                sequencer.suspect(since);
                repairs.push(Reverse((now, Key::Room(name.clone()))));
            }
        }
        // The direct conversations' news is found by the resync.
        repairs.push(Reverse((now, Key::Resync)));
        tracing::debug!(
            user = self.user,
            "delivery was interrupted; checking for missed messages"
        );
    }

    /// Finds the direct conversations with messages after what this connection delivered, and
    /// suspects them. Returns when to try again if the store failed.
    async fn resync_directs(&self) -> Option<Instant> {
        let heads = match self.inner.store.direct_heads(&self.user).await {
            Ok(heads) => heads,
            Err(error) => {
                tracing::warn!(%error, user = self.user, "resync failed; retrying");
                return Some(Instant::now() + REPAIR_RETRY);
            }
        };
        let now = Instant::now();
        let since = now.checked_sub(self.inner.config.gap_grace).unwrap_or(now);
        let capacity = self.sequencer_capacity();
        let mut shared = lock(&self.shared);
        let Shared {
            directs,
            direct_heads,
            repairs,
            ..
        } = &mut *shared;
        for (partner, head) in heads {
            let known = directs
                .get(&partner)
                .map(|direct| direct.sequencer.delivered())
                .or_else(|| direct_heads.get(&partner).copied())
                .unwrap_or(0);
            if head <= known {
                continue;
            }
            if let Some(direct) = direct_entry(directs, direct_heads, &partner, capacity) {
                direct.sequencer.suspect(since);
                repairs.push(Reverse((now, Key::Direct(partner))));
            }
        }
        None
    }

    /// Runs every repair whose time has come.
    async fn repair_due(&self) -> Result<(), CloseReason> {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut shared = lock(&self.shared);
            while let Some(Reverse((at, _))) = shared.repairs.peek() {
                if *at > now {
                    break;
                }
                if let Some(Reverse((_, key))) = shared.repairs.pop() {
                    if !due.contains(&key) {
                        due.push(key);
                    }
                }
            }
        }
        for key in due {
            let again = match &key {
                Key::Resync => self.resync_directs().await,
                _ => self.repair(&key).await?,
            };
            if let Some(at) = again {
                lock(&self.shared).repairs.push(Reverse((at, key)));
            }
        }
        Ok(())
    }

    /// Closes a gap from the store if it has waited its grace. Returns when to look again, if
    /// the gap is still open.
    async fn repair(&self, key: &Key) -> Result<Option<Instant>, CloseReason> {
        let inner = &self.inner;
        let grace = inner.config.gap_grace;
        let now = Instant::now();
        let (conversation, after, upto, generation) = {
            let mut shared = lock(&self.shared);
            let Some((sequencer, generation)) = sequencer_of(&mut shared, key) else {
                return Ok(None);
            };
            let Some(since) = sequencer.gap_since() else {
                return Ok(None);
            };
            if now < since + grace {
                return Ok(Some(since + grace));
            }
            let Some((after, upto)) = sequencer.missing() else {
                return Ok(None);
            };
            let conversation = match key {
                Key::Room(room) => Conversation::room(room.as_str()),
                Key::Direct(partner) => Conversation::direct(&self.user, partner),
                Key::Resync => return Ok(None),
            };
            (conversation, after, upto, generation)
        };
        // Pace the repair by what the client is taking: it only uses the free half of the
        // budget, leaving the rest for live traffic and replies.
        if self.out.pending() > inner.config.outbound_budget / 2 {
            return Ok(Some(now + REPAIR_PACE));
        }
        let wanted = usize::try_from(upto - after).unwrap_or(usize::MAX);
        let limit = wanted.min(REPAIR_PAGE);
        let page = match inner.store.after(&conversation, after, limit).await {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(%error, user = self.user, "gap repair failed; retrying");
                return Ok(Some(Instant::now() + REPAIR_RETRY));
            }
        };
        let now = Instant::now();
        let complete_through = (!page.more).then_some(page.last_id);
        let mut shared = lock(&self.shared);
        let own = match key {
            Key::Direct(partner) => shared
                .directs
                .get(partner)
                .map(|direct| direct.own.clone())
                .unwrap_or_default(),
            Key::Room(_) | Key::Resync => BTreeSet::new(),
        };
        let stored: Vec<(u64, Frame)> = page
            .messages
            .into_iter()
            .map(|message| (message.id, self.repaired_frame(key, &own, message)))
            .collect();
        let Some((sequencer, current)) = sequencer_of(&mut shared, key) else {
            return Ok(None);
        };
        if current != generation {
            return Ok(None);
        }
        sequencer.fill(stored, complete_through, now, &mut |frame| self.push(frame))?;
        let open = sequencer.gap_since().is_some();
        let delivered = sequencer.delivered();
        if let Key::Direct(partner) = key {
            if let Some(direct) = shared.directs.get_mut(partner) {
                direct.own.retain(|id| *id > delivered);
            }
        }
        tracing::debug!(
            user = self.user,
            ?key,
            after,
            delivered,
            "gap repaired from the store"
        );
        Ok(open.then(|| now + REPAIR_PACE))
    }

    /// The frame a stored message makes for this connection (`None`: its own direct message).
    fn repaired_frame(&self, key: &Key, own: &BTreeSet<u64>, message: StoredMessage) -> Frame {
        match key {
            Key::Room(room) => Some(room_view(room, message).encode()),
            Key::Resync => None,
            Key::Direct(_) => {
                if message.from == self.user && own.contains(&message.id) {
                    None
                } else {
                    Some(direct_view(message).encode())
                }
            }
        }
    }
}

/// The sequencer of a conversation and the generation of its room (0 for direct ones), if the
/// connection still has it live.
fn sequencer_of<'a>(shared: &'a mut Shared, key: &Key) -> Option<(&'a mut Sequencer, u64)> {
    match key {
        Key::Room(room) => match shared.rooms.get_mut(room).map(|room| &mut **room) {
            Some(Room {
                generation,
                state: RoomState::Live(sequencer),
                ..
            }) => Some((sequencer, *generation)),
            _ => None,
        },
        Key::Direct(partner) => shared
            .directs
            .get_mut(partner)
            .map(|direct| (&mut direct.sequencer, 0)),
        Key::Resync => None,
    }
}

/// The direct conversation with `partner`, its order starting where it stood when the
/// connection opened.
fn direct_entry<'a>(
    directs: &'a mut HashMap<String, Direct>,
    heads: &mut HashMap<String, u64>,
    partner: &str,
    capacity: usize,
) -> Option<&'a mut Direct> {
    // Looked up by `&str` first: the name is allocated once per conversation, not per message.
    if !directs.contains_key(partner) {
        let direct = Direct {
            sequencer: Sequencer::new(heads.remove(partner).unwrap_or(0), capacity),
            own: BTreeSet::new(),
        };
        directs.insert(partner.to_owned(), direct);
    }
    directs.get_mut(partner)
}
