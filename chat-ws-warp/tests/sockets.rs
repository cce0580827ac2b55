//! The shared protocol suite over real sockets, against the warp filter; plus composing it with
//! other routes.

#![allow(clippy::unwrap_used)]

#[path = "../../tests-shared/socket_suite.rs"]
mod socket_suite;

use std::net::SocketAddr;

use chat_core::Chat;
use warp::Filter;

async fn start(chat: Chat) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = chat_ws_warp::routes(chat).or(warp::path("health").map(|| "ok"));
    tokio::spawn(warp::serve(app).incoming(listener).run());
    addr
}

socket_suite!(start);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composes_with_the_hosts_routes() {
    let chat = socket_suite::dev_chat(socket_suite::suite_config());
    let addr = start(chat).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok"));
}

use socket_suite::{raw, upgrade_request, CONNECTION, KEY, UPGRADE, VERSION};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_cannot_upgrade() {
    let chat = socket_suite::dev_chat(socket_suite::suite_config());
    let addr = start(chat).await;
    // hyper offers no upgrade on HTTP/1.0, so the handshake is refused with the reason.
    let response = socket_suite::http_1_0_upgrade(addr).await;
    assert!(response.contains(" 400 "), "{response}");
    assert!(response.contains("cannot be upgraded"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_and_methods_fall_through_to_the_host() {
    let chat = socket_suite::dev_chat(socket_suite::suite_config());
    let addr = start(chat).await;
    let all = [CONNECTION, UPGRADE, VERSION, KEY, "Connection: close"];
    let response = raw(
        addr,
        &upgrade_request("HTTP/1.1", "/ws/elsewhere?user=alice", &all),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    let response = raw(
        addr,
        "POST /ws?user=alice HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
}
