//! A test client that drives the engine through in-memory channels instead of a socket.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

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

    /// The next text frame, or `None` when the connection ended (for polling loops).
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

    /// Silence: for [`QUIET`] the connection stays open and sends nothing at all. An ended
    /// connection is not silent (a test that expects silence would pass on a dead one), and
    /// neither is a ping or a close: the tests' configurations ping far less often than that.
    pub async fn expect_silence(&mut self) {
        let frame = match tokio::time::timeout(QUIET, self.rx.next()).await {
            Err(_) => {
                assert!(
                    !self.task.is_finished(),
                    "{}: expected silence, but the connection's task ended",
                    self.user
                );
                return;
            }
            Ok(None) => panic!("{}: expected silence, but the connection ended", self.user),
            Ok(Some(frame)) => frame,
        };
        let shown = match &frame {
            Outbound::Text(text) => String::from_utf8_lossy(text).into_owned(),
            other => format!("{other:?}"),
        };
        panic!("{}: expected silence, got {shown}", self.user);
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

/// A connection that watches presence, and every `presence` frame it received: what a client
/// shows about a user is the last such frame about them, so that is what tests check.
pub struct Watcher {
    pub client: Client,
    /// `(user, status)` of every `presence` frame received, in order.
    pub presence: Vec<(String, String)>,
}

impl Watcher {
    pub async fn new(chat: &Chat) -> Self {
        let mut client = Client::connect(chat, "watcher").await;
        client.send(json!({"type": "who", "watch": true})).await;
        client.recv_type("online").await;
        Self {
            client,
            presence: Vec::new(),
        }
    }

    /// Records a `presence` frame; other frames are not about presence.
    pub fn apply(&mut self, frame: &Value) {
        if frame["type"] != "presence" {
            return;
        }
        let user = frame["user"].as_str().unwrap().to_owned();
        let status = frame["status"].as_str().unwrap_or_default();
        assert!(
            matches!(status, "online" | "offline"),
            "a presence frame with neither status: {frame}"
        );
        self.presence.push((user, status.to_owned()));
    }

    /// The statuses the presence frames about `user` gave, in order.
    pub fn statuses(&self, user: &str) -> Vec<&str> {
        self.presence
            .iter()
            .filter(|(about, _)| about == user)
            .map(|(_, status)| status.as_str())
            .collect()
    }

    /// The status the last presence frame about `user` gave; `None` if none came.
    pub fn last_status(&self, user: &str) -> Option<&str> {
        self.statuses(user).last().copied()
    }

    /// Applies what arrives until the last presence frame about `user` says `online` (or
    /// `offline`), and fails if that takes five seconds. A frame must come: a user who was
    /// already online when the watcher started watching gets none.
    pub async fn until(&mut self, user: &str, online: bool) {
        let status = if online { "online" } else { "offline" };
        let deadline = tokio::time::Instant::now() + ARRIVAL;
        while self.last_status(user) != Some(status) {
            let frame = tokio::time::timeout_at(deadline, self.client.try_recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "the watcher got no presence frame saying {user} is {status}; got {:?}",
                        self.statuses(user)
                    )
                })
                .unwrap_or_else(|| panic!("the watcher's connection ended"));
            self.apply(&frame);
        }
    }

    /// Applies whatever arrives until nothing has for `quiet`.
    pub async fn settle_for(&mut self, quiet: Duration) {
        while let Ok(frame) = tokio::time::timeout(quiet, self.client.try_recv()).await {
            let frame = frame.unwrap_or_else(|| panic!("the watcher's connection ended"));
            self.apply(&frame);
        }
    }

    /// Applies whatever else arrives for a while.
    pub async fn settle(&mut self) {
        self.settle_for(Duration::from_millis(50)).await;
    }
}

/// Reloads `alice` `rounds` times: each time her old tab closes while a new one opens on
/// `chat_for(round)`, their presence events racing. The first tab must have opened after the
/// watcher started watching. After every round, the last presence frame the watcher received
/// about her must say online, as she is: a client shows that frame. Returns the last tab.
pub async fn reload_rounds(
    watcher: &mut Watcher,
    mut tab: Client,
    rounds: usize,
    chat_for: impl Fn(usize) -> Chat,
) -> Client {
    // The first tab's `online` must arrive: without it there is nothing to check.
    watcher.until(&tab.user, true).await;
    for round in 0..rounds {
        let chat = chat_for(round);
        let user = tab.user.clone();
        let opening = tokio::spawn(async move { Client::connect(&chat, &user).await });
        tab.disconnect().await;
        tab = opening.await.unwrap();
        tab.sync().await;
        // An `offline` seen last must be followed by an `online`, and a late one must not
        // come after it.
        watcher.until(&tab.user, true).await;
        watcher.settle().await;
        assert_eq!(
            watcher.last_status(&tab.user),
            Some("online"),
            "round {round}: the watcher shows {} offline; presence frames: {:?}",
            tab.user,
            watcher.statuses(&tab.user)
        );
    }
    // The last round's `offline` may be the slowest of all.
    watcher.settle_for(QUIET).await;
    assert_eq!(
        watcher.last_status(&tab.user),
        Some("online"),
        "after the reloads the watcher shows {} offline; presence frames: {:?}",
        tab.user,
        watcher.statuses(&tab.user)
    );
    tab
}
