//! People Nearby flags: time to live, search radius and page size, and capacity; with the
//! watch flags ([`WatchArgs`]) they make the index's settings.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use h3o::Resolution;

use super::{MAX_REACH_M, WatchArgs, human::Human, longer_than_zero, positive_m};
use crate::{
    geo::value::{PageRule, RadiusRule, TtlRule},
    nearby::NearbyConfig,
};

/// A quarter of the machine's memory at 256 bytes per user (10 M when unknown).
fn default_max_users() -> usize {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
    });
    total_kib.map_or(10_000_000, |kib| (kib * 1024 / 4 / 256) as usize)
}

/// The index's flags; defaults from [`TtlRule::default`], [`RadiusRule::SEARCH`] and
/// [`PageRule::default`].
#[derive(Debug, Clone, Args)]
pub struct NearbyArgs {
    /// How long a location ping stays visible after the user's last update (e.g. 15m, 90s).
    #[arg(long, env = "GEOMATCH_LOCATION_TTL", default_value_t = Human(TtlRule::default().default))]
    pub location_ttl: Human,

    /// Longest per-ping time to live (`ttl_s`) a client may ask for (at most 49 days).
    #[arg(long, env = "GEOMATCH_MAX_LOCATION_TTL", default_value_t = Human(TtlRule::default().max))]
    pub max_location_ttl: Human,

    /// SearchNearby radius used when a request gives 0, metres.
    #[arg(long, env = "GEOMATCH_DEFAULT_RADIUS_M", default_value_t = RadiusRule::SEARCH.default_m)]
    pub default_radius_m: f64,

    /// Largest SearchNearby radius, metres; larger requests get INVALID_ARGUMENT.
    #[arg(long, env = "GEOMATCH_MAX_RADIUS_M", default_value_t = RadiusRule::SEARCH.max_m)]
    pub max_radius_m: f64,

    /// SearchNearby page size used when a request gives 0.
    #[arg(long, env = "GEOMATCH_DEFAULT_LIMIT", default_value_t = PageRule::default().default)]
    pub default_limit: u32,

    /// Largest SearchNearby page size; larger requests get INVALID_ARGUMENT.
    #[arg(long, env = "GEOMATCH_MAX_LIMIT", default_value_t = PageRule::default().max)]
    pub max_limit: u32,

    /// Most users the index holds; pings from new users beyond it get RESOURCE_EXHAUSTED
    /// while existing users keep updating. Default: a quarter of this machine's memory at
    /// 256 bytes per user.
    #[arg(long, env = "GEOMATCH_MAX_USERS", default_value_t = default_max_users())]
    pub max_users: usize,

    /// WatchNearby streams.
    #[command(flatten)]
    pub watch: WatchArgs,
}

impl NearbyArgs {
    /// The index's settings, with privacy cells of resolution `privacy`.
    ///
    /// # Errors
    /// A one-line reason naming the flag and its bad value.
    pub fn settings(&self, privacy: Resolution) -> anyhow::Result<NearbyConfig> {
        let (ttl, max_ttl) = (self.location_ttl.get(), self.max_location_ttl.get());
        longer_than_zero("--location-ttl", ttl)?;
        // Time to live is stored in 32 bits of ms per user: 2^32 - 1 ms, 49 days and 17 h.
        let ttl_cap = Duration::from_millis(u64::from(u32::MAX));
        for (flag, given) in [
            ("--location-ttl", self.location_ttl),
            ("--max-location-ttl", self.max_location_ttl),
        ] {
            if given.get() > ttl_cap {
                // Whole days as days ("50d"), as people write a long time to live.
                let secs = given.get().as_secs();
                let shown = if secs % 86_400 == 0 && given.get().subsec_nanos() == 0 {
                    format!("{}d", secs / 86_400)
                } else {
                    given.to_string()
                };
                bail!("{flag} {shown}: must be at most 49 days (49d 17h 2m 47s)");
            }
        }
        if ttl > max_ttl {
            bail!(
                "--location-ttl {}: must be at most --max-location-ttl ({})",
                self.location_ttl,
                self.max_location_ttl
            );
        }
        positive_m("--default-radius-m", self.default_radius_m)?;
        positive_m("--max-radius-m", self.max_radius_m)?;
        if self.default_radius_m > self.max_radius_m {
            bail!(
                "--default-radius-m {}: must not exceed --max-radius-m {}",
                self.default_radius_m,
                self.max_radius_m
            );
        }
        if self.max_radius_m > MAX_REACH_M {
            bail!("--max-radius-m {}: at most 100000 m", self.max_radius_m);
        }
        if self.max_limit == 0 {
            bail!("--max-limit 0: must be at least 1");
        }
        if self.max_limit > 10_000 {
            bail!("--max-limit {}: at most 10000", self.max_limit);
        }
        if self.default_limit == 0 {
            bail!("--default-limit 0: must be at least 1");
        }
        if self.default_limit > self.max_limit {
            // Either flag may be the one the operator set: name both, and what to do.
            bail!(
                "--max-limit {} is below --default-limit {}: raise --max-limit or lower \
                 --default-limit",
                self.max_limit,
                self.default_limit
            );
        }
        if self.max_users == 0 {
            bail!("--max-users 0: must be at least 1");
        }
        Ok(NearbyConfig {
            privacy_resolution: privacy,
            ttl: TtlRule {
                default: ttl,
                max: max_ttl,
            },
            radius: RadiusRule {
                default_m: self.default_radius_m,
                max_m: self.max_radius_m,
                ..RadiusRule::SEARCH
            },
            page: PageRule {
                default: self.default_limit,
                max: self.max_limit,
            },
            max_users: self.max_users,
            watch: self.watch.settings()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    #[test]
    fn bad_values_are_named() {
        for (args, needle) in [
            (&["--max-radius-m=-1"][..], "--max-radius-m"),
            (&["--max-radius-m", "200000"][..], "--max-radius-m 200000"),
            (&["--default-limit", "500"][..], "--default-limit 500"),
            (&["--max-limit", "0"][..], "--max-limit 0"),
            (&["--max-limit", "20000"][..], "--max-limit 20000"),
            (&["--location-ttl", "soon"][..], "soon"),
            (&["--location-ttl", "0"][..], "--location-ttl 0"),
            (&["--location-ttl", "80h"][..], "--max-location-ttl"),
            (&["--max-location-ttl", "50days"][..], "--max-location-ttl"),
            (&["--max-users", "0"][..], "--max-users 0"),
            (
                &["--max-limit", "10"][..],
                "--max-limit 10 is below --default-limit 20",
            ),
            (
                &["--max-location-ttl", "50d"][..],
                "--max-location-ttl 50d:",
            ),
            (&["--location-ttl", "1300h"][..], "--location-ttl 1300h:"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        // The cap is said in days, as --help says it, not as a count of seconds.
        let err = parse(&["--max-location-ttl", "50d"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("49 days") && !err.contains("4294967"), "{err}");
    }
}
