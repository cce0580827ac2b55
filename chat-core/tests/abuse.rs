//! Direct messages and `read` frames aimed at thousands of made-up users cannot grow the
//! in-memory store without bound, and do not disturb anyone else. Driven with the public test
//! client, [`chat_core::testing::Communicator`].

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use chat_core::engine::Route;
use chat_core::store::{Conversation, HistoryStore, InMemoryHistoryStore};
use chat_core::testing::Communicator;
use chat_core::{Chat, ChatConfig};
use serde_json::json;

const CAP: usize = 200;

fn chat(store: Arc<InMemoryHistoryStore>) -> Chat {
    Chat::builder()
        .store(store)
        .config(ChatConfig {
            rate_per_second: 100_000.0,
            rate_burst: 100_000,
            ..ChatConfig::default()
        })
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_conversations_that_do_not_exist_store_nothing() {
    let store = Arc::new(InMemoryHistoryStore::default().with_max_conversations(CAP));
    let chat = chat(Arc::clone(&store));
    let mut mallory = Communicator::connect_as(&chat, "mallory", Route::Lobby)
        .await
        .unwrap();
    for i in 0..5_000 {
        mallory
            .send(json!({"type": "read", "with": format!("ghost{i}"), "id": 1_000_000}))
            .await
            .unwrap();
    }
    // Ask something that has an answer, to know every read before it was handled.
    mallory.send(json!({"type": "inbox"})).await.unwrap();
    let inbox = mallory.expect("inbox").await.unwrap();
    assert_eq!(inbox["conversations"], json!([]), "{inbox}");
    // Not one conversation was made: the store still takes all of its capacity.
    for i in 0..CAP {
        let conversation = Conversation::direct("probe", &format!("p{i}"));
        store.mark_read("probe", &conversation, 1).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_to_thousands_of_made_up_users_stop_at_the_cap() {
    let store = Arc::new(InMemoryHistoryStore::default().with_max_conversations(CAP));
    let chat = chat(Arc::clone(&store));
    let mut alice = Communicator::connect_as(&chat, "alice", Route::Lobby)
        .await
        .unwrap();
    let mut bob = Communicator::connect_as(&chat, "bob", Route::Lobby)
        .await
        .unwrap();
    // Alice and bob talk before the flood: their conversation is one the store holds.
    alice
        .send(json!({"type": "direct", "to": "bob", "body": "hi", "ref": "first"}))
        .await
        .unwrap();
    alice.expect_where(|f| f["type"] == "ack").await.unwrap();
    bob.expect("direct").await.unwrap();

    let mut mallory = Communicator::connect_as(&chat, "mallory", Route::Lobby)
        .await
        .unwrap();
    let total = 2_000;
    for i in 0..total {
        let frame =
            json!({"type": "direct", "to": format!("ghost{i}"), "body": "x", "ref": i.to_string()});
        mallory.send(frame).await.unwrap();
    }
    let (mut acked, mut unavailable) = (0, 0);
    while acked + unavailable < total {
        let frame = mallory
            .expect_where(|f| f["type"] == "ack" || f["type"] == "error")
            .await
            .unwrap();
        match (frame["type"].as_str(), frame["code"].as_str()) {
            (Some("ack"), _) => acked += 1,
            (Some("error"), Some("unavailable")) => unavailable += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // The store holds at most its cap of conversations; alice and bob's is one.
    assert_eq!(acked, CAP - 1);
    assert_eq!(unavailable, total - (CAP - 1));
    assert_eq!(store.inbox("mallory").await.unwrap().len(), CAP - 1);

    // Alice and bob carry on in the conversation they had.
    alice.set_timeout(Duration::from_secs(2));
    alice
        .send(json!({"type": "direct", "to": "bob", "body": "still here", "ref": "second"}))
        .await
        .unwrap();
    let ack = alice.expect_where(|f| f["type"] == "ack").await.unwrap();
    assert_eq!(ack["id"], 2);
    let direct = bob.expect("direct").await.unwrap();
    assert_eq!(direct["body"], "still here");
    // A read position past the conversation's end is cut to it: it cannot hide what comes next.
    bob.send(json!({"type": "read", "with": "alice", "id": 999}))
        .await
        .unwrap();
    let read = alice.expect_where(|f| f["type"] == "read").await.unwrap();
    assert_eq!(
        (read["user"].as_str(), read["id"].as_u64()),
        (Some("bob"), Some(2))
    );
    let entry = &store.inbox("bob").await.unwrap()[0];
    assert_eq!((entry.with.as_str(), entry.read_id), ("alice", 2));
}
