//! Layer configuration: capacity, expiry and group expiry, with the names channels_redis uses
//! (`capacity`, `expiry`, `group_expiry`, `channel_capacity`) so that settings carry over.

use std::time::Duration;

/// A capacity that applies to the channels whose name matches a glob pattern.
///
/// `*` matches any run of characters (including none) and `?` exactly one; everything else
/// matches itself. The first matching pattern wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityPattern {
    /// The glob, such as `"bulk.*"`.
    pub pattern: String,
    /// The capacity for channels it matches.
    pub capacity: usize,
}

impl CapacityPattern {
    /// Whether `name` matches this pattern.
    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.pattern.as_bytes(), name.as_bytes())
    }
}

/// Settings shared by every channel layer backend.
///
/// ```
/// use std::time::Duration;
/// use chat_core::layer::LayerConfig;
///
/// let config = LayerConfig::default()
///     .with_capacity(500)
///     .with_channel_capacity("bulk.*", 10)
///     .with_expiry(Duration::from_secs(30));
/// assert_eq!(config.capacity_for("bulk.abc"), 10);
/// assert_eq!(config.capacity_for("conn.abc"), 500);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerConfig {
    /// Pending messages a channel holds at most before `send` fails with `ChannelFull`
    /// (default 100).
    pub capacity: usize,
    /// Per-pattern capacities that override `capacity`, first match wins (default none).
    pub channel_capacity: Vec<CapacityPattern>,
    /// How long a message waits for its reader before it is dropped (default 60 s).
    pub expiry: Duration,
    /// How long a group membership lasts without a fresh `group_add` (default 86,400 s). Keep it
    /// longer than the longest connection you expect, or refresh memberships periodically.
    pub group_expiry: Duration,
}

impl Default for LayerConfig {
    fn default() -> Self {
        Self {
            capacity: 100,
            channel_capacity: Vec::new(),
            expiry: Duration::from_secs(60),
            group_expiry: Duration::from_secs(86_400),
        }
    }
}

impl LayerConfig {
    /// Sets the default channel capacity (at least 1).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Adds a capacity for channels whose name matches `pattern` (at least 1).
    pub fn with_channel_capacity(mut self, pattern: impl Into<String>, capacity: usize) -> Self {
        self.channel_capacity.push(CapacityPattern {
            pattern: pattern.into(),
            capacity: capacity.max(1),
        });
        self
    }

    /// Sets how long an unread message lives.
    pub fn with_expiry(mut self, expiry: Duration) -> Self {
        self.expiry = expiry;
        self
    }

    /// Sets how long a membership lives without a refresh.
    pub fn with_group_expiry(mut self, group_expiry: Duration) -> Self {
        self.group_expiry = group_expiry;
        self
    }

    /// The capacity of the channel called `name`.
    pub fn capacity_for(&self, name: &str) -> usize {
        self.channel_capacity
            .iter()
            .find(|p| p.matches(name))
            .map_or(self.capacity, |p| p.capacity)
            .max(1)
    }
}

/// Iterative glob matching with single-star backtracking: linear in practice, no recursion, so a
/// hostile pattern cannot blow the stack.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(m("*", ""));
        assert!(m("bulk.*", "bulk.x"));
        assert!(m("bulk.*", "bulk."));
        assert!(!m("bulk.*", "bulkx"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("*.resp*", "http.response.1"));
        assert!(!m("*.resp", "http.response"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exactly"));
    }
}
