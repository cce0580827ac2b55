//! The history-store conformance suite, run against the in-memory backend.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use chat_core::store::{HistoryStore, InMemoryHistoryStore};

chat_core::store_conformance_tests!(|config| async move {
    Arc::new(InMemoryHistoryStore::with_config(config)) as Arc<dyn HistoryStore>
});
