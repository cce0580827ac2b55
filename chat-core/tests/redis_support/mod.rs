//! Where the Redis tests find their server, and fresh key prefixes for them.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};

/// The test server: `CHAT_TEST_REDIS_URL`, which `scripts/test.sh` sets. Missing, the tests fail
/// and say so, rather than skip.
pub fn url() -> String {
    std::env::var("CHAT_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "CHAT_TEST_REDIS_URL is not set: run ./scripts/test.sh (it starts a throwaway \
             redis-server), or start one yourself and set CHAT_TEST_REDIS_URL=redis://127.0.0.1:PORT"
        )
    })
}

/// A key prefix no other test uses, in this process or another.
pub fn prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "chat-test-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
