//! The wire protocol's frames: the one source of truth for what goes over the socket.
//!
//! Inbound text is decoded by [`decode_client_frame`], which treats every byte as hostile: any
//! input yields either a [`ClientFrame`] or a [`FrameError`] carrying the protocol error code
//! (`bad_frame` or `unknown_type`) and the frame's `ref` when one could be read, never a panic.
//! Outbound frames are [`ServerFrame`]s, serialized once by [`ServerFrame::encode`] into `Bytes`
//! that every recipient shares.
//!
//! The full protocol is described in `docs/protocol.md`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest `ref` a client may attach to a frame.
pub const MAX_REF_LEN: usize = 64;

/// The protocol's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, a missing or mistyped field, a binary frame.
    BadFrame,
    /// A `type` this server does not know.
    UnknownType,
    /// A room or user name outside the naming rules.
    InvalidName,
    /// A direct message, typing notice or history request aimed at oneself.
    InvalidTarget,
    /// The connection has not joined the room.
    NotMember,
    /// A body longer than the limit.
    TooLarge,
    /// Too many frames too fast.
    RateLimited,
    /// A backend (store, layer) failed: nothing was accepted, retrying is safe.
    Unavailable,
    /// The host's policy refused this join, send or direct message.
    Forbidden,
    /// The connection is already in as many rooms as it may be (an extension of protocol v1).
    TooManyRooms,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::UnknownType => "unknown_type",
            Self::InvalidName => "invalid_name",
            Self::InvalidTarget => "invalid_target",
            Self::NotMember => "not_member",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Forbidden => "forbidden",
            Self::TooManyRooms => "too_many_rooms",
        }
    }
}

/// Who a `typing`, `read` or `history` frame is about: a room, or the other user of a direct
/// conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `"room": name`.
    Room(String),
    /// `"to": name` (typing) or `"with": name` (read, history).
    User(String),
}

/// A frame from a client, decoded and type-checked (names and limits are checked by the engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Join a room, optionally resuming after the last id seen.
    Join {
        /// The room.
        room: String,
        /// Resume: stored messages with `id > since`.
        since: Option<u64>,
    },
    /// Leave a room.
    Leave {
        /// The room.
        room: String,
    },
    /// Post to a room.
    Send {
        /// The room.
        room: String,
        /// The text.
        body: String,
        /// The client's retry key.
        reference: Option<String>,
    },
    /// A private message.
    Direct {
        /// The recipient.
        to: String,
        /// The text.
        body: String,
        /// The client's retry key.
        reference: Option<String>,
    },
    /// "I am typing".
    Typing {
        /// A room, or a user.
        target: Target,
    },
    /// "I have read up to `id`".
    Read {
        /// A room, or the partner of a direct conversation.
        target: Target,
        /// The last id read.
        id: u64,
    },
    /// A page of stored messages.
    History {
        /// A room, or the partner of a direct conversation.
        target: Target,
        /// Messages with `id < before` (default: the newest).
        before: Option<u64>,
        /// Messages with `id > after`.
        after: Option<u64>,
        /// Page size.
        limit: Option<u64>,
    },
    /// The caller's direct conversations with unread counts.
    Inbox,
    /// The online users; `watch` turns presence events on or off.
    Who {
        /// Presence events from now on (`true`) or no more (`false`).
        watch: Option<bool>,
        /// Only users sorting after this name (paging, protocol 1.1).
        after: Option<String>,
    },
    /// A page of a room's members (protocol 1.1).
    Members {
        /// The room (membership needed).
        room: String,
        /// Only users sorting after this name.
        after: Option<String>,
        /// Page size.
        limit: Option<u64>,
    },
    /// Liveness check.
    Ping,
}

/// Why an inbound frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct FrameError {
    /// `bad_frame` or `unknown_type`.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// The frame's `ref`, when it had a readable one.
    pub reference: Option<String>,
}

impl FrameError {
    fn bad(message: impl Into<String>, reference: Option<String>) -> Self {
        Self {
            code: ErrorCode::BadFrame,
            message: message.into(),
            reference,
        }
    }
}

const KNOWN_TYPES: &[&str] = &[
    "join", "leave", "send", "direct", "typing", "read", "history", "inbox", "who", "members",
    "ping",
];

/// The typed shape of each frame, checked by serde once the `type` is known.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Wire {
    Join {
        room: String,
        since: Option<u64>,
    },
    Leave {
        room: String,
    },
    Send {
        room: String,
        body: String,
    },
    Direct {
        to: String,
        body: String,
    },
    Typing {
        room: Option<String>,
        to: Option<String>,
    },
    Read {
        room: Option<String>,
        with: Option<String>,
        id: u64,
    },
    History {
        room: Option<String>,
        with: Option<String>,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u64>,
    },
    Inbox {},
    Who {
        watch: Option<bool>,
        after: Option<String>,
    },
    Members {
        room: String,
        after: Option<String>,
        limit: Option<u64>,
    },
    Ping {},
}

/// Decodes one inbound text frame. Total: any input gives a frame or a [`FrameError`].
///
/// ```
/// use chat_core::protocol::{decode_client_frame, ClientFrame, ErrorCode};
///
/// let frame = decode_client_frame(br#"{"type":"join","room":"lobby"}"#).unwrap();
/// assert_eq!(frame, ClientFrame::Join { room: "lobby".into(), since: None });
///
/// let err = decode_client_frame(br#"{"type":"dance","ref":"r1"}"#).unwrap_err();
/// assert_eq!(err.code, ErrorCode::UnknownType);
/// assert_eq!(err.reference.as_deref(), Some("r1"));
/// ```
pub fn decode_client_frame(text: &[u8]) -> Result<ClientFrame, FrameError> {
    decode_with_ref(text).map(|(frame, _)| frame)
}

/// Like [`decode_client_frame`], also returning the frame's `ref` whatever its type, so that an
/// error about any frame can name it.
pub fn decode_with_ref(text: &[u8]) -> Result<(ClientFrame, Option<String>), FrameError> {
    let value: Value = serde_json::from_slice(text)
        .map_err(|e| FrameError::bad(format!("not JSON: {e}"), None))?;
    let Value::Object(map) = value else {
        return Err(FrameError::bad("a frame must be a JSON object", None));
    };
    let reference = read_ref(&map)?;
    let kind = match map.get("type") {
        Some(Value::String(kind)) => kind,
        Some(_) => return Err(FrameError::bad("\"type\" must be a string", reference)),
        None => return Err(FrameError::bad("missing \"type\"", reference)),
    };
    if !KNOWN_TYPES.contains(&kind.as_str()) {
        let shown: String = kind.chars().take(32).collect();
        return Err(FrameError {
            code: ErrorCode::UnknownType,
            message: format!("unknown frame type {shown:?}"),
            reference,
        });
    }
    let wire: Wire = serde_json::from_value(Value::Object(map))
        .map_err(|e| FrameError::bad(e.to_string(), reference.clone()))?;
    let either = |room: Option<String>, user: Option<String>, user_field: &str| match (room, user) {
        (Some(room), None) => Ok(Target::Room(room)),
        (None, Some(user)) => Ok(Target::User(user)),
        _ => Err(FrameError::bad(
            format!("exactly one of \"room\" and \"{user_field}\" is required"),
            reference.clone(),
        )),
    };
    let frame = match wire {
        Wire::Join { room, since } => ClientFrame::Join { room, since },
        Wire::Leave { room } => ClientFrame::Leave { room },
        Wire::Send { room, body } => ClientFrame::Send {
            room,
            body,
            reference: reference.clone(),
        },
        Wire::Direct { to, body } => ClientFrame::Direct {
            to,
            body,
            reference: reference.clone(),
        },
        Wire::Typing { room, to } => ClientFrame::Typing {
            target: either(room, to, "to")?,
        },
        Wire::Read { room, with, id } => ClientFrame::Read {
            target: either(room, with, "with")?,
            id,
        },
        Wire::History {
            room,
            with,
            before,
            after,
            limit,
        } => {
            if before.is_some() && after.is_some() {
                return Err(FrameError::bad(
                    "\"before\" and \"after\" exclude each other",
                    reference,
                ));
            }
            ClientFrame::History {
                target: either(room, with, "with")?,
                before,
                after,
                limit,
            }
        }
        Wire::Inbox {} => ClientFrame::Inbox,
        Wire::Who { watch, after } => ClientFrame::Who { watch, after },
        Wire::Members { room, after, limit } => ClientFrame::Members { room, after, limit },
        Wire::Ping {} => ClientFrame::Ping,
    };
    Ok((frame, reference))
}

fn read_ref(map: &Map<String, Value>) -> Result<Option<String>, FrameError> {
    match map.get("ref") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(r)) if r.contains('\0') => {
            Err(FrameError::bad("\"ref\" contains a NUL character", None))
        }
        Some(Value::String(r)) if r.chars().count() <= MAX_REF_LEN => Ok(Some(r.clone())),
        Some(Value::String(_)) => Err(FrameError::bad(
            format!("\"ref\" is longer than {MAX_REF_LEN} characters"),
            None,
        )),
        Some(_) => Err(FrameError::bad("\"ref\" must be a string", None)),
    }
}

/// `member` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberEvent {
    /// The user's first connection joined the room.
    Join,
    /// The user's last connection left the room.
    Leave,
}

/// `presence` statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    /// The user's first connection opened.
    Online,
    /// The user's last connection closed.
    Offline,
}

/// A stored message as it appears in live frames and in history pages: a room message carries
/// `room`, a direct message carries `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageView {
    /// `"message"` or `"direct"`, so that history entries render like live frames.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The room, for room messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// The id, strictly increasing within the conversation.
    pub id: u64,
    /// The author.
    pub from: String,
    /// The recipient, for direct messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The text.
    pub body: String,
    /// Milliseconds since the Unix epoch, set by the server.
    pub ts: u64,
}

impl MessageView {
    /// Serializes the live `message` or `direct` frame once; share it with every recipient.
    pub fn encode(&self) -> Bytes {
        encode_json(self)
    }
}

fn encode_json(value: &impl Serialize) -> Bytes {
    // Serializing these plain structs cannot fail: every key is a string and no value is a float
    // or a custom serializer. Fall back to an error frame rather than panic all the same.
    serde_json::to_vec(value).map_or_else(
        |_| {
            Bytes::from_static(
                br#"{"type":"error","code":"unavailable","message":"encoding failed"}"#,
            )
        },
        Bytes::from,
    )
}

/// One entry of an `inbox` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboxItem {
    /// The other user.
    pub with: String,
    /// The newest message id of the conversation.
    pub last_id: u64,
    /// The caller's read position (0 if none).
    pub read_id: u64,
    /// Messages from the other user after `read_id`.
    pub unread: u64,
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    /// The first frame on every connection.
    Welcome {
        /// The authenticated user.
        user: String,
        /// The history store's lifetime: a client that sees it change forgets the ids it
        /// remembers (protocol 1.1).
        epoch: String,
    },
    /// Reply to `join`.
    Joined {
        /// The room.
        room: String,
        /// The first users in the room, sorted (at most a page; `members` pages the rest).
        members: Vec<String>,
        /// How many users the room holds (protocol 1.1).
        member_count: usize,
        /// Recent or resumed messages, oldest first.
        history: Vec<MessageView>,
        /// On a plain join: whether older messages exist (page with `history` `before`). On a
        /// resuming join (`since`): whether the resume limit cut `history` (page with `history`
        /// `after`; the room's live messages wait until the client reaches the end).
        more: bool,
    },
    /// Reply to `leave`.
    Left {
        /// The room.
        room: String,
    },
    /// A user's first connection joined, or last connection left, a room.
    Member {
        /// The room.
        room: String,
        /// The user.
        user: String,
        /// Join or leave.
        event: MemberEvent,
    },
    /// The message was stored and handed over for delivery.
    Ack {
        /// The client's `ref`, if it sent one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// The id the message got.
        id: u64,
    },
    /// A user came online or went offline (to connections that watch).
    Presence {
        /// The user.
        user: String,
        /// Online or offline.
        status: PresenceStatus,
    },
    /// Reply to `who`.
    Online {
        /// Users with a live connection, sorted: a page of at most the server's limit.
        users: Vec<String>,
        /// How many users are online (protocol 1.1).
        count: usize,
        /// Whether further users follow; page on with `who` `after` (protocol 1.1).
        more: bool,
    },
    /// Reply to `members` (protocol 1.1).
    Members {
        /// The room.
        room: String,
        /// A page of the room's users, sorted.
        users: Vec<String>,
        /// How many users the room holds.
        count: usize,
        /// Whether further users follow.
        more: bool,
        /// The request's `ref` (an extension).
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// A large room's member count changed (protocol 1.1; at most once a second per room).
    #[serde(rename = "member_count")]
    MemberCount {
        /// The room.
        room: String,
        /// How many users it holds.
        count: usize,
    },
    /// Someone is typing.
    Typing {
        /// The room, for room typing.
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<String>,
        /// The recipient, for direct typing.
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        /// Who types.
        from: String,
    },
    /// Someone read up to `id`.
    Read {
        /// The room, for room receipts.
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<String>,
        /// The conversation as the recipient sees it, for direct receipts.
        #[serde(skip_serializing_if = "Option::is_none")]
        with: Option<String>,
        /// The reader.
        user: String,
        /// The read position.
        id: u64,
    },
    /// Reply to `history`.
    History {
        /// The room, for room history.
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<String>,
        /// The partner, for direct history.
        #[serde(skip_serializing_if = "Option::is_none")]
        with: Option<String>,
        /// Oldest first.
        messages: Vec<MessageView>,
        /// Whether more lie beyond in the direction asked.
        more: bool,
        /// The request's `ref`, so a client with several requests out matches the reply (an
        /// extension).
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// Reply to `inbox`.
    Inbox {
        /// Most recent first.
        conversations: Vec<InboxItem>,
    },
    /// Reply to `ping`.
    Pong,
    /// Something was refused; the connection stays open.
    Error {
        /// The protocol code.
        code: ErrorCode,
        /// For people.
        message: String,
        /// The refused frame's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// For `rate_limited`: milliseconds until the connection may send again (an extension).
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl ServerFrame {
    /// Serializes the frame once; share the result with every recipient.
    ///
    /// ```
    /// use chat_core::protocol::ServerFrame;
    /// let bytes = ServerFrame::Pong.encode();
    /// assert_eq!(&bytes[..], br#"{"type":"pong"}"#);
    /// ```
    pub fn encode(&self) -> Bytes {
        encode_json(self)
    }

    /// An `error` frame.
    pub fn error(code: ErrorCode, message: impl Into<String>, reference: Option<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
            reference,
            retry_after_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn code(text: &str) -> ErrorCode {
        decode_client_frame(text.as_bytes()).unwrap_err().code
    }

    #[test]
    fn every_client_frame_decodes() {
        let cases = [
            (
                r#"{"type":"join","room":"a","since":5}"#,
                ClientFrame::Join {
                    room: "a".into(),
                    since: Some(5),
                },
            ),
            (
                r#"{"type":"leave","room":"a"}"#,
                ClientFrame::Leave { room: "a".into() },
            ),
            (
                r#"{"type":"send","room":"a","body":"hi","ref":"r"}"#,
                ClientFrame::Send {
                    room: "a".into(),
                    body: "hi".into(),
                    reference: Some("r".into()),
                },
            ),
            (
                r#"{"type":"direct","to":"bob","body":"hi"}"#,
                ClientFrame::Direct {
                    to: "bob".into(),
                    body: "hi".into(),
                    reference: None,
                },
            ),
            (
                r#"{"type":"typing","to":"bob"}"#,
                ClientFrame::Typing {
                    target: Target::User("bob".into()),
                },
            ),
            (
                r#"{"type":"read","room":"a","id":3}"#,
                ClientFrame::Read {
                    target: Target::Room("a".into()),
                    id: 3,
                },
            ),
            (
                r#"{"type":"history","with":"bob","after":2,"limit":10}"#,
                ClientFrame::History {
                    target: Target::User("bob".into()),
                    before: None,
                    after: Some(2),
                    limit: Some(10),
                },
            ),
            (r#"{"type":"inbox"}"#, ClientFrame::Inbox),
            (
                r#"{"type":"who","watch":true}"#,
                ClientFrame::Who {
                    watch: Some(true),
                    after: None,
                },
            ),
            (
                r#"{"type":"who","after":"mallory"}"#,
                ClientFrame::Who {
                    watch: None,
                    after: Some("mallory".into()),
                },
            ),
            (
                r#"{"type":"members","room":"a","after":"bob","limit":10}"#,
                ClientFrame::Members {
                    room: "a".into(),
                    after: Some("bob".into()),
                    limit: Some(10),
                },
            ),
            (r#"{"type":"ping","extra":[1,2]}"#, ClientFrame::Ping),
        ];
        for (text, expected) in cases {
            assert_eq!(
                decode_client_frame(text.as_bytes()).unwrap(),
                expected,
                "{text}"
            );
        }
    }

    #[test]
    fn malformed_frames_are_bad_frame() {
        for text in [
            "",
            "nul",
            "[]",
            "42",
            "\"join\"",
            "{}",
            r#"{"type":5}"#,
            r#"{"type":"join"}"#,
            r#"{"type":"join","room":7}"#,
            r#"{"type":"join","room":"a","since":-1}"#,
            r#"{"type":"join","room":"a","since":1.5}"#,
            r#"{"type":"send","room":"a"}"#,
            r#"{"type":"typing"}"#,
            r#"{"type":"typing","room":"a","to":"b"}"#,
            r#"{"type":"history","room":"a","before":1,"after":2}"#,
            r#"{"type":"ping","ref":5}"#,
            r#"{"type":"ping","ref":"a\u0000b"}"#,
            r#"{"type":"read","room":"a"}"#,
        ] {
            assert_eq!(code(text), ErrorCode::BadFrame, "{text}");
        }
        assert_eq!(
            code(r#"{"type":"JOIN","room":"a"}"#),
            ErrorCode::UnknownType
        );
    }

    #[test]
    fn ref_is_echoed_when_readable() {
        let err = decode_client_frame(br#"{"type":"send","ref":"abc"}"#).unwrap_err();
        assert_eq!(err.reference.as_deref(), Some("abc"));
        let long = format!(r#"{{"type":"ping","ref":"{}"}}"#, "x".repeat(65));
        assert_eq!(code(&long), ErrorCode::BadFrame);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(code(&deep), ErrorCode::BadFrame);
        let deep_field = format!(
            r#"{{"type":"ping","x":{}1{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_eq!(code(&deep_field), ErrorCode::BadFrame);
    }

    #[test]
    fn server_frames_encode_as_the_protocol_says() {
        let frame = MessageView {
            kind: "message",
            room: Some("a".into()),
            id: 1,
            from: "alice".into(),
            to: None,
            body: "hi".into(),
            ts: 9,
        };
        assert_eq!(
            &frame.encode()[..],
            br#"{"type":"message","room":"a","id":1,"from":"alice","body":"hi","ts":9}"#
        );
        let ack = ServerFrame::Ack {
            reference: Some("r".into()),
            id: 4,
        };
        assert_eq!(&ack.encode()[..], br#"{"type":"ack","ref":"r","id":4}"#);
        let err = ServerFrame::error(ErrorCode::NotMember, "join first", None);
        assert_eq!(
            &err.encode()[..],
            br#"{"type":"error","code":"not_member","message":"join first"}"#
        );
        let member = ServerFrame::Member {
            room: "a".into(),
            user: "b".into(),
            event: MemberEvent::Join,
        };
        assert_eq!(
            &member.encode()[..],
            br#"{"type":"member","room":"a","user":"b","event":"join"}"#
        );
    }
}
