//! The impossible-travel check: each user's last position (pings, searches and shakes
//! alike), to refuse jumps no traveller could make.

use std::hash::BuildHasher;

use h3o::LatLng;
use hashbrown::{DefaultHashBuilder, HashMap};

use crate::{
    base::shard::{SHARDS, Shards, shard_of},
    geo::distance_m,
};

/// Half the Earth's circumference: no two points are farther apart, metres.
const MAX_SURFACE_DISTANCE_M: f64 = 20_037_509.0;
/// Longest a position is remembered for the travel check, seconds. A move from a position
/// older than this is never refused: at 300 m/s that misses only jumps over 1 080 km made
/// in more than an hour, and it keeps the map to the users active in the last hour.
const TRAVEL_MEMORY_S: f64 = 3_600.0;

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

    pub(super) fn enabled(&self) -> bool {
        self.cfg.max_speed_mps > 0.0
    }

    /// How long a position is kept, seconds: until any jump from it is plausible, and at
    /// most [`TRAVEL_MEMORY_S`].
    /// Jumps up to this far are always allowed, metres.
    pub(super) fn max_jump_m(&self) -> f64 {
        self.cfg.max_jump_m
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

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
