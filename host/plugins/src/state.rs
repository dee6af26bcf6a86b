//! Per-instance host state and the host side of the plugin imports: log, config, kv, clock,
//! the call-context and message resources lent to a hook call, and `current-call`, which
//! answers the same questions without a handle.
//!
//! WASI is linked (a `wasm32-wasip2` guest imports it even when unused) but grants nothing:
//! no preopened directories, no environment, no sockets, no inherited stdio.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use wasmtime::StoreLimits;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::bindings::{clock, config, current_call, kv, log, types};
use crate::deadline::DeadlineWatch;
use crate::kv::{KvError, KvStore};

/// Longest log line a plugin may write; longer ones are cut.
const MAX_LOG_BYTES: usize = 4096;

/// What all instances of one plugin share.
pub struct PluginShared {
    pub id: String,
    pub node_id: Arc<str>,
    pub config: BTreeMap<String, String>,
    pub kv: Arc<KvStore>,
}

/// Where a call comes from: the connection's transport and address.
#[derive(Debug, Clone, Default)]
pub struct CallOrigin {
    /// "tcp", "tcp+tls", "ws", "wss", "quic" or "api" (static: a connection holds no copy).
    pub transport: &'static str,
    /// The client's address (kept as an address: a string is made only when a plugin asks).
    pub remote_ip: Option<std::net::IpAddr>,
}

/// The host side of the `call-context` resource. Each instance holds one for its whole
/// life; the origin of the call in progress lives in [`HostState::origin`], so a call
/// costs no allocation for its context.
pub struct CallContextData;

/// The host side of the `message` resource. Each instance holds one handle for its whole
/// life; it names the message the call in progress lends ([`HostState::message`]), so
/// lending costs no allocation.
pub struct MessageSlot;

/// A message lent to a hook call. Fields are copied into the plugin only when it reads them.
#[derive(Debug, Clone)]
pub struct PluginMessage {
    pub conversation_id: String,
    pub sender: types::Principal,
    pub target: types::MessageTarget,
    pub client_msg_id: String,
    pub content_type: String,
    pub body: Bytes,
}

impl Default for PluginMessage {
    fn default() -> Self {
        Self {
            conversation_id: String::new(),
            sender: types::Principal {
                user_id: String::new(),
                device_id: String::new(),
            },
            target: types::MessageTarget::User(String::new()),
            client_msg_id: String::new(),
            content_type: String::new(),
            body: Bytes::new(),
        }
    }
}

/// The data of one instance's `Store`.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: StoreLimits,
    pub plugin: Arc<PluginShared>,
    /// The origin of the call in progress.
    pub origin: CallOrigin,
    /// The message lent to the call in progress.
    pub message: PluginMessage,
    /// Whether a call about `message` is in progress (`current-call` answers none else).
    pub message_lent: bool,
    /// The call in progress's watch over its deadline.
    pub deadline: DeadlineWatch,
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
            origin: CallOrigin::default(),
            message: PluginMessage::default(),
            message_lent: false,
            deadline: DeadlineWatch::new(Duration::from_millis(1), Instant::now()),
        }
    }

    /// The message of the call in progress, if the call is about one.
    fn lent_message(&self) -> Option<&PluginMessage> {
        self.message_lent.then_some(&self.message)
    }

    /// Creates the instance's call-context handle.
    pub fn new_call_context(&mut self) -> wasmtime::Result<Resource<CallContextData>> {
        Ok(self.table.push(CallContextData)?)
    }

    /// Creates the instance's message handle.
    pub fn new_message_slot(&mut self) -> wasmtime::Result<Resource<MessageSlot>> {
        Ok(self.table.push(MessageSlot)?)
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

// The call-context handle answers what `current-call` does: it names the call in progress.
impl types::HostCallContext for HostState {
    fn plugin_id(&mut self, _: Resource<CallContextData>) -> String {
        current_call::Host::plugin_id(self)
    }

    fn node_id(&mut self, _: Resource<CallContextData>) -> String {
        current_call::Host::node_id(self)
    }

    fn transport(&mut self, _: Resource<CallContextData>) -> String {
        current_call::Host::transport(self)
    }

    fn remote_ip(&mut self, _: Resource<CallContextData>) -> Option<String> {
        current_call::Host::remote_ip(self)
    }

    fn drop(&mut self, handle: Resource<CallContextData>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        Ok(())
    }
}

impl types::HostMessage for HostState {
    // The guest can name the message only through a borrow lent for the call in progress
    // (the component model checks borrows), so `self.message` is the message it means.
    fn conversation_id(&mut self, _: Resource<MessageSlot>) -> String {
        self.message.conversation_id.clone()
    }

    fn sender(&mut self, _: Resource<MessageSlot>) -> types::Principal {
        self.message.sender.clone()
    }

    fn target(&mut self, _: Resource<MessageSlot>) -> types::MessageTarget {
        self.message.target.clone()
    }

    fn client_msg_id(&mut self, _: Resource<MessageSlot>) -> String {
        self.message.client_msg_id.clone()
    }

    fn content_type(&mut self, _: Resource<MessageSlot>) -> String {
        self.message.content_type.clone()
    }

    fn body(&mut self, _: Resource<MessageSlot>) -> Vec<u8> {
        self.message.body.to_vec()
    }

    fn body_len(&mut self, _: Resource<MessageSlot>) -> u32 {
        self.message.body.len() as u32
    }

    fn drop(&mut self, handle: Resource<MessageSlot>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        Ok(())
    }
}

impl current_call::Host for HostState {
    fn plugin_id(&mut self) -> String {
        self.plugin.id.clone()
    }

    fn node_id(&mut self) -> String {
        self.plugin.node_id.to_string()
    }

    fn transport(&mut self) -> String {
        self.origin.transport.to_string()
    }

    fn remote_ip(&mut self) -> Option<String> {
        self.origin.remote_ip.map(|ip| ip.to_string())
    }

    fn conversation_id(&mut self) -> Option<String> {
        self.lent_message().map(|m| m.conversation_id.clone())
    }

    fn sender(&mut self) -> Option<types::Principal> {
        self.lent_message().map(|m| m.sender.clone())
    }

    fn target(&mut self) -> Option<types::MessageTarget> {
        self.lent_message().map(|m| m.target.clone())
    }

    fn client_msg_id(&mut self) -> Option<String> {
        self.lent_message().map(|m| m.client_msg_id.clone())
    }

    fn content_type(&mut self) -> Option<String> {
        self.lent_message().map(|m| m.content_type.clone())
    }
}

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
