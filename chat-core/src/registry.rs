//! Rooms and presence: which connections of which users are in which room, and who is online.
//!
//! The multi-tab rule lives here: a user is online, and a member of a room, until their *last*
//! connection leaves. Every change reports whether it crossed that edge, so the engine fires
//! `member` and `presence` events exactly on the edges and never once per tab.
//!
//! The engine speaks to the registry only through the [`Registry`] trait, so a shared backend
//! (Redis) can make membership and presence span nodes without touching the engine.
//! [`InMemoryRegistry`] is the one-process implementation.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

/// A registry failure: the change did not happen, and may be retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registry unavailable: {0}")]
pub struct RegistryError(pub String);

/// Membership and presence, connection by connection. A connection is named by a string unique
/// across the deployment (the engine uses its channel name).
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Records a new connection of `user`; `true` when it is the user's first (they came online).
    async fn connect(&self, user: &str, connection: &str) -> Result<bool, RegistryError>;

    /// Forgets a connection; `true` when it was the user's last (they went offline).
    async fn disconnect(&self, user: &str, connection: &str) -> Result<bool, RegistryError>;

    /// Puts a connection in a room; `true` when it is the user's first connection there.
    async fn join(&self, room: &str, user: &str, connection: &str) -> Result<bool, RegistryError>;

    /// Takes a connection out of a room; `true` when it was the user's last connection there.
    async fn leave(&self, room: &str, user: &str, connection: &str) -> Result<bool, RegistryError>;

    /// The users with at least one connection in `room`, sorted.
    async fn members(&self, room: &str) -> Result<Vec<String>, RegistryError>;

    /// The users with at least one live connection, sorted.
    async fn online(&self) -> Result<Vec<String>, RegistryError>;
}

/// A [`Registry`] for one process.
#[derive(Default)]
pub struct InMemoryRegistry {
    state: Mutex<RegistryState>,
}

/// Users map to their connections; sorted maps make the sorted listings free.
#[derive(Default)]
struct RegistryState {
    online: BTreeMap<String, HashSet<String>>,
    rooms: BTreeMap<String, BTreeMap<String, HashSet<String>>>,
}

impl InMemoryRegistry {
    fn state(&self) -> MutexGuard<'_, RegistryState> {
        // Each critical section is a single map edit, consistent at every step.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Adds `connection` under `user`; `true` when the user had none before.
fn add(map: &mut BTreeMap<String, HashSet<String>>, user: &str, connection: &str) -> bool {
    let connections = map.entry(user.to_owned()).or_default();
    let first = connections.is_empty();
    connections.insert(connection.to_owned());
    first
}

/// Removes `connection` from `user`; `true` when that was the user's last one.
fn remove(map: &mut BTreeMap<String, HashSet<String>>, user: &str, connection: &str) -> bool {
    let Some(connections) = map.get_mut(user) else {
        return false;
    };
    if !connections.remove(connection) || !connections.is_empty() {
        return false;
    }
    map.remove(user);
    true
}

#[async_trait]
impl Registry for InMemoryRegistry {
    async fn connect(&self, user: &str, connection: &str) -> Result<bool, RegistryError> {
        Ok(add(&mut self.state().online, user, connection))
    }

    async fn disconnect(&self, user: &str, connection: &str) -> Result<bool, RegistryError> {
        Ok(remove(&mut self.state().online, user, connection))
    }

    async fn join(&self, room: &str, user: &str, connection: &str) -> Result<bool, RegistryError> {
        let mut state = self.state();
        let members = state.rooms.entry(room.to_owned()).or_default();
        Ok(add(members, user, connection))
    }

    async fn leave(&self, room: &str, user: &str, connection: &str) -> Result<bool, RegistryError> {
        let mut state = self.state();
        let Some(members) = state.rooms.get_mut(room) else {
            return Ok(false);
        };
        let last = remove(members, user, connection);
        if members.is_empty() {
            state.rooms.remove(room);
        }
        Ok(last)
    }

    async fn members(&self, room: &str) -> Result<Vec<String>, RegistryError> {
        Ok(self
            .state()
            .rooms
            .get(room)
            .map(|members| members.keys().cloned().collect())
            .unwrap_or_default())
    }

    async fn online(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self.state().online.keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn edges_fire_on_first_and_last_connection_only() {
        let registry = InMemoryRegistry::default();
        assert!(registry.connect("alice", "c1").await.unwrap());
        assert!(!registry.connect("alice", "c2").await.unwrap());
        assert!(registry.connect("bob", "c3").await.unwrap());
        assert_eq!(registry.online().await.unwrap(), ["alice", "bob"]);

        assert!(registry.join("lobby", "alice", "c1").await.unwrap());
        assert!(!registry.join("lobby", "alice", "c2").await.unwrap());
        assert!(
            !registry.join("lobby", "alice", "c2").await.unwrap(),
            "joining twice is harmless"
        );
        assert!(registry.join("lobby", "bob", "c3").await.unwrap());
        assert_eq!(registry.members("lobby").await.unwrap(), ["alice", "bob"]);

        assert!(!registry.leave("lobby", "alice", "c1").await.unwrap());
        assert!(registry.leave("lobby", "alice", "c2").await.unwrap());
        assert!(
            !registry.leave("lobby", "alice", "c2").await.unwrap(),
            "leaving twice is harmless"
        );
        assert_eq!(registry.members("lobby").await.unwrap(), ["bob"]);

        assert!(!registry.disconnect("alice", "c1").await.unwrap());
        assert!(registry.disconnect("alice", "c2").await.unwrap());
        assert!(!registry.disconnect("alice", "c2").await.unwrap());
        assert_eq!(registry.online().await.unwrap(), ["bob"]);
        assert!(registry.members("nowhere").await.unwrap().is_empty());
    }
}
