//! Any sequence of frames (the input split at 0xFF bytes) through one connection of a fresh
//! in-memory `Chat`: the engine never panics, answers a final `ping` with `pong` unless it
//! closed the connection for a reason the protocol names, and the connection ends cleanly.

#![no_main]

use std::time::Duration;

use bytes::Bytes;
use chat_core::engine::{CloseReason, Inbound, Route};
use chat_core::testing::{Communicator, Received, TestError};
use chat_core::{Chat, ChatConfig};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    runtime.block_on(run(data));
});

async fn run(data: &[u8]) {
    let chat = Chat::builder()
        .config(ChatConfig {
            rate_per_second: 1_000_000.0,
            rate_burst: 1_000_000,
            max_frame_bytes: 4_096,
            ..ChatConfig::default()
        })
        .build();
    let mut client = Communicator::connect_as(&chat, "fuzz", Route::Lobby)
        .await
        .expect("connects");
    client.set_timeout(Duration::from_secs(5));
    for frame in data.split(|&b| b == 0xff).take(64) {
        let inbound = match frame.first() {
            Some(0xfe) => Inbound::Binary(Bytes::copy_from_slice(&frame[1..])),
            _ => Inbound::Text(Bytes::copy_from_slice(frame)),
        };
        if client.send_inbound(inbound).await.is_err() {
            break;
        }
    }
    let _ = client.send(json!({"type": "ping", "ref": "last"})).await;
    loop {
        match client.receive().await {
            Ok(Received::Frame(frame)) if frame["type"] == "pong" => break,
            Ok(Received::Frame(_)) => {}
            // A frame over the size limit closes with 1009: a reason the protocol names.
            Ok(Received::Close { code, .. }) => {
                assert_eq!(code, 1009, "closed with {code}");
                break;
            }
            Err(TestError::Ended) => break,
            Err(error) => panic!("no answer to the last ping: {error}"),
        }
    }
    let reason = client.disconnect().await;
    assert!(
        matches!(reason, CloseReason::ClientClosed | CloseReason::FrameTooLarge),
        "{reason:?}"
    );
}
