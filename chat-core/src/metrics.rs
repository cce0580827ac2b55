//! What the engine measures, through the [`metrics`] facade: the host installs whichever
//! recorder it exports with (the example servers use `metrics-exporter-prometheus` and serve
//! `/metrics`); with none installed every measurement is a no-op.
//!
//! Handles are looked up once, when the [`Chat`](crate::Chat) is built, so a measurement on the
//! hot path is one atomic add: **install the recorder before building the `Chat`**. Frames sent
//! are counted once per write batch, not once per delivery.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `chat_connections_open` | gauge | | WebSocket connections being served by this node |
//! | `chat_connections_opened_total` | counter | | connections served since start |
//! | `chat_connections_closed_total` | counter | `reason` | connections ended, by [`CloseReason`] (`slow_consumer`: cut for not reading) |
//! | `chat_handshakes_refused_total` | counter | `reason` | upgrades refused: `origin`, `auth`, `server_full`, `user_full` |
//! | `chat_frames_in_total` | counter | `type` | client frames by type (`invalid`: not decodable) |
//! | `chat_frames_out_total` | counter | `type` | frames written to clients by type |
//! | `chat_errors_total` | counter | `code` | `error` frames sent, by code (`rate_limited` counts rate-limited frames) |
//! | `chat_layer_dropped_total` | counter | | layer messages a connection's full channel dropped (read back from the store) |
//! | `chat_store_seconds` | histogram | `op` | history store call latency |
//! | `chat_layer_seconds` | histogram | `op` | channel layer call latency |
//! | `chat_redis_reconnects_total` | counter | `connection` | Redis connections made again: `pubsub`, `command` |

use std::time::Instant;

use metrics::{Counter, Gauge, Histogram};

use crate::engine::CloseReason;
use crate::protocol::{ClientFrame, ErrorCode};

/// `chat_connections_open`.
pub const CONNECTIONS_OPEN: &str = "chat_connections_open";
/// `chat_connections_opened_total`.
pub const CONNECTIONS_OPENED: &str = "chat_connections_opened_total";
/// `chat_connections_closed_total{reason}`.
pub const CONNECTIONS_CLOSED: &str = "chat_connections_closed_total";
/// `chat_handshakes_refused_total{reason}`.
pub const HANDSHAKES_REFUSED: &str = "chat_handshakes_refused_total";
/// `chat_frames_in_total{type}`.
pub const FRAMES_IN: &str = "chat_frames_in_total";
/// `chat_frames_out_total{type}`.
pub const FRAMES_OUT: &str = "chat_frames_out_total";
/// `chat_errors_total{code}`.
pub const ERRORS: &str = "chat_errors_total";
/// `chat_layer_dropped_total`.
pub const LAYER_DROPPED: &str = "chat_layer_dropped_total";
/// `chat_store_seconds{op}`.
pub const STORE_SECONDS: &str = "chat_store_seconds";
/// `chat_layer_seconds{op}`.
pub const LAYER_SECONDS: &str = "chat_layer_seconds";
/// `chat_redis_reconnects_total{connection}`.
pub const REDIS_RECONNECTS: &str = "chat_redis_reconnects_total";

/// Client frame types, as labels; the last is for frames that did not decode.
pub(crate) const IN_TYPES: [&str; 12] = [
    "join", "leave", "send", "direct", "typing", "read", "history", "inbox", "who", "members",
    "ping", "invalid",
];

/// Server frame types, as labels, in the order [`out_type`] indexes them; the last is for
/// anything else.
pub(crate) const OUT_TYPES: [&str; 18] = [
    "message",
    "direct",
    "ack",
    "error",
    "welcome",
    "joined",
    "left",
    "member",
    "member_count",
    "presence",
    "online",
    "members",
    "typing",
    "read",
    "history",
    "inbox",
    "pong",
    "other",
];

const ERROR_CODES: [ErrorCode; 10] = [
    ErrorCode::BadFrame,
    ErrorCode::UnknownType,
    ErrorCode::InvalidName,
    ErrorCode::InvalidTarget,
    ErrorCode::NotMember,
    ErrorCode::TooLarge,
    ErrorCode::RateLimited,
    ErrorCode::Unavailable,
    ErrorCode::Forbidden,
    ErrorCode::TooManyRooms,
];

const CLOSE_REASONS: [CloseReason; 10] = [
    CloseReason::ClientClosed,
    CloseReason::FrameTooLarge,
    CloseReason::SlowConsumer,
    CloseReason::Flood,
    CloseReason::Disconnected,
    CloseReason::Shutdown,
    CloseReason::Unavailable,
    CloseReason::LeaseLost,
    CloseReason::PeerTimeout,
    CloseReason::TransportError,
];

/// Why a handshake was refused, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusedBy {
    Origin = 0,
    Auth = 1,
    ServerFull = 2,
    UserFull = 3,
}

const REFUSALS: [&str; 4] = ["origin", "auth", "server_full", "user_full"];

/// Store operations, as labels.
pub(crate) const STORE_OPS: [&str; 7] = [
    "append",
    "before",
    "after",
    "mark_read",
    "inbox",
    "direct_heads",
    "epoch",
];

/// Layer operations, as labels.
pub(crate) const LAYER_OPS: [&str; 5] = [
    "new_channel",
    "send",
    "group_add",
    "group_discard",
    "group_send",
];

/// The index of `code` in [`ERROR_CODES`] (a match, so a new code cannot be forgotten).
fn error_index(code: ErrorCode) -> usize {
    match code {
        ErrorCode::BadFrame => 0,
        ErrorCode::UnknownType => 1,
        ErrorCode::InvalidName => 2,
        ErrorCode::InvalidTarget => 3,
        ErrorCode::NotMember => 4,
        ErrorCode::TooLarge => 5,
        ErrorCode::RateLimited => 6,
        ErrorCode::Unavailable => 7,
        ErrorCode::Forbidden => 8,
        ErrorCode::TooManyRooms => 9,
    }
}

/// The index of `reason` in [`CLOSE_REASONS`].
fn close_index(reason: CloseReason) -> usize {
    match reason {
        CloseReason::ClientClosed => 0,
        CloseReason::FrameTooLarge => 1,
        CloseReason::SlowConsumer => 2,
        CloseReason::Flood => 3,
        CloseReason::Disconnected => 4,
        CloseReason::Shutdown => 5,
        CloseReason::Unavailable => 6,
        CloseReason::LeaseLost => 7,
        CloseReason::PeerTimeout => 8,
        CloseReason::TransportError => 9,
    }
}

/// A [`CloseReason`] as a label.
pub(crate) fn close_label(reason: CloseReason) -> &'static str {
    match reason {
        CloseReason::ClientClosed => "client_closed",
        CloseReason::FrameTooLarge => "frame_too_large",
        CloseReason::SlowConsumer => "slow_consumer",
        CloseReason::Flood => "flood",
        CloseReason::Disconnected => "disconnected",
        CloseReason::Shutdown => "shutdown",
        CloseReason::Unavailable => "unavailable",
        CloseReason::LeaseLost => "lease_lost",
        CloseReason::PeerTimeout => "peer_timeout",
        CloseReason::TransportError => "transport_error",
    }
}

/// The index in [`IN_TYPES`] of a decoded client frame.
pub(crate) fn in_type(frame: &ClientFrame) -> usize {
    match frame {
        ClientFrame::Join { .. } => 0,
        ClientFrame::Leave { .. } => 1,
        ClientFrame::Send { .. } => 2,
        ClientFrame::Direct { .. } => 3,
        ClientFrame::Typing { .. } => 4,
        ClientFrame::Read { .. } => 5,
        ClientFrame::History { .. } => 6,
        ClientFrame::Inbox => 7,
        ClientFrame::Who { .. } => 8,
        ClientFrame::Members { .. } => 9,
        ClientFrame::Ping => 10,
    }
}

/// [`IN_TYPES`]' label for a frame that did not decode.
pub(crate) const IN_INVALID: usize = IN_TYPES.len() - 1;

/// The index in [`OUT_TYPES`] of an encoded server frame, from its leading `{"type":"…"`
/// (every frame the engine encodes starts so).
pub(crate) fn out_type(frame: &[u8]) -> usize {
    const OTHER: usize = OUT_TYPES.len() - 1;
    let Some(rest) = frame.strip_prefix(br#"{"type":""#) else {
        return OTHER;
    };
    let Some(end) = rest.iter().position(|&b| b == b'"') else {
        return OTHER;
    };
    let name = &rest[..end];
    OUT_TYPES[..OTHER]
        .iter()
        .position(|t| t.as_bytes() == name)
        .unwrap_or(OTHER)
}

/// The engine's handles, looked up once per `Chat`.
pub(crate) struct Metrics {
    pub(crate) connections_open: Gauge,
    pub(crate) connections_opened: Counter,
    closed: [Counter; CLOSE_REASONS.len()],
    refused: [Counter; REFUSALS.len()],
    frames_in: [Counter; IN_TYPES.len()],
    frames_out: [Counter; OUT_TYPES.len()],
    errors: [Counter; ERROR_CODES.len()],
    pub(crate) layer_dropped: Counter,
}

impl Metrics {
    /// Describes every metric to the installed recorder and looks up the handles.
    pub(crate) fn new() -> Self {
        describe();
        Self {
            connections_open: metrics::gauge!(CONNECTIONS_OPEN),
            connections_opened: metrics::counter!(CONNECTIONS_OPENED),
            closed: CLOSE_REASONS.map(
                |reason| metrics::counter!(CONNECTIONS_CLOSED, "reason" => close_label(reason)),
            ),
            refused: REFUSALS
                .map(|reason| metrics::counter!(HANDSHAKES_REFUSED, "reason" => reason)),
            frames_in: IN_TYPES.map(|kind| metrics::counter!(FRAMES_IN, "type" => kind)),
            frames_out: OUT_TYPES.map(|kind| metrics::counter!(FRAMES_OUT, "type" => kind)),
            errors: ERROR_CODES.map(|code| metrics::counter!(ERRORS, "code" => code.as_str())),
            layer_dropped: metrics::counter!(LAYER_DROPPED),
        }
    }

    pub(crate) fn closed(&self, reason: CloseReason) {
        self.closed[close_index(reason)].increment(1);
    }

    pub(crate) fn refused(&self, by: RefusedBy) {
        self.refused[by as usize].increment(1);
    }

    /// A client frame of type `IN_TYPES[index]`.
    pub(crate) fn frame_in(&self, index: usize) {
        if let Some(counter) = self.frames_in.get(index) {
            counter.increment(1);
        }
    }

    pub(crate) fn error(&self, code: ErrorCode) {
        self.errors[error_index(code)].increment(1);
    }

    /// Counts a batch of frames about to be written: one add per type present.
    pub(crate) fn frames_out<'a>(&self, frames: impl IntoIterator<Item = &'a bytes::Bytes>) {
        let mut counts = [0u64; OUT_TYPES.len()];
        for frame in frames {
            counts[out_type(frame)] += 1;
        }
        for (counter, count) in self.frames_out.iter().zip(counts) {
            if count > 0 {
                counter.increment(count);
            }
        }
    }
}

/// Times a backend call into `histogram`.
pub(crate) async fn timed<T>(
    histogram: &Histogram,
    call: impl std::future::Future<Output = T>,
) -> T {
    let start = Instant::now();
    let result = call.await;
    histogram.record(start.elapsed().as_secs_f64());
    result
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        CONNECTIONS_OPEN,
        "WebSocket connections this node is serving"
    );
    describe_counter!(CONNECTIONS_OPENED, "Connections served since start");
    describe_counter!(CONNECTIONS_CLOSED, "Connections ended, by reason");
    describe_counter!(HANDSHAKES_REFUSED, "WebSocket upgrades refused, by reason");
    describe_counter!(FRAMES_IN, "Client frames received, by type");
    describe_counter!(FRAMES_OUT, "Frames written to clients, by type");
    describe_counter!(ERRORS, "Error frames sent, by code");
    describe_counter!(
        LAYER_DROPPED,
        "Channel-layer messages dropped for a busy connection (read back from the store)"
    );
    describe_histogram!(STORE_SECONDS, Unit::Seconds, "History store call latency");
    describe_histogram!(LAYER_SECONDS, Unit::Seconds, "Channel layer call latency");
    describe_counter!(
        REDIS_RECONNECTS,
        "Redis connections made again after a failure"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_classified_by_their_type() {
        assert_eq!(
            OUT_TYPES[out_type(br#"{"type":"message","id":1}"#)],
            "message"
        );
        assert_eq!(
            OUT_TYPES[out_type(br#"{"type":"member_count","n":1}"#)],
            "member_count"
        );
        assert_eq!(OUT_TYPES[out_type(br#"{"type":"members"}"#)], "members");
        assert_eq!(OUT_TYPES[out_type(br#"{"type":"pong"}"#)], "pong");
        assert_eq!(OUT_TYPES[out_type(br#"{"type":"other"}"#)], "other");
        assert_eq!(OUT_TYPES[out_type(br#"{"type":"weird"}"#)], "other");
        assert_eq!(OUT_TYPES[out_type(br#"{"type":"mess"#)], "other");
        assert_eq!(OUT_TYPES[out_type(b"[]")], "other");
    }

    #[test]
    fn every_close_reason_and_error_code_has_a_label() {
        for (index, code) in ERROR_CODES.iter().enumerate() {
            assert_eq!(error_index(*code), index);
        }
        for (index, reason) in CLOSE_REASONS.iter().enumerate() {
            assert_eq!(close_index(*reason), index);
        }
        let labels: std::collections::BTreeSet<_> =
            CLOSE_REASONS.iter().map(|r| close_label(*r)).collect();
        assert_eq!(labels.len(), CLOSE_REASONS.len());
        let codes: std::collections::BTreeSet<_> = ERROR_CODES.iter().map(|c| c.as_str()).collect();
        assert_eq!(codes.len(), ERROR_CODES.len());
    }
}
