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
pub mod trace;

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
///
/// Text lines are coloured only on a terminal, and never when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>): a file or a pipe gets plain text.
pub fn init_logs(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Whether log lines are coloured: on a terminal, unless `NO_COLOR` is set and not empty.
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new("1"))));
    }
}
