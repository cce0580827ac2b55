//! The floor: the least a WebSocket chat server can do, to measure the real servers against.
//!
//! ```sh
//! cargo run --release --example floor -- --addr 127.0.0.1:8100
//! ```
//!
//! It speaks just enough of the protocol for `loadgen`: `joined` for any `join`, and for a
//! `send` the next id (one counter for everything), one encoded `message` frame to every open
//! socket and an `ack` to the sender (so `loadgen --mode idle` measures its memory per connection
//! too; it keeps no history, so it cannot serve the resumes of `loadgen --mode churn`). No rooms,
//! no store, no authentication, no limits: each socket has an unbounded queue, so it never cuts
//! anyone and never drops anything, and its memory grows with whatever a client does not read.
//! What the chat servers do on top of this (membership, history, ordering across nodes, retries,
//! bounded memory) is their cost; the comparison script (`scripts/compare.sh`) reports their
//! numbers as a ratio of this one's, measured in the same run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Debug, Parser)]
#[command(about = "A minimal broadcast server: the floor the chat servers are measured against")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8100")]
    addr: SocketAddr,
}

#[derive(Deserialize)]
struct Request {
    #[serde(rename = "type")]
    kind: String,
    room: Option<String>,
    body: Option<String>,
    #[serde(rename = "ref")]
    reference: Option<String>,
}

/// Every open socket's queue; the lock also orders the broadcasts, so ids arrive in order.
#[derive(Default)]
struct Sockets {
    next: u64,
    queues: HashMap<u64, mpsc::UnboundedSender<Utf8Bytes>>,
}

struct Floor {
    sockets: Mutex<Sockets>,
    ids: AtomicU64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(1 << 20);
    let listener = TcpListener::bind(args.addr).await?;
    eprintln!("floor listening: ws://{}/ws", listener.local_addr()?);
    let floor = Arc::new(Floor {
        sockets: Mutex::default(),
        ids: AtomicU64::new(0),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(Arc::clone(&floor), stream));
    }
}

async fn serve(floor: Arc<Floor>, stream: TcpStream) {
    // The same small buffers as the tungstenite adapter (1 KiB to read, writes gathered up to
    // 16 KiB), not tungstenite's 128 KiB defaults: the floor's memory per connection is then
    // what a socket, its task and its queue cost, the least any server pays.
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024);
    let Ok(socket) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut sink, mut stream) = socket.split();
    let (queue, mut outgoing) = mpsc::unbounded_channel::<Utf8Bytes>();
    let key = {
        let mut sockets = floor.sockets.lock().unwrap_or_else(PoisonError::into_inner);
        sockets.next += 1;
        let key = sockets.next;
        sockets.queues.insert(key, queue.clone());
        key
    };
    let writer = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if sink.feed(Message::Text(frame)).await.is_err() {
                return;
            }
            // Everything queued goes out before one flush.
            while let Ok(frame) = outgoing.try_recv() {
                if sink.feed(Message::Text(frame)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(request) = serde_json::from_str::<Request>(&text) else {
            continue;
        };
        match request.kind.as_str() {
            "join" => {
                let joined = serde_json::json!({
                    "type": "joined", "room": request.room, "members": [], "history": [],
                    "more": false
                });
                let _ = queue.send(joined.to_string().into());
            }
            "send" => {
                let sockets = floor.sockets.lock().unwrap_or_else(PoisonError::into_inner);
                let id = floor.ids.fetch_add(1, Ordering::Relaxed) + 1;
                let frame: Utf8Bytes = serde_json::json!({
                    "type": "message", "room": request.room, "id": id, "from": "floor",
                    "body": request.body, "ts": 0
                })
                .to_string()
                .into();
                for socket in sockets.queues.values() {
                    let _ = socket.send(frame.clone());
                }
                drop(sockets);
                let ack = serde_json::json!({"type": "ack", "ref": request.reference, "id": id});
                let _ = queue.send(ack.to_string().into());
            }
            _ => {}
        }
    }
    floor
        .sockets
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .queues
        .remove(&key);
    writer.abort();
}
