//! A call's deadline counted in the time its thread ran, not in wall time alone: the epoch
//! ticker measures wall time, and on a saturated machine a healthy call whose thread was
//! descheduled for a while would otherwise be killed as a timeout (and, repeated, open the
//! plugin's circuit breaker: a fail-open filter then skipped, a fail-closed one refusing).
//!
//! The deadline is split in two halves of wall time. When the first half has passed,
//! the thread's CPU clock is read (a system call, made only by calls that last that long);
//! when the second has, it is read again: if the thread ran for at least half of that
//! window the guest is really running and is stopped, at the deadline as before. If it
//! did not (the thread waited for a cpu), the call gets another window, up to
//! [`STARVED_WINDOWS`] of them.

use std::time::Duration;

use wasmtime::UpdateDeadline;

/// Windows a call may be given while its thread barely runs, before it is stopped anyway.
pub const STARVED_WINDOWS: u32 = 8;

/// One call's watch over its deadline (kept in the instance's state, reset by every call).
#[derive(Debug, Clone)]
pub struct DeadlineWatch {
    /// Epoch ticks to set the store's deadline to when the call begins (the first half).
    first_ticks: u64,
    /// Epoch ticks in a window (the deadline's second half).
    window_ticks: u64,
    /// The window's length in wall time.
    window: Duration,
    /// The thread's CPU clock when the current window began (none before the first).
    cpu_at_window_start: Option<Duration>,
    starved_windows_left: u32,
}

impl DeadlineWatch {
    /// A watch over a deadline of `deadline_ticks` ticks of `tick` each, as a call begins.
    pub fn new(deadline_ticks: u64, tick: Duration) -> Self {
        let first_ticks = (deadline_ticks / 2).max(1);
        let window_ticks = deadline_ticks.saturating_sub(first_ticks).max(1);
        Self {
            first_ticks,
            window_ticks,
            window: tick * u32::try_from(window_ticks).unwrap_or(u32::MAX),
            cpu_at_window_start: None,
            starved_windows_left: STARVED_WINDOWS,
        }
    }

    /// The ticks to set the store's epoch deadline to as the call begins.
    pub fn first_ticks(&self) -> u64 {
        self.first_ticks
    }

    /// The epoch deadline was reached; `cpu_now` is the thread's CPU clock.
    pub fn reached(&mut self, cpu_now: Duration) -> UpdateDeadline {
        let Some(started) = self.cpu_at_window_start.replace(cpu_now) else {
            return UpdateDeadline::Continue(self.window_ticks);
        };
        let ran = cpu_now.saturating_sub(started);
        if ran * 2 >= self.window || self.starved_windows_left == 0 {
            return UpdateDeadline::Interrupt;
        }
        self.starved_windows_left -= 1;
        UpdateDeadline::Continue(self.window_ticks)
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
        // Cannot happen on Linux; a zero clock makes every window look busy, so the call
        // is stopped at its wall-time deadline as before.
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(1);

    fn is_continue(update: &UpdateDeadline, ticks: u64) -> bool {
        matches!(update, UpdateDeadline::Continue(t) if *t == ticks)
    }

    #[test]
    fn a_running_guest_is_stopped_at_its_deadline() {
        // 21 ticks (a 20 ms deadline and the tick in progress): 10, then a window of 11.
        let mut watch = DeadlineWatch::new(21, TICK);
        assert_eq!(watch.first_ticks(), 10);
        let at = |ms| Duration::from_millis(ms);
        assert!(is_continue(&watch.reached(at(100)), 11));
        // It ran for the whole window: stopped.
        assert!(matches!(watch.reached(at(111)), UpdateDeadline::Interrupt));
    }

    #[test]
    fn a_starved_guest_gets_more_windows_but_not_for_ever() {
        let mut watch = DeadlineWatch::new(21, TICK);
        let mut cpu = Duration::from_millis(5);
        assert!(is_continue(&watch.reached(cpu), 11));
        for _ in 0..STARVED_WINDOWS {
            // 2 ms of an 11 ms window: the thread waited for a cpu.
            cpu += Duration::from_millis(2);
            assert!(is_continue(&watch.reached(cpu), 11));
        }
        cpu += Duration::from_millis(2);
        assert!(matches!(watch.reached(cpu), UpdateDeadline::Interrupt));
    }

    #[test]
    fn a_guest_that_runs_again_after_a_starved_window_is_stopped() {
        let mut watch = DeadlineWatch::new(21, TICK);
        let mut cpu = Duration::ZERO;
        assert!(is_continue(&watch.reached(cpu), 11));
        cpu += Duration::from_millis(1);
        assert!(is_continue(&watch.reached(cpu), 11));
        cpu += Duration::from_millis(6);
        assert!(matches!(watch.reached(cpu), UpdateDeadline::Interrupt));
    }

    #[test]
    fn the_shortest_deadline_still_has_a_window() {
        let mut watch = DeadlineWatch::new(1, TICK);
        assert_eq!(watch.first_ticks(), 1);
        assert!(is_continue(&watch.reached(Duration::ZERO), 1));
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
