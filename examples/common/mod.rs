//! What both example servers share: the command line, logging, and building the `Chat` from it.
//! Each flag can also come from the environment variable named in its help.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use chat_core::auth::{Authenticator, DevAuthenticator, JwtAuthenticator};
use chat_core::Chat;
use clap::{Parser, ValueEnum};

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
    /// Redis URL, for `--layer redis`.
    #[arg(long, env = "CHAT_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis_url: String,
    /// History store: `memory`, `sqlite://FILE` or `postgres://URL`.
    #[arg(long, env = "CHAT_STORE", default_value = "memory")]
    pub(crate) store: String,
    /// Authentication.
    #[arg(long, env = "CHAT_AUTH", value_enum, default_value = "dev")]
    pub(crate) auth: AuthMode,
    /// HS256 secret, for `--auth jwt`.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: Option<String>,
}

impl Cli {
    /// Builds the chat server the flags describe, or says clearly why it cannot.
    pub(crate) fn build(&self) -> Result<Chat, String> {
        if self.layer == LayerMode::Redis {
            return Err(format!(
                "--layer redis ({}) is not available yet: the Redis channel layer has not landed; use --layer memory",
                self.redis_url
            ));
        }
        match self.store.as_str() {
            "memory" => {}
            other if other.starts_with("sqlite://") || other.starts_with("postgres://") => {
                return Err(format!(
                    "--store {other} is not available yet: durable history stores have not landed; use --store memory"
                ));
            }
            other => {
                return Err(format!(
                    "--store {other:?}: expected memory, sqlite://FILE or postgres://URL"
                ))
            }
        }
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
        Ok(Chat::builder().authenticator(authenticator).build())
    }

    /// `dev` or `jwt`, for the web page.
    pub(crate) fn auth_name(&self) -> &'static str {
        match self.auth {
            AuthMode::Dev => "dev",
            AuthMode::Jwt => "jwt",
        }
    }
}

/// What both servers do first: logging, flags, the chat server, the listener. On failure it says
/// why on stderr and gives the exit code to return.
pub(crate) async fn start() -> Result<(Cli, Chat, tokio::net::TcpListener), std::process::ExitCode>
{
    init_logging();
    let cli = Cli::parse();
    let fail = |message: String| {
        eprintln!("error: {message}");
        std::process::ExitCode::FAILURE
    };
    let chat = cli.build().map_err(fail)?;
    let listener = tokio::net::TcpListener::bind(cli.addr)
        .await
        .map_err(|error| fail(format!("cannot listen on {}: {error}", cli.addr)))?;
    Ok((cli, chat, listener))
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
