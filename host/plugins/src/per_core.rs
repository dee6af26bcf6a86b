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

/// The core this thread runs on now (a vDSO call, no system call). It may change right
/// after: that costs a cache miss, never correctness, as the slots are shared safely.
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

/// `T` once per slot, each on cache lines of its own.
pub struct PerCore<T> {
    slots: Box<[CachePadded<T>]>,
}

impl<T> PerCore<T> {
    /// `slots` copies (at least one) made by `make`; cores share them modulo their number.
    pub fn new(slots: usize, make: impl FnMut() -> T) -> Self {
        let mut make = make;
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

    /// The index of the running core's slot.
    pub fn local_index(&self) -> usize {
        current_core() % self.slots.len()
    }

    /// The running core's slot.
    pub fn local(&self) -> &T {
        &self.slots[self.local_index()]
    }

    /// Every slot, starting with the running core's.
    pub fn iter_from_local(&self) -> impl Iterator<Item = &T> {
        let start = self.local_index();
        let len = self.slots.len();
        (0..len).map(move |i| &*self.slots[(start + i) % len])
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
        let index = slots.local_index();
        assert!(index < 3);
        let order: Vec<*const AtomicUsize> =
            slots.iter_from_local().map(|s| s as *const _).collect();
        assert_eq!(order.len(), 3, "every slot once");
        for (step, slot) in order.iter().enumerate() {
            assert_eq!(*slot, &*slots.slots[(index + step) % 3] as *const _);
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
                    pinned.then(|| slots.local_index())
                })
                .join()
                .unwrap()
            });
            if let Some(index) = on_that_core {
                assert_eq!(index, cpu % 3, "a thread on cpu {cpu}");
            }
        }
    }
}
