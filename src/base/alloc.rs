//! Giving the allocator's freed pages back to the system.
//!
//! mimalloc (the server's allocator) keeps a thread's emptied pages in that thread's heap
//! for reuse and returns them to the system only when that same thread collects its heap.
//! A server that has just indexed a million users has freed about a third of what it
//! allocated on the way (each bucket regrown per member, each table outgrown), and without
//! a collection the resident set keeps all of it: 1 M users measured 114 B each resident
//! against 87 B after one collection (`cargo bench --bench sweep`, BENCHMARKS.md "Memory
//! per user"). Another thread's collection does not help: it must be the owner's.
//!
//! So every runtime worker calls [`collect_when_due`] as it goes idle (tokio's
//! `on_thread_park`): at most once per [`COLLECT_EVERY`] per thread it collects its own
//! heap, forcing the purge of what it freed. A worker busy without a pause keeps its pages
//! until it pauses, and reuses them meanwhile. A worker that goes idle less than a second
//! after its last collection keeps what it freed since until something wakes it again
//! (a connection, or a timer: the expiry sweep, the metrics); best effort, not a bound.
//! The main thread, which runs the server's top future and builds a restored index, is
//! not a worker: it collects once a second on a timer of its own (`main.rs`); the expiry
//! sweep's blocking thread collects after each sweep. (A forced collection under load,
//! once a second per worker, did not change the unary update's server CPU: 11.7-12.0
//! against 11.5-12.1 µs per call, BENCHMARKS.md.)
//!
//! Calling these with another global allocator is harmless: they collect mimalloc's own
//! (then empty) heap.

use std::{
    cell::Cell,
    time::{Duration, Instant},
};

/// Least time between two collections of one thread's heap.
pub const COLLECT_EVERY: Duration = Duration::from_secs(1);

thread_local! {
    static LAST_COLLECTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Collects this thread's heap if it has not for [`COLLECT_EVERY`]. Costs a clock read
/// otherwise.
pub fn collect_when_due() {
    let now = Instant::now();
    let due = LAST_COLLECTED.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < COLLECT_EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        collect_now();
    }
}

/// Collects this thread's heap now: pages it freed go back to the system.
pub fn collect_now() {
    // SAFETY: `mi_collect` takes no pointer and only walks the calling thread's own heap
    // and the process's arenas, under mimalloc's own synchronisation.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_collects_once_per_period() {
        // Nothing to observe but the bookkeeping: the first call collects and records the
        // time; a second call within the period leaves the record as it was.
        collect_when_due();
        let first = LAST_COLLECTED.with(Cell::get);
        assert!(first.is_some());
        collect_when_due();
        assert_eq!(LAST_COLLECTED.with(Cell::get), first);
        LAST_COLLECTED.with(|l| l.set(first.and_then(|t| t.checked_sub(COLLECT_EVERY))));
        collect_when_due();
        assert!(LAST_COLLECTED.with(Cell::get) > first.and_then(|t| t.checked_sub(COLLECT_EVERY)));
    }
}
