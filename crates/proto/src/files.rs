//! Signed file URLs of envd's `/files` (CONTRACT 3.6): computed by the
//! SDKs, checked by envd, and used by the edge to find the sandbox of a
//! URL that carries no sandbox id.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// The v1 signature: `v1_` + unpadded standard base64 of
/// SHA-256(`path:operation:user:token[:expiration]`), with `operation`
/// `read` or `write`, `user` empty when the URL names none, and the
/// expiration as the text of the `signature_expiration` query value.
pub fn signature(
    path: &str,
    operation: &str,
    user: &str,
    token: &str,
    expiration: Option<&str>,
) -> String {
    let mut raw = format!("{path}:{operation}:{user}:{token}");
    if let Some(exp) = expiration {
        raw.push(':');
        raw.push_str(exp);
    }
    let digest = Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_sdk_algorithm() {
        let digest = Sha256::digest(b"/home/user/a.txt:read:user:tok");
        let padded = base64::engine::general_purpose::STANDARD.encode(digest);
        assert_eq!(
            signature("/home/user/a.txt", "read", "user", "tok", None),
            format!("v1_{}", padded.trim_end_matches('='))
        );
        let digest = Sha256::digest(b"a:write::tok:1700000000");
        assert_eq!(
            signature("a", "write", "", "tok", Some("1700000000")),
            format!(
                "v1_{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
            )
        );
    }
}
