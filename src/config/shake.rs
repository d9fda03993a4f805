//! Shake flags: the window, how long outcomes are kept, bucket resolution, reach and
//! excludes; they make the matcher's settings.

use anyhow::bail;
use clap::Args;
use h3o::Resolution;

use super::{MAX_REACH_M, human::Human, longer_than_zero, positive_m, resolution};
use crate::{geo::value::RadiusRule, shake::ShakeConfig};

/// The matcher's flags; defaults from [`ShakeConfig::default`] and [`RadiusRule::SHAKE`].
#[derive(Debug, Clone, Args)]
pub struct ShakeArgs {
    /// How long a shake waits for a partner (e.g. 2s, 500ms).
    #[arg(long, env = "GEOMATCH_SHAKE_WINDOW", default_value_t = Human(ShakeConfig::default().window))]
    pub shake_window: Human,

    /// How long a finished shake's outcome is kept for retries of the same shake_id.
    #[arg(long, env = "GEOMATCH_SHAKE_RESULT_TTL", default_value_t = Human(ShakeConfig::default().result_ttl))]
    pub shake_result_ttl: Human,

    /// H3 resolution of the buckets waiting shakes are kept in (7: average edge 1.2 km).
    /// 5..=privacy resolution.
    #[arg(long, env = "GEOMATCH_SHAKE_RESOLUTION", default_value_t = u8::from(ShakeConfig::default().bucket_resolution))]
    pub shake_resolution: u8,

    /// Shake max_distance_m used when a request gives 0, metres.
    #[arg(long, env = "GEOMATCH_DEFAULT_SHAKE_DISTANCE_M", default_value_t = RadiusRule::SHAKE.default_m)]
    pub default_shake_distance_m: f64,

    /// Largest Shake max_distance_m, metres; larger requests get INVALID_ARGUMENT.
    #[arg(long, env = "GEOMATCH_MAX_SHAKE_DISTANCE_M", default_value_t = RadiusRule::SHAKE.max_m)]
    pub max_shake_distance_m: f64,

    /// Most exclude_user_ids one shake may carry.
    #[arg(long, env = "GEOMATCH_MAX_SHAKE_EXCLUDES", default_value_t = ShakeConfig::default().max_excludes)]
    pub max_shake_excludes: usize,
}

impl ShakeArgs {
    /// The matcher's settings, snapping to privacy cells of resolution `privacy`.
    ///
    /// # Errors
    /// A one-line reason naming the flag and its bad value.
    pub fn settings(&self, privacy: Resolution) -> anyhow::Result<ShakeConfig> {
        let bucket = resolution("--shake-resolution", self.shake_resolution)?;
        if bucket < Resolution::Five || bucket > privacy {
            bail!(
                "--shake-resolution {}: must be within 5..=--privacy-resolution ({})",
                self.shake_resolution,
                u8::from(privacy)
            );
        }
        longer_than_zero("--shake-window", self.shake_window.get())?;
        positive_m("--default-shake-distance-m", self.default_shake_distance_m)?;
        positive_m("--max-shake-distance-m", self.max_shake_distance_m)?;
        if self.max_shake_distance_m > MAX_REACH_M {
            bail!(
                "--max-shake-distance-m {}: at most 100000 m",
                self.max_shake_distance_m
            );
        }
        if self.default_shake_distance_m > self.max_shake_distance_m {
            bail!(
                "--default-shake-distance-m {}: must not exceed --max-shake-distance-m {}",
                self.default_shake_distance_m,
                self.max_shake_distance_m
            );
        }
        Ok(ShakeConfig {
            privacy_resolution: privacy,
            bucket_resolution: bucket,
            window: self.shake_window.get(),
            result_ttl: self.shake_result_ttl.get(),
            max_distance: RadiusRule {
                default_m: self.default_shake_distance_m,
                max_m: self.max_shake_distance_m,
                ..RadiusRule::SHAKE
            },
            max_excludes: self.max_shake_excludes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    #[test]
    fn bad_values_are_named() {
        for (args, needle) in [
            (&["--shake-resolution", "10"][..], "--shake-resolution 10"),
            (&["--shake-resolution", "4"][..], "--shake-resolution 4"),
            (&["--shake-window", "0s"][..], "--shake-window"),
            (
                &["--max-shake-distance-m", "200000"][..],
                "--max-shake-distance-m 200000",
            ),
            (
                &["--default-shake-distance-m", "60000"][..],
                "--default-shake-distance-m 60000",
            ),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
