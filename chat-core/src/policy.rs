//! The host service's permission hook: allow or refuse a join, a room message or a direct message,
//! per user and target — the checks the original app made in its consumers.
//!
//! A refusal reaches the client as an `error` frame with code `forbidden` and the refusal's text;
//! the connection stays open.

use async_trait::async_trait;

/// Why the host refused an action; its text is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Refusal {
    /// A refusal with a message for the client.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Decides what each user may do. Every method allows by default, so a host overrides only what
/// it restricts.
///
/// ```
/// use async_trait::async_trait;
/// use chat_core::policy::{Policy, Refusal};
///
/// /// Only staff may enter rooms whose name starts with "staff.".
/// struct StaffRooms;
///
/// #[async_trait]
/// impl Policy for StaffRooms {
///     async fn allow_join(&self, user: &str, room: &str) -> Result<(), Refusal> {
///         if room.starts_with("staff.") && !user.ends_with(".staff") {
///             return Err(Refusal::new("staff only"));
///         }
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Policy: Send + Sync + 'static {
    /// May `user` join `room`?
    async fn allow_join(&self, user: &str, room: &str) -> Result<(), Refusal> {
        let _ = (user, room);
        Ok(())
    }

    /// May `user` post `body` to `room`?
    async fn allow_send(&self, user: &str, room: &str, body: &str) -> Result<(), Refusal> {
        let _ = (user, room, body);
        Ok(())
    }

    /// May `user` send `body` privately to `to`?
    async fn allow_direct(&self, user: &str, to: &str, body: &str) -> Result<(), Refusal> {
        let _ = (user, to, body);
        Ok(())
    }
}

/// The policy that allows everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Policy for AllowAll {}
