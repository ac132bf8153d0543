//! The one key layout of a node's RocksDB instance.
//!
//! Every key a node stores is built and parsed here and nowhere else.
//!
//! ```text
//! 0x01 0x01                              node identity (StoreIdent)
//! 0x01 0x02 ‖ region_id ‖ 0x01 ‖ index   raft log entry
//! 0x01 0x02 ‖ region_id ‖ 0x02           raft state (hard state, last index)
//! 0x01 0x02 ‖ region_id ‖ 0x03           apply state (applied, truncated index/term)
//! 0x01 0x02 ‖ region_id ‖ 0x04           write records' sweep state
//! 0x01 0x02 ‖ region_id ‖ 0x04 ‖ client ‖ seq   a client's write record (seq 0: the client's
//!                                        own record; see raftstore/session.rs)
//! 0x01 0x03 ‖ region_id ‖ 0x01           region local state (descriptor, peer state)
//! 0x01 0x04                              the node's compacted revision (history)
//! 'z' ‖ user_key                         user data
//! ```
//!
//! The `history` column family has its own layout, built in `mvcc`: `esc(user_key) ‖
//! revision`.
//!
//! Invariants (tested below):
//! - ids and indexes are big-endian u64, so byte order is numeric order: one region's log is a
//!   single contiguous, sorted run, and two regions' keys never interleave;
//! - every local key (`0x01…`) sorts before every data key (`'z'…`);
//! - user data is one ordered keyspace, not region-prefixed: a region owns the slice
//!   `[data_key(start), data_end_key(end))`, so split and merge never move data.

use crate::ids::RegionId;

pub const LOCAL_PREFIX: u8 = 0x01;

pub use tessera_api::keys::{
    ids_key, in_range, is_lease_key, is_system_key, lease_key, parse_lease_key, tso_key,
    SYSTEM_KEY_PREFIX,
};
pub const DATA_PREFIX: u8 = b'z';

const NODE_IDENT_SUFFIX: u8 = 0x01;
const REGION_RAFT_PREFIX: u8 = 0x02;
const REGION_META_PREFIX: u8 = 0x03;

const RAFT_LOG_SUFFIX: u8 = 0x01;
const RAFT_STATE_SUFFIX: u8 = 0x02;
const APPLY_STATE_SUFFIX: u8 = 0x03;
const SESSION_SUFFIX: u8 = 0x04;
const REGION_STATE_SUFFIX: u8 = 0x01;

/// Length of `0x01 0x0? ‖ region_id`. A region's log, raft state and apply state keys share
/// these first bytes; the engine's memtable insert hint keeps one position per such prefix.
pub const REGION_PREFIX_LEN: usize = 2 + 8;
pub const RAFT_LOG_KEY_LEN: usize = REGION_PREFIX_LEN + 1 + 8;

/// A key that does not have the shape its reader expected: corrupt disk data or a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key {key:02x?} is not a {expected} key")]
    WrongKind {
        key: Vec<u8>,
        expected: &'static str,
    },
}

pub const NODE_IDENT_KEY: [u8; 2] = [LOCAL_PREFIX, NODE_IDENT_SUFFIX];
/// The revision this node's history was compacted at (`mvcc`).
pub const COMPACTED_KEY: [u8; 2] = [LOCAL_PREFIX, 0x04];

fn region_key(prefix: u8, region: RegionId, suffix: u8) -> [u8; REGION_PREFIX_LEN + 1] {
    let mut k = [0u8; REGION_PREFIX_LEN + 1];
    k[0] = LOCAL_PREFIX;
    k[1] = prefix;
    k[2..10].copy_from_slice(&region.0.to_be_bytes());
    k[10] = suffix;
    k
}

pub fn raft_log_key(region: RegionId, index: u64) -> [u8; RAFT_LOG_KEY_LEN] {
    let mut k = [0u8; RAFT_LOG_KEY_LEN];
    k[..11].copy_from_slice(&region_key(REGION_RAFT_PREFIX, region, RAFT_LOG_SUFFIX));
    k[11..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The bounds `[start, end)` of every log key of `region`.
pub fn raft_log_range(region: RegionId) -> ([u8; 11], [u8; 11]) {
    (
        region_key(REGION_RAFT_PREFIX, region, RAFT_LOG_SUFFIX),
        region_key(REGION_RAFT_PREFIX, region, RAFT_LOG_SUFFIX + 1),
    )
}

pub fn raft_state_key(region: RegionId) -> [u8; 11] {
    region_key(REGION_RAFT_PREFIX, region, RAFT_STATE_SUFFIX)
}

pub fn apply_state_key(region: RegionId) -> [u8; 11] {
    region_key(REGION_RAFT_PREFIX, region, APPLY_STATE_SUFFIX)
}

pub fn region_state_key(region: RegionId) -> [u8; 11] {
    region_key(REGION_META_PREFIX, region, REGION_STATE_SUFFIX)
}

/// The key of `region`'s write-record sweep state.
pub fn session_sweep_key(region: RegionId) -> [u8; 11] {
    region_key(REGION_RAFT_PREFIX, region, SESSION_SUFFIX)
}

/// The key of client `client`'s write record `seq` in `region` (seq 0: the client's own
/// record).
pub fn session_key(region: RegionId, client: u64, seq: u64) -> [u8; 27] {
    let mut k = [0u8; 27];
    k[..11].copy_from_slice(&region_key(REGION_RAFT_PREFIX, region, SESSION_SUFFIX));
    k[11..19].copy_from_slice(&client.to_be_bytes());
    k[19..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The bounds `[start, end)` of every write-record key of `region` (sweep state included).
pub fn session_range(region: RegionId) -> ([u8; 11], [u8; 11]) {
    (
        region_key(REGION_RAFT_PREFIX, region, SESSION_SUFFIX),
        region_key(REGION_RAFT_PREFIX, region, SESSION_SUFFIX + 1),
    )
}

/// The bounds of one client's write records in `region`.
pub fn session_client_range(region: RegionId, client: u64) -> ([u8; 27], [u8; 27]) {
    let start = session_key(region, client, 0);
    let end = match client.checked_add(1) {
        Some(next) => session_key(region, next, 0),
        None => {
            let mut e = [0u8; 27];
            e[..11].copy_from_slice(&region_key(REGION_RAFT_PREFIX, region, SESSION_SUFFIX + 1));
            e
        }
    };
    (start, end)
}

/// A write-record key's part after the region prefix (what a snapshot carries, so it can
/// be stored under another region id); `None` if `key` is not a write-record key.
pub fn session_suffix(key: &[u8]) -> Option<&[u8]> {
    let suffix = key.get(REGION_PREFIX_LEN..)?;
    (key[..2] == [LOCAL_PREFIX, REGION_RAFT_PREFIX]
        && suffix.first() == Some(&SESSION_SUFFIX)
        && (suffix.len() == 1 || suffix.len() == 17))
        .then_some(suffix)
}

/// The write-record key of `region` with `suffix` (from [`session_suffix`]).
pub fn session_key_from_suffix(region: RegionId, suffix: &[u8]) -> Vec<u8> {
    let mut k =
        region_key(REGION_RAFT_PREFIX, region, SESSION_SUFFIX)[..REGION_PREFIX_LEN].to_vec();
    k.extend_from_slice(suffix);
    k
}

/// Whether a write-record suffix is the sweep state's.
pub fn is_session_sweep_suffix(suffix: &[u8]) -> bool {
    suffix == [SESSION_SUFFIX]
}

/// `(client, seq)` of a write-record suffix; `None` for the sweep state.
pub fn parse_session_suffix(suffix: &[u8]) -> Option<(u64, u64)> {
    if suffix.len() != 17 || suffix[0] != SESSION_SUFFIX {
        return None;
    }
    let client = u64::from_be_bytes(suffix[1..9].try_into().ok()?);
    let seq = u64::from_be_bytes(suffix[9..17].try_into().ok()?);
    Some((client, seq))
}

/// The bounds of all region state keys, for finding every region at start-up.
pub fn region_meta_range() -> ([u8; 2], [u8; 2]) {
    (
        [LOCAL_PREFIX, REGION_META_PREFIX],
        [LOCAL_PREFIX, REGION_META_PREFIX + 1],
    )
}

/// The bounds of every raft key (log, raft state, apply state) of `region`.
pub fn region_raft_range(region: RegionId) -> ([u8; 10], [u8; 10]) {
    let mut start = [0u8; 10];
    start[0] = LOCAL_PREFIX;
    start[1] = REGION_RAFT_PREFIX;
    start[2..].copy_from_slice(&region.0.to_be_bytes());
    let mut end = start;
    match region.0.checked_add(1) {
        Some(next) => end[2..].copy_from_slice(&next.to_be_bytes()),
        None => {
            end[1] = REGION_RAFT_PREFIX + 1;
            end[2..].fill(0);
        }
    }
    (start, end)
}

pub fn decode_raft_log_key(key: &[u8]) -> Result<(RegionId, u64), KeyError> {
    if key.len() != RAFT_LOG_KEY_LEN
        || key[0] != LOCAL_PREFIX
        || key[1] != REGION_RAFT_PREFIX
        || key[10] != RAFT_LOG_SUFFIX
    {
        return Err(KeyError::WrongKind {
            key: key.to_vec(),
            expected: "raft log",
        });
    }
    let region = u64::from_be_bytes(key[2..10].try_into().expect("slice of length 8"));
    let index = u64::from_be_bytes(key[11..19].try_into().expect("slice of length 8"));
    Ok((RegionId(region), index))
}

pub fn decode_region_state_key(key: &[u8]) -> Result<RegionId, KeyError> {
    if key.len() != 11
        || key[0] != LOCAL_PREFIX
        || key[1] != REGION_META_PREFIX
        || key[10] != REGION_STATE_SUFFIX
    {
        return Err(KeyError::WrongKind {
            key: key.to_vec(),
            expected: "region state",
        });
    }
    Ok(RegionId(u64::from_be_bytes(
        key[2..10].try_into().expect("slice of length 8"),
    )))
}

pub fn data_key(user_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user_key.len());
    k.push(DATA_PREFIX);
    k.extend_from_slice(user_key);
    k
}

/// The exclusive upper bound of a region's data slice; an empty `end_key` (+infinity) maps to
/// the first key past all data.
pub fn data_end_key(end_key: &[u8]) -> Vec<u8> {
    if end_key.is_empty() {
        vec![DATA_PREFIX + 1]
    } else {
        data_key(end_key)
    }
}

pub fn origin_key(data_key: &[u8]) -> Result<&[u8], KeyError> {
    match data_key.split_first() {
        Some((&DATA_PREFIX, rest)) => Ok(rest),
        _ => Err(KeyError::WrongKind {
            key: data_key.to_vec(),
            expected: "data",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn log_keys_round_trip() {
        let k = raft_log_key(RegionId(7), 42);
        assert_eq!(decode_raft_log_key(&k), Ok((RegionId(7), 42)));
        assert!(decode_raft_log_key(&raft_state_key(RegionId(7))).is_err());
        assert!(decode_raft_log_key(b"zkey").is_err());
        let r = region_state_key(RegionId(9));
        assert_eq!(decode_region_state_key(&r), Ok(RegionId(9)));
        assert!(decode_region_state_key(&k).is_err());
    }

    #[test]
    fn data_keys_round_trip_and_bounds() {
        assert_eq!(origin_key(&data_key(b"abc")), Ok(&b"abc"[..]));
        assert!(origin_key(b"").is_err());
        assert!(origin_key(&raft_state_key(RegionId(1))).is_err());
        // +infinity bound is above every data key, however long.
        assert!(data_key(&[0xff; 64]) < data_end_key(b""));
        assert!(in_range(b"b", b"a", b""));
        assert!(in_range(b"a", b"a", b"b"));
        assert!(!in_range(b"b", b"a", b"b"));
        assert!(!in_range(b"", b"a", b""));
    }

    #[test]
    fn local_keys_sort_before_data() {
        let all_local = [
            NODE_IDENT_KEY.to_vec(),
            raft_log_key(RegionId(u64::MAX), u64::MAX).to_vec(),
            region_state_key(RegionId(u64::MAX)).to_vec(),
        ];
        for k in all_local {
            assert!(k < data_key(b""));
        }
    }

    #[test]
    fn region_raft_range_covers_exactly_its_keys() {
        for r in [1, 2, 255, 256, u64::MAX - 1, u64::MAX] {
            let (s, e) = region_raft_range(RegionId(r));
            for k in [
                raft_log_key(RegionId(r), 0).to_vec(),
                raft_log_key(RegionId(r), u64::MAX).to_vec(),
                raft_state_key(RegionId(r)).to_vec(),
                apply_state_key(RegionId(r)).to_vec(),
            ] {
                assert!(s.as_slice() <= k.as_slice() && k.as_slice() < e.as_slice());
            }
            if r > 1 {
                let prev = raft_state_key(RegionId(r - 1));
                assert!(prev.as_slice() < s.as_slice());
            }
            if r < u64::MAX {
                let next = raft_log_key(RegionId(r + 1), 0);
                assert!(next.as_slice() >= e.as_slice());
            }
            assert!(region_state_key(RegionId(r)).as_slice() >= e.as_slice());
        }
    }

    proptest! {
        /// Byte order of log keys is (region, index) order: each region's log is contiguous
        /// and sorted, and regions never interleave.
        #[test]
        fn log_key_order_is_region_then_index(
            a in (1u64..u64::MAX, any::<u64>()), b in (1u64..u64::MAX, any::<u64>())
        ) {
            let ka = raft_log_key(RegionId(a.0), a.1);
            let kb = raft_log_key(RegionId(b.0), b.1);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            let (lo, hi) = raft_log_range(RegionId(a.0));
            prop_assert!(lo.as_slice() <= ka.as_slice() && ka.as_slice() < hi.as_slice());
            let b_in_a = lo.as_slice() <= kb.as_slice() && kb.as_slice() < hi.as_slice();
            prop_assert_eq!(b_in_a, a.0 == b.0);
        }

        /// Data keys keep the user keys' order.
        #[test]
        fn data_key_order_is_user_order(a in any::<Vec<u8>>(), b in any::<Vec<u8>>()) {
            prop_assert_eq!(data_key(&a).cmp(&data_key(&b)), a.cmp(&b));
            prop_assert!(data_key(&a) < data_end_key(b""));
        }
    }
}
