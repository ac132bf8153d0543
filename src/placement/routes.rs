//! The routing table: one `RegionRoute` row per region in the placement region, written by
//! the region's leader (docs/architecture.md, "Placement").
//!
//! Rows are keyed by the region's END key (`routes/` ‖ 0x01 ‖ end, or `routes/` ‖ 0x02 for
//! the region that runs to +inf), not its start key: the region holding key k is then the
//! first row after `routes/` ‖ 0x01 ‖ k, which a forward scan with limit 1 finds. Keyed by
//! start key the lookup would need a reverse scan. CockroachDB's meta ranges use end keys for
//! the same reason.
//!
//! Invariants:
//! - a route report never overwrites a newer row (higher epoch, or same epoch and newer
//!   term);
//! - [`scan_routes`] stops at the first gap rather than report a range as empty; a
//!   [`RouteTable`] lists its gaps.

use std::collections::HashMap;

use super::{system_key, update, Update};
use crate::client::{CasAction, Client, Compare, Error};
use crate::proto::RegionRoute;

fn routes_prefix() -> Vec<u8> {
    system_key(b"routes/")
}

fn routes_end() -> Vec<u8> {
    system_key(b"routes0")
}

/// The routing-table key of a region with this end key.
pub fn route_key(end_key: &[u8]) -> Vec<u8> {
    let mut k = routes_prefix();
    if end_key.is_empty() {
        k.push(0x02);
    } else {
        k.push(0x01);
        k.extend_from_slice(end_key);
    }
    k
}

/// The first routing-table key that can belong to a region holding `key`.
fn route_seek(key: &[u8]) -> Vec<u8> {
    let mut k = routes_prefix();
    k.push(0x01);
    k.extend_from_slice(key);
    if !key.is_empty() {
        k.push(0);
    }
    k
}

fn decode_route(v: &[u8]) -> Result<RegionRoute, Error> {
    <RegionRoute as prost::Message>::decode(v)
        .map_err(|e| Error::Server(format!("bad routing record: {e}")))
}

/// Orders reports of a region: a higher epoch wins, and for the same epoch the newer term.
fn route_rank(r: &RegionRoute) -> (u64, u64, u64) {
    let e = r.region.as_ref().and_then(|r| r.epoch).unwrap_or_default();
    (e.version, e.conf_ver, r.term)
}

/// Records a leader's report of its region. A report older than what the table holds (lower
/// epoch, or same epoch and an older term) is ignored; returns whether it was written.
/// Rows of regions this one now covers, and that are older, are removed.
pub async fn report_region(client: &Client, route: &RegionRoute) -> Result<bool, Error> {
    let region = route
        .region
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("route without region".into()))?;
    let key = route_key(&region.end_key);
    let value = prost::Message::encode_to_vec(route);
    // Some(true): written, and the range may cover older rows; Some(false): written over
    // a row of the same region and range (a leader or load report), nothing to clean up.
    let written = update(client, &key, 10, "route report", |cur| {
        let prev = cur.map(|kv| decode_route(&kv.value)).transpose()?;
        Ok(match prev {
            Some(p) if route_rank(&p) > route_rank(route) => Update::Keep(None),
            Some(p)
                if p.region
                    .as_ref()
                    .is_some_and(|r| r.id == region.id && r.start_key == region.start_key) =>
            {
                Update::Write(value.clone(), Some(false))
            }
            _ => Update::Write(value.clone(), Some(true)),
        })
    })
    .await?;
    match written {
        None => return Ok(false),
        Some(false) => return Ok(true),
        Some(true) => {}
    }
    // Rows ending inside (start, end) describe ranges this region now covers: of regions
    // it split from or merged, or its own from before a merge (a row per region and end key).
    let from = route_seek(&region.start_key);
    if from >= key {
        return Ok(true);
    }
    for kv in client.scan(&from, &key, 0).await? {
        let old = decode_route(&kv.value)?;
        if route_rank(&old).0 <= route_rank(route).0 {
            client
                .cas(
                    &kv.key,
                    Compare::ModRevision(kv.mod_revision),
                    CasAction::Delete,
                )
                .await?;
        }
    }
    Ok(true)
}

/// The routing-table row of the region holding `key`, if the table has one.
pub async fn locate_key(client: &Client, key: &[u8]) -> Result<Option<RegionRoute>, Error> {
    Ok(scan_routes(client, key, &[], 1).await?.into_iter().next())
}

/// Rows of the regions overlapping `[start, end)` (empty end = +inf) in key order, at most
/// `limit` (0 = all). Stops at the first gap (a region not reported yet): the caller must not
/// take a gap for an empty range.
const ROUTE_PAGE: usize = 1024;

pub async fn scan_routes(
    client: &Client,
    start: &[u8],
    end: &[u8],
    limit: usize,
) -> Result<Vec<RegionRoute>, Error> {
    let mut out: Vec<RegionRoute> = Vec::new();
    let mut expect = start.to_vec();
    let mut from = route_seek(start);
    let to = routes_end();
    loop {
        // Large pages: the scheduler reads the whole table, 10,000 rows at scale.
        let batch = client.scan(&from, &to, ROUTE_PAGE).await?;
        let done = batch.len() < ROUTE_PAGE;
        for kv in &batch {
            let route = decode_route(&kv.value)?;
            let Some(r) = route.region.as_ref() else {
                continue;
            };
            // The row must start at or before the key we still need, or there is a gap.
            if r.start_key.as_slice() > expect.as_slice() {
                return Ok(out);
            }
            let r_end = r.end_key.clone();
            out.push(route);
            if (limit != 0 && out.len() >= limit)
                || r_end.is_empty()
                || (!end.is_empty() && r_end.as_slice() >= end)
            {
                return Ok(out);
            }
            expect = r_end;
        }
        if done {
            return Ok(out);
        }
        let Some(last) = batch.last() else {
            return Ok(out);
        };
        from = last.key.clone();
        from.push(0);
    }
}

/// The whole routing table: one row per region (the highest-ranked when a split briefly
/// leaves two rows of one region), in key order, and the key ranges no row covers.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub routes: Vec<RegionRoute>,
    /// `[start, end)` ranges (empty end = +inf) without a row: a region made by a split or
    /// a restart whose leader has not reported yet. Normally empty within seconds.
    pub gaps: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Reads every routing-table row. Unlike [`scan_routes`], which stops at a gap because a
/// router must not take one for an empty range, this goes on past gaps and lists them, so
/// that status and the scheduler see every region that reported.
pub async fn route_table(client: &Client) -> Result<RouteTable, Error> {
    let mut rows = Vec::new();
    let mut from = route_seek(b"");
    let to = routes_end();
    loop {
        let batch = client.scan(&from, &to, ROUTE_PAGE).await?;
        for kv in &batch {
            rows.push(decode_route(&kv.value)?);
        }
        match batch.last() {
            Some(last) if batch.len() >= ROUTE_PAGE => {
                from = last.key.clone();
                from.push(0);
            }
            _ => return Ok(table_of(rows)),
        }
    }
}

/// [`RouteTable`] from rows in routing-key (end key) order.
fn table_of(rows: Vec<RegionRoute>) -> RouteTable {
    let mut best: HashMap<u64, usize> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        let Some(id) = r.region.as_ref().map(|g| g.id) else {
            continue;
        };
        match best.get(&id) {
            Some(&j) if route_rank(&rows[j]) >= route_rank(r) => {}
            _ => {
                best.insert(id, i);
            }
        }
    }
    let routes: Vec<RegionRoute> = rows
        .into_iter()
        .enumerate()
        .filter(|(i, r)| {
            r.region
                .as_ref()
                .is_some_and(|g| best.get(&g.id) == Some(i))
        })
        .map(|(_, r)| r)
        .collect();
    let mut gaps = Vec::new();
    // The first key not yet covered; None once a row reached the end of the keyspace.
    let mut expect: Option<Vec<u8>> = Some(Vec::new());
    for g in routes.iter().filter_map(|r| r.region.as_ref()) {
        let Some(want) = expect.as_ref() else {
            break;
        };
        if g.start_key > *want {
            gaps.push((want.clone(), g.start_key.clone()));
        }
        if g.end_key.is_empty() {
            expect = None;
        } else if g.end_key > *want {
            expect = Some(g.end_key.clone());
        }
    }
    if let Some(want) = expect {
        gaps.push((want, Vec::new()));
    }
    RouteTable { routes, gaps }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_rows_sort_by_end_key_and_seek_finds_the_holder() {
        // Regions ["", b) [b, d) [d, +inf).
        let rows = [route_key(b"b"), route_key(b"d"), route_key(b"")];
        assert!(rows.windows(2).all(|w| w[0] < w[1]));
        let holder = |key: &[u8]| rows.iter().position(|r| *r >= route_seek(key));
        assert_eq!(holder(b""), Some(0));
        assert_eq!(holder(b"a"), Some(0));
        assert_eq!(holder(b"b"), Some(1), "a region's end key is exclusive");
        assert_eq!(holder(b"c\xff\xff"), Some(1));
        assert_eq!(holder(b"d"), Some(2));
        assert_eq!(holder(b"zzz"), Some(2));
        assert!(route_seek(b"") < route_key(b"\x00"));
    }

    #[test]
    fn newer_epoch_then_newer_term_wins() {
        let route = |version, conf_ver, term| RegionRoute {
            region: Some(crate::proto::Region {
                epoch: Some(crate::proto::RegionEpoch { version, conf_ver }),
                ..Default::default()
            }),
            term,
            ..Default::default()
        };
        assert!(route_rank(&route(2, 1, 1)) > route_rank(&route(1, 5, 9)));
        assert!(route_rank(&route(1, 2, 1)) > route_rank(&route(1, 1, 9)));
        assert!(route_rank(&route(1, 1, 3)) > route_rank(&route(1, 1, 2)));
    }

    fn row(id: u64, start: &[u8], end: &[u8], version: u64) -> RegionRoute {
        RegionRoute {
            region: Some(crate::proto::Region {
                id,
                start_key: start.to_vec(),
                end_key: end.to_vec(),
                epoch: Some(crate::proto::RegionEpoch {
                    version,
                    conf_ver: 1,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ids(t: &RouteTable) -> Vec<u64> {
        t.routes
            .iter()
            .filter_map(|r| r.region.as_ref())
            .map(|r| r.id)
            .collect()
    }

    #[test]
    fn a_complete_table_has_no_gaps() {
        let t = table_of(vec![row(2, b"", b"b", 2), row(1, b"b", b"", 2)]);
        assert_eq!(ids(&t), [2, 1]);
        assert!(t.gaps.is_empty(), "{:?}", t.gaps);
    }

    #[test]
    fn gaps_are_listed_and_the_rows_past_them_kept() {
        // Region 1 split at b and then d; the new regions 2 ([b, d)) and 3 (["", b)) have
        // not reported. The table holds region 1's row for [d, +inf) only.
        let t = table_of(vec![row(1, b"d", b"", 3)]);
        assert_eq!(ids(&t), [1]);
        assert_eq!(t.gaps, [(Vec::new(), b"d".to_vec())]);
        // A gap in the middle, and one at the end.
        let t = table_of(vec![row(3, b"", b"b", 3), row(1, b"d", b"f", 3)]);
        assert_eq!(ids(&t), [3, 1]);
        assert_eq!(
            t.gaps,
            [(b"b".to_vec(), b"d".to_vec()), (b"f".to_vec(), Vec::new())]
        );
        assert!(table_of(Vec::new()).gaps == [(Vec::new(), Vec::new())]);
    }

    #[test]
    fn a_region_with_two_rows_counts_once_with_its_newer_row() {
        // Region 1 was [a, +inf) and split at m keeping [a, m): its new row (key m) is in,
        // its old row (key +inf) is not yet overwritten by region 2's report.
        let t = table_of(vec![
            row(9, b"", b"a", 1),
            row(1, b"a", b"m", 2),
            row(1, b"a", b"", 1),
        ]);
        assert_eq!(ids(&t), [9, 1]);
        assert_eq!(t.gaps, [(b"m".to_vec(), Vec::new())]);
        // Overlapping rows of different regions (the old one not yet cleaned up) leave no
        // gap and count both.
        let t = table_of(vec![row(2, b"", b"b", 2), row(1, b"", b"", 1)]);
        assert_eq!(ids(&t), [2, 1]);
        assert!(t.gaps.is_empty());
    }
}
