//! Plugin manifests: identity, hooks, order, limits, failure policy and plugin config, with validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The hooks a plugin can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    Authenticator,
    MessageFilter,
    GroupPolicy,
    RiskControl,
}

impl Hook {
    pub const ALL: [Hook; 4] = [
        Hook::Authenticator,
        Hook::MessageFilter,
        Hook::GroupPolicy,
        Hook::RiskControl,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Authenticator => "authenticator",
            Hook::MessageFilter => "message-filter",
            Hook::GroupPolicy => "group-policy",
            Hook::RiskControl => "risk-control",
        }
    }

    /// Whether a failure of this hook refuses the request regardless of configuration.
    pub fn always_fails_closed(self) -> bool {
        !matches!(self, Hook::MessageFilter)
    }
}

/// What happens to a request when the plugin fails (traps, times out, is broken open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Refuse the request.
    #[default]
    Closed,
    /// Let the request through as if the plugin had allowed it (message filters only).
    Open,
}

/// Resource limits of one plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap per instance, in MiB.
    pub memory_mib: u32,
    /// Longest time one call may run, in milliseconds (enforced by epoch interruption).
    pub deadline_ms: u32,
    /// Most keys in the plugin's KV store.
    pub kv_max_keys: u32,
    /// Most bytes (keys + values) in the plugin's KV store.
    pub kv_max_bytes: u64,
    /// Instances kept ready for concurrent calls.
    pub instances: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: 16,
            deadline_ms: 20,
            kv_max_keys: 100_000,
            kv_max_bytes: 16 * 1024 * 1024,
            instances: 4,
        }
    }
}

/// A plugin's manifest (`manifest.toml` next to `plugin.wasm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Unique id: 1-64 of [a-z0-9-], starting with a letter.
    pub id: String,
    /// Semantic version of the plugin.
    pub version: String,
    /// Hooks to attach; each must be exported by the component.
    pub hooks: Vec<Hook>,
    /// Position in each hook's chain: lower runs first (ties by id).
    #[serde(default = "default_order")]
    pub order: i32,
    /// For message filters: what a failure does. Other hooks always fail closed.
    #[serde(default)]
    pub failure: FailurePolicy,
    #[serde(default)]
    pub limits: Limits,
    /// Free-form settings the plugin reads through the `config` import.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn default_order() -> i32 {
    100
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid plugin manifest: {0}")]
pub struct ManifestError(pub String);

impl Manifest {
    /// Parses and validates TOML.
    pub fn from_toml(text: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| ManifestError(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |msg: String| Err(ManifestError(msg));
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self.id.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            return bad(format!(
                "id {:?} must be 1-64 of [a-z0-9-], starting with a letter",
                self.id
            ));
        }
        if semver::Version::parse(&self.version).is_err() {
            return bad(format!(
                "version {:?} is not a semantic version",
                self.version
            ));
        }
        if self.hooks.is_empty() {
            return bad("hooks must name at least one hook".into());
        }
        let mut hooks = self.hooks.clone();
        hooks.sort();
        hooks.dedup();
        if hooks.len() != self.hooks.len() {
            return bad("hooks lists a hook twice".into());
        }
        if self.failure == FailurePolicy::Open && self.hooks.iter().any(|h| h.always_fails_closed())
        {
            return bad("failure = \"open\" is only allowed for message-filter plugins; authenticator, group-policy and risk-control fail closed".into());
        }
        let l = &self.limits;
        if !(1..=1024).contains(&l.memory_mib) {
            return bad("limits.memory_mib must be 1-1024".into());
        }
        if !(1..=10_000).contains(&l.deadline_ms) {
            return bad("limits.deadline_ms must be 1-10000".into());
        }
        if !(1..=64).contains(&l.instances) {
            return bad("limits.instances must be 1-64".into());
        }
        if self
            .config
            .iter()
            .any(|(k, v)| k.len() > 256 || v.len() > 64 * 1024)
        {
            return bad("config keys are limited to 256 bytes and values to 64 KiB".into());
        }
        Ok(())
    }

    /// The failure policy that applies to `hook`.
    pub fn failure_for(&self, hook: Hook) -> FailurePolicy {
        if hook.always_fails_closed() {
            FailurePolicy::Closed
        } else {
            self.failure
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_manifest_parses() {
        let m = Manifest::from_toml(
            r#"
            id = "keyword-filter"
            version = "1.2.0"
            hooks = ["message-filter"]
            order = 10
            failure = "open"
            [limits]
            memory_mib = 8
            deadline_ms = 5
            [config]
            words = "spam,scam"
            "#,
        )
        .unwrap();
        assert_eq!(m.hooks, vec![Hook::MessageFilter]);
        assert_eq!(m.failure_for(Hook::MessageFilter), FailurePolicy::Open);
        assert_eq!(m.limits.memory_mib, 8);
        assert_eq!(m.limits.instances, 4);
        assert_eq!(m.config["words"], "spam,scam");
    }

    #[test]
    fn bad_manifests_are_refused_with_reasons() {
        for (text, needle) in [
            (
                "id = \"Bad\"\nversion = \"1.0.0\"\nhooks = [\"message-filter\"]",
                "id",
            ),
            (
                "id = \"a\"\nversion = \"one\"\nhooks = [\"message-filter\"]",
                "version",
            ),
            ("id = \"a\"\nversion = \"1.0.0\"\nhooks = []", "hooks"),
            (
                "id = \"a\"\nversion = \"1.0.0\"\nhooks = [\"teleport\"]",
                "teleport",
            ),
            (
                "id = \"a\"\nversion = \"1.0.0\"\nhooks = [\"authenticator\"]\nfailure = \"open\"",
                "open",
            ),
            (
                "id = \"a\"\nversion = \"1.0.0\"\nhooks = [\"risk-control\"]\n[limits]\nmemory_mib = 0",
                "memory_mib",
            ),
            (
                "id = \"a\"\nversion = \"1.0.0\"\nhooks = [\"risk-control\"]\nsurprise = 1",
                "surprise",
            ),
        ] {
            let err = Manifest::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
