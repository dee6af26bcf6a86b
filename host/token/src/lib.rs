//! Development login tokens: `base64url(claims).base64url(hmac_sha256(secret, claims))`.
//!
//! Claims are `user_id`, an optional device binding and an expiry, in a fixed text layout
//! (`v1|<user>|<device or empty>|<expires unix seconds>`). This is the host's development
//! authenticator until the auth plugin takes over; it is not meant for production.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub user_id: String,
    /// If set, the token is valid only for this device id.
    pub device_id: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature does not match")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is bound to another device")]
    WrongDevice,
}

/// Signs `claims` with `secret`.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let payload = format!(
        "v1|{}|{}|{}",
        claims.user_id,
        claims.device_id.as_deref().unwrap_or(""),
        claims.expires_at
    );
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(payload.as_bytes());
    let signature = mac.finalize().into_bytes();
    format!("{}.{}", B64.encode(payload), B64.encode(signature))
}

/// Checks `token` against `secret`, the current time and the device presenting it.
pub fn verify(
    secret: &[u8],
    token: &str,
    now_unix: u64,
    device_id: &str,
) -> Result<Claims, TokenError> {
    let (payload_b64, signature_b64) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let payload = B64.decode(payload_b64).map_err(|_| TokenError::Malformed)?;
    let signature = B64
        .decode(signature_b64)
        .map_err(|_| TokenError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(&payload);
    mac.verify_slice(&signature)
        .map_err(|_| TokenError::BadSignature)?;
    let payload = std::str::from_utf8(&payload).map_err(|_| TokenError::Malformed)?;
    let mut parts = payload.split('|');
    let (Some("v1"), Some(user), Some(device), Some(expires), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    let expires_at: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
    if user.is_empty() {
        return Err(TokenError::Malformed);
    }
    if expires_at <= now_unix {
        return Err(TokenError::Expired);
    }
    if !device.is_empty() && device != device_id {
        return Err(TokenError::WrongDevice);
    }
    Ok(Claims {
        user_id: user.to_owned(),
        device_id: (!device.is_empty()).then(|| device.to_owned()),
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(device: Option<&str>) -> Claims {
        Claims {
            user_id: "alice".into(),
            device_id: device.map(Into::into),
            expires_at: 1000,
        }
    }

    #[test]
    fn minted_token_verifies() {
        let token = mint(b"secret", &claims(None));
        assert_eq!(verify(b"secret", &token, 999, "phone"), Ok(claims(None)));
    }

    #[test]
    fn wrong_secret_expiry_device_and_garbage_are_refused() {
        let token = mint(b"secret", &claims(Some("phone")));
        assert_eq!(
            verify(b"other", &token, 1, "phone"),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(b"secret", &token, 1000, "phone"),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(b"secret", &token, 1, "laptop"),
            Err(TokenError::WrongDevice)
        );
        assert_eq!(
            verify(b"secret", "garbage", 1, "phone"),
            Err(TokenError::Malformed)
        );
        let (payload, sig) = token.split_once('.').unwrap();
        let forged = format!("{}.{sig}", B64.encode("v1|mallory||99999"));
        assert_eq!(
            verify(b"secret", &forged, 1, "phone"),
            Err(TokenError::BadSignature)
        );
        assert!(verify(b"secret", &format!("{payload}.!!"), 1, "phone").is_err());
    }
}
