//! A fixed array of cache-line-padded `RwLock`s: the sharding every in-memory map of the
//! service uses.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Shards per map: enough that two cores rarely contend.
pub(crate) const SHARDS: usize = 64;

/// One lock on its own cache lines, so neighbouring shards do not false-share.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(RwLock<T>);

/// [`SHARDS`] independently locked values.
#[derive(Debug)]
pub(crate) struct Shards<T> {
    shards: Box<[Padded<T>]>,
}

impl<T: Default> Default for Shards<T> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
        }
    }
}

impl<T> Shards<T> {
    /// Shard `i`, shared. A panic while a shard was held leaves its data as it was (every
    /// critical section is a handful of infallible steps), so poisoning is ignored.
    pub(crate) fn read(&self, i: usize) -> RwLockReadGuard<'_, T> {
        self.shards[i % SHARDS]
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Shard `i`, exclusive.
    pub(crate) fn write(&self, i: usize) -> RwLockWriteGuard<'_, T> {
        self.shards[i % SHARDS]
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sum of `f` over the shards, each read in turn.
    pub(crate) fn sum(&self, f: impl Fn(&T) -> usize) -> usize {
        (0..SHARDS).map(|i| f(&self.read(i))).sum()
    }
}

impl<K, V, S> Shards<hashbrown::HashMap<K, V, S>>
where
    K: std::hash::Hash + Eq,
    S: std::hash::BuildHasher + Clone,
{
    /// [`retain_compact`] over every shard, one at a time; returns how many entries went.
    pub(crate) fn retain_compact(&self, mut keep: impl FnMut(&K, &mut V) -> bool) -> usize {
        (0..SHARDS)
            .map(|i| retain_compact(&mut self.write(i), &mut keep))
            .sum()
    }
}

/// Keeps the entries of `map` that `keep` accepts and returns how many went. When any
/// did, the table is rebuilt, sized for as many entries as it held before the removals.
///
/// A removal in a nearly full hash table leaves a tombstone, and hashbrown only clears
/// them when it must grow: if the table is then more than half full it doubles rather
/// than rehashing in place. A map that churns at a steady size (inserts between sweeps,
/// removals at each sweep) therefore doubles once, at a moment set by the churn, and
/// keeps the memory. Rebuilding after each sweep's removals clears the tombstones, one
/// shard at a time, so the transient copy is one shard's table. Sizing the rebuilt table
/// for the pre-sweep count leaves room for the next interval's inserts, so a steady
/// churn neither grows the table between sweeps nor reallocates it at a new size.
pub(crate) fn retain_compact<K, V, S>(
    map: &mut hashbrown::HashMap<K, V, S>,
    keep: impl FnMut(&K, &mut V) -> bool,
) -> usize
where
    K: std::hash::Hash + Eq,
    S: std::hash::BuildHasher + Clone,
{
    let before = map.len();
    map.retain(keep);
    let removed = before - map.len();
    if removed > 0 {
        let mut fresh = hashbrown::HashMap::with_capacity_and_hasher(before, map.hasher().clone());
        fresh.extend(map.drain());
        *map = fresh;
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_compact_keeps_what_passes_and_counts_what_went() {
        let mut map: hashbrown::HashMap<u32, u32> = (0..1000).map(|i| (i, i * 2)).collect();
        let removed = retain_compact(&mut map, |k, _| k % 3 == 0);
        assert_eq!(removed, 666);
        assert_eq!(map.len(), 334);
        assert!(map.iter().all(|(k, v)| k % 3 == 0 && *v == k * 2));
        assert_eq!(retain_compact(&mut map, |_, _| true), 0);
        assert_eq!(map.len(), 334);
    }

    /// A map churning at a steady size (inserts between sweeps, the oldest removed at
    /// each sweep) keeps one table size from its first sweep on: the rebuilt table has
    /// room for the next interval's inserts, so it neither grows nor shrinks.
    #[test]
    fn steady_churn_keeps_one_table_size() {
        let live = 3_000u64;
        let mut map: hashbrown::HashMap<u64, u64> = hashbrown::HashMap::new();
        let mut next = 0u64;
        let mut steady = None;
        for round in 0..200 {
            for _ in 0..live / 10 {
                map.insert(next, round);
                next += 1;
                if let Some(cap) = steady {
                    assert_eq!(map.capacity(), cap, "grew between sweeps in round {round}");
                }
            }
            let peak = map.len();
            let oldest = next.saturating_sub(live);
            let removed = retain_compact(&mut map, |k, _| *k >= oldest);
            assert_eq!(map.len(), live.min(next) as usize);
            if removed > 0 {
                let fitted = hashbrown::HashMap::<u64, u64>::with_capacity(peak).capacity();
                assert_eq!(map.capacity(), fitted, "round {round}");
                assert_eq!(*steady.get_or_insert(fitted), fitted, "round {round}");
            }
        }
        assert!(steady.is_some());
    }
}
