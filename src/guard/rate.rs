//! Per-user token buckets: `burst` calls at once, refilled at `per_minute`.

use std::{hash::BuildHasher, time::Duration};

use hashbrown::{DefaultHashBuilder, HashMap};

use crate::base::shard::{SHARDS, Shards, shard_of};

/// A token bucket per user: `burst` calls at once, refilled at `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Calls allowed back to back; 0 disables the limit.
    pub burst: u32,
    /// Sustained calls per minute.
    pub per_minute: u32,
    /// Users tracked at most.
    pub max_tracked: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f32,
    at_ms: i64,
}

/// Outcome of [`RateLimiter::check`] for a call over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// When the next call will be allowed.
    pub retry_after: Duration,
}

/// Per-user token buckets, sharded.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateConfig,
    buckets: Shards<HashMap<u64, Bucket>>,
    hasher: DefaultHashBuilder,
}

impl RateLimiter {
    /// Limiter with `cfg`.
    pub fn new(cfg: RateConfig) -> Self {
        Self {
            cfg,
            buckets: Shards::default(),
            hasher: DefaultHashBuilder::default(),
        }
    }

    /// The limit's settings.
    pub fn config(&self) -> RateConfig {
        self.cfg
    }

    fn per_ms(&self) -> f64 {
        f64::from(self.cfg.per_minute) / 60_000.0
    }

    fn refilled(&self, b: Bucket, now_ms: i64) -> f64 {
        let elapsed = (now_ms - b.at_ms).max(0) as f64;
        (f64::from(b.tokens) + elapsed * self.per_ms()).min(f64::from(self.cfg.burst))
    }

    /// Takes one token for `user` at `now_ms`, or says when to retry.
    ///
    /// # Errors
    /// [`Throttled`] when the user's bucket is empty.
    pub fn check(&self, user: &str, now_ms: i64) -> Result<(), Throttled> {
        if self.cfg.burst == 0 {
            return Ok(());
        }
        let h = self.hasher.hash_one(user);
        let mut map = self.buckets.write(shard_of(h, SHARDS));
        let tokens = match map.get(&h) {
            Some(b) => self.refilled(*b, now_ms),
            None if map.len() >= self.cfg.max_tracked / SHARDS => return Ok(()),
            None => f64::from(self.cfg.burst),
        };
        if tokens >= 1.0 {
            map.insert(
                h,
                Bucket {
                    tokens: (tokens - 1.0) as f32,
                    at_ms: now_ms,
                },
            );
            return Ok(());
        }
        let per_ms = self.per_ms();
        let wait_ms = if per_ms > 0.0 {
            ((1.0 - tokens) / per_ms).ceil()
        } else {
            f64::from(u32::MAX)
        };
        Err(Throttled {
            retry_after: Duration::from_millis(wait_ms as u64),
        })
    }

    /// Forgets users whose bucket has refilled (they are as if never seen); returns how
    /// many.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let full = f64::from(self.cfg.burst);
        self.buckets
            .retain_compact(|_, b| self.refilled(*b, now_ms) < full)
    }

    /// Users tracked now.
    pub fn len(&self) -> usize {
        self.buckets.sum(HashMap::len)
    }

    /// Whether nobody is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn limiter(burst: u32, per_minute: u32, max_tracked: usize) -> RateLimiter {
        RateLimiter::new(RateConfig {
            burst,
            per_minute,
            max_tracked,
        })
    }

    #[test]
    fn a_burst_passes_then_calls_are_paced_with_a_retry_delay() {
        let l = limiter(3, 60, 1 << 20);
        for _ in 0..3 {
            assert_eq!(l.check("u", T0), Ok(()));
        }
        let t = l.check("u", T0).unwrap_err();
        assert_eq!(t.retry_after, Duration::from_secs(1));
        // Others are unaffected.
        assert_eq!(l.check("v", T0), Ok(()));
        // One token a second.
        assert!(l.check("u", T0 + 999).is_err());
        assert_eq!(l.check("u", T0 + 1_000), Ok(()));
        assert!(l.check("u", T0 + 1_000).is_err());
    }

    #[test]
    fn refilled_buckets_are_reclaimed_and_the_map_is_capped() {
        let l = limiter(2, 60, 2 * SHARDS);
        for i in 0..10_000 {
            let _ = l.check(&format!("user{i}"), T0);
        }
        assert!(l.len() <= 2 * SHARDS, "capped: {}", l.len());
        assert_eq!(l.sweep(T0 + 999), 0, "not refilled yet");
        let tracked = l.len();
        assert_eq!(l.sweep(T0 + 1_000), tracked);
        assert!(l.is_empty());
        assert_eq!(limiter(0, 0, 0).check("u", T0), Ok(()), "burst 0 disables");
    }
}
