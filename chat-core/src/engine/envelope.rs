//! How the engine wraps an encoded frame for the channel layer, and the group names it uses.
//!
//! A layer message is a small header followed by the wire frame, exactly as the client will get
//! it. The header tells the receiving connection what the frame is for and how to order it, and
//! whom to skip, so one `group_send` serves every recipient and each one only slices the frame
//! out, zero-copy.
//!
//! Layout: `kind` (1 byte), message `id` (8 bytes, big-endian; 0 when the frame is no stored
//! message), edge `version` (8 bytes; 0 when the frame is no membership or presence edge), then
//! four length-prefixed (1 byte) strings: excluded user, excluded connection, and two names whose
//! meaning depends on the kind (see [`Envelope`]'s constructors); then the frame.

use bytes::{BufMut, Bytes, BytesMut};

/// Channel-layer group of connections watching presence.
pub(crate) const PRESENCE_GROUP: &str = "presence";

/// What a layer message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// For a room's connections: a message (with an id), or an event (typing, read, member).
    Room,
    /// A direct message, ordered within its pair of users.
    Direct,
    /// Anything else for all connections of a user (typing and read receipts between two users).
    User,
    /// A presence event for watching connections.
    Presence,
    /// Close the receiving connection (the host disconnected the user).
    Kick,
    /// A large room's member count (protocol 1.1 `member_count`): the count in `id`, the
    /// registry version it is as of in `version`.
    Count,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Self::Room => b'R',
            Self::Direct => b'D',
            Self::User => b'U',
            Self::Presence => b'P',
            Self::Kick => b'K',
            Self::Count => b'C',
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            b'R' => Self::Room,
            b'D' => Self::Direct,
            b'U' => Self::User,
            b'P' => Self::Presence,
            b'K' => Self::Kick,
            b'C' => Self::Count,
            _ => return None,
        })
    }
}

/// A layer message to build.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Envelope<'a> {
    kind: Kind,
    id: u64,
    version: u64,
    exclude_user: &'a str,
    exclude_connection: &'a str,
    first: &'a str,
    second: &'a str,
}

impl<'a> Envelope<'a> {
    pub(crate) fn new(kind: Kind) -> Self {
        Self {
            kind,
            id: 0,
            version: 0,
            exclude_user: "",
            exclude_connection: "",
            first: "",
            second: "",
        }
    }

    /// A stored message of `room`.
    pub(crate) fn room_message(room: &'a str, id: u64) -> Self {
        Self {
            first: room,
            id,
            ..Self::new(Kind::Room)
        }
    }

    /// An event in `room` that is neither a message nor an edge (typing, read).
    pub(crate) fn room_event(room: &'a str) -> Self {
        Self {
            first: room,
            ..Self::new(Kind::Room)
        }
    }

    /// `user`'s membership edge in `room`, with the registry's version.
    pub(crate) fn member_edge(room: &'a str, user: &'a str, version: u64) -> Self {
        Self {
            first: room,
            second: user,
            version,
            ..Self::new(Kind::Room)
        }
    }

    /// `room`'s member count as of the registry's `version`.
    pub(crate) fn member_count(room: &'a str, count: usize, version: u64) -> Self {
        Self {
            first: room,
            id: u64::try_from(count).unwrap_or(u64::MAX),
            version,
            ..Self::new(Kind::Count)
        }
    }

    /// A stored direct message from `from` to `to`.
    pub(crate) fn direct(from: &'a str, to: &'a str, id: u64) -> Self {
        Self {
            first: from,
            second: to,
            id,
            ..Self::new(Kind::Direct)
        }
    }

    /// `user`'s presence edge, with the registry's version.
    pub(crate) fn presence(user: &'a str, version: u64) -> Self {
        Self {
            second: user,
            version,
            ..Self::new(Kind::Presence)
        }
    }

    pub(crate) fn excluding_user(self, user: &'a str) -> Self {
        Self {
            exclude_user: user,
            ..self
        }
    }

    pub(crate) fn excluding_connection(self, connection: &'a str) -> Self {
        Self {
            exclude_connection: connection,
            ..self
        }
    }

    /// Header and frame in one buffer: one copy of the frame per message, none per recipient.
    pub(crate) fn wrap(&self, frame: &[u8]) -> Bytes {
        let strings = [
            self.exclude_user,
            self.exclude_connection,
            self.first,
            self.second,
        ];
        let header: usize = 17 + strings.iter().map(|s| 1 + s.len()).sum::<usize>();
        let mut buf = BytesMut::with_capacity(header + frame.len());
        buf.put_u8(self.kind.byte());
        buf.put_u64(self.id);
        buf.put_u64(self.version);
        for s in strings {
            // Names are at most 100 bytes (validated before they get here); cut defensively.
            let s = &s.as_bytes()[..s.len().min(255)];
            buf.put_u8(s.len() as u8);
            buf.put_slice(s);
        }
        buf.put_slice(frame);
        buf.freeze()
    }
}

/// A layer message as received: the message itself and where its parts are. The names are
/// borrowed from it and the frame is sliced out only when it is delivered, so reading one costs
/// no reference-count traffic on the shared bytes (one message reaches every member of a room:
/// five slices per recipient were ten atomic operations on one cache line each time).
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) kind: Kind,
    pub(crate) id: u64,
    pub(crate) version: u64,
    message: Bytes,
    /// Start and end of the four names: excluded user, excluded connection, first, second.
    names: [(u32, u32); 4],
    /// Where the wire frame starts.
    frame_at: u32,
}

impl Received {
    fn name(&self, index: usize) -> &[u8] {
        let (start, end) = self.names[index];
        &self.message[start as usize..end as usize]
    }

    /// The user whose connections skip this message (empty: none).
    pub(crate) fn exclude_user(&self) -> &[u8] {
        self.name(0)
    }

    /// The connection that skips this message (empty: none).
    pub(crate) fn exclude_connection(&self) -> &[u8] {
        self.name(1)
    }

    /// The room (room kinds) or the sender (direct messages).
    pub(crate) fn first(&self) -> &[u8] {
        self.name(2)
    }

    /// The member (membership edges), the recipient (direct messages) or the user (presence).
    pub(crate) fn second(&self) -> &[u8] {
        self.name(3)
    }

    /// The wire frame, a slice of the shared message.
    pub(crate) fn frame(&self) -> Bytes {
        self.message.slice(self.frame_at as usize..)
    }

    /// The wire frame, taking the message's own handle on the shared bytes.
    pub(crate) fn into_frame(self) -> Bytes {
        let mut message = self.message;
        bytes::Buf::advance(&mut message, self.frame_at as usize);
        message
    }
}

/// Reads a layer message; `None` when it is not one of ours (never panics on short input).
pub(crate) fn unwrap(message: Bytes) -> Option<Received> {
    let kind = Kind::from_byte(*message.first()?)?;
    let id = u64::from_be_bytes(message.get(1..9)?.try_into().ok()?);
    let version = u64::from_be_bytes(message.get(9..17)?.try_into().ok()?);
    // Four names of at most 255 bytes after a 17-byte header: every offset fits a u32.
    let mut at = 17_usize;
    let mut names = [(0_u32, 0_u32); 4];
    for name in &mut names {
        let len = usize::from(*message.get(at)?);
        let start = at + 1;
        let end = start + len;
        if end > message.len() {
            return None;
        }
        *name = (start as u32, end as u32);
        at = end;
    }
    Some(Received {
        kind,
        id,
        version,
        names,
        frame_at: at as u32,
        message,
    })
}

/// The layer group of a room's connections.
///
/// Layer names must stay under 100 characters while room names may have 100, so long room names
/// are shortened with a hash. Receivers check the room carried in the envelope, so even a hash
/// collision could only cost a wasted delivery, never a message in the wrong room.
pub(crate) fn room_group(room: &str) -> String {
    if room.len() <= 90 {
        return format!("r.{room}");
    }
    let (a, b) = fnv_pair(room.as_bytes());
    let head: String = room.chars().take(60).collect();
    format!("r.{head}.{a:016x}{b:016x}")
}

/// The layer group of all a user's connections (user names are at most 64 characters).
pub(crate) fn user_group(user: &str) -> String {
    format!("u.{user}")
}

/// Two FNV-1a hashes with different offsets: stable across processes and Rust versions, which the
/// standard library's hasher does not promise, so every node names a room's group the same way.
fn fnv_pair(data: &[u8]) -> (u64, u64) {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for &byte in data {
        a = (a ^ u64::from(byte)).wrapping_mul(PRIME);
        b = (b ^ u64::from(byte.rotate_left(3))).wrapping_mul(PRIME);
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::layer::validate_group_name;

    #[test]
    fn round_trip_shares_the_frame() {
        let message = Envelope::member_edge("lobby", "bob", 7)
            .excluding_user("alice")
            .excluding_connection("conn.x")
            .wrap(br#"{"type":"pong"}"#);
        let got = unwrap(message.clone()).unwrap();
        assert_eq!(got.kind, Kind::Room);
        assert_eq!((got.id, got.version), (0, 7));
        assert_eq!(got.exclude_user(), b"alice");
        assert_eq!(got.exclude_connection(), b"conn.x");
        assert_eq!(got.first(), b"lobby");
        assert_eq!(got.second(), b"bob");
        assert_eq!(&got.frame()[..], br#"{"type":"pong"}"#);
        // The frame is a view of the message's bytes, not a copy.
        let frame = got.into_frame();
        assert_eq!(&frame[..], br#"{"type":"pong"}"#);
        assert_eq!(
            frame.as_ptr(),
            message[message.len() - frame.len()..].as_ptr()
        );

        let direct = unwrap(Envelope::direct("alice", "bob", 42).wrap(b"{}")).unwrap();
        assert_eq!((direct.kind, direct.id), (Kind::Direct, 42));
        assert_eq!(
            (direct.first(), direct.second()),
            (&b"alice"[..], &b"bob"[..])
        );
        assert_eq!(&direct.into_frame()[..], b"{}");
    }

    #[test]
    fn garbage_is_refused_not_a_panic() {
        for bad in [
            &b""[..],
            b"R",
            b"X0000000000000000\0\0\0\0",
            b"R\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x05ab",
            b"R\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        ] {
            assert!(unwrap(Bytes::copy_from_slice(bad)).is_none());
        }
    }

    #[test]
    fn group_names_are_valid_for_every_room_name() {
        let longest = "a".repeat(100);
        for room in [
            "a",
            "lobby.en-GB_2",
            &"b".repeat(90),
            &"c".repeat(91),
            &longest,
        ] {
            validate_group_name(&room_group(room)).unwrap();
        }
        assert_ne!(
            room_group(&longest),
            room_group(&format!("{}b", "a".repeat(99)))
        );
        validate_group_name(&user_group(&"u".repeat(64))).unwrap();
    }
}
