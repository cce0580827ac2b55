//! Message history: the [`HistoryStore`] trait, the types it speaks, and its backends.
//!
//! A conversation is a room or the pair of users of a direct conversation
//! ([`Conversation::direct`] orders the pair, so `(alice, bob)` and `(bob, alice)` are one
//! conversation). The store is the one authority on message ids: it hands them out, it
//! de-duplicates retries, and it is where a connection that noticed a gap in what it was sent
//! reads the missing messages. That is why its contract (on [`HistoryStore`]) is strict about ids;
//! `docs/ordering.md` explains how the engine builds its delivery guarantees on it.
//!
//! The store also keeps each user's read position per conversation, from which the inbox (direct
//! conversations with unread counts) is derived.
//!
//! Backends: [`InMemoryHistoryStore`] for one process (or several nodes of a test inside one
//! process) and nothing to keep; `SqliteHistoryStore` (cargo feature `sqlite`), durable, for one
//! process; `PostgresHistoryStore` (feature `postgres`), durable, shared by many nodes; and
//! `RedisHistoryStore` (feature `redis`), shared, in Redis memory. Every backend passes the
//! conformance suite in `chat_core::store::conformance` (cargo feature `testing`), and the
//! durable ones its `survives_being_opened_again` check too.

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "testing")]
pub mod conformance;

use std::time::Duration;

use async_trait::async_trait;

#[cfg(feature = "postgres")]
pub use self::postgres::PostgresHistoryStore;
#[cfg(feature = "redis")]
pub use self::redis::RedisHistoryStore;
#[cfg(feature = "sqlite")]
pub use self::sqlite::SqliteHistoryStore;
pub use memory::InMemoryHistoryStore;

/// A room or a direct conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Conversation {
    /// A room, by name.
    Room(String),
    /// A direct conversation; build it with [`Conversation::direct`] so the pair is ordered.
    Direct(String, String),
}

impl Conversation {
    /// A room conversation.
    pub fn room(name: impl Into<String>) -> Self {
        Self::Room(name.into())
    }

    /// The direct conversation between two users, whichever order they are given in.
    ///
    /// ```
    /// use chat_core::store::Conversation;
    /// assert_eq!(Conversation::direct("bob", "alice"), Conversation::direct("alice", "bob"));
    /// ```
    pub fn direct(a: &str, b: &str) -> Self {
        if a <= b {
            Self::Direct(a.to_owned(), b.to_owned())
        } else {
            Self::Direct(b.to_owned(), a.to_owned())
        }
    }

    /// For a direct conversation that `user` is part of, the other user.
    pub fn partner_of(&self, user: &str) -> Option<&str> {
        match self {
            Self::Direct(a, b) if a == user => Some(b),
            Self::Direct(a, b) if b == user => Some(a),
            _ => None,
        }
    }
}

/// A message as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The conversation's next id when it was stored: 1, 2, 3, … per conversation.
    pub id: u64,
    /// The author.
    pub from: String,
    /// The recipient, for a direct message.
    pub to: Option<String>,
    /// The text.
    pub body: String,
    /// Milliseconds since the Unix epoch.
    pub ts: u64,
}

/// A message to append (the store assigns the id).
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    /// The author.
    pub from: &'a str,
    /// The recipient, for a direct message.
    pub to: Option<&'a str>,
    /// The text.
    pub body: &'a str,
    /// Milliseconds since the Unix epoch; also the clock of the de-duplication window.
    pub ts: u64,
    /// The client's retry key (`ref`), if it sent one.
    pub reference: Option<&'a str>,
}

/// What [`HistoryStore::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The stored message: the new one, or for a duplicate the one stored the first time.
    pub message: StoredMessage,
    /// `true` when `(conversation, from, reference)` was already stored within the
    /// de-duplication window, so nothing new was stored.
    pub duplicate: bool,
}

/// A page of history, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The messages, oldest first.
    pub messages: Vec<StoredMessage>,
    /// Whether more messages lie beyond the page in the direction asked.
    pub more: bool,
    /// The conversation's newest id when the page was read (0 when it has none): every id up to
    /// it is stored, so a reader that has seen the page knows where the live stream goes on.
    pub last_id: u64,
}

/// One direct conversation of a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// The other user.
    pub with: String,
    /// The newest message id.
    pub last_id: u64,
    /// The user's read position (0 if none).
    pub read_id: u64,
    /// Messages from the other user with an id above `read_id`.
    pub unread: u64,
}

/// Settings every backend honours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Messages kept per conversation; older ones fall out of history (ids are never reused).
    /// Default 10,000; `usize::MAX` for no limit by count (then an in-memory store grows with
    /// its history). At least 1.
    pub retention: usize,
    /// Messages older than this (by their `ts`) fall out of history too. Default: none.
    pub max_age: Option<Duration>,
    /// How long a `(conversation, user, ref)` is remembered for de-duplication, measured on the
    /// messages' `ts`. Default 10 minutes, the protocol's window; zero turns it off.
    pub dedup_window: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            retention: 10_000,
            max_age: None,
            dedup_window: Duration::from_secs(600),
        }
    }
}

/// A store failure: the operation did not happen, and may be retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("history store unavailable: {0}")]
pub struct StoreError(pub String);

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl StoreConfig {
    /// The oldest `ts` still kept, now (0 when age does not limit retention).
    pub(crate) fn oldest_kept_ts(&self) -> u64 {
        self.max_age.map_or(0, |age| {
            now_ms().saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
        })
    }
}

/// Where messages and read positions live, and where message ids come from.
///
/// # The id contract
///
/// The engine's ordering and resume guarantees rest on four rules; the conformance suite checks
/// each of them.
///
/// 1. **Dense ids.** A conversation's messages get ids 1, 2, 3, …: each append that stores
///    something gets the previous id plus one, whichever node appends. Retention may drop old
///    messages but never frees their ids.
/// 2. **Prefix visibility.** Once any caller has seen id `n` (from `append`, a page, or
///    `last_id`), every id below `n` of that conversation is readable too (unless retention
///    dropped it). A database must therefore commit a conversation's appends in id order, for
///    example by taking the id from a per-conversation counter row locked until commit; a
///    sequence shared by concurrent transactions does not give this.
/// 3. **Idempotent appends.** An append carrying a `reference` that the same user already stored
///    in the same conversation within [`StoreConfig::dedup_window`] (by `ts`) stores nothing and
///    returns the first message with `duplicate: true`, on every node and across restarts of a
///    durable store. Concurrent duplicates store exactly once.
/// 4. **Epoch.** [`epoch`](HistoryStore::epoch) names the store's lifetime: it changes exactly
///    when ids may start again (an in-memory store that was recreated), so a client that sees a
///    new epoch knows its remembered ids mean nothing any more.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Stores a message and returns it with its id, or the earlier copy of a retried one.
    async fn append(
        &self,
        conversation: &Conversation,
        message: NewMessage<'_>,
    ) -> Result<Appended, StoreError>;

    /// Up to `limit` messages with `id < before` (all, when `None`), the newest of them, oldest
    /// first; `more` when older ones remain.
    async fn before(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Up to `limit` messages with `id > after`, the oldest of them, oldest first; `more` when
    /// newer ones remain.
    async fn after(
        &self,
        conversation: &Conversation,
        after: u64,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Records that `user` has read `conversation` up to `id`. Positions only move forward; the
    /// position in force afterwards is returned.
    async fn mark_read(
        &self,
        user: &str,
        conversation: &Conversation,
        id: u64,
    ) -> Result<u64, StoreError>;

    /// `user`'s direct conversations, most recent first.
    async fn inbox(&self, user: &str) -> Result<Vec<InboxEntry>, StoreError>;

    /// The newest id of each of `user`'s direct conversations, in no particular order. The
    /// engine reads it when a connection opens, so it knows which direct messages are news to
    /// that connection. The default derives it from [`inbox`](Self::inbox); a backend may answer
    /// it more cheaply.
    async fn direct_heads(&self, user: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .inbox(user)
            .await?
            .into_iter()
            .map(|entry| (entry.with, entry.last_id))
            .collect())
    }

    /// The name of this store's lifetime (see rule 4 above); sent to clients in `welcome.epoch`.
    async fn epoch(&self) -> Result<String, StoreError>;

    /// Whether the store answers now: a round trip to its database, for readiness checks. The
    /// default asks for the [`epoch`](Self::epoch); a backend that keeps the epoch in memory
    /// must override it.
    async fn ping(&self) -> Result<(), StoreError> {
        self.epoch().await.map(drop)
    }
}
