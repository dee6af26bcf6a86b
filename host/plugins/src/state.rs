//! Per-instance host state and the host side of the plugin imports: log, config, kv, clock.
//!
//! WASI is linked (a `wasm32-wasip2` guest imports it even when unused) but grants nothing:
//! no preopened directories, no environment, no sockets, no inherited stdio.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::bindings::{clock, config, kv, log, types};
use crate::kv::{KvError, KvStore};

/// Longest log line a plugin may write; longer ones are cut.
const MAX_LOG_BYTES: usize = 4096;

/// What all instances of one plugin share.
pub struct PluginShared {
    pub id: String,
    pub config: BTreeMap<String, String>,
    pub kv: Arc<KvStore>,
}

/// The data of one instance's `Store`.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: StoreLimits,
    pub plugin: Arc<PluginShared>,
}

impl HostState {
    pub fn new(plugin: Arc<PluginShared>, memory_bytes: usize) -> Self {
        let limits = wasmtime::StoreLimitsBuilder::new()
            .memory_size(memory_bytes)
            .instances(64)
            .tables(64)
            .memories(16)
            .trap_on_grow_failure(true)
            .build();
        Self {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            limits,
            plugin,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl types::Host for HostState {}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let mut message = message;
        if message.len() > MAX_LOG_BYTES {
            let mut cut = MAX_LOG_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let plugin = self.plugin.id.as_str();
        match level {
            log::Level::Trace => tracing::trace!(target: "plugin", plugin, "{message}"),
            log::Level::Debug => tracing::debug!(target: "plugin", plugin, "{message}"),
            log::Level::Info => tracing::info!(target: "plugin", plugin, "{message}"),
            log::Level::Warn => tracing::warn!(target: "plugin", plugin, "{message}"),
            log::Level::Error => tracing::error!(target: "plugin", plugin, "{message}"),
        }
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.plugin.config.get(&key).cloned()
    }

    fn entries(&mut self) -> Vec<(String, String)> {
        self.plugin
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

fn kv_error(err: KvError) -> kv::Error {
    match err {
        KvError::QuotaExceeded => kv::Error::QuotaExceeded,
        KvError::TooLarge => kv::Error::TooLarge,
        KvError::NotANumber => kv::Error::NotANumber,
    }
}

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.plugin.kv.get(&key, now_ms())
    }

    fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), kv::Error> {
        self.plugin
            .kv
            .set(&key, value, ttl_ms, now_ms())
            .map_err(kv_error)
    }

    fn delete(&mut self, key: String) -> bool {
        self.plugin.kv.delete(&key, now_ms())
    }

    fn increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<i64, kv::Error> {
        self.plugin
            .kv
            .increment(&key, delta, ttl_ms, now_ms())
            .map_err(kv_error)
    }

    fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, kv::Error> {
        self.plugin
            .kv
            .compare_and_swap(&key, expected.as_deref(), value, ttl_ms, now_ms())
            .map_err(kv_error)
    }
}

impl clock::Host for HostState {
    fn now_ms(&mut self) -> i64 {
        now_ms()
    }
}
