//! Rooms and presence: which connections of which users are in which room, and who is online,
//! across every node of a deployment.
//!
//! The multi-tab rule lives here: a user is online, and a member of a room, until their *last*
//! connection leaves. Every change reports whether it crossed that edge, so the engine fires
//! `member` and `presence` events exactly on the edges and never once per tab.
//!
//! Two mechanisms make the registry safe to share between nodes:
//!
//! - **Versions.** Every edge gets a number from one counter that only grows, and every listing
//!   says which number it is as of. Events travel to clients by different paths and may overtake
//!   each other; a connection drops any event whose version is older than what it already knows
//!   about that user, so a reload's `offline` can never land after the new tab's `online`.
//! - **Leases.** Each node renews a lease ([`Registry::heartbeat`]); its connections exist only
//!   under it. A node that dies without saying goodbye stops renewing, and the next
//!   [`Registry::sweep`] by any other node removes its connections and returns the edges that
//!   crossed, so someone announces the `offline` and `leave` events within the lease.
//!
//! The engine speaks to the registry only through the [`Registry`] trait. [`InMemoryRegistry`] is
//! the one-process implementation (also shared by the nodes of a multi-node test);
//! `RedisRegistry` (cargo feature `redis`) spans processes. Every backend is expected to pass
//! the conformance suite in `chat_core::registry::conformance` (cargo feature `testing`).

mod memory;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "testing")]
pub mod conformance;

use std::time::Duration;

use async_trait::async_trait;

#[cfg(feature = "redis")]
pub use self::redis::RedisRegistry;
pub use memory::InMemoryRegistry;

/// Reads one page of a sorted set: O(log n + page).
pub(crate) fn page_of<V>(
    set: &std::collections::BTreeMap<String, V>,
    page: Page<'_>,
) -> (Vec<String>, bool) {
    use std::ops::Bound;
    let start = match page.after {
        Some(after) => Bound::Excluded(after),
        None => Bound::Unbounded,
    };
    let mut names = set
        .range::<str, _>((start, Bound::Unbounded))
        .map(|(name, _)| name);
    let users: Vec<String> = names.by_ref().take(page.limit).cloned().collect();
    let more = names.next().is_some();
    (users, more)
}

/// A registry failure: the change did not happen, and may be retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registry unavailable: {0}")]
pub struct RegistryError(pub String);

/// A change crossed the user's first- or last-connection edge; the number orders it among all
/// edges of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Edge {
    /// Greater than the version of every edge before it.
    pub version: u64,
    /// How many users the room (or `online`) holds right after the change.
    pub count: usize,
}

/// An edge that a connection's departure crossed: the user's last connection left a room, or the
/// user's last connection closed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Departure {
    /// The user is no longer in `room`.
    Left {
        /// The room.
        room: String,
        /// The user.
        user: String,
        /// The edge's version.
        version: u64,
        /// The users left in the room.
        count: usize,
    },
    /// The user has no connection left anywhere.
    Offline {
        /// The user.
        user: String,
        /// The edge's version.
        version: u64,
    },
}

/// A page of a sorted list of users, and the version it is as of: it reflects every edge up to
/// `version` and none after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The users of the page, sorted.
    pub users: Vec<String>,
    /// The newest edge version the listing reflects.
    pub version: u64,
    /// How many users the whole list holds (not only this page).
    pub count: usize,
    /// Whether users follow after this page.
    pub more: bool,
}

/// Which part of a sorted list of users to read: up to `limit` names after `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page<'a> {
    /// Only names sorting after this one (`None`: from the start).
    pub after: Option<&'a str>,
    /// At most this many names.
    pub limit: usize,
}

impl Page<'_> {
    /// The whole list in one page; for tests and small deployments.
    pub const ALL: Page<'static> = Page {
        after: None,
        limit: usize::MAX,
    };

    /// The first `limit` names.
    pub fn first(limit: usize) -> Self {
        Page { after: None, limit }
    }
}

/// The member count of a room and the registry version it is as of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// The users in the room.
    pub count: usize,
    /// The newest edge version the count reflects.
    pub version: u64,
}

/// What a [`Registry::heartbeat`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// The node had no lease, so one was made. On any heartbeat but a node's first this means
    /// its lease lapsed and was swept: every connection it had registered is gone.
    Created,
    /// The node's lease was renewed (even if it had lapsed, as long as nobody swept it yet).
    Renewed,
}

/// Membership and presence, connection by connection, under node leases.
///
/// Connections are named by strings unique across the deployment (the engine uses its channel
/// names), nodes likewise. Every method is atomic: concurrent callers on any node see each change
/// whole, and edges are reported to exactly one caller.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Creates or renews `node`'s lease for `ttl` from now.
    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<Lease, RegistryError>;

    /// Records a new connection of `user` under `node`'s lease; `Some` when it is the user's
    /// first (they came online). Fails when `node` holds no lease.
    async fn connect(
        &self,
        node: &str,
        user: &str,
        connection: &str,
    ) -> Result<Option<Edge>, RegistryError>;

    /// Forgets a connection and its room memberships, and returns the edges that crossed (its
    /// rooms' `Left` first, then `Offline`). An unknown connection (already swept) crosses none.
    async fn disconnect(
        &self,
        user: &str,
        connection: &str,
    ) -> Result<Vec<Departure>, RegistryError>;

    /// Puts a connection in a room; `Some` when it is the user's first connection there. Fails
    /// when the connection is not registered (never connected, or swept).
    async fn join(
        &self,
        room: &str,
        user: &str,
        connection: &str,
    ) -> Result<Option<Edge>, RegistryError>;

    /// Takes a connection out of a room; `Some` when it was the user's last connection there.
    async fn leave(
        &self,
        room: &str,
        user: &str,
        connection: &str,
    ) -> Result<Option<Edge>, RegistryError>;

    /// A page of the users with at least one connection in `room`, with their count. Costs
    /// O(log n + page), never O(members).
    async fn members_page(&self, room: &str, page: Page<'_>) -> Result<Listing, RegistryError>;

    /// A page of the users with at least one live connection, with their count.
    async fn online_page(&self, page: Page<'_>) -> Result<Listing, RegistryError>;

    /// Every user in `room` (one unbounded page).
    async fn members(&self, room: &str) -> Result<Listing, RegistryError> {
        self.members_page(room, Page::ALL).await
    }

    /// Every online user (one unbounded page).
    async fn online(&self) -> Result<Listing, RegistryError> {
        self.online_page(Page::ALL).await
    }

    /// Claims the next announcement of `room`'s member count (protocol 1.1 `member_count`, sent
    /// at most once a second per room across every node). `true`: nobody held the claim, and
    /// the caller must announce and later [`release_count`](Registry::release_count); `false`:
    /// someone else's announcement is pending and will include this change. A claim never
    /// released (its node died) lapses after `ttl`.
    async fn claim_count(&self, room: &str, ttl: Duration) -> Result<bool, RegistryError>;

    /// Ends the caller's claim and returns the room's count as of that moment: every change made
    /// while the claim was held is reflected in it.
    async fn release_count(&self, room: &str) -> Result<Count, RegistryError>;

    /// Removes every connection of every node whose lease has lapsed, and returns the edges that
    /// crossed, each to exactly one caller however many nodes sweep at once.
    async fn sweep(&self) -> Result<Vec<Departure>, RegistryError>;

    /// Whether the registry answers now, for readiness checks. The default reads one user of
    /// the online list.
    async fn ping(&self) -> Result<(), RegistryError> {
        self.online_page(Page::first(1)).await.map(drop)
    }
}
