//! chat-ws-warp: carries chat-core over warp WebSockets.
//!
//! [`routes`] is a warp filter for `GET /ws` and `GET /ws/chat/{room}/`. For each upgrade request
//! it checks the WebSocket handshake headers (400 with the reason when they are wrong), asks
//! [`Chat::admit`] about the handshake (its `Origin`, its credentials, the connection limits)
//! and answers 403, 401, 429 or 503 before upgrading when it refuses; otherwise it answers 101
//! and, once hyper hands over the connection, speaks WebSocket on it with tokio-tungstenite and
//! hands the socket's frames to [`Chat::serve`].
//!
//! Thin on purpose: message conversion, handshake mapping and socket options only. Heartbeats,
//! limits, rooms and everything else are the engine's, so the tungstenite adapter behaves the
//! same.
//!
//! # Why the upgrade is done here rather than with `warp::ws()`
//!
//! `warp::ws()` offers no way to set tungstenite's read buffer, which then stays at its default
//! of 128 KiB per socket, zeroed before each read: most of an idle connection's memory. And
//! `warp::ws::Message::text` takes a `String`, so every recipient's frame would be copied. So this
//! crate takes hyper's pending upgrade from the request (warp serves the connection with upgrades
//! enabled), answers the handshake itself (`Sec-WebSocket-Accept`, checked by
//! [`chat_ws_tungstenite::upgrade`]), and speaks on the upgraded connection through
//! [`chat_ws_tungstenite::serve_io`], exactly as the tungstenite adapter does: a 1 KiB read
//! buffer, the engine's frame size limit, and the engine's frames written beside their shared
//! `Bytes`, with no copy per recipient.
//!
//! # Set `TCP_NODELAY` on the listener
//!
//! warp's server sets no socket options on the connections it accepts, so Nagle's algorithm
//! stays on: a small frame written after another can wait for the client's delayed ACK, tens of
//! milliseconds. Hand warp a listener with `TCP_NODELAY` set (accepted sockets inherit it on
//! Linux and the BSDs), as the example server does: `tokio::net::TcpSocket::set_nodelay(true)`
//! before `listen`, then `warp::serve(app).incoming(listener)`.
//!
//! # Give hyper a deadline on request heads
//!
//! `warp::serve` gives hyper no timer, and without one hyper enforces no deadline on a request
//! head: a client sending a byte a second holds a connection (and a descriptor) for as long as
//! it likes. For a server open to the internet, serve the filter through hyper-util yourself,
//! as `warp::serve` does inside, with `http1().timer(TokioTimer::new())` and a
//! `header_read_timeout`: the example server (`examples/chat-server.rs`) does, in about thirty
//! lines, and is tested against a slow head.
//!
//! ```no_run
//! use std::sync::Arc;
//! use chat_core::{auth::DevAuthenticator, Chat};
//! use warp::Filter;
//!
//! # #[tokio::main] async fn main() {
//! let chat = Chat::builder().authenticator(Arc::new(DevAuthenticator)).build();
//! let app = chat_ws_warp::routes(chat).or(warp::path("health").map(|| "ok"));
//! warp::serve(app).run(([127, 0, 0, 1], 8000)).await;
//! # }
//! ```

use chat_core::auth::Handshake;
use chat_core::engine::{route, Session};
use chat_core::Chat;
use chat_ws_tungstenite::upgrade::{self, Refusal};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use warp::filters::path::FullPath;
use warp::http::header::{
    HeaderValue, CONNECTION, RETRY_AFTER, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

/// The chat endpoints as a warp filter: `/ws` and `/ws/chat/{room}/`. Compose it with the host's
/// own routes with `.or(...)`.
///
/// A `GET` for one of these paths is answered here: 400 with the reason when it is not a valid
/// WebSocket handshake (RFC 6455: `Connection: upgrade`, `Upgrade: websocket`,
/// `Sec-WebSocket-Version: 13`, a `Sec-WebSocket-Key` of 16 bytes in base64, over HTTP/1.1),
/// 403/401/429/503 when [`Chat::admit`] refuses it, else 101 and the chat protocol on the
/// socket. Other paths
/// under `/ws/` and other methods are rejected, for the host's routes to take.
pub fn routes(chat: Chat) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::path("ws")
        .and(warp::get())
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned())
        // hyper puts the pending upgrade of an HTTP/1.1 request that asks for one in the
        // request's extensions. `OnUpgrade` is a cheap clone (an `Arc` around a oneshot
        // receiver): whichever clone is awaited gets the connection, and the request's own copy
        // is dropped with the request.
        .and(warp::ext::optional::<OnUpgrade>())
        .and(warp::any().map(move || chat.clone()))
        .and_then(upgrade)
}

async fn upgrade(
    path: FullPath,
    query: String,
    headers: HeaderMap,
    on_upgrade: Option<OnUpgrade>,
    chat: Chat,
) -> Result<Response, Rejection> {
    let Some(route) = route(path.as_str()) else {
        return Err(warp::reject::not_found());
    };
    let accept = match accept_key(&headers) {
        Ok(accept) => accept,
        Err(refusal) => {
            tracing::debug!(
                reason = refusal.reason(),
                path = path.as_str(),
                "bad upgrade"
            );
            return Ok(refusal_response(refusal));
        }
    };
    // hyper offers an upgrade only on HTTP/1.1 requests with an `Upgrade` header: not on
    // HTTP/1.0, nor on HTTP/2, where this handshake does not exist.
    let Some(on_upgrade) = on_upgrade else {
        tracing::debug!(
            path = path.as_str(),
            "upgrade request on a connection that cannot"
        );
        return Ok(bad_request(
            "this connection cannot be upgraded: a WebSocket handshake needs HTTP/1.1",
        ));
    };
    let handshake = Handshake {
        path: path.as_str().to_owned(),
        query: (!query.is_empty()).then_some(query),
        headers: headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect(),
    };
    // Not kept across the authenticator's await (which may call a database).
    drop(headers);
    let session = match chat.admit(&handshake, route).await {
        Ok(session) => session,
        Err(denied) => {
            tracing::info!(%denied, path = path.as_str(), "handshake refused");
            let status =
                StatusCode::from_u16(denied.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut response = warp::reply::with_status(denied.to_string(), status).into_response();
            if matches!(denied.status(), 429 | 503) {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("5"));
            }
            return Ok(response);
        }
    };
    // hyper completes the upgrade after it has written the 101 below; if the connection fails
    // first, `on_upgrade` resolves to an error and nothing is served.
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => serve(chat, session, upgraded).await,
            Err(error) => tracing::debug!(%error, "upgrade failed"),
        }
    });
    let mut response = Response::default();
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let response_headers = response.headers_mut();
    response_headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    response_headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    response_headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    Ok(response)
}

async fn serve(chat: Chat, session: Session, upgraded: hyper::upgrade::Upgraded) {
    // The same socket settings and frame writing as the tungstenite adapter. hyper's `Upgraded`
    // gives back what it read past the request itself, so nothing is read ahead here.
    let io = TokioIo::new(upgraded);
    chat_ws_tungstenite::serve_io(&chat, session, io, Vec::new()).await;
}

/// A refused upgrade as a reply: 400 with the reason.
fn refusal_response(refusal: Refusal) -> Response {
    let mut response = bad_request(refusal.reason());
    if refusal == Refusal::WrongVersion {
        // RFC 6455 §4.4: tell the client which version the server speaks.
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
    response
}

fn bad_request(reason: &'static str) -> Response {
    warp::reply::with_status(reason, StatusCode::BAD_REQUEST).into_response()
}

/// Checks the handshake headers (RFC 6455 §4.2.1, as the tungstenite adapter does) and returns
/// the `Sec-WebSocket-Accept` value. (The method, GET, is warp's filter to check.)
fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, Refusal> {
    let pairs: Vec<_> = headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_bytes()))
        .collect();
    let accept = upgrade::accept_key(pairs.iter().copied())?;
    // base64 only: always a valid header value.
    HeaderValue::from_str(&accept).map_err(|_| Refusal::BadKey)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use warp::http::header::SEC_WEBSOCKET_KEY;

    #[test]
    fn a_header_map_is_checked_like_any_request() {
        let mut headers = HeaderMap::new();
        headers.append(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        headers.append(UPGRADE, HeaderValue::from_static("websocket"));
        headers.append(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        headers.append(
            SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(
            accept_key(&headers).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert_eq!(accept_key(&headers).unwrap_err(), Refusal::WrongVersion);
        let response = refusal_response(Refusal::WrongVersion);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[SEC_WEBSOCKET_VERSION], "13");
    }
}
