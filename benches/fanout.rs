//! Fan-out throughput: one `group_send` to 1, 100, 1,000 and 10,000 members of the in-memory
//! channel layer, beside a raw `tokio::sync::broadcast` doing the same delivery (one send, every
//! receiver takes the message) in the same run, so the ratio to that floor is visible.
//!
//! Run with `cargo bench --bench fanout`. Each iteration sends one message and drains it from every
//! recipient, so the time per iteration is the full cost of delivering to the whole group; the
//! reported throughput is deliveries per second.
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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_core::layer::{ChannelLayer, InMemoryChannelLayer, LayerConfig, Subscription};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use tokio::runtime::Runtime;
use tokio::sync::broadcast;

const SIZES: [usize; 4] = [1, 100, 1_000, 10_000];

/// Criterion's samples per benchmark.
const SAMPLES: usize = 20;

/// Rounds of the interleaved comparison, and the deliveries each side makes per round.
const ROUNDS: usize = 15;
const ROUND_DELIVERIES: usize = 200_000;

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

/// A group of `members` channels of a fresh layer, all in the group "room".
fn layer_group(rt: &Runtime, members: usize) -> (InMemoryChannelLayer, Vec<Subscription>) {
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
    (layer, subs)
}

/// `iters` deliveries of one message to the whole group through the layer.
fn run_layer(
    rt: &Runtime,
    layer: &InMemoryChannelLayer,
    subs: &mut [Subscription],
    iters: u64,
) -> Duration {
    let message = payload();
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let report = layer.group_send("room", message.clone()).await.unwrap();
            debug_assert_eq!(report.delivered, subs.len());
            for sub in subs.iter_mut() {
                std::hint::black_box(sub.try_recv());
            }
        }
        start.elapsed()
    })
}

/// `iters` deliveries of one message to every receiver through a raw broadcast channel.
fn run_broadcast(
    tx: &broadcast::Sender<Bytes>,
    receivers: &mut [broadcast::Receiver<Bytes>],
    iters: u64,
) -> Duration {
    let message = payload();
    let start = Instant::now();
    for _ in 0..iters {
        tx.send(message.clone()).unwrap();
        for rx in receivers.iter_mut() {
            std::hint::black_box(rx.try_recv().ok());
        }
    }
    start.elapsed()
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

        let (layer, mut subs) = layer_group(&rt, members);
        group.bench_function(BenchmarkId::new("group_send", members), |b| {
            b.iter_custom(|iters| {
                let elapsed = run_layer(&rt, &layer, &mut subs, iters);
                record("ours", members, elapsed, iters);
                elapsed
            });
        });
        drop(subs);

        let (tx, _) = broadcast::channel::<Bytes>(16);
        let mut receivers: Vec<_> = (0..members).map(|_| tx.subscribe()).collect();
        group.bench_function(BenchmarkId::new("tokio_broadcast_floor", members), |b| {
            b.iter_custom(|iters| {
                let elapsed = run_broadcast(&tx, &mut receivers, iters);
                record("broadcast", members, elapsed, iters);
                elapsed
            });
        });
    }
    group.finish();
}

/// The median of the per-round throughput ratios, ours over broadcast, the two sides alternating.
fn interleaved_ratio(rt: &Runtime, members: usize) -> f64 {
    let (layer, mut subs) = layer_group(rt, members);
    let (tx, _) = broadcast::channel::<Bytes>(16);
    let mut receivers: Vec<_> = (0..members).map(|_| tx.subscribe()).collect();
    let iters = (ROUND_DELIVERIES / members).max(1) as u64;
    // One round each to warm up.
    run_layer(rt, &layer, &mut subs, iters);
    run_broadcast(&tx, &mut receivers, iters);
    let mut ratios: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let ours = run_layer(rt, &layer, &mut subs, iters);
            let floor = run_broadcast(&tx, &mut receivers, iters);
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
