//! [`ChatConfig`]: every limit and default of the engine in one place, documented field by field.

use std::time::Duration;

/// The engine's limits. `ChatConfig::default()` is a sane production starting point.
///
/// ```
/// use chat_core::ChatConfig;
/// let config = ChatConfig { max_body_chars: 1_000, ..ChatConfig::default() };
/// assert_eq!(config.rate_per_second, 10.0);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ChatConfig {
    /// Longest message body, in characters (Unicode scalar values); longer is `too_large`.
    /// Default 4,096.
    pub max_body_chars: usize,
    /// Largest inbound frame, in bytes; a larger one closes the connection with 1009. Adapters
    /// also apply it at the WebSocket layer. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// Sustained inbound frames per second per connection (token bucket refill). Default 10.
    pub rate_per_second: f64,
    /// Inbound frames a connection may send in a burst (token bucket size). Default 30.
    pub rate_burst: u32,
    /// Consecutive rate-limited frames after which the connection is closed with 1008 as a
    /// flood. Default 100.
    pub flood_close_after: u32,
    /// Bytes on their way to one client that it has not taken yet (queued, or written but not
    /// flushed to its socket). A client over it is not reading and is closed with 1008; a
    /// client that reads stays under it however far behind the server itself falls, so
    /// overload raises latency and never cuts readers. Bounds a connection's memory. Default
    /// 1 MiB.
    pub outbound_budget: usize,
    /// How long one write to a client (a batch of frames, at most 64 KiB) may take; a client
    /// that takes nothing for this long is closed with 1008. Default 10 s.
    pub write_timeout: Duration,
    /// Channel-layer messages that may wait for one connection while it is busy (the capacity
    /// of its `conn.*` channel). A connection the server could not keep up with beyond it skips
    /// to the history store for the messages it missed, rather than being cut. Default 1,024.
    pub connection_backlog: usize,
    /// Messages a conversation may hold back while it waits for one that an earlier-numbered
    /// message overtook; beyond it they are read from the store instead. Default 64.
    pub reorder_window: usize,
    /// Rooms one connection may be in at once; one more is `too_many_rooms`. Default 100.
    pub max_rooms_per_connection: usize,
    /// Messages in `joined.history` when the join does not resume. Default 50.
    pub join_history: usize,
    /// Most messages a resuming join (`since`) returns; beyond it `more` is true. Default 500.
    pub resume_limit: usize,
    /// `history` page size when the client gives no `limit`. Default 50.
    pub history_default_limit: usize,
    /// Largest `history` page; larger limits are cut to it. Default 100.
    pub history_max_limit: usize,
    /// How long a connection waits for a message that another arrived ahead of (the sender of
    /// the one missing is still publishing it, or it was lost on the way) before it reads the
    /// gap from the history store. Shorter repairs losses sooner; longer spares the store when
    /// publishers are merely slow. Default 500 ms.
    pub gap_grace: Duration,
    /// How long this node's registry lease lasts; it is renewed every third of it. A node that
    /// dies without saying goodbye leaves `online` and its rooms within about this long (another
    /// node sweeps it). Default 30 s.
    pub node_lease: Duration,
    /// Stored messages whose publish failed and is being retried, at most; beyond it a message
    /// reaches clients only through gap repair and resume. Default 1,024.
    pub outbox_capacity: usize,
    /// How often a connection refreshes its channel-layer group memberships, so that long-lived
    /// connections outlast the layer's `group_expiry`. Default 1 hour.
    pub membership_refresh: Duration,
    /// Members above which a room is *large* (protocol 1.1): its members get no `member`,
    /// `typing` or room `read` events, but `member_count` at most every
    /// `member_count_interval`. Default 500.
    pub large_room: usize,
    /// Users in `joined.members` and in a `members` page when the client gives no `limit`.
    /// Default 200.
    pub members_page: usize,
    /// Largest `members` page; larger limits are cut to it. Default 1,000.
    pub members_max_page: usize,
    /// Users in one `online` reply; `who` `after` pages on. Default 1,000.
    pub online_page: usize,
    /// Shortest time between two `member_count` announcements of one room, across every node.
    /// Default 1 s.
    pub member_count_interval: Duration,
    /// How often the server pings each connection. Default 30 s.
    pub ping_interval: Duration,
    /// A connection from which nothing (no frame, no pong) arrived for this long is closed as
    /// dead, so half-open sockets do not stay "online". Default 75 s.
    pub idle_timeout: Duration,
    /// Connections this node serves at once; [`Chat::admit`](crate::Chat::admit) refuses more
    /// (HTTP 503). Default 100,000.
    pub max_connections: usize,
    /// Connections one user may hold on this node at once (tabs, devices); more are refused
    /// (HTTP 429). Default 32.
    pub max_connections_per_user: usize,
    /// Page origins allowed to open sockets besides the server's own (the request's `Host`),
    /// such as `https://app.example`; `"*"` allows any. Others are refused (HTTP 403).
    /// Default: none.
    pub allowed_origins: Vec<String>,
    /// How long a client cut for not reading (1008) keeps its socket: what was already on its
    /// way is finished, queued frames are dropped, the close frame follows, and what the client
    /// sends is read and discarded, so a client that reads again learns why it was cut. Default
    /// 10 s.
    pub slow_close_grace: Duration,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            max_body_chars: 4_096,
            max_frame_bytes: 64 * 1024,
            rate_per_second: 10.0,
            rate_burst: 30,
            flood_close_after: 100,
            outbound_budget: 1 << 20,
            write_timeout: Duration::from_secs(10),
            connection_backlog: 1_024,
            reorder_window: 64,
            max_rooms_per_connection: 100,
            join_history: 50,
            resume_limit: 500,
            history_default_limit: 50,
            history_max_limit: 100,
            gap_grace: Duration::from_millis(500),
            node_lease: Duration::from_secs(30),
            outbox_capacity: 1_024,
            membership_refresh: Duration::from_secs(3_600),
            large_room: 500,
            members_page: 200,
            members_max_page: 1_000,
            online_page: 1_000,
            member_count_interval: Duration::from_secs(1),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            max_connections: 100_000,
            max_connections_per_user: 32,
            allowed_origins: Vec::new(),
            slow_close_grace: Duration::from_secs(10),
        }
    }
}
