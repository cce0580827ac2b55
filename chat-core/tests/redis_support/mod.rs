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

/// A redis-server of the test's own, which it can kill and start again: for outages that must
/// not disturb the other tests sharing `CHAT_TEST_REDIS_URL`. It listens on a Unix socket in its
/// own temporary directory; with `persistent`, every write reaches its append-only file before
/// Redis answers (`appendfsync always`), so a restart loses nothing acknowledged.
pub struct PrivateRedis {
    dir: std::path::PathBuf,
    persistent: bool,
    child: Option<std::process::Child>,
    pub url: String,
}

impl PrivateRedis {
    pub async fn start(persistent: bool) -> Self {
        let dir = std::env::temp_dir().join(prefix());
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("redis+unix://{}", dir.join("redis.sock").display());
        let mut redis = Self {
            dir,
            persistent,
            child: None,
            url,
        };
        redis.restart().await;
        redis
    }

    /// Kills the server without warning, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again, on the same socket and files) and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.join("redis.sock"));
        let appendonly = if self.persistent { "yes" } else { "no" };
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendfsync", "always"])
            .args(["--appendonly", appendonly])
            .arg("--unixsocket")
            .arg(self.dir.join("redis.sock"))
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is not installed: scripts/test.sh installs it");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url.as_str()) {
                if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
                    let pong: Result<String, _> =
                        redis::cmd("PING").query_async(&mut connection).await;
                    if pong.is_ok() {
                        return;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private redis-server did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Runs one command on it.
    pub async fn command(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query_async(&mut connection).await.unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
