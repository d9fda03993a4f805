//! Configuration: every flag has a `GEOMATCH_*` environment equivalent and a default that
//! `geomatch --help` shows. [`Config::validate`] names the bad value before anything binds.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use h3o::Resolution;

use crate::{
    nearby::{NearbyConfig, WatchConfig},
    shake::ShakeConfig,
};

/// A share: "10%" or "0.1".
fn fraction(s: &str) -> Result<f64, String> {
    let (number, scale) = match s.strip_suffix('%') {
        Some(p) => (p, 100.0),
        None => (s, 1.0),
    };
    let v: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a share such as 10% or 0.1"))?;
    let v = v / scale;
    if !(0.0..=10.0).contains(&v) {
        return Err(format!("{s:?}: must be between 0% and 1000%"));
    }
    Ok(v)
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// geomatch: People Nearby and Shake over gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "geomatch", version, about, long_about = None)]
pub struct Config {
    /// gRPC listen address (port 0 picks a free port and logs it).
    #[arg(long, env = "GEOMATCH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// How long a location ping stays visible after the user's last update (e.g. 15m, 90s).
    #[arg(long, env = "GEOMATCH_LOCATION_TTL", default_value = "15m", value_parser = duration)]
    pub location_ttl: Duration,

    /// Longest per-ping time to live (`ttl_s`) a client may ask for (at most 49 days).
    #[arg(long, env = "GEOMATCH_MAX_LOCATION_TTL", default_value = "72h", value_parser = duration)]
    pub max_location_ttl: Duration,

    /// How long a shake waits for a partner (e.g. 2s, 500ms).
    #[arg(long, env = "GEOMATCH_SHAKE_WINDOW", default_value = "2s", value_parser = duration)]
    pub shake_window: Duration,

    /// How long a finished shake's outcome is kept for retries of the same shake_id.
    #[arg(long, env = "GEOMATCH_SHAKE_RESULT_TTL", default_value = "60s", value_parser = duration)]
    pub shake_result_ttl: Duration,

    /// How often expired pings and old shake outcomes are reclaimed.
    #[arg(long, env = "GEOMATCH_SWEEP_INTERVAL", default_value = "10s", value_parser = duration)]
    pub sweep_interval: Duration,

    /// H3 resolution positions are snapped to before any distance is measured or shown
    /// (9: cells of ~0.1 km², average edge 201 m). 5..=10.
    #[arg(long, env = "GEOMATCH_PRIVACY_RESOLUTION", default_value_t = 9)]
    pub privacy_resolution: u8,

    /// H3 resolution of the buckets waiting shakes are kept in (7: average edge 1.2 km).
    /// 5..=privacy resolution.
    #[arg(long, env = "GEOMATCH_SHAKE_RESOLUTION", default_value_t = 7)]
    pub shake_resolution: u8,

    /// SearchNearby radius used when a request gives 0, metres.
    #[arg(long, env = "GEOMATCH_DEFAULT_RADIUS_M", default_value_t = 1_000.0)]
    pub default_radius_m: f64,

    /// Largest SearchNearby radius, metres; larger requests get INVALID_ARGUMENT.
    #[arg(long, env = "GEOMATCH_MAX_RADIUS_M", default_value_t = 10_000.0)]
    pub max_radius_m: f64,

    /// SearchNearby page size used when a request gives 0.
    #[arg(long, env = "GEOMATCH_DEFAULT_LIMIT", default_value_t = 20)]
    pub default_limit: u32,

    /// Largest SearchNearby page size; larger requests get INVALID_ARGUMENT.
    #[arg(long, env = "GEOMATCH_MAX_LIMIT", default_value_t = 100)]
    pub max_limit: u32,

    /// Shake max_distance_m used when a request gives 0, metres.
    #[arg(
        long,
        env = "GEOMATCH_DEFAULT_SHAKE_DISTANCE_M",
        default_value_t = 1_000.0
    )]
    pub default_shake_distance_m: f64,

    /// Largest Shake max_distance_m, metres; larger requests get INVALID_ARGUMENT.
    #[arg(
        long,
        env = "GEOMATCH_MAX_SHAKE_DISTANCE_M",
        default_value_t = 50_000.0
    )]
    pub max_shake_distance_m: f64,

    /// Most exclude_user_ids one shake may carry.
    #[arg(long, env = "GEOMATCH_MAX_SHAKE_EXCLUDES", default_value_t = 1_000)]
    pub max_shake_excludes: usize,

    /// Prometheus metrics listen address, serving `/metrics` over HTTP (off when not given;
    /// port 0 picks a free port and logs it).
    #[arg(long, env = "GEOMATCH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Largest request message accepted, bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "GEOMATCH_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024)]
    pub max_message_bytes: usize,

    /// Most Nearby calls served at once; beyond it calls are shed at once with
    /// RESOURCE_EXHAUSTED instead of queueing.
    #[arg(
        long,
        env = "GEOMATCH_MAX_CONCURRENT_REQUESTS",
        default_value_t = 4_096
    )]
    pub max_concurrent_requests: usize,

    /// Most Shake calls in flight at once (each waits up to the shake window); beyond it
    /// calls are shed at once with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "GEOMATCH_MAX_CONCURRENT_SHAKES",
        default_value_t = 200_000
    )]
    pub max_concurrent_shakes: usize,

    /// WatchNearby hysteresis: a user who entered leaves only beyond the radius plus this
    /// share of it (e.g. 10% or 0.1), and at least one privacy cell's width.
    #[arg(long, env = "GEOMATCH_WATCH_HYSTERESIS", default_value = "10%", value_parser = fraction)]
    pub watch_hysteresis: f64,

    /// Events a WatchNearby stream may have queued; a consumer further behind has its
    /// stream ended with RESOURCE_EXHAUSTED.
    #[arg(long, env = "GEOMATCH_WATCH_BUFFER", default_value_t = 1_024)]
    pub watch_buffer: usize,

    /// WatchNearby streams open at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "GEOMATCH_MAX_WATCHES", default_value_t = 65_536)]
    pub max_watches: usize,

    /// Interval of HTTP/2 keepalive pings to idle clients.
    #[arg(long, env = "GEOMATCH_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "GEOMATCH_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub keepalive_timeout: Duration,

    /// Snapshot file of the People Nearby index: loaded at start (dropping pings that
    /// expired meanwhile), written every --snapshot-interval and on graceful shutdown.
    /// Off when not given.
    #[arg(long, env = "GEOMATCH_SNAPSHOT")]
    pub snapshot: Option<PathBuf>,

    /// How often the snapshot is written (with --snapshot).
    #[arg(long, env = "GEOMATCH_SNAPSHOT_INTERVAL", default_value = "60s", value_parser = duration)]
    pub snapshot_interval: Duration,

    /// Start empty (with a warning, moving the bad file to <path>.corrupt) instead of
    /// refusing to start when the snapshot is corrupt or of an unknown version.
    #[arg(long, env = "GEOMATCH_SNAPSHOT_IGNORE_CORRUPT")]
    pub snapshot_ignore_corrupt: bool,

    /// On SIGINT/SIGTERM, how long in-flight calls and open streams may take to finish
    /// before the remaining connections are closed.
    #[arg(long, env = "GEOMATCH_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// Log format.
    #[arg(long, env = "GEOMATCH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

fn resolution(flag: &str, value: u8) -> anyhow::Result<Resolution> {
    Resolution::try_from(value).with_context(|| format!("{flag} {value}: not an H3 resolution"))
}

fn positive(flag: &str, value: f64) -> anyhow::Result<()> {
    if !value.is_finite() || value <= 0.0 {
        bail!("{flag} {value}: must be a positive number of metres");
    }
    Ok(())
}

impl Config {
    /// Checks values clap cannot check alone.
    ///
    /// # Errors
    /// A one-line reason naming the flag and its bad value.
    pub fn validate(&self) -> anyhow::Result<()> {
        let privacy = resolution("--privacy-resolution", self.privacy_resolution)?;
        let shake = resolution("--shake-resolution", self.shake_resolution)?;
        if !(Resolution::Five..=Resolution::Ten).contains(&privacy) {
            bail!(
                "--privacy-resolution {}: must be within 5..=10",
                self.privacy_resolution
            );
        }
        if shake < Resolution::Five || shake > privacy {
            bail!(
                "--shake-resolution {}: must be within 5..=--privacy-resolution ({})",
                self.shake_resolution,
                self.privacy_resolution
            );
        }
        for (flag, d) in [
            ("--location-ttl", self.location_ttl),
            ("--shake-window", self.shake_window),
            ("--sweep-interval", self.sweep_interval),
            ("--snapshot-interval", self.snapshot_interval),
        ] {
            if d.is_zero() {
                bail!("{flag} 0: must be longer than zero");
            }
        }
        // Time to live is stored in 32 bits of ms per user.
        let ttl_cap = Duration::from_millis(u64::from(u32::MAX));
        for (flag, d) in [
            ("--location-ttl", self.location_ttl),
            ("--max-location-ttl", self.max_location_ttl),
        ] {
            if d > ttl_cap {
                bail!("{flag} {d:?}: must be at most {ttl_cap:?}");
            }
        }
        if self.location_ttl > self.max_location_ttl {
            bail!(
                "--location-ttl {:?}: must be at most --max-location-ttl ({:?})",
                self.location_ttl,
                self.max_location_ttl
            );
        }
        positive("--default-radius-m", self.default_radius_m)?;
        positive("--max-radius-m", self.max_radius_m)?;
        positive("--default-shake-distance-m", self.default_shake_distance_m)?;
        positive("--max-shake-distance-m", self.max_shake_distance_m)?;
        if self.default_radius_m > self.max_radius_m {
            bail!(
                "--default-radius-m {}: must not exceed --max-radius-m {}",
                self.default_radius_m,
                self.max_radius_m
            );
        }
        if self.max_radius_m > 100_000.0 || self.max_shake_distance_m > 100_000.0 {
            bail!("--max-radius-m / --max-shake-distance-m: at most 100000 m");
        }
        if self.default_shake_distance_m > self.max_shake_distance_m {
            bail!(
                "--default-shake-distance-m {}: must not exceed --max-shake-distance-m {}",
                self.default_shake_distance_m,
                self.max_shake_distance_m
            );
        }
        if self.default_limit == 0 || self.default_limit > self.max_limit {
            bail!(
                "--default-limit {}: must be within 1..=--max-limit ({})",
                self.default_limit,
                self.max_limit
            );
        }
        if self.max_message_bytes < 1_024 {
            bail!(
                "--max-message-bytes {}: at least 1024",
                self.max_message_bytes
            );
        }
        if self.max_concurrent_requests == 0 || self.max_concurrent_shakes == 0 {
            bail!("--max-concurrent-requests / --max-concurrent-shakes: at least 1");
        }
        if self.watch_buffer == 0 || self.max_watches == 0 {
            bail!("--watch-buffer / --max-watches: at least 1");
        }
        for (flag, d) in [
            ("--keepalive-interval", self.keepalive_interval),
            ("--keepalive-timeout", self.keepalive_timeout),
        ] {
            if d.is_zero() {
                bail!("{flag} 0: must be longer than zero");
            }
        }
        if self.max_limit > 10_000 {
            bail!("--max-limit {}: at most 10000", self.max_limit);
        }
        Ok(())
    }

    fn privacy(&self) -> Resolution {
        Resolution::try_from(self.privacy_resolution).unwrap_or(Resolution::Nine)
    }

    /// The index's settings (call [`Self::validate`] first).
    pub fn nearby(&self) -> NearbyConfig {
        NearbyConfig {
            privacy_resolution: self.privacy(),
            location_ttl_ms: i64::try_from(self.location_ttl.as_millis()).unwrap_or(i64::MAX),
            max_location_ttl_ms: i64::try_from(self.max_location_ttl.as_millis())
                .unwrap_or(i64::MAX),
            default_radius_m: self.default_radius_m,
            max_radius_m: self.max_radius_m,
            default_limit: self.default_limit,
            max_limit: self.max_limit,
            watch: WatchConfig {
                buffer: self.watch_buffer,
                hysteresis: self.watch_hysteresis,
                max_watches: self.max_watches,
            },
        }
    }

    /// The matcher's settings (call [`Self::validate`] first).
    pub fn shake(&self) -> ShakeConfig {
        ShakeConfig {
            privacy_resolution: self.privacy(),
            bucket_resolution: Resolution::try_from(self.shake_resolution)
                .unwrap_or(Resolution::Seven),
            window: self.shake_window,
            result_ttl: self.shake_result_ttl,
            default_max_distance_m: self.default_shake_distance_m,
            max_distance_m: self.max_shake_distance_m,
            max_excludes: self.max_shake_excludes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Config> {
        let cfg = Config::try_parse_from(std::iter::once("geomatch").chain(args.iter().copied()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(cfg.location_ttl, Duration::from_secs(900));
        assert_eq!(cfg.shake_window, Duration::from_secs(2));
        assert_eq!(cfg.nearby().privacy_resolution, Resolution::Nine);
    }

    #[test]
    fn human_durations_parse() {
        let cfg = parse(&["--location-ttl", "90s", "--shake-window", "500ms"]).unwrap();
        assert_eq!(cfg.location_ttl, Duration::from_secs(90));
        assert_eq!(cfg.shake_window, Duration::from_millis(500));
    }

    #[test]
    fn bad_values_are_named() {
        for (args, needle) in [
            (
                &["--privacy-resolution", "16"][..],
                "--privacy-resolution 16",
            ),
            (
                &["--privacy-resolution", "11"][..],
                "--privacy-resolution 11",
            ),
            (&["--shake-resolution", "10"][..], "--shake-resolution 10"),
            (&["--shake-window", "0s"][..], "--shake-window"),
            (&["--max-radius-m=-1"][..], "--max-radius-m"),
            (&["--default-limit", "500"][..], "--default-limit 500"),
            (&["--location-ttl", "soon"][..], "soon"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
