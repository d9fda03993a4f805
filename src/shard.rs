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
