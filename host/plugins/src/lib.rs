//! The Wasm plugin runtime: business logic as sandboxed components behind the `im:plugin@0.2.3` WIT contract (and its 0.2.0, 0.2.1 and 0.2.2 components).
//!
//! Layout:
//! - [`bindings`]: the one `bindgen!` site (host view of `wit/im-plugin@0.2.3`);
//! - [`engine`]: engine configuration, epoch ticker, linkers, compiled-component cache;
//! - [`direct_wasi`]: the never-waiting WASI of plugins called without a fiber;
//! - [`state`]: per-instance host state and the imports (log, config, kv, clock, current-call);
//! - [`kv`]: the per-plugin key-value store with quotas and TTLs;
//! - [`manifest`]: plugin manifests and their validation;
//! - [`per_core`]: state every call writes (instance pools, counters), one slot per core;
//! - [`plugin`]: one loaded plugin: instances, deadlines, circuit breaker, metrics;
//! - [`deadline`]: a call's deadline counted in the time its thread ran;
//! - [`host`]: installed plugins, hook chains, hot lifecycle, the hook calls.

pub mod bindings;
pub mod deadline;
pub mod direct_wasi;
pub mod engine;
pub mod host;
pub mod kv;
pub mod manifest;
pub mod per_core;
pub mod plugin;
pub mod state;

pub use host::{
    AuthOutcome, FilterOutcome, GroupOutcome, PluginError, PluginHost, PluginHostConfig,
    PluginInfo, RiskOutcome,
};
pub use manifest::{FailurePolicy, Hook, Manifest};
pub use state::{CallOrigin, PluginMessage};
