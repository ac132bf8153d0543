//! What each KV request needs of its caller once authentication is on (`crate::auth`): a
//! read needs read permission on its keys, a write write permission (and its old value is
//! left out of the answer unless the caller may also read the key), a compare-and-swap
//! both; revisions, timestamps and leases need only a logged-in caller — except that
//! attaching a lease to a key needs write permission on the key, and revoking a lease
//! write permission on every key attached to it (`lease`).

use tonic::Status;

use crate::auth::{Caller, Gate, Need};
use crate::proto;
use crate::storage::keys::SYSTEM_KEY_PREFIX;

/// A request checked against its caller before it runs.
pub(super) trait Authorize {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status>;
}

/// [`Authorize::authorize`], and for a refused user once more against a state read after
/// the refusal (`Gate::fresh`): a grant made through another node an instant ago counts.
pub(super) async fn authorize_fresh<R: Authorize>(
    r: &R,
    gate: &Gate,
    caller: &Caller,
) -> Result<(), Status> {
    gate.recheck(caller, || r.authorize(gate, caller)).await
}

/// An answer that may carry a key's old value: dropped unless the caller may read the key.
pub(super) trait Hide {
    fn hide(&mut self, _gate: &Gate, _caller: &Caller) {}
}

fn hide_prev(gate: &Gate, caller: &Caller, prev: &mut Option<proto::KeyValue>) {
    if prev
        .as_ref()
        .is_some_and(|kv| !gate.may_read(caller, &kv.key))
    {
        *prev = None;
    }
}

impl Authorize for proto::GetRequest {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status> {
        gate.allow(caller, Need::ReadKey(&self.key))
    }
}

impl Authorize for proto::PutRequest {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status> {
        gate.allow(caller, Need::WriteKey(&self.key))
    }
}

impl Authorize for proto::DeleteRequest {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status> {
        gate.allow(caller, Need::WriteKey(&self.key))
    }
}

impl Authorize for proto::CasRequest {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status> {
        gate.allow(caller, Need::ReadKey(&self.key))?;
        gate.allow(caller, Need::WriteKey(&self.key))
    }
}

impl Authorize for proto::ScanRequest {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status> {
        // An open end stops at the user keyspace's end.
        let user_end = [SYSTEM_KEY_PREFIX];
        let end = if self.end_key.is_empty() {
            &user_end[..]
        } else {
            &self.end_key[..]
        };
        gate.allow(caller, Need::ReadRange(&self.start_key, Some(end)))
    }
}

impl Authorize for proto::BatchGetRequest {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status> {
        self.keys
            .iter()
            .try_for_each(|k| gate.allow(caller, Need::ReadKey(k)))
    }
}

impl Authorize for proto::BatchWriteRequest {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status> {
        self.ops
            .iter()
            .try_for_each(|o| gate.allow(caller, Need::WriteKey(&o.key)))
    }
}

impl Authorize for proto::TsoRequest {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status> {
        gate.allow(caller, Need::Any)
    }
}

impl Authorize for proto::RevisionRequest {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status> {
        gate.allow(caller, Need::Any)
    }
}

impl Authorize for proto::LeaseRequest {
    fn authorize(&self, gate: &Gate, caller: &Caller) -> Result<(), Status> {
        match &self.op {
            Some(proto::lease_request::Op::Attach(a)) => gate.allow(caller, Need::WriteKey(&a.key)),
            // Revocation is checked against the lease's keys when it runs.
            _ => gate.allow(caller, Need::Any),
        }
    }
}

impl Hide for proto::GetResponse {}
impl Hide for proto::ScanResponse {}
impl Hide for proto::BatchGetResponse {}
impl Hide for proto::BatchWriteResponse {}
impl Hide for proto::TsoResponse {}
impl Hide for proto::RevisionResponse {}
impl Hide for proto::LeaseResponse {}

impl Hide for proto::PutResponse {
    fn hide(&mut self, gate: &Gate, caller: &Caller) {
        hide_prev(gate, caller, &mut self.prev_kv);
    }
}

impl Hide for proto::DeleteResponse {
    fn hide(&mut self, gate: &Gate, caller: &Caller) {
        hide_prev(gate, caller, &mut self.prev_kv);
    }
}

impl Hide for proto::CasResponse {
    fn hide(&mut self, gate: &Gate, caller: &Caller) {
        hide_prev(gate, caller, &mut self.prev_kv);
    }
}
