//! Measurements: HDR latency histograms, timestamps carried in payloads, process CPU time, RSS and kernel slab.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// The process-wide origin of payload timestamps (senders and receivers share a process).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the epoch of `at`.
pub fn stamp(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_nanos() as u64
}

/// A payload of `size` bytes (at least 8) starting with the timestamp of `at`.
pub fn payload(at: Instant, size: usize) -> bytes::Bytes {
    let mut body = vec![b'x'; size.max(8)];
    body[..8].copy_from_slice(&stamp(at).to_be_bytes());
    body.into()
}

/// The timestamp [`payload`] wrote (ns since the epoch), or `None` for a payload without one.
fn payload_stamp(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// How long before `now` the payload's timestamp was, or `None` for a payload without one.
pub fn age_at(payload: &[u8], now: Instant) -> Option<Duration> {
    let stamp_ns = payload_stamp(payload)?;
    Some(Duration::from_nanos(stamp(now).saturating_sub(stamp_ns)))
}

/// Latencies as raw µs values, for the fan-out's thousand receivers: each holding an HDR
/// histogram (about 140 KiB of counters) made every record a cache miss, and the load
/// generator shares the machine with the server it measures. Folded into a [`Latency`]
/// once the run is over.
#[derive(Default)]
pub struct LatencySamples {
    us: Vec<u32>,
}

impl LatencySamples {
    pub fn record(&mut self, took: Duration) {
        let us = (took.as_nanos() / 1000).clamp(1, 100_000_000) as u32;
        self.us.push(us);
    }

    pub fn count(&self) -> u64 {
        self.us.len() as u64
    }

    pub fn summary(&self) -> LatencySummary {
        let mut latency = Latency::new();
        latency.record_samples(self);
        latency.summary()
    }
}

/// A latency histogram: 1 µs to 100 s, 3 significant digits.
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds"),
        }
    }

    pub fn record(&mut self, took: Duration) {
        let us = (took.as_nanos() as u64 / 1000).clamp(1, 100_000_000);
        self.histogram.record(us).expect("clamped into range");
    }

    pub fn record_samples(&mut self, samples: &LatencySamples) {
        for &us in &samples.us {
            self.histogram
                .record(u64::from(us))
                .expect("clamped into range");
        }
    }

    pub fn merge(&mut self, other: &Latency) {
        self.histogram
            .add(&other.histogram)
            .expect("same bounds on both");
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    pub fn summary(&self) -> LatencySummary {
        let h = &self.histogram;
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU seconds used so far by process `pid`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / TICKS_PER_SECOND
}

/// Resident memory of process `pid`, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    status_kib(&format!("/proc/{pid}/status"), "VmRSS:") * 1024
}

/// Kernel slab memory of the whole machine, bytes.
pub fn slab_bytes() -> u64 {
    status_kib("/proc/meminfo", "Slab:") * 1024
}

fn status_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU used by the server under test and by this load generator over an interval, in
/// cores (CPU seconds per wall second).
pub struct CpuMeter {
    server_pid: u32,
    server_start: f64,
    self_start: f64,
    wall_start: Instant,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuUsage {
    pub server_cores: f64,
    pub loadgen_cores: f64,
}

impl CpuMeter {
    pub fn start(server_pid: u32) -> Self {
        Self {
            server_pid,
            server_start: cpu_seconds(server_pid),
            self_start: cpu_seconds(std::process::id()),
            wall_start: Instant::now(),
        }
    }

    pub fn finish(&self) -> CpuUsage {
        let wall = self.wall_start.elapsed().as_secs_f64().max(1e-9);
        CpuUsage {
            server_cores: (cpu_seconds(self.server_pid) - self.server_start) / wall,
            loadgen_cores: (cpu_seconds(std::process::id()) - self.self_start) / wall,
        }
    }
}

/// One open-loop round-trip run: A sends to B at a fixed rate, B answers each, A records
/// how long each round trip took from its scheduled send time.
#[derive(Debug, Clone, Serialize)]
pub struct RttResult {
    pub offered_per_s: u64,
    pub completed: u64,
    pub lost: u64,
    pub latency: LatencySummary,
    pub cpu: CpuUsage,
    /// Every round trip, when [`RttSamples::enabled`]; written to a CSV file, not the JSON.
    #[serde(skip)]
    pub samples: RttSamples,
}

/// Round trips one by one: each one's scheduled send (its payload stamp) and latency, so
/// that slow ones can be lined up with what the server did at the time (`--rtt-samples`).
#[derive(Debug, Clone, Default)]
pub struct RttSamples {
    sent_and_latency: Vec<(u64, u32)>,
}

static RECORD_RTT_SAMPLES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

impl RttSamples {
    /// Turns recording on for every later round-trip run.
    pub fn enable() {
        RECORD_RTT_SAMPLES.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn enabled() -> bool {
        RECORD_RTT_SAMPLES.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records the round trip whose payload is `payload` and which took `took` (its
    /// [`age_at`] on arrival), if recording is on.
    pub fn record(&mut self, payload: &[u8], took: Duration) {
        if !Self::enabled() {
            return;
        }
        if let Some(stamp_ns) = payload_stamp(payload) {
            let took_us = took.as_micros().min(u128::from(u32::MAX)) as u32;
            self.sent_and_latency.push((stamp_ns, took_us));
        }
    }

    /// Writes `monotonic_ns,latency_us` lines: the scheduled send on the machine's
    /// CLOCK_MONOTONIC (which other processes' logs can use too), then the round trip.
    pub fn write_csv(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let origin = monotonic_ns_of_epoch();
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(out, "sent_monotonic_ns,latency_us")?;
        for (stamp_ns, took_us) in &self.sent_and_latency {
            writeln!(out, "{},{took_us}", origin + stamp_ns)?;
        }
        out.flush()
    }
}

/// The stamps' origin ([`epoch`]) on CLOCK_MONOTONIC, in ns. `Instant` reads that clock on
/// Linux; the two readings here are taken back to back, so the offset is good to about a µs.
fn monotonic_ns_of_epoch() -> u64 {
    let at = Instant::now();
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let monotonic = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    monotonic.saturating_sub(stamp(at))
}

/// One open-loop fan-out run: one sender at a fixed message rate to `subscribers` receivers.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub subscribers: usize,
    pub offered_msgs_per_s: u64,
    pub expected: u64,
    pub deliveries: u64,
    /// Deliveries over the time from the first send to the last delivery.
    pub deliveries_per_s: f64,
    pub latency: LatencySummary,
    pub cpu: CpuUsage,
}

/// Sleeps until `at` (open-loop senders keep their schedule whatever the answers do).
///
/// Not tokio's timer: it fires on whole milliseconds, so a send scheduled every 200 µs would
/// leave up to 1 ms late, and that lateness would be counted as latency of the system under
/// test. Each thread's sleepers share a `timerfd` (nanosecond expiry, and no timer slack,
/// which the kernel applies to sleeping threads, not to timerfds) that the runtime's reactor
/// polls with the sockets, so on the round trip's one-thread runtime a sender is woken by
/// the thread that runs it (on the multi-thread runtime, by whichever worker polls the
/// timer's task), where a timer thread of its own cost the load generator a third of its
/// CPU in the round trip, in its own wake-ups and in waking the runtime's thread.
pub async fn sleep_until(at: Instant) {
    if at <= Instant::now() {
        return;
    }
    let (woken, wake) = tokio::sync::oneshot::channel();
    let timer = PRECISE_TIMER.with_borrow_mut(|timer| {
        // A timer whose task ended with the runtime it was made in is replaced: this
        // thread now runs another one.
        if timer.as_ref().is_none_or(|t| !t.driven()) {
            *timer = Some(PreciseTimer::start().expect("create the benchmark's timerfd"));
        }
        timer.clone().expect("set above")
    });
    timer.add(at, woken);
    let _ = wake.await;
}

thread_local! {
    /// This thread's timer, made on its first sleep (in the runtime the thread runs).
    static PRECISE_TIMER: std::cell::RefCell<Option<std::sync::Arc<PreciseTimer>>> =
        const { std::cell::RefCell::new(None) };
}

/// One sleeper of [`PreciseTimer`], ordered by its instant (then arrival).
struct Sleeper {
    at: Instant,
    order: u64,
    wake: tokio::sync::oneshot::Sender<()>,
}

impl PartialEq for Sleeper {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Sleeper {}
impl PartialOrd for Sleeper {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Sleeper {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

/// Sleepers in instant order and a timerfd armed for the first of them, which a task of
/// the runtime awaits.
struct PreciseTimer {
    sleepers: std::sync::Mutex<(
        std::collections::BinaryHeap<std::cmp::Reverse<Sleeper>>,
        u64,
    )>,
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    /// Its task is alive (false once the runtime that ran it is gone).
    driven: std::sync::atomic::AtomicBool,
}

/// Marks its timer undriven when the timer's task ends or is dropped with its runtime.
struct Driving(std::sync::Arc<PreciseTimer>);

impl Drop for Driving {
    fn drop(&mut self) {
        self.0
            .driven
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

impl PreciseTimer {
    /// A timer whose timerfd the current runtime polls, with the task that wakes its
    /// sleepers.
    fn start() -> std::io::Result<std::sync::Arc<Self>> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // SAFETY: an OwnedFd's descriptor is open and stays the same until it is dropped,
        // which the AsyncFd owning it does last.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)?;
        let timer = std::sync::Arc::new(Self {
            sleepers: Default::default(),
            fd,
            driven: std::sync::atomic::AtomicBool::new(true),
        });
        tokio::spawn(Driving(timer.clone()).drive());
        Ok(timer)
    }

    /// Whether its task still runs, so that sleepers are woken.
    fn driven(&self) -> bool {
        self.driven.load(std::sync::atomic::Ordering::Acquire)
    }

    fn add(&self, at: Instant, wake: tokio::sync::oneshot::Sender<()>) {
        let mut guard = self.sleepers.lock().unwrap_or_else(|p| p.into_inner());
        let (sleepers, order) = &mut *guard;
        *order += 1;
        let earliest = sleepers.peek().is_none_or(|first| at < first.0.at);
        sleepers.push(std::cmp::Reverse(Sleeper {
            at,
            order: *order,
            wake,
        }));
        if earliest {
            self.arm(at);
        }
    }

    /// Sets the timerfd to expire at `at` (armed under the sleepers' lock, so the last
    /// arming is for the first sleeper).
    fn arm(&self, at: Instant) {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        // Zero would disarm it: a due instant expires at once instead.
        let after = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec::try_from(after).expect("a sleep shorter than 292 years"),
        };
        // It fails only for a bad descriptor or value, neither of which can be here.
        let armed = timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &spec);
        debug_assert!(armed.is_ok(), "{armed:?}");
    }
}

impl Driving {
    /// Wakes the sleepers whose instant has come, each time the timerfd expires.
    async fn drive(self) {
        let timer = &self.0;
        loop {
            let Ok(mut ready) = timer.fd.readable().await else {
                return;
            };
            // Takes the expiration count; fails with EAGAIN when the timer was re-armed
            // since it expired, which is harmless: the sleepers are checked against the
            // clock below.
            let _ = rustix::io::read(timer.fd.get_ref(), &mut [0u8; 8]);
            ready.clear_ready();
            let mut guard = timer.sleepers.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            while guard.0.peek().is_some_and(|first| first.0.at <= now) {
                if let Some(std::cmp::Reverse(due)) = guard.0.pop() {
                    let _ = due.wake.send(());
                }
            }
            if let Some(first) = guard.0.peek() {
                timer.arm(first.0.at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_runs_a_second_runtime_gets_a_timer_of_its_own() {
        for _ in 0..2 {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let at = Instant::now() + Duration::from_millis(5);
                tokio::time::timeout(Duration::from_secs(5), sleep_until(at))
                    .await
                    .expect("the sleeper is woken");
            });
        }
    }

    #[tokio::test]
    async fn sleepers_wake_at_their_instants_in_order() {
        let start = Instant::now();
        // Added out of order, on one thread's timer, as concurrent senders would.
        let offsets_ms = [30u64, 5, 20, 5, 12];
        let mut sleepers = tokio::task::JoinSet::new();
        for (n, ms) in offsets_ms.into_iter().enumerate() {
            let at = start + Duration::from_millis(ms);
            sleepers.spawn(async move {
                sleep_until(at).await;
                (n, at, Instant::now())
            });
        }
        let mut woken = Vec::new();
        while let Some(joined) = sleepers.join_next().await {
            woken.push(joined.unwrap());
        }
        for (n, at, woke) in &woken {
            assert!(woke >= at, "sleeper {n} woke {:?} early", *at - *woke);
            // Generous: a loaded machine may wake it late, but not by a whole second.
            assert!(
                woke.duration_since(*at) < Duration::from_secs(1),
                "sleeper {n}"
            );
        }
        woken.sort_by_key(|(_, _, woke)| *woke);
        let order: Vec<u64> = woken.iter().map(|(n, ..)| offsets_ms[*n]).collect();
        assert!(order.is_sorted(), "woken in the order {order:?}");
        // An instant already past returns at once.
        sleep_until(start).await;
    }

    #[test]
    fn payload_ages_and_percentiles() {
        // Stamps count from the first one taken; a payload stamped before it reads as 0.
        stamp(Instant::now());
        std::thread::sleep(Duration::from_millis(10));
        let sent = Instant::now() - Duration::from_millis(5);
        let body = payload(sent, 100);
        assert_eq!(body.len(), 100);
        let age = age_at(&body, Instant::now()).unwrap();
        assert!(
            age >= Duration::from_millis(5) && age < Duration::from_secs(5),
            "{age:?}"
        );
        assert!(age_at(b"short", Instant::now()).is_none());
        let mut latency = Latency::new();
        for us in 1..=1000 {
            latency.record(Duration::from_micros(us));
        }
        let s = latency.summary();
        assert_eq!(s.count, 1000);
        assert!((495..=505).contains(&s.p50_us), "{s:?}");
        assert!((985..=995).contains(&s.p99_us), "{s:?}");
    }

    #[test]
    fn this_process_uses_cpu_and_memory() {
        let pid = std::process::id();
        let start = cpu_seconds(pid);
        // Busy until the counter moves (it counts clock ticks), for at most a few seconds.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut x = 0u64;
        while cpu_seconds(pid) <= start && Instant::now() < deadline {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert!(
            cpu_seconds(pid) > start,
            "no CPU time counted after {x} rounds"
        );
        assert!(rss_bytes(pid) > 1024 * 1024);
        assert!(slab_bytes() > 0);
    }
}
