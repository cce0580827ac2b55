//! The protocol's naming rules: a room name is 1 to 100 characters, a user name 1 to 64, both of
//! ASCII letters, digits, `-`, `_` and `.`. Anything else is the `invalid_name` error.

/// Longest room name the protocol allows.
pub const MAX_ROOM_LEN: usize = 100;
/// Longest user name the protocol allows.
pub const MAX_USER_LEN: usize = 64;

fn valid(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `name` is a valid room name.
///
/// ```
/// assert!(chat_core::names::is_valid_room_name("lobby-2.en_GB"));
/// assert!(!chat_core::names::is_valid_room_name("two words"));
/// ```
pub fn is_valid_room_name(name: &str) -> bool {
    valid(name, MAX_ROOM_LEN)
}

/// Whether `name` is a valid user name.
///
/// ```
/// assert!(chat_core::names::is_valid_user_name("alice"));
/// assert!(!chat_core::names::is_valid_user_name(&"a".repeat(65)));
/// ```
pub fn is_valid_user_name(name: &str) -> bool {
    valid(name, MAX_USER_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert!(is_valid_room_name(&"r".repeat(100)));
        assert!(!is_valid_room_name(&"r".repeat(101)));
        assert!(is_valid_user_name(&"u".repeat(64)));
        assert!(!is_valid_user_name(""));
        assert!(!is_valid_user_name("bob!"));
        assert!(!is_valid_room_name("salle-été"));
    }
}
