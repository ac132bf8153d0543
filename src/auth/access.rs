//! A user's permissions compiled for checking: the key ranges of all its roles merged into
//! sorted, disjoint intervals per kind, so a check is one binary search. A range is allowed
//! when one interval covers it whole — which, the intervals being merged, is when the union
//! of the user's permissions covers it (as etcd checks ranges).

use std::collections::HashMap;

use super::model::{AuthDoc, Kind, ROOT};

/// `[start, end)`; `end` `None`: unbounded.
type Interval = (Vec<u8>, Option<Vec<u8>>);

#[derive(Debug, Default)]
pub struct Intervals(Vec<Interval>);

impl Intervals {
    fn build(mut v: Vec<Interval>) -> Self {
        v.sort();
        let mut out: Vec<Interval> = Vec::with_capacity(v.len());
        for (start, end) in v {
            if let Some(last) = out.last_mut() {
                // Overlapping or touching: one interval.
                let touches = match &last.1 {
                    None => true,
                    Some(e) => start <= *e,
                };
                if touches {
                    last.1 = match (last.1.take(), end) {
                        (None, _) | (_, None) => None,
                        (Some(a), Some(b)) => Some(a.max(b)),
                    };
                    continue;
                }
            }
            out.push((start, end));
        }
        Intervals(out)
    }

    fn around(&self, key: &[u8]) -> Option<&Interval> {
        let i = self.0.partition_point(|(s, _)| s.as_slice() <= key);
        i.checked_sub(1).map(|i| &self.0[i])
    }

    pub fn covers_key(&self, key: &[u8]) -> bool {
        self.around(key)
            .is_some_and(|(_, end)| end.as_ref().is_none_or(|e| key < e.as_slice()))
    }

    /// Whether `[start, end)` is covered (`end` `None`: unbounded).
    pub fn covers_range(&self, start: &[u8], end: Option<&[u8]>) -> bool {
        self.around(start).is_some_and(|(_, e)| match (e, end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(e), Some(end)) => e.as_slice() >= end && start < e.as_slice(),
        })
    }
}

/// What one user may do.
#[derive(Debug, Default)]
pub struct UserAccess {
    pub generation: u64,
    pub root: bool,
    pub read: Intervals,
    pub write: Intervals,
}

/// Every user's access, from the stored record.
pub fn compile(doc: &AuthDoc) -> HashMap<String, UserAccess> {
    doc.users
        .iter()
        .map(|(name, u)| {
            let (mut read, mut write) = (Vec::new(), Vec::new());
            for p in u
                .roles
                .iter()
                .filter_map(|r| doc.roles.get(r))
                .flat_map(|r| &r.permissions)
            {
                let end = match p.range_end.as_slice() {
                    [] => Some([p.key.as_slice(), &[0]].concat()),
                    [0] => None,
                    e => Some(e.to_vec()),
                };
                let iv = (p.key.clone(), end);
                match p.kind {
                    Kind::Read => read.push(iv),
                    Kind::Write => write.push(iv),
                    Kind::ReadWrite => {
                        read.push(iv.clone());
                        write.push(iv);
                    }
                }
            }
            let access = UserAccess {
                generation: u.generation,
                root: u.roles.contains(ROOT),
                read: Intervals::build(read),
                write: Intervals::build(write),
            };
            (name.clone(), access)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(s: &str, e: Option<&str>) -> Interval {
        (s.as_bytes().to_vec(), e.map(|e| e.as_bytes().to_vec()))
    }

    #[test]
    fn merged_intervals_cover_what_their_union_covers() {
        let i = Intervals::build(vec![
            iv("b", Some("d")),
            iv("a", Some("b")),
            iv("c", Some("e")),
            iv("m", Some("n")),
            iv("x", None),
        ]);
        assert_eq!(i.0.len(), 3, "{:?}", i.0);
        assert!(i.covers_range(b"a", Some(b"e")));
        assert!(i.covers_range(b"b", Some(b"c")));
        assert!(!i.covers_range(b"a", Some(b"f")));
        assert!(!i.covers_range(b"d", Some(b"n")), "a gap between e and m");
        assert!(i.covers_range(b"x", None));
        assert!(i.covers_range(b"y", Some(b"\xff")));
        assert!(!i.covers_range(b"m", None));
        assert!(i.covers_key(b"a"));
        assert!(i.covers_key(b"dzzz"));
        assert!(!i.covers_key(b"e"));
        assert!(!i.covers_key(b"0"));
        assert!(i.covers_key(b"m"));
        assert!(!i.covers_key(b"n"));
        assert!(!Intervals::default().covers_key(b"a"));
    }
}
