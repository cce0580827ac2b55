//! Two real server processes, one on warp (`chat-server`) and one on tokio-tungstenite
//! (`chat-server-tungstenite`), on one Redis: what a client on one sees of a client on the other,
//! and what happens when one is killed with SIGKILL.
//!
//! The servers are the example binaries cargo builds next to this test; the Redis is the one in
//! `CHAT_TEST_REDIS_URL` (`scripts/test.sh` starts it), and each test uses a key prefix of its own.

#![allow(clippy::unwrap_used)]

#[path = "../tests-shared/server_process.rs"]
mod server_process;
#[path = "../tests-shared/socket_suite.rs"]
mod socket_suite;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use server_process::Server;
use socket_suite::{connect, Socket};

fn redis_url() -> String {
    std::env::var("CHAT_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("CHAT_TEST_REDIS_URL is not set: run ./scripts/test.sh, which starts a redis-server")
    })
}

fn prefix(test: &str) -> String {
    format!("chat-cluster-{}-{test}", std::process::id())
}

/// A node of the cluster: `binary` on the Redis layer under `prefix`.
async fn node(binary: &str, prefix: &str, lease_secs: u64) -> Server {
    let redis = redis_url();
    let lease = lease_secs.to_string();
    let args = [
        "--layer",
        "redis",
        "--redis-url",
        &redis,
        "--redis-prefix",
        prefix,
        "--node-lease",
        &lease,
        "--rate-per-second",
        "1000",
        "--rate-burst",
        "1000",
    ];
    Server::start(binary, &args).await
}

async fn pair(test: &str, lease_secs: u64) -> (Server, Server) {
    let prefix = prefix(test);
    let warp = node("chat-server", &prefix, lease_secs).await;
    let tungstenite = node("chat-server-tungstenite", &prefix, lease_secs).await;
    (warp, tungstenite)
}

/// Sends `count` messages with refs as fast as the acks come back; returns the acked ids.
async fn send_many(socket: &mut Socket, room: &str, tag: &str, count: usize) -> Vec<u64> {
    let mut acked = Vec::new();
    for i in 0..count {
        let reference = format!("{tag}-{i}");
        socket
            .send(json!({"type": "send", "room": room, "body": reference, "ref": reference}))
            .await;
        loop {
            let frame = socket.recv().await;
            if frame["type"] == "ack" && frame["ref"] == reference.as_str() {
                acked.push(frame["id"].as_u64().unwrap());
                break;
            }
            assert_ne!(frame["type"], "error", "{frame}");
        }
    }
    acked
}

/// The next `count` room messages (other frames skipped).
async fn messages(socket: &mut Socket, count: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < count {
        let frame = socket.recv().await;
        if frame["type"] == "message" {
            got.push(frame);
        }
    }
    got
}

fn ids(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["id"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_directs_presence_and_members_cross_processes() {
    let (warp, tungstenite) = pair("cross", 30).await;
    let mut watcher = connect(warp.addr, "watcher").await;
    watcher.send(json!({"type": "who", "watch": true})).await;
    watcher.recv_type("online").await;
    let mut alice = connect(warp.addr, "alice").await;
    let mut bob = connect(tungstenite.addr, "bob").await;
    let mut eve = connect(tungstenite.addr, "eve").await;
    for user in ["alice", "bob", "eve"] {
        let presence = watcher.recv_type("presence").await;
        assert_eq!(
            (&presence["user"], &presence["status"]),
            (&json!(user), &json!("online"))
        );
    }

    alice.join("lobby").await;
    let joined = bob.join("lobby").await;
    assert_eq!(joined["members"], json!(["alice", "bob"]));
    let member = alice.recv_type("member").await;
    assert_eq!(
        (&member["user"], &member["event"]),
        (&json!("bob"), &json!("join"))
    );

    alice
        .send(json!({"type": "send", "room": "lobby", "body": "hello from warp"}))
        .await;
    alice.echo_and_ack().await;
    assert_eq!(bob.recv_type("message").await["body"], "hello from warp");

    bob.send(json!({"type": "direct", "to": "alice", "body": "psst"}))
        .await;
    bob.recv_type("ack").await;
    let direct = alice.recv_type("direct").await;
    assert_eq!(
        (&direct["from"], &direct["body"]),
        (&json!("bob"), &json!("psst"))
    );
    eve.expect_silence().await;

    bob.send(json!({"type": "who"})).await;
    assert_eq!(
        bob.recv_type("online").await["users"],
        json!(["alice", "bob", "eve", "watcher"])
    );
    bob.send(json!({"type": "leave", "room": "lobby"})).await;
    bob.recv_type("left").await;
    let member = alice.recv_type("member").await;
    assert_eq!(
        (&member["user"], &member["event"]),
        (&json!("bob"), &json!("leave"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_messages_from_one_sender_arrive_in_order_on_the_other_node() {
    let (warp, tungstenite) = pair("three-hundred", 30).await;
    let mut reader = connect(tungstenite.addr, "reader").await;
    reader.join("room").await;
    let mut sender = connect(warp.addr, "sender").await;
    sender.join("room").await;
    let acked = send_many(&mut sender, "room", "m", 300).await;
    assert_eq!(acked, (1..=300).collect::<Vec<_>>());
    let got = messages(&mut reader, 300).await;
    assert_eq!(ids(&got), (1..=300).collect::<Vec<_>>());
    for (i, message) in got.iter().enumerate() {
        assert_eq!(message["body"], format!("m-{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_on_both_nodes_arrive_in_id_order_everywhere() {
    let (warp, tungstenite) = pair("concurrent", 30).await;
    let mut readers = Vec::new();
    for (i, addr) in [warp.addr, tungstenite.addr].into_iter().enumerate() {
        let mut reader = connect(addr, &format!("reader{i}")).await;
        reader.join("room").await;
        readers.push(reader);
    }
    let senders: Vec<_> = [warp.addr, tungstenite.addr, warp.addr, tungstenite.addr]
        .into_iter()
        .enumerate()
        .map(|(i, addr)| {
            tokio::spawn(async move {
                let mut socket = connect(addr, &format!("sender{i}")).await;
                socket.join("room").await;
                send_many(&mut socket, "room", &format!("s{i}"), 50).await
            })
        })
        .collect();
    let mut acked = BTreeSet::new();
    for sender in senders {
        for id in sender.await.unwrap() {
            assert!(acked.insert(id), "id {id} acked twice");
        }
    }
    assert_eq!(acked, (1..=200).collect());
    for reader in &mut readers {
        assert_eq!(
            ids(&messages(reader, 200).await),
            (1..=200).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_the_other_node_is_not_delivered_twice() {
    let (warp, tungstenite) = pair("retry", 30).await;
    let mut reader = connect(warp.addr, "reader").await;
    reader.join("room").await;
    let mut first = connect(warp.addr, "alice").await;
    first.join("room").await;
    let frame = json!({"type": "send", "room": "room", "body": "once", "ref": "page-7"});
    first.send(frame.clone()).await;
    let (_, ack) = first.echo_and_ack().await;
    // The ack was lost; the page reconnected to the other node and sends again.
    let mut retry = connect(tungstenite.addr, "alice").await;
    retry.join("room").await;
    retry.send(frame).await;
    assert_eq!(retry.recv_type("ack").await["id"], ack["id"]);
    assert_eq!(messages(&mut reader, 1).await[0]["id"], ack["id"]);
    // Nothing more: a member event may pass, a second copy may not.
    while let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) =
        tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut reader.ws),
        )
        .await
    {
        let frame: Value = serde_json::from_str(&text).unwrap();
        assert_ne!(frame["type"], "message", "delivered twice: {frame}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_leaves_online_within_its_lease() {
    let lease = Duration::from_secs(3);
    let (warp, mut tungstenite) = pair("sigkill", lease.as_secs()).await;
    let mut watcher = connect(warp.addr, "watcher").await;
    watcher.send(json!({"type": "who", "watch": true})).await;
    watcher.recv_type("online").await;
    let mut bob = connect(warp.addr, "bob").await;
    bob.join("lobby").await;
    let mut alice = connect(tungstenite.addr, "alice").await;
    alice.join("lobby").await;
    assert_eq!(bob.recv_type("member").await["user"], "alice");

    let killed = tokio::time::Instant::now();
    tungstenite.kill();
    loop {
        let frame = watcher.recv().await;
        if frame["type"] == "presence" && frame["user"] == "alice" && frame["status"] == "offline" {
            break;
        }
    }
    let took = killed.elapsed();
    assert!(
        took <= lease + lease / 3 + Duration::from_secs(2),
        "alice went offline {took:?} after her node died (lease {lease:?})"
    );
    let leave = bob.recv_type("member").await;
    assert_eq!(
        (&leave["user"], &leave["event"]),
        (&json!("alice"), &json!("leave"))
    );
    // Not before the lease could have lapsed.
    assert!(took >= lease / 2, "offline after only {took:?}");
    bob.send(json!({"type": "who"})).await;
    assert_eq!(
        bob.recv_type("online").await["users"],
        json!(["bob", "watcher"])
    );
}
