//! Identifier rules shared by server and clients: user/device ids, client message ids, 1:1 conversation ids.

/// Longest user, device or client message id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// True if `id` is a valid user or device id: 1..=64 characters from `[A-Za-z0-9_.@-]`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

/// True if `id` is a valid client message id: 1..=64 bytes, no control characters.
pub fn is_valid_client_msg_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control)
}

/// The conversation id of the 1:1 conversation between `a` and `b`: `u:<min>:<max>`.
pub fn direct_conversation_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("u:{lo}:{hi}")
}

/// The two users of a 1:1 conversation id, or `None` if it is not one.
pub fn direct_conversation_users(conversation_id: &str) -> Option<(&str, &str)> {
    let rest = conversation_id.strip_prefix("u:")?;
    let (a, b) = rest.split_once(':')?;
    (is_valid_id(a) && is_valid_id(b) && a <= b).then_some((a, b))
}

/// The other user of a 1:1 conversation that `user` is part of.
pub fn direct_peer<'a>(conversation_id: &'a str, user: &str) -> Option<&'a str> {
    let (a, b) = direct_conversation_users(conversation_id)?;
    if a == user {
        Some(b)
    } else if b == user {
        Some(a)
    } else {
        None
    }
}

/// The conversation id of group `group_id`.
pub fn group_conversation_id(group_id: &str) -> String {
    format!("g:{group_id}")
}

/// The group of a group conversation id, or `None` if it is not one.
pub fn conversation_group(conversation_id: &str) -> Option<&str> {
    conversation_id
        .strip_prefix("g:")
        .filter(|group| is_valid_id(group))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_conversation_id_is_symmetric_and_parses_back() {
        let id = direct_conversation_id("bob", "alice");
        assert_eq!(id, direct_conversation_id("alice", "bob"));
        assert_eq!(direct_conversation_users(&id), Some(("alice", "bob")));
        assert_eq!(direct_peer(&id, "alice"), Some("bob"));
        assert_eq!(direct_peer(&id, "bob"), Some("alice"));
        assert_eq!(direct_peer(&id, "carol"), None);
    }

    #[test]
    fn ids_are_validated() {
        assert!(is_valid_id("alice.b-1@x_y"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a:b"));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(
            direct_conversation_users("u:bob:alice").is_none(),
            "unordered pair"
        );
        assert!(direct_conversation_users("g:1").is_none());
        assert!(!is_valid_client_msg_id("a\nb"));
    }
}
