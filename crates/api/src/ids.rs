//! Ids, tokens and keys the api makes, and sandbox ids from path parameters.

use arca_proto::node::SandboxId;
use rand::Rng as _;
use sha2::{Digest as _, Sha256};

use crate::error::ApiError;

/// Characters of generated sandbox ids (CONTRACT 4.5).
const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Random characters after the `i` of a sandbox id, as the reference.
const SANDBOX_ID_RANDOM_LEN: usize = 20;

/// A fresh sandbox id: `i` and 20 characters of `[a-z0-9]` (~103 bits).
pub(crate) fn new_sandbox_id() -> SandboxId {
    let s = format!("i{}", random_alnum(SANDBOX_ID_RANDOM_LEN));
    SandboxId::parse(&s).expect("generated ids use only lowercase letters and digits")
}

/// `n` random characters of `[a-z0-9]`.
pub(crate) fn random_alnum(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())]))
        .collect()
}

/// `n` random bytes from the thread's CSPRNG, as lowercase hex.
pub(crate) fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill(&mut bytes[..]);
    hex(&bytes)
}

/// A UUID-shaped random id (version 4 layout), as E2B uses for teams and keys.
pub(crate) fn new_uuid() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Lowercase hex SHA-256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The sandbox id in a path parameter. Old SDKs append `-<clientID>`; that
/// suffix is dropped (CONTRACT 4.5). Anything else malformed is a 400.
pub(crate) fn parse_path_id(raw: &str) -> Result<SandboxId, ApiError> {
    let id = raw.split_once('-').map_or(raw, |(id, _client)| id);
    SandboxId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_look_like_the_reference() {
        let id = new_sandbox_id();
        let s = id.as_str();
        assert_eq!(s.len(), 21);
        assert!(s.starts_with('i'));
        assert_ne!(new_sandbox_id(), id);
    }

    #[test]
    fn path_ids_drop_the_client_suffix_and_reject_junk() {
        assert_eq!(parse_path_id("iabc-6532622b").unwrap().as_str(), "iabc");
        assert_eq!(parse_path_id("iabc").unwrap().as_str(), "iabc");
        for bad in ["", "ABC", "a.b", "-x", "a b"] {
            assert!(parse_path_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uuids_and_hex() {
        let u = new_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(random_hex(20).len(), 40);
    }
}
