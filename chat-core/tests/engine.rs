//! The protocol, row by row and error code by error code, driven through in-memory connections.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chat_core::engine::{CloseReason, Inbound, Route};
use chat_core::policy::{Policy, Refusal};
use chat_core::store::{
    Appended, Conversation, HistoryStore, InMemoryHistoryStore, InboxEntry, NewMessage, Page,
    StoreError,
};
use chat_core::{Chat, ChatConfig};
use common::{chat, chat_with, Client, Watcher};
use serde_json::json;

#[tokio::test]
async fn welcome_is_the_first_frame() {
    let chat = chat();
    // `connect` asserts the exact welcome frame.
    let mut alice = Client::connect(&chat, "alice").await;
    alice.sync().await;
}

#[tokio::test]
async fn join_replies_with_members_and_history_and_tells_the_others() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    let joined = alice.join("lobby").await;
    assert_eq!(
        joined,
        json!({"type": "joined", "room": "lobby", "members": ["alice"], "member_count": 1, "history": [], "more": false})
    );
    alice.say("lobby", "first").await;

    let mut bob = Client::connect(&chat, "bob").await;
    let joined = bob.join("lobby").await;
    assert_eq!(joined["members"], json!(["alice", "bob"]));
    assert_eq!(joined["member_count"], 2);
    let history = joined["history"].as_array().unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["body"], "first");
    assert_eq!(history[0]["from"], "alice");
    assert_eq!(history[0]["room"], "lobby");

    assert_eq!(
        alice.recv().await,
        json!({"type": "member", "room": "lobby", "user": "bob", "event": "join"})
    );
    bob.expect_silence().await;
}

#[tokio::test]
async fn join_history_is_the_last_fifty_oldest_first() {
    let chat = chat();
    for i in 1..=60 {
        chat.publish("lobby", "bot", &format!("m{i}"))
            .await
            .unwrap();
    }
    let mut alice = Client::connect(&chat, "alice").await;
    let joined = alice.join("lobby").await;
    let bodies: Vec<&str> = joined["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (11..=60).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);
}

#[tokio::test]
async fn joining_twice_is_harmless_and_a_second_tab_is_no_news() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("lobby").await;
    let mut bob = Client::connect(&chat, "bob").await;
    bob.join("lobby").await;
    alice.recv_type("member").await;

    let again = bob.join("lobby").await;
    assert_eq!(again["members"], json!(["alice", "bob"]));
    let mut bob_tab = Client::connect(&chat, "bob").await;
    bob_tab.join("lobby").await;
    alice.expect_silence().await;

    // Messages still arrive once per connection.
    alice.say("lobby", "hi").await;
    assert_eq!(bob.recv_type("message").await["body"], "hi");
    bob.expect_silence().await;
    assert_eq!(bob_tab.recv_type("message").await["body"], "hi");
}

#[tokio::test]
async fn the_room_route_joins_at_once() {
    let chat = chat();
    let mut alice = Client::connect_to(&chat, "alice", Route::Room("lobby".into())).await;
    assert_eq!(alice.recv_type("joined").await["room"], "lobby");
    alice.say("lobby", "straight in").await;

    let mut bad = Client::connect_to(&chat, "bob", Route::Room("no spaces".into())).await;
    bad.expect_error("invalid_name").await;
    bad.sync().await;
}

#[tokio::test]
async fn leave_replies_left_and_the_last_tab_leaving_is_news() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("lobby").await;
    let mut bob = Client::connect(&chat, "bob").await;
    let mut bob_tab = Client::connect(&chat, "bob").await;
    bob.join("lobby").await;
    bob_tab.join("lobby").await;
    alice.recv_type("member").await;

    bob.send(json!({"type": "leave", "room": "lobby"})).await;
    assert_eq!(bob.recv().await, json!({"type": "left", "room": "lobby"}));
    alice.expect_silence().await;

    // The connection that left no longer gets the room's messages; the other tab does.
    alice.say("lobby", "still there?").await;
    bob.expect_silence().await;
    bob_tab.recv_type("message").await;

    bob_tab
        .send(json!({"type": "leave", "room": "lobby"}))
        .await;
    bob_tab.recv_type("left").await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "member", "room": "lobby", "user": "bob", "event": "leave"})
    );

    // Leaving a room one is not in is harmless.
    bob.send(json!({"type": "leave", "room": "elsewhere"}))
        .await;
    bob.recv_type("left").await;
}

#[tokio::test]
async fn closing_the_socket_leaves_every_room() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("a").await;
    alice.join("b").await;
    let mut bob = Client::connect(&chat, "bob").await;
    bob.join("a").await;
    bob.join("b").await;
    alice.recv_type("member").await;
    alice.recv_type("member").await;

    assert_eq!(bob.disconnect().await, CloseReason::ClientClosed);
    let mut left: Vec<String> = Vec::new();
    for _ in 0..2 {
        let event = alice.recv_type("member").await;
        assert_eq!(
            (event["user"].as_str(), event["event"].as_str()),
            (Some("bob"), Some("leave"))
        );
        left.push(event["room"].as_str().unwrap().to_owned());
    }
    left.sort();
    assert_eq!(left, ["a", "b"]);
    assert_eq!(chat.room_members("a").await.unwrap(), ["alice"]);
}

#[tokio::test]
async fn send_reaches_every_connection_in_the_room_and_acks_the_sender() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    let mut bob = Client::connect(&chat, "bob").await;
    let mut outsider = Client::connect(&chat, "carol").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    outsider.join("other").await;
    alice.recv_type("member").await;

    alice
        .send(json!({"type": "send", "room": "lobby", "body": "hello", "ref": "r1"}))
        .await;
    let (echo, ack) = alice.echo_and_ack().await;
    assert_eq!(ack, json!({"type": "ack", "ref": "r1", "id": echo["id"]}));
    let got = bob.recv_type("message").await;
    assert_eq!(got, echo);
    assert_eq!(got["room"], "lobby");
    assert_eq!(got["from"], "alice");
    assert_eq!(got["body"], "hello");
    assert!(got["ts"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(got["id"].as_u64().unwrap() >= 1);
    outsider.expect_silence().await;

    // Ids strictly increase within the room.
    let next = alice.say("lobby", "again").await;
    assert!(next > echo["id"].as_u64().unwrap());
}

#[tokio::test]
async fn sending_to_a_room_not_joined_is_not_member() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    alice
        .send(json!({"type": "send", "room": "lobby", "body": "x", "ref": "r9"}))
        .await;
    let error = alice.expect_error("not_member").await;
    assert_eq!(error["ref"], "r9");
    alice
        .send(json!({"type": "history", "room": "lobby"}))
        .await;
    alice.expect_error("not_member").await;
    alice.send(json!({"type": "typing", "room": "lobby"})).await;
    alice.expect_error("not_member").await;
    alice
        .send(json!({"type": "read", "room": "lobby", "id": 1}))
        .await;
    alice.expect_error("not_member").await;
}

#[tokio::test]
async fn direct_messages_are_private() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    let mut alice_tab = Client::connect(&chat, "alice").await;
    let mut bob = Client::connect(&chat, "bob").await;
    let mut bob_tab = Client::connect(&chat, "bob").await;
    let mut carol = Client::connect(&chat, "carol").await;
    for client in [&mut alice, &mut bob, &mut carol] {
        client.join("lobby").await;
    }
    alice.recv_type("member").await;
    alice.recv_type("member").await;
    bob.recv_type("member").await;

    alice
        .send(json!({"type": "direct", "to": "bob", "body": "secret", "ref": "d1"}))
        .await;
    let ack = alice.recv_type("ack").await;
    assert_eq!(ack["ref"], "d1");
    let frame = bob.recv_type("direct").await;
    assert_eq!(frame["from"], "alice");
    assert_eq!(frame["to"], "bob");
    assert_eq!(frame["body"], "secret");
    assert_eq!(frame["id"], ack["id"]);
    assert!(frame.get("room").is_none());
    assert_eq!(bob_tab.recv_type("direct").await, frame);
    assert_eq!(
        alice_tab.recv_type("direct").await,
        frame,
        "the sender's other tabs see it"
    );
    alice.expect_silence().await;
    carol.expect_silence().await;

    // Carol cannot fetch it: a DM history is only ever the caller's own conversation.
    carol.send(json!({"type": "history", "with": "bob"})).await;
    let history = carol.recv_type("history").await;
    assert_eq!(history["messages"], json!([]));
    carol
        .send(json!({"type": "history", "with": "alice"}))
        .await;
    assert_eq!(carol.recv_type("history").await["messages"], json!([]));
    carol.send(json!({"type": "inbox"})).await;
    assert_eq!(carol.recv_type("inbox").await["conversations"], json!([]));
    // Nor read it through the room.
    carol
        .send(json!({"type": "history", "room": "lobby"}))
        .await;
    assert_eq!(carol.recv_type("history").await["messages"], json!([]));

    bob.send(json!({"type": "history", "with": "alice"})).await;
    let history = bob.recv_type("history").await;
    assert_eq!(history["with"], "alice");
    assert_eq!(history["messages"][0]["body"], "secret");
}

#[tokio::test]
async fn direct_to_oneself_is_invalid_target_and_bad_names_are_invalid_name() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    alice
        .send(json!({"type": "direct", "to": "alice", "body": "me", "ref": "x"}))
        .await;
    assert_eq!(alice.expect_error("invalid_target").await["ref"], "x");
    alice
        .send(json!({"type": "direct", "to": "bo b", "body": "hi"}))
        .await;
    alice.expect_error("invalid_name").await;
    alice.send(json!({"type": "join", "room": "a/b"})).await;
    alice.expect_error("invalid_name").await;
    alice
        .send(json!({"type": "join", "room": "r".repeat(101)}))
        .await;
    alice.expect_error("invalid_name").await;
    alice.send(json!({"type": "typing", "to": "alice"})).await;
    alice.expect_error("invalid_target").await;
    alice.send(json!({"type": "history", "with": ""})).await;
    alice.expect_error("invalid_name").await;
}

#[tokio::test]
async fn an_offline_user_finds_direct_messages_in_inbox_and_history() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    for body in ["one", "two", "three"] {
        alice
            .send(json!({"type": "direct", "to": "bob", "body": body}))
            .await;
        alice.recv_type("ack").await;
    }
    chat.send_direct("carol", "bob", "from carol")
        .await
        .unwrap();

    let mut bob = Client::connect(&chat, "bob").await;
    bob.send(json!({"type": "inbox"})).await;
    let inbox = bob.recv_type("inbox").await;
    assert_eq!(
        inbox["conversations"],
        json!([
            {"with": "carol", "last_id": 1, "read_id": 0, "unread": 1},
            {"with": "alice", "last_id": 3, "read_id": 0, "unread": 3},
        ])
    );
    bob.send(json!({"type": "history", "with": "alice"})).await;
    let history = bob.recv_type("history").await;
    let bodies: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["one", "two", "three"]);

    bob.send(json!({"type": "read", "with": "alice", "id": 2}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "read", "with": "bob", "user": "bob", "id": 2})
    );
    bob.send(json!({"type": "inbox"})).await;
    let inbox = bob.recv_type("inbox").await;
    assert_eq!(
        inbox["conversations"][1],
        json!({"with": "alice", "last_id": 3, "read_id": 2, "unread": 1})
    );
}

#[tokio::test]
async fn typing_goes_to_the_others_and_is_not_echoed() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    let mut alice_tab = Client::connect(&chat, "alice").await;
    let mut bob = Client::connect(&chat, "bob").await;
    alice.join("lobby").await;
    alice_tab.join("lobby").await;
    bob.join("lobby").await;
    alice.recv_type("member").await;
    alice_tab.recv_type("member").await;

    alice.send(json!({"type": "typing", "room": "lobby"})).await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "typing", "room": "lobby", "from": "alice"})
    );
    alice.expect_silence().await;
    alice_tab.expect_silence().await;

    bob.send(json!({"type": "typing", "to": "alice"})).await;
    let expected = json!({"type": "typing", "to": "alice", "from": "bob"});
    assert_eq!(alice.recv().await, expected);
    assert_eq!(alice_tab.recv().await, expected);
    bob.expect_silence().await;

    // Not stored.
    bob.send(json!({"type": "history", "room": "lobby"})).await;
    assert_eq!(bob.recv_type("history").await["messages"], json!([]));
}

#[tokio::test]
async fn read_receipts_reach_the_room_and_only_move_forward() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    let mut bob = Client::connect(&chat, "bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    alice.recv_type("member").await;
    let id = alice.say("lobby", "read me").await;
    bob.recv_type("message").await;

    bob.send(json!({"type": "read", "room": "lobby", "id": id}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "read", "room": "lobby", "user": "bob", "id": id})
    );
    bob.expect_silence().await;

    bob.send(json!({"type": "read", "room": "lobby", "id": 0}))
        .await;
    assert_eq!(
        alice.recv_type("read").await["id"],
        id,
        "a stale receipt does not move back"
    );
}

#[tokio::test]
async fn history_pages_backwards_and_forwards() {
    let chat = chat();
    for i in 1..=30 {
        chat.publish("lobby", "bot", &format!("m{i}"))
            .await
            .unwrap();
    }
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("lobby").await;
    let ids = |frame: &serde_json::Value| -> Vec<u64> {
        frame["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect()
    };

    alice
        .send(json!({"type": "history", "room": "lobby", "limit": 5}))
        .await;
    let newest = alice.recv_type("history").await;
    assert_eq!(
        (ids(&newest), newest["more"].as_bool()),
        (vec![26, 27, 28, 29, 30], Some(true))
    );
    assert_eq!(newest["room"], "lobby");
    assert_eq!(newest["messages"][0]["type"], "message");

    assert!(newest.get("ref").is_none(), "no ref asked, none sent");
    alice
        .send(json!({"type": "history", "room": "lobby", "before": 26, "limit": 5, "ref": "h2"}))
        .await;
    let older = alice.recv_type("history").await;
    assert_eq!(ids(&older), vec![21, 22, 23, 24, 25]);
    assert_eq!(older["ref"], "h2");
    alice
        .send(json!({"type": "history", "room": "lobby", "before": 4, "limit": 5}))
        .await;
    let oldest = alice.recv_type("history").await;
    assert_eq!(
        (ids(&oldest), oldest["more"].as_bool()),
        (vec![1, 2, 3], Some(false))
    );

    alice
        .send(json!({"type": "history", "room": "lobby", "after": 27}))
        .await;
    let tail = alice.recv_type("history").await;
    assert_eq!(
        (ids(&tail), tail["more"].as_bool()),
        (vec![28, 29, 30], Some(false))
    );
    alice
        .send(json!({"type": "history", "room": "lobby", "after": 0, "limit": 2}))
        .await;
    let head = alice.recv_type("history").await;
    assert_eq!(
        (ids(&head), head["more"].as_bool()),
        (vec![1, 2], Some(true))
    );

    // The default page is 50 and no page is larger than 100.
    for i in 31..=150 {
        chat.publish("lobby", "bot", &format!("m{i}"))
            .await
            .unwrap();
    }
    while alice.recv_type("message").await["id"] != 150 {}
    alice
        .send(json!({"type": "history", "room": "lobby"}))
        .await;
    assert_eq!(ids(&alice.recv_type("history").await).len(), 50);
    alice
        .send(json!({"type": "history", "room": "lobby", "limit": 1000}))
        .await;
    assert_eq!(ids(&alice.recv_type("history").await).len(), 100);
}

#[tokio::test]
async fn resume_with_since_returns_what_was_missed_up_to_the_cap() {
    let config = ChatConfig {
        resume_limit: 5,
        ..ChatConfig::default()
    };
    let chat = chat_with(config);
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("lobby").await;
    let seen = alice.say("lobby", "before the drop").await;
    alice.disconnect().await;

    for i in 1..=8 {
        chat.publish("lobby", "bob", &format!("missed {i}"))
            .await
            .unwrap();
    }
    let mut alice = Client::connect(&chat, "alice").await;
    alice
        .send(json!({"type": "join", "room": "lobby", "since": seen}))
        .await;
    let joined = alice.recv_type("joined").await;
    let history = joined["history"].as_array().unwrap();
    let bodies: Vec<&str> = history
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["missed 1", "missed 2", "missed 3", "missed 4", "missed 5"]
    );
    assert_eq!(joined["more"], true);

    let last = history[4]["id"].as_u64().unwrap();
    alice
        .send(json!({"type": "history", "room": "lobby", "after": last}))
        .await;
    let rest = alice.recv_type("history").await;
    assert_eq!(rest["messages"].as_array().unwrap().len(), 3);
    assert_eq!(rest["more"], false);
}

#[tokio::test]
async fn joining_while_messages_flow_misses_nothing_and_repeats_nothing() {
    let chat = chat();
    let publisher = {
        let chat = chat.clone();
        tokio::spawn(async move {
            for i in 1..=300u32 {
                chat.publish("busy", "bot", &i.to_string()).await.unwrap();
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    tokio::task::yield_now().await;
    let mut alice = Client::connect(&chat, "alice").await;
    alice
        .send(json!({"type": "join", "room": "busy", "since": 0}))
        .await;
    let joined = alice.recv_type("joined").await;
    let mut ids: Vec<u64> = joined["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    publisher.await.unwrap();
    while ids.last() != Some(&300) {
        ids.push(alice.recv_type("message").await["id"].as_u64().unwrap());
    }
    let first = ids[0];
    assert_eq!(first, 1, "resume from 0 starts at the first message");
    assert_eq!(ids, (1..=300).collect::<Vec<u64>>(), "a gap or a duplicate");
}

#[tokio::test]
async fn who_lists_online_users_and_watch_gives_presence_edges() {
    let chat = chat();
    let mut watcher = Client::connect(&chat, "watcher").await;
    watcher.send(json!({"type": "who", "watch": true})).await;
    assert_eq!(
        watcher.recv().await,
        json!({"type": "online", "users": ["watcher"], "count": 1, "more": false})
    );

    let alice = Client::connect(&chat, "alice").await;
    assert_eq!(
        watcher.recv().await,
        json!({"type": "presence", "user": "alice", "status": "online"})
    );
    let alice_tab = Client::connect(&chat, "alice").await;
    watcher.expect_silence().await;

    watcher.send(json!({"type": "who"})).await;
    assert_eq!(
        watcher.recv().await,
        json!({"type": "online", "users": ["alice", "watcher"], "count": 2, "more": false})
    );

    alice.disconnect().await;
    watcher.expect_silence().await;
    alice_tab.disconnect().await;
    assert_eq!(
        watcher.recv().await,
        json!({"type": "presence", "user": "alice", "status": "offline"})
    );

    watcher.send(json!({"type": "who", "watch": false})).await;
    watcher.recv_type("online").await;
    let _bob = Client::connect(&chat, "bob").await;
    watcher.expect_silence().await;
    assert_eq!(chat.online_users().await.unwrap(), ["bob", "watcher"]);
}

#[tokio::test]
async fn connections_that_do_not_watch_get_no_presence() {
    let chat = chat();
    let mut quiet = Client::connect(&chat, "quiet").await;
    let _alice = Client::connect(&chat, "alice").await;
    quiet.expect_silence().await;
}

#[tokio::test]
async fn ping_gets_pong() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    alice.send(json!({"type": "ping"})).await;
    assert_eq!(alice.recv().await, json!({"type": "pong"}));
}

#[tokio::test]
async fn malformed_frames_of_every_kind_are_answered_without_closing() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    let cases: &[(&str, &str)] = &[
        ("not json", "bad_frame"),
        ("", "bad_frame"),
        ("[1,2]", "bad_frame"),
        ("\"a string\"", "bad_frame"),
        ("{}", "bad_frame"),
        (r#"{"type": 3}"#, "bad_frame"),
        (r#"{"type": "join"}"#, "bad_frame"),
        (r#"{"type": "join", "room": ["x"]}"#, "bad_frame"),
        (r#"{"type": "send", "room": "a", "body": 5}"#, "bad_frame"),
        (r#"{"type": "send", "room": "a", "body": ""}"#, "bad_frame"),
        (
            r#"{"type": "history", "room": "a", "with": "b"}"#,
            "bad_frame",
        ),
        (
            r#"{"type": "read", "with": "b", "id": "seven"}"#,
            "bad_frame",
        ),
        (r#"{"type": "who", "watch": "yes"}"#, "bad_frame"),
        (r#"{"type": "fly"}"#, "unknown_type"),
        (
            r#"{"type": "send", "room": "a", "body": "x", "ref": 12}"#,
            "bad_frame",
        ),
    ];
    alice.join("a").await;
    for (text, code) in cases {
        alice.send_text(text).await;
        let error = alice.expect_error(code).await;
        assert!(error["message"].is_string(), "{text}");
    }
    alice
        .send_inbound(Inbound::Binary(Bytes::from_static(b"\x00\x01")))
        .await;
    alice.expect_error("bad_frame").await;
    alice
        .send_inbound(Inbound::Text(Bytes::from_static(b"\xff\xfe{")))
        .await;
    alice.expect_error("bad_frame").await;
    alice.sync().await;
    alice.say("a", "still open").await;
}

#[tokio::test]
async fn errors_carry_the_frames_ref() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    alice
        .send(json!({"type": "join", "room": "bad room", "ref": "j1"}))
        .await;
    assert_eq!(alice.expect_error("invalid_name").await["ref"], "j1");
    alice.send(json!({"type": "fly", "ref": "f1"})).await;
    assert_eq!(alice.expect_error("unknown_type").await["ref"], "f1");
}

#[tokio::test]
async fn body_limits_are_characters_not_bytes() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("a").await;
    let max = "é".repeat(4_096);
    alice.say("a", &max).await;
    alice
        .send(json!({"type": "send", "room": "a", "body": "x".repeat(4_097), "ref": "big"}))
        .await;
    assert_eq!(alice.expect_error("too_large").await["ref"], "big");
    alice
        .send(json!({"type": "direct", "to": "bob", "body": "x".repeat(4_097)}))
        .await;
    alice.expect_error("too_large").await;
    alice.sync().await;
}

#[tokio::test]
async fn a_body_with_a_nul_character_is_bad_frame_on_every_store() {
    // PostgreSQL cannot store U+0000; no store is asked to.
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("a").await;
    alice
        .send(json!({"type": "send", "room": "a", "body": "a\u{0}b", "ref": "nul"}))
        .await;
    assert_eq!(alice.expect_error("bad_frame").await["ref"], "nul");
    alice
        .send(json!({"type": "direct", "to": "bob", "body": "\u{0}"}))
        .await;
    alice.expect_error("bad_frame").await;
    alice.sync().await;
}

#[tokio::test]
async fn a_repeated_ref_is_not_delivered_twice() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    let mut bob = Client::connect(&chat, "bob").await;
    alice.join("a").await;
    bob.join("a").await;
    alice.recv_type("member").await;

    let frame = json!({"type": "send", "room": "a", "body": "once", "ref": "retry-1"});
    alice.send(frame.clone()).await;
    let first = alice.echo_and_ack().await.1["id"].clone();
    alice.send(frame).await;
    let again = alice.recv_type("ack").await;
    assert_eq!(again, json!({"type": "ack", "ref": "retry-1", "id": first}));
    bob.recv_type("message").await;
    bob.expect_silence().await;

    // The same for direct messages, even from another tab of the same user.
    let mut alice_tab = Client::connect(&chat, "alice").await;
    let dm = json!({"type": "direct", "to": "bob", "body": "once", "ref": "retry-2"});
    alice.send(dm.clone()).await;
    let id = alice.recv_type("ack").await["id"].clone();
    alice_tab.recv_type("direct").await;
    alice_tab.send(dm).await;
    assert_eq!(alice_tab.recv_type("ack").await["id"], id);
    bob.recv_type("direct").await;
    bob.expect_silence().await;

    // Another user's identical ref is theirs.
    bob.send(json!({"type": "send", "room": "a", "body": "mine", "ref": "retry-1"}))
        .await;
    let (mine, _) = bob.echo_and_ack().await;
    assert_ne!(mine["id"], first);
}

#[tokio::test]
async fn too_many_rooms_is_refused() {
    let chat = chat_with(ChatConfig {
        max_rooms_per_connection: 2,
        ..ChatConfig::default()
    });
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("a").await;
    alice.join("b").await;
    alice.join("a").await;
    alice.send(json!({"type": "join", "room": "c"})).await;
    alice.expect_error("too_many_rooms").await;
    alice.send(json!({"type": "leave", "room": "a"})).await;
    alice.recv_type("left").await;
    alice.join("c").await;
}

#[tokio::test]
async fn a_flood_is_rate_limited_then_closed() {
    let config = ChatConfig {
        rate_per_second: 1.0,
        rate_burst: 5,
        flood_close_after: 20,
        ..ChatConfig::default()
    };
    let chat = chat_with(config);
    let mut alice = Client::connect(&chat, "alice").await;
    for _ in 0..5 {
        alice.send(json!({"type": "ping"})).await;
    }
    for _ in 0..5 {
        alice.recv_type("pong").await;
    }
    alice
        .send(json!({"type": "send", "room": "a", "body": "x", "ref": "r"}))
        .await;
    let limited = alice.expect_error("rate_limited").await;
    assert_eq!(limited["ref"], "r");
    // When a token is back: at most a second at one frame a second.
    let retry = limited["retry_after_ms"].as_u64().unwrap();
    assert!((1..=1_000).contains(&retry), "{limited}");
    for _ in 0..100 {
        alice.send(json!({"type": "ping"})).await;
    }
    for _ in 0..18 {
        alice.expect_error("rate_limited").await;
    }
    assert_eq!(alice.expect_close().await, 1008);
    assert_eq!(alice.task.await.unwrap(), CloseReason::Flood);
}

#[tokio::test]
async fn binary_frames_count_against_the_rate_limit_too() {
    let config = ChatConfig {
        rate_per_second: 1.0,
        rate_burst: 2,
        flood_close_after: 5,
        ..ChatConfig::default()
    };
    let chat = chat_with(config);
    let mut alice = Client::connect(&chat, "alice").await;
    for _ in 0..10 {
        alice
            .send_inbound(Inbound::Binary(Bytes::from_static(b"\x01")))
            .await;
    }
    alice.expect_error("bad_frame").await;
    alice.expect_error("bad_frame").await;
    for _ in 0..4 {
        alice.expect_error("rate_limited").await;
    }
    assert_eq!(alice.expect_close().await, 1008);
}

#[tokio::test(start_paused = true)]
async fn long_lived_connections_outlast_the_layers_group_expiry() {
    use chat_core::layer::{InMemoryChannelLayer, LayerConfig};
    use std::time::Duration;
    let layer = InMemoryChannelLayer::new(
        LayerConfig::default()
            .with_channel_capacity("conn.*", 256)
            .with_group_expiry(Duration::from_secs(600)),
    );
    let config = ChatConfig {
        membership_refresh: Duration::from_secs(240),
        idle_timeout: Duration::from_secs(100_000),
        ..ChatConfig::default()
    };
    let chat = Chat::builder()
        .layer(Arc::new(layer))
        .config(config)
        .build();
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("lobby").await;
    alice.send(json!({"type": "who", "watch": true})).await;
    alice.recv_type("online").await;
    // Two whole group_expiry periods later, with refreshes in between.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(240)).await;
        alice.sync().await;
    }
    chat.publish("lobby", "bot", "still here?").await.unwrap();
    assert_eq!(alice.recv_type("message").await["body"], "still here?");
    chat.send_direct("bot", "alice", "and here?").await.unwrap();
    assert_eq!(alice.recv_type("direct").await["body"], "and here?");
    let _bob = Client::connect(&chat, "bob").await;
    assert_eq!(alice.recv_type("presence").await["user"], "bob");
}

#[tokio::test(start_paused = true)]
async fn the_server_pings_and_closes_a_silent_peer() {
    use chat_core::engine::Outbound;
    use std::time::Duration;
    // Shorter than the harness's 5 s arrival timeout, which the paused clock also advances.
    let config = ChatConfig {
        ping_interval: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(5),
        ..ChatConfig::default()
    };
    let chat = chat_with(config);
    let mut alive = Client::connect(&chat, "alive").await;
    let mut silent = Client::connect(&chat, "silent").await;
    for _ in 0..4 {
        assert_eq!(alive.next().await, Outbound::Ping);
        alive.send_inbound(Inbound::Pong).await;
    }
    // 8 s in: the peer that answers is still there; the one that never did is gone.
    alive.sync().await;
    assert_eq!(silent.next().await, Outbound::Ping);
    assert_eq!(silent.expect_close().await, 1001);
    assert_eq!(silent.task.await.unwrap(), CloseReason::PeerTimeout);
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let chat = chat_with(ChatConfig {
        max_frame_bytes: 1_000,
        ..ChatConfig::default()
    });
    let mut alice = Client::connect(&chat, "alice").await;
    alice
        .send_text(&format!(
            r#"{{"type":"ping","pad":"{}"}}"#,
            "x".repeat(2_000)
        ))
        .await;
    assert_eq!(alice.expect_close().await, 1009);
    assert_eq!(alice.task.await.unwrap(), CloseReason::FrameTooLarge);

    // The same when the WebSocket layer caught it first.
    let mut bob = Client::connect(&chat, "bob").await;
    bob.send_inbound(Inbound::TooLarge).await;
    assert_eq!(bob.expect_close().await, 1009);
}

#[tokio::test]
async fn a_slow_reader_is_cut_off_while_others_keep_receiving() {
    let chat = chat_with(ChatConfig {
        outbound_budget: 2_048,
        ..ChatConfig::default()
    });
    let mut fast = Client::connect(&chat, "fast").await;
    fast.join("a").await;
    // The slow client's socket holds 4 frames and it never reads them.
    let slow = Client::connect_raw(&chat, "slow", Route::Room("a".into()), 4).await;
    fast.recv_type("member").await;

    let mut slow_left = false;
    for i in 0..200 {
        chat.publish("a", "bot", &format!("m{i}")).await.unwrap();
        let mut frame = fast.recv().await;
        if frame["type"] == "member" {
            assert_eq!(
                frame,
                json!({"type": "member", "room": "a", "user": "slow", "event": "leave"})
            );
            slow_left = true;
            frame = fast.recv().await;
        }
        assert_eq!(
            frame["body"],
            format!("m{i}"),
            "the fast reader lost a message"
        );
    }
    let reason = tokio::time::timeout(common::ARRIVAL, slow.task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, CloseReason::SlowConsumer);
    if !slow_left {
        fast.recv_type("member").await;
    }
    assert_eq!(chat.online_users().await.unwrap(), ["fast"]);
}

struct Strict;

#[async_trait]
impl Policy for Strict {
    async fn allow_join(&self, _user: &str, room: &str) -> Result<(), Refusal> {
        if room == "vault" {
            return Err(Refusal::new("the vault is closed"));
        }
        Ok(())
    }
    async fn allow_send(&self, user: &str, _room: &str, _body: &str) -> Result<(), Refusal> {
        if user == "muted" {
            return Err(Refusal::new("you are muted"));
        }
        Ok(())
    }
    async fn allow_direct(&self, _user: &str, to: &str, _body: &str) -> Result<(), Refusal> {
        if to == "ceo" {
            return Err(Refusal::new("no direct messages to the CEO"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn the_host_policy_refuses_with_forbidden() {
    let chat = Chat::builder().policy(Arc::new(Strict)).build();
    let mut muted = Client::connect(&chat, "muted").await;
    muted.send(json!({"type": "join", "room": "vault"})).await;
    let error = muted.expect_error("forbidden").await;
    assert_eq!(error["message"], "the vault is closed");
    muted.join("lobby").await;
    muted
        .send(json!({"type": "send", "room": "lobby", "body": "hi", "ref": "m1"}))
        .await;
    assert_eq!(muted.expect_error("forbidden").await["ref"], "m1");
    muted
        .send(json!({"type": "direct", "to": "ceo", "body": "hi"}))
        .await;
    muted.expect_error("forbidden").await;
    muted
        .send(json!({"type": "history", "room": "vault"}))
        .await;
    muted.expect_error("not_member").await;
    muted.sync().await;
    assert!(chat.room_members("vault").await.unwrap().is_empty());
}

/// A store that fails while `down` is set.
#[derive(Default)]
struct FlakyStore {
    down: AtomicBool,
    inner: InMemoryHistoryStore,
}

impl FlakyStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError("database is down".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl HistoryStore for FlakyStore {
    async fn append(&self, c: &Conversation, m: NewMessage<'_>) -> Result<Appended, StoreError> {
        self.check()?;
        self.inner.append(c, m).await
    }
    async fn before(
        &self,
        c: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.check()?;
        self.inner.before(c, before, limit).await
    }
    async fn after(&self, c: &Conversation, after: u64, limit: usize) -> Result<Page, StoreError> {
        self.check()?;
        self.inner.after(c, after, limit).await
    }
    async fn mark_read(&self, user: &str, c: &Conversation, id: u64) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.mark_read(user, c, id).await
    }
    async fn inbox(&self, user: &str) -> Result<Vec<InboxEntry>, StoreError> {
        self.check()?;
        self.inner.inbox(user).await
    }
    async fn epoch(&self) -> Result<String, StoreError> {
        self.inner.epoch().await
    }
}

#[tokio::test]
async fn a_store_failure_is_unavailable_and_nothing_is_acked_or_delivered() {
    let store = Arc::new(FlakyStore::default());
    let chat = Chat::builder().store(store.clone()).build();
    let mut alice = Client::connect(&chat, "alice").await;
    let mut bob = Client::connect(&chat, "bob").await;
    alice.join("a").await;
    bob.join("a").await;
    alice.recv_type("member").await;

    store.down.store(true, Ordering::SeqCst);
    alice
        .send(json!({"type": "send", "room": "a", "body": "lost?", "ref": "u1"}))
        .await;
    assert_eq!(alice.expect_error("unavailable").await["ref"], "u1");
    alice
        .send(json!({"type": "direct", "to": "bob", "body": "lost?"}))
        .await;
    alice.expect_error("unavailable").await;
    alice.send(json!({"type": "history", "room": "a"})).await;
    alice.expect_error("unavailable").await;
    alice.send(json!({"type": "inbox"})).await;
    alice.expect_error("unavailable").await;
    alice.send(json!({"type": "join", "room": "b"})).await;
    alice.expect_error("unavailable").await;
    bob.expect_silence().await;
    assert!(
        chat.room_members("b").await.unwrap().is_empty(),
        "a failed join is undone"
    );

    // The retry with the same ref goes through once the store is back.
    store.down.store(false, Ordering::SeqCst);
    alice
        .send(json!({"type": "send", "room": "a", "body": "lost?", "ref": "u1"}))
        .await;
    alice.echo_and_ack().await;
    assert_eq!(bob.recv_type("message").await["body"], "lost?");
}

#[tokio::test]
async fn the_host_publishes_lists_and_disconnects() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    let mut alice_tab = Client::connect(&chat, "alice").await;
    alice.join("lobby").await;

    let stored = chat
        .publish("lobby", "system", "maintenance at noon")
        .await
        .unwrap();
    let frame = alice.recv_type("message").await;
    assert_eq!(
        (frame["from"].as_str(), frame["id"].as_u64()),
        (Some("system"), Some(stored.id))
    );
    alice_tab.expect_silence().await;

    chat.send_direct("bot", "alice", "psst").await.unwrap();
    assert_eq!(alice.recv_type("direct").await["from"], "bot");
    assert_eq!(alice_tab.recv_type("direct").await["from"], "bot");

    assert_eq!(chat.online_users().await.unwrap(), ["alice"]);
    assert_eq!(chat.room_members("lobby").await.unwrap(), ["alice"]);
    assert!(chat.publish("bad room", "system", "x").await.is_err());
    assert!(chat.publish("lobby", "system", "").await.is_err());
    assert!(chat.send_direct("bot", "bot", "x").await.is_err());

    chat.disconnect_user("alice").await.unwrap();
    assert_eq!(alice.expect_close().await, 4001);
    assert_eq!(alice_tab.expect_close().await, 4001);
    assert_eq!(alice.task.await.unwrap(), CloseReason::Disconnected);
    tokio::time::sleep(common::QUIET).await;
    assert!(chat.online_users().await.unwrap().is_empty());
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1001() {
    let chat = chat();
    let mut alice = Client::connect(&chat, "alice").await;
    let mut bob = Client::connect(&chat, "bob").await;
    chat.shutdown();
    assert_eq!(alice.expect_close().await, 1001);
    assert_eq!(bob.expect_close().await, 1001);
    assert_eq!(alice.task.await.unwrap(), CloseReason::Shutdown);
}

#[tokio::test]
async fn an_aborted_connection_still_goes_offline() {
    let chat = chat();
    let mut watcher = Client::connect(&chat, "watcher").await;
    watcher.send(json!({"type": "who", "watch": true})).await;
    watcher.recv_type("online").await;
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("lobby").await;
    watcher.recv_type("presence").await;

    alice.task.abort();
    assert_eq!(
        watcher.recv().await,
        json!({"type": "presence", "user": "alice", "status": "offline"})
    );
    assert!(chat.room_members("lobby").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_never_leaves_the_user_looking_offline() {
    // A reload closes the old connection while the new one opens. Whatever the interleaving,
    // the last presence frame the watcher receives about her must say online, as she is
    // (`reload_rounds` checks after every round).
    let chat = chat();
    let mut watcher = Watcher::new(&chat).await;
    let tab = Client::connect(&chat, "alice").await;
    let tab = common::reload_rounds(&mut watcher, tab, 200, |_| chat.clone()).await;
    // Once she has really gone, the last frame says offline, and no stale `online` follows.
    tab.disconnect().await;
    watcher.until("alice", false).await;
    watcher.client.expect_silence().await;
    assert_eq!(watcher.last_status("alice"), Some("offline"));
}

#[tokio::test]
async fn a_resume_cut_short_holds_the_room_until_the_client_pages_to_the_end() {
    let chat = chat_with(ChatConfig {
        resume_limit: 5,
        ..ChatConfig::default()
    });
    let mut bob = Client::connect(&chat, "bob").await;
    bob.join("a").await;
    for i in 1..=12 {
        bob.say("a", &i.to_string()).await;
    }
    let mut alice = Client::connect(&chat, "alice").await;
    alice
        .send(json!({"type": "join", "room": "a", "since": 0}))
        .await;
    let joined = alice.recv_type("joined").await;
    assert_eq!(ids(&joined["history"]), [1, 2, 3, 4, 5]);
    assert_eq!(joined["more"], true);
    assert_eq!(bob.recv_type("member").await["event"], "join");

    // A message sent meanwhile is held back: delivered now, it would make alice's highest id
    // seen skip 6..=12 on her next resume.
    bob.say("a", "13").await;
    alice.expect_silence().await;
    let page = json!({"type": "history", "room": "a", "after": 5, "limit": 5});
    alice.send(page).await;
    let page = alice.recv_type("history").await;
    assert_eq!(
        (ids(&page["messages"]), &page["more"]),
        (vec![6, 7, 8, 9, 10], &json!(true))
    );
    alice.expect_silence().await;
    let page = json!({"type": "history", "room": "a", "after": 10, "limit": 5});
    alice.send(page).await;
    let page = alice.recv_type("history").await;
    assert_eq!(
        (ids(&page["messages"]), &page["more"]),
        (vec![11, 12, 13], &json!(false))
    );

    // Paged to the end: the room is live again, right after what the last page held.
    bob.say("a", "14").await;
    assert_eq!(alice.recv_type("message").await["id"], 14);
    alice.expect_silence().await;
}

fn ids(messages: &serde_json::Value) -> Vec<u64> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_reader_the_server_fell_behind_is_repaired_from_the_store_not_cut() {
    // Two layer messages may wait for a connection; fifty are published without the connection
    // getting a turn in between, so the layer drops most of them for it. The client reads all
    // along: it must get every message, in order, from the store, and stay connected.
    let chat = chat_with(ChatConfig {
        connection_backlog: 2,
        ..ChatConfig::default()
    });
    let mut reader = Client::connect(&chat, "reader").await;
    reader.join("a").await;
    for i in 0..50 {
        chat.publish("a", "bot", &format!("m{i}")).await.unwrap();
    }
    for i in 0..50 {
        let frame = reader.recv_type("message").await;
        assert_eq!(frame["body"], format!("m{i}"));
    }
    reader.expect_silence().await;
    reader.send(json!({"type": "ping"})).await;
    reader.recv_type("pong").await;
}

/// Protocol 1.1 with small thresholds: `joined` lists a first page and the count, `members` and
/// `who` page the rest, and a room above `large_room` sends no `member`, `typing` or `read`
/// events but `member_count`, at most once per interval, until it is small again.
#[tokio::test]
async fn rooms_of_any_size_page_their_members_and_count_instead_of_announcing() {
    let chat = chat_with(ChatConfig {
        large_room: 3,
        members_page: 2,
        members_max_page: 3,
        online_page: 2,
        member_count_interval: std::time::Duration::from_millis(300),
        ..ChatConfig::default()
    });
    let mut alice = Client::connect(&chat, "alice").await;
    alice.join("r").await;
    let mut others = Vec::new();
    for user in ["bob", "carol"] {
        let mut client = Client::connect(&chat, user).await;
        client.join("r").await;
        assert_eq!(
            alice.recv_type("member").await["user"],
            user,
            "small: member events"
        );
        others.push(client);
    }
    // The fourth member makes the room large: a count, not a member event.
    let mut dave = Client::connect(&chat, "dave").await;
    let joined = dave.join("r").await;
    assert_eq!(
        joined["members"],
        json!(["alice", "bob"]),
        "the first page only"
    );
    assert_eq!(joined["member_count"], 4);
    assert_eq!(
        alice.recv().await,
        json!({"type": "member_count", "room": "r", "count": 4})
    );
    // A storm of joins within one interval is one more count, not one event per join.
    for user in ["erin", "frank", "grace"] {
        let mut client = Client::connect(&chat, user).await;
        client.join("r").await;
        others.push(client);
    }
    assert_eq!(
        alice.recv().await,
        json!({"type": "member_count", "room": "r", "count": 7})
    );
    alice.expect_silence().await;

    // Paging: default page, explicit limit cut to the maximum, after a name.
    alice.send(json!({"type": "members", "room": "r"})).await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "members", "room": "r", "users": ["alice", "bob"], "count": 7, "more": true})
    );
    // A `ref` comes back on the reply, so several pages can be out at once.
    alice
        .send(json!({"type": "members", "room": "r", "after": "bob", "limit": 50, "ref": "p2"}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "members", "room": "r", "users": ["carol", "dave", "erin"], "count": 7, "more": true, "ref": "p2"})
    );
    alice
        .send(json!({"type": "members", "room": "r", "after": "erin"}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "members", "room": "r", "users": ["frank", "grace"], "count": 7, "more": false})
    );
    alice
        .send(json!({"type": "members", "room": "elsewhere"}))
        .await;
    alice.expect_error("not_member").await;

    // Large: typing and read are not announced (read is still stored).
    while dave.recv_type("member_count").await["count"] != 7 {}
    dave.send(json!({"type": "typing", "room": "r"})).await;
    let id = dave.say("r", "hello").await;
    dave.send(json!({"type": "read", "room": "r", "id": id}))
        .await;
    assert_eq!(alice.recv_type("message").await["body"], "hello");
    alice.expect_silence().await;

    // `who` pages too.
    alice.send(json!({"type": "who"})).await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "online", "users": ["alice", "bob"], "count": 7, "more": true})
    );
    alice.send(json!({"type": "who", "after": "frank"})).await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "online", "users": ["grace"], "count": 7, "more": false})
    );

    // Back to the threshold: one count says the room is small again; then member events.
    for _ in 0..4 {
        others.pop().unwrap().disconnect().await;
    }
    let count = alice.recv_type("member_count").await;
    let count = if count["count"] == 3 {
        count
    } else {
        alice.recv_type("member_count").await
    };
    assert_eq!(
        count,
        json!({"type": "member_count", "room": "r", "count": 3})
    );
    dave.send(json!({"type": "typing", "room": "r"})).await;
    assert_eq!(alice.recv_type("typing").await["from"], "dave");
    dave.disconnect().await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "member", "room": "r", "user": "dave", "event": "leave"})
    );
}

/// Protocol 1.1's point: 10,000 clients joining one room at once cost O(N). Under version 1
/// every early joiner would get thousands of `member` events and be cut as a slow reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_of_ten_thousand_cuts_nobody_and_costs_a_few_frames_each() {
    const CLIENTS: usize = 10_000;
    let chat = chat();
    let mut clients = Vec::with_capacity(CLIENTS);
    // In waves of 1,000 at once, so a debug build on two cores answers each within the
    // helpers' patience.
    for wave in 0..CLIENTS / 1_000 {
        let mut joins = tokio::task::JoinSet::new();
        for i in wave * 1_000..(wave + 1) * 1_000 {
            let chat = chat.clone();
            joins.spawn(async move {
                let mut client = Client::connect(&chat, &format!("u{i:05}")).await;
                let joined = client.join("storm").await;
                assert!(joined["members"].as_array().unwrap().len() <= 200);
                client
            });
        }
        while let Some(client) = joins.join_next().await {
            clients.push(client.unwrap());
        }
    }
    assert_eq!(chat.room_members("storm").await.unwrap().len(), CLIENTS);
    // Every announcement has settled; a late client sees the whole count.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let mut late = Client::connect(&chat, "late").await;
    assert_eq!(late.join("storm").await["member_count"], CLIENTS + 1);

    let mut most = 0;
    for client in &mut clients {
        assert!(!client.task.is_finished(), "{} was cut", client.user);
        let frames = client.drain_now();
        let counts = frames
            .iter()
            .filter(|f| f["type"] == "member_count")
            .count();
        let members = frames.iter().filter(|f| f["type"] == "member").count();
        assert_eq!(
            counts + members,
            frames.len(),
            "{}: {frames:?}",
            client.user
        );
        assert!(members < 500, "member events only while the room is small");
        most = most.max(counts);
    }
    // One count per second per room, whatever the number of joins.
    assert!(most <= 60, "a client got {most} counts during the storm");
}
