//! chat-ws-tungstenite: carries chat-core over a raw `tokio::net::TcpListener` and
//! tokio-tungstenite, for services that use no web framework.
//!
//! [`serve`] runs the accept loop: for each connection it reads the HTTP upgrade request's head
//! (bounded in size and time), maps the path with [`route`] (404 otherwise), checks the
//! WebSocket handshake headers ([`upgrade`]: 400 with the reason), asks [`Chat::admit`] (the
//! `Origin`, the authenticator, which may call a database, and the connection limits: 403, 401,
//! 429 or 503 when it refuses), answers 101 and hands the connection to [`serve_io`].
//! [`serve_with`] also answers plain `GET`s for other paths (health checks, metrics).
//!
//! [`serve_io`] is the part after the handshake: tungstenite reads the client's frames, and the
//! engine's frames are written here, each a small header beside the engine's shared `Bytes`, so
//! a room message costs no copy per recipient and an idle socket keeps no write buffer. It is
//! public, with [`upgrade`], so that chat-ws-warp, which completes its upgrade through hyper,
//! speaks to the socket the same way.
//!
//! On shutdown (the future passed to [`serve`] completes) it stops accepting, closes every socket
//! with 1001 through [`Chat::shutdown`], and waits a few seconds for connections to finish.
//!
//! A client the engine cuts for not reading (1008) is not simply dropped: the frames queued for
//! it are, the one already half on the wire is finished, the close frame follows, and the socket
//! is kept, reading and discarding, for `ChatConfig::slow_close_grace`, so a client that reads
//! again learns why it was cut instead of finding the connection reset.
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
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chat_core::auth::Handshake;
use chat_core::engine::{route, CloseReason, Inbound, Session};
use chat_core::Chat;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

pub mod upgrade;
mod wire;

use upgrade::Refusal;

/// Largest request head accepted before the upgrade.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head (slow-loris guard).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// tungstenite's read buffer per socket.
const READ_BUFFER: usize = 1024;
/// How long a closing connection waits for the client to take what is still queued.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// How long shutdown waits for connections to finish after closing them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A plain HTTP answer to a `GET` that is no chat route (a health check, metrics): see
/// [`serve_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code, such as 200 or 503.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

type HttpHandler =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Option<HttpResponse>> + Send>> + Send + Sync>;

/// Accepts connections on `listener` and speaks the chat protocol on each, until `shutdown`
/// completes; then closes every connection with 1001 and returns once they are done (or after a
/// few seconds). Every other path is answered 404.
pub async fn serve(
    listener: TcpListener,
    chat: Chat,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, chat, shutdown, |_| async { None }).await
}

/// [`serve`], with `http` answering `GET` requests for paths that are no chat route: it gets
/// the path and returns the answer, or `None` for 404. This is how a service with no web
/// framework serves `/healthz`, `/readyz` or `/metrics` on the same port.
///
/// ```no_run
/// use std::sync::Arc;
/// use chat_core::{auth::DevAuthenticator, Chat};
/// use chat_ws_tungstenite::HttpResponse;
///
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// let chat = Chat::builder().authenticator(Arc::new(DevAuthenticator)).build();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8001").await?;
/// let health = |path: String| async move {
///     (path == "/healthz").then(|| HttpResponse {
///         status: 200,
///         content_type: "text/plain",
///         body: "ok".into(),
///     })
/// };
/// chat_ws_tungstenite::serve_with(listener, chat, std::future::pending(), health).await
/// # }
/// ```
pub async fn serve_with<H, F>(
    listener: TcpListener,
    chat: Chat,
    shutdown: impl Future<Output = ()>,
    http: H,
) -> io::Result<()>
where
    H: Fn(String) -> F + Send + Sync + 'static,
    F: Future<Output = Option<HttpResponse>> + Send + 'static,
{
    let http: HttpHandler = Arc::new(move |path| Box::pin(http(path)));
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
                    let http = Arc::clone(&http);
                    tokio::spawn(async move {
                        // Each phase boxed: the task keeps no room for the handshake while
                        // it serves, and the socket's future is allocated at its own size.
                        match Box::pin(handshake(stream, &chat, &http)).await {
                            Ok(Some(upgraded)) => {
                                let Upgraded { stream, session, read_ahead } = upgraded;
                                Box::pin(serve_io(&chat, session, stream, read_ahead)).await;
                            }
                            // Refused, and answered.
                            Ok(None) => {}
                            Err(error) => tracing::debug!(%error, %peer, "connection failed"),
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

/// A connection whose handshake is done: the 101 is sent.
struct Upgraded {
    stream: TcpStream,
    session: Session,
    /// What the client sent after its request head.
    read_ahead: Vec<u8>,
}

/// Reads and answers the upgrade request: `None` when it was refused (and told why).
async fn handshake(
    mut stream: TcpStream,
    chat: &Chat,
    http: &HttpHandler,
) -> io::Result<Option<Upgraded>> {
    let _ = stream.set_nodelay(true);
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request head timed out"))??;
    let Some(request) = parse_head(&head) else {
        return refuse(stream, "400 Bad Request", "", "bad request").await;
    };
    let Request {
        handshake,
        len,
        accept,
    } = request;
    let Some(route) = route(&handshake.path) else {
        return match http(handshake.path).await {
            Some(answer) => {
                let status = StatusCode::from_u16(answer.status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let status = format!(
                    "{} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                );
                let content_type = format!("content-type: {}\r\n", answer.content_type);
                respond(stream, &status, &content_type, &answer.body).await
            }
            None => refuse(stream, "404 Not Found", "", "not found").await,
        };
    };
    let accept = match accept {
        Ok(accept) => accept,
        Err(refusal) => {
            tracing::debug!(reason = refusal.reason(), "bad upgrade");
            // RFC 6455 §4.4: tell the client which version the server speaks.
            let extra = if refusal == Refusal::WrongVersion {
                "sec-websocket-version: 13\r\n"
            } else {
                ""
            };
            return refuse(stream, "400 Bad Request", extra, refusal.reason()).await;
        }
    };
    let session = match chat.admit(&handshake, route).await {
        Ok(session) => session,
        Err(denied) => {
            tracing::info!(%denied, path = handshake.path, "handshake refused");
            let (status, extra) = match denied.status() {
                401 => ("401 Unauthorized", ""),
                403 => ("403 Forbidden", ""),
                429 => ("429 Too Many Requests", "retry-after: 5\r\n"),
                _ => ("503 Service Unavailable", "retry-after: 5\r\n"),
            };
            return refuse(stream, status, extra, &denied.to_string()).await;
        }
    };
    // Nothing of the request is kept for the connection's life.
    drop(handshake);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await?;
    // Whatever the client sent after its request head is already the first frames.
    let read_ahead = head[len..].to_vec();
    Ok(Some(Upgraded {
        stream,
        session,
        read_ahead,
    }))
}

/// The WebSocket settings of a chat socket: the engine's frame size limit, and a read buffer
/// sized for many mostly idle connections.
///
/// tungstenite's default keeps a 128 KiB read buffer per socket and zeroes it before every read
/// attempt; chat frames are small, so a 1 KiB buffer costs a 128th of the memory and of the
/// zeroing (larger frames still arrive whole, over several reads). tungstenite writes only its
/// own pong and close replies here (see [`serve_io`]), so its write buffer stays empty.
pub fn websocket_config(chat: &Chat) -> WebSocketConfig {
    let limit = chat.config().max_frame_bytes;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_frame_size(Some(limit))
        .max_message_size(Some(limit))
}

/// Speaks the chat protocol over `io`, a connection whose WebSocket handshake is done (the 101
/// reply sent), until the connection ends. `read_ahead` holds bytes already read from `io` after
/// the request head (the first frames of a hasty client), usually none.
///
/// tungstenite reads the client's frames (with [`websocket_config`]); the engine's frames are
/// written by this crate: a batch of small frames gathered with their headers into one scratch
/// buffer per worker thread and written at once, a large frame as slices of the engine's shared
/// `Bytes`. Nothing is serialized per recipient, and no buffer stays with the socket once a
/// burst is written.
pub async fn serve_io<S>(chat: &Chat, session: Session, io: S, read_ahead: Vec<u8>) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let wire = wire::Shared::new(io);
    // This future lives as long as the connection: what only its first and last steps need is
    // boxed, so that it keeps no room for them.
    let socket = Box::pin(WebSocketStream::from_partially_read(
        wire::ReadSide(wire.clone()),
        read_ahead,
        Role::Server,
        Some(websocket_config(chat)),
    ))
    .await;
    // Boxed: the engine's future keeps its stream by value, twice (rustc keeps an async fn's
    // arguments apart from its locals).
    let mut frames = Box::pin(Frames {
        socket,
        wire: wire.clone(),
        done: false,
    });
    // Boxed apart from this future: the engine's future is most of an idle connection's memory,
    // and allocated on its own it fits the allocator's 2 KiB size class, where
    // the two together took the next one up (2.5 KiB).
    let reason = Box::pin(chat.serve(session, &mut frames, wire::WireSink(wire.clone()))).await;
    match reason.close_frame() {
        Some((code, text)) if reason == CloseReason::SlowConsumer => {
            // Cut for not reading: drop what is queued, finish what is on the wire, then the
            // close frame; and keep reading (and discarding) for a while, so a client that
            // reads again gets the close frame and knows to resume, instead of a reset.
            wire.abandon(code, text);
            let grace = chat.config().slow_close_grace;
            let _ = Box::pin(tokio::time::timeout(grace, linger(&wire, &mut frames))).await;
        }
        _ => {
            // What is still queued (the answer to the client's close frame) goes out before
            // the socket is dropped, unless the client takes nothing for a moment.
            let _ = Box::pin(tokio::time::timeout(
                CLOSE_FLUSH,
                linger(&wire, &mut frames),
            ))
            .await;
        }
    }
    reason
}

/// Writes what is queued, then shuts the sending side, reading and discarding what the client
/// sends meanwhile, until the client closes its side too (or a write fails). Dropping a socket
/// with unread input makes the kernel answer with a reset, which can destroy the close frame
/// still in the client's receive buffer; reading to the end avoids that.
async fn linger<S>(wire: &wire::Shared<S>, frames: &mut Pin<Box<Frames<S>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut flushed, mut shut, mut ended) = (false, false, false);
    std::future::poll_fn(|cx| {
        if !flushed {
            match wire.poll_flush(cx) {
                Poll::Ready(Ok(())) => flushed = true,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {}
            }
        }
        if flushed && !shut {
            match wire.poll_shutdown(cx) {
                Poll::Ready(Ok(())) => shut = true,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {}
            }
        }
        while !ended {
            match frames.as_mut().poll_next(cx) {
                Poll::Ready(Some(_)) => {}
                Poll::Ready(None) => ended = true,
                Poll::Pending => break,
            }
        }
        if shut && ended {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// The client's frames as the engine takes them. Each poll first writes what tungstenite queued
/// (a pong the socket could not take at once), so a reply never waits for the engine's next
/// frame.
struct Frames<S> {
    socket: WebSocketStream<wire::ReadSide<S>>,
    wire: wire::Shared<S>,
    done: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for Frames<S> {
    type Item = Inbound;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Inbound>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Err(error) = self.wire.write_queued(cx) {
            tracing::debug!(%error, "socket write failed");
            self.done = true;
            return Poll::Ready(None);
        }
        let message = std::task::ready!(Pin::new(&mut self.socket).poll_next(cx));
        if let Some(Ok(Message::Close(frame))) = &message {
            // tungstenite would answer on its next read, which never comes: answer here.
            self.wire
                .answer_close(frame.as_ref().map(|f| u16::from(f.code)));
        }
        let frame = message.and_then(inbound);
        self.done = frame.is_none();
        Poll::Ready(frame)
    }
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

/// A parsed upgrade request.
struct Request {
    handshake: Handshake,
    /// The length of the request head in the bytes read.
    len: usize,
    /// The `Sec-WebSocket-Accept` value, or why this is no WebSocket handshake.
    accept: Result<String, Refusal>,
}

fn parse_head(head: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(head) {
        // An upgrade exists only in HTTP/1.1.
        Ok(httparse::Status::Complete(len))
            if request.method == Some("GET") && request.version == Some(1) =>
        {
            len
        }
        _ => return None,
    };
    let target = request.path?;
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    let accept = upgrade::accept_key(request.headers.iter().map(|h| (h.name, h.value)));
    Some(Request {
        handshake: Handshake {
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
        },
        len,
        accept,
    })
}

/// Answers a refused request and closes: the handshake's `None`.
async fn refuse(
    stream: TcpStream,
    status: &str,
    headers: &str,
    body: &str,
) -> io::Result<Option<Upgraded>> {
    let headers = format!("content-type: text/plain; charset=utf-8\r\n{headers}");
    respond(stream, status, &headers, body).await
}

/// Answers a request that is no upgrade and closes.
async fn respond(
    mut stream: TcpStream,
    status: &str,
    headers: &str,
    body: &str,
) -> io::Result<Option<Upgraded>> {
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{headers}connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(None)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chat_core::engine::Route;

    #[test]
    fn request_heads_parse_into_handshakes() {
        let head = b"GET /ws/chat/lobby/?user=alice&x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\n\r\n\x81";
        let request = parse_head(head).unwrap();
        assert_eq!(request.len, head.len() - 1);
        assert_eq!(request.accept, Err(Refusal::NoConnectionUpgrade));
        let handshake = request.handshake;
        assert_eq!(handshake.path, "/ws/chat/lobby/");
        assert_eq!(handshake.query.as_deref(), Some("user=alice&x=1"));
        assert!(handshake
            .headers
            .contains(&("Authorization".into(), "Bearer t".into())));
        assert!(parse_head(b"POST /ws HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head(b"garbage\r\n\r\n").is_none());
        assert!(parse_head(b"GET /ws HTTP/1.0\r\n\r\n").is_none());
    }

    #[test]
    fn a_head_that_is_a_route_elsewhere_is_no_chat_route() {
        let request = parse_head(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(route(&request.handshake.path), None);
        let request = parse_head(b"GET /ws HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(route(&request.handshake.path), Some(Route::Lobby));
    }
}
