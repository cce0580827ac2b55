//! [`InMemoryRegistry`]: the registry for one process.
//!
//! One mutex guards everything; every operation is one short critical section with no await,
//! which makes each atomic as the trait requires. Leases run on tokio's clock, so tests can pause
//! and advance it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{page_of, Count, Departure, Edge, Lease, Listing, Page, Registry, RegistryError};

/// A [`Registry`] in memory: one process, or several nodes sharing it inside one process.
///
/// ```
/// use std::time::Duration;
/// use chat_core::registry::{InMemoryRegistry, Registry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::registry::RegistryError> {
/// let registry = InMemoryRegistry::default();
/// registry.heartbeat("node-1", Duration::from_secs(30)).await?;
/// let first = registry.connect("node-1", "alice", "conn.1").await?;
/// let second = registry.connect("node-1", "alice", "conn.2").await?;
/// assert!(first.is_some() && second.is_none(), "only the first tab brings alice online");
/// assert_eq!(registry.online().await?.users, ["alice"]);
/// # Ok(())
/// # }
/// ```
#[derive(Default)]
pub struct InMemoryRegistry {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The newest edge's version.
    version: u64,
    /// Each node's lease, until when.
    nodes: HashMap<String, Instant>,
    node_connections: HashMap<String, HashSet<String>>,
    connections: HashMap<String, Connection>,
    /// Users map to their connections; sorted maps make the sorted listings free.
    online: BTreeMap<String, HashSet<String>>,
    rooms: BTreeMap<String, BTreeMap<String, HashSet<String>>>,
    /// Pending member-count announcements, until when they lapse.
    count_claims: HashMap<String, Instant>,
}

struct Connection {
    node: String,
    user: String,
    rooms: BTreeSet<String>,
}

impl InMemoryRegistry {
    fn state(&self) -> MutexGuard<'_, State> {
        // Each critical section leaves the maps consistent at every step.
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

impl State {
    fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn edge(&mut self, crossed: bool, count: usize) -> Option<Edge> {
        crossed.then(|| Edge {
            version: self.next_version(),
            count,
        })
    }

    fn room_count(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, BTreeMap::len)
    }

    fn leave_room(&mut self, room: &str, user: &str, connection: &str) -> Option<Edge> {
        let members = self.rooms.get_mut(room)?;
        let last = remove(members, user, connection);
        let count = members.len();
        if members.is_empty() {
            self.rooms.remove(room);
        }
        self.edge(last, count)
    }

    /// Removes a connection entirely, returning the edges it crossed.
    fn remove_connection(&mut self, connection: &str) -> Vec<Departure> {
        let Some(entry) = self.connections.remove(connection) else {
            return Vec::new();
        };
        if let Some(set) = self.node_connections.get_mut(&entry.node) {
            set.remove(connection);
            if set.is_empty() {
                self.node_connections.remove(&entry.node);
            }
        }
        let mut departures = Vec::new();
        for room in entry.rooms {
            if let Some(edge) = self.leave_room(&room, &entry.user, connection) {
                departures.push(Departure::Left {
                    room,
                    user: entry.user.clone(),
                    version: edge.version,
                    count: edge.count,
                });
            }
        }
        let last = remove(&mut self.online, &entry.user, connection);
        let count = self.online.len();
        if let Some(edge) = self.edge(last, count) {
            departures.push(Departure::Offline {
                user: entry.user,
                version: edge.version,
            });
        }
        departures
    }

    fn listing<V>(&self, set: Option<&BTreeMap<String, V>>, page: Page<'_>) -> Listing {
        let Some(set) = set else {
            return Listing {
                version: self.version,
                ..Listing::default()
            };
        };
        let (users, more) = page_of(set, page);
        Listing {
            users,
            version: self.version,
            count: set.len(),
            more,
        }
    }
}

#[async_trait]
impl Registry for InMemoryRegistry {
    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<Lease, RegistryError> {
        let until = Instant::now() + ttl;
        let mut state = self.state();
        Ok(match state.nodes.insert(node.to_owned(), until) {
            Some(_) => Lease::Renewed,
            None => Lease::Created,
        })
    }

    async fn connect(
        &self,
        node: &str,
        user: &str,
        connection: &str,
    ) -> Result<Option<Edge>, RegistryError> {
        let mut state = self.state();
        if !state.nodes.contains_key(node) {
            return Err(RegistryError(format!("node {node} holds no lease")));
        }
        if state.connections.contains_key(connection) {
            return Ok(None);
        }
        state.connections.insert(
            connection.to_owned(),
            Connection {
                node: node.to_owned(),
                user: user.to_owned(),
                rooms: BTreeSet::new(),
            },
        );
        state
            .node_connections
            .entry(node.to_owned())
            .or_default()
            .insert(connection.to_owned());
        let first = add(&mut state.online, user, connection);
        let count = state.online.len();
        Ok(state.edge(first, count))
    }

    async fn disconnect(
        &self,
        _user: &str,
        connection: &str,
    ) -> Result<Vec<Departure>, RegistryError> {
        Ok(self.state().remove_connection(connection))
    }

    async fn join(
        &self,
        room: &str,
        user: &str,
        connection: &str,
    ) -> Result<Option<Edge>, RegistryError> {
        let mut state = self.state();
        match state.connections.get_mut(connection) {
            Some(entry) if entry.user == user => entry.rooms.insert(room.to_owned()),
            _ => {
                return Err(RegistryError(format!(
                    "connection {connection} of {user} is not registered"
                )))
            }
        };
        let members = state.rooms.entry(room.to_owned()).or_default();
        let first = add(members, user, connection);
        let count = members.len();
        Ok(state.edge(first, count))
    }

    async fn leave(
        &self,
        room: &str,
        user: &str,
        connection: &str,
    ) -> Result<Option<Edge>, RegistryError> {
        let mut state = self.state();
        if let Some(entry) = state.connections.get_mut(connection) {
            entry.rooms.remove(room);
        }
        Ok(state.leave_room(room, user, connection))
    }

    async fn members_page(&self, room: &str, page: Page<'_>) -> Result<Listing, RegistryError> {
        let state = self.state();
        Ok(state.listing(state.rooms.get(room), page))
    }

    async fn online_page(&self, page: Page<'_>) -> Result<Listing, RegistryError> {
        let state = self.state();
        Ok(state.listing(Some(&state.online), page))
    }

    async fn claim_count(&self, room: &str, ttl: Duration) -> Result<bool, RegistryError> {
        let now = Instant::now();
        let mut state = self.state();
        if state
            .count_claims
            .get(room)
            .is_some_and(|until| *until > now)
        {
            return Ok(false);
        }
        state.count_claims.insert(room.to_owned(), now + ttl);
        Ok(true)
    }

    async fn release_count(&self, room: &str) -> Result<Count, RegistryError> {
        let mut state = self.state();
        state.count_claims.remove(room);
        Ok(Count {
            count: state.room_count(room),
            version: state.version,
        })
    }

    async fn sweep(&self) -> Result<Vec<Departure>, RegistryError> {
        let now = Instant::now();
        let mut state = self.state();
        let lapsed: Vec<String> = state
            .nodes
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(node, _)| node.clone())
            .collect();
        let mut departures = Vec::new();
        for node in lapsed {
            state.nodes.remove(&node);
            let connections = state.node_connections.remove(&node).unwrap_or_default();
            for connection in connections {
                departures.extend(state.remove_connection(&connection));
            }
        }
        Ok(departures)
    }
}
