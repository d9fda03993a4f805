//! Logs and metrics setup.
//!
//! Logs: `RUST_LOG`-style filtering (default `info`), text or JSON lines on stderr. Every
//! RPC runs in a `rpc` span (debug level) with its method, status code and latency.
//!
//! Metrics: a Prometheus recorder (the `metrics` facade with `metrics-exporter-prometheus`),
//! installed once per process ([`install_metrics`]) and rendered by the `/metrics` endpoint
//! in `server`. Series names live in [`names`], so dashboards and code agree on one spelling.

use tracing_subscriber::{EnvFilter, fmt};

mod metrics;
pub mod names;

pub use metrics::install_metrics;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global log subscriber. Later calls are ignored.
pub fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
