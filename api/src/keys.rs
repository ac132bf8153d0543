//! The user keyspace as clients and servers both see it.
//!
//! Keys are byte strings ordered bytewise. A range `[start, end)` with an empty `end` runs
//! to the end of the keyspace. Keys that start with [`SYSTEM_KEY_PREFIX`] form the system
//! keyspace, where the placement region keeps the cluster's own metadata; user clients may
//! not read or write it.
//!
//! Invariants:
//! - the system keyspace is exactly the keys whose first byte is [`SYSTEM_KEY_PREFIX`]; the
//!   empty key is a user key;
//! - [`in_range`] is the one test of the `[start, end)` rule (empty `end` = +infinity); the
//!   client's region cache and the server's routing both use it.

/// User keys starting with this byte are the system keyspace: the placement region
/// `[0xFF, +inf)`. 0xFF never occurs in UTF-8, so no text key is taken from users.
pub const SYSTEM_KEY_PREFIX: u8 = 0xFF;

/// Whether `user_key` belongs to the system keyspace.
pub fn is_system_key(user_key: &[u8]) -> bool {
    user_key.first() == Some(&SYSTEM_KEY_PREFIX)
}

/// The system key holding placement's id counter: the highest id handed out (regions,
/// peers, nodes). Seeded at bootstrap, raised by compare-and-swap.
pub fn ids_key() -> Vec<u8> {
    let mut k = vec![SYSTEM_KEY_PREFIX];
    k.extend_from_slice(b"ids");
    k
}

/// The system key holding the timestamp oracle's high-water mark: every cluster revision
/// handed out is at most the value stored here (see the server's `placement::tso`). Clients
/// route their requests for revisions to the leader of the region holding it.
pub fn tso_key() -> Vec<u8> {
    let mut k = vec![SYSTEM_KEY_PREFIX];
    k.extend_from_slice(b"tso");
    k
}

/// Whether `key` lies in `[start, end)`, where an empty `end` is +infinity.
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// The end of the range of keys that start with `prefix`: the least key above all of them,
/// capped at the start of the system keyspace (so `prefix_end(b"")` is every user key).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end.min(vec![SYSTEM_KEY_PREFIX]);
        }
    }
    vec![SYSTEM_KEY_PREFIX]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_the_system_keyspace() {
        assert!(in_range(b"b", b"a", b"c"));
        assert!(in_range(b"a", b"a", b"c"));
        assert!(!in_range(b"c", b"a", b"c"));
        assert!(in_range(b"zzz", b"a", b""));
        assert!(is_system_key(&[0xFF, 1]));
        assert!(!is_system_key(b"/topics"));
        assert!(!is_system_key(b""));
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(&[b'a', 0xFF]), b"b");
        assert_eq!(prefix_end(b""), [0xFF]);
        assert_eq!(prefix_end(&[0xFE, 0xFF]), [0xFF]);
    }
}
