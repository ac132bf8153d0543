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

/// The lease keyspace `[0xFF 0xFF, +inf)`: one record per lease at [`lease_key`], followed
/// by one row per key attached to it ([`lease_attached_row`]). It lies after every placement
/// record (whose keys are `0xFF` and then ASCII), so it forms regions of its own, which split
/// like data regions do, only between two leases.
pub const LEASE_KEYSPACE: [u8; 2] = [SYSTEM_KEY_PREFIX, 0xFF];

/// The record of lease `id`: the lease keyspace's prefix and the id, big-endian.
pub fn lease_key(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(LEASE_KEYSPACE.len() + 8);
    k.extend_from_slice(&LEASE_KEYSPACE);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The length of every lease record's key.
pub const LEASE_KEY_LEN: usize = LEASE_KEYSPACE.len() + 8;

/// The row recording that `key` was attached to lease `id`; it sorts right after the lease's
/// record and before the next lease's.
pub fn lease_attached_row(id: u64, key: &[u8]) -> Vec<u8> {
    let mut k = lease_key(id);
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// The range `[start, end)` of lease `id`'s record and attached rows.
pub fn lease_rows(id: u64) -> (Vec<u8>, Vec<u8>) {
    let start = lease_key(id);
    let mut end = start.clone();
    end.push(1);
    (start, end)
}

/// The lease id of a lease record's key, or `None` for any other key.
pub fn parse_lease_key(key: &[u8]) -> Option<u64> {
    let id = key.strip_prefix(&LEASE_KEYSPACE)?;
    Some(u64::from_be_bytes(id.try_into().ok()?))
}

/// The attached key of an attached row of lease `id`, or `None` for any other key.
pub fn parse_lease_attached_row(id: u64, row: &[u8]) -> Option<&[u8]> {
    let rest = row.strip_prefix(lease_key(id).as_slice())?;
    rest.strip_prefix(&[0])
}

/// Whether a range that ends at `end` (empty = +infinity) reaches into the lease keyspace
/// (which runs to +infinity, so where the range starts does not matter).
pub fn reaches_leases(end: &[u8]) -> bool {
    end.is_empty() || end > &LEASE_KEYSPACE[..]
}

/// Whether `key` belongs to the lease keyspace.
pub fn is_lease_key(key: &[u8]) -> bool {
    key.starts_with(&LEASE_KEYSPACE)
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

    #[test]
    fn lease_rows_sort_with_their_lease() {
        let (lo, hi) = lease_rows(7);
        let row = lease_attached_row(7, b"/k");
        assert!(lo < row && row < hi && hi < lease_key(8));
        assert!(lease_key(7) > ids_key() && lease_key(0) > tso_key());
        assert_eq!(parse_lease_key(&lease_key(7)), Some(7));
        assert_eq!(parse_lease_key(&row), None);
        assert_eq!(parse_lease_attached_row(7, &row), Some(&b"/k"[..]));
        assert_eq!(parse_lease_attached_row(8, &row), None);
        assert!(is_system_key(&lease_key(1)) && is_lease_key(&row));
        assert!(reaches_leases(b"") && !reaches_leases(&LEASE_KEYSPACE));
    }
}
