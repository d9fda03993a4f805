//! Server flags: message size, concurrency and queueing limits, keepalive, drain, the
//! sweep, and (with [`SnapshotArgs`]) snapshots; and [`ServerConfig`], the settings
//! `server` runs by (defined here, so `server` depends on `config` and not back).

use std::time::Duration;

use anyhow::bail;
use clap::Args;

use super::{
    AuthArgs, AuthFiles, SnapshotArgs, SnapshotConfig, TlsArgs, TlsFiles, TraceArgs, human::Human,
    longer_than_zero,
};
use crate::telemetry::trace::TraceConfig;

/// How the server serves, drains, sweeps and snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Largest request message accepted, bytes.
    pub max_message_bytes: usize,
    /// Most Nearby calls served at once; more are shed.
    pub max_concurrent_requests: usize,
    /// Most Shake calls in flight at once; more are shed.
    pub max_concurrent_shakes: usize,
    /// Most HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// A call that waited longer than this for its handler is shed; zero disables.
    pub max_queue_delay: Duration,
    /// Interval of HTTP/2 (and TCP) keepalive pings.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// How long calls and streams may take to finish once the drain starts.
    pub drain_timeout: Duration,
    /// How often expired pings, old shake outcomes and idle limits are reclaimed.
    pub sweep_interval: Duration,
    /// The snapshot of the People Nearby index.
    pub snapshot: SnapshotConfig,
    /// TLS on the gRPC port; `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// Who may call what; empty: everyone, everything.
    pub auth: AuthFiles,
    /// Distributed tracing; `None`: off.
    pub trace: Option<TraceConfig>,
}

impl Default for ServerConfig {
    /// 256 KiB messages, 4 096 Nearby calls and 200 000 shakes at once, 20 ms of queueing,
    /// keepalive every 30 s with 10 s to answer, 10 s to drain, a sweep every 10 s.
    fn default() -> Self {
        Self {
            max_message_bytes: 256 * 1024,
            max_concurrent_requests: 4_096,
            max_concurrent_shakes: 200_000,
            max_concurrent_streams: 2_048,
            max_queue_delay: Duration::from_millis(20),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(10),
            snapshot: SnapshotConfig::default(),
            tls: None,
            auth: AuthFiles::default(),
            trace: None,
        }
    }
}

/// The server's own flags; defaults from [`ServerConfig::default`].
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Largest request message accepted, bytes; larger ones get OUT_OF_RANGE.
    #[arg(long, env = "GEOMATCH_MAX_MESSAGE_BYTES", default_value_t = ServerConfig::default().max_message_bytes)]
    pub max_message_bytes: usize,

    /// Most Nearby calls served at once; beyond it calls are shed at once with
    /// RESOURCE_EXHAUSTED instead of queueing.
    #[arg(long, env = "GEOMATCH_MAX_CONCURRENT_REQUESTS", default_value_t = ServerConfig::default().max_concurrent_requests)]
    pub max_concurrent_requests: usize,

    /// Most Shake calls in flight at once (each waits up to the shake window); beyond it
    /// calls are shed at once with RESOURCE_EXHAUSTED.
    #[arg(long, env = "GEOMATCH_MAX_CONCURRENT_SHAKES", default_value_t = ServerConfig::default().max_concurrent_shakes)]
    pub max_concurrent_shakes: usize,

    /// Most calls (HTTP/2 streams) one connection may have open at once; a client that
    /// opens more waits for one to finish (HTTP/2 flow control, not an error).
    #[arg(long, env = "GEOMATCH_MAX_CONCURRENT_STREAMS", default_value_t = ServerConfig::default().max_concurrent_streams)]
    pub max_concurrent_streams: u32,

    /// A call that waited longer than this between arriving and its handler starting is
    /// shed with RESOURCE_EXHAUSTED (overload: answer fast or not at all); 0 disables.
    #[arg(long, env = "GEOMATCH_MAX_QUEUE_DELAY", default_value_t = Human(ServerConfig::default().max_queue_delay))]
    pub max_queue_delay: Human,

    /// Interval of HTTP/2 keepalive pings to idle clients.
    #[arg(long, env = "GEOMATCH_KEEPALIVE_INTERVAL", default_value_t = Human(ServerConfig::default().keepalive_interval))]
    pub keepalive_interval: Human,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "GEOMATCH_KEEPALIVE_TIMEOUT", default_value_t = Human(ServerConfig::default().keepalive_timeout))]
    pub keepalive_timeout: Human,

    /// On SIGINT/SIGTERM, how long in-flight calls and open streams may take to finish
    /// before the remaining connections are closed.
    #[arg(long, env = "GEOMATCH_DRAIN_TIMEOUT", default_value_t = Human(ServerConfig::default().drain_timeout))]
    pub drain_timeout: Human,

    /// How often expired pings and old shake outcomes are reclaimed.
    #[arg(long, env = "GEOMATCH_SWEEP_INTERVAL", default_value_t = Human(ServerConfig::default().sweep_interval))]
    pub sweep_interval: Human,

    /// Snapshots of the index.
    #[command(flatten)]
    pub snapshot: SnapshotArgs,

    /// TLS on the gRPC port.
    #[command(flatten)]
    pub tls: TlsArgs,

    /// Who may call what.
    #[command(flatten)]
    pub auth: AuthArgs,

    /// Distributed tracing.
    #[command(flatten)]
    pub trace: TraceArgs,
}

impl ServerArgs {
    /// The server's settings.
    ///
    /// # Errors
    /// A one-line reason naming the flag and its bad value.
    pub fn settings(&self) -> anyhow::Result<ServerConfig> {
        if self.max_message_bytes < 1_024 {
            bail!(
                "--max-message-bytes {}: at least 1024",
                self.max_message_bytes
            );
        }
        if self.max_concurrent_requests == 0 {
            bail!("--max-concurrent-requests 0: at least 1");
        }
        if self.max_concurrent_shakes == 0 {
            bail!("--max-concurrent-shakes 0: at least 1");
        }
        if self.max_concurrent_streams == 0 {
            bail!("--max-concurrent-streams 0: at least 1");
        }
        longer_than_zero("--sweep-interval", self.sweep_interval.get())?;
        longer_than_zero("--keepalive-interval", self.keepalive_interval.get())?;
        longer_than_zero("--keepalive-timeout", self.keepalive_timeout.get())?;
        Ok(ServerConfig {
            max_message_bytes: self.max_message_bytes,
            max_concurrent_requests: self.max_concurrent_requests,
            max_concurrent_shakes: self.max_concurrent_shakes,
            max_concurrent_streams: self.max_concurrent_streams,
            max_queue_delay: self.max_queue_delay.get(),
            keepalive_interval: self.keepalive_interval.get(),
            keepalive_timeout: self.keepalive_timeout.get(),
            drain_timeout: self.drain_timeout.get(),
            sweep_interval: self.sweep_interval.get(),
            snapshot: self.snapshot.settings()?,
            tls: self.tls.settings()?,
            auth: self.auth.settings(),
            trace: self.trace.settings()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    #[test]
    fn bad_values_are_named() {
        for (args, needle) in [
            (
                &["--max-message-bytes", "100"][..],
                "--max-message-bytes 100",
            ),
            (
                &["--max-concurrent-requests", "0"][..],
                "--max-concurrent-requests 0",
            ),
            (
                &["--max-concurrent-shakes", "0"][..],
                "--max-concurrent-shakes 0",
            ),
            (&["--sweep-interval", "0s"][..], "--sweep-interval 0"),
            (
                &["--keepalive-interval", "0s"][..],
                "--keepalive-interval 0",
            ),
            (&["--keepalive-timeout", "0s"][..], "--keepalive-timeout 0"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        let (_, s) = parse(&["--max-queue-delay", "0", "--drain-timeout", "1s"]).unwrap();
        assert!(s.server.max_queue_delay.is_zero());
        assert_eq!(s.server.drain_timeout, std::time::Duration::from_secs(1));
    }
}
