//! Property tests for inbound frame decoding: whatever a peer sends, decoding answers with a frame
//! or a protocol error, never a panic; and well-formed frames decode to what they say.

#![allow(clippy::unwrap_used)]

use chat_core::protocol::{decode_with_ref, ClientFrame, ErrorCode};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects that look like frames: a known or unknown type and a random mix of the real fields.
fn frame_like() -> impl Strategy<Value = Value> {
    let kinds = prop_oneof![
        Just("join"),
        Just("leave"),
        Just("send"),
        Just("direct"),
        Just("typing"),
        Just("read"),
        Just("history"),
        Just("inbox"),
        Just("who"),
        Just("ping"),
        Just("nope"),
    ];
    let fields = prop::collection::btree_map(
        prop_oneof![
            Just("room"),
            Just("to"),
            Just("with"),
            Just("body"),
            Just("ref"),
            Just("since"),
            Just("before"),
            Just("after"),
            Just("limit"),
            Just("id"),
            Just("watch"),
        ],
        json_value(),
        0..5,
    );
    (kinds, fields).prop_map(|(kind, fields)| {
        let mut map: serde_json::Map<String, Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        map.insert("type".into(), json!(kind));
        Value::Object(map)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Err(error) = decode_with_ref(&bytes) {
            prop_assert!(matches!(error.code, ErrorCode::BadFrame | ErrorCode::UnknownType));
        }
    }

    #[test]
    fn arbitrary_json_never_panics(value in json_value()) {
        let _ = decode_with_ref(value.to_string().as_bytes());
    }

    #[test]
    fn frame_like_objects_decode_or_fail_with_a_protocol_code(value in frame_like()) {
        let text = value.to_string();
        match decode_with_ref(text.as_bytes()) {
            Ok((_, reference)) => {
                let sent = value.get("ref").and_then(Value::as_str).map(str::to_owned);
                prop_assert_eq!(reference, sent);
            }
            Err(error) => {
                prop_assert!(!error.message.is_empty());
                let ref_ok = match value.get("ref") {
                    None | Some(Value::Null) => true,
                    // The decoder's rule: at most 64 characters, no NUL.
                    Some(Value::String(r)) => r.chars().count() <= 64 && !r.contains('\0'),
                    Some(_) => false,
                };
                // A malformed `ref` is itself a bad frame, found before the type is looked at.
                if value["type"] == "nope" && ref_ok {
                    prop_assert_eq!(error.code, ErrorCode::UnknownType);
                } else {
                    prop_assert_eq!(error.code, ErrorCode::BadFrame);
                }
            }
        }
    }

    #[test]
    fn well_formed_sends_round_trip(room in "[a-z]{1,10}", body in ".{1,50}", reference in "[a-z0-9]{0,64}") {
        let text = json!({"type": "send", "room": room, "body": body, "ref": reference}).to_string();
        let (frame, got_ref) = decode_with_ref(text.as_bytes()).unwrap();
        prop_assert_eq!(frame, ClientFrame::Send { room, body, reference: Some(reference.clone()) });
        prop_assert_eq!(got_ref, Some(reference));
    }
}
