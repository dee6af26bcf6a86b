//! JWT authenticator plugin: the token's `sub` is the user id.
//!
//! Checks the signature (HS256 with a shared secret, or EdDSA with an Ed25519 public key),
//! `exp` (required) and `nbf`, `aud` and `iss` when configured, and the device binding: a
//! `dev` claim, when present (or required), must equal the device id logging in.

use std::sync::OnceLock;

use im_plugin_sdk::auth::{AuthResult, Authenticator, Credentials, Identity};
use im_plugin_sdk::{CallContext, config};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    /// Device binding.
    #[serde(default)]
    dev: Option<String>,
}

/// The verifier built from the plugin's configuration.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    require_device_binding: bool,
}

/// Settings of a [`Verifier`].
#[derive(Default)]
pub struct Settings {
    pub hs256_secret: Option<String>,
    pub eddsa_public_key: Option<String>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub leeway_s: u64,
    pub require_device_binding: bool,
}

impl Verifier {
    pub fn new(settings: Settings) -> Result<Self, String> {
        let (key, algorithm) = match (&settings.hs256_secret, &settings.eddsa_public_key) {
            (Some(secret), None) if secret.len() >= 16 => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            (Some(_), None) => return Err("hs256_secret must be at least 16 bytes".into()),
            (None, Some(pem)) => (
                DecodingKey::from_ed_pem(pem.as_bytes())
                    .map_err(|e| format!("eddsa_public_key: {e}"))?,
                Algorithm::EdDSA,
            ),
            _ => return Err("configure exactly one of hs256_secret and eddsa_public_key".into()),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = settings.leeway_s;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &settings.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Self {
            key,
            validation,
            require_device_binding: settings.require_device_binding,
        })
    }

    fn from_config() -> Result<Self, String> {
        Self::new(Settings {
            hs256_secret: config::get("hs256_secret"),
            eddsa_public_key: config::get("eddsa_public_key"),
            audience: config::get("audience"),
            issuer: config::get("issuer"),
            leeway_s: config::get_or("leeway_s", "30").parse().unwrap_or(30),
            require_device_binding: config::get_or("require_device_binding", "false") == "true",
        })
    }

    /// The user id `token` proves for `device_id`, or why not.
    pub fn verify(&self, token: &str, device_id: &str) -> Result<String, String> {
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| format!("invalid token: {e}"))?;
        let claims = data.claims;
        match (&claims.dev, self.require_device_binding) {
            (Some(dev), _) if dev != device_id => {
                return Err("token is bound to another device".into());
            }
            (None, true) => return Err("token carries no device binding".into()),
            _ => {}
        }
        if claims.sub.is_empty() {
            return Err("token has an empty subject".into());
        }
        Ok(claims.sub)
    }
}

fn verifier() -> &'static Result<Verifier, String> {
    static VERIFIER: OnceLock<Result<Verifier, String>> = OnceLock::new();
    VERIFIER.get_or_init(Verifier::from_config)
}

struct JwtAuth;

impl Authenticator for JwtAuth {
    fn authenticate(_ctx: &CallContext, credentials: Credentials) -> AuthResult {
        match verifier() {
            Err(config_error) => {
                AuthResult::Deny(format!("auth-jwt is misconfigured: {config_error}"))
            }
            Ok(verifier) => match verifier.verify(&credentials.token, &credentials.device_id) {
                Ok(user_id) => AuthResult::Allow(Identity { user_id }),
                Err(reason) => AuthResult::Deny(reason),
            },
        }
    }
}

im_plugin_sdk::export_authenticator!(JwtAuth);
