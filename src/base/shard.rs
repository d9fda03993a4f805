//! Sharded locks: a fixed array of cache-line-padded `RwLock`s, the one key-mixing
//! function that picks a shard, and the ordered many-shard guard. Every in-memory map of
//! the service is built from these.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Shards per map unless a map asks for another count: enough that two cores rarely
/// contend.
pub(crate) const SHARDS: usize = 64;

/// Fibonacci hashing's multiplier (2^64 / the golden ratio).
const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

/// The shard of `key` among `n` shards (a power of two): the top bits of the key times
/// the golden-ratio constant, which mix every bit of the key. The one shard function of
/// the crate: keys that are already hashes and keys that are H3 cells (whose low bits
/// are mostly constant) alike.
pub(crate) fn shard_of(key: u64, n: usize) -> usize {
    debug_assert!(n.is_power_of_two() && n > 1);
    (mix(key) >> (64 - n.trailing_zeros())) as usize
}

/// The key-mixing step itself: a bijection of `u64` whose high bits depend on every bit of
/// the key. Shards take its top bits; hash tables that need a hash of a few kept bits
/// (the index's `users` entries) take all of it.
pub(crate) fn mix(key: u64) -> u64 {
    key.wrapping_mul(FIBONACCI)
}

/// One lock on its own cache lines, so neighbouring shards do not false-share.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(RwLock<T>);

/// Independently locked values, [`SHARDS`] unless made with [`Shards::new`].
#[derive(Debug)]
pub(crate) struct Shards<T> {
    shards: Box<[Padded<T>]>,
}

impl<T: Default> Default for Shards<T> {
    fn default() -> Self {
        Self::new(SHARDS)
    }
}

impl<T: Default> Shards<T> {
    /// `n` shards (a power of two, at least 2), each holding `T::default()`.
    pub(crate) fn new(n: usize) -> Self {
        assert!(n.is_power_of_two() && n > 1, "shard count {n}");
        Self {
            shards: (0..n).map(|_| Padded::default()).collect(),
        }
    }
}

impl<T> Shards<T> {
    /// How many shards there are.
    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }

    /// The shard `key` belongs to ([`shard_of`]).
    pub(crate) fn of(&self, key: u64) -> usize {
        shard_of(key, self.shards.len())
    }

    /// Shard `i`, shared. A panic while a shard was held leaves its data as it was (every
    /// critical section is a handful of infallible steps), so poisoning is ignored.
    pub(crate) fn read(&self, i: usize) -> RwLockReadGuard<'_, T> {
        self.shards[i & (self.shards.len() - 1)]
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Shard `i`, exclusive.
    pub(crate) fn write(&self, i: usize) -> RwLockWriteGuard<'_, T> {
        self.shards[i & (self.shards.len() - 1)]
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sum of `f` over the shards, each read in turn.
    pub(crate) fn sum(&self, f: impl Fn(&T) -> usize) -> usize {
        (0..self.len()).map(|i| f(&self.read(i))).sum()
    }

    /// Exclusive guards on every shard in `ids` (any order, repeats allowed), taken in
    /// ascending order: two callers locking overlapping sets can never deadlock.
    pub(crate) fn lock_many(&self, mut ids: Vec<usize>) -> Many<'_, T> {
        ids.sort_unstable();
        ids.dedup();
        let guards = ids.iter().map(|&i| self.write(i)).collect();
        Many { ids, guards }
    }
}

/// Several shards held at once (see [`Shards::lock_many`]); dropping it releases them.
pub(crate) struct Many<'a, T> {
    /// The shard numbers held, ascending.
    ids: Vec<usize>,
    guards: Vec<RwLockWriteGuard<'a, T>>,
}

impl<T> Many<'_, T> {
    /// Shard `i`, if it is held.
    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        let at = self.ids.binary_search(&i).ok()?;
        Some(&*self.guards[at])
    }

    /// Shard `i`, mutably, if it is held.
    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        let at = self.ids.binary_search(&i).ok()?;
        Some(&mut *self.guards[at])
    }
}

impl<K, V, S> Shards<hashbrown::HashMap<K, V, S>>
where
    K: std::hash::Hash + Eq,
    S: std::hash::BuildHasher + Clone,
{
    /// [`retain_compact`] over every shard, one at a time; returns how many entries went.
    pub(crate) fn retain_compact(&self, mut keep: impl FnMut(&K, &mut V) -> bool) -> usize {
        (0..self.len())
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
    fn shard_of_spreads_cells_and_hashes_over_every_shard() {
        // H3 cells of one region differ in a few middle bits only; hashes in all bits.
        let cells = (0..4_096u64).map(|i| 0x0891_8000_0000_0000 | (i << 30) | 0x3fff_ffff);
        let hashes = (0..4_096u64).map(|i| i.wrapping_mul(0x2545_F491_4F6C_DD1D));
        for keys in [cells.collect::<Vec<_>>(), hashes.collect()] {
            let mut counts = [0usize; SHARDS];
            for k in keys {
                counts[shard_of(k, SHARDS)] += 1;
            }
            // 64 per shard on average: none empty, none more than twice that.
            assert!(counts.iter().all(|&c| c > 0 && c <= 128), "{counts:?}");
        }
    }

    #[test]
    fn lock_many_holds_each_named_shard_once_and_only_those() {
        let shards: Shards<u32> = Shards::new(8);
        {
            let mut many = shards.lock_many(vec![5, 1, 5, 3]);
            for i in [1, 3, 5] {
                *many.get_mut(i).unwrap() += 1;
            }
            assert!(many.get(2).is_none());
            // Shards not held stay free.
            drop(shards.write(2));
        }
        let held: Vec<u32> = (0..8).map(|i| *shards.read(i)).collect();
        assert_eq!(held, [0, 1, 0, 1, 0, 1, 0, 0]);
    }

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
