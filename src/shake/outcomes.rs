//! Finished shake outcomes, kept for retries of the same `(user, shake_id)`.

use tokio::time::Instant;

use super::Outcome;
use crate::{
    base::shard::Shards,
    id::{ShakeId, UserId},
};

/// A finished shake's outcome and when it stops being kept.
#[derive(Debug)]
pub(super) struct Done {
    pub(super) outcome: Outcome,
    pub(super) expires: Instant,
}

/// Finished outcomes kept for retries of the same `(user, shake_id)`, sharded.
///
/// Hundreds of thousands of entries churn through it at a steady size (every shake adds
/// one, every sweep removes those past the retry window), so it is kept small and each
/// sweep rebuilds the shards it removed from (`retain_compact`) rather
/// than letting removal tombstones double the tables.
///
/// An entry is keyed by a 128-bit BLAKE3 digest of the user and shake ids rather than the
/// ids themselves: 16 bytes inline instead of two shared strings kept alive for the retry
/// window. Two different `(user, shake_id)` pairs share a digest with probability about
/// 2⁻¹²⁸ per pair, and finding such a pair on purpose is as hard as breaking BLAKE3.
#[derive(Debug, Default)]
pub(super) struct Outcomes {
    shards: Shards<hashbrown::HashMap<u128, Done>>,
}

impl Outcomes {
    pub(super) fn key(user: &UserId, shake_id: &ShakeId) -> u128 {
        let (user, shake) = (user.as_str().as_bytes(), shake_id.as_str().as_bytes());
        let mut h = blake3::Hasher::new();
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        h.update(&(user.len() as u64).to_le_bytes());
        h.update(user);
        h.update(shake);
        let digest = h.finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest.as_bytes()[..16]);
        u128::from_le_bytes(key)
    }

    fn shard(&self, key: u128) -> usize {
        self.shards.of((key >> 64) as u64)
    }

    /// The outcome of `(user, shake_id)` if it is still within its retry window.
    pub(super) fn get(&self, user: &UserId, shake_id: &ShakeId, now: Instant) -> Option<Outcome> {
        let key = Self::key(user, shake_id);
        let shard = self.shards.read(self.shard(key));
        shard
            .get(&key)
            .filter(|d| d.expires > now)
            .map(|d| d.outcome.clone())
    }

    pub(super) fn insert(&self, user: &UserId, shake_id: &ShakeId, done: Done) {
        let key = Self::key(user, shake_id);
        self.shards.write(self.shard(key)).insert(key, done);
    }

    pub(super) fn len(&self) -> usize {
        self.shards.sum(hashbrown::HashMap::len)
    }

    /// The outcome kept for `user`'s shake `shake_id`, if any and still in its window.
    #[cfg(test)]
    pub(super) fn kept(&self, user: &UserId, shake_id: &str) -> Option<Outcome> {
        let shake_id = ShakeId::new("shake_id", shake_id).ok()?;
        self.get(user, &shake_id, Instant::now())
    }

    /// Drops outcomes past their window, one shard at a time; returns how many.
    pub(super) fn sweep(&self, now: Instant) -> usize {
        self.shards.retain_compact(|_, d| d.expires > now)
    }
}
