//! The plugin host: installed plugins, their hook chains, hot lifecycle and the hook calls the server makes.
//!
//! Architecture invariant: the set of plugins is an immutable [`Generation`] behind an
//! `ArcSwap`. A hook call takes the current generation once and runs the whole chain on
//! it, so install, upgrade, disable and uninstall never disturb calls in flight: they
//! finish on the plugins they started with. Lifecycle operations are serialized.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use im_store::Store;
use parking_lot::Mutex;
use wasmtime::component::Resource;

use crate::bindings::{
    authenticator, body_filter, body_screen, group_policy, interface_name, message_filter,
    risk_control, send_guard, send_screen,
};
use crate::engine::PluginEngine;
use crate::kv::KvStore;
use crate::manifest::{FailurePolicy, Hook, Manifest};
use crate::plugin::{CallFailure, Exports, Handles, HookAnswer, LoadedPlugin};
use crate::state::{CallOrigin, HostState, MessageSlot, PluginMessage, PluginShared, now_ms};

const MANIFEST_FILE: &str = "manifest.toml";
const COMPONENT_FILE: &str = "plugin.wasm";
const DISABLED_MARKER: &str = "disabled";
/// How often plugin key-value changes are written to the database.
const KV_FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// Where plugins live and who calls them.
#[derive(Debug, Clone)]
pub struct PluginHostConfig {
    /// Installed plugins: one directory per plugin id with `manifest.toml` and `plugin.wasm`.
    pub dir: PathBuf,
    /// Compiled native code, keyed by component digest and engine.
    pub cache_dir: PathBuf,
    /// Reported to plugins in the call context.
    pub node_id: String,
}

/// Why a lifecycle operation failed. The plugins that were running keep running.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    InvalidManifest(#[from] crate::manifest::ManifestError),
    #[error("invalid component: {0}")]
    InvalidComponent(String),
    #[error("no plugin {0:?} is installed")]
    NotFound(String),
    #[error("storing the plugin failed: {0}")]
    Storage(String),
}

/// One installed plugin and whether it is in its hooks' chains.
#[derive(Clone)]
struct Installed {
    plugin: Arc<LoadedPlugin>,
    enabled: bool,
}

/// An immutable snapshot of installed plugins and the chains built from them.
#[derive(Default)]
pub struct Generation {
    installed: BTreeMap<String, Installed>,
    /// Indexed by `Hook as usize`: looked up on every hook call.
    chains: [Vec<Arc<LoadedPlugin>>; Hook::ALL.len()],
}

impl Generation {
    fn new(installed: BTreeMap<String, Installed>) -> Self {
        let mut chains: [Vec<Arc<LoadedPlugin>>; Hook::ALL.len()] = Default::default();
        for entry in installed.values().filter(|e| e.enabled) {
            for hook in &entry.plugin.manifest.hooks {
                chains[*hook as usize].push(entry.plugin.clone());
            }
        }
        for chain in &mut chains {
            chain.sort_by(|a, b| (a.manifest.order, a.id()).cmp(&(b.manifest.order, b.id())));
        }
        Self { installed, chains }
    }

    /// The plugins on `hook`, in calling order.
    pub fn chain(&self, hook: Hook) -> &[Arc<LoadedPlugin>] {
        &self.chains[hook as usize]
    }
}

/// What an operator sees of a plugin.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PluginInfo {
    pub id: String,
    pub version: String,
    pub hooks: Vec<Hook>,
    pub order: i32,
    pub enabled: bool,
    pub failure: FailurePolicy,
    pub digest: String,
    pub calls: u64,
    pub failures: BTreeMap<&'static str, u64>,
    pub verdicts: BTreeMap<&'static str, u64>,
    pub mean_call_ns: u64,
    pub max_call_ns: u64,
    pub breaker_open: bool,
    pub breaker_trips: u64,
    pub kv_keys: usize,
    /// Whether the per-message hooks call it directly on the server's thread (its imports
    /// never wait) rather than on a fiber (it imports files or sockets).
    pub direct_calls: bool,
}

fn info(entry: &Installed) -> PluginInfo {
    use crate::plugin::FailureKind;
    use std::sync::atomic::Ordering::Relaxed;
    let p = &entry.plugin;
    let m = &p.metrics;
    let calls = m.calls();
    let failures = [
        FailureKind::Timeout,
        FailureKind::Memory,
        FailureKind::Trap,
        FailureKind::Unavailable,
    ]
    .into_iter()
    .map(|k| (k.as_str(), m.failures(k).load(Relaxed)))
    .collect();
    PluginInfo {
        id: p.manifest.id.clone(),
        version: p.manifest.version.clone(),
        hooks: p.manifest.hooks.clone(),
        order: p.manifest.order,
        enabled: entry.enabled,
        failure: p.manifest.failure,
        digest: p.digest.clone(),
        calls,
        failures,
        verdicts: m.verdicts(),
        mean_call_ns: m.total_ns().checked_div(calls).unwrap_or(0),
        max_call_ns: m.max_ns.load(Relaxed),
        breaker_open: p.breaker_open(),
        breaker_trips: p.breaker_trips(),
        kv_keys: p.shared.kv.len(),
        direct_calls: p.direct(),
    }
}

/// The result of the authenticator chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// No authenticator plugin is enabled.
    NoPlugins,
    Allowed {
        user_id: String,
    },
    Denied {
        reason: String,
    },
}

/// The result of the message-filter chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterOutcome {
    /// Store the message (its body and content type were rewritten if `modified`).
    Pass {
        modified: bool,
    },
    Reject {
        reason: String,
    },
    Drop,
}

/// The result of the risk-control chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RiskOutcome {
    Allow,
    Throttle { retry_after_ms: u64, reason: String },
    Block { reason: String },
}

/// The result of the group-policy chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupOutcome {
    NoPlugins,
    Allow,
    Deny { reason: String },
}

/// All plugins of a node.
pub struct PluginHost {
    engine: PluginEngine,
    config: PluginHostConfig,
    store: Arc<dyn Store>,
    kv: Mutex<HashMap<String, Arc<KvStore>>>,
    current: ArcSwap<Generation>,
    lifecycle: tokio::sync::Mutex<()>,
}

impl PluginHost {
    /// Creates the host and loads every plugin installed in `config.dir`. A plugin that
    /// fails to load is logged and skipped; the others run.
    pub async fn start(
        config: PluginHostConfig,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.dir)?;
        let engine = PluginEngine::new(&config.cache_dir)?;
        let host = Arc::new(Self {
            engine,
            config,
            store,
            kv: Mutex::default(),
            current: ArcSwap::from_pointee(Generation::default()),
            lifecycle: tokio::sync::Mutex::new(()),
        });
        let mut installed = BTreeMap::new();
        for entry in std::fs::read_dir(&host.config.dir)? {
            let dir = entry?.path();
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_owned();
            if !dir.is_dir() || name.starts_with('.') {
                continue;
            }
            match host.load_dir(&dir).await {
                Ok(plugin) => {
                    let enabled = !dir.join(DISABLED_MARKER).exists();
                    tracing::info!(plugin = plugin.id(), version = %plugin.manifest.version, enabled, "loaded plugin");
                    installed.insert(plugin.id().to_owned(), Installed { plugin, enabled });
                }
                Err(err) => {
                    tracing::error!(dir = %dir.display(), error = %err, "skipping a plugin that does not load")
                }
            }
        }
        host.current.store(Arc::new(Generation::new(installed)));
        let flusher = Arc::downgrade(&host);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KV_FLUSH_INTERVAL);
            loop {
                tick.tick().await;
                let Some(host) = flusher.upgrade() else { break };
                host.flush_kv().await;
            }
        });
        Ok(host)
    }

    /// The current generation (for calls and inspection).
    pub fn generation(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Installs a plugin, or upgrades the installed plugin with the same id. The new
    /// version is compiled, linked and test-instantiated before it replaces anything; on
    /// any error the running version stays.
    pub async fn install(
        &self,
        manifest_toml: &str,
        wasm: Vec<u8>,
    ) -> Result<PluginInfo, PluginError> {
        let manifest = Manifest::from_toml(manifest_toml)?;
        let _serial = self.lifecycle.lock().await;
        let plugin = self.load(manifest.clone(), &wasm).await?;
        let id = manifest.id.clone();
        let dir = self.config.dir.join(&id);
        let previous = self.generation().installed.get(&id).cloned();
        let enabled = previous.as_ref().is_none_or(|p| p.enabled);
        write_plugin_dir(&self.config.dir, &id, manifest_toml, &wasm, enabled)
            .map_err(|e| PluginError::Storage(format!("{}: {e}", dir.display())))?;
        let entry = Installed { plugin, enabled };
        let result = info(&entry);
        self.swap(|installed| {
            installed.insert(id.clone(), entry);
        });
        match previous {
            Some(old) => {
                tracing::info!(plugin = %id, from = %old.plugin.manifest.version, to = %manifest.version, "plugin upgraded")
            }
            None => tracing::info!(plugin = %id, version = %manifest.version, "plugin installed"),
        }
        Ok(result)
    }

    /// Takes a plugin out of (or back into) its hooks' chains; it stays installed.
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<PluginInfo, PluginError> {
        let _serial = self.lifecycle.lock().await;
        let mut entry = self
            .generation()
            .installed
            .get(id)
            .cloned()
            .ok_or_else(|| PluginError::NotFound(id.into()))?;
        let marker = self.config.dir.join(id).join(DISABLED_MARKER);
        let written = if enabled {
            remove_if_present(&marker)
        } else {
            std::fs::write(&marker, b"")
        };
        written.map_err(|e| PluginError::Storage(e.to_string()))?;
        entry.enabled = enabled;
        let result = info(&entry);
        self.swap(|installed| {
            installed.insert(id.to_owned(), entry);
        });
        tracing::info!(
            plugin = id,
            enabled,
            "plugin {}",
            if enabled { "enabled" } else { "disabled" }
        );
        Ok(result)
    }

    /// Removes a plugin. Its key-value data is kept (a reinstall finds it) unless `purge_data`.
    pub async fn uninstall(&self, id: &str, purge_data: bool) -> Result<(), PluginError> {
        let _serial = self.lifecycle.lock().await;
        if !self.generation().installed.contains_key(id) {
            return Err(PluginError::NotFound(id.into()));
        }
        std::fs::remove_dir_all(self.config.dir.join(id))
            .map_err(|e| PluginError::Storage(e.to_string()))?;
        self.swap(|installed| {
            installed.remove(id);
        });
        if purge_data {
            let kv = self.kv.lock().remove(id);
            if let Some(kv) = kv {
                let keys: Vec<String> = kv.keys();
                self.store
                    .write_plugin_kv(id, &[], &keys)
                    .await
                    .map_err(|e| PluginError::Storage(e.to_string()))?;
            }
        }
        tracing::info!(plugin = id, purge_data, "plugin uninstalled");
        Ok(())
    }

    /// Whether any enabled plugin serves `hook` (lets callers skip preparing a call).
    pub fn has_hook(&self, hook: Hook) -> bool {
        !self.generation().chain(hook).is_empty()
    }

    /// Whether the epoch ticker sleeps because no plugin code ran lately (an idle node's
    /// plugins wake no cpu); the next call wakes it.
    pub fn epoch_ticker_asleep(&self) -> bool {
        self.engine.ticker.is_asleep()
    }

    /// Epoch ticks so far (for tests: how often the ticker woke).
    pub fn epoch_ticks(&self) -> u64 {
        self.engine.ticker.ticks()
    }

    /// Every installed plugin.
    pub fn list(&self) -> Vec<PluginInfo> {
        self.generation().installed.values().map(info).collect()
    }

    /// Writes pending key-value changes of every plugin.
    pub async fn flush_kv(&self) {
        let stores: Vec<(String, Arc<KvStore>)> = self
            .kv
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, kv) in stores {
            let changes = kv.take_changes();
            if changes.is_empty() {
                continue;
            }
            if let Err(err) = self
                .store
                .write_plugin_kv(&id, &changes.upserts, &changes.deletes)
                .await
            {
                tracing::warn!(plugin = %id, error = %err, "writing plugin key-value data failed; will retry");
                kv.requeue(changes);
            }
        }
    }

    fn swap(&self, change: impl FnOnce(&mut BTreeMap<String, Installed>)) {
        let mut installed = self.generation().installed.clone();
        change(&mut installed);
        self.current.store(Arc::new(Generation::new(installed)));
    }

    async fn load_dir(&self, dir: &Path) -> anyhow::Result<Arc<LoadedPlugin>> {
        let manifest = Manifest::from_toml(&std::fs::read_to_string(dir.join(MANIFEST_FILE))?)?;
        let wasm = std::fs::read(dir.join(COMPONENT_FILE))?;
        Ok(self.load(manifest, &wasm).await?)
    }

    /// Compiles, links, checks exports and test-instantiates one plugin version.
    async fn load(
        &self,
        manifest: Manifest,
        wasm: &[u8],
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let kv = self.kv_for(&manifest).await?;
        let shared = Arc::new(PluginShared {
            id: manifest.id.clone(),
            node_id: self.config.node_id.as_str().into(),
            config: manifest.config.clone(),
            kv,
        });
        let invalid = |e: wasmtime::Error| PluginError::InvalidComponent(format!("{e:#}"));
        let (component, digest) =
            tokio::task::block_in_place(|| self.engine.compile(wasm)).map_err(invalid)?;
        // A component that imports nothing able to wait is called without a fiber.
        let (pre, direct) = match self.engine.direct_linker.instantiate_pre(&component) {
            Ok(pre) => (pre, true),
            Err(_) => {
                let pre = self
                    .engine
                    .linker
                    .instantiate_pre(&component)
                    .map_err(|e| {
                        PluginError::InvalidComponent(format!(
                            "its imports do not match the {} contract served here: {e:#}",
                            crate::bindings::CONTRACT
                        ))
                    })?;
                (pre, false)
            }
        };
        let plugin = LoadedPlugin::new(
            manifest,
            digest,
            shared,
            pre,
            direct,
            self.engine.ticker.clone(),
        );
        for hook in &plugin.manifest.hooks {
            if !plugin.exports(*hook) {
                return Err(PluginError::InvalidComponent(format!(
                    "the manifest attaches it to {} but the component does not export {}",
                    hook.as_str(),
                    hook_exports(*hook)
                )));
            }
        }
        plugin.instantiate().await.map_err(|e| {
            PluginError::InvalidComponent(format!("it fails to instantiate: {e:#}"))
        })?;
        Ok(Arc::new(plugin))
    }

    async fn kv_for(&self, manifest: &Manifest) -> Result<Arc<KvStore>, PluginError> {
        let limits = (manifest.limits.kv_max_keys, manifest.limits.kv_max_bytes);
        if let Some(kv) = self.kv.lock().get(&manifest.id) {
            kv.set_limits(limits.0, limits.1);
            return Ok(kv.clone());
        }
        let records = self
            .store
            .load_plugin_kv(&manifest.id, now_ms())
            .await
            .map_err(|e| PluginError::Storage(e.to_string()))?;
        let kv = Arc::new(KvStore::new(limits.0, limits.1));
        kv.load(records);
        Ok(self
            .kv
            .lock()
            .entry(manifest.id.clone())
            .or_insert(kv)
            .clone())
    }

    /// Runs the authenticator chain: the first plugin that allows decides; a denial passes
    /// to the next plugin; a failing plugin denies (authentication fails closed).
    pub async fn authenticate(
        &self,
        origin: &CallOrigin,
        token: &str,
        device_id: &str,
    ) -> AuthOutcome {
        let generation = self.generation();
        let chain = generation.chain(Hook::Authenticator);
        if chain.is_empty() {
            return AuthOutcome::NoPlugins;
        }
        let credentials = authenticator::Credentials {
            token: token.to_owned(),
            device_id: device_id.to_owned(),
        };
        let mut last_reason = String::new();
        for plugin in chain {
            let result = plugin
                .call(origin, async |store, exports, handles| {
                    let guest = exports
                        .authenticator
                        .as_ref()
                        .expect("chain members export their hook");
                    guest
                        .call_authenticate(store, handles.context, &credentials)
                        .await
                })
                .await;
            match result {
                Ok(authenticator::AuthResult::Allow(identity)) => {
                    return AuthOutcome::Allowed {
                        user_id: identity.user_id,
                    };
                }
                Ok(authenticator::AuthResult::Deny(reason)) => {
                    last_reason = reason;
                }
                Err(failure) => {
                    return AuthOutcome::Denied {
                        reason: unavailable(plugin, &failure),
                    };
                }
            }
        }
        AuthOutcome::Denied {
            reason: last_reason,
        }
    }

    /// Runs the message-filter chain in order: a modification rewrites `message` and feeds
    /// the next filter; reject and drop end the chain. A failing filter applies its
    /// failure policy.
    pub async fn filter(&self, origin: &CallOrigin, message: &mut PluginMessage) -> FilterOutcome {
        let generation = self.generation();
        let mut modified = false;
        for plugin in generation.chain(Hook::MessageFilter) {
            let result = if plugin.screens_bodies() {
                screen_body_with(plugin, origin, message).await
            } else if plugin.filters_bodies() {
                filter_body_with(plugin, origin, message).await
            } else {
                call_about(
                    plugin,
                    origin,
                    message,
                    (),
                    |store, exports, handles, ()| {
                        let filter = exports.filter.as_ref().expect("exported");
                        let (verdict,) = filter.call(store, (handles.context, handles.message))?;
                        Ok(verdict)
                    },
                    |store, exports, handles, ()| {
                        Box::pin(async move {
                            let guest = exports.message_filter.as_ref().expect("exported");
                            guest
                                .call_filter(store, handles.context, handles.message)
                                .await
                        })
                    },
                )
                .await
            };
            match result {
                Ok(message_filter::FilterVerdict::Allow) => {}
                Ok(message_filter::FilterVerdict::Modify(rewrite)) => {
                    message.body = rewrite.body.into();
                    message.content_type = rewrite.content_type;
                    modified = true;
                }
                Ok(message_filter::FilterVerdict::Reject(reason)) => {
                    return FilterOutcome::Reject { reason };
                }
                Ok(message_filter::FilterVerdict::Drop) => {
                    return FilterOutcome::Drop;
                }
                Err(failure) => match plugin.manifest.failure_for(Hook::MessageFilter) {
                    FailurePolicy::Open => continue,
                    FailurePolicy::Closed => {
                        return FilterOutcome::Reject {
                            reason: unavailable(plugin, &failure),
                        };
                    }
                },
            }
        }
        FilterOutcome::Pass { modified }
    }

    /// Assesses a successful login with the risk-control chain.
    pub async fn assess_login(
        &self,
        origin: &CallOrigin,
        user_id: &str,
        device_id: &str,
    ) -> RiskOutcome {
        let attempt = risk_control::LoginAttempt {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
        };
        self.assess(origin, RiskSubject::Login(attempt)).await
    }

    /// Assesses a message about to be stored with the risk-control chain.
    pub async fn assess_send(
        &self,
        origin: &CallOrigin,
        message: &mut PluginMessage,
    ) -> RiskOutcome {
        self.assess(origin, RiskSubject::Send(message)).await
    }

    /// Runs the risk-control chain: the first verdict other than allow decides; a failing
    /// plugin blocks (risk control fails closed). A plugin exporting `send-guard` assesses
    /// sends there, and logins only if it exports `risk-control` too.
    async fn assess(&self, origin: &CallOrigin, mut subject: RiskSubject<'_>) -> RiskOutcome {
        let generation = self.generation();
        // The body's digest, computed once for every send-guard in the chain.
        let mut body_digest = None;
        for plugin in generation.chain(Hook::RiskControl) {
            let result = match &mut subject {
                RiskSubject::Send(message) if plugin.guards_sends() || plugin.screens_sends() => {
                    let digest = *body_digest
                        .get_or_insert_with(|| xxhash_rust::xxh3::xxh3_64(&message.body));
                    guard_send(plugin, origin, message, digest).await
                }
                RiskSubject::Login(_) if !plugin.assesses_risk() => continue,
                subject => assess_with(plugin, origin, subject).await,
            };
            match result {
                Ok(risk_control::RiskVerdict::Allow) => {}
                Ok(risk_control::RiskVerdict::Throttle(t)) => {
                    return RiskOutcome::Throttle {
                        retry_after_ms: t.retry_after_ms,
                        reason: t.reason,
                    };
                }
                Ok(risk_control::RiskVerdict::Block(reason)) => {
                    return RiskOutcome::Block { reason };
                }
                Err(failure) => {
                    return RiskOutcome::Block {
                        reason: unavailable(plugin, &failure),
                    };
                }
            }
        }
        RiskOutcome::Allow
    }

    /// Runs the group-policy chain: every plugin must allow; a failing plugin denies.
    pub async fn decide_group(
        &self,
        origin: &CallOrigin,
        request: group_policy::GroupRequest,
    ) -> GroupOutcome {
        let generation = self.generation();
        let chain = generation.chain(Hook::GroupPolicy);
        if chain.is_empty() {
            return GroupOutcome::NoPlugins;
        }
        for plugin in chain {
            let result = plugin
                .call(origin, async |store, exports, handles| {
                    let guest = exports
                        .group_policy
                        .as_ref()
                        .expect("chain members export their hook");
                    guest.call_decide(store, handles.context, &request).await
                })
                .await;
            match result {
                Ok(group_policy::GroupDecision::Allow) => {}
                Ok(group_policy::GroupDecision::Deny(reason)) => {
                    return GroupOutcome::Deny { reason };
                }
                Err(failure) => {
                    return GroupOutcome::Deny {
                        reason: unavailable(plugin, &failure),
                    };
                }
            }
        }
        GroupOutcome::Allow
    }
}

/// The export names that serve `hook`, for the error refusing a component without them.
fn hook_exports(hook: Hook) -> String {
    let alternatives: &[&str] = match hook {
        Hook::RiskControl => &["send-guard", "send-screen"],
        Hook::MessageFilter => &["body-filter", "body-screen"],
        Hook::Authenticator | Hook::GroupPolicy => &[],
    };
    let mut names = interface_name(hook.as_str());
    for other in alternatives {
        names.push_str(" or ");
        names.push_str(&interface_name(other));
    }
    names
}

/// Lends `message` to the instance for `call` (the instance's message handle names it
/// meanwhile) and takes it back whether or not the call succeeded: a failing filter may be
/// skipped by policy, and the chain goes on with the message.
fn lending<T>(
    store: &mut wasmtime::Store<HostState>,
    message: &mut PluginMessage,
    call: impl FnOnce(&mut wasmtime::Store<HostState>) -> T,
) -> T {
    lend_message(store.data_mut(), message);
    let result = call(store);
    take_back_message(store.data_mut(), message);
    result
}

/// Puts `message` into the instance's state for the call about it.
fn lend_message(state: &mut HostState, message: &mut PluginMessage) {
    std::mem::swap(&mut state.message, message);
    state.message_lent = true;
}

/// Gives the lent message back once the call has returned.
fn take_back_message(state: &mut HostState, message: &mut PluginMessage) {
    std::mem::swap(&mut state.message, message);
    state.message_lent = false;
}

/// [`lending`] for a call on a fiber.
async fn lending_async<T>(
    store: &mut wasmtime::Store<HostState>,
    message: &mut PluginMessage,
    call: impl AsyncFnOnce(&mut wasmtime::Store<HostState>) -> T,
) -> T {
    lend_message(store.data_mut(), message);
    let result = call(store).await;
    take_back_message(store.data_mut(), message);
    result
}

/// A hook call on a fiber, as [`call_about`] makes it.
type FiberCall<'s, R> = Pin<Box<dyn Future<Output = wasmtime::Result<R>> + Send + 's>>;

/// Calls `plugin` about `message`, which the instance holds for the call: `direct` on the
/// calling thread when the plugin is called directly, else `on_fiber`. The two call
/// different generated functions (a typed function; the generated guest's async one);
/// `args` goes to whichever runs.
async fn call_about<A, R: HookAnswer>(
    plugin: &LoadedPlugin,
    origin: &CallOrigin,
    message: &mut PluginMessage,
    args: A,
    direct: impl FnOnce(&mut wasmtime::Store<HostState>, &Exports, Handles, A) -> wasmtime::Result<R>,
    on_fiber: impl for<'s> FnOnce(
        &'s mut wasmtime::Store<HostState>,
        &'s Exports,
        Handles,
        A,
    ) -> FiberCall<'s, R>,
) -> Result<R, CallFailure> {
    if plugin.direct() {
        plugin.call_direct(origin, |store, exports, handles| {
            lending(store, message, |store| {
                direct(store, exports, handles, args)
            })
        })
    } else {
        plugin
            .call(origin, async |store, exports, handles| {
                lending_async(store, message, async |store| {
                    on_fiber(store, exports, handles, args).await
                })
                .await
            })
            .await
    }
}

/// Calls `body-filter.filter-body` of `plugin` on `message`, its body passed with the call.
/// The verdict comes back as `message-filter`'s (the two have the same cases).
async fn filter_body_with(
    plugin: &LoadedPlugin,
    origin: &CallOrigin,
    message: &mut PluginMessage,
) -> Result<message_filter::FilterVerdict, CallFailure> {
    // A second handle on the body's bytes, not a copy.
    let body = message.body.clone();
    call_about(
        plugin,
        origin,
        message,
        body,
        |store, exports, handles, body| {
            let filter_body = exports.filter_body.as_ref().expect("exported");
            let (verdict,) = filter_body.call(store, (handles.context, handles.message, body))?;
            Ok(as_filter_verdict(verdict))
        },
        |store, exports, handles, body| {
            Box::pin(async move {
                let guest = exports.body_filter.as_ref().expect("exported");
                guest
                    .call_filter_body(store, handles.context, handles.message, &body)
                    .await
                    .map(as_filter_verdict)
            })
        },
    )
    .await
}

/// Calls `body-screen.screen` of `plugin` on `message`: the body passed with the call, no
/// handles lent (the plugin asks `current-call` for anything else). The verdict comes back
/// as `message-filter`'s.
async fn screen_body_with(
    plugin: &LoadedPlugin,
    origin: &CallOrigin,
    message: &mut PluginMessage,
) -> Result<message_filter::FilterVerdict, CallFailure> {
    let body = message.body.clone();
    call_about(
        plugin,
        origin,
        message,
        body,
        |store, exports, _, body| {
            let screen = exports.screen.as_ref().expect("exported");
            let (verdict,) = screen.call(store, (body,))?;
            Ok(as_screen_verdict(verdict))
        },
        |store, exports, _, body| {
            Box::pin(async move {
                let guest = exports.body_screen.as_ref().expect("exported");
                guest.call_screen(store, &body).await.map(as_screen_verdict)
            })
        },
    )
    .await
}

/// Defines `$name`, which gives the `message-filter` verdict with the same case as a
/// verdict of `$hook` (the filter hooks declare the same cases, each in its own interface).
macro_rules! filter_verdict_from {
    ($name:ident, $hook:ident) => {
        fn $name(verdict: $hook::FilterVerdict) -> message_filter::FilterVerdict {
            use message_filter::{FilterVerdict, Rewrite};
            match verdict {
                $hook::FilterVerdict::Allow => FilterVerdict::Allow,
                $hook::FilterVerdict::Modify($hook::Rewrite { body, content_type }) => {
                    FilterVerdict::Modify(Rewrite { body, content_type })
                }
                $hook::FilterVerdict::Reject(reason) => FilterVerdict::Reject(reason),
                $hook::FilterVerdict::Drop => FilterVerdict::Drop,
            }
        }
    };
}

filter_verdict_from!(as_filter_verdict, body_filter);
filter_verdict_from!(as_screen_verdict, body_screen);

/// `$verdict`, of a send hook's verdict type `$from`, as the case of `$to` with the same
/// name (allow, throttle with `$throttle`'s fields, block): the hooks declare the same
/// cases, each in its own interface.
macro_rules! send_verdict_from {
    ($verdict:expr, $($from:ident)::+ => $($to:ident)::+, $($throttle:ident)::+) => {
        match $verdict {
            $($from)::+::Allow => $($to)::+::Allow,
            $($from)::+::Throttle(t) => $($to)::+::Throttle($($throttle)::+ {
                retry_after_ms: t.retry_after_ms,
                reason: t.reason,
            }),
            $($from)::+::Block(reason) => $($to)::+::Block(reason),
        }
    };
}

/// Calls `risk-control.assess` of `plugin` on `subject`.
async fn assess_with(
    plugin: &LoadedPlugin,
    origin: &CallOrigin,
    subject: &mut RiskSubject<'_>,
) -> Result<risk_control::RiskVerdict, CallFailure> {
    if plugin.direct() {
        plugin.call_direct(origin, |store, exports, handles| {
            let assess = exports
                .assess
                .as_ref()
                .expect("risk-control chain members assessing this export it");
            let result = match subject {
                RiskSubject::Login(attempt) => {
                    let event = risk_control::RiskEvent::Login(attempt.clone());
                    assess.call(&mut *store, (handles.context, event))
                }
                RiskSubject::Send(message) => lending(store, message, |store| {
                    let event = risk_control::RiskEvent::Send(handles.message);
                    assess.call(store, (handles.context, event))
                }),
            };
            result.map(|(verdict,)| verdict)
        })
    } else {
        plugin
            .call(origin, async |store, exports, handles| {
                let guest = exports
                    .risk_control
                    .as_ref()
                    .expect("risk-control chain members assessing this export it");
                match subject {
                    RiskSubject::Login(attempt) => {
                        let event = risk_control::RiskEvent::Login(attempt.clone());
                        guest.call_assess(store, handles.context, &event).await
                    }
                    RiskSubject::Send(message) => {
                        lending_async(store, message, async |store| {
                            let event = risk_control::RiskEvent::Send(handles.message);
                            guest.call_assess(store, handles.context, &event).await
                        })
                        .await
                    }
                }
            })
            .await
    }
}

/// Where a send-guard plugin's state for a sender lives in its key-value store (the WIT
/// contract names it, so the plugin's own `kv` calls see the same entry).
fn send_guard_key(user_id: &str) -> String {
    const PREFIX: &str = "send-guard:";
    // Not `format!`: it took about 360 instructions here against 120 (callgrind over
    // hook_bench, docs/benchmarks.md, 2026-12-07, fifth session).
    let mut key = String::with_capacity(PREFIX.len() + user_id.len());
    key.push_str(PREFIX);
    key.push_str(user_id);
    key
}

/// How many times a send is assessed against a sender's state that other calls keep
/// changing before it is refused; each retry means another call replaced the state
/// between this call's read and its write.
const SEND_GUARD_ATTEMPTS: usize = 16;

/// Assesses a send with `plugin`'s `send-guard`: the sender's state goes in with the call,
/// and the state the plugin returns replaces it only if no other call replaced it first
/// (else the send is assessed again on the newer state).
async fn guard_send(
    plugin: &LoadedPlugin,
    origin: &CallOrigin,
    message: &mut PluginMessage,
    body_digest: u64,
) -> Result<risk_control::RiskVerdict, CallFailure> {
    let kv = &plugin.shared.kv;
    let key = send_guard_key(&message.sender.user_id);
    let body_len = u32::try_from(message.body.len()).unwrap_or(u32::MAX);
    for _ in 0..SEND_GUARD_ATTEMPTS {
        let now_ms = now_ms();
        let (state, stamp) = kv.get_stamped(&key, now_ms).unzip();
        let assessment = if plugin.screens_sends() {
            let facts = send_screen::SendFacts {
                body_digest,
                body_len,
                now_ms,
                state,
            };
            screen_send_with(plugin, origin, message, facts).await?
        } else {
            let check = move |handles_message| send_guard::SendCheck {
                message: handles_message,
                body_digest,
                body_len,
                now_ms,
                state,
            };
            check_send_with(plugin, origin, message, check).await?
        };
        match apply_send_state(plugin, &key, stamp, assessment, now_ms) {
            Some(verdict) => return Ok(verdict),
            None => continue,
        }
    }
    Ok(risk_control::RiskVerdict::Throttle(
        risk_control::Throttle {
            retry_after_ms: 100,
            reason: "too many sends of this user assessed at once".into(),
        },
    ))
}

/// Calls `send-guard.check-send` of `plugin` with the check `check` builds around the lent
/// message's handle.
async fn check_send_with(
    plugin: &LoadedPlugin,
    origin: &CallOrigin,
    message: &mut PluginMessage,
    check: impl FnOnce(Resource<MessageSlot>) -> send_guard::SendCheck + Send + 'static,
) -> Result<send_guard::Assessment, CallFailure> {
    call_about(
        plugin,
        origin,
        message,
        check,
        |store, exports, handles, check| {
            let check_send = exports.check_send.as_ref().expect("exported");
            let (assessment,) =
                check_send.call(store, (handles.context, check(handles.message)))?;
            Ok(assessment)
        },
        |store, exports, handles, check| {
            Box::pin(async move {
                let guest = exports.send_guard.as_ref().expect("exported");
                guest
                    .call_check_send(store, handles.context, &check(handles.message))
                    .await
            })
        },
    )
    .await
}

/// Writes the sender's state `assessment` asks for, if the entry still has `stamp`, and
/// returns the verdict; none if another call replaced the state meanwhile (assess again).
fn apply_send_state(
    plugin: &LoadedPlugin,
    key: &str,
    stamp: Option<u64>,
    assessment: send_guard::Assessment,
    now_ms: i64,
) -> Option<risk_control::RiskVerdict> {
    let kv = &plugin.shared.kv;
    let written = match assessment.state {
        send_guard::StateChange::Keep => Ok(true),
        send_guard::StateChange::Set(write) => {
            kv.replace_if_stamp(key, stamp, Some(write.value), write.ttl_ms, now_ms)
        }
        send_guard::StateChange::Clear => kv.replace_if_stamp(key, stamp, None, None, now_ms),
    };
    match written {
        Ok(true) => Some(as_risk_verdict(assessment.verdict)),
        Ok(false) => None,
        Err(err) => {
            tracing::warn!(plugin = plugin.id(), error = %err, "send-guard state not written; send refused");
            Some(risk_control::RiskVerdict::Throttle(
                risk_control::Throttle {
                    retry_after_ms: 1000,
                    reason: format!("risk control cannot record the send: {err}"),
                },
            ))
        }
    }
}

/// Calls `send-screen.screen-send` of `plugin`: the facts passed with the call, no handles
/// lent. The assessment comes back as `send-guard`'s (the two have the same cases).
async fn screen_send_with(
    plugin: &LoadedPlugin,
    origin: &CallOrigin,
    message: &mut PluginMessage,
    facts: send_screen::SendFacts,
) -> Result<send_guard::Assessment, CallFailure> {
    call_about(
        plugin,
        origin,
        message,
        facts,
        |store, exports, _, facts| {
            let screen_send = exports.screen_send.as_ref().expect("exported");
            let (assessment,) = screen_send.call(store, (facts,))?;
            Ok(as_guard_assessment(assessment))
        },
        |store, exports, _, facts| {
            Box::pin(async move {
                let guest = exports.send_screen.as_ref().expect("exported");
                guest
                    .call_screen_send(store, &facts)
                    .await
                    .map(as_guard_assessment)
            })
        },
    )
    .await
}

/// A `send-screen` assessment as the `send-guard` one with the same cases.
fn as_guard_assessment(assessment: send_screen::Assessment) -> send_guard::Assessment {
    let state = match assessment.state {
        send_screen::StateChange::Keep => send_guard::StateChange::Keep,
        send_screen::StateChange::Set(write) => {
            send_guard::StateChange::Set(send_guard::StateWrite {
                value: write.value,
                ttl_ms: write.ttl_ms,
            })
        }
        send_screen::StateChange::Clear => send_guard::StateChange::Clear,
    };
    send_guard::Assessment {
        verdict: send_verdict_from!(assessment.verdict, send_screen::SendVerdict => send_guard::SendVerdict, send_guard::Throttle),
        state,
    }
}

/// A `send-guard` verdict as the `risk-control` one with the same case.
fn as_risk_verdict(verdict: send_guard::SendVerdict) -> risk_control::RiskVerdict {
    send_verdict_from!(verdict, send_guard::SendVerdict => risk_control::RiskVerdict, risk_control::Throttle)
}

/// What the risk-control chain assesses.
enum RiskSubject<'a> {
    Login(risk_control::LoginAttempt),
    Send(&'a mut PluginMessage),
}

fn unavailable(plugin: &LoadedPlugin, failure: &CallFailure) -> String {
    format!(
        "plugin {} unavailable ({})",
        plugin.id(),
        failure.kind.as_str()
    )
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes a plugin's directory next to the old one and swaps it in by renames.
fn write_plugin_dir(
    root: &Path,
    id: &str,
    manifest: &str,
    wasm: &[u8],
    enabled: bool,
) -> std::io::Result<()> {
    let staging = root.join(format!(".{id}.new"));
    let retired = root.join(format!(".{id}.old"));
    let target = root.join(id);
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(&retired);
    std::fs::create_dir_all(&staging)?;
    std::fs::write(staging.join(MANIFEST_FILE), manifest)?;
    std::fs::write(staging.join(COMPONENT_FILE), wasm)?;
    if !enabled {
        std::fs::write(staging.join(DISABLED_MARKER), b"")?;
    }
    if target.exists() {
        std::fs::rename(&target, &retired)?;
    }
    std::fs::rename(&staging, &target)?;
    let _ = std::fs::remove_dir_all(&retired);
    Ok(())
}
