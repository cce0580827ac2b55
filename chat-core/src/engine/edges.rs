//! Keeps `member` and `presence` events in the order the registry made them.
//!
//! Each edge carries the registry's version (one counter for all edges, see
//! [`registry`](crate::registry)). Events travel by different paths, so a reload's `offline` may
//! arrive after the new tab's `online`. A connection passes an event on only when its version is
//! newer than the snapshot the client was given (`joined.members`, the `online` reply: the
//! `floor`, kept per connection) and not older than the newest event about the same user in the
//! same scope that reached this node.
//!
//! One filter serves the whole node: an edge reaches every local connection of its room, so a
//! filter per connection would remember the same edges once per member, quadratic in a room's
//! size (a join storm into a room of 500 made each of 500 connections remember 500 edges). The
//! node-wide one lets an edge through as long as nothing newer about the same user was seen, so
//! every connection passes the same edge, and one that arrives after a newer one is dropped
//! everywhere: each client ends on the newest state, as the versions say.
//!
//! Memory is bounded: an entry is forgotten after [`MEMORY`] or when more than [`CAPACITY`] are
//! kept, and a key is a 64-bit keyed hash of `(scope, user)` rather than two strings (a
//! collision, 2^-64 per pair with a per-process random key a peer cannot learn, could at worst
//! hide one event). An event delayed longer than [`MEMORY`] (it never happens short of a
//! stalled node) could slip through; the snapshot floor still holds.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// How long the newest version per user is remembered: far longer than events ever overtake
/// each other on their way between nodes.
const MEMORY: Duration = Duration::from_secs(60);
/// Most `(scope, user)` pairs remembered per node (about 2.5 MiB at most).
const CAPACITY: usize = 65_536;

/// A keyed hash of `(scope, user)`: the scope is a room for `member` events, empty for
/// `presence`.
type Key = u64;

fn key(scope: &str, user: &str) -> Key {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    let mut hasher = SEED.get_or_init(RandomState::new).build_hasher();
    hasher.write(scope.as_bytes());
    hasher.write_u8(0xff);
    hasher.write(user.as_bytes());
    hasher.finish()
}

#[derive(Debug, Default)]
pub(crate) struct EdgeFilter {
    newest: HashMap<Key, u64>,
    order: VecDeque<(Instant, Key, u64)>,
}

impl EdgeFilter {
    /// Whether an edge with `version` about `user` in `scope` is news to a connection whose
    /// snapshot is `floor`: newer than the snapshot, and no newer edge about the same user was
    /// seen. It is remembered as the newest, and passes again for the node's other connections.
    pub(crate) fn admit(
        &mut self,
        scope: &str,
        user: &str,
        version: u64,
        floor: u64,
        now: Instant,
    ) -> bool {
        if version <= floor {
            return false;
        }
        self.forget(now);
        let key = key(scope, user);
        match self.newest.get(&key) {
            Some(newest) if *newest > version => return false,
            // The same edge, on its way to another connection (or again to this one: an edge
            // is state, so a repeat changes nothing).
            Some(newest) if *newest == version => return true,
            _ => {}
        }
        self.newest.insert(key, version);
        self.order.push_back((now, key, version));
        true
    }

    /// Forgets what is old and gives back the memory of a burst that is over; the node calls it once a heartbeat.
    pub(crate) fn tidy(&mut self, now: Instant) {
        self.forget(now);
        if self.order.capacity() > 4 * self.order.len().max(16) {
            self.order.shrink_to_fit();
            self.newest.shrink_to_fit();
        }
    }

    fn forget(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < MEMORY && self.order.len() < CAPACITY {
                break;
            }
            if let Some((_, key, version)) = self.order.pop_front() {
                // Only forget the entry this slot was made for, not a newer one.
                if self.newest.get(&key) == Some(&version) {
                    self.newest.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_edges_than_the_snapshot_or_the_last_event_are_dropped() {
        let now = Instant::now();
        let mut filter = EdgeFilter::default();
        assert!(!filter.admit("", "bob", 5, 5, now), "the snapshot has it");
        assert!(filter.admit("", "bob", 8, 5, now));
        assert!(!filter.admit("", "bob", 7, 5, now), "overtaken by 8");
        assert!(
            filter.admit("", "bob", 8, 5, now),
            "8 again, for another connection"
        );
        assert!(
            !filter.admit("", "bob", 8, 8, now),
            "that connection's snapshot has it"
        );
        assert!(filter.admit("lobby", "bob", 7, 5, now), "another scope");
        assert!(filter.admit("", "carol", 6, 5, now), "another user");
        assert!(filter.admit("", "bob", 9, 5, now));
    }

    #[test]
    fn memory_is_bounded() {
        let now = Instant::now();
        let mut filter = EdgeFilter::default();
        for i in 0..(CAPACITY as u64 * 3) {
            assert!(filter.admit("", &i.to_string(), i + 1, 0, now));
        }
        assert!(filter.newest.len() <= CAPACITY && filter.order.len() <= CAPACITY);
    }
}
