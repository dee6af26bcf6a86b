//! One loaded plugin version: its compiled component, ready instances, circuit breaker and metrics.
//!
//! Architecture invariant: an instance whose call failed in any way (trap, deadline,
//! memory cap) is dropped, never returned to the pool: a trap may leave its store poisoned.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use wasmtime::Store;
use wasmtime::component::{
    ComponentExportIndex, ComponentNamedList, Instance, InstancePre, Lift, Lower, Resource,
    TypedFunc,
};

use crate::bindings::{
    authenticator, body_filter, body_screen, group_policy, interface_name, message_filter,
    risk_control, send_guard, send_screen,
};
use crate::deadline::{DeadlineWatch, thread_cpu_time};
use crate::manifest::{Hook, Manifest};
use crate::per_core::{Core, PerCore};
use crate::state::{CallContextData, CallOrigin, HostState, MessageSlot, PluginShared};

/// How a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The call ran past its deadline and was interrupted.
    Timeout,
    /// The call hit the memory cap.
    Memory,
    /// The guest trapped (panic, unreachable, bad access) or instantiation failed.
    Trap,
    /// The circuit breaker is open: the plugin was not called.
    Unavailable,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Trap => "trap",
            FailureKind::Unavailable => "unavailable",
        }
    }
}

/// A failed call, with what the guest or engine said.
#[derive(Debug, Clone)]
pub struct CallFailure {
    pub kind: FailureKind,
    pub detail: String,
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.detail)
    }
}

/// `message-filter.filter`, callable without a fiber.
pub type FilterFunc =
    TypedFunc<(Resource<CallContextData>, Resource<MessageSlot>), (message_filter::FilterVerdict,)>;
/// `risk-control.assess`, callable without a fiber.
pub type AssessFunc =
    TypedFunc<(Resource<CallContextData>, risk_control::RiskEvent), (risk_control::RiskVerdict,)>;

/// `body-filter.filter-body`, callable without a fiber (the body is lent, not copied on
/// the host's side).
pub type FilterBodyFunc = TypedFunc<
    (
        Resource<CallContextData>,
        Resource<MessageSlot>,
        bytes::Bytes,
    ),
    (body_filter::FilterVerdict,),
>;
/// `send-guard.check-send`, callable without a fiber.
pub type CheckSendFunc =
    TypedFunc<(Resource<CallContextData>, send_guard::SendCheck), (send_guard::Assessment,)>;

/// `body-screen.screen`, callable without a fiber: no handles, the body lent.
pub type ScreenFunc = TypedFunc<(bytes::Bytes,), (body_screen::FilterVerdict,)>;
/// `send-screen.screen-send`, callable without a fiber: no handles.
pub type ScreenSendFunc = TypedFunc<(send_screen::SendFacts,), (send_screen::Assessment,)>;

/// The exports of one instance, looked up once per instance.
pub struct Exports {
    pub authenticator: Option<authenticator::Guest>,
    pub message_filter: Option<message_filter::Guest>,
    pub body_filter: Option<body_filter::Guest>,
    pub group_policy: Option<group_policy::Guest>,
    pub risk_control: Option<risk_control::Guest>,
    pub send_guard: Option<send_guard::Guest>,
    pub body_screen: Option<body_screen::Guest>,
    pub send_screen: Option<send_screen::Guest>,
    /// The per-message hooks as typed functions, for direct calls.
    pub filter: Option<FilterFunc>,
    pub filter_body: Option<FilterBodyFunc>,
    pub assess: Option<AssessFunc>,
    pub check_send: Option<CheckSendFunc>,
    pub screen: Option<ScreenFunc>,
    pub screen_send: Option<ScreenSendFunc>,
}

/// A ready instance.
pub struct Ready {
    pub store: Store<HostState>,
    pub exports: Exports,
    /// The instance's call-context handle, lent (borrowed) to every call.
    context: Resource<CallContextData>,
    /// The instance's message handle: it names whatever message the call in progress lends.
    message: Resource<MessageSlot>,
}

impl Ready {
    /// Prepares the instance for one call that began at `started` and returns the handles
    /// it lends.
    fn lend(&mut self, deadline: Duration, started: Instant, origin: &CallOrigin) -> Handles {
        // Every tick asks the call's watch (see `deadline.rs`).
        self.store.set_epoch_deadline(1);
        let state = self.store.data_mut();
        state.deadline = DeadlineWatch::new(deadline, started);
        state.origin = origin.clone();
        Handles {
            context: Resource::new_borrow(self.context.rep()),
            message: Resource::new_borrow(self.message.rep()),
        }
    }
}

/// The handles a call may lend to the guest (as borrows).
pub struct Handles {
    pub context: Resource<CallContextData>,
    pub message: Resource<MessageSlot>,
}

/// Indices of the hook interfaces the component exports.
pub struct HookIndices {
    pub authenticator: Option<authenticator::GuestIndices>,
    pub message_filter: Option<message_filter::GuestIndices>,
    pub body_filter: Option<body_filter::GuestIndices>,
    pub group_policy: Option<group_policy::GuestIndices>,
    pub risk_control: Option<risk_control::GuestIndices>,
    pub send_guard: Option<send_guard::GuestIndices>,
    pub body_screen: Option<body_screen::GuestIndices>,
    pub send_screen: Option<send_screen::GuestIndices>,
    filter: Option<ComponentExportIndex>,
    filter_body: Option<ComponentExportIndex>,
    assess: Option<ComponentExportIndex>,
    check_send: Option<ComponentExportIndex>,
    screen: Option<ComponentExportIndex>,
    screen_send: Option<ComponentExportIndex>,
}

/// The function at `index` of `instance`, typed, if the component exports it.
fn typed_func<Params, Results>(
    store: &mut Store<HostState>,
    instance: &Instance,
    index: Option<ComponentExportIndex>,
) -> wasmtime::Result<Option<TypedFunc<Params, Results>>>
where
    Params: ComponentNamedList + Lower,
    Results: ComponentNamedList + Lift,
{
    index
        .map(|index| instance.get_typed_func(&mut *store, index))
        .transpose()
}

/// The index of function `func` of the contract's exported interface `interface`.
fn export_func(
    pre: &InstancePre<HostState>,
    interface: &str,
    func: &str,
) -> Option<ComponentExportIndex> {
    let component = pre.component();
    let (_, interface) = component.get_export(None, interface_name(interface))?;
    let (_, func) = component.get_export(Some(&interface), func)?;
    Some(func)
}

impl HookIndices {
    pub fn new(pre: &InstancePre<HostState>) -> Self {
        Self {
            authenticator: authenticator::GuestIndices::new(pre).ok(),
            message_filter: message_filter::GuestIndices::new(pre).ok(),
            body_filter: body_filter::GuestIndices::new(pre).ok(),
            group_policy: group_policy::GuestIndices::new(pre).ok(),
            risk_control: risk_control::GuestIndices::new(pre).ok(),
            send_guard: send_guard::GuestIndices::new(pre).ok(),
            body_screen: body_screen::GuestIndices::new(pre).ok(),
            send_screen: send_screen::GuestIndices::new(pre).ok(),
            // Export names resolve semver-compatibly: earlier 0.2 components' are found too.
            filter: export_func(pre, "message-filter", "filter"),
            filter_body: export_func(pre, "body-filter", "filter-body"),
            assess: export_func(pre, "risk-control", "assess"),
            check_send: export_func(pre, "send-guard", "check-send"),
            screen: export_func(pre, "body-screen", "screen"),
            screen_send: export_func(pre, "send-screen", "screen-send"),
        }
    }

    pub fn exports(&self, hook: Hook) -> bool {
        match hook {
            Hook::Authenticator => self.authenticator.is_some(),
            // A filter may export `body-screen` or `body-filter` instead of `message-filter`.
            Hook::MessageFilter => {
                self.message_filter.is_some()
                    || self.body_filter.is_some()
                    || self.body_screen.is_some()
            }
            Hook::GroupPolicy => self.group_policy.is_some(),
            // Risk control's sends may be assessed by `send-screen` or `send-guard` alone
            // (logins then pass).
            Hook::RiskControl => {
                self.risk_control.is_some()
                    || self.send_guard.is_some()
                    || self.send_screen.is_some()
            }
        }
    }
}

/// Every verdict a hook can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Modify,
    Reject,
    Drop,
    Deny,
    Throttle,
    Block,
}

impl Verdict {
    pub const ALL: [Verdict; 7] = [
        Verdict::Allow,
        Verdict::Modify,
        Verdict::Reject,
        Verdict::Drop,
        Verdict::Deny,
        Verdict::Throttle,
        Verdict::Block,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Modify => "modify",
            Verdict::Reject => "reject",
            Verdict::Drop => "drop",
            Verdict::Deny => "deny",
            Verdict::Throttle => "throttle",
            Verdict::Block => "block",
        }
    }
}

/// A hook's answer, counted by its verdict when the call returns it.
pub trait HookAnswer {
    fn verdict(&self) -> Verdict;
}

impl HookAnswer for authenticator::AuthResult {
    fn verdict(&self) -> Verdict {
        match self {
            Self::Allow(_) => Verdict::Allow,
            Self::Deny(_) => Verdict::Deny,
        }
    }
}

impl HookAnswer for message_filter::FilterVerdict {
    fn verdict(&self) -> Verdict {
        match self {
            Self::Allow => Verdict::Allow,
            Self::Modify(_) => Verdict::Modify,
            Self::Reject(_) => Verdict::Reject,
            Self::Drop => Verdict::Drop,
        }
    }
}

impl HookAnswer for send_guard::Assessment {
    fn verdict(&self) -> Verdict {
        match self.verdict {
            send_guard::SendVerdict::Allow => Verdict::Allow,
            send_guard::SendVerdict::Throttle(_) => Verdict::Throttle,
            send_guard::SendVerdict::Block(_) => Verdict::Block,
        }
    }
}

impl HookAnswer for risk_control::RiskVerdict {
    fn verdict(&self) -> Verdict {
        match self {
            Self::Allow => Verdict::Allow,
            Self::Throttle(_) => Verdict::Throttle,
            Self::Block(_) => Verdict::Block,
        }
    }
}

impl HookAnswer for group_policy::GroupDecision {
    fn verdict(&self) -> Verdict {
        match self {
            Self::Allow => Verdict::Allow,
            Self::Deny(_) => Verdict::Deny,
        }
    }
}

/// Per-plugin counters. Every finished call counts once, as a verdict or as a failure, so
/// the number of calls is their sum. The counters every call writes (its verdict, its
/// time) are kept per core ([`PerCore`]) and summed when read.
pub struct Metrics {
    pub failures_timeout: AtomicU64,
    pub failures_memory: AtomicU64,
    pub failures_trap: AtomicU64,
    pub failures_unavailable: AtomicU64,
    per_core: PerCore<CallCounters>,
    /// Longest call, nanoseconds.
    pub max_ns: AtomicU64,
}

/// What the calls on one core add up to.
#[derive(Default)]
struct CallCounters {
    /// Verdicts given, indexed by `Verdict as usize`.
    verdicts: [AtomicU64; Verdict::ALL.len()],
    /// Sum of call durations, nanoseconds.
    total_ns: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            failures_timeout: AtomicU64::default(),
            failures_memory: AtomicU64::default(),
            failures_trap: AtomicU64::default(),
            failures_unavailable: AtomicU64::default(),
            per_core: PerCore::one_per_core(CallCounters::default),
            max_ns: AtomicU64::default(),
        }
    }
}

impl Metrics {
    pub fn failures(&self, kind: FailureKind) -> &AtomicU64 {
        match kind {
            FailureKind::Timeout => &self.failures_timeout,
            FailureKind::Memory => &self.failures_memory,
            FailureKind::Trap => &self.failures_trap,
            FailureKind::Unavailable => &self.failures_unavailable,
        }
    }

    /// Counts one verdict, given by a call on `core`.
    fn verdict(&self, core: Core, verdict: Verdict) {
        self.per_core.at(core).verdicts[verdict as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many times `verdict` was given.
    fn verdict_count(&self, verdict: Verdict) -> u64 {
        self.per_core
            .iter()
            .map(|counters| counters.verdicts[verdict as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// Calls that ran to a verdict or failed in the guest (calls the open circuit breaker
    /// refused are not counted).
    pub fn calls(&self) -> u64 {
        let verdicts: u64 = Verdict::ALL.iter().map(|v| self.verdict_count(*v)).sum();
        verdicts
            + [FailureKind::Timeout, FailureKind::Memory, FailureKind::Trap]
                .into_iter()
                .map(|kind| self.failures(kind).load(Ordering::Relaxed))
                .sum::<u64>()
    }

    /// Sum of call durations, nanoseconds.
    pub fn total_ns(&self) -> u64 {
        self.per_core
            .iter()
            .map(|counters| counters.total_ns.load(Ordering::Relaxed))
            .sum()
    }

    /// Records the duration of a call on `core`.
    fn timed(&self, core: Core, ns: u64) {
        self.per_core
            .at(core)
            .total_ns
            .fetch_add(ns, Ordering::Relaxed);
        // Read first: the longest call rarely changes, and a read leaves the cache line
        // shared between the threads where a read-modify-write would take it over.
        if ns > self.max_ns.load(Ordering::Relaxed) {
            self.max_ns.fetch_max(ns, Ordering::Relaxed);
        }
    }

    /// The verdicts given so far, by name (only those given at least once).
    pub fn verdicts(&self) -> std::collections::BTreeMap<&'static str, u64> {
        Verdict::ALL
            .iter()
            .map(|verdict| (verdict.as_str(), self.verdict_count(*verdict)))
            .filter(|(_, count)| *count > 0)
            .collect()
    }
}

/// Circuit breaker: after `THRESHOLD` consecutive failures the plugin is not called for a
/// back-off period (doubling up to `MAX_BACKOFF`); then one trial call decides.
struct Breaker {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    backoff: Duration,
    trips: u64,
}

const THRESHOLD: u32 = 5;
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A plugin version loaded and ready to call.
pub struct LoadedPlugin {
    pub manifest: Manifest,
    /// SHA-256 of the component bytes, hex.
    pub digest: String,
    pub shared: Arc<PluginShared>,
    pre: InstancePre<HostState>,
    indices: HookIndices,
    /// Idle instances, a pool per core: a call takes an instance of its core's pool where
    /// it can, so an instance's memory stays in one core's cache.
    // Boxed: an instance moves out of and back into the pool on every call.
    #[allow(clippy::vec_box)]
    idle: PerCore<Mutex<Vec<Box<Ready>>>>,
    /// Idle instances each pool keeps (together at most `limits.instances`).
    idle_per_pool: usize,
    breaker: Mutex<Breaker>,
    /// Whether the breaker has counted failures or is open: while false, calls skip its lock.
    breaker_engaged: std::sync::atomic::AtomicBool,
    pub metrics: Metrics,
    memory_bytes: usize,
    /// A call's deadline (see `deadline.rs` for how it is counted).
    deadline: Duration,
    /// Every import the component uses returns without waiting, so its instances run
    /// straight on the calling thread ([`Self::call_direct`]) instead of on a fiber.
    direct: bool,
    /// Told whenever guest code runs, so that deadlines advance.
    ticker: Arc<crate::engine::EpochTicker>,
}

/// Least time an instantiation may take.
const INSTANTIATE_DEADLINE: Duration = Duration::from_secs(1);

impl LoadedPlugin {
    /// `direct`: `pre` was linked by the engine's direct linker (see [`Self::call_direct`]).
    pub fn new(
        manifest: Manifest,
        digest: String,
        shared: Arc<PluginShared>,
        pre: InstancePre<HostState>,
        direct: bool,
        ticker: Arc<crate::engine::EpochTicker>,
    ) -> Self {
        let indices = HookIndices::new(&pre);
        let instances = manifest.limits.instances.max(1) as usize;
        let pools = crate::per_core::slot_count().min(instances);
        let memory_bytes = manifest.limits.memory_mib as usize * 1024 * 1024;
        let deadline = Duration::from_millis(u64::from(manifest.limits.deadline_ms).max(1));
        ticker.serve_deadline(deadline);
        Self {
            manifest,
            digest,
            shared,
            pre,
            indices,
            idle: PerCore::new(pools, || Mutex::new(Vec::new())),
            idle_per_pool: instances / pools,
            breaker: Mutex::new(Breaker {
                consecutive_failures: 0,
                open_until: None,
                backoff: INITIAL_BACKOFF,
                trips: 0,
            }),
            breaker_engaged: std::sync::atomic::AtomicBool::new(false),
            metrics: Metrics::default(),
            memory_bytes,
            deadline,
            direct,
            ticker,
        }
    }

    /// Whether calls run without a fiber ([`Self::call_direct`]).
    pub fn direct(&self) -> bool {
        self.direct
    }

    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// Whether messages are filtered by `body-screen.screen` (before any other filter
    /// export).
    pub fn screens_bodies(&self) -> bool {
        self.indices.body_screen.is_some()
    }

    /// Whether messages are filtered by `body-filter.filter-body` (else by
    /// `message-filter.filter`), unless [`Self::screens_bodies`].
    pub fn filters_bodies(&self) -> bool {
        self.indices.body_filter.is_some()
    }

    /// Whether sends are assessed by `send-screen.screen-send` (before `send-guard`).
    pub fn screens_sends(&self) -> bool {
        self.indices.send_screen.is_some()
    }

    /// Whether sends are assessed by `send-guard.check-send` (else by `risk-control.assess`),
    /// unless [`Self::screens_sends`].
    pub fn guards_sends(&self) -> bool {
        self.indices.send_guard.is_some()
    }

    /// Whether the plugin exports `risk-control.assess` (a send guard need not).
    pub fn assesses_risk(&self) -> bool {
        self.indices.risk_control.is_some()
    }

    pub fn exports(&self, hook: Hook) -> bool {
        self.indices.exports(hook)
    }

    /// A store for a new instance.
    fn new_store(&self) -> Store<HostState> {
        let mut store = Store::new(
            self.pre.engine(),
            HostState::new(self.shared.clone(), self.memory_bytes),
        );
        store.limiter(|state| &mut state.limits);
        // A deadline counts the time the guest's thread ran, not only wall time.
        store.epoch_deadline_callback(|mut store| {
            Ok(store
                .data_mut()
                .deadline
                .reached(Instant::now(), thread_cpu_time))
        });
        // Instantiation runs guest code (start functions) after host work whose wall time
        // the epochs also count (the first instance in a fresh process faults its memory
        // in): a call's deadline is too tight for it, yet a start function that never
        // returns is still stopped.
        store.set_epoch_deadline(1);
        store.data_mut().deadline =
            DeadlineWatch::new(self.deadline.max(INSTANTIATE_DEADLINE), Instant::now());
        store
    }

    /// Creates a fresh instance (on a fiber when the plugin is not direct).
    pub async fn instantiate(&self) -> wasmtime::Result<Box<Ready>> {
        if self.direct {
            return self.instantiate_direct();
        }
        let _run = self.ticker.guest_run(Core::current());
        let mut store = self.new_store();
        let instance = self.pre.instantiate_async(&mut store).await?;
        self.ready(store, instance)
    }

    /// Creates a fresh instance of a direct plugin on the calling thread.
    fn instantiate_direct(&self) -> wasmtime::Result<Box<Ready>> {
        let _run = self.ticker.guest_run(Core::current());
        let mut store = self.new_store();
        let instance = self.pre.instantiate(&mut store)?;
        self.ready(store, instance)
    }

    /// Looks up the exports of a new instance and gives it its lent handles.
    fn ready(
        &self,
        mut store: Store<HostState>,
        instance: Instance,
    ) -> wasmtime::Result<Box<Ready>> {
        let exports = Exports {
            filter: typed_func(&mut store, &instance, self.indices.filter)?,
            filter_body: typed_func(&mut store, &instance, self.indices.filter_body)?,
            assess: typed_func(&mut store, &instance, self.indices.assess)?,
            check_send: typed_func(&mut store, &instance, self.indices.check_send)?,
            screen: typed_func(&mut store, &instance, self.indices.screen)?,
            screen_send: typed_func(&mut store, &instance, self.indices.screen_send)?,
            authenticator: self
                .indices
                .authenticator
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            message_filter: self
                .indices
                .message_filter
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            body_filter: self
                .indices
                .body_filter
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            group_policy: self
                .indices
                .group_policy
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            risk_control: self
                .indices
                .risk_control
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            send_guard: self
                .indices
                .send_guard
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            body_screen: self
                .indices
                .body_screen
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            send_screen: self
                .indices
                .send_screen
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
        };
        let context = store.data_mut().new_call_context()?;
        let message = store.data_mut().new_message_slot()?;
        Ok(Box::new(Ready {
            store,
            exports,
            context,
            message,
        }))
    }

    /// Times the breaker tripped.
    pub fn breaker_trips(&self) -> u64 {
        self.breaker.lock().trips
    }

    /// Whether the breaker currently keeps the plugin from being called.
    pub fn breaker_open(&self) -> bool {
        self.breaker
            .lock()
            .open_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// Runs `f` on an instance, within the plugin's deadline and memory cap. `f` gets the
    /// call-context handle to pass to the hook, describing `origin`.
    pub async fn call<R: HookAnswer>(
        &self,
        origin: &CallOrigin,
        f: impl AsyncFnOnce(&mut Store<HostState>, &Exports, Handles) -> wasmtime::Result<R>,
    ) -> Result<R, CallFailure> {
        // Boxed: a call on a fiber has a large future, which would otherwise be part of
        // every caller's, the message chains' too, whose plugins are mostly called directly.
        Box::pin(self.call_boxed(origin, f)).await
    }

    /// [`Self::call`]'s body.
    async fn call_boxed<R: HookAnswer>(
        &self,
        origin: &CallOrigin,
        f: impl AsyncFnOnce(&mut Store<HostState>, &Exports, Handles) -> wasmtime::Result<R>,
    ) -> Result<R, CallFailure> {
        self.admit()?;
        // Where the call starts: its instance and counters are that core's, even if it
        // ends on another.
        let core = Core::current();
        let _run = self.ticker.guest_run(core);
        let started = Instant::now();
        // The deadline counts from the call's start, or from the end of its instance's
        // creation (which had a deadline of its own).
        let (mut ready, began) = match self.take_idle(core) {
            Some(ready) => (ready, started),
            None => match self.instantiate().await {
                Ok(ready) => (ready, Instant::now()),
                Err(err) => return Err(self.failed(&err, core, started)),
            },
        };
        let handles = ready.lend(self.deadline, began, origin);
        let result = f(&mut ready.store, &ready.exports, handles).await;
        self.settle(ready, result, core, started)
    }

    /// [`Self::call`] for a direct plugin: `f` calls the guest on this thread, without a
    /// fiber (a fiber's set-up and switches were about a sixth of a hook call). The
    /// deadline and memory cap hold as on a fiber: the epoch interrupt traps the guest.
    ///
    /// Must only be used when [`Self::direct`] holds (the engine refuses otherwise).
    pub fn call_direct<R: HookAnswer>(
        &self,
        origin: &CallOrigin,
        f: impl FnOnce(&mut Store<HostState>, &Exports, Handles) -> wasmtime::Result<R>,
    ) -> Result<R, CallFailure> {
        self.admit()?;
        let core = Core::current();
        let _run = self.ticker.guest_run(core);
        let started = Instant::now();
        let (mut ready, began) = match self.take_idle(core) {
            Some(ready) => (ready, started),
            None => match self.instantiate_direct() {
                Ok(ready) => (ready, Instant::now()),
                Err(err) => return Err(self.failed(&err, core, started)),
            },
        };
        let handles = ready.lend(self.deadline, began, origin);
        let result = f(&mut ready.store, &ready.exports, handles);
        self.settle(ready, result, core, started)
    }

    /// An idle instance: `core`'s pool's last returned, else another pool's (an instance
    /// is cheaper to move than to create).
    fn take_idle(&self, core: Core) -> Option<Box<Ready>> {
        self.idle.iter_from(core).find_map(|pool| pool.lock().pop())
    }

    /// Fails fast while the circuit breaker is open.
    fn admit(&self) -> Result<(), CallFailure> {
        if self.breaker_engaged.load(Ordering::Acquire)
            && let Some(until) = self.breaker.lock().open_until
            && Instant::now() < until
        {
            self.metrics
                .failures(FailureKind::Unavailable)
                .fetch_add(1, Ordering::Relaxed);
            return Err(CallFailure {
                kind: FailureKind::Unavailable,
                detail: "circuit breaker open".into(),
            });
        }
        Ok(())
    }

    /// Returns a healthy instance to the pool and counts the outcome.
    fn settle<R: HookAnswer>(
        &self,
        ready: Box<Ready>,
        result: wasmtime::Result<R>,
        core: Core,
        started: Instant,
    ) -> Result<R, CallFailure> {
        match result {
            Ok(result) => {
                self.succeeded(core, started, result.verdict());
                // `core`'s pool, unless it is full (say, the instance came from
                // another pool); beyond every pool's share the instance is dropped.
                let mut ready = Some(ready);
                for pool in self.idle.iter_from(core) {
                    let mut pool = pool.lock();
                    if pool.len() < self.idle_per_pool {
                        pool.extend(ready.take());
                        break;
                    }
                }
                Ok(result)
            }
            // The instance is dropped here: never reuse a store that trapped.
            Err(err) => Err(self.failed(&err, core, started)),
        }
    }

    fn succeeded(&self, core: Core, started: Instant, verdict: Verdict) {
        self.metrics.verdict(core, verdict);
        self.metrics
            .timed(core, started.elapsed().as_nanos() as u64);
        if !self.breaker_engaged.load(Ordering::Acquire) {
            return;
        }
        let mut breaker = self.breaker.lock();
        self.breaker_engaged.store(false, Ordering::Release);
        if breaker.consecutive_failures > 0 || breaker.open_until.is_some() {
            if breaker.open_until.is_some() {
                tracing::info!(
                    plugin = self.id(),
                    "plugin recovered; circuit breaker closed"
                );
            }
            breaker.consecutive_failures = 0;
            breaker.open_until = None;
            breaker.backoff = INITIAL_BACKOFF;
        }
    }

    fn failed(&self, err: &wasmtime::Error, core: Core, started: Instant) -> CallFailure {
        let kind = classify(err);
        let detail = format!("{err:#}");
        self.metrics.failures(kind).fetch_add(1, Ordering::Relaxed);
        self.metrics
            .timed(core, started.elapsed().as_nanos() as u64);
        tracing::warn!(plugin = self.id(), kind = kind.as_str(), error = %detail, "plugin call failed");
        let mut breaker = self.breaker.lock();
        self.breaker_engaged.store(true, Ordering::Release);
        breaker.consecutive_failures += 1;
        let half_open_trial_failed = breaker.open_until.is_some();
        if breaker.consecutive_failures >= THRESHOLD || half_open_trial_failed {
            let backoff = breaker.backoff;
            breaker.open_until = Some(Instant::now() + backoff);
            breaker.backoff = (backoff * 2).min(MAX_BACKOFF);
            breaker.trips += 1;
            // Reload: the next trial starts from fresh instances.
            for pool in self.idle.iter() {
                pool.lock().clear();
            }
            tracing::error!(
                plugin = self.id(),
                failures = breaker.consecutive_failures,
                backoff_ms = backoff.as_millis() as u64,
                "plugin keeps failing; circuit breaker open"
            );
        }
        CallFailure { kind, detail }
    }
}

fn classify(err: &wasmtime::Error) -> FailureKind {
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => FailureKind::Timeout,
        Some(wasmtime::Trap::AllocationTooLarge) => FailureKind::Memory,
        _ if format!("{err:#}").contains("forcing trap when growing memory") => FailureKind::Memory,
        _ => FailureKind::Trap,
    }
}
