//! A call's deadline counted in the time its thread ran, not in wall time alone: on a
//! saturated machine a healthy call whose thread was descheduled for a while would
//! otherwise be killed as a timeout (and, repeated, open the plugin's circuit breaker: a
//! fail-open filter then skipped, a fail-closed one refusing).
//!
//! The epoch ticker only says when to look (each tick runs this watch for every call
//! running guest code); the watch measures the call's wall time from its own start. The deadline is
//! split in two halves. Once the first half has passed, the thread's CPU clock is read (a
//! system call, made only by calls that last that long); once the second has, it is read
//! again: if the thread ran for at least half of that window the guest is really running
//! and is stopped. If it did not (the thread waited for a cpu), the call gets another
//! window, up to [`STARVED_WINDOWS`] of them.

use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;

/// Windows a call may be given while its thread barely runs, before it is stopped anyway.
pub const STARVED_WINDOWS: u32 = 8;

/// Ask again at the next tick (the store's deadline is always the next tick: the watch,
/// not the tick count, decides).
const NEXT_TICK: UpdateDeadline = UpdateDeadline::Continue(1);

/// One call's watch over its deadline (kept in the instance's state, made anew by every
/// call).
#[derive(Debug, Clone)]
pub struct DeadlineWatch {
    /// When the call began.
    started: Instant,
    /// The deadline's first half: until it has passed a tick only reads the clock.
    first_half: Duration,
    /// The deadline's second half: a window in which the thread must have run.
    window: Duration,
    /// When the current window began, and the thread's CPU clock then (none before the
    /// first).
    window_start: Option<(Instant, Duration)>,
    starved_windows_left: u32,
}

impl DeadlineWatch {
    /// A watch over `deadline` for a call that began at `started`.
    pub fn new(deadline: Duration, started: Instant) -> Self {
        let first_half = deadline / 2;
        Self {
            started,
            first_half,
            window: deadline - first_half,
            window_start: None,
            starved_windows_left: STARVED_WINDOWS,
        }
    }

    /// A tick found the call running at `now`; `thread_cpu` reads the thread's CPU clock
    /// (called only past the first half).
    pub fn reached(
        &mut self,
        now: Instant,
        thread_cpu: impl FnOnce() -> Duration,
    ) -> UpdateDeadline {
        let Some((began, cpu_began)) = self.window_start else {
            if now.saturating_duration_since(self.started) >= self.first_half {
                self.window_start = Some((now, thread_cpu()));
            }
            return NEXT_TICK;
        };
        let span = now.saturating_duration_since(began);
        if span < self.window {
            return NEXT_TICK;
        }
        // Ticks may come further apart than a window: the thread must have run for half
        // of the span it had.
        let cpu = thread_cpu();
        let ran = cpu.saturating_sub(cpu_began);
        if ran * 2 >= span || self.starved_windows_left == 0 {
            return UpdateDeadline::Interrupt;
        }
        self.starved_windows_left -= 1;
        self.window_start = Some((now, cpu));
        NEXT_TICK
    }
}

/// The calling thread's CPU clock (the time it has run).
pub fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if status != 0 {
        // Cannot happen on Linux; a zero clock makes every window look starved, so the
        // call is stopped after its extra windows (about five times its deadline).
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_millis(20);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn is_next_tick(update: &UpdateDeadline) -> bool {
        matches!(update, UpdateDeadline::Continue(1))
    }

    fn is_interrupt(update: &UpdateDeadline) -> bool {
        matches!(update, UpdateDeadline::Interrupt)
    }

    /// A clock that must not be read.
    fn unread() -> Duration {
        panic!("the thread's clock was read before half the deadline")
    }

    #[test]
    fn a_running_guest_is_stopped_at_its_deadline() {
        let t0 = Instant::now();
        let mut watch = DeadlineWatch::new(DEADLINE, t0);
        // Ticks before half the deadline only look at the wall clock.
        assert!(is_next_tick(&watch.reached(t0 + ms(1), unread)));
        assert!(is_next_tick(&watch.reached(t0 + ms(9), unread)));
        // Half-way: the window begins.
        assert!(is_next_tick(&watch.reached(t0 + ms(10), || ms(100))));
        assert!(is_next_tick(&watch.reached(t0 + ms(15), || ms(105))));
        // It ran for the whole window: stopped at the deadline.
        assert!(is_interrupt(&watch.reached(t0 + ms(20), || ms(110))));
    }

    #[test]
    fn ticks_far_apart_still_stop_a_running_guest() {
        // A watchdog ticking every 10 ms sees the call at 12 and 25 ms.
        let t0 = Instant::now();
        let mut watch = DeadlineWatch::new(DEADLINE, t0);
        assert!(is_next_tick(&watch.reached(t0 + ms(12), || ms(12))));
        assert!(is_interrupt(&watch.reached(t0 + ms(25), || ms(25))));
    }

    #[test]
    fn a_starved_guest_gets_more_windows_but_not_for_ever() {
        let t0 = Instant::now();
        let mut watch = DeadlineWatch::new(DEADLINE, t0);
        let mut now = t0 + ms(10);
        let mut cpu = ms(5);
        assert!(is_next_tick(&watch.reached(now, || cpu)));
        for _ in 0..STARVED_WINDOWS {
            // 2 ms of a 10 ms window: the thread waited for a cpu.
            now += ms(10);
            cpu += ms(2);
            assert!(is_next_tick(&watch.reached(now, || cpu)));
        }
        now += ms(10);
        cpu += ms(2);
        assert!(is_interrupt(&watch.reached(now, || cpu)));
    }

    #[test]
    fn a_guest_that_runs_again_after_a_starved_window_is_stopped() {
        let t0 = Instant::now();
        let mut watch = DeadlineWatch::new(DEADLINE, t0);
        assert!(is_next_tick(&watch.reached(t0 + ms(10), || ms(0))));
        assert!(is_next_tick(&watch.reached(t0 + ms(20), || ms(1))));
        assert!(is_interrupt(&watch.reached(t0 + ms(30), || ms(7))));
    }

    #[test]
    fn the_shortest_deadline_still_has_a_window() {
        let t0 = Instant::now();
        let mut watch = DeadlineWatch::new(ms(1), t0);
        assert!(is_next_tick(&watch.reached(t0, unread)));
        assert!(is_next_tick(&watch.reached(t0 + ms(1), || ms(0))));
        assert!(is_interrupt(&watch.reached(t0 + ms(2), || ms(1))));
    }

    #[test]
    fn the_thread_clock_advances_while_the_thread_runs() {
        let before = thread_cpu_time();
        let started = std::time::Instant::now();
        let mut spin = 0u64;
        while started.elapsed() < Duration::from_millis(20) {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        assert!(thread_cpu_time() > before);
    }
}
