//! Link faults between the nodes, set through each node's fail-point RPC (the `net_to_*`
//! fail points of the transport).

use super::*;

/// Sets the fault on the link from node `from` to node `to` (0-based), or clears it with
/// an empty `spec` (see src/transport/fault.rs for the syntax).
pub(crate) async fn set_link(addrs: &[String], from: usize, to: usize, spec: &str) {
    common::set_link(&addrs[from], to as u64 + 1, spec).await;
}

/// Cuts `a` and `b` apart (both directions).
pub(crate) async fn cut(addrs: &[String], a: usize, b: usize) {
    set_link(addrs, a, b, "drop").await;
    set_link(addrs, b, a, "drop").await;
}

/// Sets `spec` on every link between nodes, both directions ("" clears).
pub(crate) async fn set_all_links(addrs: &[String], spec: &str) {
    for a in 0..addrs.len() {
        for b in 0..addrs.len() {
            if a != b {
                set_link(addrs, a, b, spec).await;
            }
        }
    }
}

/// Clears every link fault.
pub(crate) async fn heal_links(addrs: &[String]) {
    set_all_links(addrs, "").await;
}
