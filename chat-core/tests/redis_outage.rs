//! Redis going away under live traffic (cargo feature `redis`). Each test runs its own
//! redis-server, which it kills and starts again, so the other tests are not disturbed.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;
mod redis_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chat_core::layer::{ChannelLayer, LayerConfig, RedisChannelLayer};
use chat_core::registry::RedisRegistry;
use chat_core::store::{RedisHistoryStore, StoreConfig};
use chat_core::{Chat, ChatConfig};
use common::Client;
use redis_support::{prefix, PrivateRedis};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_subscribes_again_when_its_pubsub_connection_is_cut() {
    let redis = PrivateRedis::start(false).await;
    let prefix = prefix();
    let a = RedisChannelLayer::connect(&[&redis.url], &prefix, LayerConfig::default())
        .await
        .unwrap();
    let b = RedisChannelLayer::connect(&[&redis.url], &prefix, LayerConfig::default())
        .await
        .unwrap();
    let mut on_b = b.new_channel("conn").await.unwrap();
    b.group_add("room", on_b.name()).await.unwrap();

    redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    // Meanwhile b is deaf; once it has subscribed and registered again, messages flow.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        a.group_send("room", Bytes::from_static(b"ping"))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_millis(200), on_b.recv()).await;
        if let Ok(Some(message)) = got {
            assert_eq!(message, "ping");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never heard the room again"
        );
    }
}

/// A node on the private Redis, with all three Redis backends.
async fn node(redis: &PrivateRedis, prefix: &str) -> Chat {
    let config = ChatConfig {
        rate_per_second: 1_000.0,
        rate_burst: 1_000,
        gap_grace: Duration::from_millis(100),
        ..ChatConfig::default()
    };
    let layer = RedisChannelLayer::connect(
        &[&redis.url],
        prefix,
        LayerConfig::default().with_channel_capacity("conn.*", config.connection_backlog),
    )
    .await
    .unwrap();
    let registry = RedisRegistry::connect(&redis.url, prefix).await.unwrap();
    let store = RedisHistoryStore::connect(&redis.url, prefix, StoreConfig::default())
        .await
        .unwrap();
    Chat::builder()
        .layer(Arc::new(layer))
        .registry(Arc::new(registry))
        .store(Arc::new(store))
        .config(config)
        .build()
}

/// Sends `body` with a ref and waits for its fate: `Some(id)` when acked, `None` when refused
/// with `unavailable`. Acks of earlier sends that arrive meanwhile are recorded too.
async fn send(client: &mut Client, body: &str, acked: &mut BTreeMap<String, u64>) -> Option<u64> {
    client
        .send(json!({"type": "send", "room": "lobby", "body": body, "ref": body}))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let frame = tokio::time::timeout_at(deadline, client.try_recv())
            .await
            .unwrap_or_else(|_| panic!("no answer to {body}"))
            .unwrap();
        match frame["type"].as_str() {
            Some("ack") => {
                let reference = frame["ref"].as_str().unwrap().to_owned();
                acked.insert(reference.clone(), frame["id"].as_u64().unwrap());
                if reference == body {
                    return acked.get(body).copied();
                }
            }
            Some("error") if frame["ref"] == body => {
                assert_eq!(frame["code"], "unavailable", "{frame}");
                return None;
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_refuses_sends_meanwhile_and_loses_nothing_acknowledged() {
    let mut redis = PrivateRedis::start(true).await;
    let prefix = prefix();
    let (sender_node, reader_node) = (node(&redis, &prefix).await, node(&redis, &prefix).await);
    let mut alice = Client::connect(&sender_node, "alice").await;
    let mut bob = Client::connect(&reader_node, "bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;

    let mut acked = BTreeMap::new();
    for i in 0..20 {
        assert!(send(&mut alice, &format!("before-{i}"), &mut acked)
            .await
            .is_some());
    }

    sender_node.ready().await.expect("ready with Redis up");
    // Redis dies under traffic: sends are refused (or, if one was stored just before, acked
    // later), never acked for nothing; a readiness probe says the node cannot serve.
    redis.kill();
    assert!(sender_node.ready().await.is_err(), "ready with Redis down");
    let mut refused = 0;
    for i in 0..5 {
        if send(&mut alice, &format!("during-{i}"), &mut acked)
            .await
            .is_none()
        {
            refused += 1;
        }
    }
    assert!(refused > 0, "sends while Redis was down were not refused");

    redis.restart().await;
    // Delivery resumes by itself: retry until the nodes have reconnected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while send(&mut alice, &format!("after-{i}"), &mut acked)
        .await
        .is_none()
    {
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
        i += 1;
    }
    for j in 0..20 {
        assert!(send(&mut alice, &format!("after-more-{j}"), &mut acked)
            .await
            .is_some());
    }
    // Ready again once the pub/sub connections are back too (they may trail the commands).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Err(error) = reader_node.ready().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready again: {error}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every acknowledged message is in history, under the id its ack gave, once, in order.
    let mut reader = Client::connect(&reader_node, "carol").await;
    reader
        .send(json!({"type": "join", "room": "lobby", "since": 0}))
        .await;
    let history = reader.recv_type("joined").await["history"].clone();
    let stored: BTreeMap<u64, String> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["body"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let ids: Vec<u64> = stored.keys().copied().collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "dense");
    for (body, id) in &acked {
        assert_eq!(stored.get(id), Some(body), "acked {body} as {id}");
    }

    // And bob, connected all along, got every stored message live, in order, exactly once.
    let mut live = Vec::new();
    let last = *ids.last().unwrap();
    while live.last() != Some(&last) {
        let frame = bob.recv().await;
        if frame["type"] == "message" {
            live.push(frame["id"].as_u64().unwrap());
        }
    }
    assert_eq!(live, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_makes_clients_start_again_with_a_new_epoch() {
    let mut redis = PrivateRedis::start(false).await;
    let prefix = prefix();
    let config = ChatConfig {
        node_lease: Duration::from_secs(3),
        ..ChatConfig::default()
    };
    let layer = RedisChannelLayer::connect(&[&redis.url], &prefix, LayerConfig::default())
        .await
        .unwrap();
    let chat = Chat::builder()
        .layer(Arc::new(layer))
        .registry(Arc::new(
            RedisRegistry::connect(&redis.url, &prefix).await.unwrap(),
        ))
        .store(Arc::new(
            RedisHistoryStore::connect(&redis.url, &prefix, StoreConfig::default())
                .await
                .unwrap(),
        ))
        .config(config)
        .build();
    let mut alice = Client::connect(&chat, "alice").await;

    // Redis comes back empty: the node's lease is gone with everything else.
    redis.kill();
    redis.restart().await;
    assert_eq!(
        alice.expect_close().await,
        1012,
        "the connection was not closed after Redis lost its data"
    );
    let again = Client::connect(&chat, "alice").await;
    assert_ne!(
        again.epoch, alice.epoch,
        "ids start again, so the epoch must change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_sharded_over_several_hosts_and_every_node_hears_all_of_them() {
    let (first, second) = (
        PrivateRedis::start(false).await,
        PrivateRedis::start(false).await,
    );
    let urls = [first.url.as_str(), second.url.as_str()];
    let prefix = prefix();
    let a = RedisChannelLayer::connect(&urls, &prefix, LayerConfig::default())
        .await
        .unwrap();
    let b = RedisChannelLayer::connect(&urls, &prefix, LayerConfig::default())
        .await
        .unwrap();
    let mut members = Vec::new();
    for room in 0..20 {
        let group = format!("room{room}");
        let sub = b.new_channel("conn").await.unwrap();
        b.group_add(&group, sub.name()).await.unwrap();
        members.push((group, sub));
    }
    for (group, sub) in &mut members {
        let report = a
            .group_send(group, Bytes::from(group.clone()))
            .await
            .unwrap();
        assert_eq!(report.forwarded, 1, "{group}");
        let got = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await;
        assert_eq!(got.unwrap().unwrap(), group.as_bytes());
    }
    // Both hosts hold some of the groups.
    for redis in [&first, &second] {
        let keys = redis
            .command(&["KEYS", &format!("{prefix}:layer:group:*")])
            .await;
        let redis::Value::Array(keys) = keys else {
            panic!("{keys:?}")
        };
        assert!(
            (3..=17).contains(&keys.len()),
            "{} of 20 groups on one host",
            keys.len()
        );
    }
}
