//! Fan-out throughput: one `group_send` to 1, 100, 1,000 and 10,000 members of the in-memory
//! channel layer, beside a raw `tokio::sync::broadcast` doing the same delivery (one send, every
//! receiver takes the message) in the same run, so the ratio to that floor is visible.
//!
//! Run with `cargo bench --bench fanout`. Each iteration sends one message and drains it from every
//! recipient, so the time per iteration is the full cost of delivering to the whole group; the
//! reported throughput is deliveries per second.

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_core::layer::{ChannelLayer, InMemoryChannelLayer, LayerConfig, Subscription};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZES: [usize; 4] = [1, 100, 1_000, 10_000];

/// A typical chat frame, encoded once.
fn payload() -> Bytes {
    Bytes::from_static(
        br#"{"type":"message","room":"lobby","id":123456,"from":"alice","body":"hello, everyone in the room","ts":1764000000000}"#,
    )
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("fanout");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    group.sample_size(20);

    for &members in &SIZES {
        group.throughput(Throughput::Elements(members as u64));

        let layer = InMemoryChannelLayer::new(LayerConfig::default());
        let mut subs: Vec<Subscription> = rt.block_on(async {
            let mut subs = Vec::with_capacity(members);
            for _ in 0..members {
                let sub = layer.new_channel("bench").await.unwrap();
                layer.group_add("room", sub.name()).await.unwrap();
                subs.push(sub);
            }
            subs
        });
        group.bench_function(BenchmarkId::new("group_send", members), |b| {
            b.iter_custom(|iters| {
                let message = payload();
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let report = layer.group_send("room", message.clone()).await.unwrap();
                        debug_assert_eq!(report.delivered, members);
                        for sub in &mut subs {
                            std::hint::black_box(sub.try_recv());
                        }
                    }
                    start.elapsed()
                })
            });
        });
        drop(subs);

        let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(16);
        let mut receivers: Vec<_> = (0..members).map(|_| tx.subscribe()).collect();
        group.bench_function(BenchmarkId::new("tokio_broadcast_floor", members), |b| {
            b.iter_custom(|iters| {
                let message = payload();
                let start = Instant::now();
                for _ in 0..iters {
                    tx.send(message.clone()).unwrap();
                    for rx in &mut receivers {
                        std::hint::black_box(rx.try_recv().ok());
                    }
                }
                start.elapsed()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
