//! The chat server's WebSocket endpoints on a raw tokio-tungstenite accept loop (no web page).
//!
//! ```sh
//! cargo run --example chat-server-tungstenite -- --addr 127.0.0.1:8001
//! ```
//!
//! Same flags as `chat-server`. On Ctrl-C or SIGTERM it stops accepting, closes every socket with
//! 1001 and exits.

mod common;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let (cli, chat, listener) = match common::start().await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let addr = listener.local_addr().map_or(cli.addr, |a| a);
    tracing::info!("chat server listening: ws://{addr}/ws");
    match chat_ws_tungstenite::serve(listener, chat, common::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
