//! A test client for services built on chat-core (feature `testing`), in the spirit of Django
//! Channels' `WebsocketCommunicator`: it drives a [`Chat`] through one connection with no socket,
//! so a host can test its own [`Authenticator`](crate::auth::Authenticator),
//! [`Policy`](crate::policy::Policy) and store end to end, in-process and fast.
//!
//! [`Communicator::connect`] goes through [`Chat::admit`] exactly as an adapter does (origin,
//! the host's authenticator, the connection limits), then serves the connection;
//! [`Communicator::connect_as`] skips admission for a user the test vouches for. Frames go in
//! as JSON; replies come back as [`Received`]: a JSON frame or the server's close.
//!
//! ```
//! use std::sync::Arc;
//! use chat_core::auth::{DevAuthenticator, Handshake};
//! use chat_core::testing::Communicator;
//! use chat_core::Chat;
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), chat_core::testing::TestError> {
//! let chat = Chat::builder().authenticator(Arc::new(DevAuthenticator)).build();
//! let mut alice = Communicator::connect(&chat, Handshake::new("/ws/chat/lobby/").with_query("user=alice")).await?;
//! assert_eq!(alice.user(), "alice");
//! alice.expect("joined").await?;
//!
//! alice.send(json!({"type": "send", "room": "lobby", "body": "hi", "ref": "r1"})).await?;
//! let ack = alice.expect_where(|f| f["type"] == "ack").await?;
//! assert_eq!(ack["ref"], "r1");
//!
//! // Hostile input gets an error frame, not a closed connection (the echo of "hi" may come
//! // first: skip to the error).
//! alice.send_text("{not json").await?;
//! let error = alice.expect_where(|f| f["type"] == "error").await?;
//! assert_eq!(error["code"], "bad_frame");
//!
//! // Refused handshakes say why, with the HTTP status an adapter would answer.
//! let refused = Communicator::connect(&chat, Handshake::new("/ws")).await.unwrap_err();
//! assert!(matches!(refused, chat_core::testing::TestError::Denied(d) if d.status() == 401));
//! alice.disconnect().await;
//! # Ok(()) }
//! ```

use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::auth::Handshake;
use crate::engine::{route, CloseReason, Denied, Inbound, Outbound, Route, Session};
use crate::Chat;

/// How long [`Communicator::receive`] waits by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Frames the fake socket holds each way before the writer waits.
const SOCKET_FRAMES: usize = 1_024;

/// What the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A text frame, parsed as JSON.
    Frame(Value),
    /// The server closed the connection with this code and reason.
    Close {
        /// The WebSocket close code.
        code: u16,
        /// The reason.
        reason: &'static str,
    },
}

/// Why a test client call failed.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// [`Chat::admit`] refused the handshake.
    #[error("handshake refused: {0}")]
    Denied(Denied),
    /// The path is no chat route (an adapter would answer 404).
    #[error("no chat route at {0:?}")]
    NotFound(String),
    /// Nothing arrived in time.
    #[error("nothing arrived within {0:?}")]
    Timeout(Duration),
    /// The server closed the connection instead.
    #[error("the server closed the connection with {code} ({reason})")]
    Closed {
        /// The close code.
        code: u16,
        /// The reason.
        reason: &'static str,
    },
    /// The connection ended without a close frame.
    #[error("the connection ended")]
    Ended,
    /// A frame arrived, but not the one expected.
    #[error("unexpected frame {0}")]
    Unexpected(Value),
    /// The server sent a text frame that is not JSON (a bug in the engine).
    #[error("a frame that is not JSON: {0}")]
    NotJson(String),
}

/// One connection to a [`Chat`], with no socket. Dropping it ends the connection as a client
/// that went away would.
pub struct Communicator {
    user: String,
    epoch: String,
    tx: mpsc::Sender<Inbound>,
    rx: mpsc::Receiver<Outbound>,
    task: JoinHandle<CloseReason>,
    timeout: Duration,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("user", &self.user)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Communicator {
    /// Connects as an adapter would: the handshake's path is routed, [`Chat::admit`] decides,
    /// and the `welcome` frame is taken.
    pub async fn connect(chat: &Chat, handshake: Handshake) -> Result<Self, TestError> {
        let route = route(&handshake.path).ok_or(TestError::NotFound(handshake.path.clone()))?;
        let session = chat
            .admit(&handshake, route)
            .await
            .map_err(TestError::Denied)?;
        Self::serve(chat, session).await
    }

    /// Connects as `user`, at `route`, with no admission (no authenticator, no limits), and
    /// takes the `welcome` frame.
    pub async fn connect_as(chat: &Chat, user: &str, route: Route) -> Result<Self, TestError> {
        Self::serve(chat, Session::new(user, route)).await
    }

    async fn serve(chat: &Chat, session: Session) -> Result<Self, TestError> {
        let (tx, inbound) = mpsc::channel(SOCKET_FRAMES);
        let (outbound, rx) = mpsc::channel(SOCKET_FRAMES);
        let user = session.user.clone();
        let task = tokio::spawn(chat.serve(session, inbound, outbound));
        let mut client = Self {
            user,
            epoch: String::new(),
            tx,
            rx,
            task,
            timeout: DEFAULT_TIMEOUT,
        };
        let welcome = client.expect("welcome").await?;
        client.epoch = welcome["epoch"].as_str().unwrap_or_default().to_owned();
        Ok(client)
    }

    /// The user the connection is signed in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The store epoch the `welcome` frame named.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// How long the receiving calls wait from now on (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends a JSON frame.
    pub async fn send(&mut self, frame: Value) -> Result<(), TestError> {
        self.send_text(&frame.to_string()).await
    }

    /// Sends a text frame as it is, JSON or not.
    pub async fn send_text(&mut self, text: &str) -> Result<(), TestError> {
        self.send_inbound(Inbound::Text(Bytes::copy_from_slice(text.as_bytes())))
            .await
    }

    /// Sends any frame an adapter could hand the engine (a binary frame, a pong).
    pub async fn send_inbound(&mut self, frame: Inbound) -> Result<(), TestError> {
        self.tx.send(frame).await.map_err(|_| TestError::Ended)
    }

    /// The next frame or close (WebSocket pings are skipped).
    pub async fn receive(&mut self) -> Result<Received, TestError> {
        loop {
            let next = tokio::time::timeout(self.timeout, self.rx.next())
                .await
                .map_err(|_| TestError::Timeout(self.timeout))?;
            match next.ok_or(TestError::Ended)? {
                Outbound::Text(text) => {
                    return serde_json::from_slice(&text)
                        .map(Received::Frame)
                        .map_err(|_| {
                            TestError::NotJson(String::from_utf8_lossy(&text).into_owned())
                        })
                }
                Outbound::Ping => {}
                Outbound::Close { code, reason } => return Ok(Received::Close { code, reason }),
            }
        }
    }

    /// The next frame, which must be of `type` `kind`.
    pub async fn expect(&mut self, kind: &str) -> Result<Value, TestError> {
        let frame = self.frame().await?;
        if frame["type"] == kind {
            Ok(frame)
        } else {
            Err(TestError::Unexpected(frame))
        }
    }

    /// The first frame `wanted` accepts; the frames before it are skipped (a `member` event
    /// before an `ack`, say).
    pub async fn expect_where(
        &mut self,
        mut wanted: impl FnMut(&Value) -> bool,
    ) -> Result<Value, TestError> {
        loop {
            let frame = self.frame().await?;
            if wanted(&frame) {
                return Ok(frame);
            }
        }
    }

    /// Nothing arrives for `quiet`, and the connection is still open.
    pub async fn expect_nothing(&mut self, quiet: Duration) -> Result<(), TestError> {
        match tokio::time::timeout(quiet, self.rx.next()).await {
            Err(_) => Ok(()),
            Ok(None) => Err(TestError::Ended),
            Ok(Some(Outbound::Text(text))) => Err(TestError::Unexpected(
                serde_json::from_slice(&text)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&text).into())),
            )),
            Ok(Some(Outbound::Close { code, reason })) => Err(TestError::Closed { code, reason }),
            // A ping is no news; keep watching for the rest of the window.
            Ok(Some(Outbound::Ping)) => Box::pin(self.expect_nothing(quiet)).await,
        }
    }

    /// The next text frame; a close is an error.
    async fn frame(&mut self) -> Result<Value, TestError> {
        match self.receive().await? {
            Received::Frame(frame) => Ok(frame),
            Received::Close { code, reason } => Err(TestError::Closed { code, reason }),
        }
    }

    /// Leaves as a client that closes its socket, and returns why the engine says the
    /// connection ended.
    pub async fn disconnect(self) -> CloseReason {
        let Self { tx, rx, task, .. } = self;
        drop(tx);
        drop(rx);
        task.await.unwrap_or(CloseReason::TransportError)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::auth::DevAuthenticator;
    use serde_json::json;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_room_message_reaches_the_other_member_and_silence_is_checked() {
        let chat = Chat::builder()
            .authenticator(Arc::new(DevAuthenticator))
            .build();
        let mut alice = Communicator::connect_as(&chat, "alice", Route::Lobby)
            .await
            .unwrap();
        let mut bob = Communicator::connect_as(&chat, "bob", Route::Room("lobby".into()))
            .await
            .unwrap();
        bob.expect("joined").await.unwrap();
        alice
            .send(json!({"type": "join", "room": "lobby"}))
            .await
            .unwrap();
        alice.expect("joined").await.unwrap();
        bob.expect("member").await.unwrap();
        alice
            .send(json!({"type": "send", "room": "lobby", "body": "hello"}))
            .await
            .unwrap();
        let message = bob.expect("message").await.unwrap();
        assert_eq!(
            (message["from"].as_str(), message["body"].as_str()),
            (Some("alice"), Some("hello"))
        );
        // Alice's echo and ack are waiting: not silence.
        assert!(alice
            .expect_nothing(Duration::from_millis(50))
            .await
            .is_err());
        bob.expect_nothing(Duration::from_millis(50)).await.unwrap();
        // A wrong expectation fails rather than passing.
        alice.send(json!({"type": "ping"})).await.unwrap();
        alice.expect_where(|f| f["type"] == "pong").await.unwrap();
        alice.set_timeout(Duration::from_millis(100));
        assert!(matches!(
            alice.expect("ack").await,
            Err(TestError::Timeout(_))
        ));
        chat.shutdown();
        assert!(matches!(
            bob.receive().await.unwrap(),
            Received::Close { code: 1001, .. }
        ));
        assert!(matches!(
            bob.expect_nothing(Duration::from_millis(50)).await,
            Err(TestError::Ended)
        ));
        assert_eq!(alice.disconnect().await, CloseReason::Shutdown);
    }
}
