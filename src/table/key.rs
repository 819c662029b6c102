//! API keys: their environments, their SHA-256 digests and the generation of new keys.
//!
//! keygate never stores a key. The table stores digests only, and a presented token is
//! looked up by its digest, so no comparison ever runs over the secret bytes.

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The environment a table serves, and the one a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Live,
    Test,
}

impl Environment {
    /// Returns the prefix that every key of this environment starts with.
    pub fn key_prefix(self) -> &'static str {
        match self {
            Environment::Live => "key_live_",
            Environment::Test => "key_test_",
        }
    }

    /// Returns the environment's name as written in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Live => "live",
            Environment::Test => "test",
        }
    }
}

/// The SHA-256 digest of a key. It is not a secret, but `Debug` still prints a short
/// fingerprint only, to keep log lines short.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Computes the digest of a presented token.
    pub fn of(token: &[u8]) -> Self {
        Self(Sha256::digest(token).into())
    }

    /// Parses 64 lowercase hexadecimal digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut digest = [0u8; 32];
        for (out, pair) in digest.iter_mut().zip(bytes.chunks_exact(2)) {
            *out = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
        }
        Some(Self(digest))
    }

    /// Formats the digest as 64 lowercase hexadecimal digits.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(64);
        for byte in self.0 {
            text.push(DIGITS[usize::from(byte >> 4)] as char);
            text.push(DIGITS[usize::from(byte & 0x0f)] as char);
        }
        text
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..12])
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

/// A hasher for `KeyHash` map keys. The digest is already uniform, and a client cannot
/// choose a token whose digest lands in a chosen bucket, so its first eight bytes serve.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // A `[u8; 32]` hashes as its bytes, and any input folds in eight bytes at a time.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
}

pub type BuildDigestHasher = BuildHasherDefault<DigestHasher>;

/// Generates a new key for `environment` from 32 random bytes of the operating system.
pub fn generate(environment: Environment) -> Result<String, getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret)?;
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    Ok(format!("{}{}", environment.key_prefix(), encoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let hash = KeyHash::of(b"key_test_example");
        assert_eq!(KeyHash::from_hex(&hash.to_hex()), Some(hash));
    }

    #[test]
    fn known_digest() {
        // sha256("abc") from FIPS 180-2, appendix B.1.
        assert_eq!(
            KeyHash::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn from_hex_rejects_uppercase_and_length() {
        let upper = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(KeyHash::from_hex(upper), None);
        assert_eq!(KeyHash::from_hex("ba78"), None);
        assert_eq!(KeyHash::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn generated_key_shape() {
        let key = generate(Environment::Live).unwrap();
        let body = key.strip_prefix("key_live_").unwrap();
        assert_eq!(body.len(), 43);
        assert!(body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }

    #[test]
    fn debug_shows_fingerprint_only() {
        let hash = KeyHash::of(b"abc");
        assert_eq!(format!("{hash:?}"), "KeyHash(ba7816bf8f01…)");
    }
}
