//! Logs and metrics setup.
//!
//! Logs: `RUST_LOG`-style filtering (default `info`), text or JSON lines on stderr. Every
//! RPC runs in a `rpc` span (debug level) with its method, status code and latency.
//!
//! Metrics: a Prometheus recorder (the `metrics` facade with `metrics-exporter-prometheus`),
//! installed once per process and rendered by the `/metrics` endpoint in `server`. Series
//! names live in [`names`], so dashboards and code agree on one spelling.

use std::sync::Mutex;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

/// Metric names: the contract with dashboards.
pub mod names {
    /// Counter: RPCs started, by `grpc_type`, `grpc_service`, `grpc_method`.
    pub const GRPC_STARTED: &str = "grpc_server_started_total";
    /// Counter: RPCs completed, by `grpc_type`, `grpc_service`, `grpc_method`, `grpc_code`.
    pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
    /// Histogram: RPC latency in seconds, by `grpc_type`, `grpc_service`, `grpc_method`.
    pub const GRPC_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
    /// Histogram: latency of calls answered OK only (shed and refused calls are fast and
    /// would hide the accepted calls' tail under overload).
    pub const ACCEPTED_SECONDS: &str = "geomatch_accepted_handling_seconds";
    /// Gauge: users held by the index (including expired ones not yet swept).
    pub const INDEXED_USERS: &str = "geomatch_indexed_users";
    /// Gauge: occupied privacy cells.
    pub const OCCUPIED_CELLS: &str = "geomatch_occupied_cells";
    /// Gauge: shakes waiting for a partner.
    pub const WAITING_SHAKES: &str = "geomatch_waiting_shakes";
    /// Counter: accepted location pings.
    pub const PINGS: &str = "geomatch_pings_total";
    /// Counter: answered searches.
    pub const SEARCHES: &str = "geomatch_searches_total";
    /// Counter: location clears.
    pub const CLEARS: &str = "geomatch_clears_total";
    /// Counter: requests refused as impossible travel.
    pub const IMPOSSIBLE_TRAVEL: &str = "geomatch_impossible_travel_total";
    /// Counter: WatchNearby streams opened.
    pub const WATCHES_OPENED: &str = "geomatch_watches_opened_total";
    /// Counter: WatchNearby streams ended because their consumer fell behind.
    pub const WATCH_OVERFLOWS: &str = "geomatch_watch_overflows_total";
    /// Gauge: finished shake outcomes kept for retries.
    pub const SHAKE_OUTCOMES_KEPT: &str = "geomatch_shake_outcomes_kept";
    /// Gauge: users tracked by the abuse controls, by control.
    pub const LIMITS_TRACKED: &str = "geomatch_limits_tracked";
    /// Gauge: WatchNearby streams open.
    pub const WATCHES: &str = "geomatch_watches";
    /// Counter: items of `UpdateLocations` streams rejected one by one.
    pub const PINGS_REJECTED: &str = "geomatch_pings_rejected_total";
    /// Counter: shake calls answered MATCHED.
    pub const MATCHES: &str = "geomatch_shake_matches_total";
    /// Counter: shake calls answered NO_MATCH.
    pub const NO_MATCHES: &str = "geomatch_shake_no_matches_total";
    /// Counter: pings reclaimed by the sweep after their TTL.
    pub const EXPIRATIONS: &str = "geomatch_expirations_total";
    /// Counter: requests refused, by `reason` (the offending field, or the status).
    pub const REJECTIONS: &str = "geomatch_rejections_total";
    /// Histogram: duration of one expiry sweep, seconds.
    pub const SWEEP_SECONDS: &str = "geomatch_sweep_duration_seconds";
    /// Histogram: duration of one snapshot write, seconds.
    pub const SNAPSHOT_SECONDS: &str = "geomatch_snapshot_duration_seconds";
    /// Gauge: size of the last snapshot written, bytes.
    pub const SNAPSHOT_BYTES: &str = "geomatch_snapshot_size_bytes";
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

static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Latency buckets, seconds: 50 µs to 10 s (a Shake waits up to its window).
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Installs the Prometheus recorder (once per process) and returns its handle.
///
/// # Errors
/// When another metrics recorder was installed first.
pub fn install_metrics() -> Result<PrometheusHandle, String> {
    let mut slot = RECORDER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|e| e.to_string())?;
    describe();
    *slot = Some(handle.clone());
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(GRPC_STARTED, "RPCs started on the server");
    describe_counter!(GRPC_HANDLED, "RPCs completed on the server, by status code");
    describe_histogram!(GRPC_HANDLING_SECONDS, Unit::Seconds, "RPC latency");
    describe_histogram!(
        ACCEPTED_SECONDS,
        Unit::Seconds,
        "latency of RPCs answered OK, from arrival at the server"
    );
    describe_gauge!(INDEXED_USERS, "users held by the index");
    describe_gauge!(OCCUPIED_CELLS, "occupied privacy cells");
    describe_gauge!(WAITING_SHAKES, "shakes waiting for a partner");
    describe_counter!(PINGS, "accepted location pings");
    describe_counter!(SEARCHES, "answered nearby searches");
    describe_counter!(CLEARS, "location clears");
    describe_counter!(WATCHES_OPENED, "WatchNearby streams opened");
    describe_counter!(
        IMPOSSIBLE_TRAVEL,
        "requests refused as impossible travel (position unchanged)"
    );
    describe_counter!(
        WATCH_OVERFLOWS,
        "WatchNearby streams ended because their consumer fell behind"
    );
    describe_gauge!(WATCHES, "WatchNearby streams open");
    describe_gauge!(
        SHAKE_OUTCOMES_KEPT,
        "finished shake outcomes kept for retries"
    );
    describe_gauge!(
        LIMITS_TRACKED,
        "users tracked by the abuse controls (search, shake, travel)"
    );
    describe_counter!(
        PINGS_REJECTED,
        "items of UpdateLocations streams rejected one by one"
    );
    describe_counter!(MATCHES, "shake calls answered MATCHED");
    describe_counter!(NO_MATCHES, "shake calls answered NO_MATCH");
    describe_counter!(EXPIRATIONS, "pings reclaimed after their TTL");
    describe_counter!(REJECTIONS, "requests refused, by reason");
    describe_histogram!(SWEEP_SECONDS, Unit::Seconds, "expiry sweep duration");
    describe_histogram!(SNAPSHOT_SECONDS, Unit::Seconds, "snapshot write duration");
    describe_gauge!(SNAPSHOT_BYTES, Unit::Bytes, "size of the last snapshot");
}
