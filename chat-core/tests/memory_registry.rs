//! The registry conformance suite, run against the in-memory backend.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use chat_core::registry::{InMemoryRegistry, Registry};

chat_core::registry_conformance_tests!(|| async {
    Arc::new(InMemoryRegistry::default()) as Arc<dyn Registry>
});
