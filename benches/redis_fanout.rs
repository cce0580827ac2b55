//! The Redis channel layer's fan-out: one `group_send` to 1,000 members split over two layer
//! instances (two nodes) on a real Redis, and what it costs Redis.
//!
//! ```sh
//! CHAT_REDIS_URL=redis://127.0.0.1:6379 cargo bench --bench redis_fanout
//! ```
//!
//! The Redis comes from `CHAT_REDIS_URL` (or `CHAT_TEST_REDIS_URL`, which `scripts/test.sh` sets);
//! without either it says so and measures nothing. Keys go under a prefix of the bench's own.
//!
//! It prints, before criterion's timings, the Redis commands each `group_send` caused, read from
//! `INFO commandstats` around 1,000 sends: the design promises one `PUBLISH` per other node with
//! members, not one per member.
//!
//! - `sequential`: one message, then every member (both nodes) receives it; the time is the
//!   whole delivery, including the Redis round trip and the pub/sub hop.
//! - `burst_of_100`: 100 messages back to back, then every member drains them.

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_core::layer::{ChannelLayer, LayerConfig, RedisChannelLayer, Subscription};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const MEMBERS_PER_NODE: usize = 500;
const BURST: usize = 100;

fn payload() -> Bytes {
    Bytes::from_static(
        br#"{"type":"message","room":"lobby","id":123456,"from":"alice","body":"hello, everyone in the room","ts":1764000000000}"#,
    )
}

fn redis_url() -> Option<String> {
    std::env::var("CHAT_REDIS_URL")
        .or_else(|_| std::env::var("CHAT_TEST_REDIS_URL"))
        .ok()
}

/// `cmdstat_<name>` -> calls, from `INFO commandstats`.
async fn command_calls(url: &str) -> BTreeMap<String, u64> {
    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

struct Setup {
    sender: RedisChannelLayer,
    // The second node must live as long as its members.
    _other: RedisChannelLayer,
    local: Vec<Subscription>,
    remote: Vec<Subscription>,
}

async fn setup(url: &str) -> Setup {
    let prefix = format!("chat-bench-{}", std::process::id());
    // Room for a whole burst in every member's queue.
    let config = LayerConfig::default().with_capacity(BURST * 2);
    let sender = RedisChannelLayer::connect(&[url], &prefix, config.clone())
        .await
        .unwrap();
    let other = RedisChannelLayer::connect(&[url], &prefix, config)
        .await
        .unwrap();
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for _ in 0..MEMBERS_PER_NODE {
        let sub = sender.new_channel("bench").await.unwrap();
        sender.group_add("room", sub.name()).await.unwrap();
        local.push(sub);
        let sub = other.new_channel("bench").await.unwrap();
        other.group_add("room", sub.name()).await.unwrap();
        remote.push(sub);
    }
    Setup {
        sender,
        _other: other,
        local,
        remote,
    }
}

/// Sends `count` messages, then waits until every member has all of them.
async fn deliver(setup: &mut Setup, count: usize) {
    for _ in 0..count {
        let report = setup.sender.group_send("room", payload()).await.unwrap();
        assert_eq!((report.delivered, report.forwarded), (MEMBERS_PER_NODE, 1));
    }
    for sub in setup.local.iter_mut().chain(setup.remote.iter_mut()) {
        for _ in 0..count {
            let message = tokio::time::timeout(Duration::from_secs(10), sub.recv()).await;
            assert!(matches!(message, Ok(Some(_))), "a member missed a message");
        }
    }
}

fn redis_fanout(c: &mut Criterion) {
    let Some(url) = redis_url() else {
        println!("redis_fanout: set CHAT_REDIS_URL=redis://HOST:PORT to measure the Redis layer");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut setup = rt.block_on(setup(&url));

    // What one group_send costs Redis.
    let sends = 1_000;
    let before = rt.block_on(command_calls(&url));
    rt.block_on(async {
        for _ in 0..sends / BURST {
            deliver(&mut setup, BURST).await;
        }
    });
    let after = rt.block_on(command_calls(&url));
    let per_send: Vec<String> = after
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "ping"))
        .filter_map(|(name, calls)| {
            let delta = calls - before.get(name).copied().unwrap_or(0);
            (delta > 0).then(|| format!("{name} {:.2}", delta as f64 / sends as f64))
        })
        .collect();
    println!(
        "redis_fanout: Redis commands per group_send to {} members on 2 nodes: {}",
        2 * MEMBERS_PER_NODE,
        per_send.join(", ")
    );

    let mut group = c.benchmark_group("redis_fanout");
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_millis(500));
    group.sample_size(10);
    let members = 2 * MEMBERS_PER_NODE;
    group.throughput(Throughput::Elements(members as u64));
    group.bench_function(BenchmarkId::new("sequential", members), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    deliver(&mut setup, 1).await;
                }
                start.elapsed()
            })
        });
    });
    group.throughput(Throughput::Elements((members * BURST) as u64));
    group.bench_function(BenchmarkId::new("burst_of_100", members), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    deliver(&mut setup, BURST).await;
                }
                start.elapsed()
            })
        });
    });
    group.finish();
}

criterion_group!(benches, redis_fanout);
criterion_main!(benches);
