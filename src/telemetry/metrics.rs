//! The Prometheus recorder: installed once per process, rendered by the `/metrics`
//! endpoint the server runs.

use std::sync::Mutex;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::names;

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
    // Counters that alert rules watch with increase() exist from the start, at 0: a series
    // born at its first failure would hide that failure from increase().
    metrics::counter!(names::SNAPSHOT_FAILURES).absolute(0);
    metrics::counter!(names::WATCH_OVERFLOWS).absolute(0);
    metrics::counter!(names::TRACE_SPANS_DROPPED).absolute(0);
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
    describe_gauge!(MAX_USERS, "most users the index holds (--max-users)");
    describe_gauge!(STORE_UP, "1 while the store is reachable, else 0");
    describe_counter!(
        STORE_PROBES,
        "health probes of a remote store, by result (answered, timed_out, failed)"
    );
    describe_counter!(SNAPSHOT_FAILURES, "snapshot writes that failed");
    describe_counter!(
        TRACE_SPANS_DROPPED,
        "finished spans not exported (queue full, or the collector failed)"
    );
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
