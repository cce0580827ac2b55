//! The store, registry and layer conformance suites against a real Redis (cargo feature
//! `redis`). The server comes from `CHAT_TEST_REDIS_URL`, which `scripts/test.sh` sets after
//! starting a throwaway `redis-server`; every backend instance gets a key prefix of its own, so
//! the checks run in parallel and never touch data they did not create.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod redis_support;

mod store {
    use std::sync::Arc;

    use chat_core::store::{HistoryStore, RedisHistoryStore};

    use super::redis_support::{prefix, url};

    chat_core::store_conformance_tests!(|config| async move {
        let store = RedisHistoryStore::connect(&url(), &prefix(), config)
            .await
            .unwrap();
        Arc::new(store) as Arc<dyn HistoryStore>
    });
}

mod registry {
    use std::sync::Arc;

    use chat_core::registry::{RedisRegistry, Registry};

    use super::redis_support::{prefix, url};

    chat_core::registry_conformance_tests!(|| async {
        let registry = RedisRegistry::connect(&url(), &prefix()).await.unwrap();
        Arc::new(registry) as Arc<dyn Registry>
    });
}
