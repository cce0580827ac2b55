//! Several nodes in one process: each a `Chat` of its own, sharing one channel layer, one
//! registry and one store, as the nodes of a deployment share Redis and a database. Each node
//! reaches the layer through its own `FaultyLayer` (delays that make messages overtake each other,
//! losses, outages) and the registry through a cable the test can cut (a node that dies without
//! saying goodbye).
//!
//! Every test runs twice: on the in-memory backends (shared by the nodes), and on the Redis
//! backends (cargo feature `redis`), where each node has its own connections to one Redis under
//! one prefix, exactly as separate processes would.

#![allow(clippy::unwrap_used)]

mod common;
#[cfg(feature = "redis")]
mod redis_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_core::layer::{ChannelLayer, FaultyLayer, InMemoryChannelLayer, LayerConfig};
use chat_core::registry::{
    Count, Departure, Edge, InMemoryRegistry, Lease, Listing, Page, Registry, RegistryError,
};
use chat_core::store::{HistoryStore, InMemoryHistoryStore};
use chat_core::{Chat, ChatConfig};
use common::{Client, Watcher};
use serde_json::{json, Value};

/// A node's connection to the shared registry, which the test can cut.
struct Cable {
    registry: Arc<dyn Registry>,
    cut: AtomicBool,
}

impl Cable {
    fn check(&self) -> Result<(), RegistryError> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(RegistryError("cable cut".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Registry for Cable {
    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<Lease, RegistryError> {
        self.check()?;
        self.registry.heartbeat(node, ttl).await
    }
    async fn connect(
        &self,
        node: &str,
        user: &str,
        c: &str,
    ) -> Result<Option<Edge>, RegistryError> {
        self.check()?;
        self.registry.connect(node, user, c).await
    }
    async fn disconnect(&self, user: &str, c: &str) -> Result<Vec<Departure>, RegistryError> {
        self.check()?;
        self.registry.disconnect(user, c).await
    }
    async fn join(&self, room: &str, user: &str, c: &str) -> Result<Option<Edge>, RegistryError> {
        self.check()?;
        self.registry.join(room, user, c).await
    }
    async fn leave(&self, room: &str, user: &str, c: &str) -> Result<Option<Edge>, RegistryError> {
        self.check()?;
        self.registry.leave(room, user, c).await
    }
    async fn members_page(&self, room: &str, page: Page<'_>) -> Result<Listing, RegistryError> {
        self.check()?;
        self.registry.members_page(room, page).await
    }
    async fn online_page(&self, page: Page<'_>) -> Result<Listing, RegistryError> {
        self.check()?;
        self.registry.online_page(page).await
    }
    async fn claim_count(&self, room: &str, ttl: Duration) -> Result<bool, RegistryError> {
        self.check()?;
        self.registry.claim_count(room, ttl).await
    }
    async fn release_count(&self, room: &str) -> Result<Count, RegistryError> {
        self.check()?;
        self.registry.release_count(room).await
    }
    async fn sweep(&self) -> Result<Vec<Departure>, RegistryError> {
        self.check()?;
        self.registry.sweep().await
    }
}

struct Node {
    chat: Chat,
    layer: FaultyLayer,
    cable: Arc<Cable>,
}

struct Cluster {
    nodes: Vec<Node>,
}

/// Where the nodes' shared state lives.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    #[cfg(feature = "redis")]
    Redis,
    /// The in-memory layer and registry, and a PostgreSQL store per node on one schema: what
    /// makes ids of different nodes commit in order.
    #[cfg(feature = "postgres")]
    Postgres,
}

/// One node's three backends.
type Parts = (
    Arc<dyn ChannelLayer>,
    Arc<dyn Registry>,
    Arc<dyn HistoryStore>,
);

impl Cluster {
    async fn new(backend: Backend, count: usize, config: ChatConfig) -> Self {
        let layer_config =
            LayerConfig::default().with_channel_capacity("conn.*", config.connection_backlog);
        let mut parts: Vec<Parts> = Vec::new();
        match backend {
            Backend::Memory => {
                let layer: Arc<dyn ChannelLayer> =
                    Arc::new(InMemoryChannelLayer::new(layer_config));
                let registry: Arc<dyn Registry> = Arc::new(InMemoryRegistry::default());
                let store: Arc<dyn HistoryStore> = Arc::new(InMemoryHistoryStore::default());
                for _ in 0..count {
                    parts.push((layer.clone(), registry.clone(), store.clone()));
                }
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres => {
                let layer: Arc<dyn ChannelLayer> =
                    Arc::new(InMemoryChannelLayer::new(layer_config));
                let registry: Arc<dyn Registry> = Arc::new(InMemoryRegistry::default());
                // Replaced by one PostgreSQL store per node below.
                let store: Arc<dyn HistoryStore> = Arc::new(InMemoryHistoryStore::default());
                for _ in 0..count {
                    parts.push((layer.clone(), registry.clone(), store.clone()));
                }
            }
            #[cfg(feature = "redis")]
            Backend::Redis => {
                use chat_core::layer::RedisChannelLayer;
                use chat_core::registry::RedisRegistry;
                use chat_core::store::{RedisHistoryStore, StoreConfig};
                let (url, prefix) = (redis_support::url(), redis_support::prefix());
                for _ in 0..count {
                    let layer = RedisChannelLayer::connect(&[&url], &prefix, layer_config.clone())
                        .await
                        .unwrap();
                    let registry = RedisRegistry::connect(&url, &prefix).await.unwrap();
                    let store = RedisHistoryStore::connect(&url, &prefix, StoreConfig::default())
                        .await
                        .unwrap();
                    parts.push((Arc::new(layer), Arc::new(registry), Arc::new(store)));
                }
            }
        }
        #[cfg(feature = "postgres")]
        if let Backend::Postgres = backend {
            use chat_core::store::{PostgresHistoryStore, StoreConfig};
            let url = std::env::var("CHAT_TEST_DATABASE_URL")
                .expect("CHAT_TEST_DATABASE_URL is not set: run ./scripts/test.sh");
            let schema = format!("multinode_{}", fresh_name());
            for part in &mut parts {
                let store = PostgresHistoryStore::connect(&url, &schema, StoreConfig::default())
                    .await
                    .unwrap();
                part.2 = Arc::new(store);
            }
        }
        let nodes = parts
            .into_iter()
            .map(|(network, registry, store)| {
                let layer = FaultyLayer::new(network);
                let cable = Arc::new(Cable {
                    registry,
                    cut: AtomicBool::new(false),
                });
                let chat = Chat::builder()
                    .layer(Arc::new(layer.clone()))
                    .registry(cable.clone())
                    .store(store)
                    .config(config.clone())
                    .build();
                Node { chat, layer, cable }
            })
            .collect();
        Self { nodes }
    }

    fn chat(&self, node: usize) -> &Chat {
        &self.nodes[node].chat
    }

    /// Every node's layer delays each publish by up to `max`.
    fn jitter(&self, max: Duration) {
        for node in &self.nodes {
            node.layer.delay_group_sends(max);
        }
    }

    fn lose(&self, probability: f64) {
        for node in &self.nodes {
            node.layer.lose_group_sends(probability);
        }
    }
}

/// A name no other test of this process or another uses (lowercase, for a schema).
#[cfg(feature = "postgres")]
fn fresh_name() -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Limits that let a test send as fast as it likes.
fn fast() -> ChatConfig {
    ChatConfig {
        rate_per_second: 10_000.0,
        rate_burst: 10_000,
        gap_grace: Duration::from_millis(100),
        ..ChatConfig::default()
    }
}

/// Reads frames until `count` room messages arrived, and returns them in arrival order.
async fn messages(client: &mut Client, count: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < count {
        let frame = client.recv().await;
        if frame["type"] == "message" {
            got.push(frame);
        }
    }
    got
}

/// No further room message arrives for a while (other frames, such as members leaving, may).
async fn no_more_messages(client: &mut Client) {
    while let Ok(Some(frame)) = tokio::time::timeout(common::QUIET, client.try_recv()).await {
        assert_ne!(
            frame["type"], "message",
            "{}: one message too many",
            client.user
        );
    }
}

fn ids(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|m| m["id"].as_u64().unwrap()).collect()
}

/// Sends every message of one sender, waiting for each ack; returns the acked ids.
async fn send_all(client: &mut Client, room: &str, tag: &str, count: usize) -> Vec<u64> {
    let mut acked = Vec::new();
    let mut seen = Vec::new();
    for i in 0..count {
        let reference = format!("{tag}-{i}");
        client
            .send(json!({"type": "send", "room": room, "body": reference, "ref": reference}))
            .await;
        loop {
            let frame = client.recv().await;
            match frame["type"].as_str() {
                Some("ack") if frame["ref"] == reference.as_str() => {
                    acked.push(frame["id"].as_u64().unwrap());
                    break;
                }
                Some("message") => seen.push(frame["id"].as_u64().unwrap()),
                _ => {}
            }
        }
    }
    assert!(
        seen.windows(2).all(|pair| pair[0] < pair[1]),
        "{tag}: the sender saw messages out of order: {seen:?}"
    );
    acked
}

async fn room_and_direct_messages_cross_nodes_and_stay_private(backend: Backend) {
    let cluster = Cluster::new(backend, 2, fast()).await;
    let mut alice = Client::connect(cluster.chat(0), "alice").await;
    let mut bob = Client::connect(cluster.chat(1), "bob").await;
    let mut carol = Client::connect(cluster.chat(1), "carol").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    alice.recv_type("member").await;

    let id = alice.say("lobby", "hello from node 0").await;
    let message = bob.recv_type("message").await;
    assert_eq!(
        (message["id"].as_u64(), &message["from"]),
        (Some(id), &json!("alice"))
    );

    bob.send(json!({"type": "direct", "to": "alice", "body": "psst"}))
        .await;
    bob.recv_type("ack").await;
    let direct = alice.recv_type("direct").await;
    assert_eq!(
        (&direct["from"], &direct["body"]),
        (&json!("bob"), &json!("psst"))
    );
    carol.expect_silence().await;

    let members = cluster.chat(1).room_members("lobby").await.unwrap();
    assert_eq!(members, ["alice", "bob"]);
    let online = cluster.chat(0).online_users().await.unwrap();
    assert_eq!(online, ["alice", "bob", "carol"]);
}

async fn concurrent_senders_on_three_nodes_are_delivered_in_id_order_everywhere(backend: Backend) {
    let cluster = Cluster::new(backend, 3, fast()).await;
    // Publishes overtake each other by up to 3 ms, as they do between nodes.
    cluster.jitter(Duration::from_millis(3));
    let mut readers = Vec::new();
    for node in 0..3 {
        let mut reader = Client::connect(cluster.chat(node), &format!("reader{node}")).await;
        reader.join("r").await;
        readers.push(reader);
    }
    let (senders, each) = (3, 40);
    let mut tasks = Vec::new();
    for node in 0..senders {
        let mut sender = Client::connect(cluster.chat(node), &format!("sender{node}")).await;
        sender.join("r").await;
        tasks.push(tokio::spawn(async move {
            send_all(&mut sender, "r", &format!("s{node}"), each).await
        }));
    }
    let mut acked = BTreeSet::new();
    for task in tasks {
        for id in task.await.unwrap() {
            assert!(acked.insert(id), "id {id} acked twice");
        }
    }
    let total = (senders * each) as u64;
    assert_eq!(acked, (1..=total).collect(), "ids are unique and dense");
    for reader in &mut readers {
        let got = messages(reader, total as usize).await;
        assert_eq!(
            ids(&got),
            (1..=total).collect::<Vec<_>>(),
            "{} got the room out of order or incomplete",
            reader.user
        );
        no_more_messages(reader).await;
    }
}

async fn messages_the_layer_lost_are_repaired_from_the_store_in_order(backend: Backend) {
    let cluster = Cluster::new(backend, 2, fast()).await;
    let mut readers = Vec::new();
    for node in 0..2 {
        let mut reader = Client::connect(cluster.chat(node), &format!("reader{node}")).await;
        reader.join("r").await;
        readers.push(reader);
    }
    let mut senders = Vec::new();
    for node in 0..2 {
        let mut sender = Client::connect(cluster.chat(node), &format!("sender{node}")).await;
        sender.join("r").await;
        senders.push(sender);
    }
    cluster.jitter(Duration::from_millis(2));
    cluster.lose(0.25);
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(node, mut sender)| {
            tokio::spawn(async move {
                send_all(&mut sender, "r", &format!("s{node}"), 30).await;
                sender
            })
        })
        .collect();
    let mut senders = Vec::new();
    for task in tasks {
        senders.push(task.await.unwrap());
    }
    let lost: u64 = cluster.nodes.iter().map(|node| node.layer.lost()).sum();
    assert!(lost > 0, "the test lost nothing, so it proves nothing");
    // A loss at the very end is only noticed when a later message arrives.
    cluster.lose(0.0);
    send_all(&mut senders[0], "r", "last", 1).await;
    for reader in &mut readers {
        let got = messages(reader, 61).await;
        assert_eq!(ids(&got), (1..=61).collect::<Vec<_>>(), "{}", reader.user);
        for message in &got[..60] {
            let id = message["id"].as_u64().unwrap();
            assert!(message["body"].as_str().unwrap().starts_with('s'), "{id}");
        }
    }
}

async fn a_retry_on_another_node_is_acked_with_the_first_id_and_delivered_once(backend: Backend) {
    let cluster = Cluster::new(backend, 2, fast()).await;
    let mut alice = Client::connect(cluster.chat(0), "alice").await;
    let mut alice_elsewhere = Client::connect(cluster.chat(1), "alice").await;
    let mut bob = Client::connect(cluster.chat(1), "bob").await;
    for client in [&mut alice, &mut alice_elsewhere, &mut bob] {
        client.join("lobby").await;
    }
    alice.recv_type("member").await;
    alice_elsewhere.recv_type("member").await;

    let frame = json!({"type": "send", "room": "lobby", "body": "once", "ref": "page-1"});
    alice.send(frame.clone()).await;
    let (_, ack) = alice.echo_and_ack().await;
    // The page lost the ack, reconnected to the other node and sent again.
    alice_elsewhere.recv_type("message").await;
    alice_elsewhere.send(frame).await;
    assert_eq!(alice_elsewhere.recv_type("ack").await["id"], ack["id"]);
    assert_eq!(bob.recv_type("message").await["id"], ack["id"]);
    bob.expect_silence().await;
    alice_elsewhere.expect_silence().await;

    let dm = json!({"type": "direct", "to": "bob", "body": "once", "ref": "page-2"});
    alice.send(dm.clone()).await;
    let id = alice.recv_type("ack").await["id"].clone();
    alice_elsewhere.send(dm).await;
    // Its own copy of the first attempt, then the ack of the retry: never a second copy.
    let mut frames = [alice_elsewhere.recv().await, alice_elsewhere.recv().await];
    frames.sort_by_key(|frame| frame["type"].as_str().unwrap_or_default().to_owned());
    assert_eq!(frames[0]["type"], "ack");
    assert_eq!(frames[0]["id"], id);
    assert_eq!(
        (&frames[1]["type"], &frames[1]["id"]),
        (&json!("direct"), &id)
    );
    assert_eq!(bob.recv_type("direct").await["id"], id);
    bob.expect_silence().await;
}

async fn presence_crosses_nodes_and_a_reload_across_nodes_ends_online(backend: Backend) {
    let cluster = Cluster::new(backend, 3, fast()).await;
    cluster.jitter(Duration::from_millis(2));
    let mut watcher = Watcher::new(cluster.chat(0)).await;
    let tab = Client::connect(cluster.chat(1), "alice").await;
    // Reloads: the old tab closes on one node while the new one opens on another, their
    // presence events racing through a layer that reorders.
    let tab = common::reload_rounds(&mut watcher, tab, 40, |round| {
        cluster.chat(1 + round % 2).clone()
    })
    .await;
    tab.disconnect().await;
    watcher.until("alice", false).await;
    assert_eq!(cluster.chat(2).online_users().await.unwrap(), ["watcher"]);
}

/// A lease short enough for a test to outlive on the real clock (Redis keeps its own time, so
/// these tests cannot pause it).
const LEASE: Duration = Duration::from_secs(2);

fn leased(lease: Duration) -> ChatConfig {
    ChatConfig {
        node_lease: lease,
        // Pings are not what this is about.
        ping_interval: Duration::from_secs(3_600),
        idle_timeout: Duration::from_secs(7_200),
        ..fast()
    }
}

async fn a_node_that_dies_without_goodbye_leaves_online_and_its_rooms_within_its_lease(
    backend: Backend,
) {
    let lease = LEASE;
    let cluster = Cluster::new(backend, 2, leased(lease)).await;
    let mut watcher = Watcher::new(cluster.chat(0)).await;
    let mut bob = Client::connect(cluster.chat(0), "bob").await;
    bob.join("lobby").await;
    let mut alice = Client::connect(cluster.chat(1), "alice").await;
    alice.join("lobby").await;
    assert_eq!(bob.recv_type("member").await["event"], "join");
    watcher.until("alice", true).await;

    // Node 1 dies: it reaches neither the registry nor the layer, and its sockets are gone.
    let died = tokio::time::Instant::now();
    cluster.nodes[1].cable.cut.store(true, Ordering::SeqCst);
    cluster.nodes[1].layer.fail(true);
    alice.disconnect().await;
    // Its last heartbeat was at most a third of the lease before it died.
    tokio::time::sleep(lease / 4).await;
    assert_eq!(
        cluster.chat(0).online_users().await.unwrap(),
        ["alice", "bob", "watcher"],
        "alice stays listed while her node's lease runs"
    );
    bob.expect_silence().await;

    // Within the lease plus one sweep period (a third of it), another node has swept her.
    tokio::time::sleep_until(died + lease + lease / 3 + Duration::from_secs(1)).await;
    let leave = bob.recv_type("member").await;
    assert_eq!(
        (&leave["user"], &leave["event"]),
        (&json!("alice"), &json!("leave"))
    );
    watcher.until("alice", false).await;
    assert_eq!(
        cluster.chat(0).online_users().await.unwrap(),
        ["bob", "watcher"]
    );
    assert_eq!(
        cluster.chat(0).room_members("lobby").await.unwrap(),
        ["bob"]
    );
}

async fn a_node_whose_lease_was_swept_closes_its_connections_so_they_register_again(
    backend: Backend,
) {
    let lease = LEASE;
    let cluster = Cluster::new(backend, 2, leased(lease)).await;
    let mut watcher = Watcher::new(cluster.chat(0)).await;
    let mut alice = Client::connect(cluster.chat(1), "alice").await;
    watcher.until("alice", true).await;

    // Node 1 loses the registry for longer than its lease, but keeps its sockets.
    cluster.nodes[1].cable.cut.store(true, Ordering::SeqCst);
    tokio::time::sleep(lease + lease / 3 + Duration::from_secs(1)).await;
    watcher.until("alice", false).await;
    cluster.nodes[1].cable.cut.store(false, Ordering::SeqCst);
    // Its next heartbeat finds the lease gone.
    tokio::time::sleep(lease / 3 + Duration::from_secs(1)).await;
    assert_eq!(alice.expect_close().await, 1012);

    // The client reconnects, and is online again.
    let _alice = Client::connect(cluster.chat(1), "alice").await;
    watcher.until("alice", true).await;
}

async fn a_publish_that_fails_after_storing_is_acked_once_it_gets_through(backend: Backend) {
    let cluster = Cluster::new(backend, 2, fast()).await;
    let mut alice = Client::connect(cluster.chat(0), "alice").await;
    let mut bob = Client::connect(cluster.chat(1), "bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    alice.recv_type("member").await;

    // The layer goes down between storing and publishing.
    cluster.nodes[0].layer.fail(true);
    alice
        .send(json!({"type": "send", "room": "lobby", "body": "stored", "ref": "a"}))
        .await;
    alice.expect_silence().await;
    // While the node is failing to publish, a new message is refused before it is stored.
    alice
        .send(json!({"type": "send", "room": "lobby", "body": "refused", "ref": "b"}))
        .await;
    assert_eq!(alice.expect_error("unavailable").await["ref"], "b");
    bob.expect_silence().await;

    cluster.nodes[0].layer.fail(false);
    let (echo, ack) = alice.echo_and_ack().await;
    assert_eq!(
        (&echo["body"], &ack["ref"]),
        (&json!("stored"), &json!("a"))
    );
    assert_eq!(bob.recv_type("message").await["body"], "stored");
    alice
        .send(json!({"type": "send", "room": "lobby", "body": "refused", "ref": "b"}))
        .await;
    let (echo, _) = alice.echo_and_ack().await;
    assert_eq!(echo["id"], 2, "the refused attempt stored nothing");
    assert_eq!(bob.recv_type("message").await["id"], 2);
}

async fn direct_conversations_stay_in_order_when_both_sides_write_at_once(backend: Backend) {
    let cluster = Cluster::new(backend, 2, fast()).await;
    cluster.jitter(Duration::from_millis(3));
    let alice = Client::connect(cluster.chat(0), "alice").await;
    let mut alice_tab = Client::connect(cluster.chat(1), "alice").await;
    let bob = Client::connect(cluster.chat(1), "bob").await;
    let each = 30;
    let talk = |mut client: Client, to: &'static str| {
        tokio::spawn(async move {
            let mut received = Vec::new();
            let mut acked = 0;
            for i in 0..each {
                client
                    .send(json!({"type": "direct", "to": to, "body": i.to_string()}))
                    .await;
                loop {
                    let frame = client.recv().await;
                    if frame["type"] == "ack" {
                        acked += 1;
                        break;
                    }
                    received.push(frame["id"].as_u64().unwrap());
                }
            }
            (client, received, acked)
        })
    };
    let alice_talks = talk(alice, "bob");
    let bob_talks = talk(bob, "alice");
    let (mut alice, mut from_bob, acked) = alice_talks.await.unwrap();
    assert_eq!(acked, each);
    let (mut bob, mut from_alice, _) = bob_talks.await.unwrap();
    while from_bob.len() < each {
        from_bob.push(alice.recv_type("direct").await["id"].as_u64().unwrap());
    }
    while from_alice.len() < each {
        from_alice.push(bob.recv_type("direct").await["id"].as_u64().unwrap());
    }
    for (who, ids) in [("alice", &from_bob), ("bob", &from_alice)] {
        assert!(
            ids.windows(2).all(|pair| pair[0] < pair[1]),
            "{who} got the conversation out of order: {ids:?}"
        );
    }
    // Alice's other tab sees both sides, all 60, in order.
    let mut everything = Vec::new();
    while everything.len() < 2 * each {
        everything.push(alice_tab.recv_type("direct").await["id"].as_u64().unwrap());
    }
    assert_eq!(everything, (1..=2 * each as u64).collect::<Vec<_>>());
    let mut by_id = BTreeMap::new();
    for id in from_bob.iter().chain(&from_alice) {
        *by_id.entry(*id).or_insert(0) += 1;
    }
    assert!(by_id.values().all(|count| *count == 1));
}

async fn a_loss_with_nothing_after_it_is_found_once_delivery_was_interrupted(backend: Backend) {
    let cluster = Cluster::new(backend, 2, fast()).await;
    let mut alice = Client::connect(cluster.chat(0), "alice").await;
    let mut bob = Client::connect(cluster.chat(1), "bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    alice.recv_type("member").await;
    alice.say("lobby", "seen").await;
    assert_eq!(bob.recv_type("message").await["id"], 1);

    // Two messages and a direct message are lost on the way, and nothing follows them.
    cluster.nodes[0].layer.lose_group_sends(1.0);
    send_all(&mut alice, "lobby", "lost", 2).await;
    alice
        .send(json!({"type": "direct", "to": "bob", "body": "lost dm"}))
        .await;
    while alice.recv().await["type"] != "ack" {}
    cluster.nodes[0].layer.lose_group_sends(0.0);
    bob.expect_silence().await;

    // Bob's node says its delivery was interrupted: his connection looks everything up.
    cluster.nodes[1].layer.interrupt();
    let mut room = Vec::new();
    let mut direct = None;
    while room.len() < 2 || direct.is_none() {
        let frame = bob.recv().await;
        match frame["type"].as_str() {
            Some("message") => room.push(frame["body"].as_str().unwrap().to_owned()),
            Some("direct") => direct = Some(frame["body"].clone()),
            _ => {}
        }
    }
    assert_eq!(room, ["lost-0", "lost-1"]);
    assert_eq!(direct, Some(json!("lost dm")));
    bob.expect_silence().await;
}

/// One `#[tokio::test]` per backend for each test above.
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Memory).await;
                }
            )*
        }
        #[cfg(feature = "redis")]
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Redis).await;
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_every_backend!(
    room_and_direct_messages_cross_nodes_and_stay_private,
    concurrent_senders_on_three_nodes_are_delivered_in_id_order_everywhere,
    messages_the_layer_lost_are_repaired_from_the_store_in_order,
    a_retry_on_another_node_is_acked_with_the_first_id_and_delivered_once,
    presence_crosses_nodes_and_a_reload_across_nodes_ends_online,
    a_node_that_dies_without_goodbye_leaves_online_and_its_rooms_within_its_lease,
    a_node_whose_lease_was_swept_closes_its_connections_so_they_register_again,
    a_publish_that_fails_after_storing_is_acked_once_it_gets_through,
    direct_conversations_stay_in_order_when_both_sides_write_at_once,
);

// A Redis layer reports its own interruptions, so the injected one is for the memory backend.
mod memory_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_loss_with_nothing_after_it_is_found_once_delivery_was_interrupted() {
        super::a_loss_with_nothing_after_it_is_found_once_delivery_was_interrupted(
            super::Backend::Memory,
        )
        .await;
    }
}
