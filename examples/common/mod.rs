//! What both example servers share: the command line, logging, and building the `Chat` from it.
//! Each flag can also come from the environment variable named in its help.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_core::auth::{Authenticator, DevAuthenticator, JwtAuthenticator};
use chat_core::layer::{ChannelLayer, LayerConfig, RedisChannelLayer};
use chat_core::registry::{RedisRegistry, Registry};
use chat_core::store::{
    HistoryStore, InMemoryHistoryStore, PostgresHistoryStore, RedisHistoryStore,
    SqliteHistoryStore, StoreConfig,
};
use chat_core::{Chat, ChatConfig};
use clap::{Parser, ValueEnum};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Both servers allocate with mimalloc: glibc's malloc held on to memory freed under
/// reconnect churn (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Which authentication the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AuthMode {
    /// INSECURE development mode: `?user=<name>` on trust.
    Dev,
    /// HS256 JWTs, the user in `sub`: `?token=` or `Authorization: Bearer`.
    Jwt,
}

/// Which channel layer the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LayerMode {
    /// In-process: one server.
    Memory,
    /// Redis: many servers share rooms and presence.
    Redis,
}

/// A chat server on chat-core.
#[derive(Debug, Parser)]
#[command(version, about = "A chat server on chat-core")]
pub(crate) struct Cli {
    /// Address to listen on.
    #[arg(long, env = "CHAT_ADDR", default_value = "127.0.0.1:8000")]
    pub(crate) addr: SocketAddr,
    /// Channel layer.
    #[arg(long, env = "CHAT_LAYER", value_enum, default_value = "memory")]
    pub(crate) layer: LayerMode,
    /// Redis URL(s), for `--layer redis`; several, comma-separated, shard the layer's groups
    /// across them (the registry and the Redis store use the first).
    #[arg(
        long,
        env = "CHAT_REDIS_URL",
        value_delimiter = ',',
        default_value = "redis://127.0.0.1:6379"
    )]
    pub(crate) redis_url: Vec<String>,
    /// Prefix of every Redis key and channel this server uses; nodes of one deployment share it.
    #[arg(long, env = "CHAT_REDIS_PREFIX", default_value = "chat")]
    pub(crate) redis_prefix: String,
    /// History store: `sqlite://FILE`, `postgres://URL`, `redis` or `memory`. Default: `redis`
    /// with `--layer redis` (so several nodes agree on ids and history), else
    /// `sqlite://chat.db` in the working directory.
    #[arg(long, env = "CHAT_STORE")]
    pub(crate) store: Option<String>,
    /// The PostgreSQL schema the store keeps its tables in.
    #[arg(long, env = "CHAT_STORE_SCHEMA", default_value = "chat")]
    pub(crate) store_schema: String,
    /// Messages kept per conversation (0: no limit by count; not with `--store memory`).
    #[arg(long, env = "CHAT_RETENTION", default_value_t = StoreConfig::default().retention)]
    pub(crate) retention: usize,
    /// Hours a message is kept (0: no limit by age).
    #[arg(long, env = "CHAT_RETENTION_HOURS", default_value_t = 0)]
    pub(crate) retention_hours: u64,
    /// Seconds a node's registry lease lasts: a node killed without goodbye drops out of
    /// `online` and its rooms within about this long plus a third.
    #[arg(long, env = "CHAT_NODE_LEASE", default_value_t = 30)]
    pub(crate) node_lease: u64,
    /// Frames per second a connection may send, sustained.
    #[arg(long, env = "CHAT_RATE_PER_SECOND", default_value_t = ChatConfig::default().rate_per_second)]
    pub(crate) rate_per_second: f64,
    /// Frames a connection may send in a burst.
    #[arg(long, env = "CHAT_RATE_BURST", default_value_t = ChatConfig::default().rate_burst)]
    pub(crate) rate_burst: u32,
    /// Consecutive rate-limited frames after which a connection is closed as a flood.
    #[arg(long, env = "CHAT_FLOOD_CLOSE_AFTER", default_value_t = ChatConfig::default().flood_close_after)]
    pub(crate) flood_close_after: u32,
    /// Largest inbound frame in bytes; larger closes the connection with 1009.
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES", default_value_t = ChatConfig::default().max_frame_bytes)]
    pub(crate) max_frame_bytes: usize,
    /// Longest message body in characters; longer is `too_large`.
    #[arg(long, env = "CHAT_MAX_BODY_CHARS", default_value_t = ChatConfig::default().max_body_chars)]
    pub(crate) max_body_chars: usize,
    /// Bytes on their way to one client that it has not taken yet; beyond it the client is not
    /// reading and is closed with 1008.
    #[arg(long, env = "CHAT_OUTBOUND_BUDGET", default_value_t = ChatConfig::default().outbound_budget)]
    pub(crate) outbound_budget: usize,
    /// Seconds one write to a client may take before it is closed with 1008 as not reading.
    #[arg(long, env = "CHAT_WRITE_TIMEOUT", default_value_t = ChatConfig::default().write_timeout.as_secs())]
    pub(crate) write_timeout: u64,
    /// Channel-layer messages that may wait for one connection; beyond it the connection reads
    /// what it missed from the history store.
    #[arg(long, env = "CHAT_CONNECTION_BACKLOG", default_value_t = ChatConfig::default().connection_backlog)]
    pub(crate) connection_backlog: usize,
    /// Rooms one connection may be in at once.
    #[arg(long, env = "CHAT_MAX_ROOMS", default_value_t = ChatConfig::default().max_rooms_per_connection)]
    pub(crate) max_rooms: usize,
    /// Most messages a resuming join (`since`) returns before the client pages.
    #[arg(long, env = "CHAT_RESUME_LIMIT", default_value_t = ChatConfig::default().resume_limit)]
    pub(crate) resume_limit: usize,
    /// Connections this server serves at once; more are refused with HTTP 503.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS", default_value_t = ChatConfig::default().max_connections)]
    pub(crate) max_connections: usize,
    /// Connections one user may hold on this server at once; more are refused with HTTP 429.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS_PER_USER", default_value_t = ChatConfig::default().max_connections_per_user)]
    pub(crate) max_connections_per_user: usize,
    /// Page origins allowed to open WebSockets besides the server's own (comma-separated, such
    /// as `https://app.example`; `*` allows any). Others are refused with HTTP 403.
    #[arg(
        long = "allowed-origin",
        env = "CHAT_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub(crate) allowed_origins: Vec<String>,
    /// Seconds a client cut for not reading keeps its socket to learn why (close 1008).
    #[arg(long, env = "CHAT_SLOW_CLOSE_GRACE", default_value_t = ChatConfig::default().slow_close_grace.as_secs())]
    pub(crate) slow_close_grace: u64,
    /// Authentication.
    #[arg(long, env = "CHAT_AUTH", value_enum, default_value = "dev")]
    pub(crate) auth: AuthMode,
    /// HS256 secret, for `--auth jwt`.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: Option<String>,
}

impl Cli {
    /// Builds the chat server the flags describe, or says clearly why it cannot.
    pub(crate) async fn build(&self) -> Result<Chat, String> {
        let authenticator: Arc<dyn Authenticator> = match self.auth {
            AuthMode::Dev => {
                tracing::warn!("development authentication: anyone can sign in as anyone (?user=NAME); never expose this server");
                Arc::new(DevAuthenticator)
            }
            AuthMode::Jwt => match &self.jwt_secret {
                Some(secret) if !secret.is_empty() => {
                    Arc::new(JwtAuthenticator::new(secret.as_bytes()))
                }
                _ => return Err("--auth jwt needs --jwt-secret (or CHAT_JWT_SECRET)".into()),
            },
        };
        let config = ChatConfig {
            node_lease: Duration::from_secs(self.node_lease.max(1)),
            rate_per_second: self.rate_per_second,
            rate_burst: self.rate_burst,
            flood_close_after: self.flood_close_after.max(1),
            max_frame_bytes: self.max_frame_bytes.max(1_024),
            max_body_chars: self.max_body_chars.max(1),
            outbound_budget: self.outbound_budget.max(64 * 1024),
            write_timeout: Duration::from_secs(self.write_timeout.max(1)),
            connection_backlog: self.connection_backlog.max(1),
            max_rooms_per_connection: self.max_rooms.max(1),
            resume_limit: self.resume_limit.max(1),
            max_connections: self.max_connections,
            max_connections_per_user: self.max_connections_per_user.max(1),
            allowed_origins: self
                .allowed_origins
                .iter()
                .map(|origin| origin.trim().to_owned())
                .filter(|origin| !origin.is_empty())
                .collect(),
            slow_close_grace: Duration::from_secs(self.slow_close_grace),
            ..ChatConfig::default()
        };
        let mut builder = Chat::builder().authenticator(authenticator);
        let redis = self
            .redis_url
            .first()
            .map(String::as_str)
            .unwrap_or_default();
        let prefix = &self.redis_prefix;
        if self.layer == LayerMode::Redis {
            let layer_config =
                LayerConfig::default().with_channel_capacity("conn.*", config.connection_backlog);
            let layer = RedisChannelLayer::connect(&self.redis_url, prefix, layer_config)
                .await
                .map_err(|error| format!("--layer redis: {error}"))?;
            let registry = RedisRegistry::connect(redis, prefix)
                .await
                .map_err(|error| format!("--layer redis: {error}"))?;
            tracing::info!(
                urls = ?self.redis_url,
                prefix,
                "Redis channel layer and registry"
            );
            builder = builder
                .layer(Arc::new(layer) as Arc<dyn ChannelLayer>)
                .registry(Arc::new(registry) as Arc<dyn Registry>);
        }
        let default_store = match self.layer {
            LayerMode::Redis => "redis",
            LayerMode::Memory => "sqlite://chat.db",
        };
        let store_config = StoreConfig {
            retention: match self.retention {
                0 => usize::MAX,
                count => count,
            },
            max_age: (self.retention_hours > 0)
                .then(|| Duration::from_secs(self.retention_hours.saturating_mul(3_600))),
            ..StoreConfig::default()
        };
        let store: Option<Arc<dyn HistoryStore>> = match self
            .store
            .as_deref()
            .unwrap_or(default_store)
        {
            "memory" => {
                if self.layer == LayerMode::Redis {
                    tracing::warn!("--store memory with --layer redis: each node hands out its own ids; use it with one node only");
                }
                if self.retention == 0 {
                    return Err(
                        "--store memory keeps history in memory: it needs a --retention above 0"
                            .into(),
                    );
                }
                Some(Arc::new(InMemoryHistoryStore::with_config(store_config)))
            }
            "redis" => {
                let store = RedisHistoryStore::connect(redis, prefix, store_config)
                    .await
                    .map_err(|error| format!("--store redis: {error}"))?;
                tracing::info!(url = redis, prefix, "Redis history store");
                Some(Arc::new(store))
            }
            sqlite if sqlite.starts_with("sqlite://") => {
                let path = &sqlite["sqlite://".len()..];
                let store = SqliteHistoryStore::open(path, store_config)
                    .await
                    .map_err(|error| format!("--store {sqlite}: {error}"))?;
                tracing::info!(path, "SQLite history store");
                Some(Arc::new(store))
            }
            postgres
                if postgres.starts_with("postgres://") || postgres.starts_with("postgresql://") =>
            {
                let store =
                    PostgresHistoryStore::connect(postgres, &self.store_schema, store_config)
                        .await
                        .map_err(|error| format!("--store postgres: {error}"))?;
                tracing::info!(schema = self.store_schema, "PostgreSQL history store");
                Some(Arc::new(store))
            }
            other => {
                return Err(format!(
                    "--store {other:?}: expected sqlite://FILE, postgres://URL, redis or memory"
                ))
            }
        };
        if let Some(store) = store {
            builder = builder.store(store);
        }
        Ok(builder.config(config).build())
    }

    /// `dev` or `jwt`, for the web page.
    pub(crate) fn auth_name(&self) -> &'static str {
        match self.auth {
            AuthMode::Dev => "dev",
            AuthMode::Jwt => "jwt",
        }
    }
}

/// What a server is made of once started.
pub(crate) struct Started {
    pub(crate) cli: Cli,
    pub(crate) chat: Chat,
    pub(crate) listener: tokio::net::TcpListener,
    pub(crate) probes: Probes,
}

/// What both servers do first: logging, flags, metrics, the chat server, the listener. On
/// failure it says why on stderr and gives the exit code to return.
pub(crate) async fn start() -> Result<Started, std::process::ExitCode> {
    init_logging();
    let cli = Cli::parse();
    let fail = |message: String| {
        eprintln!("error: {message}");
        std::process::ExitCode::FAILURE
    };
    // Before the `Chat` is built: it looks up its metric handles once, from this recorder.
    let metrics = install_metrics().map_err(fail)?;
    let chat = cli.build().await.map_err(fail)?;
    let listener = listen(cli.addr)
        .map_err(|error| fail(format!("cannot listen on {}: {error}", cli.addr)))?;
    let probes = Probes {
        chat: chat.clone(),
        metrics,
    };
    Ok(Started {
        cli,
        chat,
        listener,
        probes,
    })
}

/// Latency buckets of the store and layer histograms, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The Prometheus recorder, installed for the whole process, with its upkeep running.
fn install_metrics() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&LATENCY_BUCKETS)
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|error| format!("cannot install the metrics recorder: {error}"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The operational endpoints both servers answer on their WebSocket port.
#[derive(Clone)]
pub(crate) struct Probes {
    chat: Chat,
    metrics: PrometheusHandle,
}

/// An answer to a probe: status, content type, body.
pub(crate) type ProbeAnswer = (u16, &'static str, String);

impl Probes {
    /// `/healthz`: the process is up and serving HTTP.
    pub(crate) fn health(&self) -> ProbeAnswer {
        (200, "text/plain; charset=utf-8", "ok\n".into())
    }

    /// `/readyz`: the history store, the channel layer and the registry answer; 503 with the
    /// reason when one does not (a load balancer then sends new clients elsewhere).
    pub(crate) async fn ready(&self) -> ProbeAnswer {
        match self.chat.ready().await {
            Ok(()) => (200, "text/plain; charset=utf-8", "ready\n".into()),
            Err(error) => (
                503,
                "text/plain; charset=utf-8",
                format!("not ready: {error}\n"),
            ),
        }
    }

    /// `/metrics`: Prometheus text format.
    pub(crate) fn metrics(&self) -> ProbeAnswer {
        let stats = self.chat.layer_stats();
        metrics::counter!("chat_layer_group_send_dropped_total").absolute(stats.group_send_dropped);
        metrics::counter!("chat_layer_expired_messages_total").absolute(stats.expired_messages);
        (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            self.metrics.render(),
        )
    }

    /// The answer for `path`, if it is one of the probes.
    pub(crate) async fn answer(&self, path: &str) -> Option<ProbeAnswer> {
        match path {
            "/healthz" => Some(self.health()),
            "/readyz" => Some(self.ready().await),
            "/metrics" => Some(self.metrics()),
            _ => None,
        }
    }
}

/// Connections the kernel may hold before the server accepts them. tokio's `bind` asks for 128,
/// so a reconnect storm after a restart overflowed it and those clients waited a second for
/// their SYN to be retried.
const LISTEN_BACKLOG: u32 = 4_096;

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted server can take its port back at once.
    socket.set_reuseaddr(true)?;
    // Accepted sockets inherit it (on Linux and the BSDs). warp's server sets no socket options
    // on what it accepts, and without it a small frame can wait for the client's delayed ACK
    // (Nagle's algorithm): tens of milliseconds added to a chat message. The tungstenite
    // adapter sets it on each socket as well.
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Structured logs to stderr; the level comes from `RUST_LOG` (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal; piped logs stay plain text for log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}
