//! GitHub: webhook signatures and the parts of a push payload Taskmesh uses.

use serde::Deserialize;

/// Checks `X-Hub-Signature-256` (`sha256=` + hex HMAC-SHA256 of the body) in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else { return false };
    let Ok(bytes) = hex::decode(hex_sig) else { return false };
    let Ok(expected) = <[u8; 32]>::try_from(bytes.as_slice()) else { return false };
    hmac_sha256::HMAC::verify(body, secret, &expected)
}

/// The signature GitHub would send for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac_sha256::HMAC::mac(body, secret)))
}

/// A `push` event (only the fields used).
#[derive(Debug, Deserialize)]
pub struct Push {
    pub r#ref: String,
    pub after: String,
    #[serde(default)]
    pub deleted: bool,
    pub repository: Repository,
    pub head_commit: Option<Commit>,
}

#[derive(Debug, Deserialize)]
pub struct Repository {
    pub full_name: String,
}

#[derive(Debug, Deserialize)]
pub struct Commit {
    #[serde(default)]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_githubs_published_test_vector() {
        // https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
        let secret = b"It's a Secret to Everybody";
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(secret, b"Hello, World!"), expected);
        assert!(verify_signature(secret, b"Hello, World!", expected));
        assert!(!verify_signature(secret, b"Hello, World?", expected));
        assert!(!verify_signature(b"wrong", b"Hello, World!", expected));
        assert!(!verify_signature(secret, b"Hello, World!", "sha1=abc"));
        assert!(!verify_signature(secret, b"Hello, World!", ""));
    }
}
