//! The workspace's root package: it carries no library code of its own, only the runnable
//! `examples/` and the `benches/`, so that `cargo run --example NAME` and `cargo bench` work from
//! the root of a fresh clone. The chat library itself is the `chat-core` crate.
//!
//! The README is included below so that its code blocks compile as doctests and cannot drift from
//! the code.
#![doc = include_str!("../README.md")]
