//! The chat server's WebSocket endpoints on a raw tokio-tungstenite accept loop (no web page).
//!
//! ```sh
//! cargo run --example chat-server-tungstenite -- --addr 127.0.0.1:8001
//! ```
//!
//! Same flags as `chat-server`. On Ctrl-C or SIGTERM it stops accepting, closes every socket with
//! 1001 and exits.

mod common;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::init_logging();
    let cli = common::Cli::parse();
    let chat = match cli.build() {
        Ok(chat) => chat,
        Err(message) => {
            eprintln!("error: {message}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(cli.addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: cannot listen on {}: {error}", cli.addr);
            return std::process::ExitCode::FAILURE;
        }
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
