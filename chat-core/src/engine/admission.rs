//! Who may open a connection, decided before the WebSocket upgrade so that a refusal is a plain
//! HTTP answer: the request's `Origin` (cross-site WebSocket hijacking), its credentials, and
//! the node's connection limits, overall and per user.
//!
//! A browser sends `Origin` with every WebSocket handshake, and a page on another site can open
//! a socket to this server with the user's cookies or stored token; so a request whose `Origin`
//! is neither the server's own (the `Host` it was asked for) nor one the host listed in
//! [`ChatConfig::allowed_origins`](crate::ChatConfig::allowed_origins) is refused with 403.
//! A request without `Origin` comes from no browser and is let through.
//!
//! Each served connection holds a [`Slot`] for its life; the counts are this node's own (each
//! node limits what it serves, which is what its memory and file descriptors bound).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::auth::{AuthError, Handshake};
use crate::metrics::Metrics;

/// Why an upgrade request was refused, and the HTTP status that says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The `Origin` is not the server's own nor an allowed one (403).
    #[error("origin {0:?} is not allowed")]
    Origin(String),
    /// The authenticator refused the credentials (401).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// This node serves as many connections as `max_connections` allows (503).
    #[error("the server is at its connection limit; try again later")]
    ServerFull,
    /// The user already holds `max_connections_per_user` connections here (429).
    #[error("too many connections for this user")]
    UserFull,
}

impl Denied {
    /// The HTTP status of the refusal.
    ///
    /// ```
    /// use chat_core::engine::Denied;
    /// assert_eq!(Denied::ServerFull.status(), 503);
    /// assert_eq!(Denied::Origin("https://elsewhere.example".into()).status(), 403);
    /// ```
    pub fn status(&self) -> u16 {
        match self {
            Self::Origin(_) => 403,
            Self::Auth(_) => 401,
            Self::ServerFull => 503,
            Self::UserFull => 429,
        }
    }
}

/// Whether a handshake's `Origin` may open a socket: absent (no browser), the same host and port
/// the request was sent to, or listed in `allowed` (`"*"` allows any).
///
/// ```
/// use chat_core::auth::Handshake;
/// use chat_core::engine::origin_allowed;
///
/// let own = Handshake::new("/ws")
///     .with_header("Host", "chat.example:8000")
///     .with_header("Origin", "http://chat.example:8000");
/// assert!(origin_allowed(&own, &[]));
/// let other = Handshake::new("/ws")
///     .with_header("Host", "chat.example:8000")
///     .with_header("Origin", "https://evil.example");
/// assert!(!origin_allowed(&other, &[]));
/// assert!(origin_allowed(&other, &["https://evil.example".to_owned()]));
/// assert!(origin_allowed(&Handshake::new("/ws"), &[]));
/// ```
pub fn origin_allowed(handshake: &Handshake, allowed: &[String]) -> bool {
    let Some(origin) = handshake.header("origin") else {
        return true;
    };
    let origin = origin.trim();
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let Some(host) = handshake.header("host") else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        // `null` (a sandboxed page, a file) and anything else that names no site.
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return false,
    };
    let normalize = |authority: &str| {
        let authority = authority.trim().to_ascii_lowercase();
        match authority.strip_suffix(default_port) {
            Some(bare) => bare.to_owned(),
            None => authority,
        }
    };
    !authority.contains('/') && normalize(authority) == normalize(host)
}

/// This node's connections, overall and per user.
#[derive(Default)]
pub(crate) struct Admissions {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_user: HashMap<String, usize>,
}

impl Admissions {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for `user` if the limits allow one.
    pub(crate) fn try_take(
        self: &Arc<Self>,
        user: &str,
        max: usize,
        max_per_user: usize,
        metrics: &Metrics,
    ) -> Result<Slot, Denied> {
        let mut counts = self.counts();
        if counts.total >= max {
            return Err(Denied::ServerFull);
        }
        if counts.per_user.get(user).copied().unwrap_or(0) >= max_per_user {
            return Err(Denied::UserFull);
        }
        Ok(self.take_locked(&mut counts, user, metrics))
    }

    /// Takes a slot whatever the limits: a connection the host serves without admitting it
    /// still counts.
    pub(crate) fn take(self: &Arc<Self>, user: &str, metrics: &Metrics) -> Slot {
        let mut counts = self.counts();
        self.take_locked(&mut counts, user, metrics)
    }

    fn take_locked(self: &Arc<Self>, counts: &mut Counts, user: &str, metrics: &Metrics) -> Slot {
        counts.total += 1;
        *counts.per_user.entry(user.to_owned()).or_insert(0) += 1;
        metrics.connections_open.set(counts.total as f64);
        Slot {
            _held: Arc::new(Held {
                admissions: Arc::clone(self),
                user: user.to_owned(),
                gauge: metrics.connections_open.clone(),
            }),
        }
    }

    /// Connections held now, overall.
    pub(crate) fn total(&self) -> usize {
        self.counts().total
    }
}

/// One connection's place in this node's counts, given back when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Slot {
    _held: Arc<Held>,
}

struct Held {
    admissions: Arc<Admissions>,
    user: String,
    gauge: metrics::Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.admissions.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(count) = counts.per_user.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                counts.per_user.remove(&self.user);
            }
        }
        self.gauge.set(counts.total as f64);
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Slot")
    }
}

impl PartialEq for Slot {
    fn eq(&self, _: &Self) -> bool {
        // Two sessions are equal by who and where; the slot is bookkeeping.
        true
    }
}

impl Eq for Slot {}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(host: &str, origin: &str) -> Handshake {
        Handshake::new("/ws")
            .with_header("Host", host)
            .with_header("Origin", origin)
    }

    #[test]
    fn the_same_origin_is_the_host_with_its_scheme_default_port() {
        assert!(origin_allowed(
            &handshake("a.example", "http://a.example"),
            &[]
        ));
        assert!(origin_allowed(
            &handshake("a.example:80", "http://A.example"),
            &[]
        ));
        assert!(origin_allowed(
            &handshake("a.example", "https://a.example:443"),
            &[]
        ));
        assert!(!origin_allowed(
            &handshake("a.example", "https://a.example:8443"),
            &[]
        ));
        assert!(!origin_allowed(
            &handshake("a.example:8000", "http://a.example"),
            &[]
        ));
        assert!(!origin_allowed(
            &handshake("a.example", "http://a.example.evil"),
            &[]
        ));
        assert!(!origin_allowed(&handshake("a.example", "null"), &[]));
        assert!(!origin_allowed(
            &handshake("a.example", "http://a.example/x"),
            &[]
        ));
        assert!(!origin_allowed(
            &Handshake::new("/ws").with_header("Origin", "http://a.example"),
            &[]
        ));
    }

    #[test]
    fn listed_origins_and_the_wildcard_let_others_in() {
        let other = handshake("a.example", "https://b.example");
        assert!(!origin_allowed(&other, &["https://c.example".into()]));
        assert!(origin_allowed(&other, &["https://b.example/".into()]));
        assert!(origin_allowed(&other, &["*".into()]));
    }

    #[test]
    fn slots_count_and_are_given_back() {
        let admissions = Arc::new(Admissions::default());
        let metrics = Metrics::new();
        let a = admissions.try_take("ann", 2, 1, &metrics).ok();
        assert!(a.is_some());
        assert_eq!(
            admissions.try_take("ann", 2, 1, &metrics).err(),
            Some(Denied::UserFull)
        );
        let b = admissions.try_take("bob", 2, 1, &metrics).ok();
        assert!(b.is_some());
        assert_eq!(
            admissions.try_take("cat", 2, 1, &metrics).err(),
            Some(Denied::ServerFull)
        );
        drop(a);
        assert_eq!(admissions.total(), 1);
        assert!(admissions.try_take("ann", 2, 1, &metrics).is_ok());
        drop(b);
        assert_eq!(admissions.total(), 0);
        assert!(admissions.counts().per_user.is_empty());
    }
}
