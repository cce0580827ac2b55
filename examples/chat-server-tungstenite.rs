//! The chat server's WebSocket endpoints on a raw tokio-tungstenite accept loop (no web page).
//!
//! ```sh
//! cargo run --example chat-server-tungstenite -- --addr 127.0.0.1:8001
//! ```
//!
//! Same flags as `chat-server`, and the same `/healthz`, `/readyz` and `/metrics`. On Ctrl-C or
//! SIGTERM it stops accepting, closes every socket with 1001 and exits.

mod common;

use chat_ws_tungstenite::HttpResponse;

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
    let addr = listener.local_addr().map_or(cli.addr, |a| a);
    tracing::info!("chat server listening: ws://{addr}/ws");
    let http = move |path: String| {
        let probes = probes.clone();
        async move {
            let (status, content_type, body) = probes.answer(&path).await?;
            Some(HttpResponse {
                status,
                content_type,
                body,
            })
        }
    };
    match chat_ws_tungstenite::serve_with(listener, chat, common::shutdown_signal(), http).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
