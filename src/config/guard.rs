//! Abuse-control flags: the impossible-travel check and the per-user rate limits.

use anyhow::bail;
use clap::Args;

use super::human::Distance;
use crate::guard::{GuardConfig, RateConfig, TravelConfig};

/// The abuse controls' flags; defaults from [`GuardConfig::default`].
#[derive(Debug, Clone, Args)]
pub struct GuardArgs {
    /// Jumps up to this far are never impossible travel (GPS and cell-tower noise), e.g.
    /// 5km or 800m.
    #[arg(long, env = "GEOMATCH_MAX_JUMP", default_value_t = Distance(GuardConfig::default().travel.max_jump_m))]
    pub max_jump: Distance,

    /// Longer jumps faster than this many m/s (since the user's last ping, search or
    /// shake) are refused with FAILED_PRECONDITION; 0 disables the check.
    #[arg(long, env = "GEOMATCH_MAX_SPEED", default_value_t = GuardConfig::default().travel.max_speed_mps)]
    pub max_speed: f64,

    /// SearchNearby calls a user may make back to back (token bucket); 0 disables.
    #[arg(long, env = "GEOMATCH_SEARCH_BURST", default_value_t = GuardConfig::default().search.burst)]
    pub search_burst: u32,

    /// SearchNearby calls per user per minute, sustained.
    #[arg(long, env = "GEOMATCH_SEARCH_PER_MINUTE", default_value_t = GuardConfig::default().search.per_minute)]
    pub search_per_minute: u32,

    /// Shake calls a user may make back to back (token bucket); 0 disables.
    #[arg(long, env = "GEOMATCH_SHAKE_BURST", default_value_t = GuardConfig::default().shake.burst)]
    pub shake_burst: u32,

    /// Shake calls per user per minute, sustained.
    #[arg(long, env = "GEOMATCH_SHAKE_PER_MINUTE", default_value_t = GuardConfig::default().shake.per_minute)]
    pub shake_per_minute: u32,

    /// Users each abuse control (each rate limit, the travel check) tracks at most;
    /// beyond it new users pass untracked (never refused).
    #[arg(long, env = "GEOMATCH_MAX_TRACKED_USERS", default_value_t = GuardConfig::default().travel.max_tracked)]
    pub max_tracked_users: usize,
}

impl GuardArgs {
    /// The abuse controls' settings.
    ///
    /// # Errors
    /// When `--max-speed` is negative or not a number.
    pub fn settings(&self) -> anyhow::Result<GuardConfig> {
        if !self.max_speed.is_finite() || self.max_speed < 0.0 {
            bail!(
                "--max-speed {}: must be a speed in m/s >= 0",
                self.max_speed
            );
        }
        let rate = |burst, per_minute| RateConfig {
            burst,
            per_minute,
            max_tracked: self.max_tracked_users,
        };
        Ok(GuardConfig {
            search: rate(self.search_burst, self.search_per_minute),
            shake: rate(self.shake_burst, self.shake_per_minute),
            travel: TravelConfig {
                max_jump_m: self.max_jump.m(),
                max_speed_mps: self.max_speed,
                max_tracked: self.max_tracked_users,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    #[test]
    fn guard_values_are_checked_and_converted() {
        let (_, s) = parse(&["--max-jump", "800m", "--search-burst", "0"]).unwrap();
        assert_eq!(s.guard.travel.max_jump_m, 800.0);
        assert_eq!(s.guard.search.burst, 0);
        let err = parse(&["--max-speed=-1"]).unwrap_err().to_string();
        assert!(err.contains("--max-speed -1"), "{err}");
        let err = parse(&["--max-jump", "far"]).unwrap_err().to_string();
        assert!(err.contains("far"), "{err}");
    }
}
