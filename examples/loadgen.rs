//! A WebSocket load generator for the chat protocol.
//!
//! ```sh
//! cargo run --release --example loadgen -- --url ws://127.0.0.1:8000 --clients 1000 \
//!     --senders 100 --messages 10 --rate 1000
//! cargo run --release --example loadgen -- --url ws://127.0.0.1:8001,ws://127.0.0.1:8002  # two nodes
//! cargo run --release --example loadgen -- --mode churn --churn-ms 1000 --messages 50 --rate 500
//! cargo run --release --example loadgen -- --mode idle --clients 10000 --hold-secs 30 \
//!     --server-pid "$(pgrep -n chat-server)"
//! cargo run --release --example loadgen -- --mode soak --clients 1000 --duration-secs 600 \
//!     --server-pid "$(pgrep -n chat-server)"  # or ./scripts/soak.sh, which starts the server
//! ```
//!
//! `--clients` clients (spread over the `--url`s in turn) sign in with the development
//! authenticator as `load-N` and join one fresh room (`soak`: as `soak-N`, several rooms). Four
//! modes:
//!
//! - `load` (the default): the first `--senders` clients each send `--messages` messages, paced
//!   to `--rate` messages per second in all (0: as fast as each sender's `--window` of
//!   unacknowledged messages allows). Every client checks what it gets: each message exactly
//!   once, in id order. It reports connect time, deliveries per second, latency (p50, p90, p99,
//!   max, from the send to each delivery), and lost, duplicated and out-of-order deliveries.
//! - `churn`: the same sending, while every client (senders included) drops its socket every
//!   `--churn-ms` milliseconds (jittered between half and one and a half times that) and
//!   reconnects, joining again with `since` = the highest id it has seen (and paging on with
//!   `history` `after` when the server says `more`). A sender sends its unacknowledged messages
//!   again with the same `ref` after reconnecting, as the protocol allows. At the end every
//!   client must have every message exactly once and in id order; it reports lost, duplicated
//!   and out-of-order deliveries (0/0/0 expected), reconnects done, and how often the server
//!   closed a socket itself. Latency counts live deliveries only (not those read from history).
//! - `idle`: every client joins and then holds its connection, reading but never sending, for
//!   `--hold-secs`. It reports how many joined and how many the server cut meanwhile (none may
//!   be), and with `--server-pid` the server's resident memory (VmRSS) before connecting and
//!   after all joined, and KiB per connection.
//! - `soak`: a leak test. For `--duration-secs` every client loops: it connects, joins again
//!   the rooms it was in when its last connection ended, resuming with `since` = the highest id
//!   it saw there (paging on with `history` when the server says `more`), or else one to three
//!   of `--rooms` rooms (named `{room}-K`), and now and then (`--soak-rate` messages per second
//!   in all) sends a message to one of its rooms or, one time in fifty, a direct message to a
//!   neighbour (`soak-N±1`), and sometimes leaves a room or joins another (afresh, with its
//!   latest messages); it reads all that arrives and checks that each room's ids only increase.
//!   After a lifetime between `--min-life-secs` and `--max-life-secs` (random) it waits for its
//!   acks, closes (half the time with a close frame, half by dropping the TCP socket) and
//!   reconnects. Messages carry no `ref`: the server remembers refs for 10 minutes, memory that
//!   would grow through the run by design. With `--server-pid` it samples the server's VmRSS
//!   and open files (/proc/PID/fd) before any client, after `--warmup-secs`, every
//!   `--sample-secs`, at the end with the clients still connected, and `--settle-secs` after
//!   the last one closed. The server's history grows until every room holds its `--retention`
//!   messages, so the warm-up must last that long (about `--rooms` x retention / `--soak-rate`
//!   s; given `--server-retention`, the soak warns when it did not). It reports the samples,
//!   connects, messages sent, acknowledged and received, server errors and closes, and the
//!   verdict "RSS at end within 10% of after warm-up" (the highest sample of the run's last
//!   minute against the highest of the minute after the warm-up: RSS moves in the allocator's
//!   steps of a few MiB, which one sample against another would read as a trend); it fails on
//!   that verdict, on any server
//!   error, failed connect, missing ack or id out of order, on any close by the server other
//!   than 1000/1001 (or a socket that broke without one), and if the server exits.
//!
//! Given `--server-pid`, every mode also reports the CPU time the server used (user and system,
//! from /proc), and `load` the server's CPU microseconds per delivery: a measure of the server
//! that the load generator's own CPU use, on the same machine, skews far less than latency.
//!
//! Each mode prints a table (`soak`: two) and one JSON line. The load generator raises its own
//! open-file limit, connects in batches of `--batch` (`soak`: spreads its first connects over
//! the first 10 s), and gives its sockets small buffers, so that 10,000 idle connections cost it
//! little memory (127.0.0.1 offers about 28,000 source ports).
//!
//! The servers must run with the development authenticator and a rate limit above what each
//! sender sends (`--rate-per-second`, `--rate-burst`; `soak` stays within the defaults).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

/// What the load generator does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Senders send while every client stays connected.
    Load,
    /// Senders send while every client drops its socket every `--churn-ms` and resumes.
    Churn,
    /// Every client joins and holds its connection without sending.
    Idle,
    /// Clients join, send, leave and reconnect for `--duration-secs` while the server's memory
    /// and open files are sampled.
    Soak,
}

#[derive(Debug, Parser)]
#[command(about = "Load generator for the chat protocol")]
struct Args {
    /// What to do: `load`, `churn`, `idle` or `soak`.
    #[arg(long, value_enum, default_value = "load")]
    mode: Mode,
    /// Server WebSocket base URL(s), comma-separated; clients are spread over them in turn.
    #[arg(long, value_delimiter = ',', default_value = "ws://127.0.0.1:8000")]
    url: Vec<String>,
    /// Clients, all in one room (soak: in several).
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
    /// Clients connected at once while connecting (above the server's listen backlog, 128 for a
    /// tokio `TcpListener::bind`, the kernel drops SYNs and some connects wait a second).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// How long to wait for the last deliveries after the last ack.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// The room (a fresh name by default, so ids start at 1); soak: the stem of its rooms' names.
    #[arg(long)]
    room: Option<String>,
    /// Churn: mean milliseconds a client keeps a socket before dropping it and reconnecting.
    #[arg(long, default_value_t = 1_000)]
    churn_ms: u64,
    /// Idle: seconds to hold the connections once all have joined.
    #[arg(long, default_value_t = 30)]
    hold_secs: u64,
    /// Idle: seconds to wait after the last join before measuring the server's memory. Soak:
    /// seconds to wait after the last client closed before the "after close" sample.
    #[arg(long, default_value_t = 2)]
    settle_secs: u64,
    /// Idle: stop opening connections after this many seconds (the report says how many joined).
    #[arg(long, default_value_t = 300)]
    max_connect_secs: u64,
    /// Soak: seconds the whole run lasts, warm-up included.
    #[arg(long, default_value_t = 600)]
    duration_secs: u64,
    /// Soak: seconds of warm-up; the server's RSS then is what its RSS at the end is held against.
    #[arg(long, default_value_t = 60)]
    warmup_secs: u64,
    /// Soak: seconds between samples after the warm-up.
    #[arg(long, default_value_t = 30)]
    sample_secs: u64,
    /// Soak: rooms the clients join and leave (named after `--room`, with `-0`, `-1`, ...).
    #[arg(long, default_value_t = 10)]
    rooms: usize,
    /// Soak: messages per second, all clients together (room and direct messages). Each
    /// client's share must stay well below the server's rate limit (10 frames/s by default).
    #[arg(long, default_value_t = 200.0)]
    soak_rate: f64,
    /// Soak: fewest seconds a connection lives before it closes and reconnects.
    #[arg(long, default_value_t = 2)]
    min_life_secs: u64,
    /// Soak: most seconds a connection lives before it closes and reconnects.
    #[arg(long, default_value_t = 20)]
    max_life_secs: u64,
    /// Soak: the server's `--retention`, if known: the soak then warns when the warm-up ended
    /// before every room had that many messages (the server's history still growing by design).
    #[arg(long)]
    server_retention: Option<u64>,
    /// The server's process id (Linux /proc): every mode reports the CPU time it used, `idle`
    /// its resident memory, and `soak` its resident memory and open files over time.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Read buffer of each client socket in bytes (tungstenite's default is 128 KiB).
    #[arg(long, default_value_t = 8 * 1024)]
    read_buffer: usize,
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
    /// `joined` (with `since`) and `history`: more stored messages follow.
    more: Option<bool>,
    /// `joined`: the stored messages it resumes with.
    history: Option<Vec<Stored>>,
    /// `history`: the page of stored messages.
    messages: Option<Vec<Stored>>,
}

/// A stored message in `joined` or `history`.
#[derive(Deserialize)]
struct Stored {
    id: u64,
    body: String,
}

/// What a `joined` frame says a resuming client must read.
struct Joined {
    history: Vec<Stored>,
    more: bool,
}

/// Which message a body names: bodies are `{sender}:{seq}:{micros since start at send}`.
#[derive(Clone, Copy)]
struct Plan {
    senders: usize,
    messages: usize,
}

impl Plan {
    fn total(self) -> u64 {
        (self.senders * self.messages) as u64
    }

    /// The message's number in `0..total` and when it was sent, if it is one of this run's.
    fn parse(self, body: &str) -> Option<(u64, u64)> {
        let mut parts = body.splitn(3, ':');
        let sender: usize = parts.next()?.parse().ok()?;
        let seq: usize = parts.next()?.parse().ok()?;
        let sent: u64 = parts.next()?.parse().ok()?;
        (sender < self.senders && seq < self.messages)
            .then_some(((sender * self.messages + seq) as u64, sent))
    }
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// The messages received (by their number in the plan, not by id), as a bitset.
    keys: Vec<u64>,
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    last_id: u64,
    /// Messages read from `joined` or `history` rather than live (churn).
    from_history: u64,
    /// Microseconds from send to delivery, live deliveries only.
    latencies: Vec<u32>,
    closed_early: bool,
}

impl Seen {
    /// Records message number `key` with id `id`: a second delivery of the same message (by
    /// whatever id) is a duplicate, and a new message with an id below the last is out of order.
    fn record(&mut self, id: u64, key: u64, latency: Option<u32>) {
        let (word, bit) = ((key / 64) as usize, key % 64);
        if word >= self.keys.len() {
            self.keys.resize(word + 1, 0);
        }
        if self.keys[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        self.keys[word] |= 1 << bit;
        self.received += 1;
        if id <= self.last_id {
            self.out_of_order += 1;
        }
        self.last_id = self.last_id.max(id);
        match latency {
            Some(latency) => self.latencies.push(latency),
            None => self.from_history += 1,
        }
    }

    /// Records a stored message from `joined` or `history`.
    fn record_stored(&mut self, plan: Plan, stored: &Stored) {
        if let Some((key, _)) = plan.parse(&stored.body) {
            self.record(stored.id, key, None);
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a socket as `user`, joining no room.
async fn open(base: &str, user: &str, read_buffer: usize) -> Result<Socket, String> {
    let url = format!("{base}/ws?user={user}");
    // Small buffers: tungstenite's defaults (128 KiB to read, 128 KiB before a write) would make
    // 10,000 idle clients cost the load generator gigabytes.
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0);
    let (socket, _) = tokio_tungstenite::connect_async_with_config(&url, Some(config), true)
        .await
        .map_err(|error| format!("{url}: {error}"))?;
    Ok(socket)
}

/// Opens a socket as `user` and joins `room` (resuming after `since` if given), and waits for
/// `joined`, so that every message sent later reaches this client.
async fn connect(
    base: &str,
    user: &str,
    room: &str,
    since: Option<u64>,
    read_buffer: usize,
) -> Result<(Socket, Joined), String> {
    let url = format!("{base}/ws?user={user}");
    let mut socket = open(base, user, read_buffer).await?;
    let join = match since {
        Some(since) => serde_json::json!({"type": "join", "room": room, "since": since}),
        None => serde_json::json!({"type": "join", "room": room}),
    };
    socket
        .send(Message::text(join.to_string()))
        .await
        .map_err(|error| format!("{url}: {error}"))?;
    while let Some(message) = socket.next().await {
        let Ok(Message::Text(text)) = message else {
            continue;
        };
        if text.contains(r#""type":"joined""#) {
            let frame: Frame<'_> =
                serde_json::from_str(&text).map_err(|error| format!("{url}: joined: {error}"))?;
            let joined = Joined {
                history: frame.history.unwrap_or_default(),
                more: frame.more.unwrap_or(false),
            };
            return Ok((socket, joined));
        }
        if text.contains(r#""type":"error""#) {
            return Err(format!("{url}: join refused: {text}"));
        }
    }
    Err(format!("{url}: closed before joining"))
}

/// [`connect`] with a time limit.
async fn connect_within(
    limit: Duration,
    base: &str,
    user: &str,
    room: &str,
    since: Option<u64>,
    read_buffer: usize,
) -> Result<(Socket, Joined), String> {
    tokio::time::timeout(limit, connect(base, user, room, since, read_buffer))
        .await
        .unwrap_or_else(|_| Err(format!("{base}: no `joined` within {limit:?}")))
}

fn micros_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn latency_of(start: Instant, sent: u64) -> u32 {
    u32::try_from(micros_since(start).saturating_sub(sent)).unwrap_or(u32::MAX)
}

/// Prints at most a few of the server's errors: a thousand clients can get one each.
fn log_error(logged: &AtomicU64, text: &str) {
    let count = logged.fetch_add(1, Ordering::Relaxed);
    if count < 5 {
        eprintln!("loadgen: {text}");
    } else if count == 5 {
        eprintln!("loadgen: (further errors not shown)");
    }
}

/// Reads until `expected` messages arrived or `done` says to stop waiting.
async fn read(
    mut stream: futures::stream::SplitStream<Socket>,
    start: Instant,
    plan: Plan,
    deadline: Arc<AtomicU64>,
    acks: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    errors: Arc<AtomicU64>,
) -> Seen {
    let expected = plan.total();
    let mut seen = Seen::default();
    // One timer for the whole read, reset only when it fires: a timer per frame (its clock read
    // and its entry in the timer wheel) was about 6% of the load generator's CPU at a million
    // deliveries a second, and a saturated load generator adds its own queueing to every
    // latency it reports.
    let check = tokio::time::sleep(Duration::from_millis(100));
    tokio::pin!(check);
    loop {
        let stop_at = deadline.load(Ordering::Relaxed);
        // A sender's reader also waits for its acks: the deadline is set once all are in.
        if seen.received >= expected && (acks.is_none() || stop_at != u64::MAX) {
            return seen;
        }
        let message = tokio::select! {
            biased;
            message = stream.next() => match message {
                Some(Ok(message)) => message,
                _ => {
                    seen.closed_early = seen.received < expected;
                    return seen;
                }
            },
            () = &mut check => {
                let stop_at = deadline.load(Ordering::Relaxed);
                if stop_at != u64::MAX && micros_since(start) >= stop_at {
                    return seen;
                }
                // Until the deadline is set, look again every so often: it may be set meanwhile.
                let wait = if stop_at == u64::MAX {
                    Duration::from_millis(100)
                } else {
                    Duration::from_micros(stop_at.saturating_sub(micros_since(start)))
                };
                check.as_mut().reset(tokio::time::Instant::now() + wait.max(Duration::from_millis(1)));
                continue;
            }
        };
        let Message::Text(text) = message else {
            continue;
        };
        if let Some((id, body)) = live_message(&text) {
            if let Some((key, sent)) = plan.parse(body) {
                seen.record(id, key, Some(latency_of(start, sent)));
            }
            continue;
        }
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text) else {
            continue;
        };
        match frame.kind.as_ref() {
            "message" => {
                let (Some(id), Some(body)) = (frame.id, frame.body) else {
                    continue;
                };
                let Some((key, sent)) = plan.parse(&body) else {
                    continue;
                };
                seen.record(id, key, Some(latency_of(start, sent)));
            }
            "ack" => {
                if let (Some(acks), Some(reference)) = (&acks, frame.reference) {
                    let _ = acks.send(reference.into_owned());
                }
            }
            "error" => {
                log_error(&errors, &format!("server error: {text}"));
                if let (Some(acks), Some(reference)) = (&acks, frame.reference) {
                    // Counted as done, so the sender does not wait forever; the loss shows.
                    let _ = acks.send(reference.into_owned());
                }
            }
            _ => {}
        }
    }
}

/// A `message` frame's id and body, read without a JSON parser: at a million deliveries a
/// second the parser was a quarter of the load generator's CPU. Only for frames whose body is
/// one this load generator wrote (digits and colons, so no escapes) and whose names are its
/// own; anything else returns `None` and goes through `serde_json`. Key order does not matter
/// (the floor's encoder sorts keys, the chat servers' do not).
fn live_message(text: &str) -> Option<(u64, &str)> {
    if !text.contains(r#""type":"message""#) {
        return None;
    }
    let after = |key: &str| text.find(key).map(|at| &text[at + key.len()..]);
    let id = after(r#""id":"#)?;
    let digits = id.bytes().take_while(u8::is_ascii_digit).count();
    let id = id[..digits].parse().ok()?;
    let body = after(r#""body":""#)?;
    let body = &body[..body.find('"')?];
    body.bytes()
        .all(|b| b.is_ascii_digit() || b == b':')
        .then_some((id, body))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1_000.0
}

/// Latency percentiles in milliseconds: p50, p90, p99, max.
fn latency_summary(latencies: &mut [u32]) -> (f64, f64, f64, f64) {
    latencies.sort_unstable();
    (
        percentile(latencies, 50.0),
        percentile(latencies, 90.0),
        percentile(latencies, 99.0),
        latencies.last().map_or(0.0, |l| f64::from(*l) / 1_000.0),
    )
}

/// Resident memory of a process in KiB, from `/proc/PID/status` (Linux).
fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user and system, all threads) a process has used, from `/proc/PID/stat`
/// (Linux; its unit, USER_HZ, is 100 a second on every Linux ABI).
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}

/// The CPU time the server (given `--server-pid`) and the load generator use from now on.
struct CpuMeter {
    server: Option<String>,
    server_start: Option<f64>,
    own_start: Option<f64>,
}

impl CpuMeter {
    fn start(server_pid: Option<u32>) -> Self {
        let server = server_pid.map(|pid| pid.to_string());
        Self {
            server_start: server.as_deref().and_then(cpu_secs),
            own_start: cpu_secs("self"),
            server,
        }
    }

    /// CPU seconds used since the start: the server's and the load generator's.
    fn used(&self) -> (Option<f64>, Option<f64>) {
        let since = |start: Option<f64>, now: Option<f64>| Some(now? - start?);
        (
            since(self.server_start, self.server.as_deref().and_then(cpu_secs)),
            since(self.own_start, cpu_secs("self")),
        )
    }
}

/// Microseconds of CPU per delivery.
fn per_delivery(cpu: Option<f64>, deliveries: u64) -> Option<f64> {
    cpu.filter(|_| deliveries > 0)
        .map(|cpu| cpu * 1e6 / deliveries as f64)
}

/// A number for a table cell, or `-`.
fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".to_owned(), |value| format!("{value:.decimals$}"))
}

/// The `send` frame of message `seq` of `sender`, stamped with the time it is first sent.
fn send_frame(room: &str, sender: usize, seq: usize, start: Instant) -> (String, String) {
    let body = format!("{sender}:{seq}:{}", micros_since(start));
    let reference = format!("{sender}-{seq}");
    let frame = serde_json::json!({"type": "send", "room": room, "body": body, "ref": reference});
    (reference, frame.to_string())
}

/// Connects every client in batches of `--batch`; the first failure ends the run.
async fn connect_all(args: &Args, room: &str) -> Result<Vec<Socket>, String> {
    let mut sockets = Vec::with_capacity(args.clients);
    for batch in (0..args.clients)
        .collect::<Vec<_>>()
        .chunks(args.batch.max(1))
    {
        let connecting: Vec<_> = batch
            .iter()
            .map(|&i| {
                let base = args.url[i % args.url.len()].clone();
                let room = room.to_owned();
                let read_buffer = args.read_buffer;
                tokio::spawn(async move {
                    let user = format!("load-{i}");
                    connect_within(
                        Duration::from_secs(60),
                        &base,
                        &user,
                        &room,
                        None,
                        read_buffer,
                    )
                    .await
                })
            })
            .collect();
        for connecting in connecting {
            match connecting.await {
                Ok(Ok((socket, _))) => sockets.push(socket),
                Ok(Err(error)) => return Err(format!("cannot connect: {error}")),
                Err(error) => return Err(error.to_string()),
            }
        }
    }
    Ok(sockets)
}

fn describe_rate(args: &Args) -> String {
    if args.rate > 0.0 {
        format!("{}/s", args.rate)
    } else {
        format!("unpaced (window {})", args.window)
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let wanted = args.clients as u64 + 1_024;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < args.clients as u64 + 64 => eprintln!(
            "loadgen: the open-file limit is {limit}, too low for {} clients",
            args.clients
        ),
        Ok(_) => {}
        Err(error) => eprintln!("loadgen: could not raise the open-file limit: {error}"),
    }
    if args.url.is_empty() {
        eprintln!("loadgen: no --url");
        return std::process::ExitCode::FAILURE;
    }
    let room = args.room.clone().unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!("load-{stamp}")
    });
    match args.mode {
        Mode::Load => load(&args, room).await,
        Mode::Churn => churn(&args, room).await,
        Mode::Idle => idle(&args, room).await,
        Mode::Soak => soak(&args, room).await,
    }
}

/// Everyone stays connected while the senders send.
async fn load(args: &Args, room: String) -> std::process::ExitCode {
    let senders = args.senders.min(args.clients);
    let plan = Plan {
        senders,
        messages: args.messages,
    };
    let total = plan.total();
    let start = Instant::now();
    let errors = Arc::new(AtomicU64::new(0));

    let sockets = match connect_all(args, &room).await {
        Ok(sockets) => sockets,
        Err(error) => {
            eprintln!("loadgen: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
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
            plan,
            Arc::clone(&deadline),
            acks,
            Arc::clone(&errors),
        )));
        if let Some(acked) = acked {
            writers.push((sink, acked));
        } else {
            drop(sink);
        }
    }

    // Send.
    let cpu = CpuMeter::start(args.server_pid);
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
                    let (_, frame) = send_frame(&room, sender, seq, start);
                    if sink.send(Message::text(frame)).await.is_err() {
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
    let (server_cpu, own_cpu) = cpu.used();
    let expected = total * args.clients as u64;
    let lost = expected.saturating_sub(received);
    let (p50, p90, p99, max) = latency_summary(&mut latencies);
    // Deliveries per second over the sending time plus the time the last delivery took.
    let elapsed = sent_in.as_secs_f64() + max / 1_000.0;
    let rate = received as f64 / elapsed.max(1e-9);
    println!(
        "loadgen: {} clients over {} server(s), {senders} senders x {} messages, rate {}",
        args.clients,
        args.url.len(),
        args.messages,
        describe_rate(args),
    );
    println!("| connect s | sent in s | deliveries | deliveries/s | p50 ms | p90 ms | p99 ms | max ms | lost | duplicated | out of order | closed early | server CPU s | loadgen CPU s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {:.2} | {:.2} | {received} | {rate:.0} | {p50:.1} | {p90:.1} | {p99:.1} | {max:.1} | {lost} | {duplicates} | {out_of_order} | {closed} | {} | {} |",
        connect_time.as_secs_f64(),
        sent_in.as_secs_f64(),
        cell(server_cpu, 2),
        cell(own_cpu, 2),
    );
    println!(
        "{}",
        serde_json::json!({
            "mode": "load",
            "clients": args.clients, "servers": args.url.len(), "senders": senders,
            "messages": args.messages, "rate": args.rate, "window": args.window,
            "connect_s": connect_time.as_secs_f64(), "sent_s": sent_in.as_secs_f64(),
            "deliveries": received, "expected": expected, "deliveries_per_s": rate,
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
            "lost": lost, "duplicated": duplicates, "out_of_order": out_of_order,
            "closed_early": closed, "server_errors": errors.load(Ordering::Relaxed),
            "server_cpu_s": server_cpu, "loadgen_cpu_s": own_cpu,
            "server_cpu_us_per_delivery": per_delivery(server_cpu, received),
        })
    );
    if lost > 0 || duplicates > 0 || out_of_order > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// A small xorshift generator for the churn jitter (no need for a crate).
struct Jitter(u64);

impl Jitter {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A value in `[0, 1)`.
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A value in `0..n` (`n` above 0).
    fn below(&mut self, n: usize) -> usize {
        ((self.next() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// Between half and one and a half times `mean`.
    fn around(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(0.5 + self.next())
    }
}

/// Fires once when a sender is done (or gives up), so the run knows when to start draining.
struct DoneSignal(Option<tokio::sync::mpsc::UnboundedSender<()>>);

impl DoneSignal {
    fn fire(&mut self) {
        if let Some(done) = self.0.take() {
            let _ = done.send(());
        }
    }
}

impl Drop for DoneSignal {
    fn drop(&mut self) {
        self.fire();
    }
}

/// What every churning client shares.
struct ChurnShared {
    room: String,
    plan: Plan,
    start: Instant,
    /// Microseconds since `start` at which to stop waiting; `u64::MAX` until the senders are done.
    deadline: AtomicU64,
    churn: Duration,
    window: usize,
    read_buffer: usize,
    errors: AtomicU64,
}

impl ChurnShared {
    fn past_deadline(&self) -> bool {
        micros_since(self.start) >= self.deadline.load(Ordering::Relaxed)
    }
}

/// A churning client's sending side.
struct Sending {
    index: usize,
    next_seq: usize,
    pace: Option<tokio::time::Interval>,
    /// Sent and not yet acknowledged, oldest first: (ref, frame), sent again after a reconnect.
    unacked: VecDeque<(String, String)>,
    done: DoneSignal,
}

/// What one churning client did.
#[derive(Default)]
struct ChurnReport {
    seen: Seen,
    reconnects: u64,
    server_closes: u64,
    connect_failures: u64,
    send_errors: u64,
    gave_up: bool,
}

/// How a socket's session ended.
enum SessionEnd {
    /// This client has everything it waits for, or the deadline passed.
    Done,
    /// The churn timer: the client dropped the socket.
    Dropped,
    /// The server closed the socket, or it broke.
    Closed,
}

/// Senders send while every client drops its socket now and then and resumes with `since`.
async fn churn(args: &Args, room: String) -> std::process::ExitCode {
    let senders = args.senders.min(args.clients);
    let plan = Plan {
        senders,
        messages: args.messages,
    };
    let start = Instant::now();
    let sockets = match connect_all(args, &room).await {
        Ok(sockets) => sockets,
        Err(error) => {
            eprintln!("loadgen: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let connect_time = start.elapsed();
    let shared = Arc::new(ChurnShared {
        room,
        plan,
        start,
        deadline: AtomicU64::new(u64::MAX),
        churn: Duration::from_millis(args.churn_ms.max(1)),
        window: args.window.max(1),
        read_buffer: args.read_buffer,
        errors: AtomicU64::new(0),
    });
    let cpu = CpuMeter::start(args.server_pid);
    let sending = Instant::now();
    let per_sender_interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(senders as f64 / args.rate));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let clients: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let sender = (i < senders).then(|| Sending {
                index: i,
                next_seq: 0,
                pace: per_sender_interval.map(|interval| {
                    let offset = interval.mul_f64(i as f64 / senders.max(1) as f64);
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, interval)
                }),
                unacked: VecDeque::new(),
                done: DoneSignal(Some(done_tx.clone())),
            });
            let base = args.url[i % args.url.len()].clone();
            tokio::spawn(churn_client(Arc::clone(&shared), i, base, socket, sender))
        })
        .collect();
    drop(done_tx);
    // Every sender fires once (when done, or when its task ends anyway); then drain.
    while done_rx.recv().await.is_some() {}
    let sent_in = sending.elapsed();
    shared.deadline.store(
        micros_since(start) + args.drain_secs * 1_000_000,
        Ordering::Relaxed,
    );

    let mut latencies = Vec::new();
    let mut total = ChurnReport::default();
    let mut gave_up = 0u64;
    for client in clients {
        let Ok(mut report) = client.await else {
            gave_up += 1;
            continue;
        };
        total.seen.received += report.seen.received;
        total.seen.duplicates += report.seen.duplicates;
        total.seen.out_of_order += report.seen.out_of_order;
        total.seen.from_history += report.seen.from_history;
        total.reconnects += report.reconnects;
        total.server_closes += report.server_closes;
        total.connect_failures += report.connect_failures;
        total.send_errors += report.send_errors;
        gave_up += u64::from(report.gave_up);
        latencies.append(&mut report.seen.latencies);
    }
    let (server_cpu, own_cpu) = cpu.used();
    let expected = plan.total() * args.clients as u64;
    let received = total.seen.received;
    let lost = expected.saturating_sub(received);
    let (duplicates, out_of_order) = (total.seen.duplicates, total.seen.out_of_order);
    let (p50, p90, p99, max) = latency_summary(&mut latencies);
    println!(
        "loadgen churn: {} clients over {} server(s), each dropping its socket every ~{} ms; {senders} senders x {} messages, rate {}",
        args.clients,
        args.url.len(),
        args.churn_ms,
        args.messages,
        describe_rate(args),
    );
    println!("| connect s | sent in s | deliveries | from history | reconnects | server closes | connect failures | live p50 ms | live p99 ms | live max ms | lost | duplicated | out of order |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {:.2} | {:.2} | {received} | {} | {} | {} | {} | {p50:.1} | {p99:.1} | {max:.1} | {lost} | {duplicates} | {out_of_order} |",
        connect_time.as_secs_f64(),
        sent_in.as_secs_f64(),
        total.seen.from_history,
        total.reconnects,
        total.server_closes,
        total.connect_failures,
    );
    println!(
        "{}",
        serde_json::json!({
            "mode": "churn",
            "clients": args.clients, "servers": args.url.len(), "senders": senders,
            "messages": args.messages, "rate": args.rate, "window": args.window,
            "churn_ms": args.churn_ms,
            "connect_s": connect_time.as_secs_f64(), "sent_s": sent_in.as_secs_f64(),
            "deliveries": received, "expected": expected, "from_history": total.seen.from_history,
            "reconnects": total.reconnects, "server_closes": total.server_closes,
            "connect_failures": total.connect_failures, "gave_up": gave_up,
            "send_errors": total.send_errors,
            "server_errors": shared.errors.load(Ordering::Relaxed),
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
            "lost": lost, "duplicated": duplicates, "out_of_order": out_of_order,
            "server_cpu_s": server_cpu, "loadgen_cpu_s": own_cpu,
        })
    );
    if lost > 0 || duplicates > 0 || out_of_order > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// Asks for the stored messages after `after` (the rest of a resume the server cut short).
async fn request_history(socket: &mut Socket, room: &str, after: u64) -> bool {
    let frame = serde_json::json!({"type": "history", "room": room, "after": after, "limit": 100});
    socket.send(Message::text(frame.to_string())).await.is_ok()
}

/// Forgets the send that `reference` acknowledges (or refuses); true if it was waiting.
fn settle(sender: Option<&mut Sending>, reference: Option<&str>) -> bool {
    let (Some(sender), Some(reference)) = (sender, reference) else {
        return false;
    };
    match sender.unacked.iter().position(|(r, _)| r == reference) {
        Some(at) => {
            sender.unacked.remove(at);
            true
        }
        None => false,
    }
}

/// One churning client: it reads, sends if it is a sender, and drops its socket and resumes
/// until it has every message (and, as a sender, every ack) or the deadline passes.
async fn churn_client(
    shared: Arc<ChurnShared>,
    index: usize,
    base: String,
    mut socket: Socket,
    mut sender: Option<Sending>,
) -> ChurnReport {
    let user = format!("load-{index}");
    let plan = shared.plan;
    let total = plan.total();
    let mut jitter = Jitter::new(index as u64 + 1);
    let mut report = ChurnReport::default();
    // While a resume pages through `history`, live messages wait here: (id, key, latency).
    let mut paging = false;
    let mut held: Vec<(u64, u64, u32)> = Vec::new();
    loop {
        let drop_at = tokio::time::Instant::now() + jitter.around(shared.churn);
        let mut check = tokio::time::interval(Duration::from_millis(100));
        let end = 'session: loop {
            let sending_done = sender
                .as_ref()
                .is_none_or(|s| s.next_seq >= plan.messages && s.unacked.is_empty());
            if let Some(sender) = sender.as_mut().filter(|_| sending_done) {
                sender.done.fire();
            }
            if sending_done && report.seen.received >= total {
                break SessionEnd::Done;
            }
            let can_send = sender.as_ref().is_some_and(|s| {
                s.next_seq < plan.messages && (s.pace.is_some() || s.unacked.len() < shared.window)
            });
            tokio::select! {
                _ = tokio::time::sleep_until(drop_at) => break SessionEnd::Dropped,
                _ = check.tick() => {
                    if shared.past_deadline() {
                        break SessionEnd::Done;
                    }
                }
                () = async {
                    if let Some(pace) = sender.as_mut().and_then(|s| s.pace.as_mut()) {
                        pace.tick().await;
                    }
                }, if can_send => {
                    let Some(sender) = sender.as_mut() else { continue };
                    let (reference, frame) =
                        send_frame(&shared.room, sender.index, sender.next_seq, shared.start);
                    sender.next_seq += 1;
                    sender.unacked.push_back((reference, frame.clone()));
                    if socket.send(Message::text(frame)).await.is_err() {
                        break SessionEnd::Closed;
                    }
                }
                message = socket.next() => {
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_)) | Err(_)) | None => break SessionEnd::Closed,
                        Some(Ok(_)) => continue,
                    };
                    let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text) else {
                        continue;
                    };
                    match frame.kind.as_ref() {
                        "message" => {
                            let (Some(id), Some(body)) = (frame.id, frame.body) else {
                                continue;
                            };
                            let Some((key, sent)) = plan.parse(&body) else { continue };
                            let latency = latency_of(shared.start, sent);
                            if paging {
                                held.push((id, key, latency));
                            } else {
                                report.seen.record(id, key, Some(latency));
                            }
                        }
                        "history" => {
                            for stored in frame.messages.iter().flatten() {
                                report.seen.record_stored(plan, stored);
                            }
                            let last = report.seen.last_id;
                            if frame.more.unwrap_or(false) {
                                if !request_history(&mut socket, &shared.room, last).await {
                                    break 'session SessionEnd::Closed;
                                }
                            } else {
                                paging = false;
                                // Live messages that the pages held too are not duplicates:
                                // they were read twice by design, once each way.
                                for (id, key, latency) in held.drain(..) {
                                    if id > report.seen.last_id {
                                        report.seen.record(id, key, Some(latency));
                                    }
                                }
                            }
                        }
                        "ack" => {
                            settle(sender.as_mut(), frame.reference.as_deref());
                        }
                        "error" => {
                            log_error(&shared.errors, &format!("server error: {text}"));
                            // Not sent again: the loss shows.
                            if settle(sender.as_mut(), frame.reference.as_deref()) {
                                report.send_errors += 1;
                            }
                        }
                        _ => {}
                    }
                }
            }
        };
        match end {
            SessionEnd::Done => return report,
            SessionEnd::Dropped => report.reconnects += 1,
            SessionEnd::Closed => report.server_closes += 1,
        }
        drop(socket);
        // Live messages held for an unfinished resume are read again from `since`.
        paging = false;
        held.clear();
        socket = loop {
            if shared.past_deadline() {
                report.gave_up = true;
                return report;
            }
            match connect_within(
                Duration::from_secs(10),
                &base,
                &user,
                &shared.room,
                Some(report.seen.last_id),
                shared.read_buffer,
            )
            .await
            {
                Ok((mut socket, joined)) => {
                    for stored in &joined.history {
                        report.seen.record_stored(plan, stored);
                    }
                    let mut alive = true;
                    if joined.more {
                        paging = true;
                        alive =
                            request_history(&mut socket, &shared.room, report.seen.last_id).await;
                    }
                    // Unacknowledged sends go again with the same ref: the server delivers
                    // each ref once, and acks a repeat with the first attempt's id.
                    if let Some(sender) = sender.as_ref() {
                        for (_, frame) in &sender.unacked {
                            alive =
                                alive && socket.feed(Message::text(frame.clone())).await.is_ok();
                        }
                        alive = alive && socket.flush().await.is_ok();
                    }
                    if alive {
                        break socket;
                    }
                    report.connect_failures += 1;
                }
                Err(error) => {
                    report.connect_failures += 1;
                    log_error(&shared.errors, &format!("reconnect: {error}"));
                    tokio::time::sleep(jitter.around(Duration::from_millis(200))).await;
                }
            }
        };
    }
}

/// How one idle connection ended.
#[derive(Default)]
struct IdleOutcome {
    joined: bool,
    /// The server closed it (or it broke) while it was held: the close code and reason, if any.
    cut: Option<String>,
    frames: u64,
}

/// One idle client: joins, then reads (answering pings) until told to stop.
async fn idle_client(
    base: String,
    user: String,
    room: String,
    read_buffer: usize,
    joined: tokio::sync::oneshot::Sender<Result<(), String>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> IdleOutcome {
    let mut outcome = IdleOutcome::default();
    let mut socket = match connect_within(
        Duration::from_secs(60),
        &base,
        &user,
        &room,
        None,
        read_buffer,
    )
    .await
    {
        Ok((socket, _)) => {
            let _ = joined.send(Ok(()));
            socket
        }
        Err(error) => {
            let _ = joined.send(Err(error));
            return outcome;
        }
    };
    outcome.joined = true;
    loop {
        tokio::select! {
            _ = stop.changed() => return outcome,
            message = socket.next() => match message {
                Some(Ok(Message::Close(frame))) => {
                    outcome.cut = Some(frame.map_or_else(
                        || "close without a code".to_owned(),
                        |frame| format!("close {} {}", u16::from(frame.code), frame.reason),
                    ));
                    return outcome;
                }
                Some(Ok(_)) => outcome.frames += 1,
                Some(Err(error)) => {
                    outcome.cut = Some(error.to_string());
                    return outcome;
                }
                None => {
                    outcome.cut = Some("end of stream".to_owned());
                    return outcome;
                }
            },
        }
    }
}

/// Every client joins and holds its connection without sending.
async fn idle(args: &Args, room: String) -> std::process::ExitCode {
    let pid = args.server_pid.map(|pid| pid.to_string());
    let server_rss = || pid.as_deref().and_then(rss_kib);
    let rss_before = server_rss();
    if pid.is_some() && rss_before.is_none() {
        eprintln!("loadgen: cannot read the server's VmRSS from /proc (--server-pid)");
    }
    let cpu = CpuMeter::start(args.server_pid);
    let start = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut clients = Vec::with_capacity(args.clients);
    let (mut joined, mut failed) = (0u64, 0u64);
    let errors = AtomicU64::new(0);
    let mut connecting_stopped = false;
    for batch in (0..args.clients)
        .collect::<Vec<_>>()
        .chunks(args.batch.max(1))
    {
        if start.elapsed() >= Duration::from_secs(args.max_connect_secs) {
            eprintln!(
                "loadgen: stopped connecting after {} s (--max-connect-secs), {joined} joined",
                args.max_connect_secs
            );
            connecting_stopped = true;
            break;
        }
        let mut waiting = Vec::with_capacity(batch.len());
        for &i in batch {
            let (tx, rx) = tokio::sync::oneshot::channel();
            clients.push(tokio::spawn(idle_client(
                args.url[i % args.url.len()].clone(),
                format!("load-{i}"),
                room.clone(),
                args.read_buffer,
                tx,
                stop_rx.clone(),
            )));
            waiting.push(rx);
        }
        for rx in waiting {
            match rx.await {
                Ok(Ok(())) => joined += 1,
                Ok(Err(error)) => {
                    failed += 1;
                    log_error(&errors, &format!("cannot connect: {error}"));
                }
                Err(_) => failed += 1,
            }
        }
    }
    let connect_time = start.elapsed();
    let (join_cpu, _) = cpu.used();
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let rss_joined = server_rss();
    let own_rss = rss_kib("self");
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let rss_end = server_rss();
    let _ = stop_tx.send(true);
    let (mut cut, mut frames) = (0u64, 0u64);
    let mut first_cut = None;
    for client in clients {
        let Ok(outcome) = client.await else { continue };
        frames += outcome.frames;
        if outcome.joined {
            if let Some(reason) = outcome.cut {
                cut += 1;
                first_cut.get_or_insert(reason);
            }
        }
    }
    let still = joined - cut;
    let per_connection = match (rss_before, rss_joined) {
        (Some(before), Some(after)) if joined > 0 => {
            Some(after.saturating_sub(before) as f64 / joined as f64)
        }
        _ => None,
    };
    let show = |kib: Option<u64>| kib.map_or("-".to_owned(), |kib| kib.to_string());
    println!(
        "loadgen idle: {} connections over {} server(s) in one room, held {} s",
        args.clients,
        args.url.len(),
        args.hold_secs
    );
    println!("| connections | joined | failed | cut | still connected | connect s | server CPU s to join | server RSS before KiB | after joining KiB | at the end KiB | KiB per connection | loadgen RSS KiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {joined} | {failed} | {cut} | {still} | {:.2} | {} | {} | {} | {} | {} | {} |",
        args.clients,
        connect_time.as_secs_f64(),
        cell(join_cpu, 2),
        show(rss_before),
        show(rss_joined),
        show(rss_end),
        cell(per_connection, 1),
        show(own_rss),
    );
    if let Some(reason) = &first_cut {
        eprintln!("loadgen: first cut connection: {reason}");
    }
    println!(
        "{}",
        serde_json::json!({
            "mode": "idle",
            "clients": args.clients, "servers": args.url.len(), "hold_s": args.hold_secs,
            "joined": joined, "failed": failed, "cut": cut, "still_connected": still,
            "first_cut": first_cut, "frames": frames, "connecting_stopped": connecting_stopped,
            "connect_s": connect_time.as_secs_f64(), "server_cpu_join_s": join_cpu,
            "server_rss_before_kib": rss_before, "server_rss_joined_kib": rss_joined,
            "server_rss_end_kib": rss_end, "kib_per_connection": per_connection,
            "loadgen_rss_kib": own_rss,
        })
    );
    if failed > 0 || cut > 0 || connecting_stopped {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// Rooms one soak client is in at once, at most.
const SOAK_MAX_ROOMS: usize = 3;

/// How long a soak client waits for its last acks before closing, and for the server's answer
/// to its close frame.
const SOAK_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What the soak counts, all clients together.
#[derive(Default)]
struct SoakCounters {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    /// Clients connected now.
    connected: AtomicU64,
    joins: AtomicU64,
    leaves: AtomicU64,
    sent: AtomicU64,
    directs_sent: AtomicU64,
    acked: AtomicU64,
    /// Sends still unacknowledged when their client stopped waiting for them.
    missing_acks: AtomicU64,
    received: AtomicU64,
    directs_received: AtomicU64,
    server_errors: AtomicU64,
    /// Room messages whose id was not above the highest one the client had seen there.
    out_of_order: AtomicU64,
    clean_closes: AtomicU64,
    dropped_sockets: AtomicU64,
    /// Closes by the server with 1000 or 1001.
    server_closes: AtomicU64,
    /// Closes by the server with any other code, and sockets that broke without a close frame.
    unexpected_closes: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// What every soak client shares.
struct SoakShared {
    urls: Vec<String>,
    /// Room `k` is named `{room_prefix}{k}`.
    room_prefix: String,
    rooms: usize,
    clients: usize,
    /// Mean time between one connected client's messages.
    act_every: Duration,
    min_life: Duration,
    max_life: Duration,
    /// The clients' first connects are spread over this long.
    ramp: Duration,
    read_buffer: usize,
    counters: SoakCounters,
    /// The highest id any client saw in each room: how many messages the room has had.
    room_ids: Vec<AtomicU64>,
    logged: AtomicU64,
    first_unexpected: std::sync::Mutex<Option<String>>,
}

impl SoakShared {
    fn room_name(&self, room: usize) -> String {
        format!("{}{room}", self.room_prefix)
    }

    /// Messages the quietest room has had.
    fn quietest_room(&self) -> u64 {
        self.room_ids.iter().map(count).min().unwrap_or(0)
    }

    fn room_index(&self, name: &str) -> Option<usize> {
        let room: usize = name.strip_prefix(&self.room_prefix)?.parse().ok()?;
        (room < self.rooms).then_some(room)
    }

    /// Counts a close the soak does not expect: by the server with a code other than 1000 or
    /// 1001, or a socket that broke without one.
    fn unexpected_close(&self, user: &str, reason: String) {
        bump(&self.counters.unexpected_closes);
        log_error(&self.logged, &format!("{user}: {reason}"));
        if let Ok(mut first) = self.first_unexpected.lock() {
            first.get_or_insert(reason);
        }
    }

    /// Counts the server's close frame.
    fn server_closed(&self, user: &str, frame: Option<CloseFrame>) {
        match frame {
            Some(frame) if matches!(u16::from(frame.code), 1000 | 1001) => {
                bump(&self.counters.server_closes);
            }
            Some(frame) => self.unexpected_close(
                user,
                format!(
                    "closed by the server: {} {}",
                    u16::from(frame.code),
                    frame.reason
                ),
            ),
            None => self.unexpected_close(user, "closed by the server without a code".into()),
        }
    }
}

/// The frames a soak client reads, just the fields it needs.
#[derive(Deserialize)]
struct SoakFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    id: Option<u64>,
    more: Option<bool>,
    /// `joined`: the stored messages it starts (or resumes) with.
    history: Option<Vec<StoredId>>,
    /// `history`: the page of stored messages.
    messages: Option<Vec<StoredId>>,
}

/// A stored message in `joined` or `history`, just its id.
#[derive(Deserialize)]
struct StoredId {
    id: u64,
}

/// Where a soak connection stands with one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InRoom {
    Out,
    /// `join` sent, `resuming` with `since`.
    Joining {
        resuming: bool,
    },
    /// Joined with `since` and reading the rest of what it missed with `history`.
    Paging,
    Joined,
}

/// One soak connection. `last_ids` outlives it: for each room the client is in (or was in when
/// its last connection ended), the highest id it saw there.
struct SoakSession<'a> {
    shared: &'a SoakShared,
    user: &'a str,
    rooms: Vec<InRoom>,
    last_ids: &'a mut [Option<u64>],
    /// Sends and direct messages not acknowledged yet.
    pending: u64,
}

impl SoakSession<'_> {
    fn in_rooms(&self) -> usize {
        self.rooms
            .iter()
            .filter(|&&room| room != InRoom::Out)
            .count()
    }

    /// A random room whose state `wanted` accepts.
    fn pick(&self, rng: &mut Jitter, wanted: impl Fn(InRoom) -> bool) -> Option<usize> {
        let rooms: Vec<usize> = (0..self.rooms.len())
            .filter(|&room| wanted(self.rooms[room]))
            .collect();
        (!rooms.is_empty()).then(|| rooms[rng.below(rooms.len())])
    }

    /// The `join` of a random room this connection is not in.
    fn join(&mut self, rng: &mut Jitter) -> Option<String> {
        let room = self.pick(rng, |room| room == InRoom::Out)?;
        Some(self.join_room(room))
    }

    /// The `join` of `room`, resuming with `since` if the client was in it when its last
    /// connection ended.
    fn join_room(&mut self, room: usize) -> String {
        let name = self.shared.room_name(room);
        let since = self.last_ids[room];
        self.rooms[room] = InRoom::Joining {
            resuming: since.is_some(),
        };
        bump(&self.shared.counters.joins);
        let frame = match since {
            Some(since) => serde_json::json!({"type": "join", "room": name, "since": since}),
            None => serde_json::json!({"type": "join", "room": name}),
        };
        frame.to_string()
    }

    /// The `leave` of a random joined room. A later join of it starts afresh, as a person's
    /// would: with the room's latest messages, not with all that came since.
    fn leave(&mut self, rng: &mut Jitter) -> Option<String> {
        let room = self.pick(rng, |room| room == InRoom::Joined)?;
        self.rooms[room] = InRoom::Out;
        self.last_ids[room] = None;
        bump(&self.shared.counters.leaves);
        let frame = serde_json::json!({"type": "leave", "room": self.shared.room_name(room)});
        Some(frame.to_string())
    }

    /// What one action sends: a message to one of the rooms (or, now and then or when none is
    /// joined yet, to a neighbour), and sometimes a `leave` or a `join` as well.
    fn act(&mut self, rng: &mut Jitter, index: usize, seq: u64) -> Vec<String> {
        let mut frames = Vec::with_capacity(2);
        let shared = self.shared;
        let body = format!("soak {index} {seq}");
        let room = self.pick(rng, |room| room == InRoom::Joined);
        if shared.clients > 1 && (room.is_none() || rng.next() < 0.02) {
            let n = shared.clients;
            let partner = if rng.next() < 0.5 {
                (index + 1) % n
            } else {
                (index + n - 1) % n
            };
            let to = format!("soak-{partner}");
            frames.push(serde_json::json!({"type": "direct", "to": to, "body": body}).to_string());
            self.pending += 1;
            bump(&shared.counters.directs_sent);
        } else if let Some(room) = room {
            let room = shared.room_name(room);
            frames
                .push(serde_json::json!({"type": "send", "room": room, "body": body}).to_string());
            self.pending += 1;
            bump(&shared.counters.sent);
        }
        let roll = rng.next();
        let in_rooms = self.in_rooms();
        if roll < 0.07 && in_rooms > 1 {
            frames.extend(self.leave(rng));
        } else if roll < 0.14 && in_rooms < SOAK_MAX_ROOMS.min(shared.rooms) {
            frames.extend(self.join(rng));
        }
        frames
    }

    fn history_request(&self, room: usize) -> String {
        let after = self.last_ids[room].unwrap_or(0);
        let room = self.shared.room_name(room);
        serde_json::json!({"type": "history", "room": room, "after": after, "limit": 100})
            .to_string()
    }

    /// Records message `id` of `room`: a room's ids only increase on one client, across its
    /// connections too.
    fn see(&mut self, room: usize, id: u64) {
        match self.last_ids[room] {
            Some(last) if id <= last => {
                bump(&self.shared.counters.out_of_order);
                log_error(
                    &self.shared.logged,
                    &format!(
                        "{}: {} gave id {id} after {last}",
                        self.user,
                        self.shared.room_name(room)
                    ),
                );
            }
            _ => {
                self.last_ids[room] = Some(id);
                self.shared.room_ids[room].fetch_max(id, Ordering::Relaxed);
            }
        }
    }

    /// Handles one text frame; returns what to send in answer (the next `history` page).
    fn on_text(&mut self, text: &str) -> Option<String> {
        // `member` and `member_count`, most of what a churning room sends, need no parsing.
        if text.starts_with(r#"{"type":"member"#) {
            return None;
        }
        let Ok(frame) = serde_json::from_str::<SoakFrame<'_>>(text) else {
            return None;
        };
        let counters = &self.shared.counters;
        let room = frame
            .room
            .as_deref()
            .and_then(|name| self.shared.room_index(name));
        match (frame.kind.as_ref(), room) {
            ("message", Some(room)) => {
                // A room's last messages may still come after its `leave`: not counted.
                if matches!(self.rooms[room], InRoom::Joined | InRoom::Paging) {
                    bump(&counters.received);
                    if let Some(id) = frame.id {
                        self.see(room, id);
                    }
                }
            }
            ("joined", Some(room)) => {
                let InRoom::Joining { resuming } = self.rooms[room] else {
                    return None;
                };
                for stored in frame.history.iter().flatten() {
                    self.see(room, stored.id);
                }
                // Without `since`, `more` only says that older messages exist.
                if resuming && frame.more == Some(true) {
                    self.rooms[room] = InRoom::Paging;
                    return Some(self.history_request(room));
                }
                self.rooms[room] = InRoom::Joined;
            }
            ("history", Some(room)) => {
                if self.rooms[room] != InRoom::Paging {
                    return None;
                }
                for stored in frame.messages.iter().flatten() {
                    self.see(room, stored.id);
                }
                if frame.more == Some(true) {
                    return Some(self.history_request(room));
                }
                self.rooms[room] = InRoom::Joined;
            }
            ("direct", _) => bump(&counters.directs_received),
            ("ack", _) => {
                bump(&counters.acked);
                self.pending = self.pending.saturating_sub(1);
            }
            ("error", _) => {
                bump(&counters.server_errors);
                log_error(
                    &self.shared.logged,
                    &format!("{}: server error: {text}", self.user),
                );
            }
            _ => {}
        }
        None
    }
}

/// After a write failed: counts how the server ended the connection, from its close frame if
/// that is still to be read.
async fn soak_broken(shared: &SoakShared, user: &str, mut socket: Socket) {
    let close = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Close(frame) = message {
                return Some(frame);
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    match close {
        Some(frame) => shared.server_closed(user, frame),
        None => shared.unexpected_close(user, "a write failed, and no close frame came".into()),
    }
}

/// Sends a close frame and reads until the server answers it; false if it did not within
/// [`SOAK_CLOSE_WAIT`].
async fn close_cleanly(mut socket: Socket) -> bool {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "soak: reconnecting".into(),
    };
    if socket.close(Some(frame)).await.is_err() {
        return false;
    }
    tokio::time::timeout(SOAK_CLOSE_WAIT, async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await
    .is_ok()
}

/// One connection of a soak client, from its joins to its close.
async fn soak_session(
    shared: &SoakShared,
    index: usize,
    user: &str,
    rng: &mut Jitter,
    last_ids: &mut [Option<u64>],
    mut socket: Socket,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) {
    let counters = &shared.counters;
    let mut session = SoakSession {
        shared,
        user,
        rooms: vec![InRoom::Out; shared.rooms],
        last_ids,
        pending: 0,
    };
    // Back into the rooms it was in, resuming, or into one to three new ones.
    let resumed: Vec<usize> = (0..shared.rooms)
        .filter(|&room| session.last_ids[room].is_some())
        .collect();
    let mut joins: Vec<String> = resumed
        .into_iter()
        .map(|room| session.join_room(room))
        .collect();
    if joins.is_empty() {
        for _ in 0..1 + rng.below(SOAK_MAX_ROOMS.min(shared.rooms)) {
            joins.extend(session.join(rng));
        }
    }
    let mut alive = true;
    for frame in joins {
        alive = alive && socket.feed(Message::text(frame)).await.is_ok();
    }
    if !(alive && socket.flush().await.is_ok()) {
        soak_broken(shared, user, socket).await;
        return;
    }
    let now = tokio::time::Instant::now();
    let live_until =
        now + shared.min_life + (shared.max_life - shared.min_life).mul_f64(rng.next());
    // The first action within one mean interval, so that short connections send their share.
    let mut next_action = now + shared.act_every.mul_f64(rng.next());
    let mut seq = 0u64;
    // Once set, the client means to close, and waits until then for its last acks.
    let mut closing: Option<tokio::time::Instant> = None;
    let mut clean = rng.next() < 0.5;
    loop {
        if closing.is_some() && session.pending == 0 {
            break;
        }
        let mut out = Vec::new();
        tokio::select! {
            _ = stop.changed(), if closing.is_none() => {
                // The run is over: every client closes with a close frame.
                clean = true;
                closing = Some(tokio::time::Instant::now() + SOAK_CLOSE_WAIT);
            }
            () = tokio::time::sleep_until(live_until), if closing.is_none() => {
                closing = Some(tokio::time::Instant::now() + SOAK_CLOSE_WAIT);
            }
            () = tokio::time::sleep_until(closing.unwrap_or(live_until)), if closing.is_some() => {
                counters.missing_acks.fetch_add(session.pending, Ordering::Relaxed);
                let pending = session.pending;
                log_error(
                    &shared.logged,
                    &format!("{user}: {pending} sends unacknowledged after {SOAK_CLOSE_WAIT:?}"),
                );
                break;
            }
            () = tokio::time::sleep_until(next_action), if closing.is_none() => {
                next_action += rng.around(shared.act_every);
                seq += 1;
                out = session.act(rng, index, seq);
            }
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => out.extend(session.on_text(&text)),
                Some(Ok(Message::Close(frame))) => {
                    shared.server_closed(user, frame);
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    shared.unexpected_close(user, format!("the socket broke: {error}"));
                    return;
                }
                None => {
                    shared.unexpected_close(user, "the socket ended without a close frame".into());
                    return;
                }
            },
        }
        if !out.is_empty() {
            let mut alive = true;
            for frame in out {
                alive = alive && socket.feed(Message::text(frame)).await.is_ok();
            }
            if !(alive && socket.flush().await.is_ok()) {
                soak_broken(shared, user, socket).await;
                return;
            }
        }
    }
    if clean {
        if close_cleanly(socket).await {
            bump(&counters.clean_closes);
        } else {
            shared.unexpected_close(
                user,
                format!("no answer to a close frame within {SOAK_CLOSE_WAIT:?}"),
            );
        }
    } else {
        // Dropping the socket closes the TCP connection without a close frame.
        drop(socket);
        bump(&counters.dropped_sockets);
    }
}

/// One soak client: connects, lives a while, closes, reconnects, until told to stop.
async fn soak_client(
    shared: Arc<SoakShared>,
    index: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let user = format!("soak-{index}");
    let base = &shared.urls[index % shared.urls.len()];
    let counters = &shared.counters;
    let mut rng = Jitter::new(index as u64 + 1);
    let mut last_ids = vec![None; shared.rooms];
    let first = shared
        .ramp
        .mul_f64(index as f64 / shared.clients.max(1) as f64);
    tokio::select! {
        () = tokio::time::sleep(first) => {}
        _ = stop.changed() => return,
    }
    loop {
        let stopped = *stop.borrow();
        if stopped {
            return;
        }
        let opened = tokio::time::timeout(
            Duration::from_secs(10),
            open(base, &user, shared.read_buffer),
        )
        .await
        .unwrap_or_else(|_| Err(format!("{base}: no handshake within 10 s")));
        match opened {
            Ok(socket) => {
                bump(&counters.connects);
                bump(&counters.connected);
                soak_session(
                    &shared,
                    index,
                    &user,
                    &mut rng,
                    &mut last_ids,
                    socket,
                    &mut stop,
                )
                .await;
                counters.connected.fetch_sub(1, Ordering::Relaxed);
            }
            Err(error) => {
                bump(&counters.connect_failures);
                log_error(&shared.logged, &format!("cannot connect: {error}"));
                tokio::select! {
                    () = tokio::time::sleep(rng.around(Duration::from_secs(1))) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// The server's memory and open files at one point of the soak.
struct SoakSample {
    label: &'static str,
    at: Duration,
    connected: u64,
    /// Messages the quietest room had had.
    quietest_room: u64,
    rss_kib: Option<u64>,
    fds: Option<u64>,
}

/// Open files of a process, from `/proc/PID/fd` (Linux).
fn fd_count(pid: &str) -> Option<u64> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(entries.count() as u64)
}

/// Clients join, send, leave and reconnect for `--duration-secs` while the server's memory and
/// open files are sampled.
async fn soak(args: &Args, room: String) -> std::process::ExitCode {
    if args.warmup_secs >= args.duration_secs {
        eprintln!("loadgen: --warmup-secs must be below --duration-secs");
        return std::process::ExitCode::FAILURE;
    }
    if args.rooms == 0 || args.soak_rate <= 0.0 || args.min_life_secs > args.max_life_secs {
        eprintln!(
            "loadgen: soak needs --rooms > 0, --soak-rate > 0 and --min-life-secs <= --max-life-secs"
        );
        return std::process::ExitCode::FAILURE;
    }
    let clients = args.clients.max(1);
    let per_client = args.soak_rate / clients as f64;
    if per_client > 2.0 {
        eprintln!(
            "loadgen: each client would send {per_client:.1} messages/s (--soak-rate / --clients); the server's default rate limit is 10 frames/s"
        );
    }
    let pid = args.server_pid.map(|pid| pid.to_string());
    let start = tokio::time::Instant::now();
    let probe = |label: &'static str, shared: Option<&SoakShared>| SoakSample {
        label,
        at: start.elapsed(),
        connected: shared.map_or(0, |shared| count(&shared.counters.connected)),
        quietest_room: shared.map_or(0, SoakShared::quietest_room),
        rss_kib: pid.as_deref().and_then(rss_kib),
        fds: pid.as_deref().and_then(fd_count),
    };
    let mut samples = vec![probe("start", None)];
    match &pid {
        Some(_) if samples[0].rss_kib.is_none() || samples[0].fds.is_none() => eprintln!(
            "loadgen: cannot read the server's VmRSS or open files from /proc (--server-pid)"
        ),
        Some(_) => {}
        None => eprintln!("loadgen: no --server-pid: no memory or open-file figures, no verdict"),
    }
    let cpu = CpuMeter::start(args.server_pid);
    let duration = Duration::from_secs(args.duration_secs);
    let warmup = Duration::from_secs(args.warmup_secs);
    let shared = Arc::new(SoakShared {
        urls: args.url.clone(),
        room_prefix: format!("{room}-"),
        rooms: args.rooms,
        clients,
        act_every: Duration::from_secs_f64(clients as f64 / args.soak_rate),
        min_life: Duration::from_secs(args.min_life_secs),
        max_life: Duration::from_secs(args.max_life_secs),
        ramp: Duration::from_secs(10).min(warmup / 2),
        read_buffer: args.read_buffer,
        counters: SoakCounters::default(),
        room_ids: (0..args.rooms).map(|_| AtomicU64::new(0)).collect(),
        logged: AtomicU64::new(0),
        first_unexpected: std::sync::Mutex::new(None),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..clients)
        .map(|i| tokio::spawn(soak_client(Arc::clone(&shared), i, stop_rx.clone())))
        .collect();
    let every = Duration::from_secs(args.sample_secs.max(1));
    let mut server_gone = false;
    // Whether every room had had `--server-retention` messages by the end of the warm-up.
    let mut store_full = None;
    let mut at = warmup;
    loop {
        tokio::time::sleep_until(start + at).await;
        let label = if at == warmup {
            "after warm-up"
        } else if at >= duration {
            "end"
        } else {
            "running"
        };
        let sample = probe(label, Some(&shared));
        if at == warmup {
            match args.server_retention {
                Some(retention) if sample.quietest_room < retention => {
                    store_full = Some(false);
                    eprintln!(
                        "loadgen: after the warm-up the quietest room has had {} messages, fewer than the server keeps (--server-retention {retention}): its history still grows, by design, and that counts against the verdict; warm up longer (about --rooms x retention / --soak-rate s)",
                        sample.quietest_room
                    );
                }
                Some(_) => store_full = Some(true),
                None => {}
            }
        }
        let gone = pid.is_some() && sample.rss_kib.is_none();
        let c = &shared.counters;
        eprintln!(
            "loadgen soak: {:>4.0} s {label}: {} connected, server RSS {} KiB, {} fds; {} connects, {} sent, {} acked, {} received, {} errors, {} unexpected closes; quietest room: {} messages",
            sample.at.as_secs_f64(),
            sample.connected,
            sample.rss_kib.map_or("-".to_owned(), |kib| kib.to_string()),
            sample.fds.map_or("-".to_owned(), |fds| fds.to_string()),
            count(&c.connects),
            count(&c.sent) + count(&c.directs_sent),
            count(&c.acked),
            count(&c.received) + count(&c.directs_received),
            count(&c.server_errors) + count(&c.connect_failures),
            count(&c.unexpected_closes),
            sample.quietest_room,
        );
        samples.push(sample);
        if gone {
            eprintln!("loadgen: the server (--server-pid) has exited; stopping");
            server_gone = true;
            break;
        }
        if at >= duration {
            break;
        }
        at = (at + every).min(duration);
    }
    let warm_at = 1.min(samples.len() - 1);
    let end_at = samples.len() - 1;
    let _ = stop_tx.send(true);
    let mut panicked = 0u64;
    for task in tasks {
        if task.await.is_err() {
            panicked += 1;
        }
    }
    let closed_in = start.elapsed().saturating_sub(duration);
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    samples.push(probe("after close", Some(&shared)));
    let (server_cpu, own_cpu) = cpu.used();
    let own_rss = rss_kib("self");

    let c = &shared.counters;
    // RSS moves in the allocator's steps (mimalloc reserves and returns memory a few MiB at a
    // time), so one sample against another reads a step as growth or shrinkage. The verdict
    // compares the highest RSS of the minute after the warm-up with the highest of the run's
    // last minute: a step shows in both, a leak only in the second.
    let window = Duration::from_secs(60);
    let peak = |from: Duration, to: Duration| {
        samples[warm_at..=end_at]
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .filter_map(|s| s.rss_kib)
            .max()
    };
    let warm = samples[warm_at].at;
    let end = samples[end_at].at;
    let (rss_warm, rss_end) = (
        peak(warm, (warm + window).min(end)),
        peak(end.saturating_sub(window).max(warm), end),
    );
    let growth = match (rss_warm, rss_end) {
        (Some(warm), Some(end)) if warm > 0 => {
            Some((end as f64 - warm as f64) * 100.0 / warm as f64)
        }
        _ => None,
    };
    let within = growth.map(|growth| growth <= 10.0);
    let sent = count(&c.sent) + count(&c.directs_sent);
    let per_second = sent as f64 / duration.as_secs_f64();
    let first_unexpected = shared
        .first_unexpected
        .lock()
        .ok()
        .and_then(|first| first.clone());
    let show = |value: Option<u64>| value.map_or("-".to_owned(), |value| value.to_string());
    println!(
        "loadgen soak: {clients} clients over {} server(s) for {} s (warm-up {} s), {} rooms, {} msg/s asked, connections living {}-{} s",
        args.url.len(),
        args.duration_secs,
        args.warmup_secs,
        args.rooms,
        args.soak_rate,
        args.min_life_secs,
        args.max_life_secs,
    );
    println!("| point | at s | connected | messages in the quietest room | server RSS KiB | server open files |");
    println!("|---|---|---|---|---|---|");
    for sample in &samples {
        println!(
            "| {} | {:.0} | {} | {} | {} | {} |",
            sample.label,
            sample.at.as_secs_f64(),
            sample.connected,
            sample.quietest_room,
            show(sample.rss_kib),
            show(sample.fds),
        );
    }
    println!();
    println!("| connects | connect failures | sent (room + direct) | msg/s | acked | missing acks | received (room + direct) | joins | leaves | clean closes | dropped sockets | server closes 1000/1001 | unexpected closes | server errors | out of order | server CPU s | loadgen CPU s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} + {} | {per_second:.0} | {} | {} | {} + {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        count(&c.connects),
        count(&c.connect_failures),
        count(&c.sent),
        count(&c.directs_sent),
        count(&c.acked),
        count(&c.missing_acks),
        count(&c.received),
        count(&c.directs_received),
        count(&c.joins),
        count(&c.leaves),
        count(&c.clean_closes),
        count(&c.dropped_sockets),
        count(&c.server_closes),
        count(&c.unexpected_closes),
        count(&c.server_errors),
        count(&c.out_of_order),
        cell(server_cpu, 1),
        cell(own_cpu, 1),
    );
    let verdict = match (within, growth) {
        (Some(within), Some(growth)) => {
            format!("{} ({growth:+.1}%)", if within { "yes" } else { "no" })
        }
        _ if pid.is_none() => "unknown (no --server-pid)".to_owned(),
        _ => "unknown (the server's memory could not be read)".to_owned(),
    };
    println!(
        "RSS at end within 10% of after warm-up (the highest sample of the last minute against the highest of the minute after the warm-up): {verdict}"
    );
    let mut failures = Vec::new();
    if server_gone {
        failures.push("the server exited during the run".to_owned());
    } else if pid.is_some() && within.is_none() {
        failures.push("the server's memory could not be read".to_owned());
    }
    if within == Some(false) {
        failures.push("RSS at end more than 10% above after warm-up".to_owned());
    }
    for (what, value) in [
        ("unexpected closes", count(&c.unexpected_closes)),
        ("server errors", count(&c.server_errors)),
        ("connect failures", count(&c.connect_failures)),
        ("missing acks", count(&c.missing_acks)),
        ("ids out of order", count(&c.out_of_order)),
        ("clients that panicked", panicked),
    ] {
        if value > 0 {
            failures.push(format!("{value} {what}"));
        }
    }
    if let Some(reason) = &first_unexpected {
        eprintln!("loadgen: first unexpected close: {reason}");
    }
    let sample_json: Vec<_> = samples
        .iter()
        .map(|sample| {
            serde_json::json!({
                "point": sample.label, "at_s": sample.at.as_secs_f64(),
                "connected": sample.connected, "quietest_room": sample.quietest_room,
                "rss_kib": sample.rss_kib, "fds": sample.fds,
            })
        })
        .collect();
    let after_close = samples.len() - 1;
    // In two parts: one `json!` of all of it goes past the macro recursion limit.
    let mut report = serde_json::json!({
        "mode": "soak",
        "clients": clients, "servers": args.url.len(), "duration_s": args.duration_secs,
        "warmup_s": args.warmup_secs, "rooms": args.rooms, "soak_rate": args.soak_rate,
        "min_life_s": args.min_life_secs, "max_life_s": args.max_life_secs,
        "connects": count(&c.connects), "connect_failures": count(&c.connect_failures),
        "sent": count(&c.sent), "directs_sent": count(&c.directs_sent),
        "messages_per_s": per_second, "acked": count(&c.acked),
        "missing_acks": count(&c.missing_acks), "received": count(&c.received),
        "directs_received": count(&c.directs_received), "joins": count(&c.joins),
        "leaves": count(&c.leaves), "clean_closes": count(&c.clean_closes),
        "dropped_sockets": count(&c.dropped_sockets),
        "server_closes": count(&c.server_closes),
        "unexpected_closes": count(&c.unexpected_closes),
        "first_unexpected_close": first_unexpected,
        "server_errors": count(&c.server_errors), "out_of_order": count(&c.out_of_order),
        "panicked": panicked, "closed_in_s": closed_in.as_secs_f64(),
        "server_gone": server_gone, "server_retention": args.server_retention,
        "store_full_at_warmup": store_full,
    });
    let memory = serde_json::json!({
        "server_rss_start_kib": samples[0].rss_kib, "server_rss_warm_kib": rss_warm,
        "server_rss_end_kib": rss_end, "server_rss_after_close_kib": samples[after_close].rss_kib,
        "server_fds_start": samples[0].fds, "server_fds_warm": samples[warm_at].fds,
        "server_fds_end": samples[end_at].fds, "server_fds_after_close": samples[after_close].fds,
        "rss_growth_pct": growth, "rss_within_10pct": within,
        "server_cpu_s": server_cpu, "loadgen_cpu_s": own_cpu, "loadgen_rss_kib": own_rss,
        "samples": sample_json, "failures": failures,
    });
    if let (Some(report), serde_json::Value::Object(memory)) = (report.as_object_mut(), memory) {
        report.extend(memory);
    }
    println!("{report}");
    if failures.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("loadgen soak: failed: {}", failures.join(", "));
        std::process::ExitCode::FAILURE
    }
}
