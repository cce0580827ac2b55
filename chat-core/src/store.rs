//! Message history: the [`HistoryStore`] trait and its bounded in-memory implementation.
//!
//! A conversation is a room or the pair of users of a direct conversation
//! ([`Conversation::direct`] orders the pair, so `(alice, bob)` and `(bob, alice)` are one
//! conversation). Appending assigns the conversation's next id, strictly increasing. The store
//! also keeps each user's read position per conversation, from which the inbox (direct
//! conversations with unread counts) is derived.
//!
//! The trait is async and fallible so that durable stores (SQL, Redis) fit behind it: a store
//! error reaches the client as `unavailable`, and the engine acknowledges nothing it could not
//! store.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

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
    /// Strictly increasing within its conversation.
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
    /// Milliseconds since the Unix epoch.
    pub ts: u64,
}

/// A page of history, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The messages, oldest first.
    pub messages: Vec<StoredMessage>,
    /// Whether more messages lie beyond the page in the direction asked.
    pub more: bool,
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

/// A store failure: the operation did not happen, and may be retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("history store unavailable: {0}")]
pub struct StoreError(pub String);

/// Where messages and read positions live.
///
/// Implementations must assign ids strictly increasing per conversation, and may retain only a
/// bounded number of messages per conversation (older ones then fall out of `before`/`after`).
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Stores a message and returns it with its id.
    async fn append(
        &self,
        conversation: &Conversation,
        message: NewMessage<'_>,
    ) -> Result<StoredMessage, StoreError>;

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
}

/// A [`HistoryStore`] in memory, keeping the newest `retention` messages of each conversation.
///
/// Everything is lost when the process ends; use a durable store where acknowledged messages must
/// survive a restart.
pub struct InMemoryHistoryStore {
    retention: usize,
    state: Mutex<StoreState>,
}

#[derive(Default)]
struct StoreState {
    /// Counts appends across all conversations, so "most recent" has no ties.
    appends: u64,
    logs: HashMap<Conversation, Log>,
    reads: HashMap<(String, Conversation), u64>,
    partners: HashMap<String, BTreeSet<String>>,
}

#[derive(Default)]
struct Log {
    last_id: u64,
    /// `appends` at this conversation's newest message.
    last_append: u64,
    messages: VecDeque<StoredMessage>,
}

impl Default for InMemoryHistoryStore {
    fn default() -> Self {
        Self::new(10_000)
    }
}

impl InMemoryHistoryStore {
    /// A store that keeps the newest `retention` (at least 1) messages per conversation.
    pub fn new(retention: usize) -> Self {
        Self {
            retention: retention.max(1),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, StoreState> {
        // Every critical section leaves the maps consistent, so a poisoned lock is still sound.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Index of the first message with an id greater than `id` (messages are sorted by id).
fn first_after(messages: &VecDeque<StoredMessage>, id: u64) -> usize {
    messages.partition_point(|m| m.id <= id)
}

#[async_trait]
impl HistoryStore for InMemoryHistoryStore {
    async fn append(
        &self,
        conversation: &Conversation,
        message: NewMessage<'_>,
    ) -> Result<StoredMessage, StoreError> {
        let mut state = self.state();
        if let Conversation::Direct(a, b) = conversation {
            state
                .partners
                .entry(a.clone())
                .or_default()
                .insert(b.clone());
            state
                .partners
                .entry(b.clone())
                .or_default()
                .insert(a.clone());
        }
        state.appends += 1;
        let append = state.appends;
        let log = state.logs.entry(conversation.clone()).or_default();
        log.last_id += 1;
        log.last_append = append;
        let stored = StoredMessage {
            id: log.last_id,
            from: message.from.to_owned(),
            to: message.to.map(str::to_owned),
            body: message.body.to_owned(),
            ts: message.ts,
        };
        log.messages.push_back(stored.clone());
        while log.messages.len() > self.retention {
            log.messages.pop_front();
        }
        Ok(stored)
    }

    async fn before(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let state = self.state();
        let Some(log) = state.logs.get(conversation) else {
            return Ok(Page::default());
        };
        let end = match before {
            Some(before) => first_after(&log.messages, before.saturating_sub(1)),
            None => log.messages.len(),
        };
        let start = end.saturating_sub(limit);
        Ok(Page {
            messages: log.messages.range(start..end).cloned().collect(),
            more: start > 0,
        })
    }

    async fn after(
        &self,
        conversation: &Conversation,
        after: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let state = self.state();
        let Some(log) = state.logs.get(conversation) else {
            return Ok(Page::default());
        };
        let start = first_after(&log.messages, after);
        let end = start.saturating_add(limit).min(log.messages.len());
        Ok(Page {
            messages: log.messages.range(start..end).cloned().collect(),
            more: end < log.messages.len(),
        })
    }

    async fn mark_read(
        &self,
        user: &str,
        conversation: &Conversation,
        id: u64,
    ) -> Result<u64, StoreError> {
        let mut state = self.state();
        let position = state
            .reads
            .entry((user.to_owned(), conversation.clone()))
            .or_default();
        *position = (*position).max(id);
        Ok(*position)
    }

    async fn inbox(&self, user: &str) -> Result<Vec<InboxEntry>, StoreError> {
        let state = self.state();
        let Some(partners) = state.partners.get(user) else {
            return Ok(Vec::new());
        };
        let mut entries: Vec<(u64, InboxEntry)> = partners
            .iter()
            .map(|partner| {
                let conversation = Conversation::direct(user, partner);
                let read_id = state
                    .reads
                    .get(&(user.to_owned(), conversation.clone()))
                    .copied()
                    .unwrap_or(0);
                let (last_id, recency, unread) = match state.logs.get(&conversation) {
                    Some(log) => {
                        let unread = log.messages.range(first_after(&log.messages, read_id)..);
                        let unread = unread.filter(|m| m.from != user).count() as u64;
                        (log.last_id, log.last_append, unread)
                    }
                    None => (0, 0, 0),
                };
                let entry = InboxEntry {
                    with: partner.clone(),
                    last_id,
                    read_id,
                    unread,
                };
                (recency, entry)
            })
            .collect();
        entries.sort_by(|(a, _), (b, _)| b.cmp(a));
        Ok(entries.into_iter().map(|(_, entry)| entry).collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn msg(from: &str, ts: u64) -> NewMessage<'_> {
        NewMessage {
            from,
            to: None,
            body: "b",
            ts,
        }
    }

    fn ids(page: &Page) -> Vec<u64> {
        page.messages.iter().map(|m| m.id).collect()
    }

    #[tokio::test]
    async fn ids_increase_per_conversation_and_pages_work() {
        let store = InMemoryHistoryStore::new(100);
        let room = Conversation::room("a");
        for i in 0..10 {
            assert_eq!(store.append(&room, msg("x", i)).await.unwrap().id, i + 1);
        }
        let other = Conversation::room("b");
        assert_eq!(store.append(&other, msg("x", 0)).await.unwrap().id, 1);

        let newest = store.before(&room, None, 3).await.unwrap();
        assert_eq!((ids(&newest), newest.more), (vec![8, 9, 10], true));
        let older = store.before(&room, Some(8), 3).await.unwrap();
        assert_eq!((ids(&older), older.more), (vec![5, 6, 7], true));
        let oldest = store.before(&room, Some(3), 5).await.unwrap();
        assert_eq!((ids(&oldest), oldest.more), (vec![1, 2], false));
        let resumed = store.after(&room, 6, 3).await.unwrap();
        assert_eq!((ids(&resumed), resumed.more), (vec![7, 8, 9], true));
        let tail = store.after(&room, 8, 3).await.unwrap();
        assert_eq!((ids(&tail), tail.more), (vec![9, 10], false));
        assert!(store.after(&room, 10, 3).await.unwrap().messages.is_empty());
        assert!(store
            .before(&Conversation::room("none"), None, 3)
            .await
            .unwrap()
            .messages
            .is_empty());
    }

    #[tokio::test]
    async fn retention_bounds_each_conversation_and_ids_keep_growing() {
        let store = InMemoryHistoryStore::new(3);
        let room = Conversation::room("a");
        for i in 0..10 {
            store.append(&room, msg("x", i)).await.unwrap();
        }
        let all = store.before(&room, None, 100).await.unwrap();
        assert_eq!((ids(&all), all.more), (vec![8, 9, 10], false));
        assert_eq!(store.append(&room, msg("x", 0)).await.unwrap().id, 11);
    }

    #[tokio::test]
    async fn inbox_counts_unread_from_the_partner_only() {
        let store = InMemoryHistoryStore::default();
        let ab = Conversation::direct("alice", "bob");
        let ac = Conversation::direct("carol", "alice");
        let dm = |from, to, ts| NewMessage {
            from,
            to: Some(to),
            body: "b",
            ts,
        };
        store.append(&ab, dm("bob", "alice", 1)).await.unwrap();
        store.append(&ab, dm("alice", "bob", 2)).await.unwrap();
        store.append(&ab, dm("bob", "alice", 3)).await.unwrap();
        // Same timestamp as the last one: recency must not depend on the clock's resolution.
        store.append(&ac, dm("carol", "alice", 3)).await.unwrap();

        let inbox = store.inbox("alice").await.unwrap();
        let view: Vec<_> = inbox
            .iter()
            .map(|e| (e.with.as_str(), e.last_id, e.read_id, e.unread))
            .collect();
        assert_eq!(view, vec![("carol", 1, 0, 1), ("bob", 3, 0, 2)]);

        assert_eq!(store.mark_read("alice", &ab, 1).await.unwrap(), 1);
        assert_eq!(
            store.mark_read("alice", &ab, 0).await.unwrap(),
            1,
            "positions only move forward"
        );
        let bob = store
            .inbox("alice")
            .await
            .unwrap()
            .into_iter()
            .find(|e| e.with == "bob")
            .unwrap();
        assert_eq!((bob.read_id, bob.unread), (1, 1));
        assert!(store.inbox("dave").await.unwrap().is_empty());
        assert_eq!(store.inbox("bob").await.unwrap()[0].unread, 1);
    }
}
