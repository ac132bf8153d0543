//! The cluster's users, roles and permissions: one record, `auth`, holding the whole
//! [`AuthDoc`] as JSON. One record keeps every change atomic (a role and the users holding
//! it change together) and lets a node learn of any change by reading one key; the users
//! and roles of a metadata service number in the tens, not millions.

use super::{system_key, update, Update};
use crate::auth::model::{AuthDoc, Change};
use crate::client::{Client, Error};

fn auth_key() -> Vec<u8> {
    system_key(b"auth")
}

fn decode(v: &[u8]) -> Result<AuthDoc, Error> {
    serde_json::from_slice(v).map_err(|e| Error::Server(format!("bad auth record: {e}")))
}

/// The stored state (`None`: authentication was never configured).
pub async fn load(client: &Client) -> Result<Option<AuthDoc>, Error> {
    client
        .get(&auth_key())
        .await?
        .map(|kv| decode(&kv.value))
        .transpose()
}

/// Makes `change`; returns the state after it, or why it was refused (`Ok(Err(..))`).
pub async fn change(client: &Client, change: &Change) -> Result<Result<AuthDoc, String>, Error> {
    update(client, &auth_key(), 10, "an auth change", |cur| {
        let mut doc = match cur {
            Some(kv) => decode(&kv.value)?,
            None => AuthDoc::default(),
        };
        if let Err(why) = doc.apply(change) {
            return Ok(Update::Keep(Err(why)));
        }
        let value = serde_json::to_vec(&doc).map_err(|e| Error::Server(e.to_string()))?;
        Ok(Update::Write(value, Ok(doc)))
    })
    .await
}
