//! One connection: three cooperating loops in one task.
//!
//! - The **reader** decodes the client's frames, enforces the limits and runs each request.
//! - The **forwarder** drains the connection's channel-layer subscription (room messages, direct
//!   messages, presence, control) into the outbound queue, skipping what is not for it.
//! - The **writer** drains the outbound queue into the socket.
//!
//! The outbound queue is bounded (`outbound_queue`). Nothing ever waits for room in it: a full
//! queue means the client is not reading, and the connection is closed with 1008 rather than let
//! one slow reader hold memory or stall anyone else. A message the channel layer had to drop for
//! this connection closes it the same way, so a client never silently misses a message: it
//! reconnects and resumes with `since`.
//!
//! Joining is gap-free and duplicate-free: the connection subscribes to the room's group *before*
//! reading history, buffers the room's live frames until `joined` is queued, then releases only
//! those newer than the history it sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;

use super::envelope::{self, room_group, user_group, Envelope, Kind, PRESENCE_GROUP};
use super::rate::TokenBucket;
use super::{direct_view, room_view, ChatError, CloseReason, Inbound, Inner, Outbound, Session};
use crate::layer::Subscription;
use crate::names::{is_valid_room_name, is_valid_user_name};
use crate::protocol::{
    decode_with_ref, ClientFrame, ErrorCode, FrameError, InboxItem, MemberEvent, PresenceStatus,
    ServerFrame, Target,
};
use crate::store::Conversation;

/// How long the engine tries to deliver its close frame to a socket that may not be reading.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A room as this connection sees it.
enum RoomState {
    /// Subscribed, `joined` not yet sent: live frames wait here, with their message id (0 for
    /// frames that are not messages).
    Joining(Vec<(u64, Bytes)>),
    /// Live frames flow straight out.
    Joined,
}

/// What the reader and the forwarder share. Locked only for map edits and non-blocking queue
/// pushes, never across an await.
struct Shared {
    rooms: HashMap<String, RoomState>,
    /// Whether the connection asked for presence events (`who` with `watch: true`).
    watching: bool,
}

/// A refusal to report to the client as an `error` frame.
struct Refused {
    code: ErrorCode,
    message: String,
}

impl Refused {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<ChatError> for Refused {
    fn from(error: ChatError) -> Self {
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
    out: mpsc::Sender<Bytes>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
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
    let Session { user, room } = session;
    tracing::info!(user, ?room, "connection opened");
    let subscription = match setup(&inner, &user).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::error!(%error, user, "connection setup failed");
            close(&mut outbound, CloseReason::Unavailable).await;
            return CloseReason::Unavailable;
        }
    };
    let (out, mut queue) = mpsc::channel(inner.config.outbound_queue.max(1));
    let connection = Connection {
        inner: Arc::clone(&inner),
        channel: subscription.name().to_owned(),
        user,
        shared: Arc::new(Mutex::new(Shared {
            rooms: HashMap::new(),
            watching: false,
        })),
        out,
    };
    // If this future is dropped mid-way (the adapter's task aborted), the guard still takes the
    // user out of the registry, so nobody stays "online" forever.
    let mut guard = CleanupGuard {
        connection: Some(connection.cleanup_handle()),
    };
    if connection.registry_connect().await.is_err() {
        guard.finish().await;
        close(&mut outbound, CloseReason::Unavailable).await;
        return CloseReason::Unavailable;
    }

    let reason = {
        let welcome = ServerFrame::Welcome {
            user: connection.user.clone(),
        };
        let start = async {
            connection.push(welcome.encode())?;
            if let Some(room) = room {
                connection.respond(None, connection.join(room, None).await)?;
            }
            connection.read_loop(&mut inbound).await
        };
        let either = |reason: Result<CloseReason, CloseReason>| reason.unwrap_or_else(|r| r);
        tokio::select! {
            reason = start => either(reason),
            reason = connection.forward_loop(subscription) => either(reason),
            reason = write_loop(&mut queue, &mut outbound, inner.config.ping_interval) => reason,
        }
    };
    // The subscription is dropped by now, so the layer has already forgotten the channel.
    guard.finish().await;
    tracing::info!(user = connection.user, ?reason, "connection closed");
    if !matches!(
        reason,
        CloseReason::SlowConsumer | CloseReason::TransportError
    ) {
        // Frames already queued (the last error replies, say) go out before the close frame,
        // unless the client is the reason they could not.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain(&mut queue, &mut outbound)).await;
    }
    close(&mut outbound, reason).await;
    reason
}

async fn drain<O: Sink<Outbound> + Unpin>(queue: &mut mpsc::Receiver<Bytes>, outbound: &mut O) {
    while let Ok(frame) = queue.try_recv() {
        if outbound.feed(Outbound::Text(frame)).await.is_err() {
            return;
        }
    }
    let _ = outbound.flush().await;
}

async fn setup(inner: &Inner, user: &str) -> Result<Subscription, ChatError> {
    let subscription = inner.layer.new_channel("conn").await?;
    inner
        .layer
        .group_add(&user_group(user), subscription.name())
        .await?;
    Ok(subscription)
}

async fn close<O: Sink<Outbound> + Unpin>(outbound: &mut O, reason: CloseReason) {
    if let Some((code, text)) = reason.close_frame() {
        let frame = Outbound::Close { code, reason: text };
        // A client that is not reading may never take the close frame; give up after a moment.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, outbound.send(frame)).await;
    }
}

async fn write_loop<O: Sink<Outbound> + Unpin>(
    queue: &mut mpsc::Receiver<Bytes>,
    outbound: &mut O,
    ping_interval: std::time::Duration,
) -> CloseReason {
    let start = tokio::time::Instant::now() + ping_interval;
    let mut ping = tokio::time::interval_at(start, ping_interval);
    loop {
        let frame = tokio::select! {
            frame = queue.recv() => match frame {
                Some(frame) => Outbound::Text(frame),
                None => return CloseReason::TransportError,
            },
            _ = ping.tick() => Outbound::Ping,
        };
        if outbound.feed(frame).await.is_err() {
            return CloseReason::TransportError;
        }
        // Flush once per burst rather than once per frame.
        if queue.is_empty() && outbound.flush().await.is_err() {
            return CloseReason::TransportError;
        }
    }
}

/// What cleanup needs, detached from the connection so that a `Drop` can run it.
struct CleanupHandle {
    inner: Arc<Inner>,
    user: String,
    channel: String,
    shared: Arc<Mutex<Shared>>,
}

impl CleanupHandle {
    /// Leaves every room and goes offline, firing `member` and `presence` events on the edges.
    async fn run(self) {
        let _edges = self.inner.user_lock(&self.user).lock().await;
        let rooms: Vec<String> = lock(&self.shared)
            .rooms
            .drain()
            .map(|(room, _)| room)
            .collect();
        for room in rooms {
            leave_registry(&self.inner, &room, &self.user, &self.channel).await;
        }
        match self
            .inner
            .registry
            .disconnect(&self.user, &self.channel)
            .await
        {
            Ok(true) => {
                self.inner
                    .announce_presence(&self.user, PresenceStatus::Offline)
                    .await;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, user = self.user, "registry disconnect failed"),
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

/// Takes a connection out of a room in the registry and announces the user's leave on the edge.
async fn leave_registry(inner: &Inner, room: &str, user: &str, channel: &str) {
    match inner.registry.leave(room, user, channel).await {
        Ok(true) => {
            let frame = ServerFrame::Member {
                room: room.to_owned(),
                user: user.to_owned(),
                event: MemberEvent::Leave,
            };
            let envelope = Envelope::room(room, 0).wrap(&frame.encode());
            if let Err(error) = inner.layer.group_send(&room_group(room), envelope).await {
                tracing::warn!(%error, room, user, "leave event not delivered");
            }
        }
        Ok(false) => {}
        Err(error) => tracing::warn!(%error, room, user, "registry leave failed"),
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

impl Connection {
    fn cleanup_handle(&self) -> CleanupHandle {
        CleanupHandle {
            inner: Arc::clone(&self.inner),
            user: self.user.clone(),
            channel: self.channel.clone(),
            shared: Arc::clone(&self.shared),
        }
    }

    async fn registry_connect(&self) -> Result<(), ChatError> {
        let _edges = self.inner.user_lock(&self.user).lock().await;
        if self
            .inner
            .registry
            .connect(&self.user, &self.channel)
            .await?
        {
            self.inner
                .announce_presence(&self.user, PresenceStatus::Online)
                .await;
        }
        Ok(())
    }

    /// Queues a frame for the client; a full queue means the client stopped reading.
    fn push(&self, frame: Bytes) -> Result<(), CloseReason> {
        self.out.try_send(frame).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => CloseReason::SlowConsumer,
            mpsc::error::TrySendError::Closed(_) => CloseReason::TransportError,
        })
    }

    /// Sends a refusal as an `error` frame.
    fn respond(&self, reference: Option<String>, handled: Handled) -> Result<(), CloseReason> {
        match handled? {
            Ok(()) => Ok(()),
            Err(Refused { code, message }) => {
                self.push(ServerFrame::error(code, message, reference).encode())
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

    async fn read_loop<I>(&self, inbound: &mut I) -> Result<CloseReason, CloseReason>
    where
        I: Stream<Item = Inbound> + Unpin,
    {
        let config = &self.inner.config;
        let mut bucket = TokenBucket::new(config.rate_per_second, config.rate_burst);
        let mut strikes = 0u32;
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut refresh = tokio::time::interval_at(
            tokio::time::Instant::now() + config.membership_refresh,
            config.membership_refresh,
        );
        let mut last_heard = tokio::time::Instant::now();
        let idle_check = config
            .idle_timeout
            .min(config.ping_interval)
            .max(std::time::Duration::from_millis(10));
        let mut idle =
            tokio::time::interval_at(tokio::time::Instant::now() + idle_check, idle_check);
        loop {
            if *shutdown.borrow_and_update() {
                return Ok(CloseReason::Shutdown);
            }
            let frame = tokio::select! {
                frame = inbound.next() => frame,
                _ = shutdown.changed() => continue,
                _ = refresh.tick() => {
                    self.refresh_memberships().await;
                    continue;
                }
                _ = idle.tick() => {
                    if last_heard.elapsed() >= config.idle_timeout {
                        return Ok(CloseReason::PeerTimeout);
                    }
                    continue;
                }
            };
            last_heard = tokio::time::Instant::now();
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
            if !bucket.take() {
                strikes += 1;
                if strikes >= config.flood_close_after {
                    return Ok(CloseReason::Flood);
                }
                let reference = match &frame {
                    Ok((_, reference)) => reference.clone(),
                    Err(error) => error.reference.clone(),
                };
                let refusal = Refused::new(ErrorCode::RateLimited, "slow down");
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
                    let handled = self.handle(frame).await;
                    self.respond(reference, handled)?;
                }
            }
        }
    }

    async fn handle(&self, frame: ClientFrame) -> Handled {
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
            } => self.history(target, before, after, limit).await,
            ClientFrame::Inbox => self.inbox().await,
            ClientFrame::Who { watch } => self.who(watch).await,
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
            lock(&self.shared)
                .rooms
                .insert(room.clone(), RoomState::Joining(Vec::new()));
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
        let members = inner.registry.members(&room).await;
        let (page, members) = match (page, members) {
            (Ok(page), Ok(members)) => (page, members),
            (Err(error), _) => return self.join_failed(&room, error).await,
            (_, Err(error)) => return self.join_failed(&room, error).await,
        };
        let newest = page.messages.last().map_or(since.unwrap_or(0), |m| m.id);
        let joined = ServerFrame::Joined {
            room: room.clone(),
            members,
            history: page
                .messages
                .into_iter()
                .map(|m| room_view(&room, m))
                .collect(),
            more: page.more,
        };
        let joined = joined.encode();
        let mut shared = lock(&self.shared);
        self.push(joined)?;
        if let Some(state) = shared.rooms.get_mut(&room) {
            if let RoomState::Joining(waiting) = std::mem::replace(state, RoomState::Joined) {
                for (id, frame) in waiting {
                    if id == 0 || id > newest {
                        self.push(frame)?;
                    }
                }
            }
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
        let _edges = inner.user_lock(&self.user).lock().await;
        if inner.registry.join(room, &self.user, &self.channel).await? {
            let frame = ServerFrame::Member {
                room: room.to_owned(),
                user: self.user.clone(),
                event: MemberEvent::Join,
            };
            let envelope = Envelope::room(room, 0)
                .excluding_user(&self.user)
                .wrap(&frame.encode());
            inner.layer.group_send(&room_group(room), envelope).await?;
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
        if was_in {
            if let Err(error) = self
                .inner
                .layer
                .group_discard(&room_group(room), &self.channel)
                .await
            {
                tracing::warn!(%error, room, "group_discard failed");
            }
            let _edges = self.inner.user_lock(&self.user).lock().await;
            leave_registry(&self.inner, room, &self.user, &self.channel).await;
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
        let deliver = || async {
            let stored = inner.publish_room(&room, &self.user, &body).await?;
            Ok::<_, ChatError>(stored.id)
        };
        let id = match &reference {
            Some(reference) => inner.dedup.once(&self.user, reference, deliver).await,
            None => deliver().await,
        };
        self.ack(reference, id)
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
        let deliver = || async {
            let stored = inner
                .publish_direct(&self.user, &to, &body, &self.channel)
                .await?;
            Ok::<_, ChatError>(stored.id)
        };
        let id = match &reference {
            Some(reference) => inner.dedup.once(&self.user, reference, deliver).await,
            None => deliver().await,
        };
        self.ack(reference, id)
    }

    fn ack(&self, reference: Option<String>, id: Result<u64, ChatError>) -> Handled {
        match id {
            Ok(id) => self
                .push(ServerFrame::Ack { reference, id }.encode())
                .map(Ok),
            Err(error) if error.code() == ErrorCode::Unavailable => Ok(Err(unavailable(error))),
            Err(error) => Ok(Err(error.into())),
        }
    }

    async fn typing(&self, target: Target) -> Result<(), Refused> {
        let (group, envelope) = match &target {
            Target::Room(room) => {
                self.check_member(room)?;
                let frame = ServerFrame::Typing {
                    room: Some(room.clone()),
                    to: None,
                    from: self.user.clone(),
                };
                let envelope = Envelope::room(room, 0)
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
        let (group, conversation) = match &target {
            Target::Room(room) => {
                self.check_member(room)?;
                (room_group(room), Conversation::room(room.as_str()))
            }
            Target::User(with) => {
                check_peer(&self.user, with)?;
                (user_group(with), Conversation::direct(&self.user, with))
            }
        };
        let position = inner
            .store
            .mark_read(&self.user, &conversation, id)
            .await
            .map_err(unavailable)?;
        let envelope = match target {
            Target::Room(room) => {
                let frame = ServerFrame::Read {
                    room: Some(room.clone()),
                    with: None,
                    user: self.user.clone(),
                    id: position,
                };
                Envelope::room(&room, 0)
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
            room,
            with,
            messages,
            more: page.more,
        };
        self.push(frame.encode()).map(Ok)
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

    async fn who(&self, watch: Option<bool>) -> Handled {
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
        match self.inner.registry.online().await {
            Ok(users) => self.push(ServerFrame::Online { users }.encode()).map(Ok),
            Err(error) => Ok(Err(unavailable(error))),
        }
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
        mut subscription: Subscription,
    ) -> Result<CloseReason, CloseReason> {
        while let Some(message) = subscription.recv().await {
            if subscription.missed() > 0 {
                // The layer dropped a message meant for us: better to close and let the client
                // resume than to let it believe it saw everything.
                return Ok(CloseReason::SlowConsumer);
            }
            let Some(received) = envelope::unwrap(&message) else {
                tracing::warn!("ignoring a channel-layer message that is not an engine envelope");
                continue;
            };
            if received.exclude_user == self.user.as_bytes()
                || received.exclude_connection == self.channel.as_bytes()
            {
                continue;
            }
            match received.kind {
                Kind::Kick => return Ok(CloseReason::Disconnected),
                Kind::User | Kind::Presence => self.push(received.frame)?,
                Kind::Room => {
                    let Ok(room) = std::str::from_utf8(&received.room) else {
                        continue;
                    };
                    let mut shared = lock(&self.shared);
                    match shared.rooms.get_mut(room) {
                        // Not (or no longer) in this room: a late frame after `leave`.
                        None => {}
                        Some(RoomState::Joined) => self.push(received.frame)?,
                        Some(RoomState::Joining(waiting)) => {
                            if waiting.len() >= self.inner.config.outbound_queue {
                                return Err(CloseReason::SlowConsumer);
                            }
                            waiting.push((received.id, received.frame));
                        }
                    }
                }
            }
        }
        // The layer is gone: nothing more can reach this connection.
        Ok(CloseReason::Shutdown)
    }
}
