//! chat-ws-warp: carries chat-core over warp WebSockets.
//!
//! [`routes`] is a warp filter for `GET /ws` and `GET /ws/chat/{room}/`. For each upgrade request
//! it checks the WebSocket handshake headers (400 with the reason when they are wrong), asks the
//! [`Chat`]'s authenticator about the handshake (path, query, headers) and answers 401 before
//! upgrading when it refuses; otherwise it answers 101 and, once hyper hands over the connection,
//! speaks WebSocket on it with tokio-tungstenite and hands the socket's frames to [`Chat::serve`].
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
//! enabled), answers the handshake itself (`Sec-WebSocket-Accept`), and builds the
//! `WebSocketStream` over the upgraded connection with the same configuration as the
//! tungstenite adapter: a 1 KiB read buffer, a 16 KiB write buffer and the engine's frame size
//! limit. Frames go out as `Utf8Bytes` built from the engine's shared `Bytes`: no copy per
//! recipient.
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
use chat_core::engine::{route, Route, Session};
use chat_core::Chat;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use warp::filters::path::FullPath;
use warp::http::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

/// The chat endpoints as a warp filter: `/ws` and `/ws/chat/{room}/`. Compose it with the host's
/// own routes with `.or(...)`.
///
/// A `GET` for one of these paths is answered here: 400 with the reason when it is not a valid
/// WebSocket handshake (RFC 6455: `Connection: upgrade`, `Upgrade: websocket`,
/// `Sec-WebSocket-Version: 13`, a `Sec-WebSocket-Key` of 16 bytes in base64, over HTTP/1.1), 401
/// when the authenticator refuses it, else 101 and the chat protocol on the socket. Other paths
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
            return Ok(refusal.into_response());
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
    let user = match chat.authenticate(&handshake).await {
        Ok(user) => user,
        Err(error) => {
            tracing::info!(%error, path = path.as_str(), "handshake refused");
            return Ok(
                warp::reply::with_status(error.to_string(), StatusCode::UNAUTHORIZED)
                    .into_response(),
            );
        }
    };
    // hyper completes the upgrade after it has written the 101 below; if the connection fails
    // first, `on_upgrade` resolves to an error and nothing is served.
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => serve(chat, user, route, upgraded).await,
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

async fn serve(chat: Chat, user: String, route: Route, upgraded: hyper::upgrade::Upgraded) {
    // The same socket settings and frame mapping as the tungstenite adapter.
    let config = chat_ws_tungstenite::websocket_config(&chat);
    let socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    chat_ws_tungstenite::serve_websocket(&chat, Session::new(user, route), socket).await;
}

/// Why an upgrade request was refused: the 400 reply's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NoConnectionUpgrade,
    NoUpgradeWebsocket,
    WrongVersion,
    NoKey,
    BadKey,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::NoConnectionUpgrade => {
                "not a WebSocket handshake: the Connection header must include \"upgrade\""
            }
            Refusal::NoUpgradeWebsocket => {
                "not a WebSocket handshake: the Upgrade header must be \"websocket\""
            }
            Refusal::WrongVersion => {
                "unsupported WebSocket version: Sec-WebSocket-Version must be 13"
            }
            Refusal::NoKey => "not a WebSocket handshake: the Sec-WebSocket-Key header is missing",
            Refusal::BadKey => {
                "bad WebSocket handshake: Sec-WebSocket-Key must be 16 bytes in base64"
            }
        }
    }

    fn into_response(self) -> Response {
        let mut response = bad_request(self.reason());
        if self == Refusal::WrongVersion {
            // RFC 6455 §4.4: tell the client which version the server speaks.
            response
                .headers_mut()
                .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        response
    }
}

fn bad_request(reason: &'static str) -> Response {
    warp::reply::with_status(reason, StatusCode::BAD_REQUEST).into_response()
}

/// Checks the handshake headers of RFC 6455 §4.2.1 and returns the `Sec-WebSocket-Accept`
/// value. (The method, GET, is warp's filter to check.)
fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, Refusal> {
    let has_token = |name, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(CONNECTION, "upgrade") {
        return Err(Refusal::NoConnectionUpgrade);
    }
    if !has_token(UPGRADE, "websocket") {
        return Err(Refusal::NoUpgradeWebsocket);
    }
    let mut versions = headers.get_all(SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(version), None) if version.as_bytes().trim_ascii() == b"13" => {}
        _ => return Err(Refusal::WrongVersion),
    }
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (None, _) => return Err(Refusal::NoKey),
        (Some(key), None) if is_valid_key(key.as_bytes()) => key,
        _ => return Err(Refusal::BadKey),
    };
    // base64 only: always a valid header value.
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(|_| Refusal::BadKey)
}

/// A key is 16 bytes in (padded, canonical) base64: 22 symbols, the last of which carries only
/// 2 bits, then `==`.
fn is_valid_key(key: &[u8]) -> bool {
    let is_symbol = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    match key {
        [symbols @ .., last, b'=', b'='] if key.len() == 24 => {
            symbols.iter().all(is_symbol) && matches!(last, b'A' | b'Q' | b'g' | b'w')
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn handshake(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    const GOOD: [(&str, &str); 4] = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn the_rfc_sample_handshake_is_accepted() {
        // RFC 6455 §1.3's example key and answer.
        assert_eq!(
            accept_key(&handshake(&GOOD)).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        // Token lists and any case, as browsers and proxies send them.
        let headers = handshake(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "AAAAAAAAAAAAAAAAAAAAAA=="),
        ]);
        assert!(accept_key(&headers).is_ok());
    }

    #[test]
    fn each_missing_or_wrong_header_has_its_reason() {
        let without = |name: &str| {
            let pairs: Vec<_> = GOOD.iter().copied().filter(|(n, _)| *n != name).collect();
            accept_key(&handshake(&pairs)).unwrap_err()
        };
        assert_eq!(without("connection"), Refusal::NoConnectionUpgrade);
        assert_eq!(without("upgrade"), Refusal::NoUpgradeWebsocket);
        assert_eq!(without("sec-websocket-version"), Refusal::WrongVersion);
        assert_eq!(without("sec-websocket-key"), Refusal::NoKey);

        let with = |name: &str, value: &'static str| {
            let mut headers = handshake(&GOOD);
            headers.insert(
                warp::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
            accept_key(&headers).unwrap_err()
        };
        assert_eq!(
            with("connection", "keep-alive"),
            Refusal::NoConnectionUpgrade
        );
        assert_eq!(with("upgrade", "h2c"), Refusal::NoUpgradeWebsocket);
        assert_eq!(with("sec-websocket-version", "8"), Refusal::WrongVersion);
        for key in [
            "",
            "dGhlIHNhbXBsZSBub25jZQ",           // unpadded
            "dGhlIHNhbXBsZSBub25jZR==",         // stray bits in the last symbol
            "dGhlIHNhbXBsZSBub25j*Q==",         // not base64
            "dGhlIHNhbXBsZSBub25jZQ==AAAA",     // too long
            "dGhlIHNhbXBsZSBub25jZSBub25jZQ==", // 22 bytes
        ] {
            let mut headers = handshake(&GOOD);
            headers.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_str(key).unwrap());
            assert_eq!(accept_key(&headers).unwrap_err(), Refusal::BadKey, "{key}");
        }
        let mut twice = handshake(&GOOD);
        twice.append(
            SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAAAA=="),
        );
        assert_eq!(accept_key(&twice).unwrap_err(), Refusal::BadKey);
    }

    #[test]
    fn non_ascii_header_values_are_refused_not_panicked_on() {
        let mut headers = handshake(&GOOD);
        headers.insert(CONNECTION, HeaderValue::from_bytes(b"upgr\xffade").unwrap());
        assert_eq!(
            accept_key(&headers).unwrap_err(),
            Refusal::NoConnectionUpgrade
        );
        let mut headers = handshake(&GOOD);
        headers.insert(
            SEC_WEBSOCKET_KEY,
            HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        );
        assert_eq!(accept_key(&headers).unwrap_err(), Refusal::BadKey);
    }
}
