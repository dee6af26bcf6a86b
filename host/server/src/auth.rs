//! Authentication seam: the [`Authenticator`] trait and the development HMAC-token implementation.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use im_plugins::{AuthOutcome, CallOrigin, PluginHost};

/// A successful authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
}

/// Credentials presented at login.
#[derive(Debug, Clone)]
pub struct Credentials<'a> {
    pub token: &'a str,
    pub device_id: &'a str,
    /// Where the login comes from.
    pub origin: &'a CallOrigin,
}

/// Decides who a connection belongs to.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// The identity the credentials prove, or a reason for refusing them.
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, String>;
}

/// Verifies tokens minted by `imctl token` (see the `im-token` crate).
pub struct DevTokenAuthenticator {
    secret: Vec<u8>,
}

impl DevTokenAuthenticator {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: secret.into(),
        }
    }
}

#[async_trait::async_trait]
impl Authenticator for DevTokenAuthenticator {
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = im_token::verify(&self.secret, credentials.token, now, credentials.device_id)
            .map_err(|e| e.to_string())?;
        if !im_proto::ids::is_valid_id(&claims.user_id) {
            return Err("token names an invalid user id".into());
        }
        Ok(Identity {
            user_id: claims.user_id,
        })
    }
}

/// Authenticates through the plugin host's authenticator chain; while no authenticator
/// plugin is enabled, development tokens are accepted (if a fallback is configured).
pub struct PluginAuthenticator {
    pub plugins: Arc<PluginHost>,
    pub fallback: Option<DevTokenAuthenticator>,
}

#[async_trait::async_trait]
impl Authenticator for PluginAuthenticator {
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, String> {
        match self
            .plugins
            .authenticate(credentials.origin, credentials.token, credentials.device_id)
            .await
        {
            AuthOutcome::Allowed { user_id } if im_proto::ids::is_valid_id(&user_id) => {
                Ok(Identity { user_id })
            }
            AuthOutcome::Allowed { .. } => {
                Err("the authenticator returned an invalid user id".into())
            }
            AuthOutcome::Denied { reason } => Err(reason),
            AuthOutcome::NoPlugins => match &self.fallback {
                Some(dev) => dev.authenticate(credentials).await,
                None => Err("no authenticator is installed".into()),
            },
        }
    }
}
