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

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError};

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
