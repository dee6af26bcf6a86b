//! The wasmtime engine shared by all plugins: configuration, the epoch ticker, the linker
//! granting the plugin imports, and the compiled-component cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::error::Context as _;
use wasmtime::{Config, Engine};

use crate::bindings::AllHooks;
use crate::per_core::{Core, PerCore};
use crate::state::HostState;

/// The tick while a guest run has lasted at least a coarse tick (one may be running past
/// its deadline): deadlines are enforced to within it.
pub const FINE_TICK: Duration = Duration::from_millis(1);
/// The longest tick while every guest run is short.
const MAX_COARSE_TICK: Duration = Duration::from_millis(10);

/// Time without any plugin code running after which the ticker sleeps until the next call.
const IDLE_BEFORE_SLEEP: Duration = Duration::from_millis(100);

/// The epoch ticker's shared state. Each tick advances the engine's epoch, and every call
/// running guest code then asks its [`crate::deadline::DeadlineWatch`] whether it is over its
/// deadline. Calls last microseconds, so ticking every millisecond while calls flow (a
/// thread wake-up each, on a 2-core node a placement the scheduler keeps redoing) would be
/// nearly always for nothing: the ticker ticks coarsely (a quarter of the shortest loaded
/// deadline, at most 10 ms) until a run has lasted a whole tick, then every millisecond
/// while it lasts. Runs count themselves in one of two phases (grace periods, as in RCU):
/// at each tick, runs of the phase before the current one began at least a tick ago;
/// while none is left the phase flips.
///
/// It sleeps once no plugin code has run for [`IDLE_BEFORE_SLEEP`]: an idle node would
/// otherwise wake a cpu for nothing. Every entry into guest code holds a [`GuestRun`],
/// which wakes a sleeping ticker, so no call runs without its deadline advancing.
pub struct EpochTicker {
    /// Guest runs in progress by the phase they began in, counted in the slot of the core
    /// that began each (every call begins one: a single shared counter bounced between the
    /// cores).
    running: PerCore<[AtomicUsize; 2]>,
    /// The phase new runs count themselves in (0 or 1).
    phase: AtomicUsize,
    /// The coarse tick in milliseconds.
    coarse_tick_ms: AtomicU64,
    /// Set by each guest run, cleared by the ticker at every tick.
    ran: AtomicBool,
    /// The ticker is asleep (or deciding to sleep) and must be woken by the next run.
    asleep: AtomicBool,
    stop: AtomicBool,
    /// Ticks so far (for tests).
    ticks: AtomicU64,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl EpochTicker {
    /// The state with no thread yet, ticking coarsely at `coarse_tick` until a plugin's
    /// deadline asks for less.
    fn new(coarse_tick: Duration) -> Self {
        Self {
            running: PerCore::one_per_core(|| [AtomicUsize::new(0), AtomicUsize::new(0)]),
            phase: AtomicUsize::new(0),
            coarse_tick_ms: AtomicU64::new(coarse_tick.as_millis() as u64),
            ran: AtomicBool::new(false),
            asleep: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            thread: std::sync::OnceLock::new(),
        }
    }

    fn start(engine: Engine) -> wasmtime::Result<Arc<Self>> {
        let ticker = Arc::new(Self::new(MAX_COARSE_TICK));
        let state = ticker.clone();
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || state.run(&engine))
            .context("starting the epoch ticker")?;
        let _ = ticker.thread.set(thread.thread().clone());
        Ok(ticker)
    }

    fn run(&self, engine: &Engine) {
        let mut idle = Duration::ZERO;
        let mut regime = Regime::Coarse;
        while !self.stop.load(Ordering::Relaxed) {
            // Parked rather than slept: a plugin with a shorter deadline cuts a coarse tick
            // short (`serve_deadline`). Any early return is merely an early tick.
            let tick = self.tick(regime);
            std::thread::park_timeout(tick);
            engine.increment_epoch();
            self.ticks.fetch_add(1, Ordering::Relaxed);
            regime = self.next_regime(regime);
            let ran = self.ran.swap(false, Ordering::Relaxed);
            if ran || self.any_running(Ordering::Relaxed) {
                idle = Duration::ZERO;
                continue;
            }
            idle += tick;
            if idle < IDLE_BEFORE_SLEEP {
                continue;
            }
            // Announce the sleep, then look again: a run that began before the announcement
            // is seen in `running`; one that begins after it sees `asleep` and wakes us.
            self.asleep.store(true, Ordering::SeqCst);
            if self.any_running(Ordering::SeqCst) {
                self.asleep.store(false, Ordering::SeqCst);
                continue;
            }
            while self.asleep.load(Ordering::SeqCst) && !self.stop.load(Ordering::Relaxed) {
                std::thread::park();
            }
            idle = Duration::ZERO;
            regime = Regime::Coarse;
        }
    }

    /// After a tick: fine while a run of the previous phase (begun at least a tick ago)
    /// lasts, else the phase flips. The tick after a fine spell is fine too: a run that
    /// began during the spell counted itself in the phase just flipped away from, and is
    /// looked at a millisecond later, not a coarse tick later.
    fn next_regime(&self, regime: Regime) -> Regime {
        let previous = 1 - self.phase.load(Ordering::Relaxed);
        let lasting = self
            .running
            .iter()
            .any(|counts| counts[previous].load(Ordering::SeqCst) > 0);
        if lasting {
            return Regime::Fine;
        }
        // A run that read the phase before this store counts itself in the phase now
        // previous: at worst the next tick is fine for nothing.
        self.phase.store(previous, Ordering::Relaxed);
        match regime {
            Regime::Fine => Regime::Draining,
            Regime::Draining | Regime::Coarse => Regime::Coarse,
        }
    }

    /// The tick to wait in `regime`.
    fn tick(&self, regime: Regime) -> Duration {
        match regime {
            Regime::Fine | Regime::Draining => FINE_TICK,
            Regime::Coarse => Duration::from_millis(self.coarse_tick_ms.load(Ordering::Relaxed)),
        }
    }

    /// A plugin with this deadline is loaded: the coarse tick becomes at most a quarter of
    /// it, so a run is found lasting (and ticked finely) within half of its deadline.
    ///
    /// It never rises again: the coarse tick serves the shortest deadline of any plugin
    /// loaded since the start (an uninstalled one's too), which costs a few wake-ups a
    /// second at most.
    pub fn serve_deadline(&self, deadline: Duration) {
        let quarter = (deadline / 4).clamp(FINE_TICK, MAX_COARSE_TICK).as_millis() as u64;
        let before = self.coarse_tick_ms.fetch_min(quarter, Ordering::Relaxed);
        // A coarse tick in progress would otherwise run its old length.
        if quarter < before
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
    }

    /// Whether any guest run is in progress.
    fn any_running(&self, order: Ordering) -> bool {
        self.running
            .iter()
            .any(|counts| counts.iter().any(|count| count.load(order) > 0))
    }

    /// Marks guest code about to run on `core`; the deadline ticks until the returned
    /// guard drops.
    pub fn guest_run(&self, core: Core) -> GuestRun<'_> {
        // The guard remembers its counter: a call may end on another core, and in the
        // next phase.
        let running = &self.running.at(core)[self.phase.load(Ordering::Relaxed)];
        running.fetch_add(1, Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst)
            && self.asleep.swap(false, Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
        if !self.ran.load(Ordering::Relaxed) {
            self.ran.store(true, Ordering::Relaxed);
        }
        GuestRun(running)
    }

    /// Whether the ticker is asleep (for tests).
    pub fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::SeqCst)
    }

    /// Ticks so far (for tests).
    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

/// How often the ticker ticks.
#[derive(Clone, Copy)]
enum Regime {
    /// Every run is short: a coarse tick.
    Coarse,
    /// A run has lasted a whole tick: every millisecond.
    Fine,
    /// The last lasting run ended: one more fine tick, for runs begun meanwhile.
    Draining,
}

/// Guest code may be running while this lives (see [`EpochTicker::guest_run`]).
pub struct GuestRun<'a>(&'a AtomicUsize);

impl Drop for GuestRun<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Engine, linkers and cache directory.
pub struct PluginEngine {
    pub engine: Engine,
    /// Every import a plugin may use, WASI's waiting functions among them: instances
    /// linked here are called on a fiber.
    pub linker: Linker<HostState>,
    /// Only imports that never wait: a component whose imports all resolve here is called
    /// directly on the calling thread, without a fiber.
    pub direct_linker: Linker<HostState>,
    cache_dir: PathBuf,
    pub ticker: Arc<EpochTicker>,
}

impl PluginEngine {
    /// Creates the engine and starts its epoch ticker thread.
    pub fn new(cache_dir: &Path) -> wasmtime::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Component-model async is not used; with it on, every sync call costs more.
        config.concurrency_support(false);
        config.max_wasm_stack(512 * 1024);
        let engine = Engine::new(&config).context("creating the wasm engine")?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).context("linking WASI")?;
        AllHooks::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .context("linking plugin imports")?;
        let mut direct_linker = Linker::new(&engine);
        crate::direct_wasi::add_to_linker(&mut direct_linker).context("linking direct WASI")?;
        AllHooks::add_to_linker::<_, HasSelf<_>>(&mut direct_linker, |state| state)
            .context("linking plugin imports")?;
        std::fs::create_dir_all(cache_dir)
            .with_context(|| format!("creating {}", cache_dir.display()))?;
        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Self {
            engine,
            linker,
            direct_linker,
            cache_dir: cache_dir.to_owned(),
            ticker,
        })
    }

    /// Compiles `wasm` (a component), reusing the cached native code of an earlier
    /// compilation of the same bytes by a compatible engine.
    pub fn compile(&self, wasm: &[u8]) -> wasmtime::Result<(Component, String)> {
        let digest = hex(&Sha256::digest(wasm));
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(
            &self.engine.precompile_compatibility_hash(),
            &mut engine_hash,
        );
        let engine_key = std::hash::Hasher::finish(&engine_hash);
        let cached = self
            .cache_dir
            .join(format!("{digest}-{engine_key:016x}.cwasm"));
        if cached.exists() {
            // SAFETY: files in the cache directory are written only by `compile` below, from
            // `Engine::precompile_component` of this engine configuration (the file name
            // carries the engine's compatibility hash), which is what `deserialize` requires.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => return Ok((component, digest)),
                Err(err) => {
                    tracing::warn!(file = %cached.display(), error = %err, "ignoring an unusable compiled plugin")
                }
            }
        }
        let native = self
            .engine
            .precompile_component(wasm)
            .context("compiling the component")?;
        // SAFETY: `native` was just produced by `precompile_component` of this engine.
        let component = unsafe { Component::deserialize(&self.engine, &native) }?;
        let temporary = cached.with_extension("tmp");
        if std::fs::write(&temporary, &native)
            .and_then(|_| std::fs::rename(&temporary, &cached))
            .is_err()
        {
            tracing::warn!(file = %cached.display(), "could not cache a compiled plugin");
        }
        Ok((component, digest))
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

pub fn hex(bytes: &[u8]) -> String {
    sha2_hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ticker whose ticks the test makes (no thread).
    fn ticker(coarse: Duration) -> EpochTicker {
        EpochTicker::new(coarse)
    }

    /// The regime after a tick, and the tick it waits.
    fn next_tick(ticker: &EpochTicker, regime: Regime) -> (Regime, Duration) {
        let regime = ticker.next_regime(regime);
        (regime, ticker.tick(regime))
    }

    fn is_fine((_, tick): (Regime, Duration)) -> bool {
        tick == FINE_TICK
    }

    #[test]
    fn short_runs_tick_coarsely_and_a_lasting_one_finely() {
        let ticker = ticker(Duration::from_millis(5));
        let mut regime = Regime::Coarse;
        // Runs that end between ticks never make a tick fine.
        for _ in 0..4 {
            drop(ticker.guest_run(Core::current()));
            let next = next_tick(&ticker, regime);
            assert!(!is_fine(next));
            regime = next.0;
        }
        // A run in progress at two ticks in a row has lasted a whole tick.
        let lasting = ticker.guest_run(Core::current());
        let next = next_tick(&ticker, regime);
        assert!(!is_fine(next), "begun since the last tick");
        let next = next_tick(&ticker, next.0);
        assert!(is_fine(next), "in progress at two ticks");
        drop(lasting);
        let next = next_tick(&ticker, next.0);
        assert!(is_fine(next), "one more fine tick after a fine spell");
        let next = next_tick(&ticker, next.0);
        assert!(!is_fine(next), "coarse again");
    }

    #[test]
    fn a_run_begun_during_a_fine_spell_is_looked_at_a_fine_tick_after_it() {
        let ticker = ticker(Duration::from_millis(5));
        let first = ticker.guest_run(Core::current());
        let next = next_tick(&ticker, Regime::Coarse);
        let mut next = next_tick(&ticker, next.0);
        assert!(is_fine(next));
        // A second long run begins while the first keeps the ticks fine: it counts itself
        // in the other phase, which is not looked at until the first ends.
        let second = ticker.guest_run(Core::current());
        for _ in 0..3 {
            next = next_tick(&ticker, next.0);
            assert!(is_fine(next));
        }
        drop(first);
        // The phase flips; the tick stays fine and then finds the second run lasting.
        next = next_tick(&ticker, next.0);
        assert!(is_fine(next));
        next = next_tick(&ticker, next.0);
        assert!(is_fine(next), "the second run is found within a fine tick");
        assert!(matches!(next.0, Regime::Fine));
        drop(second);
    }

    #[test]
    fn a_shorter_deadline_shortens_the_coarse_tick_and_never_lengthens_it() {
        let ticker = ticker(MAX_COARSE_TICK);
        ticker.serve_deadline(Duration::from_millis(20));
        assert_eq!(ticker.tick(Regime::Coarse), Duration::from_millis(5));
        ticker.serve_deadline(Duration::from_secs(10));
        assert_eq!(ticker.tick(Regime::Coarse), Duration::from_millis(5));
        ticker.serve_deadline(Duration::from_millis(2));
        assert_eq!(ticker.tick(Regime::Coarse), FINE_TICK);
    }
}
