//! Per-core slots for state that every hook call writes: instance pools, call counters.
//! One shared copy bounced its cache lines (and the pooled instances' memory) between the
//! cores on every call; with a slot per core, each core keeps its own hot.

use std::sync::OnceLock;

use crossbeam_utils::CachePadded;

/// Slots: one per core the process may use.
pub fn slot_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The cpu this thread runs on now, else a number of its own.
fn current_core() -> usize {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_getcpu takes no arguments and only reads the running cpu.
        let cpu = unsafe { libc::sched_getcpu() };
        if let Ok(cpu) = usize::try_from(cpu) {
            return cpu;
        }
    }
    thread_index()
}

/// Where the running cpu is unknown: threads numbered in the order of their first call.
fn thread_index() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|index| *index)
}

/// The core a call runs on, looked up once per call and used for every slot it touches.
/// The thread may move on: that costs a cache miss, never correctness, as the slots are
/// shared safely.
#[derive(Clone, Copy, Debug)]
pub struct Core(usize);

impl Core {
    /// The core this thread runs on now (a vDSO call, no system call).
    pub fn current() -> Self {
        Self(current_core())
    }
}

/// `T` once per slot, each on cache lines of its own.
pub struct PerCore<T> {
    slots: Box<[CachePadded<T>]>,
}

impl<T> PerCore<T> {
    /// `slots` copies (at least one) made by `make`; cores share them modulo their number.
    pub fn new(slots: usize, mut make: impl FnMut() -> T) -> Self {
        Self {
            slots: (0..slots.max(1))
                .map(|_| CachePadded::new(make()))
                .collect(),
        }
    }

    /// One copy per [`slot_count`].
    pub fn one_per_core(make: impl FnMut() -> T) -> Self {
        Self::new(slot_count(), make)
    }

    /// `core`'s slot.
    pub fn at(&self, core: Core) -> &T {
        &self.slots[core.0 % self.slots.len()]
    }

    /// Every slot, starting with `core`'s.
    pub fn iter_from(&self, core: Core) -> impl Iterator<Item = &T> {
        let len = self.slots.len();
        (0..len).map(move |i| &*self.slots[(core.0 + i) % len])
    }

    /// Every slot.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|slot| &**slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn calls_start_at_their_cores_slot_and_visit_every_slot_once() {
        let slots = PerCore::new(3, || AtomicUsize::new(0));
        let core = Core::current();
        assert!(std::ptr::eq(slots.at(core), &*slots.slots[core.0 % 3]));
        let order: Vec<*const AtomicUsize> = slots.iter_from(core).map(|s| s as *const _).collect();
        assert_eq!(order.len(), 3, "every slot once");
        for (step, slot) in order.iter().enumerate() {
            assert_eq!(*slot, &*slots.slots[(core.0 + step) % 3] as *const _);
        }
        #[cfg(target_os = "linux")]
        for cpu in 0..slot_count() {
            let on_that_core = std::thread::scope(|s| {
                s.spawn(|| {
                    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET adds one cpu.
                    let pinned = unsafe {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(cpu, &mut set);
                        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
                            == 0
                    };
                    // An address, which may cross threads where a pointer may not.
                    pinned.then(|| slots.at(Core::current()) as *const AtomicUsize as usize)
                })
                .join()
                .unwrap()
            });
            if let Some(slot) = on_that_core {
                let expected = &*slots.slots[cpu % 3] as *const AtomicUsize as usize;
                assert_eq!(slot, expected, "a thread on cpu {cpu}");
            }
        }
    }
}
