//! [`RedisHistoryStore`]: history in Redis, shared by every node (cargo feature `redis`).
//!
//! Each conversation is a counter and a stream under the store's prefix (`{prefix}:store:r:{room}`
//! or `{prefix}:store:d:{a}:{b}`): a message is a stream entry whose id is the message id, so
//! paging is `XRANGE`/`XREVRANGE` and retention is the stream's `MAXLEN`. Appending is one Lua
//! script, so the next id, the stored message and the remembered `ref` are one atomic step: ids
//! are dense and readable in id order, and a retry on any node finds the first copy (the id
//! contract of [`HistoryStore`]). The inbox is a sorted set of partners per user, ordered by a
//! counter bumped on every direct message; read positions are a hash per user.
//!
//! Redis keeps what it is configured to keep: with persistence (AOF `appendfsync always`, or
//! everysec for a second's risk) history survives a Redis restart; without, a restart loses it,
//! the epoch changes, and clients reload instead of resuming.

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{FromRedisValue, Script, ScriptInvocation};

use super::{
    Appended, Conversation, HistoryStore, InboxEntry, NewMessage, Page, StoreConfig, StoreError,
    StoredMessage,
};
use crate::redis_client::{self, describe, once_more_if_unsent};

/// A [`HistoryStore`] in Redis. Cheap to clone; clones share one multiplexed connection.
///
/// ```no_run
/// use chat_core::store::{RedisHistoryStore, StoreConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::store::StoreError> {
/// let store = RedisHistoryStore::connect("redis://127.0.0.1:6379", "chat", StoreConfig::default())
///     .await?;
/// # drop(store);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisHistoryStore {
    connection: ConnectionManager,
    /// `{prefix}:store`.
    keys: String,
    config: StoreConfig,
    scripts: Scripts,
}

#[derive(Clone)]
struct Scripts {
    append: Script,
    page: Script,
    mark_read: Script,
    inbox: Script,
    epoch: Script,
}

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(include_str!("prelude.lua"), include_str!($file)))
    };
}

impl Scripts {
    fn new() -> Self {
        Self {
            append: script!("append.lua"),
            page: script!("page.lua"),
            mark_read: Script::new(include_str!("mark_read.lua")),
            inbox: script!("inbox.lua"),
            epoch: Script::new(include_str!("epoch.lua")),
        }
    }
}

fn failed(error: redis::RedisError) -> StoreError {
    StoreError(describe(&error))
}

fn malformed(what: &str) -> StoreError {
    StoreError(format!("unexpected reply from Redis to {what}"))
}

fn number(text: &str, what: &str) -> Result<u64, StoreError> {
    text.parse().map_err(|_| malformed(what))
}

/// Reads `id, from, to, body, ts` into a message.
fn stored_message(fields: &[String]) -> Result<StoredMessage, StoreError> {
    let [id, from, to, body, ts] = fields else {
        return Err(malformed("a message"));
    };
    Ok(StoredMessage {
        id: number(id, "a message id")?,
        from: from.clone(),
        to: (!to.is_empty()).then(|| to.clone()),
        body: body.clone(),
        ts: number(ts, "a message time")?,
    })
}

impl RedisHistoryStore {
    /// Connects to the Redis at `url`, keeping its keys under `{prefix}:store:`.
    pub async fn connect(url: &str, prefix: &str, config: StoreConfig) -> Result<Self, StoreError> {
        redis_client::check_prefix(prefix).map_err(StoreError)?;
        let (_, connection) = redis_client::connect(url).await.map_err(StoreError)?;
        Ok(Self {
            connection,
            keys: format!("{prefix}:store"),
            config: StoreConfig {
                retention: config.retention.max(1),
                ..config
            },
            scripts: Scripts::new(),
        })
    }

    /// Runs a prepared script.
    async fn call<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        once_more_if_unsent(|| {
            let mut connection = self.connection.clone();
            async move { invocation.invoke_async(&mut connection).await }
        })
        .await
        .map_err(failed)
    }

    /// The key of a conversation (its counter and stream hang off it).
    fn conversation_key(&self, conversation: &Conversation) -> String {
        match conversation {
            Conversation::Room(room) => format!("{}:r:{room}", self.keys),
            Conversation::Direct(a, b) => format!("{}:d:{a}:{b}", self.keys),
        }
    }

    async fn page(
        &self,
        conversation: &Conversation,
        direction: &str,
        bound: String,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let key = self.conversation_key(conversation);
        let mut invocation = self.scripts.page.prepare_invoke();
        invocation
            .key(format!("{key}:n"))
            .key(format!("{key}:s"))
            .arg(direction)
            .arg(bound)
            .arg(limit.min(1_000_000))
            .arg(self.config.oldest_kept_ts());
        let reply: Vec<String> = self.call(&invocation).await?;
        let [last, more, rest @ ..] = reply.as_slice() else {
            return Err(malformed("a history page"));
        };
        Ok(Page {
            messages: rest
                .chunks(5)
                .map(stored_message)
                .collect::<Result<_, _>>()?,
            more: more == "1",
            last_id: number(last, "a newest id")?,
        })
    }

    async fn inbox_rows(&self, user: &str, heads: bool) -> Result<Vec<String>, StoreError> {
        let mut invocation = self.scripts.inbox.prepare_invoke();
        invocation
            .key(format!("{}:inbox:{user}", self.keys))
            .key(format!("{}:dm:{user}", self.keys))
            .key(format!("{}:read:{user}", self.keys))
            .arg(if heads { "heads" } else { "inbox" })
            .arg(self.config.oldest_kept_ts());
        self.call(&invocation).await
    }
}

#[async_trait]
impl HistoryStore for RedisHistoryStore {
    async fn append(
        &self,
        conversation: &Conversation,
        message: NewMessage<'_>,
    ) -> Result<Appended, StoreError> {
        let key = self.conversation_key(conversation);
        let reference = message.reference.unwrap_or("");
        // Zero turns de-duplication off; the cap keeps `PX` within what Redis accepts.
        let window = u64::try_from(self.config.dedup_window.as_millis())
            .unwrap_or(u64::MAX)
            .min(1 << 52);
        let mut invocation = self.scripts.append.prepare_invoke();
        invocation
            .key(format!("{key}:n"))
            .key(format!("{key}:s"))
            .key(format!("{key}:ref:{}:{reference}", message.from))
            .arg(message.from)
            .arg(message.to.unwrap_or(""))
            .arg(message.body)
            .arg(message.ts)
            .arg(window)
            // MAXLEN takes a signed 64-bit count.
            .arg(self.config.retention.min(i64::MAX as usize))
            .arg(if message.reference.is_some() {
                "1"
            } else {
                "0"
            })
            .arg(if matches!(conversation, Conversation::Direct(..)) {
                "1"
            } else {
                "0"
            })
            .arg(&self.keys)
            .arg(&key)
            .arg(self.config.oldest_kept_ts());
        let reply: Vec<String> = self.call(&invocation).await?;
        let [outcome, fields @ ..] = reply.as_slice() else {
            return Err(malformed("an append"));
        };
        Ok(Appended {
            message: stored_message(fields)?,
            duplicate: outcome == "dup",
        })
    }

    async fn before(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let bound = before.map(|id| id.to_string()).unwrap_or_default();
        self.page(conversation, "before", bound, limit).await
    }

    async fn after(
        &self,
        conversation: &Conversation,
        after: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.page(conversation, "after", after.to_string(), limit)
            .await
    }

    async fn mark_read(
        &self,
        user: &str,
        conversation: &Conversation,
        id: u64,
    ) -> Result<u64, StoreError> {
        let mut invocation = self.scripts.mark_read.prepare_invoke();
        invocation
            .key(format!("{}:read:{user}", self.keys))
            .arg(self.conversation_key(conversation))
            .arg(id.to_string());
        let position: String = self.call(&invocation).await?;
        number(&position, "a read position")
    }

    async fn inbox(&self, user: &str) -> Result<Vec<InboxEntry>, StoreError> {
        self.inbox_rows(user, false)
            .await?
            .chunks(4)
            .map(|row| {
                let [with, last_id, read_id, unread] = row else {
                    return Err(malformed("an inbox"));
                };
                Ok(InboxEntry {
                    with: with.clone(),
                    last_id: number(last_id, "an inbox")?,
                    read_id: number(read_id, "an inbox")?,
                    unread: number(unread, "an inbox")?,
                })
            })
            .collect()
    }

    async fn direct_heads(&self, user: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.inbox_rows(user, true)
            .await?
            .chunks(2)
            .map(|row| {
                let [with, last_id] = row else {
                    return Err(malformed("direct heads"));
                };
                Ok((with.clone(), number(last_id, "direct heads")?))
            })
            .collect()
    }

    async fn epoch(&self) -> Result<String, StoreError> {
        let mut invocation = self.scripts.epoch.prepare_invoke();
        invocation
            .key(format!("{}:epoch", self.keys))
            .arg(crate::layer::unique_channel_name("redis"));
        self.call(&invocation).await
    }
}
