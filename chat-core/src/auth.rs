//! TEMPORARY stub, replaced by the real module.
#![allow(missing_docs)]
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
}
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials")]
    Missing,
    #[error("invalid credentials: {0}")]
    Invalid(String),
    #[error("expired credentials")]
    Expired,
}
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, handshake: &Handshake) -> Result<String, AuthError>;
}
#[derive(Debug, Clone, Default)]
pub struct DevAuthenticator;
#[async_trait::async_trait]
impl Authenticator for DevAuthenticator {
    async fn authenticate(&self, h: &Handshake) -> Result<String, AuthError> {
        let q = h.query.clone().unwrap_or_default();
        q.strip_prefix("user=")
            .map(str::to_owned)
            .ok_or(AuthError::Missing)
    }
}
