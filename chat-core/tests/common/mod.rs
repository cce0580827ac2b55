//! A test client that drives the engine through in-memory channels instead of a socket.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use chat_core::engine::{Chat, CloseReason, Inbound, Outbound, Route, Session};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// How long a test waits for a frame that must come.
pub const ARRIVAL: Duration = Duration::from_secs(5);
/// How long a test watches for a frame that must not come.
pub const QUIET: Duration = Duration::from_millis(200);

pub struct Client {
    pub user: String,
    /// The store epoch the `welcome` named.
    pub epoch: String,
    tx: mpsc::Sender<Inbound>,
    rx: mpsc::Receiver<Outbound>,
    pub task: JoinHandle<CloseReason>,
}

impl Client {
    /// Connects to the lobby and takes the `welcome` frame.
    pub async fn connect(chat: &Chat, user: &str) -> Self {
        Self::connect_to(chat, user, Route::Lobby).await
    }

    /// Connects at `route` and takes the `welcome` frame.
    pub async fn connect_to(chat: &Chat, user: &str, route: Route) -> Self {
        let mut client = Self::connect_raw(chat, user, route, 1024).await;
        let welcome = client.recv().await;
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["user"], user);
        client.epoch = welcome["epoch"].as_str().unwrap_or_default().to_owned();
        assert!(
            !client.epoch.is_empty(),
            "welcome without an epoch: {welcome}"
        );
        client
    }

    /// Connects without reading anything; `socket_buffer` is how many frames the fake socket
    /// holds before the engine's writes block.
    pub async fn connect_raw(chat: &Chat, user: &str, route: Route, socket_buffer: usize) -> Self {
        let (tx, inbound) = mpsc::channel(1024);
        let (outbound, rx) = mpsc::channel(socket_buffer);
        let chat = chat.clone();
        let session = Session::new(user, route);
        let task = tokio::spawn(async move { chat.serve(session, inbound, outbound).await });
        Self {
            user: user.to_owned(),
            epoch: String::new(),
            tx,
            rx,
            task,
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_inbound(Inbound::Text(Bytes::copy_from_slice(text.as_bytes())))
            .await;
    }

    pub async fn send_inbound(&mut self, inbound: Inbound) {
        self.tx.send(inbound).await.unwrap();
    }

    /// The next frame, which must be a text frame of JSON (WebSocket pings are skipped).
    pub async fn recv(&mut self) -> Value {
        loop {
            match self.next().await {
                Outbound::Text(text) => return serde_json::from_slice(&text).unwrap(),
                Outbound::Ping => {}
                Outbound::Close { code, reason } => {
                    panic!(
                        "{}: closed with {code} {reason}, expected a frame",
                        self.user
                    )
                }
            }
        }
    }

    /// The next text frame, or `None` when the connection ended (for polling loops).
    /// The text frames already waiting, without waiting for more.
    pub fn drain_now(&mut self) -> Vec<Value> {
        let mut frames = Vec::new();
        while let Some(Some(frame)) = futures::FutureExt::now_or_never(self.rx.next()) {
            if let Outbound::Text(text) = frame {
                frames.push(serde_json::from_slice(&text).unwrap());
            }
        }
        frames
    }

    pub async fn try_recv(&mut self) -> Option<Value> {
        loop {
            match self.rx.next().await? {
                Outbound::Text(text) => return Some(serde_json::from_slice(&text).unwrap()),
                Outbound::Ping => {}
                Outbound::Close { .. } => return None,
            }
        }
    }

    /// The next frame, which must have this `type`.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], kind, "{}: got {frame}", self.user);
        frame
    }

    /// The next frame, which must be an `error` with this code.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let frame = self.recv_type("error").await;
        assert_eq!(frame["code"], code, "{}: got {frame}", self.user);
        assert!(frame["message"].as_str().is_some_and(|m| !m.is_empty()));
        frame
    }

    pub async fn next(&mut self) -> Outbound {
        match tokio::time::timeout(ARRIVAL, self.rx.next()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!("{}: connection ended", self.user),
            Err(_) => panic!("{}: no frame within {ARRIVAL:?}", self.user),
        }
    }

    /// Nothing but pings arrives for a while.
    pub async fn expect_silence(&mut self) {
        let quiet = async {
            loop {
                match self.rx.next().await {
                    Some(Outbound::Ping) => {}
                    other => return other,
                }
            }
        };
        if let Ok(Some(frame)) = tokio::time::timeout(QUIET, quiet).await {
            let shown = match &frame {
                Outbound::Text(text) => String::from_utf8_lossy(text).into_owned(),
                other => format!("{other:?}"),
            };
            panic!("{}: expected silence, got {shown}", self.user);
        }
    }

    /// Skips frames until the close frame, and returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            if let Outbound::Close { code, .. } = self.next().await {
                return code;
            }
        }
    }

    /// Joins `room` and returns the `joined` frame.
    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        self.recv_type("joined").await
    }

    /// Posts to `room`, returns the acked id, and consumes the echo of the message.
    pub async fn say(&mut self, room: &str, body: &str) -> u64 {
        self.send(json!({"type": "send", "room": room, "body": body}))
            .await;
        let (echo, ack) = self.echo_and_ack().await;
        assert_eq!(echo["body"], body);
        ack["id"].as_u64().unwrap()
    }

    /// The echo of the client's own room message and its `ack`, which travel different paths
    /// (the room's fan-out, the connection's reply) and may arrive in either order.
    pub async fn echo_and_ack(&mut self) -> (Value, Value) {
        let first = self.recv().await;
        let second = self.recv().await;
        let (echo, ack) = if first["type"] == "ack" {
            (second, first)
        } else {
            (first, second)
        };
        assert_eq!(echo["type"], "message", "{}: got {echo}", self.user);
        assert_eq!(ack["type"], "ack", "{}: got {ack}", self.user);
        assert_eq!(ack["id"], echo["id"]);
        (echo, ack)
    }

    /// A round trip, proving every earlier frame of this client has been handled.
    pub async fn sync(&mut self) {
        self.send(json!({"type": "ping"})).await;
        self.recv_type("pong").await;
    }

    /// The client goes away, and the server finishes with it.
    pub async fn disconnect(self) -> CloseReason {
        let Self { tx, rx, task, .. } = self;
        drop(tx);
        drop(rx);
        tokio::time::timeout(ARRIVAL, task).await.unwrap().unwrap()
    }
}

pub fn chat() -> Chat {
    Chat::builder().build()
}

pub fn chat_with(config: chat_core::ChatConfig) -> Chat {
    Chat::builder().config(config).build()
}

/// A watcher's picture of who is online, from the `online` reply and `presence` events.
pub struct Watcher {
    pub client: Client,
    pub online: BTreeSet<String>,
}

impl Watcher {
    pub async fn new(chat: &Chat) -> Self {
        let mut client = Client::connect(chat, "watcher").await;
        client.send(json!({"type": "who", "watch": true})).await;
        let reply = client.recv_type("online").await;
        let online = reply["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|user| user.as_str().unwrap().to_owned())
            .collect();
        Self { client, online }
    }

    pub fn apply(&mut self, frame: &Value) {
        if frame["type"] != "presence" {
            return;
        }
        let user = frame["user"].as_str().unwrap().to_owned();
        if frame["status"] == "online" {
            self.online.insert(user);
        } else {
            self.online.remove(&user);
        }
    }

    /// Applies what arrives until `user`'s status is `online` (or five seconds pass).
    pub async fn until(&mut self, user: &str, online: bool) {
        let deadline = tokio::time::Instant::now() + ARRIVAL;
        while self.online.contains(user) != online {
            let frame = tokio::time::timeout_at(deadline, self.client.try_recv())
                .await
                .unwrap_or_else(|_| panic!("the watcher never saw {user} online={online}"))
                .unwrap();
            self.apply(&frame);
        }
    }

    /// Applies whatever else arrives for a while.
    pub async fn settle(&mut self) {
        while let Ok(Some(frame)) =
            tokio::time::timeout(Duration::from_millis(50), self.client.try_recv()).await
        {
            self.apply(&frame);
        }
    }
}

/// Reloads `alice` `rounds` times: each time her old tab closes while a new one opens on
/// `chat_for(round)`, their presence events racing. After every round, what the watcher believes
/// must be the truth: online. Returns the last tab.
pub async fn reload_rounds(
    watcher: &mut Watcher,
    mut tab: Client,
    rounds: usize,
    chat_for: impl Fn(usize) -> Chat,
) -> Client {
    watcher.until(&tab.user, true).await;
    for round in 0..rounds {
        let chat = chat_for(round);
        let user = tab.user.clone();
        let opening = tokio::spawn(async move { Client::connect(&chat, &user).await });
        tab.disconnect().await;
        tab = opening.await.unwrap();
        tab.sync().await;
        watcher.until(&tab.user, true).await;
        watcher.settle().await;
        assert!(
            watcher.online.contains(&tab.user),
            "round {round}: the watcher thinks {} is offline",
            tab.user
        );
    }
    tab
}
