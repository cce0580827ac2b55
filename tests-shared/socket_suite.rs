//! The protocol suite over real sockets, written once and run against every adapter.
//!
//! An adapter's test file includes this file and calls [`socket_suite!`] with an async function
//! `start(chat: Chat) -> SocketAddr` that serves `chat` on a fresh loopback port. Every check then
//! talks to that port with a real tokio-tungstenite client, exactly as a browser would.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_core::auth::DevAuthenticator;
use chat_core::{Chat, ChatConfig};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const ARRIVAL: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(200);

pub fn dev_chat(config: ChatConfig) -> Chat {
    Chat::builder()
        .authenticator(Arc::new(DevAuthenticator))
        .config(config)
        .build()
}

pub struct Socket {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// Opens `path` (which carries its own query) on the server.
pub async fn open(addr: SocketAddr, path: &str) -> Result<Socket, WsError> {
    let url = format!("ws://{addr}{path}");
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    Ok(Socket { ws })
}

/// Opens `/ws` as `user` (development authentication) and takes the welcome frame.
pub async fn connect(addr: SocketAddr, user: &str) -> Socket {
    let mut socket = open(addr, &format!("/ws?user={user}")).await.unwrap();
    let welcome = socket.recv_type("welcome").await;
    assert_eq!(welcome["user"], user);
    assert!(welcome["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    socket
}

/// The HTTP status a refused handshake got.
pub async fn refused_status(addr: SocketAddr, path: &str) -> u16 {
    match open(addr, path).await {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("{path} was accepted"),
    }
}

impl Socket {
    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .unwrap();
    }

    /// The next WebSocket message, whatever its kind.
    pub async fn next_message(&mut self) -> Message {
        tokio::time::timeout(ARRIVAL, self.ws.next())
            .await
            .expect("no frame in time")
            .expect("socket ended")
            .expect("socket error")
    }

    /// The next text frame as JSON (pings and pongs skipped).
    pub async fn recv(&mut self) -> Value {
        loop {
            let message = self.next_message().await;
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub async fn recv_type(&mut self, kind: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], kind, "got {frame}");
        frame
    }

    pub async fn expect_error(&mut self, code: &str) {
        let frame = self.recv_type("error").await;
        assert_eq!(frame["code"], code, "got {frame}");
    }

    /// Nothing arrives for a moment, and the socket is still open: a frame of any kind other
    /// than a ping or pong, a close, an error or the end of the stream fails.
    pub async fn expect_silence(&mut self) {
        let deadline = tokio::time::Instant::now() + QUIET;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame and returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            let message = tokio::time::timeout(ARRIVAL, self.ws.next())
                .await
                .expect("no close in time");
            match message {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) => return u16::from(CloseCode::Status),
                Some(Ok(_)) => {}
                Some(Err(error)) => panic!("socket error before the close frame: {error}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        self.recv_type("joined").await
    }

    /// The echo and the ack of one's own room message, in either order.
    pub async fn echo_and_ack(&mut self) -> (Value, Value) {
        let first = self.recv().await;
        let second = self.recv().await;
        let (echo, ack) = if first["type"] == "ack" {
            (second, first)
        } else {
            (first, second)
        };
        assert_eq!(
            (echo["type"].as_str(), ack["type"].as_str()),
            (Some("message"), Some("ack"))
        );
        assert_eq!(echo["id"], ack["id"]);
        (echo, ack)
    }
}

pub async fn rooms_messages_and_membership(addr: SocketAddr) {
    let mut alice = connect(addr, "alice").await;
    let mut bob = connect(addr, "bob").await;
    let joined = alice.join("lobby").await;
    assert_eq!(joined["members"], json!(["alice"]));
    let joined = bob.join("lobby").await;
    assert_eq!(joined["members"], json!(["alice", "bob"]));
    assert_eq!(
        alice.recv().await,
        json!({"type": "member", "room": "lobby", "user": "bob", "event": "join"})
    );

    alice
        .send(json!({"type": "send", "room": "lobby", "body": "hello", "ref": "r1"}))
        .await;
    let (echo, ack) = alice.echo_and_ack().await;
    assert_eq!(ack["ref"], "r1");
    assert_eq!(bob.recv().await, echo);

    bob.send(json!({"type": "typing", "room": "lobby"})).await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "typing", "room": "lobby", "from": "bob"})
    );
    bob.send(json!({"type": "read", "room": "lobby", "id": echo["id"]}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "read", "room": "lobby", "user": "bob", "id": echo["id"]})
    );

    bob.send(json!({"type": "history", "room": "lobby"})).await;
    let history = bob.recv_type("history").await;
    assert_eq!(history["messages"][0]["body"], "hello");

    bob.send(json!({"type": "leave", "room": "lobby"})).await;
    assert_eq!(bob.recv().await, json!({"type": "left", "room": "lobby"}));
    assert_eq!(
        alice.recv().await,
        json!({"type": "member", "room": "lobby", "user": "bob", "event": "leave"})
    );

    bob.send(json!({"type": "ping"})).await;
    assert_eq!(bob.recv().await, json!({"type": "pong"}));
}

pub async fn the_room_route_joins_at_once(addr: SocketAddr) {
    let mut carol = open(addr, "/ws/chat/kitchen/?user=carol").await.unwrap();
    carol.recv_type("welcome").await;
    let joined = carol.recv_type("joined").await;
    assert_eq!(joined["room"], "kitchen");
}

pub async fn direct_messages_are_private(addr: SocketAddr) {
    let mut alice = connect(addr, "dm-alice").await;
    let mut bob = connect(addr, "dm-bob").await;
    let mut eve = connect(addr, "dm-eve").await;
    for socket in [&mut alice, &mut bob, &mut eve] {
        socket.join("dm-room").await;
    }
    alice.recv_type("member").await;
    alice.recv_type("member").await;
    bob.recv_type("member").await;

    alice
        .send(json!({"type": "direct", "to": "dm-bob", "body": "secret", "ref": "d"}))
        .await;
    let ack = alice.recv_type("ack").await;
    let frame = bob.recv_type("direct").await;
    assert_eq!(
        (frame["from"].as_str(), frame["body"].as_str(), &frame["id"]),
        (Some("dm-alice"), Some("secret"), &ack["id"])
    );
    eve.expect_silence().await;
    eve.send(json!({"type": "history", "with": "dm-bob"})).await;
    assert_eq!(eve.recv_type("history").await["messages"], json!([]));

    bob.send(json!({"type": "inbox"})).await;
    let inbox = bob.recv_type("inbox").await;
    assert_eq!(inbox["conversations"][0]["with"], "dm-alice");
    assert_eq!(inbox["conversations"][0]["unread"], 1);
}

pub async fn presence_edges(addr: SocketAddr) {
    let mut watcher = connect(addr, "p-watcher").await;
    watcher.send(json!({"type": "who", "watch": true})).await;
    assert_eq!(
        watcher.recv_type("online").await["users"],
        json!(["p-watcher"])
    );
    let tab1 = connect(addr, "p-alice").await;
    assert_eq!(
        watcher.recv().await,
        json!({"type": "presence", "user": "p-alice", "status": "online"})
    );
    let mut tab2 = connect(addr, "p-alice").await;
    watcher.expect_silence().await;
    drop(tab1);
    watcher.expect_silence().await;
    tab2.ws.close(None).await.unwrap();
    assert_eq!(
        watcher.recv().await,
        json!({"type": "presence", "user": "p-alice", "status": "offline"})
    );
}

pub async fn bad_frames_are_answered_and_the_socket_stays_open(addr: SocketAddr) {
    let mut alice = connect(addr, "bad-alice").await;
    alice.ws.send(Message::text("not json")).await.unwrap();
    alice.expect_error("bad_frame").await;
    alice
        .ws
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    alice.expect_error("bad_frame").await;
    alice.send(json!({"type": "teleport"})).await;
    alice.expect_error("unknown_type").await;
    alice
        .send(json!({"type": "join", "room": "no spaces"}))
        .await;
    alice.expect_error("invalid_name").await;
    alice
        .send(json!({"type": "send", "room": "nowhere", "body": "x"}))
        .await;
    alice.expect_error("not_member").await;
    alice.join("big").await;
    alice
        .send(json!({"type": "send", "room": "big", "body": "x".repeat(4_097)}))
        .await;
    alice.expect_error("too_large").await;
    alice
        .send(json!({"type": "direct", "to": "bad-alice", "body": "me"}))
        .await;
    alice.expect_error("invalid_target").await;
    alice.send(json!({"type": "ping"})).await;
    alice.recv_type("pong").await;
}

pub async fn bad_credentials_get_401_and_unknown_paths_404(addr: SocketAddr) {
    assert_eq!(refused_status(addr, "/ws").await, 401);
    assert_eq!(refused_status(addr, "/ws?user=has%20space").await, 401);
    assert_eq!(refused_status(addr, "/ws/chat/lobby/?user=").await, 401);
    assert_eq!(refused_status(addr, "/nowhere?user=alice").await, 404);
}

pub async fn an_oversized_frame_closes_with_1009(addr: SocketAddr) {
    // Over the engine's limit (the suite's servers use 8 KiB) and over the WebSocket layer's.
    for size in [8 * 1024 + 10, 64 * 1024] {
        let mut alice = connect(addr, "big-alice").await;
        let frame = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(size));
        // The server may close while the frame is still being written.
        let _ = alice.ws.send(Message::text(frame)).await;
        assert_eq!(alice.expect_close().await, 1009, "frame of {size} bytes");
    }
}

pub const JWT_SECRET: &[u8] = b"socket suite secret";

pub fn jwt_chat() -> Chat {
    let auth = chat_core::auth::JwtAuthenticator::new(JWT_SECRET);
    Chat::builder()
        .authenticator(Arc::new(auth))
        .config(suite_config())
        .build()
}

pub async fn jwt_handshakes(addr: SocketAddr) {
    use chat_core::auth::JwtAuthenticator;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let auth = JwtAuthenticator::new(JWT_SECRET);
    let token = auth.issue("jwt-alice", Duration::from_secs(60)).unwrap();

    let mut by_query = open(addr, &format!("/ws?token={token}")).await.unwrap();
    assert_eq!(by_query.recv_type("welcome").await["user"], "jwt-alice");

    let mut request = format!("ws://{addr}/ws/chat/jwt-room/")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut by_header = Socket { ws };
    by_header.recv_type("welcome").await;
    assert_eq!(by_header.recv_type("joined").await["room"], "jwt-room");

    let forged = JwtAuthenticator::new(b"not the secret")
        .issue("jwt-alice", Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        refused_status(addr, &format!("/ws?token={forged}")).await,
        401
    );
    assert_eq!(refused_status(addr, "/ws?token=garbage").await, 401);
    assert_eq!(
        refused_status(addr, "/ws?user=jwt-alice").await,
        401,
        "dev sign-in must not work in jwt mode"
    );
    assert_eq!(refused_status(addr, "/ws").await, 401);
}

/// The config every suite server runs with.
/// How hard [`churn_with`] shakes the server.
#[derive(Debug, Clone, Copy)]
pub struct Churn {
    /// Readers, each dropping its socket (no close frame) every 100 to 500 ms and resuming.
    pub clients: usize,
    /// Senders, each sending `messages` at `rate` per second, waiting for each ack.
    pub senders: usize,
    pub messages: usize,
    pub rate: f64,
}

impl Churn {
    /// Sized for CI: a few seconds per adapter.
    pub fn small() -> Self {
        Self {
            clients: 50,
            senders: 5,
            messages: 40,
            rate: 8.0,
        }
    }

    /// The larger run, sized from `CHURN_CLIENTS`, `CHURN_SENDERS`, `CHURN_MESSAGES` (per sender)
    /// and `CHURN_RATE` (per sender per second) when set.
    pub fn from_env() -> Self {
        let get = |name: &str, default: f64| {
            std::env::var(name)
                .ok()
                .and_then(|value| value.parse().ok())
                .unwrap_or(default)
        };
        Self {
            clients: get("CHURN_CLIENTS", 200.0) as usize,
            senders: get("CHURN_SENDERS", 10.0) as usize,
            messages: get("CHURN_MESSAGES", 50.0) as usize,
            rate: get("CHURN_RATE", 5.0),
        }
    }
}

/// What a churn run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChurnReport {
    pub deliveries: u64,
    pub reconnects: u64,
}

/// Readers that keep dropping their sockets and resuming with `since` = the highest id they saw,
/// while senders send: every reader must end with every message exactly once, in order, across
/// all its connections. Ids are dense, so each message must be exactly the one after the last.
pub async fn churn_with(addr: SocketAddr, churn: Churn) -> ChurnReport {
    const ROOM: &str = "churn";
    let total = (churn.senders * churn.messages) as u64;
    let readers: Vec<_> = (0..churn.clients)
        .map(|i| tokio::spawn(churning_reader(addr, format!("reader{i}"), total, i as u64)))
        .collect();
    let interval = Duration::from_secs_f64(1.0 / churn.rate.max(0.001));
    let senders: Vec<_> = (0..churn.senders)
        .map(|i| {
            tokio::spawn(async move {
                let user = format!("sender{i}");
                let mut socket = connect(addr, &user).await;
                socket.join(ROOM).await;
                let mut pace = tokio::time::interval(interval);
                for n in 0..churn.messages {
                    pace.tick().await;
                    let reference = format!("{user}-{n}");
                    socket
                        .send(json!({"type": "send", "room": ROOM, "body": reference, "ref": reference}))
                        .await;
                    loop {
                        let frame = socket.recv().await;
                        assert_ne!(frame["type"], "error", "{user}: {frame}");
                        if frame["type"] == "ack" && frame["ref"] == reference.as_str() {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    let mut report = ChurnReport::default();
    for reader in readers {
        let reconnects = reader.await.unwrap();
        report.reconnects += reconnects;
        report.deliveries += total;
    }
    report
}

/// One reader of [`churn_with`]; returns how many times it reconnected.
async fn churning_reader(addr: SocketAddr, user: String, total: u64, seed: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut random = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut highest = 0u64;
    let mut reconnects = 0u64;
    let accept = |message: &Value, highest: &mut u64| {
        let id = message["id"].as_u64().unwrap();
        assert_eq!(
            id,
            *highest + 1,
            "{user}: after id {highest} got id {id} (a gap, a repeat or out of order)"
        );
        *highest = id;
    };
    while highest < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{user} is stuck at {highest} of {total}"
        );
        random = random
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let stay = Duration::from_millis(100 + (random >> 33) % 400);
        let mut socket = connect(addr, &user).await;
        socket
            .send(json!({"type": "join", "room": "churn", "since": highest}))
            .await;
        let until = tokio::time::Instant::now() + stay;
        while highest < total {
            let Ok(Some(Ok(Message::Text(text)))) =
                tokio::time::timeout_at(until, socket.ws.next()).await
            else {
                break;
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            let (messages, more) = match frame["type"].as_str() {
                Some("joined") => (frame["history"].clone(), frame["more"] == true),
                Some("history") => (frame["messages"].clone(), frame["more"] == true),
                Some("message") => (json!([frame]), false),
                Some("error") => panic!("{user}: {frame}"),
                _ => continue,
            };
            for message in messages.as_array().unwrap() {
                accept(message, &mut highest);
            }
            if more {
                socket
                    .send(
                        json!({"type": "history", "room": "churn", "after": highest, "limit": 100}),
                    )
                    .await;
            }
        }
        // Gone without a close frame, like a phone losing its network.
        drop(socket);
        reconnects += 1;
    }
    reconnects
}

/// Sends `request` as is and returns the whole response (the server closes after it).
pub async fn raw(addr: SocketAddr, request: impl AsRef<[u8]>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_ref()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut response),
    )
    .await
    .expect("no response in time")
    .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// An upgrade request for `path` with `headers` (each "Name: value"), closing after the reply.
pub fn upgrade_request(version: &str, path: &str, headers: &[&str]) -> String {
    let mut request = format!("GET {path} {version}\r\nHost: x\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

pub const CONNECTION: &str = "Connection: Upgrade";
pub const UPGRADE: &str = "Upgrade: websocket";
pub const VERSION: &str = "Sec-WebSocket-Version: 13";
pub const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";

/// The reply to a well-formed upgrade request over HTTP/1.0.
pub async fn http_1_0_upgrade(addr: SocketAddr) -> String {
    let request = upgrade_request(
        "HTTP/1.0",
        "/ws?user=alice",
        &[CONNECTION, UPGRADE, VERSION, KEY],
    );
    raw(addr, &request).await
}

pub async fn malformed_upgrades_get_400_with_the_reason(addr: SocketAddr) {
    let cases: [(&[&str], &str); 8] = [
        (&[UPGRADE, VERSION, KEY], "Connection header"),
        (
            &["Connection: keep-alive", UPGRADE, VERSION, KEY],
            "Connection header",
        ),
        (&[CONNECTION, VERSION, KEY], "Upgrade header"),
        (
            &[CONNECTION, "Upgrade: h2c", VERSION, KEY],
            "Upgrade header",
        ),
        (
            &[CONNECTION, UPGRADE, KEY],
            "Sec-WebSocket-Version must be 13",
        ),
        (
            &[CONNECTION, UPGRADE, "Sec-WebSocket-Version: 8", KEY],
            "Sec-WebSocket-Version must be 13",
        ),
        (
            &[CONNECTION, UPGRADE, VERSION],
            "Sec-WebSocket-Key header is missing",
        ),
        (
            &[CONNECTION, UPGRADE, VERSION, "Sec-WebSocket-Key: short"],
            "16 bytes in base64",
        ),
    ];
    for (headers, reason) in cases {
        let mut all = headers.to_vec();
        all.push("Connection: close");
        let response = raw(addr, &upgrade_request("HTTP/1.1", "/ws?user=alice", &all)).await;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{headers:?}: {response}"
        );
        assert!(response.contains(reason), "{headers:?}: {response}");
    }
    let response = raw(
        addr,
        &upgrade_request(
            "HTTP/1.1",
            "/ws?user=alice",
            &[
                CONNECTION,
                UPGRADE,
                "Sec-WebSocket-Version: 8",
                KEY,
                "Connection: close",
            ],
        ),
    )
    .await;
    assert!(
        response
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{response}"
    );
    // HTTP/1.0 has no upgrades.
    let response = http_1_0_upgrade(addr).await;
    assert!(response.contains(" 400 "), "{response}");
    // Garbage in the path or headers is refused; nothing panics.
    let response = raw(addr, b"GET /ws?user=\xff HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    let response = raw(
        addr,
        b"GET /ws?user=alice HTTP/1.1\r\nHost: x\r\nConnection: \xffupgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.contains("Connection header"), "{response}");
    let response = raw(
        addr,
        b"GET /ws?user=alice HTTP/1.1\r\nHost: x\r\nConnection: upgrade, close\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: \xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5\xf4\xf3\xf2\xf1\xf0\xef\xee\xed\xec\xeb\xea==\r\n\r\n",
    )
    .await;
    assert!(response.contains("16 bytes in base64"), "{response}");
    // The server still works.
    let mut alice = connect(addr, "alice").await;
    alice.join("lobby").await;
}

/// The RFC's sample handshake, with a first frame sent at once behind the request (before the
/// 101 arrives): the server answers the handshake and reads that frame.
pub async fn the_upgrade_answers_the_rfc_handshake_and_speaks_websocket(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = upgrade_request(
        "HTTP/1.1",
        "/ws?user=alice",
        &[
            "Connection: keep-alive, Upgrade",
            "Upgrade: WebSocket",
            VERSION,
            KEY,
        ],
    );
    let mut hasty = request.into_bytes();
    hasty.extend(masked_text(r#"{"type":"join","room":"lobby"}"#));
    stream.write_all(&hasty).await.unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1);
        response.push(byte[0]);
    }
    let response = String::from_utf8(response).unwrap().to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 101"), "{response}");
    // RFC 6455 §1.3's sample key and its answer.
    assert!(
        response.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{response}"
    );
    assert!(response.contains("upgrade: websocket"), "{response}");
    let socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let mut alice = Socket { ws: socket };
    let welcome = alice.recv_type("welcome").await;
    assert_eq!(welcome["user"], "alice");
    let joined = alice.recv_type("joined").await;
    assert_eq!(joined["room"], "lobby");
}

/// A client's text frame, masked as RFC 6455 requires of clients (payloads under 126 bytes).
fn masked_text(text: &str) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | u8::try_from(text.len()).unwrap()];
    frame.extend(mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The server writes its frames itself: a header of every length form (7, 16 and 64 bits), a
/// reader that lets a burst pile up (partial writes), the client's pings answered.
pub async fn frames_of_every_size_arrive_whole_and_in_order(addr: SocketAddr) {
    let mut alice = connect(addr, "alice").await;
    let mut bob = connect(addr, "bob").await;
    // Bob first, so that alice hears no `member` event between her echoes and acks.
    bob.join("sizes").await;
    alice.join("sizes").await;
    // Bob reads nothing while alice sends: the server's writes to him fill his socket.
    let sizes = [0usize, 1, 125, 126, 127, 1000, 4000];
    let mut sent = Vec::new();
    for round in 0..30 {
        for &size in &sizes {
            let body = format!("{round:02}{}", "x".repeat(size));
            alice
                .send(json!({"type": "send", "room": "sizes", "body": body}))
                .await;
            alice.echo_and_ack().await;
            sent.push(body);
        }
    }
    // A ping's payload comes back in a pong, between (never inside) the queued frames.
    bob.ws
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut pong = false;
    while got.len() < sent.len() || !pong {
        match bob.next_message().await {
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "message" {
                    got.push(frame["body"].as_str().unwrap().to_owned());
                }
            }
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"are you there");
                pong = true;
            }
            Message::Ping(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, sent);
    // A history page well over 64 KiB: the 64-bit length form.
    bob.send(json!({"type": "history", "room": "sizes", "limit": 100}))
        .await;
    let page = bob.recv_type("history").await;
    assert!(page.to_string().len() > 65_536);
    assert_eq!(page["messages"].as_array().unwrap().len(), 100);
    // A clean close: the server answers the client's close frame.
    bob.ws.close(None).await.unwrap();
    let reply = tokio::time::timeout(ARRIVAL, bob.ws.next()).await.unwrap();
    assert!(
        matches!(reply, Some(Ok(Message::Close(_))) | None),
        "{reply:?}"
    );
}

pub async fn churn(addr: SocketAddr) {
    let report = churn_with(addr, Churn::small()).await;
    assert!(
        report.reconnects >= Churn::small().clients as u64,
        "{report:?}"
    );
}

/// Opens `path` with extra request headers; `Err` holds the HTTP status of a refusal.
pub async fn open_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<Socket, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(Socket { ws }),
        Err(WsError::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("expected an upgrade or an HTTP refusal, got {other}"),
    }
}

/// A browser on another site cannot open a socket (cross-site WebSocket hijacking); the page's
/// own origin, a listed one, and clients that are no browser (no `Origin`) can.
pub async fn origins_are_checked_before_the_upgrade<F, Fut>(start: F)
where
    F: Fn(Chat) -> Fut,
    Fut: std::future::Future<Output = SocketAddr>,
{
    let addr = start(dev_chat(suite_config())).await;
    let own = format!("http://{addr}");
    assert!(open_with(addr, "/ws?user=a", &[("origin", &own)])
        .await
        .is_ok());
    assert!(open_with(addr, "/ws?user=b", &[]).await.is_ok());
    for evil in ["https://evil.example", "null", "http://127.0.0.1:1"] {
        assert_eq!(
            open_with(addr, "/ws?user=c", &[("origin", evil)])
                .await
                .err(),
            Some(403),
            "{evil}"
        );
    }
    let listed = ChatConfig {
        allowed_origins: vec!["https://app.example".into()],
        ..suite_config()
    };
    let addr = start(dev_chat(listed)).await;
    let app = [("origin", "https://app.example")];
    assert!(open_with(addr, "/ws?user=a", &app).await.is_ok());
    assert_eq!(
        open_with(addr, "/ws?user=b", &[("origin", "https://evil.example")])
            .await
            .err(),
        Some(403)
    );
}

/// Beyond `max_connections` the upgrade is refused with 503, beyond
/// `max_connections_per_user` with 429; a closed connection gives its place back.
pub async fn connection_limits_refuse_with_503_and_429<F, Fut>(start: F)
where
    F: Fn(Chat) -> Fut,
    Fut: std::future::Future<Output = SocketAddr>,
{
    let chat = dev_chat(ChatConfig {
        max_connections: 2,
        max_connections_per_user: 1,
        ..suite_config()
    });
    let addr = start(chat.clone()).await;
    let alice = connect(addr, "alice").await;
    assert_eq!(
        open_with(addr, "/ws?user=alice", &[]).await.err(),
        Some(429)
    );
    let mut bob = connect(addr, "bob").await;
    assert_eq!(
        open_with(addr, "/ws?user=carol", &[]).await.err(),
        Some(503)
    );
    assert_eq!(chat.connections(), 2);
    // Those already in are not disturbed.
    bob.join("lobby").await;
    drop(alice);
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    while chat.connections() > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice's place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    connect(addr, "carol").await;
}

/// A client that stops reading is cut (1008) once it is over its budget; when it reads again,
/// it finds the close frame behind whatever was already on its way, not a reset connection,
/// and the frames still queued for it were dropped rather than sent first.
pub async fn a_slow_consumer_reads_its_close_frame_when_it_reads_again<F, Fut>(start: F)
where
    F: Fn(Chat) -> Fut,
    Fut: std::future::Future<Output = SocketAddr>,
{
    let chat = dev_chat(ChatConfig {
        outbound_budget: 64 * 1024,
        write_timeout: Duration::from_secs(1),
        slow_close_grace: Duration::from_secs(10),
        ..suite_config()
    });
    let addr = start(chat.clone()).await;
    // A small receive buffer, so the reader's side fills after a few frames.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4 * 1024).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let url = format!("ws://{addr}/ws?user=reader");
    let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    let mut reader = Socket { ws };
    reader.recv_type("welcome").await;
    reader.join("lobby").await;
    let mut sender = connect(addr, "sender").await;
    sender.join("lobby").await;
    // The reader stops reading. The sender fills every buffer between them: the reader's
    // socket, the server's, then the reader's outbound budget.
    let body = "x".repeat(4_000);
    let mut sent = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while chat.connections() > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reader was never cut"
        );
        // A few at a time: the sender's own echoes count against its budget too.
        for _ in 0..4 {
            sender
                .send(json!({"type": "send", "room": "lobby", "body": body}))
                .await;
            sent += 1;
        }
        // Keep the sender's own echoes and acks moving.
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(5), sender.ws.next()).await
        {}
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The server has given up on the reader. Now it reads.
    let mut messages = 0u64;
    let code = loop {
        let message = tokio::time::timeout(ARRIVAL, reader.ws.next())
            .await
            .expect("nothing more, and no close frame");
        match message {
            Some(Ok(Message::Text(_))) => messages += 1,
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected frames then a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, 1008);
    assert!(messages < sent, "{messages} of {sent}: nothing was dropped");
    // The sender was never disturbed.
    sender
        .send(json!({"type": "send", "room": "lobby", "body": "still here", "ref": "last"}))
        .await;
    loop {
        let frame = sender.recv().await;
        if frame["type"] == "ack" && frame["ref"] == "last" {
            break;
        }
    }
}

pub fn suite_config() -> ChatConfig {
    ChatConfig {
        max_frame_bytes: 8 * 1024,
        // Some checks send a few hundred messages; rate limits are the engine tests' to check.
        rate_per_second: 1_000.0,
        rate_burst: 1_000,
        ..ChatConfig::default()
    }
}

/// Expands to one `#[tokio::test]` per check, each on a fresh server from `$start` (the checks
/// under `@own_chat` build their own `Chat`s and start servers with `$start` themselves).
#[macro_export]
macro_rules! socket_suite {
    (@own_chat $start:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                socket_suite::$check($start).await;
            }
        )*
    };
    ($start:path) => {
        $crate::socket_suite!(@each $start;
            rooms_messages_and_membership, the_room_route_joins_at_once, direct_messages_are_private,
            presence_edges, bad_frames_are_answered_and_the_socket_stays_open,
            bad_credentials_get_401_and_unknown_paths_404, an_oversized_frame_closes_with_1009,
            malformed_upgrades_get_400_with_the_reason,
            the_upgrade_answers_the_rfc_handshake_and_speaks_websocket,
            frames_of_every_size_arrive_whole_and_in_order, churn);
    };
    (@each $start:path; $($check:ident),* $(,)?) => {
        $crate::socket_suite!(@own_chat $start;
            origins_are_checked_before_the_upgrade, connection_limits_refuse_with_503_and_429,
            a_slow_consumer_reads_its_close_frame_when_it_reads_again);

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn jwt_handshakes() {
            let addr = $start(socket_suite::jwt_chat()).await;
            socket_suite::jwt_handshakes(addr).await;
        }

        /// The larger churn run: `cargo test --release --test sockets churn_large -- --ignored
        /// --nocapture`, sized by `CHURN_CLIENTS`, `CHURN_SENDERS`, `CHURN_MESSAGES`, `CHURN_RATE`.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "minutes long; run on demand"]
        async fn churn_large() {
            let chat = socket_suite::dev_chat(socket_suite::suite_config());
            let addr = $start(chat).await;
            let churn = socket_suite::Churn::from_env();
            let started = std::time::Instant::now();
            let report = socket_suite::churn_with(addr, churn).await;
            println!(
                "churn: {churn:?}: {} deliveries, {} reconnects, 0 lost, 0 duplicated, in order, {:.1} s",
                report.deliveries,
                report.reconnects,
                started.elapsed().as_secs_f64()
            );
        }
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let chat = socket_suite::dev_chat(socket_suite::suite_config());
                let addr = $start(chat).await;
                socket_suite::$check(addr).await;
            }
        )*
    };
}
