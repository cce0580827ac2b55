//! Fan-out throughput: one `group_send` to 1, 100, 1,000 and 10,000 members of the in-memory
//! channel layer, beside a raw `tokio::sync::broadcast` doing the same delivery (one send, every
//! receiver takes the message) in the same run, so the ratio to that floor is visible.
//!
//! Run with `cargo bench --bench fanout`. Each receiver is a task of its own, parked in
//! `recv().await` as a connection's is, so a delivery pays what it pays a connection: the push,
//! waking the parked task, the task's turn on the runtime and its receive. Each iteration sends
//! one message and waits until every receiver has taken it, so the time per iteration is the full
//! cost of delivering to the whole group; the reported throughput is deliveries per second. Both
//! sides use the same tasks, counters and wake-up of the sender, so the ratio compares the
//! channels and not the harness. Every run checks, in release builds too, that each send reached
//! every member and that each receiver took exactly one message per send: a bench that delivers
//! to fewer members would otherwise look faster.
//!
//! After criterion's own report the bench prints a table per group size: each side's time per
//! iteration as criterion estimated it (the slope over its samples, the middle number of its
//! `time:` line), and ours/broadcast as a ratio of throughputs (1.0 would be as fast as
//! broadcast). Criterion measures the two sides one after the other, so on a busy machine a burst
//! of load can land on one side only; the table therefore also gives the same ratio measured
//! interleaved, on a fresh group and channel: the two sides alternate in short rounds and the
//! median round counts, which such bursts move much less.

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_core::layer::{ChannelLayer, InMemoryChannelLayer, LayerConfig, Subscription};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use tokio::runtime::Runtime;
use tokio::sync::{broadcast, Notify};
use tokio::task::JoinHandle;

const SIZES: [usize; 4] = [1, 100, 1_000, 10_000];

/// Criterion's samples per benchmark.
const SAMPLES: usize = 20;

/// Rounds of the interleaved comparison, and the deliveries each side makes per round.
const ROUNDS: usize = 15;
const ROUND_DELIVERIES: usize = 200_000;

/// A run whose deliveries have not all been taken by then has lost some: it fails rather than
/// hang.
const STALL: Duration = Duration::from_secs(60);

/// Every (iterations, time) criterion measured, warm-up first, per (side, members).
type Measured = BTreeMap<(&'static str, usize), Vec<(u64, Duration)>>;

static MEASURED: Mutex<Measured> = Mutex::new(BTreeMap::new());

fn record(side: &'static str, members: usize, elapsed: Duration, iters: u64) {
    let mut measured = MEASURED.lock().unwrap();
    measured
        .entry((side, members))
        .or_default()
        .push((iters, elapsed));
}

/// Criterion's estimate of the time per iteration: the least-squares slope, through the origin,
/// of time over iterations across its samples (the last `SAMPLES` calls; the warm-up comes
/// first).
fn slope(calls: &[(u64, Duration)]) -> f64 {
    let samples = &calls[calls.len().saturating_sub(SAMPLES)..];
    let xy: f64 = samples
        .iter()
        .map(|&(iters, time)| iters as f64 * time.as_secs_f64())
        .sum();
    let xx: f64 = samples
        .iter()
        .map(|&(iters, _)| (iters as f64).powi(2))
        .sum();
    xy / xx
}

/// A typical chat frame, encoded once.
fn payload() -> Bytes {
    Bytes::from_static(
        br#"{"type":"message","room":"lobby","id":123456,"from":"alice","body":"hello, everyone in the room","ts":1764000000000}"#,
    )
}

/// What the receiver tasks of one side share with its sender.
struct Tally {
    /// Messages each receiver has taken.
    taken: Vec<AtomicU64>,
    /// Receivers yet to take the message being delivered.
    pending: AtomicUsize,
    /// A receiver saw its channel end or fall behind.
    broken: AtomicBool,
    /// Wakes the sender when `pending` reaches zero (or a receiver broke).
    done: Notify,
}

impl Tally {
    fn took(&self, receiver: usize) {
        self.taken[receiver].fetch_add(1, Ordering::Relaxed);
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    fn broke(&self) {
        self.broken.store(true, Ordering::Release);
        self.done.notify_one();
    }
}

/// One task per receiver, parked in `recv().await` between messages.
struct Receivers {
    side: &'static str,
    tally: Arc<Tally>,
    tasks: Vec<JoinHandle<()>>,
}

impl Receivers {
    /// Spawns a task per receiver; `receive` is its loop, given the tally and its index.
    fn spawn<R, Fut>(
        rt: &Runtime,
        side: &'static str,
        receivers: Vec<R>,
        receive: fn(R, Arc<Tally>, usize) -> Fut,
    ) -> Self
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tally = Arc::new(Tally {
            taken: receivers.iter().map(|_| AtomicU64::new(0)).collect(),
            pending: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
            done: Notify::new(),
        });
        let tasks = receivers
            .into_iter()
            .enumerate()
            .map(|(i, receiver)| rt.spawn(receive(receiver, Arc::clone(&tally), i)))
            .collect();
        Self { side, tally, tasks }
    }

    fn members(&self) -> usize {
        self.tally.taken.len()
    }

    /// `iters` times: `send` one message (it returns how many receivers it reached), then wait
    /// until every receiver has taken it. Returns the time that took, after checking that every
    /// receiver took exactly `iters` messages.
    fn run<F, Fut>(&self, rt: &Runtime, iters: u64, mut send: F) -> Duration
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = usize>,
    {
        let (side, members, tally) = (self.side, self.members(), &*self.tally);
        let before: Vec<u64> = tally
            .taken
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .collect();
        let deliveries = async {
            let start = Instant::now();
            for _ in 0..iters {
                tally.pending.store(members, Ordering::Release);
                let reached = send().await;
                assert_eq!(
                    reached, members,
                    "{side}: a send reached {reached} of {members} receivers"
                );
                tally.done.notified().await;
                assert!(
                    !tally.broken.load(Ordering::Acquire),
                    "{side}: a receiver's channel ended or fell behind"
                );
            }
            start.elapsed()
        };
        let elapsed = rt.block_on(async { tokio::time::timeout(STALL, deliveries).await });
        let taken: Vec<u64> = tally
            .taken
            .iter()
            .zip(&before)
            .map(|(t, before)| t.load(Ordering::Relaxed) - before)
            .collect();
        let Ok(elapsed) = elapsed else {
            let total: u64 = taken.iter().sum();
            panic!(
                "{side}: deliveries stalled: {total} of {} taken within {STALL:?}",
                iters * members as u64
            );
        };
        if let Some((receiver, got)) = taken.iter().enumerate().find(|(_, &got)| got != iters) {
            panic!("{side}: receiver {receiver} took {got} messages of {iters} sent");
        }
        elapsed
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A connection's receive: the layer's subscription, awaited.
async fn receive_layer(mut sub: Subscription, tally: Arc<Tally>, i: usize) {
    while let Some(message) = sub.recv().await {
        std::hint::black_box(message);
        tally.took(i);
    }
    tally.broke();
}

/// The floor's receive: a broadcast receiver, awaited.
async fn receive_broadcast(mut rx: broadcast::Receiver<Bytes>, tally: Arc<Tally>, i: usize) {
    while let Ok(message) = rx.recv().await {
        std::hint::black_box(message);
        tally.took(i);
    }
    // Closed, or lagged: either way a delivery was lost.
    tally.broke();
}

/// The layer and its receivers: `members` channels, all in the group "room".
struct LayerSide {
    layer: InMemoryChannelLayer,
    receivers: Receivers,
}

fn layer_side(rt: &Runtime, members: usize) -> LayerSide {
    let layer = InMemoryChannelLayer::new(LayerConfig::default());
    let subs = rt.block_on(async {
        let mut subs = Vec::with_capacity(members);
        for _ in 0..members {
            let sub = layer.new_channel("bench").await.unwrap();
            layer.group_add("room", sub.name()).await.unwrap();
            subs.push(sub);
        }
        subs
    });
    let receivers = Receivers::spawn(rt, "ours", subs, receive_layer);
    LayerSide { layer, receivers }
}

/// A broadcast channel and `members` receivers of it.
struct BroadcastSide {
    tx: broadcast::Sender<Bytes>,
    receivers: Receivers,
}

fn broadcast_side(rt: &Runtime, members: usize) -> BroadcastSide {
    let (tx, _) = broadcast::channel::<Bytes>(16);
    let receivers = (0..members).map(|_| tx.subscribe()).collect();
    let receivers = Receivers::spawn(rt, "broadcast", receivers, receive_broadcast);
    BroadcastSide { tx, receivers }
}

/// `iters` deliveries of one message to the whole group through the layer.
fn run_layer(rt: &Runtime, side: &LayerSide, iters: u64) -> Duration {
    let message = payload();
    let layer = &side.layer;
    side.receivers.run(rt, iters, || {
        let message = message.clone();
        async move { layer.group_send("room", message).await.unwrap().delivered }
    })
}

/// `iters` deliveries of one message to every receiver through the broadcast channel.
fn run_broadcast(rt: &Runtime, side: &BroadcastSide, iters: u64) -> Duration {
    let message = payload();
    let tx = &side.tx;
    side.receivers.run(rt, iters, || {
        let reached = tx.send(message.clone()).unwrap();
        async move { reached }
    })
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn fanout(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("fanout");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    group.sample_size(SAMPLES);

    for &members in &SIZES {
        group.throughput(Throughput::Elements(members as u64));

        let ours = layer_side(&rt, members);
        group.bench_function(BenchmarkId::new("group_send", members), |b| {
            b.iter_custom(|iters| {
                let elapsed = run_layer(&rt, &ours, iters);
                record("ours", members, elapsed, iters);
                elapsed
            });
        });
        drop(ours);

        let floor = broadcast_side(&rt, members);
        group.bench_function(BenchmarkId::new("tokio_broadcast_floor", members), |b| {
            b.iter_custom(|iters| {
                let elapsed = run_broadcast(&rt, &floor, iters);
                record("broadcast", members, elapsed, iters);
                elapsed
            });
        });
        drop(floor);
    }
    group.finish();
}

/// The median of the per-round throughput ratios, ours over broadcast, the two sides alternating.
fn interleaved_ratio(rt: &Runtime, members: usize) -> f64 {
    let ours = layer_side(rt, members);
    let floor = broadcast_side(rt, members);
    let iters = (ROUND_DELIVERIES / members).max(1) as u64;
    // One round each to warm up.
    run_layer(rt, &ours, iters);
    run_broadcast(rt, &floor, iters);
    let mut ratios: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let ours = run_layer(rt, &ours, iters);
            let floor = run_broadcast(rt, &floor, iters);
            floor.as_secs_f64() / ours.as_secs_f64()
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

/// Prints, per group size that ran, both sides' time per iteration and the ratios.
fn report() {
    let measured = MEASURED.lock().unwrap().clone();
    let rt = runtime();
    println!();
    println!("fan-out, ours (InMemoryChannelLayer::group_send) vs tokio::sync::broadcast:");
    println!(
        "{:>8}  {:>14}  {:>14}  {:>16}  {:>18}",
        "members", "ours/iter", "broadcast/iter", "ours / broadcast", "interleaved ratio"
    );
    for &members in &SIZES {
        let (Some(ours), Some(floor)) = (
            measured.get(&("ours", members)),
            measured.get(&("broadcast", members)),
        ) else {
            continue;
        };
        let (ours, floor) = (slope(ours), slope(floor));
        println!(
            "{members:>8}  {:>11.2} µs  {:>11.2} µs  {:>15.2}x  {:>17.2}x",
            ours * 1e6,
            floor * 1e6,
            floor / ours,
            interleaved_ratio(&rt, members),
        );
    }
}

criterion_group!(benches, fanout);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    report();
}
