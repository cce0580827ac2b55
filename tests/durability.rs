//! What a durable store promises, tested on a real server process killed with SIGKILL while a
//! client is still sending: everything acknowledged is there after the restart, with the same
//! ids and epoch, and ids stay dense; a direct
//! message to a user who was offline waits in their inbox; a client resuming across the restart
//! gets exactly what it missed; a retry of an acknowledged `ref` is not stored again.
//!
//! Run for SQLite (a file of the test's own) and PostgreSQL (a schema of its own in
//! `CHAT_TEST_DATABASE_URL`, which `scripts/test.sh` provides).

#![allow(clippy::unwrap_used)]

#[path = "../tests-shared/server_process.rs"]
mod server_process;
#[path = "../tests-shared/socket_suite.rs"]
mod socket_suite;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use server_process::Server;
use socket_suite::{connect, Socket};
use tokio_tungstenite::tungstenite::Message;

async fn start(store: &[&str]) -> Server {
    let mut args = store.to_vec();
    args.extend(["--rate-per-second", "10000", "--rate-burst", "10000"]);
    Server::start("chat-server-tungstenite", &args).await
}

async fn welcome_epoch(addr: SocketAddr, user: &str) -> (Socket, String) {
    let mut socket = socket_suite::open(addr, &format!("/ws?user={user}"))
        .await
        .unwrap();
    let welcome = socket.recv_type("welcome").await;
    (socket, welcome["epoch"].as_str().unwrap().to_owned())
}

/// Sends `count` messages with refs `m0..`, up to 50 unacknowledged at a time; returns ref -> id.
async fn send_acked(socket: &mut Socket, count: usize) -> BTreeMap<String, u64> {
    let mut acked = BTreeMap::new();
    let mut sent = 0;
    while acked.len() < count {
        while sent < count && sent - acked.len() < 50 {
            let reference = format!("m{sent}");
            socket
                .send(json!({"type": "send", "room": "log", "body": reference, "ref": reference}))
                .await;
            sent += 1;
        }
        let frame = socket.recv().await;
        match frame["type"].as_str() {
            Some("ack") => {
                let reference = frame["ref"].as_str().unwrap().to_owned();
                acked.insert(reference, frame["id"].as_u64().unwrap());
            }
            Some("error") => panic!("refused: {frame}"),
            _ => {}
        }
    }
    acked
}

/// Every stored message of the room after `since`, paging past the resume cap.
async fn resume(socket: &mut Socket, since: u64) -> Vec<Value> {
    socket
        .send(json!({"type": "join", "room": "log", "since": since}))
        .await;
    let joined = socket.recv_type("joined").await;
    let mut messages: Vec<Value> = joined["history"].as_array().unwrap().clone();
    let mut more = joined["more"] == true;
    while more {
        let after = messages.last().map_or(since, |m| m["id"].as_u64().unwrap());
        socket
            .send(json!({"type": "history", "room": "log", "after": after, "limit": 100}))
            .await;
        let page = socket.recv_type("history").await;
        messages.extend(page["messages"].as_array().unwrap().iter().cloned());
        more = page["more"] == true;
    }
    messages
}

/// Sends `s0`, `s1`, … with up to 50 unacknowledged until the connection dies, recording each
/// ack as it comes: so the server is killed with appends in flight.
async fn stream_until_killed(mut socket: Socket, acked: Arc<Mutex<BTreeMap<String, u64>>>) {
    let (mut sent, mut outstanding) = (0, 0);
    loop {
        while outstanding < 50 {
            let reference = format!("s{sent}");
            let frame = json!({"type": "send", "room": "log", "body": reference, "ref": reference});
            if socket
                .ws
                .send(Message::text(frame.to_string()))
                .await
                .is_err()
            {
                return;
            }
            sent += 1;
            outstanding += 1;
        }
        match socket.ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                match frame["type"].as_str() {
                    Some("ack") => {
                        let reference = frame["ref"].as_str().unwrap().to_owned();
                        let id = frame["id"].as_u64().unwrap();
                        acked.lock().unwrap().insert(reference, id);
                        outstanding -= 1;
                    }
                    Some("error") => panic!("refused: {frame}"),
                    _ => {}
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}

fn ids(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["id"].as_u64().unwrap()).collect()
}

async fn nothing_acknowledged_is_lost(store: &[&str]) {
    let mut server = start(store).await;
    let (mut reader, epoch) = welcome_epoch(server.addr, "reader").await;
    reader.join("log").await;
    let (mut writer, _) = welcome_epoch(server.addr, "writer").await;
    writer.join("log").await;
    let acked = send_acked(&mut writer, 1_000).await;
    let mut by_id: Vec<u64> = acked.values().copied().collect();
    by_id.sort_unstable();
    assert_eq!(by_id, (1..=1_000).collect::<Vec<_>>());
    // The reader saw some of it live, up to `seen`.
    let mut seen = 0;
    while seen < 300 {
        let frame = reader.recv().await;
        if frame["type"] == "message" {
            seen = frame["id"].as_u64().unwrap();
        }
    }
    let mut dave = connect(server.addr, "dave").await;
    dave.send(json!({"type": "direct", "to": "erin", "body": "while you were away", "ref": "d1"}))
        .await;
    dave.recv_type("ack").await;

    // Killed while a client streams sends, some acknowledged a moment ago, some in flight: no
    // goodbye, no flush.
    let streamed = Arc::new(Mutex::new(BTreeMap::new()));
    let streaming = tokio::spawn(stream_until_killed(writer, Arc::clone(&streamed)));
    while streamed.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    streaming.await.unwrap();
    drop((reader, dave));
    let mut acked = acked;
    acked.extend(std::mem::take(&mut *streamed.lock().unwrap()));
    assert!(acked.len() >= 1_200);
    let server = start(store).await;

    let (mut reader, again) = welcome_epoch(server.addr, "reader").await;
    assert_eq!(
        again, epoch,
        "a durable store keeps its epoch across restarts"
    );
    let (mut fresh, _) = welcome_epoch(server.addr, "fresh").await;
    let everything = resume(&mut fresh, 0).await;
    // Every acknowledged message, under its id; perhaps some that were stored as the server
    // died, before their ack went out; no gap in the ids.
    let newest = everything.len() as u64;
    assert_eq!(ids(&everything), (1..=newest).collect::<Vec<_>>());
    let stored: BTreeMap<&str, u64> = everything
        .iter()
        .map(|m| (m["body"].as_str().unwrap(), m["id"].as_u64().unwrap()))
        .collect();
    for (reference, id) in &acked {
        assert_eq!(
            stored.get(reference.as_str()),
            Some(id),
            "acknowledged {reference} is lost"
        );
    }
    let missed = resume(&mut reader, seen).await;
    assert_eq!(
        ids(&missed),
        (seen + 1..=newest).collect::<Vec<_>>(),
        "the resume after the restart skipped or repeated something"
    );

    // A retry of an acknowledged ref after the restart is answered with the first id.
    let (mut writer, _) = welcome_epoch(server.addr, "writer").await;
    writer.join("log").await;
    writer
        .send(json!({"type": "send", "room": "log", "body": "m7", "ref": "m7"}))
        .await;
    let ack = loop {
        let frame = writer.recv().await;
        if frame["type"] == "ack" {
            break frame;
        }
    };
    assert_eq!(ack["id"].as_u64(), Some(acked["m7"]));
    writer.send(json!({"type": "history", "room": "log"})).await;
    let history_page = writer.recv_type("history").await;
    assert_eq!(
        history_page["messages"].as_array().unwrap().last().unwrap()["id"],
        newest,
        "the retry was stored again"
    );

    // Erin, offline when dave wrote, finds it.
    let mut erin = connect(server.addr, "erin").await;
    erin.send(json!({"type": "inbox"})).await;
    let inbox = erin.recv_type("inbox").await;
    assert_eq!(
        inbox["conversations"],
        json!([{"with": "dave", "last_id": 1, "read_id": 0, "unread": 1}])
    );
    erin.send(json!({"type": "history", "with": "dave"})).await;
    let history = erin.recv_type("history").await;
    assert_eq!(history["messages"][0]["body"], "while you were away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_everything_acknowledged_across_sigkill() {
    let dir = std::env::temp_dir().join(format!("chat-durability-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("chat.db");
    let _ = std::fs::remove_file(&file);
    let store = format!("sqlite://{}", file.display());
    nothing_acknowledged_is_lost(&["--store", &store]).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keeps_everything_acknowledged_across_sigkill() {
    let url = std::env::var("CHAT_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!("CHAT_TEST_DATABASE_URL is not set: run ./scripts/test.sh, which provides one")
    });
    let schema = format!("durability_{}", std::process::id());
    nothing_acknowledged_is_lost(&["--store", &url, "--store-schema", &schema]).await;
}
