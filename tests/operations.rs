//! What an operator relies on, tested on the example servers as real processes: `/healthz`,
//! `/readyz` and `/metrics` answer on the chat port and the metrics count what happened; SIGTERM
//! under load closes every socket with 1001, acknowledges nothing it did not store, and exits
//! within 10 s.

#![allow(clippy::unwrap_used)]

#[path = "../tests-shared/server_process.rs"]
mod server_process;
#[path = "../tests-shared/socket_suite.rs"]
mod socket_suite;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use server_process::Server;
use socket_suite::connect;
use tokio_tungstenite::tungstenite::Message;

const SERVERS: [&str; 2] = ["chat-server", "chat-server-tungstenite"];

/// A plain `GET` over HTTP/1.1: status and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let response = socket_suite::raw(addr, request).await;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample line of a Prometheus text page, such as
/// `chat_frames_in_total{type="send"}`; 0 when absent.
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_and_metrics_count_what_happened() {
    for binary in SERVERS {
        let server = Server::start(binary, &["--store", "memory", "--retention", "100"]).await;
        let addr = server.addr;
        assert_eq!(
            get(addr, "/healthz").await,
            (200, "ok\n".to_owned()),
            "{binary}"
        );
        assert_eq!(
            get(addr, "/readyz").await,
            (200, "ready\n".to_owned()),
            "{binary}"
        );

        let mut alice = connect(addr, "alice").await;
        let mut bob = connect(addr, "bob").await;
        alice.join("lobby").await;
        bob.join("lobby").await;
        for i in 0..3 {
            alice
                .send(json!({"type": "send", "room": "lobby", "body": format!("m{i}")}))
                .await;
            // Bob's `member` event may come first.
            let (mut echo, mut ack) = (false, false);
            while !(echo && ack) {
                match alice.recv().await["type"].as_str() {
                    Some("message") => echo = true,
                    Some("ack") => ack = true,
                    _ => {}
                }
            }
        }
        for _ in 0..3 {
            while bob.recv().await["type"] != "message" {}
        }
        alice.send(json!({"type": "dance"})).await;
        alice.expect_error("unknown_type").await;
        assert_eq!(
            socket_suite::refused_status(addr, "/ws").await,
            401,
            "{binary}"
        );

        let (status, page) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{binary}");
        let at = |name: &str| sample(&page, name);
        assert_eq!(at("chat_connections_open"), 2.0, "{binary}\n{page}");
        assert_eq!(at("chat_connections_opened_total"), 2.0, "{binary}");
        assert_eq!(at(r#"chat_frames_in_total{type="join"}"#), 2.0, "{binary}");
        assert_eq!(at(r#"chat_frames_in_total{type="send"}"#), 3.0, "{binary}");
        assert_eq!(
            at(r#"chat_frames_in_total{type="invalid"}"#),
            1.0,
            "{binary}"
        );
        assert_eq!(at(r#"chat_frames_out_total{type="ack"}"#), 3.0, "{binary}");
        // Each message to both members: alice's echo and bob's copy.
        assert_eq!(
            at(r#"chat_frames_out_total{type="message"}"#),
            6.0,
            "{binary}"
        );
        assert_eq!(
            at(r#"chat_frames_out_total{type="welcome"}"#),
            2.0,
            "{binary}"
        );
        assert_eq!(
            at(r#"chat_errors_total{code="unknown_type"}"#),
            1.0,
            "{binary}"
        );
        assert_eq!(
            at(r#"chat_handshakes_refused_total{reason="auth"}"#),
            1.0,
            "{binary}"
        );
        assert_eq!(
            at(r#"chat_store_seconds_count{op="append"}"#),
            3.0,
            "{binary}"
        );
        assert!(
            at(r#"chat_layer_seconds_count{op="group_send"}"#) >= 3.0,
            "{binary}"
        );
        assert!(
            page.contains("# TYPE chat_store_seconds histogram"),
            "{binary}"
        );

        drop((alice, bob));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, page) = get(addr, "/metrics").await;
            if sample(&page, "chat_connections_open") == 0.0 {
                assert_eq!(
                    sample(
                        &page,
                        r#"chat_connections_closed_total{reason="client_closed"}"#
                    ),
                    2.0,
                    "{binary}"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{binary}: still open"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sends with refs as fast as acks allow (a window of 20) until the socket closes; records each
/// ack; returns the close code.
async fn send_until_closed(
    mut socket: socket_suite::Socket,
    tag: String,
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
) -> Option<u16> {
    let (mut sent, mut answered) = (0usize, 0usize);
    loop {
        while sent - answered < 20 {
            let reference = format!("{tag}-{sent}");
            let frame = json!({"type": "send", "room": "ops", "body": reference, "ref": reference});
            if futures::SinkExt::send(&mut socket.ws, Message::text(frame.to_string()))
                .await
                .is_err()
            {
                return None;
            }
            sent += 1;
        }
        let message = tokio::time::timeout(Duration::from_secs(15), socket.ws.next())
            .await
            .expect("the server went silent without closing");
        let frame: serde_json::Value = match message {
            Some(Ok(Message::Text(text))) => serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        };
        match frame["type"].as_str() {
            Some("ack") => {
                answered += 1;
                let reference = frame["ref"].as_str().unwrap().to_owned();
                acked
                    .lock()
                    .unwrap()
                    .insert(reference, frame["id"].as_u64().unwrap());
            }
            Some("error") => answered += 1,
            _ => {}
        }
    }
}

/// Reads until the close frame; its code.
async fn close_code(mut socket: socket_suite::Socket) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), socket.ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_closes_with_1001_stores_every_ack_and_exits_within_10_s() {
    for binary in SERVERS {
        let dir = std::env::temp_dir().join(format!("chat-ops-{}-{binary}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = format!("sqlite://{}", dir.join("chat.db").display());
        let args = [
            "--store",
            db.as_str(),
            "--rate-per-second",
            "10000",
            "--rate-burst",
            "10000",
        ];
        let mut server = Server::start(binary, &args).await;
        let addr = server.addr;

        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let mut senders = Vec::new();
        for i in 0..5 {
            let mut socket = connect(addr, &format!("sender{i}")).await;
            socket.join("ops").await;
            senders.push(tokio::spawn(send_until_closed(
                socket,
                format!("s{i}"),
                Arc::clone(&acked),
            )));
        }
        let mut listeners = Vec::new();
        for i in 0..50 {
            let mut socket = connect(addr, &format!("listener{i}")).await;
            socket.join("ops").await;
            listeners.push(tokio::spawn(close_code(socket)));
        }
        // Under load for a moment.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while acked.lock().unwrap().len() < 500 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{binary}: too few acks"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let exited = server.terminate(Duration::from_secs(10)).await;
        let status = exited.unwrap_or_else(|| panic!("{binary} still running 10 s after SIGTERM"));
        assert!(status.success(), "{binary} exited with {status}");
        for sender in senders {
            assert_eq!(sender.await.unwrap(), Some(1001), "{binary}: a sender");
        }
        for listener in listeners {
            assert_eq!(listener.await.unwrap(), Some(1001), "{binary}: a listener");
        }

        // Every acknowledged message was stored, under the id its ack gave.
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        let server = Server::start(binary, &args).await;
        let mut reader = connect(server.addr, "reader").await;
        reader.join("ops").await;
        let mut stored = BTreeMap::new();
        let mut after = 0u64;
        loop {
            reader
                .send(json!({"type": "history", "room": "ops", "after": after, "limit": 100}))
                .await;
            let page = reader.recv_type("history").await;
            for message in page["messages"].as_array().unwrap() {
                let id = message["id"].as_u64().unwrap();
                stored.insert(message["body"].as_str().unwrap().to_owned(), id);
                after = id;
            }
            if page["more"] != true {
                break;
            }
        }
        for (reference, id) in &acked {
            assert_eq!(
                stored.get(reference),
                Some(id),
                "{binary}: acked {reference} as {id}"
            );
        }
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// How long a bystander's message may take to come back while someone abuses the server: the
/// bound the README states.
const BYSTANDER_BOUND: Duration = Duration::from_secs(2);

/// Two users in a room: one sends, the other must receive within [`BYSTANDER_BOUND`].
struct Bystanders {
    alice: socket_suite::Socket,
    bob: socket_suite::Socket,
    sent: usize,
}

impl Bystanders {
    async fn new(addr: SocketAddr) -> Self {
        let mut alice = connect(addr, "alice").await;
        let mut bob = connect(addr, "bob").await;
        alice.join("calm").await;
        bob.join("calm").await;
        Self {
            alice,
            bob,
            sent: 0,
        }
    }

    /// One message from alice to bob; panics if it takes longer than the bound.
    async fn round_trip(&mut self, what: &str) {
        self.sent += 1;
        let body = format!("still fine {}", self.sent);
        let started = tokio::time::Instant::now();
        self.alice
            .send(json!({"type": "send", "room": "calm", "body": body}))
            .await;
        loop {
            let frame = self.bob.recv().await;
            if frame["type"] == "message" && frame["body"] == body.as_str() {
                break;
            }
        }
        let took = started.elapsed();
        assert!(
            took < BYSTANDER_BOUND,
            "{what}: a bystander's message took {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_dropped_before_the_handshake_leave_nothing_behind() {
    for binary in SERVERS {
        let server = Server::start(binary, &["--store", "memory", "--retention", "100"]).await;
        let addr = server.addr;
        let mut bystanders = Bystanders::new(addr).await;
        let files_before = server.open_files();
        for batch in 0..20 {
            let mut sockets = Vec::new();
            for i in 0..500 {
                let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
                if i % 2 == 0 {
                    // Half of them start a request head, then vanish.
                    use tokio::io::AsyncWriteExt;
                    let _ = socket.write_all(b"GET /ws?user=x HTTP/1.1\r\nHo").await;
                }
                sockets.push(socket);
            }
            drop(sockets);
            if batch % 5 == 4 {
                bystanders.round_trip(binary).await;
            }
        }
        // Every one of them is let go: descriptors back to where they were.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while server.open_files() > files_before + 10 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{binary}: {} descriptors open, {files_before} before",
                server.open_files()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, page) = get(addr, "/metrics").await;
        assert_eq!(sample(&page, "chat_connections_open"), 2.0, "{binary}");
        bystanders.round_trip(binary).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_sent_a_byte_a_second_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let slow = |addr: SocketAddr| async move {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = b"GET /ws?user=slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nX-Pad: ";
        let started = tokio::time::Instant::now();
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            if socket.write_all(&[*byte]).await.is_err() {
                break;
            }
            let mut buffer = [0u8; 256];
            match tokio::time::timeout(Duration::from_secs(1), socket.read(&mut buffer)).await {
                Ok(Ok(0) | Err(_)) => break,
                // An answer (408 or 400) ends it as well as a close.
                Ok(Ok(_)) => break,
                Err(_) => {}
            }
            assert!(started.elapsed() < Duration::from_secs(30), "never cut off");
        }
        started.elapsed()
    };
    let servers = [
        Server::start(SERVERS[0], &["--store", "memory", "--retention", "100"]).await,
        Server::start(SERVERS[1], &["--store", "memory", "--retention", "100"]).await,
    ];
    let mut bystanders = Bystanders::new(servers[0].addr).await;
    let (warp, tungstenite) = tokio::join!(slow(servers[0].addr), slow(servers[1].addr));
    // The head deadline is 10 s on both.
    for (binary, took) in [(SERVERS[0], warp), (SERVERS[1], tungstenite)] {
        assert!(
            took < Duration::from_secs(13),
            "{binary}: cut off after {took:?}"
        );
    }
    bystanders.round_trip("after a slow head").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_thousands_of_rooms_stops_at_the_limit() {
    for binary in SERVERS {
        let args = [
            "--store",
            "memory",
            "--retention",
            "100",
            "--rate-per-second",
            "10000",
            "--rate-burst",
            "10000",
            "--max-rooms",
            "100",
        ];
        let server = Server::start(binary, &args).await;
        let mut bystanders = Bystanders::new(server.addr).await;
        let mut greedy = connect(server.addr, "greedy").await;
        for i in 0..2_000 {
            greedy
                .send(json!({"type": "join", "room": format!("r{i}")}))
                .await;
        }
        let (mut joined, mut refused) = (0, 0);
        while joined + refused < 2_000 {
            let frame = greedy.recv().await;
            match (frame["type"].as_str(), frame["code"].as_str()) {
                (Some("joined"), _) => joined += 1,
                (Some("error"), Some("too_many_rooms")) => refused += 1,
                other => panic!("{binary}: unexpected {other:?}: {frame}"),
            }
        }
        assert_eq!((joined, refused), (100, 1_900), "{binary}");
        bystanders.round_trip(binary).await;
    }
}
