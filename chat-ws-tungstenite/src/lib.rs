//! chat-ws-tungstenite: carries chat-core over a raw `tokio::net::TcpListener` and
//! tokio-tungstenite, for services that use no web framework.
//!
//! [`serve`] runs the accept loop: for each connection it reads the HTTP upgrade request's head,
//! maps the path with [`route`] (404 otherwise), asks the [`Chat`]'s authenticator (401 before
//! upgrading when it refuses), then lets tungstenite validate and complete the upgrade with the
//! engine's frame size limit, and hands the socket's frames to [`Chat::serve`].
//!
//! Authentication is async (it may call a database), while tungstenite's header callback is not;
//! so the adapter reads the request head itself (bounded in size and time) and replays it to
//! tungstenite. Frames go out as `Utf8Bytes` built from the engine's shared `Bytes`: no copy per
//! recipient.
//!
//! [`websocket_config`] and [`serve_websocket`] are the part after the handshake, public so that
//! chat-ws-warp, which completes its upgrade through hyper, speaks to the socket the same way.
//!
//! On shutdown (the future passed to [`serve`] completes) it stops accepting, closes every socket
//! with 1001 through [`Chat::shutdown`], and waits a few seconds for connections to finish.
//!
//! ```no_run
//! use std::sync::Arc;
//! use chat_core::{auth::DevAuthenticator, Chat};
//!
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! let chat = Chat::builder().authenticator(Arc::new(DevAuthenticator)).build();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8001").await?;
//! chat_ws_tungstenite::serve(listener, chat, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chat_core::auth::Handshake;
use chat_core::engine::{route, Inbound, Outbound, Session};
use chat_core::Chat;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Largest request head accepted before the upgrade.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head (slow-loris guard).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// tungstenite's read buffer per socket.
const READ_BUFFER: usize = 1024;
/// Outgoing bytes tungstenite gathers before it writes them to the socket.
const WRITE_BUFFER: usize = 16 * 1024;
/// How long shutdown waits for connections to finish after closing them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections on `listener` and speaks the chat protocol on each, until `shutdown`
/// completes; then closes every connection with 1001 and returns once they are done (or after a
/// few seconds).
pub async fn serve(
    listener: TcpListener,
    chat: Chat,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    // Each connection task holds a clone of `alive`; when all are dropped, `done` yields None.
    let (alive, mut done) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let chat = chat.clone();
                    let alive = alive.clone();
                    tokio::spawn(async move {
                        if let Err(error) = connection(stream, chat).await {
                            tracing::debug!(%error, %peer, "connection failed");
                        }
                        drop(alive);
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tracing::info!("shutting down: closing every connection");
    chat.shutdown();
    drop(alive);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, done.recv()).await;
    Ok(())
}

async fn connection(mut stream: TcpStream, chat: Chat) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request head timed out"))??;
    let Some(handshake) = parse_head(&head) else {
        return respond(&mut stream, "400 Bad Request", "bad request").await;
    };
    let Some(route) = route(&handshake.path) else {
        return respond(&mut stream, "404 Not Found", "not found").await;
    };
    let user = match chat.authenticate(&handshake).await {
        Ok(user) => user,
        Err(error) => {
            tracing::info!(%error, path = handshake.path, "handshake refused");
            return respond(&mut stream, "401 Unauthorized", &error.to_string()).await;
        }
    };
    let replayed = Replayed {
        head,
        at: 0,
        inner: stream,
    };
    let config = websocket_config(&chat);
    let socket = tokio_tungstenite::accept_async_with_config(replayed, Some(config))
        .await
        .map_err(io::Error::other)?;
    serve_websocket(&chat, Session::new(user, route), socket).await;
    Ok(())
}

/// The WebSocket settings of a chat socket: the engine's frame size limit, and buffers sized
/// for many mostly idle connections.
///
/// tungstenite's defaults keep a 128 KiB read buffer per socket and zero it before every read
/// attempt; chat frames are small, so a 1 KiB buffer costs a 128th of the memory and of the
/// zeroing (larger frames still arrive whole, over several reads). Frames queue in the write
/// buffer until 16 KiB or the engine's flush, so a burst is one write.
pub fn websocket_config(chat: &Chat) -> WebSocketConfig {
    let limit = chat.config().max_frame_bytes;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_frame_size(Some(limit))
        .max_message_size(Some(limit))
}

/// Speaks the chat protocol on a server-side WebSocket whose handshake is done (best built with
/// [`websocket_config`]), until the connection ends. Frames go out as `Utf8Bytes` over the
/// engine's shared `Bytes`: no copy per recipient.
pub async fn serve_websocket<S>(chat: &Chat, session: Session, socket: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    chat.serve_socket(session, socket, inbound, outbound).await;
}

/// Reads until the end of the request head (`\r\n\r\n`), at most [`MAX_HEAD`] bytes. The
/// request of a WebSocket upgrade has no body, so nothing after the head is read.
async fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut byte = [0u8; 1024];
    loop {
        let n = stream.read(&mut byte).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the request head ended",
            ));
        }
        head.extend_from_slice(&byte[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

fn parse_head(head: &[u8]) -> Option<Handshake> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) if request.method == Some("GET") => {}
        _ => return None,
    }
    let target = request.path?;
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    Some(Handshake {
        path: path.to_owned(),
        query,
        headers: request
            .headers
            .iter()
            .filter_map(|h| {
                Some((
                    h.name.to_owned(),
                    std::str::from_utf8(h.value).ok()?.to_owned(),
                ))
            })
            .collect(),
    })
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// One socket message as the engine sees it; `None` ends the stream (close, or a broken socket).
fn inbound(message: Result<Message, WsError>) -> Option<Inbound> {
    match message {
        Ok(Message::Text(text)) => Some(Inbound::Text(Bytes::from(text))),
        Ok(Message::Binary(data)) => Some(Inbound::Binary(data)),
        // tungstenite answers pings itself; both prove the peer is alive.
        Ok(Message::Ping(_) | Message::Pong(_)) => Some(Inbound::Pong),
        Ok(Message::Close(_)) => None,
        Ok(Message::Frame(_)) => Some(Inbound::Pong),
        Err(WsError::Capacity(_)) => Some(Inbound::TooLarge),
        Err(error) => {
            tracing::debug!(%error, "socket read failed");
            None
        }
    }
}

fn outbound(frame: Outbound) -> Message {
    match frame {
        // Shares the engine's bytes: a UTF-8 check, no copy.
        Outbound::Text(text) => match Utf8Bytes::try_from(text) {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Text(Utf8Bytes::from_static("")),
        },
        Outbound::Ping => Message::Ping(Bytes::new()),
        Outbound::Close { code, reason } => Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(reason),
        })),
    }
}

/// The TCP stream with the already-read request head put back in front, for tungstenite to read
/// the handshake as if nobody had touched it.
struct Replayed {
    head: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let start = self.at;
            buf.put_slice(&self.head[start..start + n]);
            self.at += n;
            if self.at == self.head.len() {
                self.head = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chat_core::engine::Route;

    #[test]
    fn request_heads_parse_into_handshakes() {
        let head = b"GET /ws/chat/lobby/?user=alice&x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\n\r\n";
        let handshake = parse_head(head).unwrap();
        assert_eq!(handshake.path, "/ws/chat/lobby/");
        assert_eq!(handshake.query.as_deref(), Some("user=alice&x=1"));
        assert!(handshake
            .headers
            .contains(&("Authorization".into(), "Bearer t".into())));
        assert!(parse_head(b"POST /ws HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head(b"garbage\r\n\r\n").is_none());
    }

    #[test]
    fn a_head_that_is_a_route_elsewhere_is_no_chat_route() {
        let handshake = parse_head(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(route(&handshake.path), None);
        let handshake = parse_head(b"GET /ws HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(route(&handshake.path), Some(Route::Lobby));
    }

    #[test]
    fn engine_text_goes_out_without_a_copy() {
        let text = Bytes::from_static(br#"{"type":"welcome"}"#);
        let Message::Text(sent) = outbound(Outbound::Text(text.clone())) else {
            panic!("not a text frame");
        };
        assert_eq!(Bytes::from(sent).as_ptr(), text.as_ptr());
    }
}
