//! [`RedisRegistry`]: rooms, presence and node leases in Redis, shared by every node (cargo
//! feature `redis`).
//!
//! Every operation is one Lua script, so each is atomic across nodes as the [`Registry`] trait
//! requires: an edge is computed and numbered in the same step that changes the sets, and a sweep
//! reports each edge to exactly one sweeper. Listings are sorted sets whose scores are all zero,
//! which Redis keeps in name order. Leases are scored by Redis's own clock (`TIME`), so nodes
//! with skewed clocks agree on who expired. No per-field hash expiry is used (Redis 7.0 has none).

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::Script;

use super::{Count, Departure, Edge, Lease, Listing, Page, Registry, RegistryError};
use crate::redis_client::{self, describe, once_more_if_unsent};

/// A [`Registry`] in Redis. Cheap to clone; clones share one multiplexed connection.
///
/// ```no_run
/// use chat_core::registry::RedisRegistry;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::registry::RegistryError> {
/// let registry = RedisRegistry::connect("redis://127.0.0.1:6379", "chat").await?;
/// # drop(registry);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisRegistry {
    connection: ConnectionManager,
    /// `{prefix}:registry`.
    keys: String,
    scripts: Scripts,
}

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(include_str!("prelude.lua"), include_str!($file)))
    };
}

#[derive(Clone)]
struct Scripts {
    heartbeat: Script,
    connect: Script,
    disconnect: Script,
    join: Script,
    leave: Script,
    listing: Script,
    sweep: Script,
    claim_count: Script,
    release_count: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            heartbeat: script!("heartbeat.lua"),
            connect: script!("connect.lua"),
            disconnect: script!("disconnect.lua"),
            join: script!("join.lua"),
            leave: script!("leave.lua"),
            listing: script!("listing.lua"),
            sweep: script!("sweep.lua"),
            claim_count: script!("claim_count.lua"),
            release_count: script!("release_count.lua"),
        }
    }
}

fn failed(error: redis::RedisError) -> RegistryError {
    RegistryError(describe(&error))
}

fn malformed(what: &str) -> RegistryError {
    RegistryError(format!("unexpected reply from Redis to {what}"))
}

fn version(text: &str) -> Result<u64, RegistryError> {
    text.parse().map_err(|_| malformed("a version"))
}

fn count(text: &str) -> Result<usize, RegistryError> {
    text.parse().map_err(|_| malformed("a count"))
}

/// An edge as `'version count'`, or `''` for none.
fn edge(reply: &str) -> Result<Option<Edge>, RegistryError> {
    if reply.is_empty() {
        return Ok(None);
    }
    let (at, size) = reply.split_once(' ').ok_or_else(|| malformed("an edge"))?;
    Ok(Some(Edge {
        version: version(at)?,
        count: count(size)?,
    }))
}

/// Reads the `'L', room, user, 'version count'` and `'O', user, version` records a script returned.
fn departures(reply: &[String]) -> Result<Vec<Departure>, RegistryError> {
    let mut rest = reply;
    let mut out = Vec::new();
    loop {
        match rest {
            [] => return Ok(out),
            [kind, room, user, at, tail @ ..] if kind == "L" => {
                let Some(edge) = edge(at)? else {
                    return Err(malformed("a departure"));
                };
                out.push(Departure::Left {
                    room: room.clone(),
                    user: user.clone(),
                    version: edge.version,
                    count: edge.count,
                });
                rest = tail;
            }
            [kind, user, at, tail @ ..] if kind == "O" => {
                out.push(Departure::Offline {
                    user: user.clone(),
                    version: version(at)?,
                });
                rest = tail;
            }
            _ => return Err(malformed("a departure")),
        }
    }
}

impl RedisRegistry {
    /// Connects to the Redis at `url`, keeping its keys under `{prefix}:registry:`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, RegistryError> {
        redis_client::check_prefix(prefix).map_err(RegistryError)?;
        let (_, connection) = redis_client::connect(url).await.map_err(RegistryError)?;
        Ok(Self {
            connection,
            keys: format!("{prefix}:registry"),
            scripts: Scripts::new(),
        })
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        args: &[&str],
    ) -> Result<T, RegistryError> {
        let mut invocation = script.prepare_invoke();
        invocation.arg(&self.keys);
        for arg in args {
            invocation.arg(*arg);
        }
        let invocation = &invocation;
        once_more_if_unsent(|| {
            let mut connection = self.connection.clone();
            async move { invocation.invoke_async(&mut connection).await }
        })
        .await
        .map_err(failed)
    }

    async fn listing(&self, set: &str, page: Page<'_>) -> Result<Listing, RegistryError> {
        // Redis takes at most a signed 64-bit count; one more than asked says whether more follow.
        let limit = page.limit.min(1_000_000_000).to_string();
        let after = page.after.unwrap_or_default();
        let reply: Vec<String> = self
            .run(&self.scripts.listing, &[set, after, &limit])
            .await?;
        let [at, size, users @ ..] = reply.as_slice() else {
            return Err(malformed("a listing"));
        };
        let more = users.len() > page.limit;
        Ok(Listing {
            users: users.iter().take(page.limit).cloned().collect(),
            version: version(at)?,
            count: count(size)?,
            more,
        })
    }
}

#[async_trait]
impl Registry for RedisRegistry {
    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<Lease, RegistryError> {
        let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let existed: i64 = self
            .run(&self.scripts.heartbeat, &[node, &ttl.to_string()])
            .await?;
        Ok(if existed == 1 {
            Lease::Renewed
        } else {
            Lease::Created
        })
    }

    async fn connect(
        &self,
        node: &str,
        user: &str,
        connection: &str,
    ) -> Result<Option<Edge>, RegistryError> {
        let reply: String = self
            .run(&self.scripts.connect, &[node, user, connection])
            .await?;
        edge(&reply)
    }

    async fn disconnect(
        &self,
        _user: &str,
        connection: &str,
    ) -> Result<Vec<Departure>, RegistryError> {
        let reply: Vec<String> = self.run(&self.scripts.disconnect, &[connection]).await?;
        departures(&reply)
    }

    async fn join(
        &self,
        room: &str,
        user: &str,
        connection: &str,
    ) -> Result<Option<Edge>, RegistryError> {
        let reply: String = self
            .run(&self.scripts.join, &[room, user, connection])
            .await?;
        edge(&reply)
    }

    async fn leave(
        &self,
        room: &str,
        user: &str,
        connection: &str,
    ) -> Result<Option<Edge>, RegistryError> {
        let reply: String = self
            .run(&self.scripts.leave, &[room, user, connection])
            .await?;
        edge(&reply)
    }

    async fn members_page(&self, room: &str, page: Page<'_>) -> Result<Listing, RegistryError> {
        self.listing(&format!("room:{room}"), page).await
    }

    async fn online_page(&self, page: Page<'_>) -> Result<Listing, RegistryError> {
        self.listing("online", page).await
    }

    async fn claim_count(&self, room: &str, ttl: Duration) -> Result<bool, RegistryError> {
        let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let claimed: i64 = self
            .run(&self.scripts.claim_count, &[room, &ttl.to_string()])
            .await?;
        Ok(claimed == 1)
    }

    async fn release_count(&self, room: &str) -> Result<Count, RegistryError> {
        let reply: Vec<String> = self.run(&self.scripts.release_count, &[room]).await?;
        let [at, size] = reply.as_slice() else {
            return Err(malformed("a member count"));
        };
        Ok(Count {
            count: count(size)?,
            version: version(at)?,
        })
    }

    async fn sweep(&self) -> Result<Vec<Departure>, RegistryError> {
        let reply: Vec<String> = self.run(&self.scripts.sweep, &[]).await?;
        departures(&reply)
    }
}
