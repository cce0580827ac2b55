//! Property tests for inbound frames, generated from the protocol's grammar (`docs/protocol.md`)
//! rather than from random bytes, which are almost never JSON and so never reach past the parser.
//!
//! A generated frame is well formed: any frame type with its required fields, its optional ones
//! present, absent or `null`, a `ref` or none, extra fields, keys in any order, any whitespace
//! and any valid JSON escaping, and names and bodies that are valid, invalid or odd Unicode (NUL,
//! marks, emoji, noncharacters). It must decode to the frame it was built as. A mutation then
//! breaks it as peers do: a required field dropped, a field of the wrong JSON type, negative,
//! fractional or huge numbers, an overlong or NUL-bearing `ref`, an unknown type, lone
//! surrogates, truncation, trailing garbage, flipped bytes. Where the protocol says what the
//! answer is, the test checks that answer, code and echoed `ref`; where nobody can say (flipped
//! bytes), the decoder must still answer with a frame or one of its two codes, never panic.
//!
//! The last property sends sequences of such frames through an engine connection and checks each
//! reply against a small model of the protocol: what the connection has joined, which ids it was
//! given, which refs it used.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use bytes::Bytes;
use chat_core::engine::{CloseReason, Inbound};
use chat_core::protocol::{decode_with_ref, ClientFrame, ErrorCode, Target};
use chat_core::ChatConfig;
use common::Client;
use proptest::prelude::*;
use proptest::sample::Index;
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

// ---------------------------------------------------------------------------------------------
// The grammar: frames built field by field, with the frame each must decode to.
// ---------------------------------------------------------------------------------------------

/// The user the engine property connects as; in the user pool so that frames aim at oneself.
const ME: &str = "alice";
/// Room names the generator favours, so that a sequence joins, sends to and leaves the same rooms.
const ROOMS: &[&str] = &["lobby", "a", "b-2.x_Y"];
/// User names the generator favours; `alice` is the engine property's own user.
const USERS: &[&str] = &["bob", "carol", ME];
/// Every field name the protocol gives a meaning; extra fields avoid them.
const PROTOCOL_FIELDS: &[&str] = &[
    "type", "ref", "room", "to", "with", "body", "since", "before", "after", "limit", "id", "watch",
];
/// The frame types the protocol knows.
const KNOWN_TYPES: &[&str] = &[
    "join", "leave", "send", "direct", "typing", "read", "history", "inbox", "who", "members",
    "ping",
];

/// Strings a careless or hostile client sends where a name goes.
const ODD: &[&str] = &[
    "",
    "two words",
    "nul\u{0}inside",
    "\u{0}",
    "salle-été",
    "😀🎉",
    "\u{202e}evil",
    "e\u{301}\u{301}",
    "\u{feff}lobby",
    "\u{fffe}\u{ffff}\u{10ffff}",
    "lobby\n",
    "\"quoted\\",
    "lobby/../x",
];

fn odd_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(ODD).prop_map(str::to_owned),
        1 => Just("r".repeat(101)),
        1 => Just("u".repeat(65)),
        3 => prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter),
    ]
    .boxed()
}

fn room() -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::sample::select(ROOMS).prop_map(str::to_owned),
        1 => "[A-Za-z0-9._-]{1,100}",
        2 => odd_string(),
    ]
    .boxed()
}

fn user() -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::sample::select(USERS).prop_map(str::to_owned),
        1 => "[A-Za-z0-9._-]{1,64}",
        2 => odd_string(),
    ]
    .boxed()
}

/// A name to page after (`who`, `members`): any string is allowed there.
fn after_name() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(&["", "a", "alice", "alicf", "b", "zzz"][..]).prop_map(str::to_owned),
        odd_string(),
    ]
    .boxed()
}

fn body() -> BoxedStrategy<String> {
    prop_oneof![
        8 => "[ -~]{1,40}",
        2 => odd_string(),
        1 => Just("é".repeat(4_096)),
        1 => Just("x".repeat(4_097)),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<u64> {
    prop_oneof![4 => 0..20u64, 2 => any::<u64>(), 1 => Just(u64::MAX)].boxed()
}

fn target() -> BoxedStrategy<Target> {
    prop_oneof![room().prop_map(Target::Room), user().prop_map(Target::User)].boxed()
}

/// How a frame carries its `ref`.
#[derive(Clone, Debug)]
enum RefChoice {
    Absent,
    Null,
    Text(String),
}

impl RefChoice {
    fn reference(&self) -> Option<String> {
        match self {
            Self::Text(r) => Some(r.clone()),
            Self::Absent | Self::Null => None,
        }
    }
}

/// Valid refs: at most 64 characters, no NUL.
fn reference() -> BoxedStrategy<RefChoice> {
    prop_oneof![
        3 => Just(RefChoice::Absent),
        1 => Just(RefChoice::Null),
        3 => prop::sample::select(&["r1", "r2"][..]).prop_map(|r| RefChoice::Text(r.to_owned())),
        2 => "[ -~]{0,64}".prop_map(RefChoice::Text),
        1 => Just(RefChoice::Text("é".repeat(64))),
        1 => prop::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..64)
            .prop_map(|chars| RefChoice::Text(String::from_iter(chars))),
    ]
    .boxed()
}

/// What a field is, for the mutations that break it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Type,
    Ref,
    Text,
    Number,
    Flag,
    Extra,
}

/// A field's value: a string to be quoted (with the frame's escaping), or raw JSON bytes.
#[derive(Clone, Debug)]
enum Val {
    Text(String),
    Raw(Vec<u8>),
}

fn raw(text: &str) -> Val {
    Val::Raw(text.as_bytes().to_vec())
}

#[derive(Clone, Debug)]
struct Field {
    key: String,
    value: Val,
    kind: Kind,
    /// Dropping it makes the frame a `bad_frame`.
    required: bool,
}

/// A well-formed frame and what it decodes to.
#[derive(Clone, Debug)]
struct Frame {
    fields: Vec<Field>,
    expected: ClientFrame,
    reference: Option<String>,
}

struct Builder {
    fields: Vec<Field>,
    /// Write absent optional fields as `null`, which means the same.
    nulls: bool,
}

impl Builder {
    fn new(kind: &str, reference: &RefChoice, nulls: bool) -> Self {
        let mut builder = Self {
            fields: Vec::new(),
            nulls,
        };
        builder.push("type", Val::Text(kind.to_owned()), Kind::Type, false);
        match reference {
            RefChoice::Absent => {}
            RefChoice::Null => builder.push("ref", raw("null"), Kind::Ref, false),
            RefChoice::Text(r) => builder.push("ref", Val::Text(r.clone()), Kind::Ref, false),
        }
        builder
    }

    fn push(&mut self, key: &str, value: Val, kind: Kind, required: bool) {
        self.fields.push(Field {
            key: key.to_owned(),
            value,
            kind,
            required,
        });
    }

    fn absent(&mut self, key: &str, kind: Kind) {
        if self.nulls {
            self.push(key, raw("null"), kind, false);
        }
    }

    fn text(&mut self, key: &str, value: &str, required: bool) {
        self.push(key, Val::Text(value.to_owned()), Kind::Text, required);
    }

    fn opt_text(&mut self, key: &str, value: Option<&String>) {
        match value {
            Some(value) => self.text(key, value, false),
            None => self.absent(key, Kind::Text),
        }
    }

    fn number(&mut self, key: &str, value: u64, required: bool) {
        self.push(key, raw(&value.to_string()), Kind::Number, required);
    }

    fn opt_number(&mut self, key: &str, value: Option<u64>) {
        match value {
            Some(value) => self.number(key, value, false),
            None => self.absent(key, Kind::Number),
        }
    }

    fn opt_flag(&mut self, key: &str, value: Option<bool>) {
        match value {
            Some(value) => self.push(key, raw(&value.to_string()), Kind::Flag, false),
            None => self.absent(key, Kind::Flag),
        }
    }

    /// `room`, or `user_key` (`to` or `with`): exactly one of them.
    fn target(&mut self, target: &Target, user_key: &str) {
        match target {
            Target::Room(room) => {
                self.text("room", room, true);
                self.absent(user_key, Kind::Text);
            }
            Target::User(user) => {
                self.text(user_key, user, true);
                self.absent("room", Kind::Text);
            }
        }
    }

    fn finish(self, expected: ClientFrame, reference: &RefChoice) -> Frame {
        Frame {
            fields: self.fields,
            expected,
            reference: reference.reference(),
        }
    }
}

/// `history` reads one way or the other, or from the newest.
#[derive(Clone, Copy, Debug)]
enum Bound {
    Newest,
    Before(u64),
    After(u64),
}

/// How often each frame type comes, in the order join, leave, send, direct, typing, read, history,
/// inbox, who, members, ping.
type Mix = [u32; 11];

/// Every type as often as any other.
const EVERY_TYPE: Mix = [1; 11];
/// A connection's traffic: mostly joins and messages, so that sequences reach the paths behind
/// membership (sends acked and echoed, retries, history pages) rather than `not_member`.
const TRAFFIC: Mix = [4, 1, 6, 3, 1, 1, 2, 1, 1, 1, 1];

/// Every client frame type of the protocol, with its fields.
fn frame(w: Mix) -> BoxedStrategy<Frame> {
    let head = || (reference(), any::<bool>());
    prop_oneof![
        w[0] => (room(), prop::option::of(number()), head()).prop_map(|(room, since, (r, nulls))| {
            let mut b = Builder::new("join", &r, nulls);
            b.text("room", &room, true);
            b.opt_number("since", since);
            b.finish(ClientFrame::Join { room, since }, &r)
        }),
        w[1] => (room(), head()).prop_map(|(room, (r, nulls))| {
            let mut b = Builder::new("leave", &r, nulls);
            b.text("room", &room, true);
            b.finish(ClientFrame::Leave { room }, &r)
        }),
        w[2] => (room(), body(), head()).prop_map(|(room, body, (r, nulls))| {
            let mut b = Builder::new("send", &r, nulls);
            b.text("room", &room, true);
            b.text("body", &body, true);
            let reference = r.reference();
            b.finish(ClientFrame::Send { room, body, reference }, &r)
        }),
        w[3] => (user(), body(), head()).prop_map(|(to, body, (r, nulls))| {
            let mut b = Builder::new("direct", &r, nulls);
            b.text("to", &to, true);
            b.text("body", &body, true);
            let reference = r.reference();
            b.finish(ClientFrame::Direct { to, body, reference }, &r)
        }),
        w[4] => (target(), head()).prop_map(|(target, (r, nulls))| {
            let mut b = Builder::new("typing", &r, nulls);
            b.target(&target, "to");
            b.finish(ClientFrame::Typing { target }, &r)
        }),
        w[5] => (target(), number(), head()).prop_map(|(target, id, (r, nulls))| {
            let mut b = Builder::new("read", &r, nulls);
            b.target(&target, "with");
            b.number("id", id, true);
            b.finish(ClientFrame::Read { target, id }, &r)
        }),
        w[6] => (
            target(),
            prop_oneof![
                Just(Bound::Newest),
                number().prop_map(Bound::Before),
                number().prop_map(Bound::After)
            ],
            prop::option::of(number()),
            head()
        )
            .prop_map(|(target, bound, limit, (r, nulls))| {
                let mut b = Builder::new("history", &r, nulls);
                b.target(&target, "with");
                let (before, after) = match bound {
                    Bound::Newest => (None, None),
                    Bound::Before(id) => (Some(id), None),
                    Bound::After(id) => (None, Some(id)),
                };
                b.opt_number("before", before);
                b.opt_number("after", after);
                b.opt_number("limit", limit);
                let expected = ClientFrame::History {
                    target,
                    before,
                    after,
                    limit,
                };
                b.finish(expected, &r)
            }),
        w[7] => head()
            .prop_map(|(r, nulls)| Builder::new("inbox", &r, nulls).finish(ClientFrame::Inbox, &r)),
        w[8] => (
            prop::option::of(any::<bool>()),
            prop::option::of(after_name()),
            head()
        )
            .prop_map(|(watch, after, (r, nulls))| {
                let mut b = Builder::new("who", &r, nulls);
                b.opt_flag("watch", watch);
                b.opt_text("after", after.as_ref());
                b.finish(ClientFrame::Who { watch, after }, &r)
            }),
        w[9] => (
            room(),
            prop::option::of(after_name()),
            prop::option::of(number()),
            head()
        )
            .prop_map(|(room, after, limit, (r, nulls))| {
                let mut b = Builder::new("members", &r, nulls);
                b.text("room", &room, true);
                b.opt_text("after", after.as_ref());
                b.opt_number("limit", limit);
                b.finish(ClientFrame::Members { room, after, limit }, &r)
            }),
        w[10] => head()
            .prop_map(|(r, nulls)| Builder::new("ping", &r, nulls).finish(ClientFrame::Ping, &r)),
    ]
    .boxed()
}

/// Values for extra fields. Fixed ones rather than [`json_value`], which costs more to generate
/// than everything else in a case; nesting has a mutation of its own.
const EXTRA_VALUES: &[&str] = &[
    "null",
    "0",
    "-7",
    "2.5e-3",
    "true",
    "\"\"",
    "\"join\"",
    "\"\\u0000\"",
    "[]",
    "[1,\"two\",null]",
    "{}",
    "{\"type\":\"leave\",\"room\":\"lobby\"}",
];

/// Fields the protocol does not define, which a decoder ignores (room for later versions).
fn extras() -> BoxedStrategy<Vec<Field>> {
    let key = "[a-z_]{1,8}".prop_filter("not a protocol field", |k| {
        !PROTOCOL_FIELDS.contains(&k.as_str()) && k != "pad" && k != "deep"
    });
    prop::collection::vec((key, prop::sample::select(EXTRA_VALUES)), 0..3)
        .prop_map(|extras| {
            extras
                .into_iter()
                .map(|(key, value)| Field {
                    key,
                    value: raw(value),
                    kind: Kind::Extra,
                    required: false,
                })
                .collect()
        })
        .boxed()
}

/// How the object is written: key order, escaping, whitespace.
#[derive(Clone, Debug)]
struct Layout {
    order: u64,
    escape_everything: bool,
    spacing: u8,
}

fn layout() -> impl Strategy<Value = Layout> {
    (any::<u64>(), any::<bool>(), 0..4u8).prop_map(|(order, escape_everything, spacing)| Layout {
        order,
        escape_everything,
        spacing,
    })
}

/// A JSON string literal; with `everything`, every character as a `\u` escape (surrogate pairs
/// beyond the BMP), which must mean the same.
fn quote(text: &str, everything: bool) -> Vec<u8> {
    if !everything {
        return serde_json::to_vec(text).unwrap();
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(text.len() * 6 + 2);
    out.push(b'"');
    for unit in text.encode_utf16() {
        out.extend_from_slice(b"\\u");
        for shift in [12, 8, 4, 0] {
            out.push(HEX[usize::from((unit >> shift) & 0xf)]);
        }
    }
    out.push(b'"');
    out
}

fn render(fields: &[Field], layout: &Layout) -> Vec<u8> {
    let (edge, comma, colon): (&[u8], &[u8], &[u8]) = match layout.spacing {
        0 => (b"", b",", b":"),
        1 => (b" ", b", ", b": "),
        2 => (b"\n\t", b",\n\t", b" :\t"),
        _ => (b"\r\n ", b" ,", b":"),
    };
    let mut out = Vec::new();
    out.extend_from_slice(edge);
    out.push(b'{');
    out.extend_from_slice(edge);
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(comma);
        }
        out.extend(quote(&field.key, layout.escape_everything));
        out.extend_from_slice(colon);
        match &field.value {
            Val::Text(text) => out.extend(quote(text, layout.escape_everything)),
            Val::Raw(bytes) => out.extend_from_slice(bytes),
        }
    }
    out.extend_from_slice(edge);
    out.push(b'}');
    out.extend_from_slice(edge);
    out
}

/// A deterministic shuffle (Fisher–Yates, splitmix64), so a case is reproducible from its seed.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let j = usize::try_from(z % (i as u64 + 1)).unwrap();
        items.swap(i, j);
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations, and the answer the protocol gives to each.
// ---------------------------------------------------------------------------------------------

/// Values of the wrong JSON type for a string field (never `null`, which means "absent").
const NOT_TEXT: &[&str] = &[
    "5",
    "-1",
    "1.5",
    "true",
    "false",
    "[]",
    "[\"lobby\"]",
    "{}",
    "{\"room\":\"a\"}",
];
/// Values of the wrong JSON type for a number field.
const NOT_NUMBER: &[&str] = &["\"5\"", "\"\"", "true", "[]", "[5]", "{}", "{\"id\":5}"];
/// Values of the wrong JSON type for a boolean field.
const NOT_FLAG: &[&str] = &["\"true\"", "1", "0", "\"\"", "[]", "{}"];
/// Numbers no id, `since` or `limit` can be: negative, fractional, in exponent form, too large.
const BAD_NUMBERS: &[&str] = &[
    "-1",
    "-9223372036854775808",
    "0.5",
    "1.0",
    "3.14e2",
    "1e3",
    "1E2",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
];
/// String literals that are not JSON: lone surrogates, raw control characters, invalid UTF-8.
const NOT_STRINGS: &[&[u8]] = &[
    b"\"\\ud800\"",
    b"\"x\\udfff\"",
    b"\"\\ud83dx\"",
    b"\"\\ud83d\\u0041\"",
    b"\"\\x41\"",
    b"\"tab\there\"",
    b"\"\xc3\x28\"",
    b"\"\xff\"",
    b"\"unterminated",
];
/// What may follow a complete object and make the text no longer JSON.
const TRAILING: &[&str] = &["x", "}", ",", "{}", "\u{0}", "//", "null", "]"];
/// Any value, for a duplicate key whose meaning nobody promises.
const ANY_VALUES: &[&str] = &[
    "null",
    "\"lobby\"",
    "\"\"",
    "7",
    "-0",
    "0.0",
    "1e400",
    "true",
    "[]",
    "{}",
    "\"\\u0000\"",
];

#[derive(Clone, Debug)]
enum Mutation {
    Keep,
    /// Drops a required field, or `type` when the frame has none.
    Drop(Index),
    /// Gives a field (not an extra one) a value of the wrong JSON type.
    WrongType(Index, Index),
    /// Gives a number field (or `type`, when there is none) an impossible number.
    BadNumber(Index, Index),
    /// Repeats a field with its own value.
    Duplicate(Index),
    /// Repeats a field's key with any value.
    DuplicateOther(Index, Index),
    /// Both `room` and `to`/`with`, or both `before` and `after`.
    Conflict,
    LongRef(String),
    NulRef(String),
    UnknownType(String),
    /// Replaces a string field's literal with one that is not JSON.
    NotAString(Index, Index),
    /// Cuts the text before its closing brace.
    Truncate(Index),
    Trailing(Index),
    /// Wraps the object in an array, a string, or replaces it with a scalar.
    NotAnObject(Index),
    Flip(Vec<(Index, u8)>),
    /// An extra field of this many bytes: decodes, but may exceed the engine's frame limit.
    Pad(usize),
    /// An extra field nested this deep.
    Deep(usize),
}

fn unknown_type() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(
            &[
                "JOIN",
                "Join",
                "join ",
                " ping",
                "",
                "pong",
                "message",
                "welcome",
                "error",
                "joined",
                "send\u{0}",
                "ping\u{200b}"
            ][..]
        )
        .prop_map(str::to_owned),
        "[a-z_]{1,12}",
        odd_string(),
    ]
    .prop_filter("unknown", |t| !KNOWN_TYPES.contains(&t.as_str()))
    .boxed()
}

/// Mutations; `keep` weighs a well-formed frame against the mutations' weights (20 in all).
fn mutation(keep: u32) -> BoxedStrategy<Mutation> {
    let long_ref = prop_oneof![
        "[ -~]{65,200}",
        Just("é".repeat(65)),
        Just("x".repeat(10_000)),
    ];
    let nul_ref = ("[a-z]{0,10}", "[a-z]{0,10}").prop_map(|(a, b)| format!("{a}\u{0}{b}"));
    prop_oneof![
        keep => Just(Mutation::Keep),
        2 => any::<Index>().prop_map(Mutation::Drop),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(f, v)| Mutation::WrongType(f, v)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(f, v)| Mutation::BadNumber(f, v)),
        1 => any::<Index>().prop_map(Mutation::Duplicate),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(f, v)| Mutation::DuplicateOther(f, v)),
        1 => Just(Mutation::Conflict),
        1 => long_ref.prop_map(Mutation::LongRef),
        1 => nul_ref.prop_map(Mutation::NulRef),
        1 => unknown_type().prop_map(Mutation::UnknownType),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(f, v)| Mutation::NotAString(f, v)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => any::<Index>().prop_map(Mutation::Trailing),
        1 => any::<Index>().prop_map(Mutation::NotAnObject),
        2 => prop::collection::vec((any::<Index>(), 1..=255u8), 1..4).prop_map(Mutation::Flip),
        1 => prop_oneof![9 => 1..200usize, 1 => 65_000..66_000usize].prop_map(Mutation::Pad),
        1 => (1..300usize).prop_map(Mutation::Deep),
    ]
    .boxed()
}

/// The decoder's answer the protocol calls for.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    /// Exactly this frame and `ref`.
    Frame(ClientFrame, Option<String>),
    /// An error with exactly this code and echoed `ref`.
    Error(ErrorCode, Option<String>),
    /// This frame, or `bad_frame` (a strict parser may refuse duplicate keys or deep nesting).
    FrameOrBadFrame(ClientFrame, Option<String>),
    /// Some frame, or `bad_frame` or `unknown_type`.
    Anything,
}

/// A generated frame, how it is written, and how it is broken.
#[derive(Clone)]
struct Case {
    frame: Frame,
    extras: Vec<Field>,
    layout: Layout,
    mutation: Mutation,
}

fn case(mix: Mix, mutation: BoxedStrategy<Mutation>) -> impl Strategy<Value = Case> {
    (frame(mix), extras(), layout(), mutation).prop_map(|(frame, extras, layout, mutation)| Case {
        frame,
        extras,
        layout,
        mutation,
    })
}

/// Replaces the value of `key`, or adds the field.
fn set(fields: &mut Vec<Field>, key: &str, value: Val, kind: Kind) {
    match fields.iter_mut().find(|f| f.key == key) {
        Some(field) => field.value = value,
        None => fields.push(Field {
            key: key.to_owned(),
            value,
            kind,
            required: false,
        }),
    }
}

/// The position of one of the fields `pick` allows, if any.
fn pick(fields: &[Field], index: &Index, allowed: impl Fn(&Field) -> bool) -> Option<usize> {
    let candidates: Vec<usize> = (0..fields.len()).filter(|&i| allowed(&fields[i])).collect();
    (!candidates.is_empty()).then(|| candidates[index.index(candidates.len())])
}

fn type_position(fields: &[Field]) -> usize {
    fields.iter().position(|f| f.kind == Kind::Type).unwrap()
}

impl Case {
    /// The text the client sends, and the answer the protocol calls for.
    fn build(&self) -> (Vec<u8>, Expect) {
        let mut fields = self.frame.fields.clone();
        fields.extend(self.extras.iter().cloned());
        shuffle(&mut fields, self.layout.order);
        let expected = self.frame.expected.clone();
        let reference = self.frame.reference.clone();
        let bad = |reference: Option<String>| Expect::Error(ErrorCode::BadFrame, reference);
        let expect = match &self.mutation {
            Mutation::Keep => Expect::Frame(expected, reference),
            Mutation::Drop(index) => {
                let at = pick(&fields, index, |f| f.required).unwrap_or(type_position(&fields));
                fields.remove(at);
                bad(reference)
            }
            Mutation::WrongType(index, value) => {
                let at = pick(&fields, index, |f| f.kind != Kind::Extra).unwrap();
                let kind = fields[at].kind;
                let pool = match kind {
                    Kind::Number => NOT_NUMBER,
                    Kind::Flag => NOT_FLAG,
                    Kind::Type | Kind::Ref | Kind::Text | Kind::Extra => NOT_TEXT,
                };
                fields[at].value = raw(value.get::<&str>(pool));
                // An unreadable `ref` cannot be echoed.
                bad(if kind == Kind::Ref { None } else { reference })
            }
            Mutation::BadNumber(index, value) => {
                let at = pick(&fields, index, |f| f.kind == Kind::Number)
                    .unwrap_or(type_position(&fields));
                fields[at].value = raw(value.get::<&str>(BAD_NUMBERS));
                bad(reference)
            }
            Mutation::Duplicate(index) => {
                let copy = fields[index.index(fields.len())].clone();
                fields.push(copy);
                Expect::FrameOrBadFrame(expected, reference)
            }
            Mutation::DuplicateOther(index, value) => {
                let mut copy = fields[index.index(fields.len())].clone();
                copy.value = raw(value.get::<&str>(ANY_VALUES));
                fields.push(copy);
                Expect::Anything
            }
            Mutation::Conflict => {
                let other_target = |target: &Target, user_key: &str| match target {
                    Target::Room(_) => (user_key.to_owned(), Val::Text("bob".into())),
                    Target::User(_) => ("room".to_owned(), Val::Text("lobby".into())),
                };
                let conflict = match &self.frame.expected {
                    ClientFrame::Typing { target } => Some(other_target(target, "to")),
                    ClientFrame::Read { target, .. } => Some(other_target(target, "with")),
                    ClientFrame::History {
                        before: Some(_), ..
                    } => Some(("after".to_owned(), raw("1"))),
                    ClientFrame::History { after: Some(_), .. } => {
                        Some(("before".to_owned(), raw("1")))
                    }
                    ClientFrame::History { target, .. } => Some(other_target(target, "with")),
                    _ => None,
                };
                match conflict {
                    Some((key, value)) => set(&mut fields, &key, value, Kind::Text),
                    // Nothing to conflict with: a missing `type` instead.
                    None => drop(fields.remove(type_position(&fields))),
                }
                bad(reference)
            }
            Mutation::LongRef(r) | Mutation::NulRef(r) => {
                set(&mut fields, "ref", Val::Text(r.clone()), Kind::Ref);
                bad(None)
            }
            Mutation::UnknownType(kind) => {
                let at = type_position(&fields);
                fields[at].value = Val::Text(kind.clone());
                Expect::Error(ErrorCode::UnknownType, reference)
            }
            Mutation::NotAString(index, value) => {
                let at = pick(&fields, index, |f| {
                    matches!(f.kind, Kind::Type | Kind::Ref | Kind::Text)
                })
                .unwrap();
                fields[at].value = Val::Raw(value.get(NOT_STRINGS).to_vec());
                bad(None)
            }
            Mutation::Pad(bytes) => {
                set(
                    &mut fields,
                    "pad",
                    Val::Text("x".repeat(*bytes)),
                    Kind::Extra,
                );
                Expect::Frame(expected, reference)
            }
            Mutation::Deep(depth) => {
                let nested = format!("{}{}", "[".repeat(*depth), "]".repeat(*depth));
                set(&mut fields, "deep", raw(&nested), Kind::Extra);
                Expect::FrameOrBadFrame(expected, reference)
            }
            Mutation::Truncate(_)
            | Mutation::Trailing(_)
            | Mutation::NotAnObject(_)
            | Mutation::Flip(_) => Expect::Anything,
        };
        let mut text = render(&fields, &self.layout);
        let expect = match &self.mutation {
            Mutation::Truncate(index) => {
                // Any cut before the closing brace leaves an unclosed object: never JSON.
                let brace = text.iter().rposition(|&b| b == b'}').unwrap();
                text.truncate(index.index(brace));
                bad(None)
            }
            Mutation::Trailing(index) => {
                text.extend_from_slice(index.get(TRAILING).as_bytes());
                bad(None)
            }
            Mutation::NotAnObject(index) => {
                text = match index.index(5) {
                    0 => [b"[".as_slice(), &text, b"]"].concat(),
                    1 => serde_json::to_vec(&String::from_utf8_lossy(&text)).unwrap(),
                    2 => b"null".to_vec(),
                    3 => b"42".to_vec(),
                    _ => b"\"join\"".to_vec(),
                };
                bad(None)
            }
            Mutation::Flip(flips) => {
                for (index, mask) in flips {
                    let at = index.index(text.len());
                    text[at] ^= mask;
                }
                expect
            }
            _ => expect,
        };
        (text, expect)
    }
}

/// The text, cut to a readable length.
fn shown(text: &[u8]) -> String {
    let lossy = String::from_utf8_lossy(text);
    if lossy.chars().count() <= 400 {
        return format!("{lossy:?}");
    }
    let head: String = lossy.chars().take(400).collect();
    format!("{head:?}… ({} bytes)", text.len())
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (text, expect) = self.build();
        let mutation = match &self.mutation {
            Mutation::LongRef(r) if r.len() > 100 => format!("LongRef({} bytes)", r.len()),
            other => format!("{other:?}"),
        };
        write!(f, "{} ({mutation}, expecting {expect:?})", shown(&text))
    }
}

/// Checks the decoder's answer to `text` against what the protocol calls for.
fn check_decoder(text: &[u8], expect: &Expect) -> Result<(), TestCaseError> {
    let decoded = decode_with_ref(text);
    if let Err(error) = &decoded {
        prop_assert!(!error.message.is_empty(), "an error without a message");
    }
    match expect {
        Expect::Frame(frame, reference) => {
            prop_assert_eq!(decoded, Ok((frame.clone(), reference.clone())));
        }
        Expect::Error(code, reference) => match decoded {
            Ok(frame) => prop_assert!(false, "decoded {frame:?}, expected {code:?}"),
            Err(error) => {
                prop_assert_eq!(error.code, *code, "{}", error.message);
                prop_assert_eq!(&error.reference, reference, "the echoed ref");
            }
        },
        Expect::FrameOrBadFrame(frame, reference) => match decoded {
            Ok(decoded) => prop_assert_eq!(decoded, (frame.clone(), reference.clone())),
            Err(error) => prop_assert_eq!(error.code, ErrorCode::BadFrame, "{}", error.message),
        },
        Expect::Anything => match decoded {
            Ok((_, reference)) => {
                // Whatever it decoded to, the `ref` it reports is the one the object holds.
                let value: Value = serde_json::from_slice(text).unwrap();
                let sent = value.get("ref").and_then(Value::as_str).map(str::to_owned);
                prop_assert_eq!(reference, sent);
            }
            Err(error) => prop_assert!(
                matches!(error.code, ErrorCode::BadFrame | ErrorCode::UnknownType),
                "the decoder answered {:?}",
                error.code
            ),
        },
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_json_is_a_frame_or_a_decoding_error(value in json_value()) {
        if let Err(error) = decode_with_ref(value.to_string().as_bytes()) {
            prop_assert!(matches!(error.code, ErrorCode::BadFrame | ErrorCode::UnknownType));
        }
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn every_well_formed_frame_decodes_to_the_frame_it_was_built_as(
        case in case(EVERY_TYPE, Just(Mutation::Keep).boxed())
    ) {
        let (text, expect) = case.build();
        check_decoder(&text, &expect)?;
    }

    #[test]
    fn broken_frames_get_the_protocols_answer_and_never_a_panic(
        case in case(EVERY_TYPE, mutation(2))
    ) {
        let (text, expect) = case.build();
        check_decoder(&text, &expect)?;
    }
}

// ---------------------------------------------------------------------------------------------
// The engine: sequences of such frames through one connection, each reply checked.
// ---------------------------------------------------------------------------------------------

/// A room outside the generator's pool, for the check that the connection still works after a
/// sequence (joining it again would be harmless if a random name ever matched).
const FINAL_ROOM: &str = "after-the-sequence";

/// The protocol's naming rules, written out again here so that the model does not borrow the
/// engine's code: 1–`max` ASCII letters, digits, `-`, `_`, `.`.
fn valid_name(name: &str, max: usize) -> bool {
    (1..=max).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What the engine must answer to one frame.
#[derive(Debug)]
enum Reply {
    /// One `error` with one of these codes (a frame with several faults may name any of them).
    Error(Vec<ErrorCode>, Option<String>),
    Joined {
        room: String,
        resumed: bool,
    },
    Left(String),
    /// An `ack`, and the echo of a room message unless the send was a retry.
    Stored {
        conversation: String,
        echo: Option<(String, String)>,
        partner: Option<String>,
        reference: Option<String>,
        retry_of: Option<u64>,
    },
    /// Nothing to the sender (`typing`, `read`).
    Nothing,
    History {
        conversation: String,
        room: Option<String>,
        with: Option<String>,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    },
    Inbox,
    Online(Option<String>),
    Members(String, Option<String>),
    Pong,
    /// The connection closes with this code.
    Closed(u16),
}

/// The connection as the protocol describes it, as far as one user alone on a server can see.
#[derive(Default)]
struct Model {
    rooms: BTreeSet<String>,
    /// Every valid room any frame named, to check membership at the end.
    named: BTreeSet<String>,
    /// The newest id per conversation (`room:NAME`, `direct:USER`).
    last_id: HashMap<String, u64>,
    /// The id the first stored attempt got, per (conversation, ref).
    stored: HashMap<(String, String), u64>,
    partners: BTreeSet<String>,
}

fn faults_of_room(model: &Model, room: &str) -> Vec<ErrorCode> {
    if !valid_name(room, 100) {
        vec![ErrorCode::InvalidName]
    } else if !model.rooms.contains(room) {
        vec![ErrorCode::NotMember]
    } else {
        Vec::new()
    }
}

fn faults_of_peer(user: &str) -> Vec<ErrorCode> {
    if !valid_name(user, 64) {
        vec![ErrorCode::InvalidName]
    } else if user == ME {
        vec![ErrorCode::InvalidTarget]
    } else {
        Vec::new()
    }
}

fn faults_of_body(body: &str) -> Vec<ErrorCode> {
    let mut faults = Vec::new();
    if body.is_empty() || body.contains('\0') {
        faults.push(ErrorCode::BadFrame);
    }
    if body.chars().count() > 4_096 {
        faults.push(ErrorCode::TooLarge);
    }
    faults
}

fn faults_of_target(model: &Model, target: &Target) -> Vec<ErrorCode> {
    match target {
        Target::Room(room) => faults_of_room(model, room),
        Target::User(user) => faults_of_peer(user),
    }
}

fn conversation_of(target: &Target) -> String {
    match target {
        Target::Room(room) => format!("room:{room}"),
        Target::User(user) => format!("direct:{user}"),
    }
}

impl Model {
    /// The reply to a decoded frame; notes the joins and leaves it makes.
    fn reply(&mut self, frame: &ClientFrame, reference: Option<String>) -> Reply {
        let named = match frame {
            ClientFrame::Join { room, .. }
            | ClientFrame::Leave { room }
            | ClientFrame::Send { room, .. }
            | ClientFrame::Members { room, .. }
            | ClientFrame::Typing {
                target: Target::Room(room),
            }
            | ClientFrame::Read {
                target: Target::Room(room),
                ..
            }
            | ClientFrame::History {
                target: Target::Room(room),
                ..
            } => Some(room),
            _ => None,
        };
        if let Some(room) = named.filter(|room| valid_name(room, 100)) {
            self.named.insert(room.clone());
        }
        let refused = |faults: Vec<ErrorCode>| Reply::Error(faults, reference.clone());
        match frame {
            ClientFrame::Join { room, since } => {
                if !valid_name(room, 100) {
                    return refused(vec![ErrorCode::InvalidName]);
                }
                if !self.rooms.contains(room) && self.rooms.len() >= 100 {
                    return refused(vec![ErrorCode::TooManyRooms]);
                }
                self.rooms.insert(room.clone());
                Reply::Joined {
                    room: room.clone(),
                    resumed: since.is_some(),
                }
            }
            ClientFrame::Leave { room } => {
                if !valid_name(room, 100) {
                    return refused(vec![ErrorCode::InvalidName]);
                }
                self.rooms.remove(room);
                Reply::Left(room.clone())
            }
            ClientFrame::Send { room, body, .. } | ClientFrame::Direct { to: room, body, .. } => {
                let direct = matches!(frame, ClientFrame::Direct { .. });
                let mut faults = if direct {
                    faults_of_peer(room)
                } else {
                    faults_of_room(self, room)
                };
                faults.extend(faults_of_body(body));
                if !faults.is_empty() {
                    return refused(faults);
                }
                let target = if direct {
                    Target::User(room.clone())
                } else {
                    Target::Room(room.clone())
                };
                let conversation = conversation_of(&target);
                let retry_of = reference
                    .as_ref()
                    .and_then(|r| self.stored.get(&(conversation.clone(), r.clone())))
                    .copied();
                let echo = (!direct && retry_of.is_none()).then(|| (room.clone(), body.clone()));
                Reply::Stored {
                    conversation,
                    echo,
                    partner: direct.then(|| room.clone()),
                    reference,
                    retry_of,
                }
            }
            ClientFrame::Typing { target } | ClientFrame::Read { target, .. } => {
                let faults = faults_of_target(self, target);
                if faults.is_empty() {
                    Reply::Nothing
                } else {
                    refused(faults)
                }
            }
            ClientFrame::History {
                target,
                before,
                after,
                limit,
            } => {
                let faults = faults_of_target(self, target);
                if !faults.is_empty() {
                    return refused(faults);
                }
                let (room, with) = match target {
                    Target::Room(room) => (Some(room.clone()), None),
                    Target::User(user) => (None, Some(user.clone())),
                };
                let limit = limit.map_or(50, |l| usize::try_from(l).unwrap_or(usize::MAX));
                Reply::History {
                    conversation: conversation_of(target),
                    room,
                    with,
                    before: *before,
                    after: *after,
                    limit: limit.clamp(1, 100),
                }
            }
            ClientFrame::Inbox => Reply::Inbox,
            ClientFrame::Who { after, .. } => Reply::Online(after.clone()),
            ClientFrame::Members { room, after, .. } => {
                let faults = faults_of_room(self, room);
                if faults.is_empty() {
                    Reply::Members(room.clone(), after.clone())
                } else {
                    refused(faults)
                }
            }
            ClientFrame::Ping => Reply::Pong,
        }
    }
}

/// Only this user online, or in the room: the page after `after`.
fn only_me_after(after: Option<&String>) -> Value {
    if after.is_none_or(|after| ME > after.as_str()) {
        json!([ME])
    } else {
        json!([])
    }
}

fn ids_of(messages: &Value, context: &str) -> Vec<u64> {
    let ids: Vec<u64> = messages
        .as_array()
        .unwrap_or_else(|| panic!("{context}: messages not an array"))
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{context}: ids not increasing: {ids:?}"
    );
    ids
}

/// Sends one frame and checks every frame that answers it.
async fn exchange(
    client: &mut Client,
    model: &mut Model,
    text: &[u8],
    binary: bool,
    reply: Reply,
    context: &str,
) {
    let bytes = Bytes::copy_from_slice(text);
    let inbound = if binary {
        Inbound::Binary(bytes)
    } else {
        Inbound::Text(bytes)
    };
    client.send_inbound(inbound).await;
    if let Reply::Closed(code) = reply {
        assert_eq!(client.expect_close().await, code, "{context}");
        let reason = (&mut client.task).await.unwrap();
        assert_eq!(reason, CloseReason::FrameTooLarge, "{context}");
        return;
    }
    // A ping after the frame: its pong comes after everything the frame was answered with
    // directly. A room message's echo travels through the channel layer and may come later.
    client.send(json!({"type": "ping"})).await;
    let pongs = if matches!(reply, Reply::Pong) { 2 } else { 1 };
    let mut frames = Vec::new();
    let mut seen = 0;
    loop {
        let frame = client.recv().await;
        if frame["type"] == "pong" {
            seen += 1;
            if seen == pongs {
                break;
            }
        }
        frames.push(frame);
    }
    if let Reply::Stored { echo: Some(_), .. } = &reply {
        if !frames.iter().any(|f| f["type"] == "message") {
            frames.push(client.recv().await);
        }
    }
    let context = format!("{context}\n  expected {reply:?}\n  got {frames:?}");
    let only = |frames: &[Value]| -> Value {
        assert_eq!(frames.len(), 1, "{context}");
        frames[0].clone()
    };
    match reply {
        Reply::Error(codes, reference) => {
            let error = only(&frames);
            assert_eq!(error["type"], "error", "{context}");
            assert!(
                codes.iter().any(|code| error["code"] == code.as_str()),
                "{context}"
            );
            assert!(
                error["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{context}"
            );
            assert_eq!(
                error.get("ref"),
                reference.map(Value::from).as_ref(),
                "{context}"
            );
        }
        Reply::Joined { room, resumed } => {
            let joined = only(&frames);
            assert_eq!(joined["type"], "joined", "{context}");
            assert_eq!(joined["room"], room, "{context}");
            assert_eq!(joined["members"], json!([ME]), "{context}");
            assert_eq!(joined["member_count"], 1, "{context}");
            assert!(joined["more"].is_boolean(), "{context}");
            let ids = ids_of(&joined["history"], &context);
            if let (false, Some(last)) = (resumed, model.last_id.get(&format!("room:{room}"))) {
                assert_eq!(ids.last(), Some(last), "{context}: the newest message");
            }
        }
        Reply::Left(room) => {
            assert_eq!(
                only(&frames),
                json!({"type": "left", "room": room}),
                "{context}"
            );
        }
        Reply::Stored {
            conversation,
            echo,
            partner,
            reference,
            retry_of,
        } => {
            let acks: Vec<&Value> = frames.iter().filter(|f| f["type"] == "ack").collect();
            assert_eq!(acks.len(), 1, "{context}");
            assert_eq!(frames.len(), 1 + usize::from(echo.is_some()), "{context}");
            let ack = acks[0];
            assert_eq!(
                ack.get("ref"),
                reference.clone().map(Value::from).as_ref(),
                "{context}"
            );
            let id = ack["id"].as_u64().unwrap();
            match retry_of {
                Some(first) => assert_eq!(id, first, "{context}: a retry's ack"),
                None => {
                    let last = model.last_id.get(&conversation).copied().unwrap_or(0);
                    assert!(id > last, "{context}: id {id} after {last}");
                    model.last_id.insert(conversation.clone(), id);
                    if let Some(reference) = reference {
                        model.stored.insert((conversation, reference), id);
                    }
                }
            }
            if let Some((room, body)) = echo {
                let message = frames.iter().find(|f| f["type"] == "message").unwrap();
                assert_eq!(message["room"], room, "{context}");
                assert_eq!(message["from"], ME, "{context}");
                assert_eq!(message["body"], body, "{context}");
                assert_eq!(message["id"], id, "{context}");
                assert!(message["ts"].is_u64(), "{context}");
            }
            if let Some(partner) = partner {
                model.partners.insert(partner);
            }
        }
        Reply::Nothing => assert!(frames.is_empty(), "{context}"),
        Reply::History {
            conversation,
            room,
            with,
            before,
            after,
            limit,
        } => {
            let history = only(&frames);
            assert_eq!(history["type"], "history", "{context}");
            assert_eq!(
                history.get("room"),
                room.map(Value::from).as_ref(),
                "{context}"
            );
            assert_eq!(
                history.get("with"),
                with.map(Value::from).as_ref(),
                "{context}"
            );
            assert!(history["more"].is_boolean(), "{context}");
            let ids = ids_of(&history["messages"], &context);
            assert!(ids.len() <= limit, "{context}: over the limit");
            assert!(
                ids.iter().all(|&id| before.is_none_or(|b| id < b)),
                "{context}"
            );
            assert!(
                ids.iter().all(|&id| after.is_none_or(|a| id > a)),
                "{context}"
            );
            let last = model.last_id.get(&conversation);
            if let (None, None, Some(last)) = (before, after, last) {
                assert_eq!(ids.last(), Some(last), "{context}: the newest message");
            }
        }
        Reply::Inbox => {
            let inbox = only(&frames);
            assert_eq!(inbox["type"], "inbox", "{context}");
            let conversations = inbox["conversations"].as_array().unwrap();
            for partner in &model.partners {
                let entry = conversations
                    .iter()
                    .find(|c| c["with"] == partner.as_str())
                    .unwrap_or_else(|| panic!("{context}: no conversation with {partner}"));
                let last = model.last_id[&format!("direct:{partner}")];
                assert_eq!(entry["last_id"], last, "{context}");
            }
        }
        Reply::Online(after) => {
            let online = only(&frames);
            assert_eq!(online["type"], "online", "{context}");
            assert_eq!(online["users"], only_me_after(after.as_ref()), "{context}");
            assert_eq!(online["count"], 1, "{context}");
            assert_eq!(online["more"], false, "{context}");
        }
        Reply::Members(room, after) => {
            let members = only(&frames);
            assert_eq!(members["type"], "members", "{context}");
            assert_eq!(members["room"], room, "{context}");
            assert_eq!(members["users"], only_me_after(after.as_ref()), "{context}");
            assert_eq!(members["count"], 1, "{context}");
            assert_eq!(members["more"], false, "{context}");
        }
        Reply::Pong => assert_eq!(only(&frames), json!({"type": "pong"}), "{context}"),
        Reply::Closed(_) => unreachable!("handled above"),
    }
}

/// One frame of a sequence: text, or (rarely) the same bytes in a binary frame.
#[derive(Clone)]
struct Step {
    case: Case,
    binary: bool,
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.binary { "binary" } else { "text" };
        write!(f, "{kind} {:?}", self.case)
    }
}

fn step() -> impl Strategy<Value = Step> {
    (case(TRAFFIC, mutation(40)), prop::bool::weighted(0.03))
        .prop_map(|(case, binary)| Step { case, binary })
}

async fn drive(steps: Vec<Step>) {
    // Far above what a sequence sends: rate limiting is timing, not what this property is about.
    let config = ChatConfig {
        rate_per_second: 1e9,
        rate_burst: 1_000_000,
        ..ChatConfig::default()
    };
    let max_frame_bytes = config.max_frame_bytes;
    let chat = common::chat_with(config);
    let mut client = Client::connect(&chat, ME).await;
    let mut model = Model::default();
    for (i, step) in steps.iter().enumerate() {
        let (text, _) = step.case.build();
        let context = format!("frame {i}: {step:?}");
        // The engine's order: size, then binary or not, then decoding, then the frame itself.
        let reply = if text.len() > max_frame_bytes {
            Reply::Closed(1009)
        } else if step.binary {
            Reply::Error(vec![ErrorCode::BadFrame], None)
        } else {
            match decode_with_ref(&text) {
                Err(error) => Reply::Error(vec![error.code], error.reference),
                Ok((frame, reference)) => model.reply(&frame, reference),
            }
        };
        let closes = matches!(reply, Reply::Closed(_));
        exchange(&mut client, &mut model, &text, step.binary, reply, &context).await;
        if closes {
            return;
        }
    }
    // The connection's state is what the frames made it: in exactly the rooms the model is in.
    for room in &model.named {
        let members = chat.room_members(room).await.unwrap();
        assert_eq!(
            members.iter().any(|m| m == ME),
            model.rooms.contains(room),
            "membership of {room} after the sequence"
        );
    }
    // And it still works: a plain send to a joined room is acked and echoed.
    client.join(FINAL_ROOM).await;
    client.say(FINAL_ROOM, "still here").await;
    client.sync().await;
    assert_eq!(client.disconnect().await, CloseReason::ClientClosed);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_frame_sequence_gets_the_protocols_replies_and_leaves_the_connection_usable(
        steps in prop::collection::vec(step(), 1..=40)
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(drive(steps));
    }
}
