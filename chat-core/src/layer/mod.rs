//! The channel layer: the transport between connections, in one process or across many.
//!
//! The model is the Django Channels channel layer specification, shaped for Rust:
//!
//! - A **channel** is a named FIFO queue with one reader. [`ChannelLayer::new_channel`] makes a
//!   unique name and hands back the [`Subscription`] that reads it; dropping the subscription
//!   removes the channel and its group memberships, so a consumer that goes away leaks nothing.
//! - A **group** is a named set of channels. [`ChannelLayer::group_send`] delivers one message to
//!   every member. Adding and discarding are idempotent.
//! - **Capacity**: a channel holds at most [`LayerConfig::capacity`] pending messages (overridable
//!   per channel-name pattern). [`ChannelLayer::send`] to a full channel fails with
//!   [`LayerError::ChannelFull`]; `group_send` never waits on a full member, it skips it and
//!   counts the drop ([`GroupSendReport`], [`LayerStats`]).
//! - **Expiry**: a message nobody received within [`LayerConfig::expiry`] is dropped; a membership
//!   not refreshed by `group_add` within [`LayerConfig::group_expiry`] lapses.
//!
//! Messages are [`Bytes`]: encoded once by the sender, then shared by reference count, so a
//! `group_send` to ten thousand members copies no payload and serializes nothing per member.
//!
//! Implementations: [`InMemoryChannelLayer`] for one process; `RedisChannelLayer` (cargo feature
//! `redis`) for many, which fans out per node. Every implementation is expected to
//! pass the conformance suite in `chat_core::layer::conformance` (cargo feature `testing`). The
//! same feature has `FaultyLayer`, which wraps any layer and delays, loses or refuses messages on
//! command, for testing what sits above a layer that misbehaves.

mod config;
mod memory;
mod names;
#[cfg(feature = "redis")]
mod redis;
mod subscription;

#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "testing")]
mod faults;

use async_trait::async_trait;
use bytes::Bytes;

#[cfg(feature = "redis")]
pub use self::redis::RedisChannelLayer;
pub use config::{CapacityPattern, LayerConfig};
#[cfg(feature = "testing")]
pub use faults::FaultyLayer;
pub use memory::InMemoryChannelLayer;
pub use names::{validate_channel_name, validate_group_name, MAX_NAME_LEN};
pub use subscription::{Interruptions, Subscription};

pub(crate) use subscription::unique_channel_name;

/// What can go wrong talking to a channel layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerError {
    /// A channel or group name broke the naming rules (see [`validate_channel_name`]).
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// `"channel"`, `"group"` or `"prefix"`.
        kind: &'static str,
        /// The offending name (cut to a readable length).
        name: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// The channel already holds its capacity of pending messages; the message was not queued.
    #[error("channel {0:?} is full")]
    ChannelFull(String),
    /// Nobody holds a subscription for this channel (never created, or its subscriber went away).
    #[error("no such channel {0:?}")]
    NoSuchChannel(String),
    /// The backend could not be reached (a network backend's connection is down, say). Nothing was
    /// accepted, so the caller may retry.
    #[error("channel layer unavailable: {0}")]
    Unavailable(String),
}

/// What one [`ChannelLayer::group_send`] did with its message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupSendReport {
    /// Members whose queue accepted the message.
    pub delivered: usize,
    /// Members skipped because their queue was full.
    pub dropped_full: usize,
    /// Memberships found lapsed (older than `group_expiry`) and removed instead of delivered to.
    pub expired_members: usize,
    /// Other processes the message was handed to, for their members (a networked layer: each
    /// counts its own deliveries and drops in its own stats).
    pub forwarded: usize,
}

/// Counters a layer keeps since it was created, so that drops are visible, not silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Messages a `group_send` skipped because the member's channel was full.
    pub group_send_dropped: u64,
    /// Messages dropped unread because they were older than `expiry`.
    pub expired_messages: u64,
    /// Group memberships that lapsed after `group_expiry`.
    pub expired_memberships: u64,
}

/// The transport between connections: channels, groups, capacity and expiry.
///
/// Object safe: share one as `Arc<dyn ChannelLayer>`. Every method is cancel-safe in the sense
/// that dropping its future never leaves a half-applied change visible to other callers.
///
/// # Example
///
/// Create a layer, put two channels in a group and receive one `group_send` on both:
///
/// ```
/// use std::sync::Arc;
/// use bytes::Bytes;
/// use chat_core::layer::{ChannelLayer, InMemoryChannelLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::layer::LayerError> {
/// let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::default());
///
/// let mut alice = layer.new_channel("conn").await?;
/// let mut bob = layer.new_channel("conn").await?;
/// layer.group_add("room.lobby", alice.name()).await?;
/// layer.group_add("room.lobby", bob.name()).await?;
///
/// // Encoded once; each member gets the same bytes by reference count.
/// let report = layer.group_send("room.lobby", Bytes::from_static(b"{\"hello\":1}")).await?;
/// assert_eq!(report.delivered, 2);
///
/// assert_eq!(alice.recv().await.as_deref(), Some(&b"{\"hello\":1}"[..]));
/// assert_eq!(bob.recv().await.as_deref(), Some(&b"{\"hello\":1}"[..]));
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait ChannelLayer: Send + Sync + 'static {
    /// Makes a new channel named `{prefix}.{unique suffix}` and returns the subscription that
    /// reads it. The channel lives as long as the subscription.
    async fn new_channel(&self, prefix: &str) -> Result<Subscription, LayerError>;

    /// Queues `message` on `channel`. Never waits for room: a full channel is
    /// [`LayerError::ChannelFull`], a channel nobody reads is [`LayerError::NoSuchChannel`].
    async fn send(&self, channel: &str, message: Bytes) -> Result<(), LayerError>;

    /// Adds `channel` to `group`, or refreshes its membership (restarting `group_expiry`).
    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError>;

    /// Removes `channel` from `group`; removing a non-member is not an error.
    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError>;

    /// Delivers `message` to every current member of `group`. Members whose channel is full are
    /// skipped and counted, never waited on; an empty or unknown group delivers to nobody.
    async fn group_send(&self, group: &str, message: Bytes) -> Result<GroupSendReport, LayerError>;

    /// Drops every pending message and every group membership. Subscriptions stay valid and keep
    /// receiving what is sent after the flush. Meant for tests.
    async fn flush(&self) -> Result<(), LayerError>;

    /// The drop and expiry counters since the layer was created.
    fn stats(&self) -> LayerStats;

    /// Whether the layer can carry messages now: its servers answer and it is subscribed to
    /// them. For readiness checks; an in-process layer always can.
    async fn ping(&self) -> Result<(), LayerError> {
        Ok(())
    }
}
