//! The HMAC-SHA256 plumbing every HMAC scheme shares: keyed state over several parts, and a
//! constant-time check against any number of candidate tags.

use hmac::{Mac, digest::KeyInit};

/// HMAC-SHA256 state.
pub type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// HMAC-SHA256 of the concatenation of `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// Whether any candidate equals the tag. Every comparison is constant time
/// (`verify_slice`) and every candidate is tried, so timing reveals neither the tag nor
/// which candidate matched.
pub fn matches_any(mac: &HmacSha256, candidates: &[Vec<u8>]) -> bool {
    candidates
        .iter()
        .fold(false, |ok, c| mac.clone().verify_slice(c).is_ok() | ok)
}

/// Whether any secret's MAC (`mac_of`) equals any candidate. Every secret is tried, so
/// timing does not tell which one (if any) matched.
pub fn any_secret_matches(
    secrets: &[super::Secret],
    candidates: &[Vec<u8>],
    mac_of: impl Fn(&super::Secret) -> HmacSha256,
) -> bool {
    secrets
        .iter()
        .fold(false, |ok, s| matches_any(&mac_of(s), candidates) | ok)
}

/// The raw tag, for signing.
pub fn tag(mac: HmacSha256) -> Vec<u8> {
    mac.finalize().into_bytes().to_vec()
}
