//! [`RedisChannelLayer`]: the channel layer across processes (cargo feature `redis`).
//!
//! # Design
//!
//! channels_redis has two designs. Its core layer keeps every channel as a Redis list and makes
//! `group_send` a Lua loop over the members: Redis work per message grows with the room, a
//! 1,000-member room is 1,000 list pushes, and its users report group messages lost and
//! delivered late under load. Its pub/sub layer publishes once per group but has no capacity or
//! expiry, and loses messages silently across a reconnect.
//!
//! This layer takes the pub/sub shape and keeps the Channels semantics by doing everything
//! per-channel locally:
//!
//! - **Channels live on their node.** A channel's queue, capacity, expiry and drop accounting
//!   are those of an [`InMemoryChannelLayer`] inside this process; its name carries this node's
//!   token (`{prefix}.{node}.{random}`), so any node knows where it lives.
//! - **Groups are per node in Redis.** A group's key lists the *nodes* that have members (a
//!   sorted set, scored by when each node last added one); which channels are members is known
//!   only to their node. `group_send` is one Lua script that `PUBLISH`es the message once to each
//!   other listed node, then this node delivers to its own members; each receiving node fans out
//!   to its own. Redis work per message grows with the nodes that have members, not with the
//!   members.
//! - **`send` to another node's channel** is a request over pub/sub: the owning node queues the
//!   message and answers whether it fitted, so `ChannelFull` and `NoSuchChannel` keep their
//!   meaning across nodes (a node that is gone answers nothing: `PUBLISH` reaches nobody, and
//!   that is `NoSuchChannel`).
//!
//! A [`GroupSendReport`] counts this node's members exactly; other nodes are counted in
//! `forwarded`, and count their own deliveries and drops in their own [`LayerStats`] and in each
//! member's [`Subscription::missed`]. `group_add` and `group_discard` work on this node's
//! channels only (the node that made a channel manages its memberships, as the engine does).
//!
//! # Connections and failures
//!
//! Per Redis host: one multiplexed command connection (a redis-rs `ConnectionManager`, which
//! reconnects with capped backoff) and one pub/sub connection, never one per WebSocket. redis-rs's
//! plain pub/sub connection does not reconnect, so a supervisor task here re-makes it, with
//! backoff capped at 5 s, and then registers this node again in every group where it has
//! members (while its subscription was down, publishers found it deaf and took it out). Messages
//! published meanwhile are lost to this node, as pub/sub always loses them.
//!
//! Once subscribed and registered again, the layer tells every local subscription
//! ([`Subscription::interrupted`]), so that a consumer that must not miss anything can look up
//! what it may have missed; the engine's connections then read their conversations' news from
//! the history store.
//!
//! While Redis is away, `group_send` fails with [`LayerError::Unavailable`] before delivering
//! anything, even locally, so a caller that retries never delivers twice.
//!
//! # Sharding
//!
//! With several hosts, each group lives on one of them, chosen by a jump consistent hash of its
//! name; every node subscribes on every host. Adding a host moves about `1/n` of the groups
//! (their next `group_add` registers them on the new one).

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use redis::aio::ConnectionManager;
use redis::{Client, Cmd, FromRedisValue, Pipeline, RedisResult, Script, ScriptInvocation};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::names::validate_prefix;
use super::{
    validate_channel_name, validate_group_name, ChannelLayer, GroupSendReport,
    InMemoryChannelLayer, LayerConfig, LayerError, LayerStats, Subscription,
};
use crate::redis_client::{self, describe, once_more_if_unsent, COMMAND_TIMEOUT};

/// Longest wait between two attempts to re-make a lost pub/sub connection.
const MAX_RESUBSCRIBE_BACKOFF: Duration = Duration::from_secs(5);
/// Length of a node's token in channel names.
const NODE_TOKEN_LEN: usize = 12;

/// A [`ChannelLayer`] spanning every process connected to the same Redis (or the same set of
/// Redis hosts) under the same prefix. Cheap to clone: clones are one node.
///
/// ```no_run
/// use std::sync::Arc;
/// use chat_core::layer::{ChannelLayer, LayerConfig, RedisChannelLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::layer::LayerError> {
/// let layer = RedisChannelLayer::connect(&["redis://127.0.0.1:6379"], "chat", LayerConfig::default())
///     .await?;
/// let layer: Arc<dyn ChannelLayer> = Arc::new(layer);
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisChannelLayer {
    shared: Arc<Shared>,
}

struct Shared {
    local: InMemoryChannelLayer,
    config: LayerConfig,
    /// This node's token: in its channel names and its topic.
    node: String,
    /// `{prefix}:layer`.
    keys: String,
    shards: Vec<Shard>,
    /// The score of this node's latest add to each group it has members in.
    groups: Mutex<HashMap<String, u64>>,
    /// The groups each local channel is in, to leave Redis tidy when its subscription drops.
    channel_groups: Mutex<HashMap<String, HashSet<String>>>,
    adds: AtomicU64,
    /// `send`s to other nodes waiting for their answer.
    requests: Mutex<HashMap<u64, oneshot::Sender<u8>>>,
    next_request: AtomicU64,
    scripts: Scripts,
    /// Bumped each time a pub/sub connection was made again: local subscriptions may have missed
    /// messages meanwhile.
    interruptions: watch::Sender<u64>,
    /// The pub/sub supervisors, ended with the layer.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct Shard {
    url: String,
    client: Client,
    commands: ConnectionManager,
    /// The pub/sub connection is subscribed (set and cleared by its supervisor).
    listening: AtomicBool,
}

struct Scripts {
    group_send: Script,
    group_forget: Script,
}

/// What travels on a node's topic.
mod wire {
    pub(super) const GROUP: u8 = b'G';
    pub(super) const SEND: u8 = b'S';
    pub(super) const REPLY: u8 = b'R';
    pub(super) const FLUSH: u8 = b'F';

    pub(super) const SENT: u8 = 0;
    pub(super) const FULL: u8 = 1;
    pub(super) const NO_SUCH_CHANNEL: u8 = 2;
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unavailable(error: &redis::RedisError) -> LayerError {
    LayerError::Unavailable(describe(error))
}

/// FNV-1a: stable across processes and Rust versions, so every node shards names alike.
fn fnv64(data: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in data {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Jump consistent hash (Lamping and Veach): a bucket in `0..buckets` that moves for only
/// `1/buckets` of keys when a bucket is added.
fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut bucket, mut next) = (-1i64, 0i64);
    let buckets = i64::try_from(buckets).unwrap_or(i64::MAX);
    while next < buckets {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        let scale = (1u64 << 31) as f64 / ((key >> 33) + 1) as f64;
        next = ((bucket + 1) as f64 * scale) as i64;
    }
    usize::try_from(bucket).unwrap_or(0)
}

/// Appends a name with its one-byte length.
fn put_name(buf: &mut BytesMut, name: &str) {
    let name = &name.as_bytes()[..name.len().min(255)];
    buf.put_u8(name.len() as u8);
    buf.put_slice(name);
}

/// Reads a name written by [`put_name`]; `None` on short or non-UTF-8 input.
fn take_name(data: &mut &[u8]) -> Option<String> {
    let (&len, rest) = data.split_first()?;
    let len = usize::from(len);
    let name = rest.get(..len)?;
    *data = &rest[len..];
    String::from_utf8(name.to_vec()).ok()
}

fn take_u64(data: &mut &[u8]) -> Option<u64> {
    let bytes = data.get(..8)?;
    *data = &data[8..];
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The node token in a channel name made by this layer (`{prefix}.{node}.{random}`).
fn node_of(channel: &str) -> Option<&str> {
    let mut parts = channel.rsplit('.');
    parts.next()?;
    parts.next().filter(|node| node.len() == NODE_TOKEN_LEN)
}

impl Shard {
    async fn query<T: FromRedisValue>(&self, command: &Cmd) -> RedisResult<T> {
        once_more_if_unsent(|| {
            let mut connection = self.commands.clone();
            async move { command.query_async(&mut connection).await }
        })
        .await
    }

    async fn pipeline<T: FromRedisValue>(&self, pipeline: &Pipeline) -> RedisResult<T> {
        once_more_if_unsent(|| {
            let mut connection = self.commands.clone();
            async move { pipeline.query_async(&mut connection).await }
        })
        .await
    }

    async fn invoke<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> RedisResult<T> {
        once_more_if_unsent(|| {
            let mut connection = self.commands.clone();
            async move { invocation.invoke_async(&mut connection).await }
        })
        .await
    }
}

impl Shared {
    fn topic(&self, node: &str) -> String {
        format!("{}:node:{node}", self.keys)
    }

    fn broadcast_topic(&self) -> String {
        format!("{}:all", self.keys)
    }

    fn group_key(&self, group: &str) -> String {
        format!("{}:group:{group}", self.keys)
    }

    fn shard_of(&self, name: &str) -> &Shard {
        &self.shards[jump_hash(fnv64(name.as_bytes()), self.shards.len())]
    }

    /// Lists this node in `group` (or refreshes it), with a new score.
    async fn register(&self, group: &str) -> Result<(), LayerError> {
        let score = self.adds.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.groups).insert(group.to_owned(), score);
        let key = self.group_key(group);
        let expiry = self.config.group_expiry.as_secs().max(1);
        let mut pipeline = redis::pipe();
        pipeline
            .atomic()
            .zadd(&key, &self.node, score)
            .ignore()
            .expire(&key, i64::try_from(expiry).unwrap_or(i64::MAX))
            .ignore();
        self.shard_of(group)
            .pipeline::<()>(&pipeline)
            .await
            .map_err(|error| unavailable(&error))
    }

    /// Takes this node out of `group` in Redis if it has no member there any more.
    async fn forget_if_empty(&self, group: &str) {
        if self.local.has_members(group) {
            return;
        }
        let Some(score) = lock(&self.groups).remove(group) else {
            return;
        };
        let mut invocation = self.scripts.group_forget.prepare_invoke();
        invocation
            .key(self.group_key(group))
            .arg(&self.node)
            .arg(score);
        let forgot = self.shard_of(group).invoke::<i64>(&invocation).await;
        if let Err(error) = forgot {
            // Harmless: the next message for the group finds this node without members.
            tracing::debug!(%error, group, "could not leave a group in Redis");
        }
    }

    /// Lists this node again in every group it has members in on `shard` (after its pub/sub
    /// connection was re-made, publishers may have taken it out).
    async fn register_all(&self, shard: usize) {
        let groups: Vec<String> = lock(&self.groups).keys().cloned().collect();
        for group in groups {
            if !std::ptr::eq(self.shard_of(&group), &self.shards[shard]) {
                continue;
            }
            if !self.local.has_members(&group) {
                self.forget_if_empty(&group).await;
                continue;
            }
            if let Err(error) = self.register(&group).await {
                tracing::warn!(%error, group, "could not register a group again");
            }
        }
    }

    /// Handles what arrived on this node's topic (only this layer's nodes publish there; still,
    /// nothing here trusts the bytes).
    async fn receive(&self, payload: &[u8]) {
        let Some((&kind, mut rest)) = payload.split_first() else {
            return;
        };
        match kind {
            wire::GROUP => {
                let Some(group) = take_name(&mut rest) else {
                    return;
                };
                let message = Bytes::copy_from_slice(rest);
                if let Ok(report) = self.local.group_send(&group, message).await {
                    if report.delivered == 0 {
                        self.forget_if_empty(&group).await;
                    }
                }
            }
            wire::SEND => {
                let (Some(reply_to), Some(request), Some(channel)) = (
                    take_name(&mut rest),
                    take_u64(&mut rest),
                    take_name(&mut rest),
                ) else {
                    return;
                };
                let code = match self
                    .local
                    .send(&channel, Bytes::copy_from_slice(rest))
                    .await
                {
                    Ok(()) => wire::SENT,
                    Err(LayerError::ChannelFull(_)) => wire::FULL,
                    Err(_) => wire::NO_SUCH_CHANNEL,
                };
                let mut reply = BytesMut::with_capacity(10);
                reply.put_u8(wire::REPLY);
                reply.put_u64(request);
                reply.put_u8(code);
                let mut publish = redis::cmd("PUBLISH");
                publish.arg(self.topic(&reply_to)).arg(&reply[..]);
                let published = self.shard_of(&channel).query::<i64>(&publish).await;
                if let Err(error) = published {
                    tracing::debug!(%error, "could not answer a send");
                }
            }
            wire::REPLY => {
                let (Some(request), Some(&code)) = (take_u64(&mut rest), rest.first()) else {
                    return;
                };
                if let Some(waiting) = lock(&self.requests).remove(&request) {
                    let _ = waiting.send(code);
                }
            }
            wire::FLUSH => {
                let _ = self.local.flush().await;
                lock(&self.groups).clear();
                lock(&self.channel_groups).clear();
            }
            _ => tracing::debug!(kind, "unknown message on the layer's topic"),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

/// Keeps one shard's pub/sub connection alive: subscribe, register the node's groups, hand
/// every message to the layer; on loss, again after a backoff.
async fn supervise(
    layer: Weak<Shared>,
    shard: usize,
    mut ready: Option<oneshot::Sender<Result<(), String>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(shared) = layer.upgrade() else {
            return;
        };
        let client = shared.shards[shard].client.clone();
        let url = shared.shards[shard].url.clone();
        let topics = [shared.topic(&shared.node), shared.broadcast_topic()];
        drop(shared);
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            for topic in &topics {
                pubsub.subscribe(topic).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, subscribed).await {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(100);
                let Some(shared) = layer.upgrade() else {
                    return;
                };
                shared.register_all(shard).await;
                shared.shards[shard]
                    .listening
                    .store(true, Ordering::Relaxed);
                match ready.take() {
                    Some(ready) => {
                        let _ = ready.send(Ok(()));
                    }
                    None => {
                        // Listening and listed again: from here on nothing is lost, and what
                        // was lost before is for each subscriber to look up.
                        tracing::info!(url, "Redis pub/sub subscription made again");
                        metrics::counter!(crate::metrics::REDIS_RECONNECTS, "connection" => "pubsub")
                            .increment(1);
                        shared.interruptions.send_modify(|count| *count += 1);
                    }
                }
                drop(shared);
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Some(shared) = layer.upgrade() else {
                        return;
                    };
                    shared.receive(message.get_payload_bytes()).await;
                }
                if let Some(shared) = layer.upgrade() {
                    shared.shards[shard]
                        .listening
                        .store(false, Ordering::Relaxed);
                }
                tracing::warn!(url, "Redis pub/sub connection lost; subscribing again");
            }
            failed => {
                let error = match failed {
                    Ok(Err(error)) => describe(&error),
                    _ => "timed out".to_owned(),
                };
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(error));
                    return;
                }
                tracing::warn!(url, error, ?backoff, "Redis pub/sub unavailable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_RESUBSCRIBE_BACKOFF);
            }
        }
    }
}

/// A local subscription that, when dropped, takes this node out of the groups in Redis where
/// it was the node's last member.
struct Tidy {
    /// Always `Some` until dropped.
    inner: Option<Subscription>,
    layer: Weak<Shared>,
}

impl Stream for Tidy {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        match &mut self.inner {
            Some(inner) => Pin::new(inner).poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Drop for Tidy {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let name = inner.name().to_owned();
        // The local channel goes first, its memberships with it; then Redis is tidied.
        drop(inner);
        let Some(shared) = self.layer.upgrade() else {
            return;
        };
        let groups = lock(&shared.channel_groups).remove(&name);
        let (Some(groups), Ok(runtime)) = (groups, tokio::runtime::Handle::try_current()) else {
            return;
        };
        runtime.spawn(async move {
            for group in groups {
                shared.forget_if_empty(&group).await;
            }
        });
    }
}

impl RedisChannelLayer {
    /// Connects to every host in `urls` (groups are sharded across them), keeping keys and
    /// topics under `{prefix}:layer:`. Fails if a host cannot be reached now; once running, it
    /// rides out Redis outages by itself.
    pub async fn connect(
        urls: &[impl AsRef<str>],
        prefix: &str,
        config: LayerConfig,
    ) -> Result<Self, LayerError> {
        redis_client::check_prefix(prefix).map_err(LayerError::Unavailable)?;
        if urls.is_empty() {
            return Err(LayerError::Unavailable("no Redis host given".into()));
        }
        let mut shards = Vec::new();
        for url in urls {
            let url = url.as_ref();
            let (client, commands) = redis_client::connect(url)
                .await
                .map_err(LayerError::Unavailable)?;
            shards.push(Shard {
                url: url.to_owned(),
                client,
                commands,
                listening: AtomicBool::new(false),
            });
        }
        let token = crate::layer::unique_channel_name("n");
        let node: String = token.chars().skip(2).take(NODE_TOKEN_LEN).collect();
        let shared = Arc::new(Shared {
            local: InMemoryChannelLayer::new(config.clone()),
            config,
            node,
            keys: format!("{prefix}:layer"),
            shards,
            groups: Mutex::default(),
            channel_groups: Mutex::default(),
            adds: AtomicU64::new(0),
            requests: Mutex::default(),
            next_request: AtomicU64::new(0),
            scripts: Scripts {
                group_send: Script::new(include_str!("group_send.lua")),
                group_forget: Script::new(include_str!("group_forget.lua")),
            },
            interruptions: watch::channel(0).0,
            tasks: Mutex::default(),
        });
        for shard in 0..shared.shards.len() {
            let (ready, subscribed) = oneshot::channel();
            let task = tokio::spawn(supervise(Arc::downgrade(&shared), shard, Some(ready)));
            lock(&shared.tasks).push(task);
            match subscribed.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(LayerError::Unavailable(error)),
                Err(_) => return Err(LayerError::Unavailable("subscriber ended".into())),
            }
        }
        Ok(Self { shared })
    }

    /// This node's token, the part of its channel names that says where they live.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    fn is_local(&self, channel: &str) -> bool {
        node_of(channel) == Some(self.shared.node.as_str())
    }

    async fn send_remote(&self, channel: &str, message: Bytes) -> Result<(), LayerError> {
        let shared = &self.shared;
        let Some(node) = node_of(channel) else {
            return Err(LayerError::NoSuchChannel(channel.to_owned()));
        };
        let request = shared.next_request.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        lock(&shared.requests).insert(request, answer);
        let mut payload = BytesMut::with_capacity(12 + 2 * 100 + message.len());
        payload.put_u8(wire::SEND);
        put_name(&mut payload, &shared.node);
        payload.put_u64(request);
        put_name(&mut payload, channel);
        payload.put_slice(&message);
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(shared.topic(node)).arg(&payload[..]);
        let published = shared.shard_of(channel).query::<i64>(&publish).await;
        let listeners = match published {
            Ok(listeners) => listeners,
            Err(error) => {
                lock(&shared.requests).remove(&request);
                return Err(unavailable(&error));
            }
        };
        if listeners == 0 {
            lock(&shared.requests).remove(&request);
            return Err(LayerError::NoSuchChannel(channel.to_owned()));
        }
        let code = tokio::time::timeout(COMMAND_TIMEOUT, answered).await;
        lock(&shared.requests).remove(&request);
        match code {
            Ok(Ok(wire::SENT)) => Ok(()),
            Ok(Ok(wire::FULL)) => Err(LayerError::ChannelFull(channel.to_owned())),
            Ok(Ok(_)) => Err(LayerError::NoSuchChannel(channel.to_owned())),
            _ => Err(LayerError::Unavailable(format!(
                "node {node} did not answer a send to {channel}"
            ))),
        }
    }
}

#[async_trait]
impl ChannelLayer for RedisChannelLayer {
    async fn new_channel(&self, prefix: &str) -> Result<Subscription, LayerError> {
        validate_prefix(prefix)?;
        let shared = &self.shared;
        let local = shared
            .local
            .new_channel(&format!("{prefix}.{}", shared.node))
            .await
            .map_err(|_| LayerError::InvalidName {
                kind: "prefix",
                name: prefix.chars().take(120).collect(),
                reason: "too long for a Redis layer, whose channel names also carry the node",
            })?;
        let name = local.name().to_owned();
        let missed = local.missed_counter();
        let tidy = Tidy {
            inner: Some(local),
            layer: Arc::downgrade(shared),
        };
        Ok(Subscription::new(name, tidy, missed)
            .with_interruptions(shared.interruptions.subscribe()))
    }

    async fn send(&self, channel: &str, message: Bytes) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        if self.is_local(channel) {
            return self.shared.local.send(channel, message).await;
        }
        self.send_remote(channel, message).await
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        if !self.is_local(channel) {
            return Err(LayerError::NoSuchChannel(channel.to_owned()));
        }
        let shared = &self.shared;
        shared.local.group_add(group, channel).await?;
        lock(&shared.channel_groups)
            .entry(channel.to_owned())
            .or_default()
            .insert(group.to_owned());
        shared.register(group).await
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let shared = &self.shared;
        shared.local.group_discard(group, channel).await?;
        if let Some(groups) = lock(&shared.channel_groups).get_mut(channel) {
            groups.remove(group);
        }
        shared.forget_if_empty(group).await;
        Ok(())
    }

    async fn group_send(&self, group: &str, message: Bytes) -> Result<GroupSendReport, LayerError> {
        validate_group_name(group)?;
        let shared = &self.shared;
        let mut payload = BytesMut::with_capacity(2 + group.len() + message.len());
        payload.put_u8(wire::GROUP);
        put_name(&mut payload, group);
        payload.put_slice(&message);
        let mut invocation = shared.scripts.group_send.prepare_invoke();
        invocation
            .key(shared.group_key(group))
            .arg(&shared.node)
            .arg(format!("{}:node:", shared.keys))
            .arg(&payload[..]);
        let forwarded: i64 = shared
            .shard_of(group)
            .invoke(&invocation)
            .await
            .map_err(|error| unavailable(&error))?;
        let mut report = shared.local.group_send(group, message).await?;
        report.forwarded = usize::try_from(forwarded).unwrap_or(0);
        Ok(report)
    }

    async fn flush(&self) -> Result<(), LayerError> {
        let shared = &self.shared;
        for shard in &shared.shards {
            let mut commands = shard.commands.clone();
            // SCAN, not KEYS: a shared Redis is not blocked while the layer's keys are found.
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{}:*", shared.keys))
                    .arg("COUNT")
                    .arg(1_000)
                    .query_async(&mut commands)
                    .await
                    .map_err(|error| unavailable(&error))?;
                if !keys.is_empty() {
                    redis::cmd("DEL")
                        .arg(&keys)
                        .query_async::<()>(&mut commands)
                        .await
                        .map_err(|error| unavailable(&error))?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            redis::cmd("PUBLISH")
                .arg(shared.broadcast_topic())
                .arg(&[wire::FLUSH][..])
                .query_async::<()>(&mut commands)
                .await
                .map_err(|error| unavailable(&error))?;
        }
        shared.local.flush().await?;
        lock(&shared.groups).clear();
        lock(&shared.channel_groups).clear();
        Ok(())
    }

    fn stats(&self) -> LayerStats {
        self.shared.local.stats()
    }

    /// Every shard answers `PING` and its pub/sub connection is subscribed.
    async fn ping(&self) -> Result<(), LayerError> {
        for shard in &self.shared.shards {
            if !shard.listening.load(Ordering::Relaxed) {
                return Err(LayerError::Unavailable(format!(
                    "not subscribed to Redis at {}",
                    shard.url
                )));
            }
            shard
                .query::<String>(&redis::cmd("PING"))
                .await
                .map_err(|error| LayerError::Unavailable(describe(&error)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn jump_hash_spreads_and_moves_little_when_a_bucket_is_added() {
        let keys: Vec<u64> = (0..10_000u64).map(|i| fnv64(&i.to_be_bytes())).collect();
        let mut counts = [0usize; 4];
        for key in &keys {
            counts[jump_hash(*key, 4)] += 1;
        }
        assert!(
            counts.iter().all(|c| (2_000..3_000).contains(c)),
            "{counts:?}"
        );
        let moved = keys
            .iter()
            .filter(|key| jump_hash(**key, 4) != jump_hash(**key, 5))
            .count();
        assert!((1_500..2_500).contains(&moved), "{moved} of 10,000 moved");
        assert_eq!(jump_hash(42, 1), 0);
    }

    #[test]
    fn node_tokens_are_read_from_channel_names() {
        assert_eq!(
            node_of("conn.abcdefghijkl.0123456789abcdef"),
            Some("abcdefghijkl")
        );
        assert_eq!(node_of("conn.nobody"), None);
        assert_eq!(node_of("nobody"), None);
    }

    #[test]
    fn wire_names_refuse_short_input() {
        let mut data: &[u8] = &[5, b'a', b'b'];
        assert_eq!(take_name(&mut data), None);
        let mut data: &[u8] = &[1, 2, 3];
        assert_eq!(take_u64(&mut data), None);
    }
}
