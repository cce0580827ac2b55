//! The socket under a chat WebSocket, shared by the two halves of a connection: tungstenite
//! reads frames from it, and [`WireSink`] writes the engine's frames to it itself.
//!
//! Why not let tungstenite write as well: it copies every outgoing frame into a per-socket buffer
//! that keeps its largest size for the socket's life. A connection that once took a burst (a
//! `joined` with a page of members, a page of history) would hold that memory while idle, and
//! every recipient of a room message would pay a copy of the message. A server's frames are
//! simple (no mask, RFC 6455 §5.2), so [`WireSink`] queues a small header beside the engine's
//! shared `Bytes`, and writes a batch of small frames gathered into one scratch buffer per
//! worker thread (one plain `write`), a large frame as slices of its own bytes (one vectored
//! write, no copy). Nothing is kept with the socket once written.
//!
//! tungstenite still answers the peer's pings and close frames. What it writes lands at the end
//! of the same queue, whole frames only, so it never splits one of the engine's frames. Both
//! halves run in the connection's one task; the mutex is never contended and never held across
//! an await. They must share the task: a socket wakes one waker per direction, the last that
//! waited.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use chat_core::engine::Outbound;
use futures::Sink;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes queued toward the socket above which [`WireSink`] takes no more until some are written.
const HIGH_WATER: usize = 64 * 1024;
/// Most queued pieces handed to one vectored write.
const MAX_SLICES: usize = 64;
/// Most bytes gathered into the scratch buffer for one write.
const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    /// Where small frames are gathered for one `write`: one per worker thread, none per socket.
    static SCRATCH: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(SCRATCH_BYTES));
}
/// Most of tungstenite's writes (its pong and close replies) waiting in the queue; a peer that
/// pings without reading would otherwise grow it.
const MAX_CONTROL: usize = 64;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// One frame (or a run of tungstenite's frames) waiting to be written.
struct Piece {
    head: [u8; 10],
    head_len: u8,
    payload: Bytes,
    /// Bytes of `head` then `payload` already written.
    written: usize,
}

impl Piece {
    /// A final (FIN) unmasked frame, as a server sends it.
    fn frame(opcode: u8, payload: Bytes) -> Self {
        let mut head = [0u8; 10];
        head[0] = 0x80 | opcode;
        let len = payload.len();
        let head_len = if len < 126 {
            head[1] = len as u8;
            2
        } else if let Ok(len) = u16::try_from(len) {
            head[1] = 126;
            head[2..4].copy_from_slice(&len.to_be_bytes());
            4
        } else {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Self {
            head,
            head_len,
            payload,
            written: 0,
        }
    }

    /// Bytes already framed (tungstenite's replies).
    fn raw(bytes: Bytes) -> Self {
        Self {
            head: [0; 10],
            head_len: 0,
            payload: bytes,
            written: 0,
        }
    }

    fn len(&self) -> usize {
        usize::from(self.head_len) + self.payload.len()
    }

    /// Whether this is a close frame (ours, or tungstenite's reply).
    fn is_close(&self) -> bool {
        let first = if self.head_len > 0 {
            self.head[0]
        } else {
            self.payload.first().copied().unwrap_or(0)
        };
        first & 0x0f == OP_CLOSE
    }

    /// What is left to write, as at most two slices.
    fn remaining(&self) -> (&[u8], &[u8]) {
        let head_len = usize::from(self.head_len);
        if self.written < head_len {
            (&self.head[self.written..head_len], &self.payload[..])
        } else {
            (&[], &self.payload[self.written - head_len..])
        }
    }
}

struct Wire<S> {
    io: S,
    queue: VecDeque<Piece>,
    /// Bytes in `queue` not yet written.
    queued: usize,
    /// Pieces of tungstenite's in `queue`.
    control: usize,
    /// The engine sent its close frame: nothing more of its goes out.
    closed: bool,
}

impl<S: AsyncWrite + Unpin> Wire<S> {
    fn push(&mut self, piece: Piece) {
        self.queued += piece.len();
        self.queue.push_back(piece);
    }

    /// Writes queued pieces until the queue is empty (Ready) or the socket is full (Pending).
    ///
    /// Small frames are gathered into the worker thread's scratch buffer and written with one
    /// plain `write`: for frames of a few hundred bytes the kernel's cost per `writev` segment
    /// was more than the copy (perf: copying from the segments was 9% of a busy server's time,
    /// 2% for a server that writes one contiguous buffer). A frame too large for the scratch
    /// buffer goes out as its own slices, uncopied. Nothing stays with the socket either way.
    fn poll_write_queue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let n = match SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.clear();
                for piece in self.queue.iter() {
                    let (head, payload) = piece.remaining();
                    if scratch.len() + head.len() + payload.len() > SCRATCH_BYTES {
                        break;
                    }
                    scratch.extend_from_slice(head);
                    scratch.extend_from_slice(payload);
                }
                if scratch.is_empty() {
                    None
                } else {
                    Some(Pin::new(&mut self.io).poll_write(cx, &scratch))
                }
            }) {
                Some(written) => written,
                None => self.poll_write_slices(cx),
            };
            let n = match n {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            };
            self.advance(n);
        }
        if self.queue.capacity() > 0 {
            // All written: an idle socket keeps no room for the next burst.
            self.queue = VecDeque::new();
        }
        Poll::Ready(Ok(()))
    }

    /// One vectored write of the queued pieces, from the first: for a first frame larger than
    /// the scratch buffer.
    fn poll_write_slices(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        for piece in self.queue.iter() {
            let (head, payload) = piece.remaining();
            for part in [head, payload] {
                if !part.is_empty() && count < MAX_SLICES {
                    slices[count] = IoSlice::new(part);
                    count += 1;
                }
            }
            if count == MAX_SLICES {
                break;
            }
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count])
    }

    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(piece) = self.queue.front_mut() else {
                return;
            };
            let left = piece.len() - piece.written;
            if n < left {
                piece.written += n;
                return;
            }
            n -= left;
            if let Some(piece) = self.queue.pop_front() {
                if piece.head_len == 0 {
                    self.control -= 1;
                }
            }
        }
    }
}

/// The socket as both halves share it.
pub(crate) struct Shared<S>(Arc<Mutex<Wire<S>>>);

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Shared<S> {
    pub(crate) fn new(io: S) -> Self {
        Self(Arc::new(Mutex::new(Wire {
            io,
            queue: VecDeque::new(),
            queued: 0,
            control: 0,
            closed: false,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Wire<S>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers the peer's close frame (echoing its code, RFC 6455 §5.5.1) behind what is queued;
    /// nothing of the engine's follows it.
    pub(crate) fn answer_close(&self, code: Option<u16>) {
        let mut wire = self.lock();
        if wire.closed {
            return;
        }
        wire.closed = true;
        let payload = match code {
            // Codes that say "no code" and must not be sent.
            Some(1005 | 1006 | 1015) | None => Bytes::new(),
            Some(code) => Bytes::copy_from_slice(&code.to_be_bytes()),
        };
        wire.push(Piece::frame(OP_CLOSE, payload));
    }

    /// Gives up on a client that does not read: every queued frame not yet begun is dropped,
    /// the one half on the wire is finished (so the stream stays well-formed), and the close
    /// frame goes behind it, unless a close frame is already the one on the wire.
    pub(crate) fn abandon(&self, code: u16, reason: &str) {
        let mut wire = self.lock();
        let started = wire.queue.front().is_some_and(|piece| piece.written > 0);
        wire.queue.truncate(usize::from(started));
        wire.queued = wire.queue.iter().map(|p| p.len() - p.written).sum();
        wire.control = wire.queue.iter().filter(|p| p.head_len == 0).count();
        let closing = wire.queue.front().is_some_and(Piece::is_close);
        wire.closed = true;
        if !closing {
            wire.push(close_frame(code, reason));
        }
    }

    /// Shuts the socket's sending side (a TCP FIN after what was written).
    pub(crate) fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.lock().io).poll_shutdown(cx)
    }

    /// Writes everything queued, then flushes the socket.
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut wire = self.lock();
        std::task::ready!(wire.poll_write_queue(cx))?;
        Pin::new(&mut wire.io).poll_flush(cx)
    }

    /// Writes what is queued if the socket takes it; what it does not take waits for the next
    /// write, or for the next time this is called with the task's waker registered.
    pub(crate) fn write_queued(&self, cx: &mut Context<'_>) -> io::Result<()> {
        let mut wire = self.lock();
        if wire.queue.is_empty() {
            return Ok(());
        }
        match wire.poll_write_queue(cx) {
            Poll::Ready(Err(error)) => Err(error),
            _ => Ok(()),
        }
    }
}

/// The socket as tungstenite sees it: reads pass through; its writes (the pong and close replies
/// it sends by itself) join the queue, behind any frame of the engine's already there.
pub(crate) struct ReadSide<S>(pub(crate) Shared<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ReadSide<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ReadSide<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            // Nothing to queue: an empty piece would look like a socket that takes nothing.
            return Poll::Ready(Ok(0));
        }
        let mut wire = self.0.lock();
        if wire.closed {
            // Our close frame is queued or sent: nothing may follow it (a reply to the peer's
            // close, read while we linger, is not needed any more).
            return Poll::Ready(Ok(buf.len()));
        }
        if wire.control >= MAX_CONTROL {
            // Pings answered faster than the peer reads the answers.
            return Poll::Ready(Err(io::Error::other("peer does not read its pongs")));
        }
        wire.control += 1;
        wire.push(Piece::raw(Bytes::copy_from_slice(buf)));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Best effort: a reply the socket cannot take now goes out with the next write, or the
        // next time the connection's reader is polled (see `Frames`).
        Poll::Ready(self.0.write_queued(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A close frame with `code` and as much of `reason` as fits (a control frame's payload is at
/// most 125 bytes: the code and 123 of reason).
fn close_frame(code: u16, reason: &str) -> Piece {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason);
    Piece::frame(OP_CLOSE, Bytes::from(payload))
}

/// The engine's frames to the socket: a `Sink` of [`Outbound`] that queues each frame (header
/// and the engine's shared bytes, no copy) and writes the queue on flush.
pub(crate) struct WireSink<S>(pub(crate) Shared<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Outbound> for WireSink<S> {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut wire = self.0.lock();
        if wire.queued < HIGH_WATER {
            return Poll::Ready(Ok(()));
        }
        match wire.poll_write_queue(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending if wire.queued < HIGH_WATER => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn start_send(self: Pin<&mut Self>, frame: Outbound) -> io::Result<()> {
        let mut wire = self.0.lock();
        if wire.closed {
            return Err(io::Error::other("the close frame was sent"));
        }
        let piece = match frame {
            Outbound::Text(text) => Piece::frame(OP_TEXT, text),
            Outbound::Ping => Piece::frame(OP_PING, Bytes::new()),
            Outbound::Close { code, reason } => {
                wire.closed = true;
                close_frame(code, reason)
            }
        };
        wire.push(piece);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut wire = self.0.lock();
        std::task::ready!(wire.poll_write_queue(cx))?;
        Pin::new(&mut wire.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    /// A peer that pings without reading the pongs is cut off once 64 answers wait, however
    /// much of the engine's is queued: the engine's own frames are bounded by its budget.
    #[tokio::test]
    async fn unread_replies_are_bounded() {
        use tokio::io::AsyncWriteExt;
        let (server, _client) = tokio::io::duplex(1);
        let wire = Shared::new(server);
        let mut sink = WireSink(wire.clone());
        // A large frame of the engine's waiting does not count against the replies.
        futures::SinkExt::feed(&mut sink, Outbound::Text(Bytes::from(vec![b'x'; 200_000])))
            .await
            .unwrap();
        let mut tungstenite_side = ReadSide(wire);
        for _ in 0..MAX_CONTROL {
            tungstenite_side.write_all(&[0x8a, 0]).await.unwrap();
        }
        assert!(tungstenite_side.write_all(&[0x8a, 0]).await.is_err());
    }

    /// A pipe of 100 bytes forces partial writes everywhere: mid-header, mid-payload, and a
    /// tungstenite pong queued behind a half-written frame; on both write paths (small frames
    /// gathered into the scratch buffer, frames above it written as slices) and across the
    /// switch from one to the other and back.
    #[tokio::test]
    async fn frames_survive_partial_writes_and_replies_wait_their_turn() {
        let (server, client) = tokio::io::duplex(100);
        let wire = Shared::new(server);
        let mut sink = WireSink(wire.clone());
        let mut reader = WebSocketStream::from_raw_socket(ReadSide(wire), Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let bodies: Vec<Bytes> = [0usize, 1, 125, 126, 65_535, 65_536, 70_000, 3]
            .iter()
            .enumerate()
            .map(|(i, &len)| Bytes::from(vec![b'a' + i as u8; len]))
            .collect();
        let expected = bodies.clone();
        let writer = async move {
            for body in bodies {
                sink.feed(Outbound::Text(body)).await.unwrap();
            }
            sink.feed(Outbound::Ping).await.unwrap();
            sink.flush().await.unwrap();
            sink.send(Outbound::Close {
                code: 1001,
                reason: "bye",
            })
            .await
            .unwrap();
            assert!(sink.feed(Outbound::Ping).await.is_err(), "sent after close");
        };
        let reading = async move {
            // tungstenite writes its pong on the read after the one that returned the ping, as
            // the connection's reader always reads on.
            let mut pings = 0;
            while let Some(Ok(message)) = reader.next().await {
                match message {
                    Message::Ping(_) => pings += 1,
                    // The client's answer to the server's ping.
                    Message::Pong(_) => {}
                    Message::Close(_) => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            pings
        };
        // Both halves in one task, as a connection runs them (the socket wakes one waker).
        let server = tokio::spawn(async move { futures::join!(writer, reading).1 });
        // The client pings; the server's reader (tungstenite) queues the pong in the same queue.
        client
            .send(Message::Ping(b"p".to_vec().into()))
            .await
            .unwrap();
        let mut texts = Vec::new();
        let (mut pongs, mut pings) = (0, 0);
        let close = loop {
            match client.next().await.unwrap().unwrap() {
                Message::Text(text) => texts.push(Bytes::from(text)),
                Message::Pong(payload) => {
                    assert_eq!(&payload[..], b"p");
                    pongs += 1;
                }
                Message::Ping(_) => pings += 1,
                Message::Close(frame) => break frame.unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(texts, expected);
        assert_eq!((pongs, pings), (1, 1));
        assert_eq!(u16::from(close.code), 1001);
        assert_eq!(close.reason.as_str(), "bye");
        // The client's answer to the close frame ends the server's reading.
        drop(client);
        assert_eq!(server.await.unwrap(), 1);
    }

    fn header(len: usize) -> Vec<u8> {
        let piece = Piece::frame(OP_TEXT, Bytes::from(vec![b'x'; len]));
        piece.head[..usize::from(piece.head_len)].to_vec()
    }

    #[test]
    fn headers_use_the_shortest_length_encoding() {
        assert_eq!(header(0), [0x81, 0]);
        assert_eq!(header(125), [0x81, 125]);
        assert_eq!(header(126), [0x81, 126, 0, 126]);
        assert_eq!(header(65_535), [0x81, 126, 0xff, 0xff]);
        assert_eq!(header(65_536), [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn a_partial_write_resumes_mid_header_and_mid_payload() {
        let mut piece = Piece::frame(OP_TEXT, Bytes::from_static(&[b'y'; 200]));
        assert_eq!(piece.len(), 204);
        piece.written = 3;
        let (head, payload) = piece.remaining();
        assert_eq!((head.len(), payload.len()), (1, 200));
        piece.written = 10;
        let (head, payload) = piece.remaining();
        assert_eq!((head.len(), payload.len()), (0, 194));
    }
}
