//! Metric names: the contract with dashboards and alert rules, spelled once.

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
/// TLS handshakes refused or timed out (plaintext to a TLS port, no or a foreign client
/// certificate under mutual TLS).
pub const TLS_HANDSHAKE_FAILURES: &str = "geomatch_tls_handshake_failures_total";
/// Reloads of watched files, by `files` (`tls`, `auth`) and result (`ok`, `error`: the
/// old files kept).
pub const RELOADS: &str = "geomatch_reloads_total";
/// Calls refused by caller authentication (`reason` `unauthenticated`) or authorization
/// (`permission_denied`), by caller name (`unknown` when there is none; never a token).
pub const AUTH_REFUSALS: &str = "geomatch_auth_refusals_total";
/// Counter: snapshot writes that failed (the previous snapshot is kept).
pub const SNAPSHOT_FAILURES: &str = "geomatch_snapshot_failures_total";
/// Gauge: the most users the index holds (`--max-users`); published with the in-memory
/// store, beside [`INDEXED_USERS`].
pub const MAX_USERS: &str = "geomatch_max_users";
/// Gauge: 1 while the store is reachable (always, in memory), 0 while a remote store is
/// not (the replica reports NOT_SERVING meanwhile).
pub const STORE_UP: &str = "geomatch_store_up";
/// Counter: health probes of a remote store (one a second), by `result`: `answered`,
/// `timed_out` (no answer within `--store-timeout`) or `failed` (refused, or a store that
/// came back but could not be prepared again).
pub const STORE_PROBES: &str = "geomatch_store_probes_total";
/// Counter: store calls over a Redis / Valkey Cluster, by `route`: `direct` (sent
/// straight to the slot's master) or `cluster_client` (through the Cluster client: no
/// route known for the slot, or the direct attempt failed, as around a failover).
pub const STORE_CALLS: &str = "geomatch_store_calls_total";
/// Counter: store commands written straight to a Cluster's master in one pipeline with
/// other callers' commands (the `direct` calls ready for one master at the same moment).
pub const STORE_WRITTEN_TOGETHER: &str = "geomatch_store_commands_written_together_total";
/// Counter: pings a replica applied to a remote store, by `record`: `stood` (one store
/// call: the user's record already named the cell) or `written` (the record written too).
pub const STORE_PINGS: &str = "geomatch_store_pings_total";
/// Counter: finished spans not exported (the export queue was full, or the collector
/// failed or did not answer in time).
pub const TRACE_SPANS_DROPPED: &str = "geomatch_trace_spans_dropped_total";

/// The conventional name of a gRPC status code, as `grpc_code` label values (and trace
/// span statuses) use.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}
