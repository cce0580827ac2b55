//! The shared protocol suite over real sockets, against the tungstenite accept loop; plus its
//! graceful shutdown.

#![allow(clippy::unwrap_used)]

#[path = "../../tests-shared/socket_suite.rs"]
mod socket_suite;

use std::net::SocketAddr;

use chat_core::Chat;

async fn start(chat: Chat) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(chat_ws_tungstenite::serve(
        listener,
        chat,
        std::future::pending(),
    ));
    addr
}

socket_suite!(start);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_socket_with_1001_and_returns() {
    let chat = socket_suite::dev_chat(socket_suite::suite_config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(chat_ws_tungstenite::serve(listener, chat, async {
        let _ = stopped.await;
    }));
    let mut alice = socket_suite::connect(addr, "alice").await;
    let mut bob = socket_suite::connect(addr, "bob").await;
    stop.send(()).unwrap();
    assert_eq!(alice.expect_close().await, 1001);
    assert_eq!(bob.expect_close().await, 1001);
    drop((alice, bob));
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("serve did not return after shutdown")
        .unwrap()
        .unwrap();
    assert!(
        socket_suite::open(addr, "/ws?user=carol").await.is_err(),
        "still accepting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_answers_plain_get_requests_beside_the_chat_routes() {
    let chat = socket_suite::dev_chat(socket_suite::suite_config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let http = |path: String| async move {
        (path == "/healthz").then(|| chat_ws_tungstenite::HttpResponse {
            status: 503,
            content_type: "text/plain",
            body: "not yet".into(),
        })
    };
    tokio::spawn(chat_ws_tungstenite::serve_with(
        listener,
        chat,
        std::future::pending(),
        http,
    ));
    let answer = socket_suite::raw(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    assert!(answer.contains("content-type: text/plain\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nnot yet"), "{answer}");
    let answer = socket_suite::raw(addr, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    // The chat routes are still the chat's.
    socket_suite::connect(addr, "alice").await;
}
