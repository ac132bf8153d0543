//! Signed tokens: `NAME:GENERATION:EXPIRY:MAC`, the MAC an HMAC-SHA256 of the rest under the
//! cluster's token key (made anew each time authentication is enabled). Checking one costs
//! one HMAC and a lookup — no password hashing per request, and no table of issued tokens
//! to grow (etcd's simple tokens keep one per login).
//!
//! A token names the user's generation: a password change or a deletion gives the user a
//! new one (or none), and every token issued before stops working.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::hmac;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

use tessera_api::hex::{decode as unhex, encode as hex};

/// A token for `name` at `generation`, valid until `expires` (seconds since the epoch).
pub fn sign(key: &hmac::Key, name: &str, generation: u64, expires: u64) -> String {
    let body = format!("{name}:{generation}:{expires}");
    let tag = hmac::sign(key, body.as_bytes());
    format!("{body}:{}", hex(tag.as_ref()))
}

/// What a valid token says.
#[derive(Debug, PartialEq, Eq)]
pub struct Claims<'a> {
    pub name: &'a str,
    pub generation: u64,
    pub expires: u64,
}

/// Why a token was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    Malformed,
    BadSignature,
    Expired,
}

/// Checks `token`'s signature and expiry (at `now`).
pub fn verify<'a>(key: &hmac::Key, token: &'a str, now: u64) -> Result<Claims<'a>, Invalid> {
    let (body, tag) = token.rsplit_once(':').ok_or(Invalid::Malformed)?;
    let tag = unhex(tag).ok_or(Invalid::Malformed)?;
    hmac::verify(key, body.as_bytes(), &tag).map_err(|_| Invalid::BadSignature)?;
    let mut parts = body.splitn(3, ':');
    let (Some(name), Some(generation), Some(expires)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(Invalid::Malformed);
    };
    let generation = generation.parse().map_err(|_| Invalid::Malformed)?;
    let expires: u64 = expires.parse().map_err(|_| Invalid::Malformed)?;
    if expires <= now {
        return Err(Invalid::Expired);
    }
    Ok(Claims {
        name,
        generation,
        expires,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &[b; 32])
    }

    #[test]
    fn a_token_verifies_until_it_expires_and_only_under_its_key() {
        let t = sign(&key(1), "alice", 7, 1_000);
        assert_eq!(
            verify(&key(1), &t, 999),
            Ok(Claims {
                name: "alice",
                generation: 7,
                expires: 1_000
            })
        );
        assert_eq!(verify(&key(1), &t, 1_000), Err(Invalid::Expired));
        assert_eq!(verify(&key(2), &t, 999), Err(Invalid::BadSignature));
        // A changed name, generation or expiry breaks the signature.
        for forged in [
            t.replacen("alice", "mallory", 1),
            t.replacen(":7:", ":8:", 1),
            t.replacen(":1000:", ":9999:", 1),
        ] {
            assert_eq!(verify(&key(1), &forged, 999), Err(Invalid::BadSignature));
        }
        for garbage in ["", "x", "a:b", "a:1:2:zz", "a:1:2:"] {
            assert!(verify(&key(1), garbage, 0).is_err(), "{garbage:?}");
        }
    }
}
