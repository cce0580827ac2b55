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

/// Sends `request` as is and returns the whole response (the server closes after it).
async fn raw(addr: SocketAddr, request: impl AsRef<[u8]>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_ref()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut response),
    )
    .await
    .expect("no response in time")
    .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// An upgrade request for `path` with `headers` (each "Name: value"), closing after the reply.
fn upgrade_request(version: &str, path: &str, headers: &[&str]) -> String {
    let mut request = format!("GET {path} {version}\r\nHost: x\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

const CONNECTION: &str = "Connection: Upgrade";
const UPGRADE: &str = "Upgrade: websocket";
const VERSION: &str = "Sec-WebSocket-Version: 13";
const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upgrades_get_400_with_the_reason() {
    let chat = socket_suite::dev_chat(socket_suite::suite_config());
    let addr = start(chat).await;
    let cases: [(&[&str], &str); 8] = [
        (&[UPGRADE, VERSION, KEY], "Connection header"),
        (
            &["Connection: keep-alive", UPGRADE, VERSION, KEY],
            "Connection header",
        ),
        (&[CONNECTION, VERSION, KEY], "Upgrade header"),
        (
            &[CONNECTION, "Upgrade: h2c", VERSION, KEY],
            "Upgrade header",
        ),
        (
            &[CONNECTION, UPGRADE, KEY],
            "Sec-WebSocket-Version must be 13",
        ),
        (
            &[CONNECTION, UPGRADE, "Sec-WebSocket-Version: 8", KEY],
            "Sec-WebSocket-Version must be 13",
        ),
        (
            &[CONNECTION, UPGRADE, VERSION],
            "Sec-WebSocket-Key header is missing",
        ),
        (
            &[CONNECTION, UPGRADE, VERSION, "Sec-WebSocket-Key: short"],
            "16 bytes in base64",
        ),
    ];
    for (headers, reason) in cases {
        let mut all = headers.to_vec();
        all.push("Connection: close");
        let response = raw(addr, &upgrade_request("HTTP/1.1", "/ws?user=alice", &all)).await;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{headers:?}: {response}"
        );
        assert!(response.contains(reason), "{headers:?}: {response}");
    }
    let response = raw(
        addr,
        &upgrade_request(
            "HTTP/1.1",
            "/ws?user=alice",
            &[
                CONNECTION,
                UPGRADE,
                "Sec-WebSocket-Version: 8",
                KEY,
                "Connection: close",
            ],
        ),
    )
    .await;
    assert!(
        response
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{response}"
    );
    // HTTP/1.0 has no upgrades: hyper offers none, so the handshake is refused.
    let response = raw(
        addr,
        &upgrade_request(
            "HTTP/1.0",
            "/ws?user=alice",
            &[CONNECTION, UPGRADE, VERSION, KEY],
        ),
    )
    .await;
    assert!(response.contains(" 400 "), "{response}");
    assert!(response.contains("cannot be upgraded"), "{response}");
    // Garbage in the path or headers is warp's and hyper's to refuse; nothing panics.
    let response = raw(addr, b"GET /ws?user=\xff HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    let response = raw(
        addr,
        b"GET /ws?user=alice HTTP/1.1\r\nHost: x\r\nConnection: \xffupgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.contains("Connection header"), "{response}");
    let response = raw(
        addr,
        b"GET /ws?user=alice HTTP/1.1\r\nHost: x\r\nConnection: upgrade, close\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: \xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5\xf4\xf3\xf2\xf1\xf0\xef\xee\xed\xec\xeb\xea==\r\n\r\n",
    )
    .await;
    assert!(response.contains("16 bytes in base64"), "{response}");
    // The server still works.
    let mut alice = socket_suite::connect(addr, "alice").await;
    alice.join("lobby").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_answers_the_rfc_handshake_and_speaks_websocket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chat = socket_suite::dev_chat(socket_suite::suite_config());
    let addr = start(chat).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = upgrade_request(
        "HTTP/1.1",
        "/ws?user=alice",
        &[
            "Connection: keep-alive, Upgrade",
            "Upgrade: WebSocket",
            VERSION,
            KEY,
        ],
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1);
        response.push(byte[0]);
    }
    let response = String::from_utf8(response).unwrap().to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 101"), "{response}");
    // RFC 6455 §1.3's sample key and its answer.
    assert!(
        response.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{response}"
    );
    assert!(response.contains("upgrade: websocket"), "{response}");
    let socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let mut alice = socket_suite::Socket { ws: socket };
    let welcome = alice.recv_type("welcome").await;
    assert_eq!(welcome["user"], "alice");
    alice.join("lobby").await;
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
