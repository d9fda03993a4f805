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

mod rate;
mod travel;

use std::{fmt, sync::Arc};

use h3o::LatLng;

pub use rate::{RateConfig, RateLimiter, Throttled};
pub use travel::{Jump, TravelConfig, TravelGuard};

use crate::{
    error::{Error, Result},
    geo::{Coordinates, distance_m},
    id::UserId,
};

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
    /// Users' indexed positions, for the travel check; `None` when the index is remote
    /// (a store round trip per request), and then pings are recorded here instead.
    known: Option<Arc<dyn KnownPositions>>,
    /// Whether the SearchNearby and Shake rate limits are applied elsewhere (by a store
    /// every replica shares), so this guard skips its own.
    shared_rates: bool,
}

impl Limits {
    /// Controls with these settings, asking `known` for users' indexed positions (or, when
    /// `None`, remembering pings' positions themselves).
    pub fn new(cfg: GuardConfig, known: Option<Arc<dyn KnownPositions>>) -> Self {
        Self {
            search: RateLimiter::new(cfg.search),
            shake: RateLimiter::new(cfg.shake),
            travel: TravelGuard::new(cfg.travel),
            known,
            shared_rates: false,
        }
    }

    /// The same controls, with the SearchNearby and Shake rate limits left to a store
    /// every replica shares (so N replicas do not allow N times the rate).
    pub fn with_shared_rates(mut self) -> Self {
        self.shared_rates = true;
        self
    }

    /// The user's indexed position, looked up only when the travel check is on.
    fn known(&self, user: &UserId, now_ms: i64) -> Known {
        if self.travel.enabled() {
            self.known.as_ref()?.known_position(user, now_ms)
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
    /// search or shake. Records nothing when the index is local (it holds the ping).
    ///
    /// # Errors
    /// [`Error::ImpossibleTravel`].
    pub fn ping(&self, user: &UserId, at: &Coordinates, now_ms: i64) -> Result<()> {
        let known = self.known(user, now_ms);
        self.travel(user, at, now_ms, known, self.known.is_none())
    }

    /// A search: the rate limit, then the travel check.
    ///
    /// # Errors
    /// [`Error::RateLimited`] or [`Error::ImpossibleTravel`].
    pub fn search(&self, user: &UserId, at: &Coordinates, now_ms: i64) -> Result<()> {
        if !self.shared_rates {
            rate(&self.search, "SearchNearby", user, now_ms)?;
        }
        let known = self.known(user, now_ms);
        let record = self.worth_recording(at, known);
        self.travel(user, at, now_ms, known, record)
    }

    /// A shake: the rate limit, then the travel check.
    ///
    /// # Errors
    /// [`Error::RateLimited`] or [`Error::ImpossibleTravel`].
    pub fn shake(&self, user: &UserId, at: &Coordinates, now_ms: i64) -> Result<()> {
        if !self.shared_rates {
            rate(&self.shake, "Shake", user, now_ms)?;
        }
        let known = self.known(user, now_ms);
        let record = self.worth_recording(at, known);
        self.travel(user, at, now_ms, known, record)
    }

    /// Whether a search or shake at `at` tells the travel check more than the user's
    /// indexed position does: a user searching where they pinged (the usual case) costs
    /// the guard no memory. Positions within [`REPRESENTED_M`] (or half the jump
    /// allowance, if smaller) of the indexed one are represented by it.
    fn worth_recording(&self, at: &Coordinates, known: Known) -> bool {
        let within = REPRESENTED_M.min(self.travel.max_jump_m() / 2.0);
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
