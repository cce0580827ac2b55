//! The history-store conformance suites against PostgreSQL (cargo feature `postgres`). The
//! server comes from `CHAT_TEST_DATABASE_URL`, a database `scripts/test.sh` made for the tests;
//! every store gets a schema of its own, so the checks run in parallel.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chat_core::store::{HistoryStore, PostgresHistoryStore, StoreConfig};

fn url() -> String {
    std::env::var("CHAT_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "CHAT_TEST_DATABASE_URL is not set: run ./scripts/test.sh (it starts a throwaway \
             PostgreSQL, or uses DATABASE_URL), or set it to a database the tests may use"
        )
    })
}

/// A schema name no other test uses.
fn fresh_schema() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "chat_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn open(schema: String, config: StoreConfig) -> Arc<dyn HistoryStore> {
    Arc::new(
        PostgresHistoryStore::connect(&url(), &schema, config)
            .await
            .unwrap(),
    )
}

chat_core::store_conformance_tests!(|config| open(fresh_schema(), config));

chat_core::durable_store_conformance_tests!(|| async { fresh_schema() }, open);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once_and_share_the_epoch() {
    let schema = fresh_schema();
    let starting: Vec<_> = (0..4)
        .map(|_| tokio::spawn(open(schema.clone(), StoreConfig::default())))
        .collect();
    let mut epochs = Vec::new();
    for store in starting {
        epochs.push(store.await.unwrap().epoch().await.unwrap());
    }
    epochs.dedup();
    assert_eq!(epochs.len(), 1, "{epochs:?}");
}
