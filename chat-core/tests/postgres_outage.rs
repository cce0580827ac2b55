//! PostgreSQL going away under a running node (cargo feature `postgres`): sends are refused with
//! `unavailable`, nothing crashes, and the node recovers by itself when the database is back.
//!
//! The store reaches the test database through a proxy the test can cut: every connection is
//! reset and new ones are refused, as when the server is stopped; the other tests sharing the
//! database are not disturbed.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_core::store::{PostgresHistoryStore, StoreConfig};
use chat_core::Chat;
use common::Client;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Where the real database listens.
enum Target {
    Tcp(String),
    Unix(std::path::PathBuf),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Target {
    fn of(url: &str) -> (Self, tokio_postgres::Config) {
        use tokio_postgres::config::Host;
        let config = tokio_postgres::Config::from_str(url).unwrap();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let target = match config.get_hosts().first().unwrap() {
            Host::Tcp(host) => Self::Tcp(format!("{host}:{port}")),
            Host::Unix(dir) => Self::Unix(dir.join(format!(".s.PGSQL.{port}"))),
        };
        (target, config)
    }

    async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Self::Tcp(addr) => Box::new(tokio::net::TcpStream::connect(addr).await?),
            Self::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        })
    }
}

/// A TCP proxy to the database that can be cut.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    /// Bumped on every cut: connections in flight end.
    cuts: watch::Sender<u64>,
}

impl Proxy {
    async fn start(target: Target) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let target = Arc::new(target);
        let (is_cut, on_cut) = (Arc::clone(&cut), cuts.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if is_cut.load(Ordering::SeqCst) {
                    // Refused, as by a stopped server.
                    drop(client);
                    continue;
                }
                let target = Arc::clone(&target);
                let mut cut = on_cut.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = target.connect().await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { port, cut, cuts }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Sends and waits for the ack or the error: `Some(id)` or `None` for `unavailable`.
async fn send(client: &mut Client, body: &str) -> Option<u64> {
    client
        .send(json!({"type": "send", "room": "lobby", "body": body, "ref": body}))
        .await;
    loop {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("ack") if frame["ref"] == body => return frame["id"].as_u64(),
            Some("error") if frame["ref"] == body => {
                assert_eq!(frame["code"], "unavailable", "{frame}");
                return None;
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_makes_sends_unavailable_and_the_node_recovers_by_itself() {
    let url = std::env::var("CHAT_TEST_DATABASE_URL")
        .expect("CHAT_TEST_DATABASE_URL is not set: run ./scripts/test.sh");
    let (target, real) = Target::of(&url);
    let proxy = Proxy::start(target).await;
    let user = real.get_user().unwrap_or("postgres");
    let database = real.get_dbname().unwrap_or("postgres");
    let through_proxy = format!("postgres://{user}@127.0.0.1:{}/{database}", proxy.port);
    let schema = format!("outage_{}", std::process::id());
    let store = PostgresHistoryStore::connect(&through_proxy, &schema, StoreConfig::default())
        .await
        .unwrap();
    let chat = Chat::builder().store(Arc::new(store)).build();
    let mut alice = Client::connect(&chat, "alice").await;
    let mut bob = Client::connect(&chat, "bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    let mut acked = vec![send(&mut alice, "before").await.unwrap()];
    chat.ready().await.expect("ready with the database up");

    proxy.cut();
    // A readiness probe says so, and which backend.
    let not_ready = chat
        .ready()
        .await
        .expect_err("ready with the database away");
    assert!(
        not_ready.to_string().contains("store") || not_ready.to_string().contains("postgres"),
        "{not_ready}"
    );
    let mut refused = 0;
    for i in 0..3 {
        match send(&mut alice, &format!("during-{i}")).await {
            Some(id) => acked.push(id),
            None => refused += 1,
        }
    }
    assert!(refused > 0, "sends with the database away were not refused");
    alice
        .send(json!({"type": "history", "room": "lobby"}))
        .await;
    alice.expect_error("unavailable").await;

    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    loop {
        if let Some(id) = send(&mut alice, &format!("after-{i}")).await {
            acked.push(id);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never recovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        i += 1;
    }
    chat.ready()
        .await
        .expect("ready again once the database is back");

    // What was acknowledged is stored, and bob got exactly that.
    alice
        .send(json!({"type": "history", "room": "lobby"}))
        .await;
    let history = loop {
        let frame = alice.recv().await;
        if frame["type"] == "history" {
            break frame;
        }
    };
    let stored: Vec<u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(stored, acked);
    let mut live = Vec::new();
    while live.len() < acked.len() {
        let frame = bob.recv().await;
        if frame["type"] == "message" {
            live.push(frame["id"].as_u64().unwrap());
        }
    }
    assert_eq!(live, acked);
}
