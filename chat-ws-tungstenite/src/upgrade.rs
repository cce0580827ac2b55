//! The server's side of the WebSocket opening handshake (RFC 6455 §4.2), shared by both
//! adapters: which request headers make a valid upgrade, why a request is refused (the body of
//! the 400 reply), and the `Sec-WebSocket-Accept` value of the 101 reply.
//!
//! ```
//! use chat_ws_tungstenite::upgrade::{accept_key, Refusal};
//!
//! let headers: [(&str, &[u8]); 4] = [
//!     ("Connection", b"Upgrade"),
//!     ("Upgrade", b"websocket"),
//!     ("Sec-WebSocket-Version", b"13"),
//!     ("Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
//! ];
//! assert_eq!(accept_key(headers).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
//! let without_connection = headers[1..].iter().copied();
//! assert_eq!(accept_key(without_connection).unwrap_err(), Refusal::NoConnectionUpgrade);
//! ```

use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Why an upgrade request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `upgrade` token in `Connection`.
    NoConnectionUpgrade,
    /// `Upgrade` is not `websocket`.
    NoUpgradeWebsocket,
    /// `Sec-WebSocket-Version` is not (exactly once) 13: the reply should say
    /// `Sec-WebSocket-Version: 13` (§4.4).
    WrongVersion,
    /// No `Sec-WebSocket-Key`.
    NoKey,
    /// A `Sec-WebSocket-Key` that is not 16 bytes in base64, or more than one.
    BadKey,
}

impl Refusal {
    /// The reason, for the body of the 400 reply.
    pub fn reason(self) -> &'static str {
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
}

/// Checks the handshake headers of RFC 6455 §4.2.1 (names in any case, values as sent) and
/// returns the `Sec-WebSocket-Accept` value. The method (GET) and the HTTP version (1.1) are the
/// caller's to check.
pub fn accept_key<'a, H>(headers: H) -> Result<String, Refusal>
where
    H: IntoIterator<Item = (&'a str, &'a [u8])>,
    H::IntoIter: Clone,
{
    let headers = headers.into_iter();
    let all = |name: &'static str| {
        headers
            .clone()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    };
    let has_token = |name, token: &str| {
        all(name).any(|value| {
            std::str::from_utf8(value).is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token("connection", "upgrade") {
        return Err(Refusal::NoConnectionUpgrade);
    }
    if !has_token("upgrade", "websocket") {
        return Err(Refusal::NoUpgradeWebsocket);
    }
    let mut versions = all("sec-websocket-version");
    match (versions.next(), versions.next()) {
        (Some(version), None) if version.trim_ascii() == b"13" => {}
        _ => return Err(Refusal::WrongVersion),
    }
    let mut keys = all("sec-websocket-key");
    match (keys.next(), keys.next()) {
        (None, _) => Err(Refusal::NoKey),
        (Some(key), None) if is_valid_key(key) => Ok(derive_accept_key(key)),
        _ => Err(Refusal::BadKey),
    }
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

    const GOOD: [(&str, &[u8]); 4] = [
        ("connection", b"Upgrade"),
        ("upgrade", b"websocket"),
        ("sec-websocket-version", b"13"),
        ("sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    fn with(name: &str, value: &'static [u8]) -> Result<String, Refusal> {
        let mut headers: Vec<_> = GOOD.iter().copied().filter(|(n, _)| *n != name).collect();
        headers.push((name, value));
        accept_key(headers)
    }

    #[test]
    fn the_rfc_sample_handshake_is_accepted() {
        // RFC 6455 §1.3's example key and answer.
        assert_eq!(accept_key(GOOD).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        // Token lists and any case, as browsers and proxies send them.
        let headers: [(&str, &[u8]); 4] = [
            ("Connection", b"keep-alive, Upgrade"),
            ("UPGRADE", b"WebSocket"),
            ("Sec-WebSocket-Version", b"13"),
            ("Sec-WebSocket-Key", b"AAAAAAAAAAAAAAAAAAAAAA=="),
        ];
        assert!(accept_key(headers).is_ok());
    }

    #[test]
    fn each_missing_or_wrong_header_has_its_reason() {
        let without = |name: &str| {
            let pairs: Vec<_> = GOOD.iter().copied().filter(|(n, _)| *n != name).collect();
            accept_key(pairs).unwrap_err()
        };
        assert_eq!(without("connection"), Refusal::NoConnectionUpgrade);
        assert_eq!(without("upgrade"), Refusal::NoUpgradeWebsocket);
        assert_eq!(without("sec-websocket-version"), Refusal::WrongVersion);
        assert_eq!(without("sec-websocket-key"), Refusal::NoKey);

        assert_eq!(
            with("connection", b"keep-alive").unwrap_err(),
            Refusal::NoConnectionUpgrade
        );
        assert_eq!(
            with("upgrade", b"h2c").unwrap_err(),
            Refusal::NoUpgradeWebsocket
        );
        assert_eq!(
            with("sec-websocket-version", b"8").unwrap_err(),
            Refusal::WrongVersion
        );
        for key in [
            &b""[..],
            b"dGhlIHNhbXBsZSBub25jZQ",           // unpadded
            b"dGhlIHNhbXBsZSBub25jZR==",         // stray bits in the last symbol
            b"dGhlIHNhbXBsZSBub25j*Q==",         // not base64
            b"dGhlIHNhbXBsZSBub25jZQ==AAAA",     // too long
            b"dGhlIHNhbXBsZSBub25jZSBub25jZQ==", // 22 bytes
        ] {
            let key: &'static [u8] = key;
            assert_eq!(
                with("sec-websocket-key", key).unwrap_err(),
                Refusal::BadKey,
                "{key:?}"
            );
        }
        let mut twice = GOOD.to_vec();
        twice.push(("Sec-WebSocket-Key", b"AAAAAAAAAAAAAAAAAAAAAA=="));
        assert_eq!(accept_key(twice).unwrap_err(), Refusal::BadKey);
    }

    #[test]
    fn non_ascii_header_values_are_refused_not_panicked_on() {
        assert_eq!(
            with("connection", b"upgr\xffade").unwrap_err(),
            Refusal::NoConnectionUpgrade
        );
        assert_eq!(
            with("sec-websocket-key", b"\xff\xfe").unwrap_err(),
            Refusal::BadKey
        );
    }
}
