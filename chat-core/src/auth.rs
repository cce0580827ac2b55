//! Authentication of the WebSocket handshake: turning the upgrade request into a user name, or a
//! refusal the adapter answers with HTTP 401 before upgrading.
//!
//! The request is described by [`Handshake`], our own plain type, so that chat-core depends on no
//! HTTP or WebSocket library. Two authenticators are built in:
//!
//! - [`JwtAuthenticator`]: HS256 tokens with the user in `sub` and `exp` enforced, taken from an
//!   `Authorization: Bearer` header or a `?token=` query parameter. Use this in production, or
//!   write your own [`Authenticator`] (a session cookie lookup, an API gateway header, …).
//! - [`DevAuthenticator`]: **insecure**, for development only. It believes `?user=<name>`, so
//!   anyone can be anyone. Never expose a server that runs it.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::names::is_valid_user_name;

/// The parts of the upgrade request authentication may look at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handshake {
    /// The request path, such as `/ws/chat/lobby/`.
    pub path: String,
    /// The raw query string, without the `?`.
    pub query: Option<String>,
    /// The request headers, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Handshake {
    /// A handshake for `path` with no query and no headers.
    pub fn new(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }

    /// Sets the raw query string.
    pub fn with_query(mut self, query: impl Into<String>) -> Self {
        self.query = Some(query.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The first header called `name`, compared ASCII-case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of query parameter `name`, percent-decoded (`+` is a space). `None` when
    /// absent, or when the decoded bytes are not UTF-8. A malformed escape (`%zz`, a trailing
    /// `%`) is kept literally rather than guessed at.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query
            .as_deref()?
            .split('&')
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key)? == name).then(|| percent_decode(value))
            })
            .next()?
    }

    /// The bearer credential: the `Authorization: Bearer <token>` header (scheme compared
    /// case-insensitively) if present, else the `token` query parameter.
    pub fn bearer_token(&self) -> Option<String> {
        if let Some(value) = self.header("authorization") {
            let (scheme, token) = value.trim().split_once(' ')?;
            return scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
                .filter(|t| !t.is_empty());
        }
        self.query_param("token").filter(|t| !t.is_empty())
    }
}

fn percent_decode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Why a handshake was refused. The text is safe to show: it never contains the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential at all.
    #[error("missing credentials")]
    Missing,
    /// A credential that does not prove anything.
    #[error("invalid credentials: {0}")]
    Invalid(String),
    /// A credential past its expiry.
    #[error("expired credentials")]
    Expired,
}

/// Turns a handshake into the user name it proves.
///
/// Implement it to plug in the host service's own sign-in; the adapters call it before upgrading
/// and answer 401 on `Err`.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// The user name the handshake proves, or why not.
    async fn authenticate(&self, handshake: &Handshake) -> Result<String, AuthError>;
}

/// **Insecure, development only**: takes `?user=<name>` on trust, so anyone can sign in as
/// anyone. The name must still be a valid user name.
///
/// ```
/// use chat_core::auth::{Authenticator, DevAuthenticator, Handshake};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let handshake = Handshake::new("/ws").with_query("user=alice");
/// assert_eq!(DevAuthenticator.authenticate(&handshake).await.unwrap(), "alice");
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DevAuthenticator;

#[async_trait]
impl Authenticator for DevAuthenticator {
    async fn authenticate(&self, handshake: &Handshake) -> Result<String, AuthError> {
        let user = handshake.query_param("user").ok_or(AuthError::Missing)?;
        if is_valid_user_name(&user) {
            Ok(user)
        } else {
            Err(AuthError::Invalid("not a valid user name".into()))
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// HS256 JSON Web Tokens: the user in `sub`, `exp` required and enforced.
///
/// ```
/// use std::time::Duration;
/// use chat_core::auth::{Authenticator, Handshake, JwtAuthenticator};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let auth = JwtAuthenticator::new(b"a long random secret");
/// let token = auth.issue("alice", Duration::from_secs(3600)).unwrap();
/// let handshake = Handshake::new("/ws").with_header("Authorization", format!("Bearer {token}"));
/// assert_eq!(auth.authenticate(&handshake).await.unwrap(), "alice");
/// # }
/// ```
pub struct JwtAuthenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("leeway", &self.validation.leeway)
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Verifies (and issues) HS256 tokens signed with `secret`; no other algorithm is accepted.
    /// The leeway for clock skew starts at 0 seconds.
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret.as_ref()),
            decoding: DecodingKey::from_secret(secret.as_ref()),
            validation,
        }
    }

    /// Accepts tokens up to `seconds` past their `exp`, for clocks that disagree.
    pub fn with_leeway(mut self, seconds: u64) -> Self {
        self.validation.leeway = seconds;
        self
    }

    /// A token for `user` valid for `ttl`, for tests, examples and host services that mint them.
    pub fn issue(&self, user: &str, ttl: Duration) -> Result<String, AuthError> {
        if !is_valid_user_name(user) {
            return Err(AuthError::Invalid("not a valid user name".into()));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            sub: user.to_owned(),
            exp: now.saturating_add(ttl.as_secs()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(format!("cannot sign: {e}")))
    }
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, handshake: &Handshake) -> Result<String, AuthError> {
        let token = handshake.bearer_token().ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(&token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted".into()),
                ErrorKind::MissingRequiredClaim(claim) => {
                    AuthError::Invalid(format!("missing claim {claim}"))
                }
                _ => AuthError::Invalid("malformed token".into()),
            })?;
        let user = data.claims.sub;
        if is_valid_user_name(&user) {
            Ok(user)
        } else {
            Err(AuthError::Invalid("sub is not a valid user name".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"test secret, long enough for HS256";

    fn sign(claims: serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn bearer(token: &str) -> Handshake {
        Handshake::new("/ws").with_header("authorization", format!("Bearer {token}"))
    }

    #[tokio::test]
    async fn dev_takes_a_valid_name_and_nothing_else() {
        let auth = DevAuthenticator;
        let ok = Handshake::new("/ws").with_query("x=1&user=bob.b-2_");
        assert_eq!(auth.authenticate(&ok).await.unwrap(), "bob.b-2_");
        assert_eq!(
            auth.authenticate(&Handshake::new("/ws")).await,
            Err(AuthError::Missing)
        );
        for bad in [
            "user=",
            "user=a%20b",
            "user=a+b",
            "user=%zz",
            &format!("user={}", "a".repeat(65)),
        ] {
            let handshake = Handshake::new("/ws").with_query(bad);
            assert!(
                matches!(
                    auth.authenticate(&handshake).await,
                    Err(AuthError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn jwt_accepts_a_good_token_from_header_or_query() {
        let auth = JwtAuthenticator::new(SECRET);
        let token = auth.issue("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(auth.authenticate(&bearer(&token)).await.unwrap(), "alice");
        let query = Handshake::new("/ws").with_query(format!("token={token}"));
        assert_eq!(auth.authenticate(&query).await.unwrap(), "alice");
        // The header wins over the query.
        let other = auth.issue("bob", Duration::from_secs(60)).unwrap();
        let both = bearer(&token).with_query(format!("token={other}"));
        assert_eq!(auth.authenticate(&both).await.unwrap(), "alice");
        let lower = Handshake::new("/ws").with_header("AUTHORIZATION", format!("bearer {token}"));
        assert_eq!(auth.authenticate(&lower).await.unwrap(), "alice");
    }

    #[tokio::test]
    async fn jwt_refuses_everything_else() {
        let auth = JwtAuthenticator::new(SECRET);
        let exp = now() + 60;
        let cases = [
            (
                "wrong secret",
                sign(
                    json!({"sub": "a", "exp": exp}),
                    Algorithm::HS256,
                    b"other secret",
                ),
            ),
            (
                "other algorithm",
                sign(json!({"sub": "a", "exp": exp}), Algorithm::HS384, SECRET),
            ),
            (
                "no exp",
                sign(json!({"sub": "a"}), Algorithm::HS256, SECRET),
            ),
            (
                "no sub",
                sign(json!({"exp": exp}), Algorithm::HS256, SECRET),
            ),
            (
                "bad sub",
                sign(json!({"sub": "a b", "exp": exp}), Algorithm::HS256, SECRET),
            ),
            ("garbage", "not.a.token".to_owned()),
            (
                "alg none",
                format!("{}.{}.", "eyJhbGciOiJub25lIn0", "eyJzdWIiOiJhIn0"),
            ),
        ];
        for (what, token) in cases {
            let result = auth.authenticate(&bearer(&token)).await;
            assert!(
                matches!(result, Err(AuthError::Invalid(_))),
                "{what}: {result:?}"
            );
            let message = result.unwrap_err().to_string();
            assert!(
                !message.contains(&token),
                "{what}: the error echoes the token"
            );
        }
        let expired = sign(
            json!({"sub": "a", "exp": now() - 120}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(
            auth.authenticate(&bearer(&expired)).await,
            Err(AuthError::Expired)
        );
        let lenient = JwtAuthenticator::new(SECRET).with_leeway(300);
        assert_eq!(lenient.authenticate(&bearer(&expired)).await.unwrap(), "a");
        assert_eq!(
            auth.authenticate(&Handshake::new("/ws")).await,
            Err(AuthError::Missing)
        );
        let basic = Handshake::new("/ws").with_header("Authorization", "Basic abc");
        assert_eq!(auth.authenticate(&basic).await, Err(AuthError::Missing));
    }

    #[test]
    fn query_decoding_is_total() {
        let h = Handshake::new("/").with_query("a=x%41y+z&b=%&c=%4&d=%e9&a=second&%75ser=u");
        assert_eq!(h.query_param("a").as_deref(), Some("xAy z"));
        assert_eq!(h.query_param("b").as_deref(), Some("%"));
        assert_eq!(h.query_param("c").as_deref(), Some("%4"));
        assert_eq!(h.query_param("d"), None, "not UTF-8 after decoding");
        assert_eq!(h.query_param("user").as_deref(), Some("u"));
        assert_eq!(h.query_param("missing"), None);
        assert_eq!(
            Handshake::new("/").with_header("X-A", "1").header("x-a"),
            Some("1")
        );
    }
}
