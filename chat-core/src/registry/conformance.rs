//! The conformance suite every [`Registry`] backend must pass (cargo feature `testing`).
//!
//! Each check is an async function that takes a factory, `Fn() -> impl Future<Output =
//! Arc<dyn Registry>>`, and panics on a broken contract. Every registry a factory returns must be
//! empty and separate from the others (a shared server: its own key prefix), because checks run
//! in parallel.
//!
//! Lease checks use wall-clock time: leases of a few hundred milliseconds and waits of twice
//! that, because a network backend keeps time on its own clock. They never assert how fast
//! anything is.
//!
//! The [`registry_conformance_tests!`](crate::registry_conformance_tests) macro expands to one
//! `#[tokio::test]` per check (the calling crate needs `tokio` with the `macros` and
//! `rt-multi-thread` features):
//!
//! ```ignore
//! chat_core::registry_conformance_tests!(|| async {
//!     std::sync::Arc::new(chat_core::registry::InMemoryRegistry::default())
//!         as std::sync::Arc<dyn chat_core::registry::Registry>
//! });
//! ```

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Departure, Lease, Page, Registry};

/// A lease no check outlives.
const LONG: Duration = Duration::from_secs(60);
/// A lease a check lets lapse.
const SHORT: Duration = Duration::from_millis(300);

fn left(room: &str, user: &str) -> (String, String) {
    (room.to_owned(), user.to_owned())
}

/// The departures as comparable facts, versions aside.
fn facts(departures: &[Departure]) -> HashSet<(String, String)> {
    departures
        .iter()
        .map(|departure| match departure {
            Departure::Left { room, user, .. } => left(room, user),
            Departure::Offline { user, .. } => (String::new(), user.clone()),
        })
        .collect()
}

fn version(departure: &Departure) -> u64 {
    match departure {
        Departure::Left { version, .. } | Departure::Offline { version, .. } => *version,
    }
}

/// Online and offline edges fire on a user's first and last connection only, whatever the
/// number of tabs; listings are sorted.
pub async fn presence_edges<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    registry.heartbeat("n1", LONG).await.unwrap();
    assert!(registry.connect("n1", "bob", "c1").await.unwrap().is_some());
    assert!(registry
        .connect("n1", "alice", "c2")
        .await
        .unwrap()
        .is_some());
    assert!(registry
        .connect("n1", "alice", "c3")
        .await
        .unwrap()
        .is_none());
    assert_eq!(registry.online().await.unwrap().users, ["alice", "bob"]);

    assert!(registry.disconnect("alice", "c2").await.unwrap().is_empty());
    assert_eq!(registry.online().await.unwrap().users, ["alice", "bob"]);
    let gone = registry.disconnect("alice", "c3").await.unwrap();
    assert_eq!(facts(&gone), HashSet::from([left("", "alice")]));
    assert!(
        registry.disconnect("alice", "c3").await.unwrap().is_empty(),
        "disconnecting twice crosses nothing"
    );
    assert_eq!(registry.online().await.unwrap().users, ["bob"]);
}

/// Room edges fire on a user's first and last connection in the room; joining and leaving twice
/// are harmless; members are sorted.
pub async fn room_edges<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    registry.heartbeat("n1", LONG).await.unwrap();
    for (user, connection) in [("carol", "c1"), ("alice", "c2"), ("alice", "c3")] {
        registry.connect("n1", user, connection).await.unwrap();
    }
    assert!(registry
        .join("lobby", "carol", "c1")
        .await
        .unwrap()
        .is_some());
    assert!(registry
        .join("lobby", "alice", "c2")
        .await
        .unwrap()
        .is_some());
    assert!(registry
        .join("lobby", "alice", "c3")
        .await
        .unwrap()
        .is_none());
    assert!(
        registry
            .join("lobby", "alice", "c3")
            .await
            .unwrap()
            .is_none(),
        "joining twice is harmless"
    );
    assert!(registry
        .join("other", "alice", "c3")
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        registry.members("lobby").await.unwrap().users,
        ["alice", "carol"]
    );

    assert!(registry
        .leave("lobby", "alice", "c2")
        .await
        .unwrap()
        .is_none());
    assert!(registry
        .leave("lobby", "alice", "c3")
        .await
        .unwrap()
        .is_some());
    assert!(
        registry
            .leave("lobby", "alice", "c3")
            .await
            .unwrap()
            .is_none(),
        "leaving twice is harmless"
    );
    assert_eq!(registry.members("lobby").await.unwrap().users, ["carol"]);
    assert_eq!(registry.members("other").await.unwrap().users, ["alice"]);
    assert!(registry.members("nowhere").await.unwrap().users.is_empty());
}

/// Closing a connection takes it out of every room, reporting each room it was the user's last
/// connection in, then `Offline` when it was the user's last connection.
pub async fn disconnect_leaves_every_room<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    registry.heartbeat("n1", LONG).await.unwrap();
    registry.connect("n1", "alice", "c1").await.unwrap();
    registry.connect("n1", "alice", "c2").await.unwrap();
    registry.join("a", "alice", "c1").await.unwrap();
    registry.join("b", "alice", "c1").await.unwrap();
    registry.join("b", "alice", "c2").await.unwrap();

    let gone = registry.disconnect("alice", "c1").await.unwrap();
    assert_eq!(
        facts(&gone),
        HashSet::from([left("a", "alice")]),
        "room b and presence still hold through c2"
    );
    assert!(registry.members("a").await.unwrap().users.is_empty());
    assert_eq!(registry.members("b").await.unwrap().users, ["alice"]);

    let gone = registry.disconnect("alice", "c2").await.unwrap();
    assert_eq!(
        facts(&gone),
        HashSet::from([left("b", "alice"), left("", "alice")])
    );
    assert!(
        matches!(gone.last(), Some(Departure::Offline { .. })),
        "offline comes after the rooms: {gone:?}"
    );
    assert!(registry.online().await.unwrap().users.is_empty());
}

/// Every edge's version is greater than every earlier one's, and a listing is as of the newest
/// edge it reflects: later edges have greater versions.
pub async fn versions_order_edges_and_listings<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    registry.heartbeat("n1", LONG).await.unwrap();
    let mut last = 0;
    fn check(last: &mut u64, version: u64) {
        assert!(version > *last, "version {version} after {last}");
        *last = version;
    }
    let edge = registry.connect("n1", "a", "c1").await.unwrap().unwrap();
    check(&mut last, edge.version);
    let edge = registry.join("r", "a", "c1").await.unwrap().unwrap();
    check(&mut last, edge.version);
    let edge = registry.connect("n1", "b", "c2").await.unwrap().unwrap();
    check(&mut last, edge.version);
    let online = registry.online().await.unwrap();
    assert_eq!(online.version, last, "the listing is as of the newest edge");
    let members = registry.members("r").await.unwrap();
    assert_eq!(members.version, last);
    let edge = registry.leave("r", "a", "c1").await.unwrap().unwrap();
    check(&mut last, edge.version);
    for departure in registry.disconnect("b", "c2").await.unwrap() {
        check(&mut last, version(&departure));
    }
    let edge = registry.connect("n1", "b", "c3").await.unwrap().unwrap();
    check(&mut last, edge.version);
    assert!(registry.online().await.unwrap().version >= last);
}

/// Many tabs of one user opening and closing at once, from many tasks: the online and offline
/// edges, ordered by version, alternate (online first), and the user ends offline.
pub async fn concurrent_tabs_alternate<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    registry.heartbeat("n1", LONG).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..8 {
        let registry = Arc::clone(&registry);
        tasks.push(tokio::spawn(async move {
            let mut edges = Vec::new();
            for round in 0..25 {
                let connection = format!("c{task}-{round}");
                if let Some(edge) = registry.connect("n1", "eve", &connection).await.unwrap() {
                    edges.push((edge.version, true));
                }
                tokio::task::yield_now().await;
                for departure in registry.disconnect("eve", &connection).await.unwrap() {
                    edges.push((version(&departure), false));
                }
            }
            edges
        }));
    }
    let mut edges = Vec::new();
    for task in tasks {
        edges.extend(task.await.unwrap());
    }
    edges.sort_unstable();
    assert!(!edges.is_empty());
    for (i, (_, online)) in edges.iter().enumerate() {
        assert_eq!(*online, i % 2 == 0, "edges out of turn: {edges:?}");
    }
    assert!(registry.online().await.unwrap().users.is_empty());
}

/// A connection only exists under a live lease, and only a registered connection joins rooms.
pub async fn registration_needs_a_lease<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    assert!(
        registry.connect("ghost", "alice", "c1").await.is_err(),
        "a node without a lease registered a connection"
    );
    registry.heartbeat("n1", LONG).await.unwrap();
    assert!(
        registry.join("lobby", "alice", "c1").await.is_err(),
        "an unregistered connection joined a room"
    );
    assert!(registry.online().await.unwrap().users.is_empty());
    assert!(registry.members("lobby").await.unwrap().users.is_empty());
}

/// A node's first heartbeat creates its lease and later ones renew it; once the lease lapsed and
/// was swept, the next heartbeat says the lease was made anew.
pub async fn heartbeats_report_a_lost_lease<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    assert_eq!(
        registry.heartbeat("n1", SHORT).await.unwrap(),
        Lease::Created
    );
    assert_eq!(
        registry.heartbeat("n1", SHORT).await.unwrap(),
        Lease::Renewed
    );
    tokio::time::sleep(SHORT * 2).await;
    assert_eq!(
        registry.heartbeat("n1", SHORT).await.unwrap(),
        Lease::Renewed,
        "a lapsed lease nobody swept is simply renewed"
    );
    tokio::time::sleep(SHORT * 2).await;
    registry.sweep().await.unwrap();
    assert_eq!(
        registry.heartbeat("n1", LONG).await.unwrap(),
        Lease::Created
    );
}

/// Sweeping leaves the connections of live nodes alone.
pub async fn live_nodes_are_not_swept<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    registry.heartbeat("n1", LONG).await.unwrap();
    registry.connect("n1", "alice", "c1").await.unwrap();
    registry.join("lobby", "alice", "c1").await.unwrap();
    assert!(registry.sweep().await.unwrap().is_empty());
    assert_eq!(registry.online().await.unwrap().users, ["alice"]);
    assert_eq!(registry.members("lobby").await.unwrap().users, ["alice"]);
}

/// A node that stops renewing its lease is swept: its connections leave their rooms and go
/// offline, each edge reported once even when several nodes sweep at the same moment, and a user
/// still connected through a live node stays online and in the room.
pub async fn lapsed_nodes_are_swept_once<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    registry.heartbeat("dead", SHORT).await.unwrap();
    registry.heartbeat("live", LONG).await.unwrap();
    for (node, user, connection) in [
        ("dead", "alice", "a1"),
        ("dead", "alice", "a2"),
        ("dead", "bob", "b1"),
        ("live", "bob", "b2"),
        ("live", "carol", "c1"),
    ] {
        registry.connect(node, user, connection).await.unwrap();
        registry.join("lobby", user, connection).await.unwrap();
    }
    registry.join("side", "alice", "a1").await.unwrap();
    tokio::time::sleep(SHORT * 2).await;
    registry.heartbeat("live", LONG).await.unwrap();

    let sweeps: Vec<_> = (0..4)
        .map(|_| {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move { registry.sweep().await.unwrap() })
        })
        .collect();
    let mut departures = Vec::new();
    for sweep in sweeps {
        departures.extend(sweep.await.unwrap());
    }
    assert_eq!(
        departures.len(),
        3,
        "each edge reported once: {departures:?}"
    );
    assert_eq!(
        facts(&departures),
        HashSet::from([
            left("lobby", "alice"),
            left("side", "alice"),
            left("", "alice")
        ])
    );
    assert_eq!(registry.online().await.unwrap().users, ["bob", "carol"]);
    assert_eq!(
        registry.members("lobby").await.unwrap().users,
        ["bob", "carol"]
    );
    assert!(registry.members("side").await.unwrap().users.is_empty());
    assert!(
        registry.disconnect("alice", "a1").await.unwrap().is_empty(),
        "a swept connection crosses no edge again"
    );
    assert!(
        registry.connect("dead", "dave", "d1").await.is_err(),
        "a swept node registered a connection without renewing its lease"
    );
}

/// Listings come in pages of sorted names after a given name, with the whole list's size and
/// whether more follow; edges carry the size right after the change.
pub async fn listings_page_and_count<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    registry.heartbeat("n1", LONG).await.unwrap();
    let users = ["dave", "alice", "erin", "carol", "bob"];
    for (i, user) in users.iter().enumerate() {
        let online = registry.connect("n1", user, &format!("c{i}")).await;
        assert_eq!(online.unwrap().unwrap().count, i + 1, "online count");
        let joined = registry.join("r", user, &format!("c{i}")).await;
        assert_eq!(joined.unwrap().unwrap().count, i + 1, "member count");
    }
    let first = registry.members_page("r", Page::first(2)).await.unwrap();
    assert_eq!(first.users, ["alice", "bob"]);
    assert_eq!((first.count, first.more), (5, true));
    let next = Page {
        after: Some("bob"),
        limit: 2,
    };
    let second = registry.members_page("r", next).await.unwrap();
    assert_eq!(second.users, ["carol", "dave"]);
    assert!(second.more);
    let last = Page {
        after: Some("dave"),
        limit: 2,
    };
    let third = registry.members_page("r", last).await.unwrap();
    assert_eq!(
        (third.users.as_slice(), third.more),
        (&["erin".to_owned()][..], false)
    );
    let between = Page {
        after: Some("bz"),
        limit: 10,
    };
    let rest = registry.members_page("r", between).await.unwrap();
    assert_eq!(
        rest.users,
        ["carol", "dave", "erin"],
        "after a name not in the list"
    );
    let exact = registry.members_page("r", Page::first(5)).await.unwrap();
    assert!(!exact.more, "a page that ends the list exactly says so");
    let none = registry
        .members_page("empty", Page::first(5))
        .await
        .unwrap();
    assert_eq!((none.users.len(), none.count, none.more), (0, 0, false));

    let online = registry.online_page(Page::first(3)).await.unwrap();
    assert_eq!(online.users, ["alice", "bob", "carol"]);
    assert_eq!((online.count, online.more), (5, true));

    let left = registry.leave("r", "erin", "c2").await.unwrap().unwrap();
    assert_eq!(left.count, 4);
    let departures = registry.disconnect("dave", "c0").await.unwrap();
    assert!(
        departures.iter().any(|departure| matches!(
            departure,
            Departure::Left { room, count: 3, .. } if room == "r"
        )),
        "a departure carries the room's size after it: {departures:?}"
    );
}

/// A live registry answers a readiness ping, with or without a lease held.
pub async fn a_live_registry_answers_a_ping<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    registry.ping().await.unwrap();
    registry.heartbeat("n1", LONG).await.unwrap();
    registry.connect("n1", "alice", "c1").await.unwrap();
    registry.ping().await.unwrap();
}

/// One member-count announcement is pending per room at a time, across every caller; releasing
/// it returns the count with every change made while it was held, and a claim never released
/// lapses.
pub async fn count_claims_take_turns<F, Fut>(factory: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let registry = factory().await;
    registry.heartbeat("n1", LONG).await.unwrap();
    registry.connect("n1", "alice", "c1").await.unwrap();
    registry.connect("n1", "bob", "c2").await.unwrap();
    registry.join("r", "alice", "c1").await.unwrap();

    assert!(registry.claim_count("r", LONG).await.unwrap());
    assert!(
        !registry.claim_count("r", LONG).await.unwrap(),
        "one claim at a time"
    );
    assert!(
        registry.claim_count("other", LONG).await.unwrap(),
        "claims are per room"
    );
    let edge = registry.join("r", "bob", "c2").await.unwrap().unwrap();
    let count = registry.release_count("r").await.unwrap();
    assert_eq!(
        count.count, 2,
        "the change made while claimed is in the count"
    );
    assert!(count.version >= edge.version);
    assert!(
        registry.claim_count("r", LONG).await.unwrap(),
        "released: free again"
    );

    assert!(registry.claim_count("lapsing", SHORT).await.unwrap());
    tokio::time::sleep(SHORT * 2).await;
    assert!(
        registry.claim_count("lapsing", LONG).await.unwrap(),
        "a claim never released lapses"
    );
}

/// Expands to one `#[tokio::test]` per check of the suite, each calling it with `$factory`.
#[macro_export]
macro_rules! registry_conformance_tests {
    ($factory:expr) => {
        $crate::registry_conformance_tests!(@each $factory;
            presence_edges, room_edges, disconnect_leaves_every_room,
            versions_order_edges_and_listings, concurrent_tabs_alternate,
            registration_needs_a_lease, heartbeats_report_a_lost_lease, live_nodes_are_not_swept,
            lapsed_nodes_are_swept_once, listings_page_and_count, count_claims_take_turns,
            a_live_registry_answers_a_ping);
    };
    (@each $factory:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $crate::registry::conformance::$check(&$factory).await;
            }
        )*
    };
}
