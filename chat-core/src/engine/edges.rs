//! Keeps a connection's `member` and `presence` events in the order the registry made them.
//!
//! Each edge carries the registry's version (one counter for all edges, see
//! [`registry`](crate::registry)). Events travel by different paths, so a reload's `offline` may
//! arrive after the new tab's `online`. A connection passes an event on only when its version is
//! newer than both the snapshot the client was given (`joined.members`, the `online` reply: the
//! `floor`) and the last event it passed on about the same user in the same scope.
//!
//! Memory is bounded: an entry is forgotten after [`MEMORY`] or when more than [`CAPACITY`] are
//! kept. An event delayed longer than that (it never happens short of a stalled node) could then
//! slip through; the snapshot floor still holds.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// How long the newest version per user is remembered.
const MEMORY: Duration = Duration::from_secs(600);
/// Most users remembered per connection.
const CAPACITY: usize = 4_096;

/// `(scope, user)`: the scope is a room for `member` events, empty for `presence`.
type Key = (String, String);

#[derive(Debug, Default)]
pub(crate) struct EdgeFilter {
    newest: HashMap<Key, u64>,
    order: VecDeque<(Instant, Key, u64)>,
}

impl EdgeFilter {
    /// Whether an edge with `version` about `user` in `scope` is news to this connection; if so
    /// it is remembered as the newest.
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
        let key = (scope.to_owned(), user.to_owned());
        if self
            .newest
            .get(&key)
            .is_some_and(|newest| *newest >= version)
        {
            return false;
        }
        self.newest.insert(key.clone(), version);
        self.order.push_back((now, key, version));
        true
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
