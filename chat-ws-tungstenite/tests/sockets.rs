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
