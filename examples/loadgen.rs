//! A WebSocket load generator for the chat protocol.
//!
//! ```sh
//! cargo run --release --example loadgen -- --url ws://127.0.0.1:8000 --clients 1000 \
//!     --senders 100 --messages 10 --rate 1000
//! cargo run --release --example loadgen -- --url ws://127.0.0.1:8001,ws://127.0.0.1:8002  # two nodes
//! ```
//!
//! `--clients` clients (spread over the `--url`s in turn) sign in with the development
//! authenticator as `load-N` and join one fresh room; the first `--senders` of them each send
//! `--messages` messages, paced to `--rate` messages per second in all (0: as fast as each
//! sender's `--window` of unacknowledged messages allows). Every client checks what it gets: each
//! message exactly once, in id order. It reports connect time, deliveries per second, latency
//! (p50, p90, p99, max, from the send to each delivery), and lost and duplicated deliveries, as a
//! table and as one JSON line. It raises its own open-file limit and connects in batches.
//!
//! The servers must run with the development authenticator and a rate limit above what each
//! sender sends (`--rate-per-second`, `--rate-burst`).

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
#[command(about = "Load generator for the chat protocol")]
struct Args {
    /// Server WebSocket base URL(s), comma-separated; clients are spread over them in turn.
    #[arg(long, value_delimiter = ',', default_value = "ws://127.0.0.1:8000")]
    url: Vec<String>,
    /// Clients, all in one room.
    #[arg(long, default_value_t = 1_000)]
    clients: usize,
    /// Clients that also send.
    #[arg(long, default_value_t = 100)]
    senders: usize,
    /// Messages each sender sends.
    #[arg(long, default_value_t = 10)]
    messages: usize,
    /// Messages per second, all senders together; 0 sends as fast as the window allows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Unacknowledged messages a sender may have in flight when unpaced.
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Clients connected at once while connecting.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// How long to wait for the last deliveries after the last ack.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// The room (a fresh name by default, so ids start at 1).
    #[arg(long)]
    room: Option<String>,
}

/// The frames a client reads, just the fields it needs.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    id: Option<u64>,
    #[serde(borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow)]
    reference: Option<Cow<'a, str>>,
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Message ids received, as a bitset (ids of a fresh room are 1..=total).
    ids: Vec<u64>,
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    last_id: u64,
    /// Microseconds from send to delivery.
    latencies: Vec<u32>,
    closed_early: bool,
}

impl Seen {
    fn record(&mut self, id: u64, latency: u32) {
        let (word, bit) = ((id / 64) as usize, id % 64);
        if word >= self.ids.len() {
            self.ids.resize(word + 1, 0);
        }
        if self.ids[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        self.ids[word] |= 1 << bit;
        self.received += 1;
        if id < self.last_id {
            self.out_of_order += 1;
        }
        self.last_id = self.last_id.max(id);
        self.latencies.push(latency);
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(base: &str, user: &str, room: &str) -> Result<Socket, String> {
    let url = format!("{base}/ws?user={user}");
    let (mut socket, _) = tokio_tungstenite::connect_async(&url)
        .await
        .map_err(|error| format!("{url}: {error}"))?;
    let join = serde_json::json!({"type": "join", "room": room}).to_string();
    socket
        .send(Message::text(join))
        .await
        .map_err(|error| error.to_string())?;
    // Wait for `joined`, so that every message sent later reaches this client.
    while let Some(message) = socket.next().await {
        if let Ok(Message::Text(text)) = message {
            if text.contains(r#""type":"joined""#) {
                return Ok(socket);
            }
        }
    }
    Err(format!("{url}: closed before joining"))
}

fn micros_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Reads until `expected` messages arrived or `done` says to stop waiting.
async fn read(
    mut stream: futures::stream::SplitStream<Socket>,
    start: Instant,
    expected: u64,
    deadline: Arc<AtomicU64>,
    acks: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> Seen {
    let mut seen = Seen::default();
    loop {
        let stop_at = deadline.load(Ordering::Relaxed);
        // Until the deadline is set, look again every so often: it may be set meanwhile.
        let wait = if stop_at == u64::MAX {
            Duration::from_millis(100)
        } else {
            Duration::from_micros(stop_at.saturating_sub(micros_since(start)))
        };
        let message =
            match tokio::time::timeout(wait.max(Duration::from_millis(1)), stream.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(_) => {
                    seen.closed_early = seen.received < expected;
                    return seen;
                }
                Err(_) => {
                    if deadline.load(Ordering::Relaxed) != u64::MAX
                        && micros_since(start) >= deadline.load(Ordering::Relaxed)
                    {
                        return seen;
                    }
                    continue;
                }
            };
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text) else {
            continue;
        };
        match frame.kind.as_ref() {
            "message" => {
                let (Some(id), Some(body)) = (frame.id, frame.body) else {
                    continue;
                };
                // body: "{sender}:{seq}:{micros since start at send}"
                let sent = body.rsplit(':').next().and_then(|t| t.parse::<u64>().ok());
                let latency = sent.map_or(0, |sent| micros_since(start).saturating_sub(sent));
                seen.record(id, u32::try_from(latency).unwrap_or(u32::MAX));
                if seen.received >= expected && acks.is_none() {
                    return seen;
                }
            }
            "ack" => {
                if let (Some(acks), Some(reference)) = (&acks, frame.reference) {
                    let _ = acks.send(reference.into_owned());
                }
            }
            "error" => {
                eprintln!("loadgen: server error: {text}");
                if let (Some(acks), Some(reference)) = (&acks, frame.reference) {
                    // Counted as done, so the sender does not wait forever; the loss shows.
                    let _ = acks.send(reference.into_owned());
                }
            }
            _ => {}
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1_000.0
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(error) = rlimit::increase_nofile_limit((args.clients as u64) * 2 + 256) {
        eprintln!("loadgen: could not raise the open-file limit: {error}");
    }
    let room = args.room.clone().unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!("load-{stamp}")
    });
    let senders = args.senders.min(args.clients);
    let total = (senders * args.messages) as u64;
    let start = Instant::now();

    // Connect in batches.
    let mut sockets = Vec::with_capacity(args.clients);
    for batch in (0..args.clients)
        .collect::<Vec<_>>()
        .chunks(args.batch.max(1))
    {
        let connecting: Vec<_> = batch
            .iter()
            .map(|&i| {
                let base = args.url[i % args.url.len()].clone();
                let room = room.clone();
                tokio::spawn(async move { connect(&base, &format!("load-{i}"), &room).await })
            })
            .collect();
        for connecting in connecting {
            match connecting.await {
                Ok(Ok(socket)) => sockets.push(socket),
                Ok(Err(error)) => {
                    eprintln!("loadgen: cannot connect: {error}");
                    return std::process::ExitCode::FAILURE;
                }
                Err(error) => {
                    eprintln!("loadgen: {error}");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
    }
    let connect_time = start.elapsed();

    // Readers for everyone; senders also get their acks through a channel.
    let deadline = Arc::new(AtomicU64::new(u64::MAX));
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let (sink, stream) = socket.split();
        let (acks, acked) = if i < senders {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        readers.push(tokio::spawn(read(
            stream,
            start,
            total,
            Arc::clone(&deadline),
            acks,
        )));
        if let Some(acked) = acked {
            writers.push((sink, acked));
        } else {
            drop(sink);
        }
    }

    // Send.
    let sending = Instant::now();
    let per_sender_interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(senders as f64 / args.rate));
    let sends: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(sender, (mut sink, mut acked))| {
            let room = room.clone();
            let (messages, window) = (args.messages, args.window.max(1));
            tokio::spawn(async move {
                let mut pace = per_sender_interval.map(|interval| {
                    // Spread the senders' first sends over one interval.
                    let offset = interval.mul_f64(sender as f64 / senders.max(1) as f64);
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, interval)
                });
                let mut in_flight = 0usize;
                for seq in 0..messages {
                    match &mut pace {
                        Some(pace) => {
                            pace.tick().await;
                        }
                        None => {
                            while in_flight >= window {
                                if acked.recv().await.is_none() {
                                    return sink;
                                }
                                in_flight -= 1;
                            }
                        }
                    }
                    let body = format!("{sender}:{seq}:{}", micros_since(start));
                    let frame = serde_json::json!({
                        "type": "send", "room": room, "body": body, "ref": format!("{sender}-{seq}")
                    });
                    if sink.send(Message::text(frame.to_string())).await.is_err() {
                        return sink;
                    }
                    in_flight += 1;
                }
                while in_flight > 0 && acked.recv().await.is_some() {
                    in_flight -= 1;
                }
                sink
            })
        })
        .collect();
    // The senders' sockets stay open until every reader is done.
    let mut open_sinks = Vec::new();
    for send in sends {
        if let Ok(sink) = send.await {
            open_sinks.push(sink);
        }
    }
    let sent_in = sending.elapsed();
    deadline.store(
        micros_since(start) + args.drain_secs * 1_000_000,
        Ordering::Relaxed,
    );

    let mut latencies = Vec::new();
    let (mut received, mut duplicates, mut out_of_order, mut closed) = (0u64, 0u64, 0u64, 0u64);
    for reader in readers {
        if let Ok(mut seen) = reader.await {
            received += seen.received;
            duplicates += seen.duplicates;
            out_of_order += seen.out_of_order;
            closed += u64::from(seen.closed_early);
            latencies.append(&mut seen.latencies);
        }
    }
    drop(open_sinks);
    let expected = total * args.clients as u64;
    let lost = expected.saturating_sub(received);
    latencies.sort_unstable();
    // Deliveries per second over the sending time plus the time the last delivery took.
    let max_latency = latencies
        .last()
        .map_or(0.0, |l| f64::from(*l) / 1_000_000.0);
    let elapsed = sent_in.as_secs_f64() + max_latency;
    let rate = received as f64 / elapsed.max(1e-9);
    let (p50, p90, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 90.0),
        percentile(&latencies, 99.0),
        latencies.last().map_or(0.0, |l| f64::from(*l) / 1_000.0),
    );
    println!(
        "loadgen: {} clients over {} server(s), {senders} senders x {} messages, rate {}",
        args.clients,
        args.url.len(),
        args.messages,
        if args.rate > 0.0 {
            format!("{}/s", args.rate)
        } else {
            format!("unpaced (window {})", args.window)
        }
    );
    println!("| connect s | sent in s | deliveries | deliveries/s | p50 ms | p90 ms | p99 ms | max ms | lost | duplicated | out of order | closed early |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {:.2} | {:.2} | {received} | {rate:.0} | {p50:.1} | {p90:.1} | {p99:.1} | {max:.1} | {lost} | {duplicates} | {out_of_order} | {closed} |",
        connect_time.as_secs_f64(),
        sent_in.as_secs_f64(),
    );
    println!(
        "{}",
        serde_json::json!({
            "clients": args.clients, "servers": args.url.len(), "senders": senders,
            "messages": args.messages, "rate": args.rate, "window": args.window,
            "connect_s": connect_time.as_secs_f64(), "sent_s": sent_in.as_secs_f64(),
            "deliveries": received, "expected": expected, "deliveries_per_s": rate,
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
            "lost": lost, "duplicated": duplicates, "out_of_order": out_of_order,
            "closed_early": closed,
        })
    );
    if lost > 0 || duplicates > 0 || out_of_order > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
