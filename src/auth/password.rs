//! Password hashes: PBKDF2-HMAC-SHA256 with a random 16-byte salt per hash and the
//! iteration count stored beside it, so raising `security.password_iterations` strengthens
//! new and changed passwords while old hashes still verify.

use std::num::NonZeroU32;

use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

/// Iterations unless `security.password_iterations` says otherwise: OWASP's figure for
/// PBKDF2-HMAC-SHA256.
pub const DEFAULT_ITERATIONS: u32 = 600_000;

const SALT_BYTES: usize = 16;
const HASH_BYTES: usize = 32;

/// A stored password hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordHash {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub hash: Vec<u8>,
}

impl PasswordHash {
    /// Hashes `password` with a fresh salt (`iterations` at least 1).
    pub fn new(password: &str, iterations: u32) -> Result<Self, String> {
        let iterations =
            NonZeroU32::new(iterations).ok_or("password_iterations must be positive")?;
        let mut salt = vec![0u8; SALT_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| "no randomness for a password salt")?;
        let mut hash = vec![0u8; HASH_BYTES];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            password.as_bytes(),
            &mut hash,
        );
        Ok(Self {
            iterations: iterations.get(),
            salt,
            hash,
        })
    }

    /// Whether `password` is the one hashed (in constant time over the hash).
    pub fn verify(&self, password: &str) -> bool {
        let Some(iterations) = NonZeroU32::new(self.iterations) else {
            return false;
        };
        ring::pbkdf2::verify(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &self.salt,
            password.as_bytes(),
            &self.hash,
        )
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let h = PasswordHash::new("s3cret", 1000).unwrap();
        assert!(h.verify("s3cret"));
        assert!(!h.verify("s3cret "));
        assert!(!h.verify(""));
        let again = PasswordHash::new("s3cret", 1000).unwrap();
        assert_ne!(h.salt, again.salt, "each hash has its own salt");
        assert!(PasswordHash::new("x", 0).is_err());
    }
}
