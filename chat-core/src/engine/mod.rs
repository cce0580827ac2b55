//! The protocol engine and the host service's handle.
//!
//! [`Chat`] is the whole chat server minus the socket. An adapter authenticates the handshake with
//! [`Chat::authenticate`], maps the request path with [`route`], then hands the socket's frames to
//! [`Chat::serve`] as a `Stream` of [`Inbound`] and a `Sink` of [`Outbound`]; the engine does the
//! rest and returns why the connection ended.
//!
//! The same cheap, clonable `Chat` is the host service's API: publish into a room or to a user as
//! a named sender, list online users and room members, disconnect a user, shut down. All of it goes
//! through the same channel layer, registry and store as client traffic, so it spans nodes when
//! they do.
//!
//! # Example: embedding the engine with a custom authenticator
//!
//! ```
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use chat_core::auth::{AuthError, Authenticator, Handshake};
//! use chat_core::engine::{Chat, Inbound, Outbound, Session};
//! use futures::{SinkExt, StreamExt};
//!
//! /// Trusts a header set by the host's own reverse proxy.
//! struct ProxyHeader;
//!
//! #[async_trait]
//! impl Authenticator for ProxyHeader {
//!     async fn authenticate(&self, handshake: &Handshake) -> Result<String, AuthError> {
//!         handshake
//!             .headers
//!             .iter()
//!             .find(|(name, _)| name.eq_ignore_ascii_case("x-user"))
//!             .map(|(_, value)| value.clone())
//!             .ok_or(AuthError::Missing)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let chat = Chat::builder().authenticator(Arc::new(ProxyHeader)).build();
//!
//! // What an adapter does for each upgrade request:
//! let mut handshake = Handshake::default();
//! handshake.path = "/ws/chat/lobby/".into();
//! handshake.headers.push(("X-User".into(), "alice".into()));
//! let user = chat.authenticate(&handshake).await.expect("401 otherwise");
//! let room = chat_core::engine::route(&handshake.path).expect("404 otherwise");
//!
//! // In-memory "socket" for the example: the client's frames in, the server's frames out.
//! let (client_tx, inbound) = futures::channel::mpsc::channel::<Inbound>(8);
//! let (outbound, mut client_rx) = futures::channel::mpsc::channel::<Outbound>(64);
//! let server = tokio::spawn({
//!     let chat = chat.clone();
//!     async move { chat.serve(Session::new(user, room), inbound, outbound).await }
//! });
//!
//! // The host publishes as a bot; alice, auto-joined to the lobby, receives it.
//! let mut frames = Vec::new();
//! while frames.len() < 2 {
//!     frames.push(client_rx.next().await.unwrap()); // welcome, joined
//! }
//! chat.publish("lobby", "bot", "hello from the host").await.unwrap();
//! let Outbound::Text(frame) = client_rx.next().await.unwrap() else { panic!() };
//! assert!(std::str::from_utf8(&frame).unwrap().contains("hello from the host"));
//!
//! drop(client_tx); // the client goes away
//! server.await.unwrap();
//! # }
//! ```

mod admission;
mod connection;
mod edges;
mod envelope;
mod metered;
mod node;
mod outbox;
mod outgoing;
mod rate;
mod sequencer;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Sink, Stream};
use tokio::sync::{watch, OnceCell};

use crate::auth::{AuthError, Authenticator, Handshake};
use crate::config::ChatConfig;
use crate::layer::{ChannelLayer, InMemoryChannelLayer, LayerConfig, LayerError};
use crate::names::{is_valid_room_name, is_valid_user_name};
use crate::policy::{AllowAll, Policy};
use crate::protocol::{ErrorCode, MemberEvent, MessageView, PresenceStatus, ServerFrame};
use crate::registry::{Count, Departure, Edge, InMemoryRegistry, Page, Registry, RegistryError};
use crate::store::{
    Conversation, HistoryStore, InMemoryHistoryStore, NewMessage, StoreError, StoredMessage,
};

pub use admission::{origin_allowed, Denied};

use crate::metrics::{Metrics, RefusedBy};
use admission::{Admissions, Slot};
use envelope::{room_group, user_group, Envelope, Kind, PRESENCE_GROUP};
use outbox::{AckTo, Job, Outbox};
use outgoing::Outgoing;

/// How long each backend may take to answer a readiness check.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// A frame from the client, as the adapter received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A text frame (the engine checks it is UTF-8 JSON).
    Text(Bytes),
    /// A binary frame: answered with `bad_frame`.
    Binary(Bytes),
    /// A WebSocket pong (or ping): proof the peer is alive, no reply needed from the engine.
    Pong,
    /// The WebSocket layer refused a frame over its size limit: the engine closes with 1009.
    TooLarge,
}

/// What the engine asks the adapter to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A text frame; always valid UTF-8. The same `Bytes` goes to every recipient of a message,
    /// so an adapter should hand it to its WebSocket library without copying where it can.
    Text(Bytes),
    /// A WebSocket ping, every `ping_interval`; the peer's pong comes back as [`Inbound::Pong`].
    Ping,
    /// Close the WebSocket with this code and reason; nothing follows.
    Close {
        /// The WebSocket close code.
        code: u16,
        /// For people.
        reason: &'static str,
    },
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed the connection or the socket ended.
    ClientClosed,
    /// The client sent a frame over `max_frame_bytes` (close 1009).
    FrameTooLarge,
    /// The client did not read what it was sent and its outbound queue filled (close 1008).
    SlowConsumer,
    /// The client kept sending far past the rate limit (close 1008).
    Flood,
    /// The host disconnected the user (close 4001).
    Disconnected,
    /// The server is shutting down (close 1001).
    Shutdown,
    /// A backend failed while setting the connection up, or while keeping its messages in order
    /// (close 1011).
    Unavailable,
    /// This node's registry lease lapsed and other nodes removed its connections; the client
    /// should reconnect (close 1012).
    LeaseLost,
    /// Nothing came from the peer, not even a pong, for `idle_timeout` (close 1001).
    PeerTimeout,
    /// Writing to the socket failed.
    TransportError,
}

impl CloseReason {
    /// The close frame the server sends for this reason, if it sends one.
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        match self {
            Self::ClientClosed | Self::TransportError => None,
            Self::FrameTooLarge => Some((1009, "frame too large")),
            Self::SlowConsumer => Some((1008, "too slow to read")),
            Self::Flood => Some((1008, "flooding")),
            Self::Disconnected => Some((4001, "disconnected by the server")),
            Self::Shutdown => Some((1001, "server shutting down")),
            Self::Unavailable => Some((1011, "backend unavailable")),
            Self::LeaseLost => Some((1012, "node lost its registry lease, reconnect")),
            Self::PeerTimeout => Some((1001, "no response to ping")),
        }
    }
}

/// Where a WebSocket request path leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/ws`: no room yet.
    Lobby,
    /// `/ws/chat/{room}/`: join `room` at once.
    Room(String),
}

/// Maps a request path to its [`Route`]; `None` means "not a chat endpoint" (answer 404).
///
/// The room is returned as written; an invalid name is answered by the engine with an
/// `invalid_name` error frame after `welcome`.
///
/// ```
/// use chat_core::engine::{route, Route};
/// assert_eq!(route("/ws"), Some(Route::Lobby));
/// assert_eq!(route("/ws/chat/lobby/"), Some(Route::Room("lobby".into())));
/// assert_eq!(route("/ws/chat/lobby"), Some(Route::Room("lobby".into())));
/// assert_eq!(route("/elsewhere"), None);
/// ```
pub fn route(path: &str) -> Option<Route> {
    let path = path.strip_suffix('/').unwrap_or(path);
    if path == "/ws" {
        return Some(Route::Lobby);
    }
    let room = path.strip_prefix("/ws/chat/")?;
    (!room.is_empty() && !room.contains('/')).then(|| Route::Room(room.to_owned()))
}

/// Who a connection is and where it starts.
///
/// [`Chat::admit`] makes one that holds the connection's place in the node's limits;
/// [`Session::new`] makes one for a connection the host vouches for itself (it still counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The authenticated user.
    pub user: String,
    /// The room to join at once (from `/ws/chat/{room}/`).
    pub room: Option<String>,
    slot: Option<Slot>,
}

impl Session {
    /// A session for `user` starting at `route`.
    pub fn new(user: impl Into<String>, route: Route) -> Self {
        Self {
            user: user.into(),
            room: match route {
                Route::Lobby => None,
                Route::Room(room) => Some(room),
            },
            slot: None,
        }
    }
}

/// A host API call that could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// A room or user name outside the naming rules.
    #[error("invalid name {0:?}")]
    InvalidName(String),
    /// The recipient of a direct message is its sender.
    #[error("a user cannot message themselves")]
    InvalidTarget,
    /// An empty body.
    #[error("empty body")]
    EmptyBody,
    /// A body holding U+0000, which no store keeps faithfully (PostgreSQL refuses it).
    #[error("body contains a NUL character")]
    NulInBody,
    /// A body over `max_body_chars`.
    #[error("body longer than {0} characters")]
    BodyTooLarge(usize),
    /// The history store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The channel layer failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl ChatError {
    /// The protocol error code a client sees for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidName(_) => ErrorCode::InvalidName,
            Self::InvalidTarget => ErrorCode::InvalidTarget,
            Self::EmptyBody | Self::NulInBody => ErrorCode::BadFrame,
            Self::BodyTooLarge(_) => ErrorCode::TooLarge,
            Self::Store(_) | Self::Layer(_) | Self::Registry(_) => ErrorCode::Unavailable,
        }
    }
}

/// Refuses every handshake: the default until the host picks an authenticator, so that a
/// forgotten setting fails closed.
struct NoAuthenticator;

#[async_trait::async_trait]
impl Authenticator for NoAuthenticator {
    async fn authenticate(&self, _: &Handshake) -> Result<String, AuthError> {
        Err(AuthError::Invalid("no authenticator configured".into()))
    }
}

/// Builds a [`Chat`]; every part defaults to its in-memory version, except authentication, which
/// refuses everyone until set.
pub struct ChatBuilder {
    layer: Option<Arc<dyn ChannelLayer>>,
    registry: Arc<dyn Registry>,
    store: Arc<dyn HistoryStore>,
    policy: Arc<dyn Policy>,
    authenticator: Arc<dyn Authenticator>,
    config: ChatConfig,
}

impl Default for ChatBuilder {
    fn default() -> Self {
        Self {
            layer: None,
            registry: Arc::new(InMemoryRegistry::default()),
            store: Arc::new(InMemoryHistoryStore::default()),
            policy: Arc::new(AllowAll),
            authenticator: Arc::new(NoAuthenticator),
            config: ChatConfig::default(),
        }
    }
}

impl fmt::Debug for ChatBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ChatBuilder {
    /// The channel layer connections talk through. Nodes of one deployment share it.
    ///
    /// The engine names each connection's channel `conn.*`; give those channels a capacity of at
    /// least [`ChatConfig::connection_backlog`] (`LayerConfig::with_channel_capacity("conn.*", n)`),
    /// or a connection behind by more than the layer's capacity reads what it missed from the
    /// store sooner than it needs to. The default in-memory layer is set up so.
    pub fn layer(mut self, layer: Arc<dyn ChannelLayer>) -> Self {
        self.layer = Some(layer);
        self
    }

    /// The room and presence registry. Nodes of one deployment share it.
    pub fn registry(mut self, registry: Arc<dyn Registry>) -> Self {
        self.registry = registry;
        self
    }

    /// The history store, which also hands out message ids. Nodes of one deployment share it.
    pub fn store(mut self, store: Arc<dyn HistoryStore>) -> Self {
        self.store = store;
        self
    }

    /// The host's permission policy.
    pub fn policy(mut self, policy: Arc<dyn Policy>) -> Self {
        self.policy = policy;
        self
    }

    /// How handshakes are authenticated.
    pub fn authenticator(mut self, authenticator: Arc<dyn Authenticator>) -> Self {
        self.authenticator = authenticator;
        self
    }

    /// The engine's limits.
    pub fn config(mut self, config: ChatConfig) -> Self {
        self.config = config;
        self
    }

    /// The chat server. Its background work (the registry lease, sweeping up after dead nodes,
    /// retrying failed publishes) starts with the first connection.
    pub fn build(self) -> Chat {
        let (shutdown, _) = watch::channel(false);
        let (lease_lost, _) = watch::channel(0);
        let layer = self.layer.unwrap_or_else(|| {
            let capacity = self.config.connection_backlog;
            let config = LayerConfig::default().with_channel_capacity("conn.*", capacity);
            Arc::new(InMemoryChannelLayer::new(config))
        });
        let metrics = Metrics::new();
        let layer: Arc<dyn ChannelLayer> = Arc::new(metered::MeteredLayer::new(layer));
        let store: Arc<dyn HistoryStore> = Arc::new(metered::MeteredStore::new(self.store));
        Chat {
            inner: Arc::new(Inner {
                layer,
                registry: self.registry,
                store,
                policy: self.policy,
                authenticator: self.authenticator,
                node: crate::layer::unique_channel_name("node"),
                admissions: Arc::default(),
                metrics,
                outbox: Outbox::new(self.config.outbox_capacity),
                config: self.config,
                shutdown,
                lease_lost,
                started: OnceCell::new(),
                edges: Mutex::default(),
            }),
        }
    }
}

/// The chat server and the host's handle to it. Cheap to clone; clones share everything.
///
/// One `Chat` is one node. Several nodes (in one process or many) that share a channel layer, a
/// registry and a store behave as one server: `docs/ordering.md` says what holds between them.
#[derive(Clone)]
pub struct Chat {
    inner: Arc<Inner>,
}

impl fmt::Debug for Chat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chat")
            .field("node", &self.inner.node)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) layer: Arc<dyn ChannelLayer>,
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) store: Arc<dyn HistoryStore>,
    pub(crate) policy: Arc<dyn Policy>,
    authenticator: Arc<dyn Authenticator>,
    pub(crate) config: ChatConfig,
    /// This node's name in the registry.
    pub(crate) node: String,
    pub(crate) outbox: Outbox,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Bumped each time the node finds its lease was swept; connections opened before close.
    pub(crate) lease_lost: watch::Sender<u64>,
    /// Set once the node holds its lease and its background tasks run.
    started: OnceCell<()>,
    /// The newest `member` and `presence` edge per user that reached this node.
    edges: Mutex<edges::EdgeFilter>,
    /// The connections this node serves, for its limits.
    pub(crate) admissions: Arc<Admissions>,
    pub(crate) metrics: Metrics,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn room_view(room: &str, message: StoredMessage) -> MessageView {
    MessageView {
        kind: "message",
        room: Some(room.to_owned()),
        id: message.id,
        from: message.from,
        to: None,
        body: message.body,
        ts: message.ts,
    }
}

pub(crate) fn direct_view(message: StoredMessage) -> MessageView {
    MessageView {
        kind: "direct",
        room: None,
        id: message.id,
        from: message.from,
        to: message.to,
        body: message.body,
        ts: message.ts,
    }
}

/// The `ack` for a stored and published message.
pub(crate) fn ack_frame(reference: Option<&str>, id: u64) -> Bytes {
    ServerFrame::Ack {
        reference: reference.map(str::to_owned),
        id,
    }
    .encode()
}

/// The connection sending a direct message: its channel name, its outbound queue, and what to
/// call with the id once the message is stored.
pub(crate) type DirectSender<'a> = (&'a str, &'a Arc<Outgoing>, &'a (dyn Fn(u64) + Sync));

/// A message stored and handed to the layer, or stored and waiting in the outbox.
pub(crate) struct Publication {
    pub(crate) message: StoredMessage,
    /// `false` when the layer refused it and the outbox retries it (the `ack` comes then).
    pub(crate) delivered: bool,
}

impl Inner {
    /// Whether an edge is news to a connection whose snapshot is `floor` (see [`edges`]).
    pub(crate) fn admit_edge(
        &self,
        scope: &str,
        user: &str,
        version: u64,
        floor: u64,
        now: tokio::time::Instant,
    ) -> bool {
        let mut edges = self.edges.lock().unwrap_or_else(PoisonError::into_inner);
        edges.admit(scope, user, version, floor, now)
    }

    /// Forgets old edges and gives back the memory of a burst that is over: once a heartbeat.
    pub(crate) fn tidy_edges(&self, now: tokio::time::Instant) {
        let mut edges = self.edges.lock().unwrap_or_else(PoisonError::into_inner);
        edges.tidy(now);
    }

    /// Takes this node's registry lease and starts its background tasks, once.
    pub(crate) async fn start(self: &Arc<Self>) -> Result<(), ChatError> {
        self.started
            .get_or_try_init(|| async {
                self.registry
                    .heartbeat(&self.node, self.config.node_lease)
                    .await?;
                let period = (self.config.node_lease / 3).max(std::time::Duration::from_millis(10));
                tokio::spawn(node::run(Arc::downgrade(self), period));
                self.outbox.start(Arc::downgrade(self));
                Ok::<_, ChatError>(())
            })
            .await?;
        Ok(())
    }

    /// Checks a body against the protocol's rules.
    pub(crate) fn check_body(&self, body: &str) -> Result<(), ChatError> {
        if body.is_empty() {
            return Err(ChatError::EmptyBody);
        }
        if body.contains('\0') {
            return Err(ChatError::NulInBody);
        }
        // Count characters only when the byte length could exceed the limit.
        let max = self.config.max_body_chars;
        if body.len() > max && body.chars().count() > max {
            return Err(ChatError::BodyTooLarge(max));
        }
        Ok(())
    }

    /// Refuses a new message while the layer is failing, before anything is stored.
    fn check_layer(&self) -> Result<(), ChatError> {
        if self.outbox.failing() {
            return Err(LayerError::Unavailable(
                "the channel layer is failing; nothing was stored".into(),
            )
            .into());
        }
        Ok(())
    }

    /// Hands `sends` to the layer; what fails goes to the outbox, which sends `ack` once it is
    /// through. `true` when everything went out now.
    async fn publish(&self, sends: Vec<(String, Bytes)>, ack: Option<AckTo>) -> bool {
        let mut failed = Vec::new();
        for (group, message) in sends {
            if let Err(error) = self.layer.group_send(&group, message.clone()).await {
                tracing::warn!(%error, group, "publish failed; retrying in the background");
                failed.push((group, message));
            }
        }
        if failed.is_empty() {
            return true;
        }
        if !self.outbox.push(Job { sends: failed, ack }) {
            tracing::error!(
                "publish retry queue full: a stored message reaches clients only by gap repair and resume"
            );
        }
        false
    }

    /// Stores a room message (or finds the earlier copy of a retry), then publishes it to the
    /// room, encoded once for every recipient. `ack_to` is the sending connection, which gets
    /// its `ack` from the outbox if the publish has to be retried.
    pub(crate) async fn publish_room(
        &self,
        room: &str,
        from: &str,
        body: &str,
        reference: Option<&str>,
        ack_to: Option<&Arc<Outgoing>>,
    ) -> Result<Publication, ChatError> {
        self.check_layer()?;
        let message = NewMessage {
            from,
            to: None,
            body,
            ts: now_ms(),
            reference,
        };
        let stored = self
            .store
            .append(&Conversation::room(room), message)
            .await?
            .message;
        // A retry is published again: the first attempt may have died before publishing, and
        // connections drop a copy they already have.
        let frame = room_view(room, stored.clone()).encode();
        let envelope = Envelope::room_message(room, stored.id).wrap(&frame);
        let ack = ack_to.map(|connection| AckTo {
            connection: connection.clone(),
            frame: ack_frame(reference, stored.id),
        });
        let delivered = self.publish(vec![(room_group(room), envelope)], ack).await;
        Ok(Publication {
            message: stored,
            delivered,
        })
    }

    /// Stores a direct message, then delivers it to every connection of `to` and of `from`
    /// except `sender`, the connection that sent it, which gets an `ack` instead and is told the
    /// id between storing and publishing.
    pub(crate) async fn publish_direct(
        &self,
        from: &str,
        to: &str,
        body: &str,
        reference: Option<&str>,
        sender: Option<DirectSender<'_>>,
    ) -> Result<Publication, ChatError> {
        self.check_layer()?;
        let message = NewMessage {
            from,
            to: Some(to),
            body,
            ts: now_ms(),
            reference,
        };
        let stored = self
            .store
            .append(&Conversation::direct(from, to), message)
            .await?
            .message;
        if let Some((_, _, stored_as)) = sender {
            stored_as(stored.id);
        }
        let frame = direct_view(stored.clone()).encode();
        let envelope = Envelope::direct(from, to, stored.id);
        let to_them = envelope.wrap(&frame);
        let to_my_tabs = match sender {
            Some((connection, _, _)) => envelope.excluding_connection(connection).wrap(&frame),
            None => to_them.clone(),
        };
        let ack = sender.map(|(_, connection, _)| AckTo {
            connection: connection.clone(),
            frame: ack_frame(reference, stored.id),
        });
        let sends = vec![(user_group(to), to_them), (user_group(from), to_my_tabs)];
        let delivered = self.publish(sends, ack).await;
        Ok(Publication {
            message: stored,
            delivered,
        })
    }

    /// Tells presence watchers about `user`'s edge.
    pub(crate) async fn announce_presence(&self, user: &str, status: PresenceStatus, version: u64) {
        let frame = ServerFrame::Presence {
            user: user.to_owned(),
            status,
        }
        .encode();
        let envelope = Envelope::presence(user, version).wrap(&frame);
        if let Err(error) = self.layer.group_send(PRESENCE_GROUP, envelope).await {
            tracing::warn!(%error, user, "presence event not delivered");
        }
    }

    /// Tells `room` about `user`'s membership edge (a join is not told to the user's own tabs).
    pub(crate) async fn announce_member(
        self: &Arc<Self>,
        room: &str,
        user: &str,
        event: MemberEvent,
        edge: Edge,
    ) {
        let large = self.config.large_room;
        // A leave that brings a large room back to the threshold is a count too: it tells the
        // members the room is small again, and `member` events follow from the next edge on.
        if edge.count > large || (event == MemberEvent::Leave && edge.count == large) {
            self.member_count_changed(room).await;
            return;
        }
        let frame = ServerFrame::Member {
            room: room.to_owned(),
            user: user.to_owned(),
            event,
        }
        .encode();
        let mut envelope = Envelope::member_edge(room, user, edge.version);
        if event == MemberEvent::Join {
            envelope = envelope.excluding_user(user);
        }
        if let Err(error) = self
            .layer
            .group_send(&room_group(room), envelope.wrap(&frame))
            .await
        {
            tracing::warn!(%error, room, user, "member event not delivered");
        }
    }

    /// A large room's member count changed: announce it, unless an announcement is already
    /// pending on some node (it will include this change). The claim in the registry makes it
    /// at most one `member_count` per room per `member_count_interval` across every node, so a
    /// join storm of N costs O(N) registry calls plus one frame per member per interval.
    async fn member_count_changed(self: &Arc<Self>, room: &str) {
        let interval = self.config.member_count_interval;
        // Long enough to outlive one announcement; short enough that a node that died holding
        // the claim delays the next count by little.
        let ttl = interval * 2 + Duration::from_secs(1);
        match self.registry.claim_count(room, ttl).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(%error, room, "member count not announced");
                return;
            }
        }
        let inner = Arc::clone(self);
        let room = room.to_owned();
        tokio::spawn(async move { inner.announce_counts(&room, ttl).await });
    }

    /// Holds the room's count claim: announces the count now, then once per interval for as
    /// long as it keeps changing.
    async fn announce_counts(&self, room: &str, ttl: Duration) {
        let interval = self.config.member_count_interval;
        let mut announced = None;
        loop {
            let listing = self.registry.members_page(room, Page::first(0)).await;
            let current = match listing {
                Ok(listing) => Count {
                    count: listing.count,
                    version: listing.version,
                },
                Err(error) => {
                    tracing::warn!(%error, room, "member count not announced");
                    Count {
                        count: usize::MAX,
                        version: 0,
                    }
                }
            };
            if current.version > 0 && announced != Some(current.count) {
                let frame = ServerFrame::MemberCount {
                    room: room.to_owned(),
                    count: current.count,
                }
                .encode();
                let envelope = Envelope::member_count(room, current.count, current.version);
                if let Err(error) = self
                    .layer
                    .group_send(&room_group(room), envelope.wrap(&frame))
                    .await
                {
                    tracing::warn!(%error, room, "member count not delivered");
                }
                announced = Some(current.count);
            }
            tokio::time::sleep(interval).await;
            match self.registry.release_count(room).await {
                Ok(count) if Some(count.count) == announced => return,
                Ok(_) => {}
                Err(error) => {
                    // The claim lapses by itself; the next change announces again.
                    tracing::warn!(%error, room, "member count claim not released");
                    return;
                }
            }
            // Changed while we held the claim: take it again, unless another node just did.
            match self.registry.claim_count(room, ttl).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    }

    /// Announces an edge that a departure (a closed connection, a swept node) crossed.
    pub(crate) async fn announce_departure(self: &Arc<Self>, departure: &Departure) {
        match departure {
            Departure::Left {
                room,
                user,
                version,
                count,
            } => {
                let edge = Edge {
                    version: *version,
                    count: *count,
                };
                self.announce_member(room, user, MemberEvent::Leave, edge)
                    .await;
            }
            Departure::Offline { user, version } => {
                self.announce_presence(user, PresenceStatus::Offline, *version)
                    .await;
            }
        }
    }
}

fn check_room(room: &str) -> Result<(), ChatError> {
    if is_valid_room_name(room) {
        Ok(())
    } else {
        Err(ChatError::InvalidName(room.to_owned()))
    }
}

fn check_user(user: &str) -> Result<(), ChatError> {
    if is_valid_user_name(user) {
        Ok(())
    } else {
        Err(ChatError::InvalidName(user.to_owned()))
    }
}

impl Chat {
    /// A builder with in-memory defaults.
    pub fn builder() -> ChatBuilder {
        ChatBuilder::default()
    }

    /// The engine's limits.
    pub fn config(&self) -> &ChatConfig {
        &self.inner.config
    }

    /// This node's name in the registry (random, unique per `Chat`).
    pub fn node_id(&self) -> &str {
        &self.inner.node
    }

    /// The user a handshake proves, or why not (the adapter answers 401).
    pub async fn authenticate(&self, handshake: &Handshake) -> Result<String, AuthError> {
        self.inner.authenticator.authenticate(handshake).await
    }

    /// Decides whether an upgrade request may open a connection starting at `route`, before
    /// the upgrade, so that a refusal is an HTTP answer ([`Denied::status`]): its `Origin`
    /// ([`origin_allowed`] with [`ChatConfig::allowed_origins`]), its credentials (the
    /// authenticator), then this node's limits ([`ChatConfig::max_connections`],
    /// [`ChatConfig::max_connections_per_user`]). The session holds the connection's place in
    /// those limits until it and the connection served with it are gone.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use chat_core::auth::{DevAuthenticator, Handshake};
    /// use chat_core::engine::{Denied, Route};
    /// use chat_core::{Chat, ChatConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let chat = Chat::builder()
    ///     .authenticator(Arc::new(DevAuthenticator))
    ///     .config(ChatConfig { max_connections_per_user: 1, ..ChatConfig::default() })
    ///     .build();
    /// let request = Handshake::new("/ws").with_query("user=alice");
    /// let first = chat.admit(&request, Route::Lobby).await.unwrap();
    /// assert_eq!(first.user, "alice");
    /// assert_eq!(chat.admit(&request, Route::Lobby).await.unwrap_err(), Denied::UserFull);
    /// drop(first);
    /// assert!(chat.admit(&request, Route::Lobby).await.is_ok());
    ///
    /// let hijack = request.clone().with_header("Host", "chat.example").with_header("Origin", "https://evil.example");
    /// assert_eq!(chat.admit(&hijack, Route::Lobby).await.unwrap_err().status(), 403);
    /// # }
    /// ```
    pub async fn admit(&self, handshake: &Handshake, route: Route) -> Result<Session, Denied> {
        let inner = &self.inner;
        let config = &inner.config;
        if !origin_allowed(handshake, &config.allowed_origins) {
            inner.metrics.refused(RefusedBy::Origin);
            let origin = handshake.header("origin").unwrap_or_default();
            return Err(Denied::Origin(origin.to_owned()));
        }
        let user = self.authenticate(handshake).await.inspect_err(|_| {
            inner.metrics.refused(RefusedBy::Auth);
        })?;
        let slot = inner
            .admissions
            .try_take(
                &user,
                config.max_connections,
                config.max_connections_per_user,
                &inner.metrics,
            )
            .inspect_err(|denied| {
                inner.metrics.refused(match denied {
                    Denied::UserFull => RefusedBy::UserFull,
                    _ => RefusedBy::ServerFull,
                });
            })?;
        let mut session = Session::new(user, route);
        session.slot = Some(slot);
        Ok(session)
    }

    /// Whether this node can serve: the history store, the channel layer and the registry each
    /// answer within 2 s. For a readiness probe; the error says which failed.
    pub async fn ready(&self) -> Result<(), ChatError> {
        let inner = &self.inner;
        let timeout = |what: &str| format!("{what} did not answer within {READY_TIMEOUT:?}");
        tokio::time::timeout(READY_TIMEOUT, inner.store.ping())
            .await
            .map_err(|_| StoreError(timeout("the history store")))??;
        tokio::time::timeout(READY_TIMEOUT, inner.layer.ping())
            .await
            .map_err(|_| LayerError::Unavailable(timeout("the channel layer")))??;
        tokio::time::timeout(READY_TIMEOUT, inner.registry.ping())
            .await
            .map_err(|_| RegistryError(timeout("the registry")))??;
        Ok(())
    }

    /// Connections this node is serving now.
    pub fn connections(&self) -> usize {
        self.inner.admissions.total()
    }

    /// The channel layer's drop and expiry counters (for metrics).
    pub fn layer_stats(&self) -> crate::layer::LayerStats {
        self.inner.layer.stats()
    }

    /// Speaks the protocol with one client until the connection ends, and says why it ended.
    ///
    /// `inbound` is the client's frames (its end means the client left); `outbound` is where the
    /// engine writes frames and, for a server-side close, a final [`Outbound::Close`]. The
    /// returned future is `Send` and borrows nothing from `self`; spawn it per connection.
    // Not an `async fn`: a wrapper future would keep its own copies of `inbound` and `outbound`
    // beside the inner one's, in every idle connection's memory.
    pub fn serve<I, O>(
        &self,
        session: Session,
        inbound: I,
        outbound: O,
    ) -> impl Future<Output = CloseReason> + Send
    where
        I: Stream<Item = Inbound> + Send + Unpin,
        O: Sink<Outbound> + Send + Unpin,
    {
        connection::serve(Arc::clone(&self.inner), session, inbound, outbound)
    }

    /// [`serve`](Self::serve) for a WebSocket library's socket: one value that is both the stream
    /// of the library's messages and the sink for them, plus the two conversions between the
    /// library's message type and the engine's frames. `inbound` returns `None` to end the
    /// connection (a close frame, a broken socket). This is all an adapter needs after the
    /// handshake.
    pub fn serve_socket<S, M, E>(
        &self,
        session: Session,
        socket: S,
        inbound: fn(Result<M, E>) -> Option<Inbound>,
        outbound: fn(Outbound) -> M,
    ) -> impl Future<Output = CloseReason> + Send
    where
        S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Send,
        M: Send,
        E: Send,
    {
        use futures::{SinkExt, StreamExt};
        let (sink, stream) = socket.split();
        let frames = stream
            .map(inbound)
            .take_while(|frame| std::future::ready(frame.is_some()))
            .filter_map(std::future::ready);
        let writes = sink.with(move |frame| std::future::ready(Ok::<_, E>(outbound(frame))));
        self.serve(session, Box::pin(frames), Box::pin(writes))
    }

    /// Posts `body` to `room` as `from` (a bot, a system notice): stored, then delivered to every
    /// connection in the room like any message. If the channel layer fails after the message was
    /// stored, it is still returned: delivery is retried in the background.
    pub async fn publish(
        &self,
        room: &str,
        from: &str,
        body: &str,
    ) -> Result<StoredMessage, ChatError> {
        check_room(room)?;
        check_user(from)?;
        self.inner.check_body(body)?;
        self.inner.start().await?;
        let published = self
            .inner
            .publish_room(room, from, body, None, None)
            .await?;
        Ok(published.message)
    }

    /// Sends `body` privately from `from` to `to`: stored, then delivered to every connection of
    /// both users (retried in the background if the layer fails after storing).
    pub async fn send_direct(
        &self,
        from: &str,
        to: &str,
        body: &str,
    ) -> Result<StoredMessage, ChatError> {
        check_user(from)?;
        check_user(to)?;
        if from == to {
            return Err(ChatError::InvalidTarget);
        }
        self.inner.check_body(body)?;
        self.inner.start().await?;
        let published = self
            .inner
            .publish_direct(from, to, body, None, None)
            .await?;
        Ok(published.message)
    }

    /// Every user with at least one live connection on any node, sorted.
    pub async fn online_users(&self) -> Result<Vec<String>, ChatError> {
        Ok(self.inner.registry.online().await?.users)
    }

    /// The users in `room`, sorted.
    pub async fn room_members(&self, room: &str) -> Result<Vec<String>, ChatError> {
        check_room(room)?;
        Ok(self.inner.registry.members(room).await?.users)
    }

    /// Closes every connection of `user` (close code 4001), on every node.
    pub async fn disconnect_user(&self, user: &str) -> Result<(), ChatError> {
        check_user(user)?;
        let envelope = Envelope::new(Kind::Kick).wrap(b"");
        self.inner
            .layer
            .group_send(&user_group(user), envelope)
            .await?;
        Ok(())
    }

    /// Closes every connection this process serves with 1001; `serve` calls then return
    /// [`CloseReason::Shutdown`]. New calls to `serve` close at once.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }
}
