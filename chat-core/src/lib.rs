//! chat-core: the transport-agnostic heart of a real-time chat server.
//!
//! Rooms, presence, group broadcast and private messages, spoken over any stream of text frames;
//! it knows nothing of a particular WebSocket library. Adapter crates move frames between a socket
//! and [`Chat::serve`](engine::Chat::serve).
//!
//! # Layout
//!
//! - [`layer`]: the [`ChannelLayer`](layer::ChannelLayer) trait, the transport between
//!   connections in one process or many (channels, groups, capacity, expiry), its in-memory
//!   backend, and (feature `testing`) the conformance suite every backend must pass.
//! - [`protocol`]: the wire frames, decoded from hostile input and encoded once per message.
//! - [`engine`]: the per-connection protocol state machine and [`Chat`], the host
//!   service's handle.
//! - [`registry`]: rooms and presence with the multi-tab rule, edge versions and node leases,
//!   behind a trait; its in-memory backend and (feature `testing`) its conformance suite.
//! - [`store`]: message history, the one source of message ids and retry de-duplication, read
//!   positions and the inbox, behind a trait; its in-memory backend and conformance suite.
//! - [`auth`]: turning a handshake into a user name (development and JWT authenticators).
//! - [`policy`]: the host's allow/refuse hook for joins, sends and direct messages.
//! - [`config`]: every limit of the engine, in one struct.
//! - [`names`]: the protocol's room and user naming rules.
//! - `testing` (feature `testing`): `Communicator`, a client that drives a `Chat` with no
//!   socket, for the host's own tests.
//! - [`metrics`]: what the engine measures (connections, frames, errors, backend latency),
//!   through the `metrics` facade.
//!
//! A frame's journey: the adapter hands an [`Inbound`](engine::Inbound) text frame to the engine,
//! which decodes it ([`protocol`]), checks limits and the [`policy`], stores a message in the
//! [`store`] (which gives it the conversation's next id), encodes the outgoing frame once and
//! `group_send`s it through the [`layer`] to the room's group; every member connection's
//! subscription, on any node, receives the same bytes, puts them in id order and queues them as
//! an [`Outbound`](engine::Outbound) frame for its adapter to write. `docs/ordering.md` in the
//! repository tells what that guarantees and under which failures.

pub mod auth;
pub mod config;
pub mod engine;
pub mod layer;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod protocol;
#[cfg(feature = "redis")]
mod redis_client;
pub mod registry;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::ChatConfig;
pub use engine::Chat;
