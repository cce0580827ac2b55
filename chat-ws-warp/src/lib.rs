//! chat-ws-warp: carries chat-core over warp WebSockets.
//!
//! [`routes`] is a warp filter for `GET /ws` and `GET /ws/chat/{room}/`. For each upgrade request
//! it asks the [`Chat`]'s authenticator about the handshake (path, query, headers) and answers
//! 401 before upgrading when it refuses; otherwise it upgrades, with the engine's frame size
//! limit applied at the WebSocket layer, and hands the socket's frames to [`Chat::serve`].
//!
//! Thin on purpose: message conversion, handshake mapping and socket options only. Heartbeats,
//! limits, rooms and everything else are the engine's, so the tungstenite adapter behaves the
//! same.
//!
//! One cost warp imposes: `warp::ws::Message::text` takes a `String` and has no constructor from
//! shared bytes, so each recipient's frame is copied once here. The engine still encodes each
//! message once; the tungstenite adapter shares it without any copy.
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

use bytes::Bytes;
use chat_core::auth::Handshake;
use chat_core::engine::{route, Inbound, Outbound, Route, Session};
use chat_core::Chat;
use warp::filters::path::FullPath;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::{Reply, Response};
use warp::ws::{Message, WebSocket, Ws};
use warp::{Filter, Rejection};

/// The chat endpoints as a warp filter: `/ws` and `/ws/chat/{room}/`. Compose it with the host's
/// own routes with `.or(...)`.
pub fn routes(chat: Chat) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::path("ws")
        .and(warp::get())
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::ws())
        .and(warp::any().map(move || chat.clone()))
        .and_then(upgrade)
}

async fn upgrade(
    path: FullPath,
    query: String,
    headers: HeaderMap,
    ws: Ws,
    chat: Chat,
) -> Result<Response, Rejection> {
    let Some(route) = route(path.as_str()) else {
        return Err(warp::reject::not_found());
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
    let limit = chat.config().max_frame_bytes;
    let reply = ws
        .max_frame_size(limit)
        .max_message_size(limit)
        .on_upgrade(move |socket| serve(chat, user, route, socket));
    Ok(reply.into_response())
}

async fn serve(chat: Chat, user: String, route: Route, socket: WebSocket) {
    chat.serve_socket(Session::new(user, route), socket, inbound, outbound)
        .await;
}

/// One socket message as the engine sees it; `None` ends the stream (close, or a broken socket).
fn inbound(message: Result<Message, warp::Error>) -> Option<Inbound> {
    match message {
        Ok(m) if m.is_text() => Some(Inbound::Text(m.into_bytes())),
        Ok(m) if m.is_binary() => Some(Inbound::Binary(m.into_bytes())),
        Ok(m) if m.is_ping() || m.is_pong() => Some(Inbound::Pong),
        Ok(_) => None,
        // warp hides tungstenite's error type; its capacity error reads "Space limit exceeded:
        // Message too long: …". The engine answers it with close 1009.
        Err(error) if error.to_string().contains("too long") => Some(Inbound::TooLarge),
        Err(error) => {
            tracing::debug!(%error, "socket read failed");
            None
        }
    }
}

fn outbound(frame: Outbound) -> Message {
    match frame {
        // Engine frames are always UTF-8 (serialized JSON); lossy conversion never alters them.
        Outbound::Text(text) => Message::text(String::from_utf8_lossy(&text).into_owned()),
        Outbound::Ping => Message::ping(Bytes::new()),
        Outbound::Close { code, reason } => Message::close_with(code, reason),
    }
}
