//! Naming rules for channels and groups, shared by every backend so that a name valid on one is
//! valid on all: ASCII letters, digits, `-`, `_` and `.`, 1 to 99 characters.

use super::LayerError;

/// Names must be shorter than this many bytes (the Channels specification's limit).
pub const MAX_NAME_LEN: usize = 100;

fn check(kind: &'static str, name: &str) -> Result<(), LayerError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= MAX_NAME_LEN {
        Some("100 characters or longer")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("only ASCII letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(LayerError::InvalidName {
            kind,
            name: name.chars().take(MAX_NAME_LEN).collect(),
            reason,
        }),
    }
}

/// Checks a channel name.
///
/// ```
/// use chat_core::layer::validate_channel_name;
/// assert!(validate_channel_name("conn.x1_y-2").is_ok());
/// assert!(validate_channel_name("no spaces").is_err());
/// assert!(validate_channel_name(&"a".repeat(100)).is_err());
/// ```
pub fn validate_channel_name(name: &str) -> Result<(), LayerError> {
    check("channel", name)
}

/// Checks a group name (the same rules as channels).
pub fn validate_group_name(name: &str) -> Result<(), LayerError> {
    check("group", name)
}

/// Checks a `new_channel` prefix: the same alphabet, leaving room for the unique suffix.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), LayerError> {
    check("prefix", prefix)?;
    if prefix.len() + 1 + super::subscription::SUFFIX_LEN >= MAX_NAME_LEN {
        return Err(LayerError::InvalidName {
            kind: "prefix",
            name: prefix.to_owned(),
            reason: "too long to leave room for the unique suffix",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_whole_alphabet() {
        assert!(validate_group_name("Az09-_.").is_ok());
        assert!(validate_channel_name(&"a".repeat(99)).is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", "a b", "a!b", "é", "a/b", "a:b", "room\n"] {
            assert!(validate_channel_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_group_name(&"a".repeat(100)).is_err());
    }
}
