//! Abuse controls: per-user rate limits and the impossible-travel check, applied to a
//! validated request before any work is done for it ([`Limits`]).
//!
//! Both key users by a 64-bit keyed hash of their id (seeded at start-up; no id is stored),
//! so an entry costs 24 bytes. Two users whose hashes collide would share an entry; with a
//! random 64-bit key that is about one chance in 10^7 for a million users at once.
//! Entries that no longer matter (a full bucket, a position old enough that any jump from
//! it is plausible) are reclaimed by [`RateLimiter::sweep`] / [`TravelGuard::sweep`], and
//! each map is capped: beyond the cap, new users are let through untracked rather than
//! refused, so a flood of fresh ids cannot lock real users out (it is counted instead).

use std::{fmt, hash::BuildHasher, sync::Arc, time::Duration};

use h3o::LatLng;
use hashbrown::{DefaultHashBuilder, HashMap};

use crate::{
    base::shard::{SHARDS, Shards, shard_of},
    error::{Error, Result},
    geo::{Coordinates, distance_m},
    id::UserId,
};

/// Half the Earth's circumference: no two points are farther apart, metres.
const MAX_SURFACE_DISTANCE_M: f64 = 20_037_509.0;
/// Longest a position is remembered for the travel check, seconds. A move from a position
/// older than this is never refused: at 300 m/s that misses only jumps over 1 080 km made
/// in more than an hour, and it keeps the map to the users active in the last hour.
const TRAVEL_MEMORY_S: f64 = 3_600.0;

/// A search or shake this close to the user's indexed position is represented by it.
const REPRESENTED_M: f64 = 1_000.0;

/// Where the index last placed a user, and when: the travel check's view of a pinging
/// user, so pings need no entry of their own.
pub type Known = Option<(LatLng, i64)>;

/// Where users last were, as another room holds it (the index): the travel check asks
/// it rather than keeping its own copy of every pinging user. The server injects it.
pub trait KnownPositions: Send + Sync + fmt::Debug {
    /// Where `user` was last placed and when (unix ms), unless nothing recent is held.
    fn known_position(&self, user: &UserId, now_ms: i64) -> Known;
}

/// Knows nobody: for controls without an index (tests, benches).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPositions;

impl KnownPositions for NoPositions {
    fn known_position(&self, _: &UserId, _: i64) -> Known {
        None
    }
}

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

/// When a move counts as impossible travel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TravelConfig {
    /// Jumps up to this far are always allowed (GPS and cell-tower noise), metres.
    pub max_jump_m: f64,
    /// Longer jumps must not be faster than this, m/s; 0 disables the check.
    pub max_speed_mps: f64,
    /// Users tracked at most.
    pub max_tracked: usize,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    lat: f32,
    lng: f32,
    at_s: u32,
}

/// A refused move.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jump {
    /// How far, metres.
    pub distance_m: f64,
    /// In how long, seconds.
    pub seconds: f64,
}

/// Each user's last position (pings, searches and shakes alike), to refuse jumps no
/// traveller could make.
#[derive(Debug)]
pub struct TravelGuard {
    cfg: TravelConfig,
    seen: Shards<HashMap<u64, Seen>>,
    hasher: DefaultHashBuilder,
}

impl TravelGuard {
    /// Guard with `cfg`.
    pub fn new(cfg: TravelConfig) -> Self {
        Self {
            cfg,
            seen: Shards::default(),
            hasher: DefaultHashBuilder::default(),
        }
    }

    fn enabled(&self) -> bool {
        self.cfg.max_speed_mps > 0.0
    }

    /// How long a position is kept, seconds: until any jump from it is plausible, and at
    /// most [`TRAVEL_MEMORY_S`].
    fn horizon_s(&self) -> f64 {
        (MAX_SURFACE_DISTANCE_M / self.cfg.max_speed_mps).min(TRAVEL_MEMORY_S)
    }

    /// Checks `user`'s move to `to` at `now_ms` against their last position, and records
    /// `to` when the move is plausible. A user with no recent position may be anywhere.
    ///
    /// # Errors
    /// [`Jump`] when the move is longer than the jump allowance and faster than the speed
    /// limit; nothing is recorded then.
    pub fn check(&self, user: &str, to: LatLng, now_ms: i64) -> Result<(), Jump> {
        self.check_with(user, to, now_ms, None, true)
    }

    /// [`Self::check`], also weighing `known` (a position and its unix ms held elsewhere,
    /// such as the user's indexed location) when it is more recent than this guard's own
    /// record, and recording `to` only if `record` (a ping's position is held by the index
    /// already, so pings cost this guard no memory).
    ///
    /// # Errors
    /// As [`Self::check`].
    pub fn check_with(
        &self,
        user: &str,
        to: LatLng,
        now_ms: i64,
        known: Option<(LatLng, i64)>,
        record: bool,
    ) -> Result<(), Jump> {
        if !self.enabled() {
            return Ok(());
        }
        let h = self.hasher.hash_one(user);
        let to_s = |ms: i64| (ms.max(0) / 1_000).min(i64::from(u32::MAX)) as u32;
        let now_s = to_s(now_ms);
        let mut map = self.seen.write(shard_of(h, SHARDS));
        let own = map.get(&h).and_then(|prev| {
            LatLng::new(f64::from(prev.lat), f64::from(prev.lng))
                .ok()
                .map(|p| (p, prev.at_s))
        });
        let known = known.map(|(p, ms)| (p, to_s(ms)));
        let last = match (own, known) {
            (Some(a), Some(b)) => Some(if b.1 > a.1 { b } else { a }),
            (a, b) => a.or(b),
        };
        if let Some((from, at_s)) = last {
            let d = distance_m(from, to);
            let seconds = f64::from(now_s.saturating_sub(at_s));
            if d > self.cfg.max_jump_m
                && d > self.cfg.max_speed_mps * seconds
                && seconds < self.horizon_s()
            {
                return Err(Jump {
                    distance_m: d,
                    seconds,
                });
            }
        }
        if !record || (own.is_none() && map.len() >= self.cfg.max_tracked / SHARDS) {
            return Ok(());
        }
        map.insert(
            h,
            Seen {
                lat: to.lat() as f32,
                lng: to.lng() as f32,
                at_s: now_s,
            },
        );
        Ok(())
    }

    /// Forgets positions old enough that any move from them is plausible; returns how
    /// many.
    pub fn sweep(&self, now_ms: i64) -> usize {
        if !self.enabled() {
            return 0;
        }
        let now_s = now_ms.max(0) as f64 / 1_000.0;
        let horizon = self.horizon_s();
        self.seen
            .retain_compact(|_, s| now_s - f64::from(s.at_s) < horizon)
    }

    /// Users tracked now.
    pub fn len(&self) -> usize {
        self.seen.sum(HashMap::len)
    }

    /// Whether nobody is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Settings of every abuse control.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    /// SearchNearby calls per user.
    pub search: RateConfig,
    /// Shake calls per user.
    pub shake: RateConfig,
    /// The impossible-travel check.
    pub travel: TravelConfig,
}

impl Default for GuardConfig {
    /// Search 40 at once then 30 a minute, Shake 20 then 20 a minute, jumps beyond 5 km
    /// faster than 300 m/s refused; each control tracks up to a million users.
    fn default() -> Self {
        const MAX_TRACKED: usize = 1_000_000;
        let rate = |burst, per_minute| RateConfig {
            burst,
            per_minute,
            max_tracked: MAX_TRACKED,
        };
        Self {
            search: rate(40, 30),
            shake: rate(20, 20),
            travel: TravelConfig {
                max_jump_m: 5_000.0,
                max_speed_mps: 300.0,
                max_tracked: MAX_TRACKED,
            },
        }
    }
}

/// The abuse controls the services apply, as domain errors.
#[derive(Debug)]
pub struct Limits {
    /// SearchNearby calls per user.
    pub search: RateLimiter,
    /// Shake calls per user.
    pub shake: RateLimiter,
    /// Positions of pings, searches and shakes alike.
    pub travel: TravelGuard,
    /// Users' indexed positions, for the travel check.
    known: Arc<dyn KnownPositions>,
}

impl Limits {
    /// Controls with these settings, asking `known` for users' indexed positions.
    pub fn new(cfg: GuardConfig, known: Arc<dyn KnownPositions>) -> Self {
        Self {
            search: RateLimiter::new(cfg.search),
            shake: RateLimiter::new(cfg.shake),
            travel: TravelGuard::new(cfg.travel),
            known,
        }
    }

    /// The user's indexed position, looked up only when the travel check is on.
    fn known(&self, user: &UserId, now_ms: i64) -> Known {
        if self.travel.enabled() {
            self.known.known_position(user, now_ms)
        } else {
            None
        }
    }

    fn travel(
        &self,
        user: &UserId,
        at: &Coordinates,
        now_ms: i64,
        known: Known,
        record: bool,
    ) -> Result<()> {
        self.travel
            .check_with(user.as_str(), at.latlng(), now_ms, known, record)
            .map_err(|j| Error::ImpossibleTravel {
                distance_m: j.distance_m,
                seconds: j.seconds,
            })
    }

    /// A location ping: the travel check against the user's indexed location and last
    /// search or shake. Records nothing: the index will hold the ping.
    ///
    /// # Errors
    /// [`Error::ImpossibleTravel`].
    pub fn ping(&self, user: &UserId, at: &Coordinates, now_ms: i64) -> Result<()> {
        let known = self.known(user, now_ms);
        self.travel(user, at, now_ms, known, false)
    }

    /// A search: the rate limit, then the travel check.
    ///
    /// # Errors
    /// [`Error::RateLimited`] or [`Error::ImpossibleTravel`].
    pub fn search(&self, user: &UserId, at: &Coordinates, now_ms: i64) -> Result<()> {
        rate(&self.search, "SearchNearby", user, now_ms)?;
        let known = self.known(user, now_ms);
        let record = self.worth_recording(at, known);
        self.travel(user, at, now_ms, known, record)
    }

    /// A shake: the rate limit, then the travel check.
    ///
    /// # Errors
    /// [`Error::RateLimited`] or [`Error::ImpossibleTravel`].
    pub fn shake(&self, user: &UserId, at: &Coordinates, now_ms: i64) -> Result<()> {
        rate(&self.shake, "Shake", user, now_ms)?;
        let known = self.known(user, now_ms);
        let record = self.worth_recording(at, known);
        self.travel(user, at, now_ms, known, record)
    }

    /// Whether a search or shake at `at` tells the travel check more than the user's
    /// indexed position does: a user searching where they pinged (the usual case) costs
    /// the guard no memory. Positions within [`REPRESENTED_M`] (or half the jump
    /// allowance, if smaller) of the indexed one are represented by it.
    fn worth_recording(&self, at: &Coordinates, known: Known) -> bool {
        let within = REPRESENTED_M.min(self.travel.cfg.max_jump_m / 2.0);
        known.is_none_or(|(p, _)| distance_m(p, at.latlng()) > within)
    }

    /// Reclaims entries that no longer matter; returns how many.
    pub fn sweep(&self, now_ms: i64) -> usize {
        self.search.sweep(now_ms) + self.shake.sweep(now_ms) + self.travel.sweep(now_ms)
    }
}

fn rate(l: &RateLimiter, what: &'static str, user: &UserId, now_ms: i64) -> Result<()> {
    l.check(user.as_str(), now_ms)
        .map_err(|t| Error::RateLimited {
            what,
            retry_after: t.retry_after,
        })
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

    fn guard(max_speed_mps: f64) -> TravelGuard {
        TravelGuard::new(TravelConfig {
            max_jump_m: 5_000.0,
            max_speed_mps,
            max_tracked: 1 << 20,
        })
    }

    fn ll(lat: f64, lng: f64) -> LatLng {
        LatLng::new(lat, lng).unwrap()
    }

    const SHANGHAI: (f64, f64) = (31.2304, 121.4737);
    const BEIJING: (f64, f64) = (39.9042, 116.4074);

    #[test]
    fn jumps_faster_than_an_airliner_are_refused_and_not_recorded() {
        let g = guard(300.0);
        assert_eq!(g.check("u", ll(SHANGHAI.0, SHANGHAI.1), T0), Ok(()));
        // Shanghai to Beijing (1 068 km) in ten minutes: refused, position unchanged.
        let jump = g
            .check("u", ll(BEIJING.0, BEIJING.1), T0 + 600_000)
            .unwrap_err();
        assert!((jump.distance_m - 1_068_000.0).abs() < 5_000.0);
        assert_eq!(jump.seconds, 600.0);
        // A short hop (GPS noise) is fine at any speed.
        assert_eq!(
            g.check("u", ll(SHANGHAI.0 + 0.03, SHANGHAI.1), T0 + 1_000),
            Ok(())
        );
        // A phone off for hours reappears in another city: fine.
        assert_eq!(
            g.check("u", ll(BEIJING.0, BEIJING.1), T0 + 4 * 3_600_000),
            Ok(())
        );
        // Back to Shanghai an hour and a half later (200 m/s): fine too.
        assert_eq!(
            g.check(
                "u",
                ll(SHANGHAI.0, SHANGHAI.1),
                T0 + 4 * 3_600_000 + 5_400_000
            ),
            Ok(())
        );
        // A user never seen may be anywhere.
        assert_eq!(g.check("v", ll(BEIJING.0, BEIJING.1), T0), Ok(()));
    }

    #[test]
    fn a_known_position_counts_when_newer_and_pings_record_nothing() {
        let g = guard(300.0);
        let shanghai = ll(SHANGHAI.0, SHANGHAI.1);
        let beijing = ll(BEIJING.0, BEIJING.1);
        // A ping checked against the index's position: refused, and nothing recorded.
        let known = Some((shanghai, T0));
        assert!(
            g.check_with("u", beijing, T0 + 60_000, known, false)
                .is_err()
        );
        assert_eq!(
            g.check_with("u", shanghai, T0 + 60_000, known, false),
            Ok(())
        );
        assert!(g.is_empty(), "pings cost the guard nothing");
        // A search from Beijing hours later is recorded; a ping from Shanghai a minute
        // after it is checked against the search (newer than the index's position).
        let later = T0 + 5 * 3_600_000;
        assert_eq!(g.check_with("u", beijing, later, known, true), Ok(()));
        assert!(
            g.check_with("u", shanghai, later + 60_000, known, false)
                .is_err()
        );
        // Once the index holds a newer position, that one counts.
        let moved = Some((shanghai, later + 4 * 3_600_000));
        assert_eq!(
            g.check_with("u", shanghai, later + 4 * 3_600_000 + 1_000, moved, false),
            Ok(())
        );
    }

    #[test]
    fn speed_zero_disables_and_old_positions_are_reclaimed() {
        let off = guard(0.0);
        off.check("u", ll(SHANGHAI.0, SHANGHAI.1), T0).unwrap();
        off.check("u", ll(BEIJING.0, BEIJING.1), T0 + 1).unwrap();
        assert!(off.is_empty());

        let g = guard(300.0);
        g.check("u", ll(SHANGHAI.0, SHANGHAI.1), T0).unwrap();
        let horizon_ms = (TRAVEL_MEMORY_S * 1_000.0) as i64;
        assert_eq!(g.sweep(T0 + horizon_ms - 2_000), 0);
        assert_eq!(g.sweep(T0 + horizon_ms + 1_000), 1);
        assert!(g.is_empty());
    }
}
