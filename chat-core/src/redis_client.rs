//! Connecting to Redis, the same way for every Redis backend (cargo feature `redis`).
//!
//! Each backend holds one [`ConnectionManager`]: a multiplexed connection that any number of
//! tasks share, never one per WebSocket. It reconnects by itself after an error, with capped
//! exponential backoff. The settings here make a command fail fast while Redis is away (so a
//! `send` during an outage gets `unavailable` within about a second instead of hanging) and
//! make the next command after the outage reconnect.
//!
//! Keys: every backend puts its keys under the prefix it is given, followed by a part of its
//! own (`{prefix}:store:…`, `{prefix}:registry:…`, `{prefix}:layer:…`), so the three can share one
//! Redis and one prefix, and tests can give each instance a prefix of its own. Nothing here ever
//! touches a key outside its prefix.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, RedisResult};

/// How long one command may take before it counts as failed.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// The reconnect policy of every command connection.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(2)
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
}

/// A client for `url` and a command connection to it.
pub(crate) async fn connect(url: &str) -> Result<(Client, ConnectionManager), String> {
    let client = Client::open(url).map_err(|error| describe(&error))?;
    let manager = ConnectionManager::new_with_config(client.clone(), manager_config())
        .await
        .map_err(|error| format!("cannot connect to Redis at {url}: {}", describe(&error)))?;
    Ok((client, manager))
}

/// Runs a Redis call, and once more if it failed before anything reached Redis.
///
/// After an outage, the first command on a connection manager fails: either the manager answers
/// with its last reconnect attempt's failure, or it writes to the socket of the Redis that went
/// away. Both reconnect, so without this the first operation after every outage would fail.
/// Only failures that prove the command never left are retried (a refused connection, a write
/// the socket did not accept), so even a non-idempotent script runs at most once; a command that
/// may have reached Redis (a reset, a timeout) is never retried.
pub(crate) async fn once_more_if_unsent<T, F, Fut>(mut call: F) -> RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RedisResult<T>>,
{
    match call().await {
        Err(error) if never_sent(&error) => {
            metrics::counter!(crate::metrics::REDIS_RECONNECTS, "connection" => "command")
                .increment(1);
            call().await
        }
        other => other,
    }
}

fn never_sent(error: &RedisError) -> bool {
    // redis-rs keeps the I/O error behind an `Arc<dyn Error>`.
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    let broken_pipe = std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<Shared>())
        .and_then(|shared| shared.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
    error.is_connection_refusal() || broken_pipe
}

/// A Redis error as the backends report it.
pub(crate) fn describe(error: &RedisError) -> String {
    format!("redis: {error}")
}

/// Checks a key prefix: non-empty, printable ASCII without spaces, so keys stay readable.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(format!(
            "invalid Redis key prefix {prefix:?}: use printable ASCII without spaces"
        ))
    }
}
