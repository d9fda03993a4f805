//! Configuration: every flag has a `GEOMATCH_*` environment equivalent and a default that
//! `geomatch --help` shows. [`Config::settings`] checks and converts every flag once, into
//! each room's settings, and names the bad value before anything binds.
//!
//! Flags come in groups, one file each, by the room they configure: [`PrivacyArgs`] (the
//! privacy resolution both rooms snap to), [`NearbyArgs`] (with [`WatchArgs`]),
//! [`ShakeArgs`], [`GuardArgs`] and [`ServerArgs`] (with [`SnapshotArgs`]). Each group has
//! one `settings` method that validates it and builds its room's config; nothing reads a
//! flag after that.
//!
//! One default per value: a value a room acts on takes its default from that room's
//! `Default` or rule constant (`TtlRule::default()`, `RadiusRule::SEARCH`,
//! `ShakeConfig::default()`, `ServerConfig::default()`, ...), and the flag shows it
//! through `default_value_t`, human-readable via the [`human`] newtypes (`Human` prints
//! "15m", `Distance` "5km", `Share` "10%"). Only what the binary alone uses is defaulted in
//! the flag itself: the listen addresses, the log format, and `--max-users`, whose default
//! depends on the machine (the index's own default is unbounded).

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use clap::Parser;
use h3o::Resolution;

use crate::{guard::GuardConfig, nearby::NearbyConfig, shake::ShakeConfig, telemetry::LogFormat};

mod auth;
mod guard;
pub mod human;
mod nearby;
mod privacy;
mod server;
mod shake;
mod snapshot;
mod store;
mod tls;
mod trace;
mod watch;

pub use auth::{AuthArgs, AuthFiles};
pub use guard::GuardArgs;
pub use nearby::NearbyArgs;
pub use privacy::PrivacyArgs;
pub use server::{ServerArgs, ServerConfig};
pub use shake::ShakeArgs;
pub use snapshot::{SnapshotArgs, SnapshotConfig};
pub use store::{StoreArgs, StoreConfig, StoreKind};
pub use tls::{TlsArgs, TlsFiles};
pub use trace::TraceArgs;
pub use watch::WatchArgs;

/// geomatch: People Nearby and Shake over gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "geomatch", version, about, long_about = None)]
pub struct Config {
    /// gRPC listen address (port 0 picks a free port and logs it).
    #[arg(long, env = "GEOMATCH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Prometheus metrics listen address, serving `/metrics` over HTTP (off when not given;
    /// port 0 picks a free port and logs it).
    #[arg(long, env = "GEOMATCH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// The privacy resolution.
    #[command(flatten)]
    pub privacy: PrivacyArgs,

    /// The People Nearby index and its watches.
    #[command(flatten)]
    pub nearby: NearbyArgs,

    /// The Shake matcher.
    #[command(flatten)]
    pub shake: ShakeArgs,

    /// The abuse controls.
    #[command(flatten)]
    pub guard: GuardArgs,

    /// Serving, draining, sweeping and snapshots.
    #[command(flatten)]
    pub server: ServerArgs,

    /// Where People Nearby is held.
    #[command(flatten)]
    pub store: StoreArgs,

    /// Log format.
    #[arg(long, env = "GEOMATCH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Every room's settings, checked and converted from the flags once.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The People Nearby index.
    pub nearby: NearbyConfig,
    /// The Shake matcher.
    pub shake: ShakeConfig,
    /// The abuse controls.
    pub guard: GuardConfig,
    /// The server: transport limits, drain, sweep and snapshots.
    pub server: ServerConfig,
    /// Where People Nearby is held.
    pub store: StoreConfig,
}

impl Config {
    /// Checks every flag and converts them into each room's settings. The privacy
    /// resolution is resolved once and handed to both the index and the matcher.
    ///
    /// # Errors
    /// A one-line reason naming the flag and its bad value.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let privacy = self.privacy.resolution()?;
        let settings = Settings {
            nearby: self.nearby.settings(privacy)?,
            shake: self.shake.settings(privacy)?,
            guard: self.guard.settings()?,
            server: self.server.settings()?,
            store: self.store.settings()?,
        };
        if settings.store.target.is_some() && settings.server.snapshot.path.is_some() {
            bail!(
                "--snapshot: snapshots are of the in-memory store; with --store redis or \
                 redis-cluster the store keeps the data (use its own persistence)"
            );
        }
        Ok(settings)
    }

    /// Checks values clap cannot check alone (what [`Self::settings`] checks).
    ///
    /// # Errors
    /// A one-line reason naming the flag and its bad value.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.settings().map(drop)
    }
}

/// Largest distance any radius flag may allow, metres.
const MAX_REACH_M: f64 = 100_000.0;

/// `value` as an H3 resolution.
fn resolution(flag: &str, value: u8) -> anyhow::Result<Resolution> {
    Resolution::try_from(value).with_context(|| format!("{flag} {value}: not an H3 resolution"))
}

/// Refuses a distance that is not a positive number of metres.
fn positive_m(flag: &str, value: f64) -> anyhow::Result<()> {
    if !value.is_finite() || value <= 0.0 {
        bail!("{flag} {value}: must be a positive number of metres");
    }
    Ok(())
}

/// Refuses a zero duration.
fn longer_than_zero(flag: &str, value: std::time::Duration) -> anyhow::Result<()> {
    if value.is_zero() {
        bail!("{flag} 0: must be longer than zero");
    }
    Ok(())
}

/// Parses `args` as the binary would (after the program name) and converts them.
#[cfg(test)]
fn parse(args: &[&str]) -> anyhow::Result<(Config, Settings)> {
    let cfg = Config::try_parse_from(std::iter::once("geomatch").chain(args.iter().copied()))?;
    let settings = cfg.settings()?;
    Ok((cfg, settings))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        geo::value::{PageRule, RadiusRule, TtlRule},
        nearby::WatchConfig,
    };

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let (cfg, settings) = parse(&[]).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(cfg.nearby.location_ttl.get(), Duration::from_secs(900));
        assert_eq!(cfg.shake.shake_window.get(), Duration::from_secs(2));
        assert_eq!(settings.nearby.privacy_resolution, Resolution::Nine);
    }

    #[test]
    fn no_flags_give_each_rooms_own_defaults() {
        let (_, s) = parse(&[]).unwrap();
        assert_eq!(s.nearby.ttl, TtlRule::default());
        assert_eq!(s.nearby.radius, RadiusRule::SEARCH);
        assert_eq!(s.nearby.page, PageRule::default());
        assert_eq!(
            format!("{:?}", s.nearby.watch),
            format!("{:?}", WatchConfig::default())
        );
        assert_eq!(
            s.nearby.privacy_resolution,
            NearbyConfig::default().privacy_resolution
        );
        assert_eq!(
            format!("{:?}", s.shake),
            format!("{:?}", ShakeConfig::default())
        );
        assert_eq!(s.guard, GuardConfig::default());
        assert_eq!(s.server, ServerConfig::default());
    }

    #[test]
    fn human_durations_parse() {
        let (cfg, settings) = parse(&["--location-ttl", "90s", "--shake-window", "500ms"]).unwrap();
        assert_eq!(cfg.nearby.location_ttl.get(), Duration::from_secs(90));
        assert_eq!(settings.nearby.ttl.default, Duration::from_secs(90));
        assert_eq!(settings.shake.window, Duration::from_millis(500));
    }

    #[test]
    fn help_shows_defaults_as_operators_write_them() {
        use clap::CommandFactory as _;
        let help = Config::command().render_long_help().to_string();
        for shown in [
            "[default: 127.0.0.1:50051]",
            "[default: 15m]",
            "[default: 72h]",
            "[default: 2s]",
            "[default: 60s]",
            "[default: 10s]",
            "[default: 20ms]",
            "[default: 30s]",
            "[default: 5km]",
            "[default: 10%]",
            "[default: 1000]",
            "[default: 262144]",
            "[env: GEOMATCH_SNAPSHOT_INTERVAL=]",
        ] {
            assert!(help.contains(shown), "{shown} missing from --help");
        }
    }
}
