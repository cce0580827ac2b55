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

use warp::Filter;

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
    let stop = chat.clone();
    warp::serve(app)
        .incoming(listener)
        .graceful(async move {
            common::shutdown_signal().await;
            // Upgraded sockets are not the HTTP server's to close: the engine closes them.
            stop.shutdown();
        })
        .run()
        .await;
    // Give the engine a moment to send its 1001 close frames.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    tracing::info!("stopped");
    std::process::ExitCode::SUCCESS
}
