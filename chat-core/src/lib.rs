//! chat-core: the transport-agnostic heart of a real-time chat server.
//!
//! Rooms, presence, group broadcast and private messages, spoken over any stream of text frames;
//! it knows nothing of a particular WebSocket library. Adapter crates move frames between a socket
//! and this crate.
//!
//! # Layout
//!
//! - [`layer`]: the [`ChannelLayer`](layer::ChannelLayer) trait, the transport between
//!   connections in one process or many (channels, groups, capacity, expiry), its in-memory
//!   backend, and (feature `testing`) the conformance suite every backend must pass.

pub mod layer;
