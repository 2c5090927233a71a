//! Session and agent ids: 1–128 characters of `A-Z a-z 0-9 . _ : @ -`.

pub const MAX_ID_LEN: usize = 128;

/// Checks an id taken from a request header. Bytes, not `str`: header values may hold
/// anything, and a non-UTF-8 value must be a 400, not a panic.
pub fn valid_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// The agent's role: the part before the first `-` (`executor-1` → `executor`).
pub fn role(agent_id: &str) -> &str {
    agent_id.split('-').next().unwrap_or(agent_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert!(valid_id(b"executor-1"));
        assert!(valid_id(b"a.b_c:d@e-f"));
        assert!(valid_id(&[b'x'; 128]));
    }

    #[test]
    fn refuses_anything_else() {
        assert!(!valid_id(b""));
        assert!(!valid_id(&[b'x'; 129]));
        for bad in [
            &b"a b"[..],
            b"a/b",
            b"a,b",
            b"a=b",
            b"\xff",
            b"a\"b",
            b"a;b",
            b"\xc3\xa9",
        ] {
            assert!(!valid_id(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn role_is_the_prefix_before_the_first_dash() {
        assert_eq!(role("executor-1"), "executor");
        assert_eq!(role("ralph-loop-2"), "ralph");
        assert_eq!(role("main"), "main");
        assert_eq!(role("-x"), "");
    }
}
