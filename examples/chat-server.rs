//! The chat server with its web page, on warp.
//!
//! ```sh
//! cargo run --example chat-server                   # http://127.0.0.1:8000/
//! cargo run --example chat-server -- --help         # every flag (each also an env var)
//! cargo run --example chat-server -- --auth jwt --jwt-secret s3cret
//! ```
//!
//! Serves the page at `/` (plain HTML, CSS and JS compiled into the binary), `/config.json` (which
//! sign-in the page should offer), the WebSocket endpoints `/ws` and `/ws/chat/{room}/`, and
//! `/healthz`, `/readyz` and `/metrics` (Prometheus). On Ctrl-C or SIGTERM it stops accepting,
//! closes every socket with 1001 and exits.

mod common;

use std::time::Duration;

use std::convert::Infallible;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower_service::Service;
use warp::Filter;

/// How long a client may take to send a request head (slow-loris guard), as the tungstenite
/// adapter allows.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for HTTP requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

const INDEX: &str = include_str!("static/index.html");
const APP_JS: &str = include_str!("static/app.js");
const STYLE_CSS: &str = include_str!("static/style.css");

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let common::Started {
        cli,
        chat,
        listener,
        probes,
    } = match common::start().await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let config = serde_json::json!({ "auth": cli.auth_name() }).to_string();
    let page = warp::path::end().map(|| warp::reply::html(INDEX));
    let app_js = warp::path!("app.js")
        .map(|| warp::reply::with_header(APP_JS, "content-type", "text/javascript; charset=utf-8"));
    let style = warp::path!("style.css")
        .map(|| warp::reply::with_header(STYLE_CSS, "content-type", "text/css; charset=utf-8"));
    let config_json = warp::path!("config.json")
        .map(move || warp::reply::with_header(config.clone(), "content-type", "application/json"));
    let probe = warp::path::full().and_then(move |path: warp::path::FullPath| {
        let probes = probes.clone();
        async move {
            match probes.answer(path.as_str()).await {
                Some((status, content_type, body)) => {
                    let status = warp::http::StatusCode::from_u16(status)
                        .unwrap_or(warp::http::StatusCode::INTERNAL_SERVER_ERROR);
                    let reply = warp::reply::with_header(body, "content-type", content_type);
                    Ok(warp::reply::with_status(reply, status))
                }
                None => Err(warp::reject::not_found()),
            }
        }
    });
    let app = chat_ws_warp::routes(chat.clone())
        .or(warp::get().and(page.or(app_js).or(style).or(config_json).or(probe)));

    let addr = listener.local_addr().map_or(cli.addr, |a| a);
    tracing::info!("chat server listening: open http://{addr}/");
    // warp's own `serve` gives hyper no timer, so hyper would wait for ever on a request head
    // sent a byte at a time; `serve` here is `warp::serve` with that deadline.
    let connections = GracefulShutdown::new();
    serve(listener, warp::service(app), &connections).await;
    // Upgraded sockets are not hyper's to close: the engine closes them with 1001.
    chat.shutdown();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, connections.shutdown()).await;
    // Give the engine a moment to send its 1001 close frames.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tracing::info!("stopped");
    std::process::ExitCode::SUCCESS
}

/// Serves `service` on each connection `listener` accepts, with upgrades, a deadline on request
/// heads and `TCP_NODELAY` inherited from the listener, until Ctrl-C or SIGTERM.
async fn serve<S, B>(listener: tokio::net::TcpListener, service: S, connections: &GracefulShutdown)
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut signal = std::pin::pin!(common::shutdown_signal());
    loop {
        let stream = tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT);
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
            .into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection error");
            }
        });
    }
}
