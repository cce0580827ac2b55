//! Acknowledged appends per second: the in-memory, SQLite and PostgreSQL stores, with 1 and
//! with 100 concurrent senders, all into one room, each append carrying a `ref` as the page's do.
//! An append counts once the store has answered it, which for SQLite and PostgreSQL is after
//! its commit is on disk (`synchronous = FULL`; PostgreSQL's `fsync`, on by default).
//!
//! ```sh
//! cargo bench --bench store_append                                   # memory and SQLite
//! CHAT_DATABASE_URL=postgres://postgres@localhost/bench cargo bench --bench store_append
//! ```
//!
//! PostgreSQL comes from `CHAT_DATABASE_URL` (or `CHAT_TEST_DATABASE_URL`, which
//! `scripts/postgres-for-tests.sh` sets); without either it is left out, and says so. It works
//! in a schema of its own, `bench_<pid>`, dropped at the end. SQLite writes to a file
//! in the system's temporary directory.

#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_core::store::{
    Conversation, HistoryStore, InMemoryHistoryStore, NewMessage, PostgresHistoryStore,
    SqliteHistoryStore, StoreConfig,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// (senders, appends each per iteration)
const SHAPES: [(usize, usize); 2] = [(1, 200), (100, 20)];

/// Appends `each` messages from each of `senders` concurrent senders; every one must be acked.
async fn append_all(store: &Arc<dyn HistoryStore>, senders: usize, each: usize, round: u64) {
    let tasks: Vec<_> = (0..senders)
        .map(|sender| {
            let store = Arc::clone(store);
            tokio::spawn(async move {
                let room = Conversation::room("bench");
                let from = format!("sender{sender}");
                for i in 0..each {
                    // As the page makes them: the time, then something unique.
                    let ts = now_ms();
                    let reference = format!("{ts:x}-{round}-{i}");
                    let message = NewMessage {
                        from: &from,
                        to: None,
                        body: "a typical message of a few dozen characters",
                        ts,
                        reference: Some(&reference),
                    };
                    let appended = store.append(&room, message).await.unwrap();
                    assert!(!appended.duplicate);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Leaves the database as the benchmark found it.
async fn drop_schema(url: &str, schema: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

fn store_append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("chat-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut stores: Vec<(&str, Arc<dyn HistoryStore>)> = vec![(
        "memory",
        Arc::new(InMemoryHistoryStore::with_config(StoreConfig::default())),
    )];
    let sqlite = rt
        .block_on(SqliteHistoryStore::open(
            dir.join("bench.db"),
            StoreConfig::default(),
        ))
        .unwrap();
    stores.push(("sqlite", Arc::new(sqlite)));
    let postgres = std::env::var("CHAT_DATABASE_URL")
        .or_else(|_| std::env::var("CHAT_TEST_DATABASE_URL"))
        .ok();
    let schema = format!("bench_{}", std::process::id());
    match &postgres {
        Some(url) => {
            let store = rt
                .block_on(PostgresHistoryStore::connect(
                    url,
                    &schema,
                    StoreConfig::default(),
                ))
                .unwrap();
            stores.push(("postgres", Arc::new(store)));
        }
        None => {
            println!("store_append: set CHAT_DATABASE_URL=postgres://... to measure PostgreSQL too")
        }
    }

    let round = AtomicU64::new(0);
    let mut group = c.benchmark_group("store_append");
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_millis(500));
    group.sample_size(10);
    for (name, store) in &stores {
        for (senders, each) in SHAPES {
            group.throughput(Throughput::Elements((senders * each) as u64));
            let id = BenchmarkId::new(*name, format!("{senders}_senders"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let round = round.fetch_add(1, Ordering::Relaxed);
                            append_all(store, senders, each, round).await;
                        }
                        start.elapsed()
                    })
                });
            });
        }
    }
    group.finish();
    drop(stores);
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(url) = postgres {
        rt.block_on(drop_schema(&url, &schema));
    }
}

criterion_group!(benches, store_append);
criterion_main!(benches);
