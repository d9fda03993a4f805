//! Configuration: every flag has a `GEOMATCH_*` environment equivalent and a default that
//! `geomatch --help` shows. [`Config::validate`] names the bad value before anything binds.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::Parser;
use h3o::Resolution;

use crate::{
    geo::value::{PageRule, RadiusRule, TtlRule},
    guard::{GuardConfig, RateConfig, TravelConfig},
    nearby::{NearbyConfig, WatchConfig},
    shake::ShakeConfig,
    telemetry::LogFormat,
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

/// A distance: "5km", "800m" or plain metres.
fn metres(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (number, scale) = if let Some(k) = t.strip_suffix("km") {
        (k, 1_000.0)
    } else if let Some(m) = t.strip_suffix('m') {
        (m, 1.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a distance such as 5km or 800m"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?}: must be a distance >= 0"));
    }
    Ok(v * scale)
}

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

    /// Most users the index holds; pings from new users beyond it get RESOURCE_EXHAUSTED
    /// while existing users keep updating. Default: a quarter of this machine's memory at
    /// 256 bytes per user.
    #[arg(long, env = "GEOMATCH_MAX_USERS", default_value_t = default_max_users())]
    pub max_users: usize,

    /// Jumps up to this far are never impossible travel (GPS and cell-tower noise), e.g.
    /// 5km or 800m.
    #[arg(long, env = "GEOMATCH_MAX_JUMP", default_value = "5km", value_parser = metres)]
    pub max_jump: f64,

    /// Longer jumps faster than this many m/s (since the user's last ping, search or
    /// shake) are refused with FAILED_PRECONDITION; 0 disables the check.
    #[arg(long, env = "GEOMATCH_MAX_SPEED", default_value_t = 300.0)]
    pub max_speed: f64,

    /// SearchNearby calls a user may make back to back (token bucket); 0 disables.
    #[arg(long, env = "GEOMATCH_SEARCH_BURST", default_value_t = 40)]
    pub search_burst: u32,

    /// SearchNearby calls per user per minute, sustained.
    #[arg(long, env = "GEOMATCH_SEARCH_PER_MINUTE", default_value_t = 30)]
    pub search_per_minute: u32,

    /// Shake calls a user may make back to back (token bucket); 0 disables.
    #[arg(long, env = "GEOMATCH_SHAKE_BURST", default_value_t = 20)]
    pub shake_burst: u32,

    /// Shake calls per user per minute, sustained.
    #[arg(long, env = "GEOMATCH_SHAKE_PER_MINUTE", default_value_t = 20)]
    pub shake_per_minute: u32,

    /// Users each abuse control (each rate limit, the travel check) tracks at most;
    /// beyond it new users pass untracked (never refused).
    #[arg(long, env = "GEOMATCH_MAX_TRACKED_USERS", default_value_t = 1_000_000)]
    pub max_tracked_users: usize,

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

    /// A call that waited longer than this between arriving and its handler starting is
    /// shed with RESOURCE_EXHAUSTED (overload: answer fast or not at all); 0 disables.
    #[arg(long, env = "GEOMATCH_MAX_QUEUE_DELAY", default_value = "20ms", value_parser = duration)]
    pub max_queue_delay: Duration,

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
        if !self.max_speed.is_finite() || self.max_speed < 0.0 {
            bail!(
                "--max-speed {}: must be a speed in m/s >= 0",
                self.max_speed
            );
        }
        if self.max_users == 0 {
            bail!("--max-users 0: must be at least 1");
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
            ttl: TtlRule {
                default: self.location_ttl,
                max: self.max_location_ttl,
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
            watch: WatchConfig {
                buffer: self.watch_buffer,
                hysteresis: self.watch_hysteresis,
                max_watches: self.max_watches,
            },
        }
    }

    /// The abuse controls' settings (call [`Self::validate`] first).
    pub fn guard(&self) -> GuardConfig {
        let rate = |burst, per_minute| RateConfig {
            burst,
            per_minute,
            max_tracked: self.max_tracked_users,
        };
        GuardConfig {
            search: rate(self.search_burst, self.search_per_minute),
            shake: rate(self.shake_burst, self.shake_per_minute),
            travel: TravelConfig {
                max_jump_m: self.max_jump,
                max_speed_mps: self.max_speed,
                max_tracked: self.max_tracked_users,
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
            max_distance: RadiusRule {
                default_m: self.default_shake_distance_m,
                max_m: self.max_shake_distance_m,
                ..RadiusRule::SHAKE
            },
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
