//! [`InMemoryHistoryStore`]: the history store for one process.
//!
//! One mutex guards everything. Every operation is a short critical section with no await inside,
//! which is also what makes the id contract hold: an append allocates the next id and makes the
//! message readable in one step, so ids are dense and visible in order.
//!
//! Memory is bounded: per conversation by `retention`, the de-duplication memory by its window
//! and a capacity, and the number of conversations (rooms and direct conversations, with their
//! read positions) by [`InMemoryHistoryStore::with_max_conversations`] (100,000 by default).
//! Past that, a message or read position for a conversation it does not hold yet fails with a
//! [`StoreError`] (clients see `unavailable`): forgetting a conversation instead would start its
//! ids again, which the id contract forbids.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::{
    Appended, Conversation, HistoryStore, InboxEntry, NewMessage, Page, StoreConfig, StoreError,
    StoredMessage,
};

/// A [`HistoryStore`] in memory.
///
/// Everything is lost when the process ends, and a new store has a new
/// [`epoch`](HistoryStore::epoch), so clients know the ids started again. Use a durable store
/// where acknowledged messages must survive a restart.
///
/// ```
/// use chat_core::store::{Conversation, HistoryStore, InMemoryHistoryStore, NewMessage};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::store::StoreError> {
/// let store = InMemoryHistoryStore::default();
/// let lobby = Conversation::room("lobby");
/// let hello = NewMessage { from: "alice", to: None, body: "hi", ts: 1, reference: Some("r1") };
/// assert_eq!(store.append(&lobby, hello).await?.message.id, 1);
/// // The same ref again is a retry: nothing new is stored.
/// let retry = store.append(&lobby, hello).await?;
/// assert!(retry.duplicate);
/// assert_eq!(retry.message.id, 1);
/// # Ok(())
/// # }
/// ```
pub struct InMemoryHistoryStore {
    config: StoreConfig,
    dedup_capacity: usize,
    max_conversations: usize,
    epoch: String,
    state: Mutex<StoreState>,
}

/// The key a retry is recognised by.
type RefKey = (Conversation, String, String);

#[derive(Default)]
struct StoreState {
    /// Counts appends across all conversations, so "most recent" has no ties.
    appends: u64,
    logs: HashMap<Conversation, Log>,
    partners: HashMap<String, BTreeSet<String>>,
    /// `(ts, id)` of the first message stored under each ref.
    refs: HashMap<RefKey, (u64, u64)>,
    /// The same keys in insertion order, for forgetting them when their window ends.
    ref_order: VecDeque<(u64, RefKey)>,
}

#[derive(Default)]
struct Log {
    last_id: u64,
    /// `appends` at this conversation's newest message.
    last_append: u64,
    messages: VecDeque<StoredMessage>,
    /// Each reader's position.
    reads: HashMap<String, u64>,
}

impl Default for InMemoryHistoryStore {
    fn default() -> Self {
        Self::with_config(StoreConfig::default())
    }
}

impl InMemoryHistoryStore {
    /// A store that keeps the newest `retention` (at least 1) messages per conversation, with
    /// the default de-duplication window.
    pub fn new(retention: usize) -> Self {
        Self::with_config(StoreConfig {
            retention,
            ..StoreConfig::default()
        })
    }

    /// A store with the given settings; it remembers at most 100,000 refs at once.
    pub fn with_config(config: StoreConfig) -> Self {
        Self {
            config: StoreConfig {
                retention: config.retention.max(1),
                ..config
            },
            dedup_capacity: 100_000,
            max_conversations: 100_000,
            epoch: crate::layer::unique_channel_name("mem"),
            state: Mutex::default(),
        }
    }

    /// Remember at most `capacity` refs at once; past it the oldest are forgotten before their
    /// window ends, so memory stays bounded under any load.
    pub fn with_dedup_capacity(mut self, capacity: usize) -> Self {
        self.dedup_capacity = capacity.max(1);
        self
    }

    /// Hold at most `max` conversations (at least 1); past it, messages and read positions
    /// for new conversations are refused.
    pub fn with_max_conversations(mut self, max: usize) -> Self {
        self.max_conversations = max.max(1);
        self
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

impl Log {
    /// Drops the oldest messages sent before `oldest_kept_ts` (a prefix: messages are in id
    /// order, which is time order within a clock's precision).
    fn forget_older_than(&mut self, oldest_kept_ts: u64) {
        while self.messages.front().is_some_and(|m| m.ts < oldest_kept_ts) {
            self.messages.pop_front();
        }
    }
}

impl StoreState {
    /// `conversation`'s log, made if there is room for one more.
    fn log_mut(&mut self, conversation: &Conversation, max: usize) -> Result<&mut Log, StoreError> {
        if !self.logs.contains_key(conversation) && self.logs.len() >= max {
            return Err(StoreError(format!(
                "the in-memory store holds its maximum of {max} conversations"
            )));
        }
        Ok(self.logs.entry(conversation.clone()).or_default())
    }

    /// Forgets refs whose window has ended by `now`, and the oldest beyond `capacity`.
    fn forget_refs(&mut self, now: u64, window: u64, capacity: usize) {
        while let Some((ts, _)) = self.ref_order.front() {
            if ts.saturating_add(window) > now && self.ref_order.len() < capacity {
                break;
            }
            if let Some((ts, key)) = self.ref_order.pop_front() {
                // Only remove the entry this queue slot was made for.
                if self.refs.get(&key).is_some_and(|(at, _)| *at == ts) {
                    self.refs.remove(&key);
                }
            }
        }
    }

    /// The earlier copy of a retried message, if `key` was stored within the window.
    fn earlier(
        &self,
        key: &RefKey,
        message: &NewMessage<'_>,
        window: u64,
    ) -> Option<StoredMessage> {
        let (ts, id) = *self.refs.get(key)?;
        if ts.saturating_add(window) <= message.ts {
            return None;
        }
        let retained = self.logs.get(&key.0).and_then(|log| {
            let at = first_after(&log.messages, id.saturating_sub(1));
            log.messages.get(at).filter(|m| m.id == id).cloned()
        });
        // Retention may already have dropped the original; the retry carries the same content.
        Some(retained.unwrap_or_else(|| StoredMessage {
            id,
            from: message.from.to_owned(),
            to: message.to.map(str::to_owned),
            body: message.body.to_owned(),
            ts,
        }))
    }
}

#[async_trait]
impl HistoryStore for InMemoryHistoryStore {
    async fn append(
        &self,
        conversation: &Conversation,
        message: NewMessage<'_>,
    ) -> Result<Appended, StoreError> {
        let window = u64::try_from(self.config.dedup_window.as_millis()).unwrap_or(u64::MAX);
        let mut state = self.state();
        state.forget_refs(message.ts, window, self.dedup_capacity);
        let key = message
            .reference
            .map(|r| (conversation.clone(), message.from.to_owned(), r.to_owned()));
        if let Some(key) = &key {
            if let Some(earlier) = state.earlier(key, &message, window) {
                return Ok(Appended {
                    message: earlier,
                    duplicate: true,
                });
            }
        }
        state.log_mut(conversation, self.max_conversations)?;
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
        let log = state.log_mut(conversation, self.max_conversations)?;
        log.forget_older_than(self.config.oldest_kept_ts());
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
        while log.messages.len() > self.config.retention {
            log.messages.pop_front();
        }
        if let Some(key) = key {
            state.refs.insert(key.clone(), (message.ts, stored.id));
            state.ref_order.push_back((message.ts, key));
        }
        Ok(Appended {
            message: stored,
            duplicate: false,
        })
    }

    async fn before(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let mut state = self.state();
        let Some(log) = state.logs.get_mut(conversation) else {
            return Ok(Page::default());
        };
        log.forget_older_than(self.config.oldest_kept_ts());
        let end = match before {
            Some(before) => first_after(&log.messages, before.saturating_sub(1)),
            None => log.messages.len(),
        };
        let start = end.saturating_sub(limit);
        Ok(Page {
            messages: log.messages.range(start..end).cloned().collect(),
            more: start > 0,
            last_id: log.last_id,
        })
    }

    async fn after(
        &self,
        conversation: &Conversation,
        after: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let mut state = self.state();
        let Some(log) = state.logs.get_mut(conversation) else {
            return Ok(Page::default());
        };
        log.forget_older_than(self.config.oldest_kept_ts());
        let start = first_after(&log.messages, after);
        let end = start.saturating_add(limit).min(log.messages.len());
        Ok(Page {
            messages: log.messages.range(start..end).cloned().collect(),
            more: end < log.messages.len(),
            last_id: log.last_id,
        })
    }

    async fn mark_read(
        &self,
        user: &str,
        conversation: &Conversation,
        id: u64,
    ) -> Result<u64, StoreError> {
        let mut state = self.state();
        let log = state.log_mut(conversation, self.max_conversations)?;
        let position = log.reads.entry(user.to_owned()).or_default();
        *position = (*position).max(id);
        Ok(*position)
    }

    async fn inbox(&self, user: &str) -> Result<Vec<InboxEntry>, StoreError> {
        let mut state = self.state();
        let oldest_kept_ts = self.config.oldest_kept_ts();
        let conversations: Vec<Conversation> = state
            .partners
            .get(user)
            .into_iter()
            .flatten()
            .map(|partner| Conversation::direct(user, partner))
            .collect();
        for conversation in &conversations {
            if let Some(log) = state.logs.get_mut(conversation) {
                log.forget_older_than(oldest_kept_ts);
            }
        }
        let Some(partners) = state.partners.get(user) else {
            return Ok(Vec::new());
        };
        let mut entries: Vec<(u64, InboxEntry)> = partners
            .iter()
            .map(|partner| {
                let conversation = Conversation::direct(user, partner);
                let read_id = state
                    .logs
                    .get(&conversation)
                    .and_then(|log| log.reads.get(user))
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

    async fn direct_heads(&self, user: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let state = self.state();
        let Some(partners) = state.partners.get(user) else {
            return Ok(Vec::new());
        };
        Ok(partners
            .iter()
            .map(|partner| {
                let conversation = Conversation::direct(user, partner);
                let last = state.logs.get(&conversation).map_or(0, |log| log.last_id);
                (partner.clone(), last)
            })
            .collect())
    }

    async fn epoch(&self) -> Result<String, StoreError> {
        Ok(self.epoch.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn msg<'a>(reference: &'a str, ts: u64) -> NewMessage<'a> {
        NewMessage {
            from: "alice",
            to: None,
            body: "b",
            ts,
            reference: Some(reference),
        }
    }

    #[tokio::test]
    async fn ref_memory_is_bounded_by_capacity() {
        let store = InMemoryHistoryStore::default().with_dedup_capacity(10);
        let room = Conversation::room("a");
        for i in 0..1_000 {
            store.append(&room, msg(&i.to_string(), 1)).await.unwrap();
        }
        let state = store.state();
        assert!(state.refs.len() <= 10 && state.ref_order.len() <= 10);
    }

    #[tokio::test]
    async fn a_retry_whose_original_fell_out_of_retention_keeps_its_id() {
        let store = InMemoryHistoryStore::new(2);
        let room = Conversation::room("a");
        store.append(&room, msg("first", 1)).await.unwrap();
        for i in 0..5 {
            store.append(&room, msg(&i.to_string(), 2)).await.unwrap();
        }
        let retry = store.append(&room, msg("first", 3)).await.unwrap();
        assert!(retry.duplicate);
        assert_eq!((retry.message.id, retry.message.ts), (1, 1));
    }

    #[tokio::test]
    async fn conversations_are_bounded_and_those_held_keep_working() {
        let store = InMemoryHistoryStore::default().with_max_conversations(3);
        for partner in ["b", "c", "d"] {
            let conversation = Conversation::direct("a", partner);
            store.append(&conversation, msg(partner, 1)).await.unwrap();
        }
        // A fourth conversation, by message or by read position, is refused...
        let fourth = Conversation::direct("a", "e");
        assert!(store.append(&fourth, msg("e", 1)).await.is_err());
        assert!(store.mark_read("a", &fourth, 1).await.is_err());
        assert!(store
            .mark_read("a", &Conversation::room("x"), 1)
            .await
            .is_err());
        // ...and stores nothing of it, not even a partner.
        let inbox = store.inbox("a").await.unwrap();
        assert_eq!(inbox.len(), 3);
        assert!(store.inbox("e").await.unwrap().is_empty());
        // The conversations held go on, ids in order.
        let ab = Conversation::direct("a", "b");
        assert_eq!(
            store.append(&ab, msg("again", 2)).await.unwrap().message.id,
            2
        );
        assert_eq!(store.mark_read("b", &ab, 2).await.unwrap(), 2);
        assert_eq!(store.state().logs.len(), 3);
    }

    #[tokio::test]
    async fn every_store_has_its_own_epoch() {
        let a = InMemoryHistoryStore::default().epoch().await.unwrap();
        let b = InMemoryHistoryStore::default().epoch().await.unwrap();
        assert_ne!(a, b);
    }
}
