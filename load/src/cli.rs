//! The command line: scenarios and flags.

use std::{net::SocketAddr, time::Duration};

use anyhow::bail;
use clap::{Parser, ValueEnum};

/// What a run does (`--scenario`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    Update,
    /// Bulk ingest: streams of [`BULK_BATCH`] pings (geomatch `UpdateLocations`; a pipeline
    /// of as many GEOADDs on Redis). One op is one ping; latencies are per batch.
    UpdateBulk,
    #[value(name = "search-dense-1km")]
    SearchDense1km,
    #[value(name = "search-dense-5km")]
    SearchDense5km,
    SearchSparse,
    Shake,
    Mixed,
    /// The per-call floor of each server's stack: a gRPC health check
    /// (`grpc.health.v1.Health/Check`, through every layer a Nearby call passes) against
    /// a RESP `PING`. Nothing is loaded. What a scenario costs above its target's floor is
    /// the work of the operation itself.
    Noop,
    /// Churn for a long run (gRPC only): a window of active users slides through the
    /// population (users join, move, clear, and expire once they fall behind it), with
    /// searches and bulk pings from active users and shakes from a fixed pool of pairs. The
    /// population is not preloaded: users enter through the churn. Refusals by the abuse controls count as "unexpected", not errors; RSS is sampled
    /// every 10 s, and the server's waiting shakes and watches must be back to zero after.
    Soak,
}

impl Scenario {
    /// The scenario's name, as given on the command line and printed in the reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Update => "update",
            Self::UpdateBulk => "update-bulk",
            Self::SearchDense1km => "search-dense-1km",
            Self::SearchDense5km => "search-dense-5km",
            Self::SearchSparse => "search-sparse",
            Self::Shake => "shake",
            Self::Mixed => "mixed",
            Self::Noop => "noop",
            Self::Soak => "soak",
        }
    }
}

/// Load generator for geomatch: standard population, scenarios, closed or open loop.
#[derive(Debug, Clone, Parser)]
#[command(name = "geomatch-load", version, about)]
pub(crate) struct Args {
    /// What to run.
    #[arg(long, value_enum, default_value = "search-dense-1km")]
    pub(crate) scenario: Scenario,
    /// geomatch gRPC address (loopback). Default 127.0.0.1:50051 when neither --redis nor
    /// --valkey is given.
    /// Give it again for more replicas of one store: each gets --connections connections,
    /// and the callers are spread over all of them.
    #[arg(long)]
    pub(crate) grpc: Vec<SocketAddr>,
    /// TLS to geomatch: the PEM CA its certificate chains to (the server name checked
    /// is `localhost`).
    #[arg(long)]
    pub(crate) tls_ca: Option<std::path::PathBuf>,
    /// Mutual TLS: this client's PEM certificate (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub(crate) tls_cert: Option<std::path::PathBuf>,
    /// Mutual TLS: this client's PEM key.
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<std::path::PathBuf>,
    /// Redis URL (loopback), e.g. redis://127.0.0.1:6390: the same scenario with GEOADD /
    /// GEOSEARCH (a Valkey server works too; --valkey runs one beside it, under its own
    /// name). With --grpc as well, both are loaded, a sample of searches is cross-checked,
    /// and the scenario runs against each in turn (one JSON line each).
    #[arg(long)]
    pub(crate) redis: Option<String>,
    /// Valkey URL (loopback), e.g. redis://127.0.0.1:6391: a second RESP target, named
    /// `valkey` in the table, the JSON lines and the report, loaded, cross-checked and run
    /// exactly as --redis (which it may accompany: then every target runs in turn).
    #[arg(long)]
    pub(crate) valkey: Option<String>,
    /// Population size.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) users: u64,
    /// Concurrent callers (closed loop) or most requests in flight (open loop).
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// How long the scenario runs (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Open loop: requests per second on a fixed schedule. Closed loop when not given.
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Open-loop sweep: runs the scenario at each of these rates in turn (requests/s,
    /// comma-separated, e.g. 5000,10000,20000,40000), each for --duration, against each
    /// target (one table row and JSON line per run). With --report: latency and achieved
    /// throughput against offered load.
    #[arg(
        long,
        value_name = "RATES",
        value_delimiter = ',',
        conflicts_with = "rate"
    )]
    pub(crate) sweep: Vec<f64>,
    /// Also write a self-contained HTML report with charts (inline SVG, no script) to this
    /// file, and each chart beside it as FILE-<chart>.svg (FILE without its .html).
    #[arg(long, value_name = "FILE.html")]
    pub(crate) report: Option<std::path::PathBuf>,
    /// Population and request seed.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Do not load the population (the server already holds it from an earlier run).
    #[arg(long)]
    pub(crate) skip_load: bool,
    /// The geomatch server's pid: each gRPC run's JSON line reports its resident memory
    /// (`rss_bytes`) and its CPU time (user + system) per successful operation over the
    /// measured window (`server_cpu_us_per_op`, also the table's last column). Give it
    /// again for replicas (with --grpc given several times): their CPU and memory add up.
    #[arg(long, value_name = "PID")]
    pub(crate) server_pid: Vec<u32>,
    /// A pid of the store behind geomatch (`--store redis` / `redis-cluster`: every Redis
    /// or Valkey node, masters and replicas; give it once per node): each gRPC run's JSON
    /// line also reports their CPU time (user + system, added up) per successful
    /// operation over the measured window (`store_cpu_us_per_op`). With --server-pid this
    /// splits a clustered operation's cost into the replicas' and the store's.
    #[arg(long, value_name = "PID")]
    pub(crate) store_pid: Vec<u32>,
    /// The --redis server's pid: its runs report its memory and CPU per operation, as
    /// --server-pid does for geomatch.
    #[arg(long, value_name = "PID", requires = "redis")]
    pub(crate) redis_pid: Option<u32>,
    /// The --valkey server's pid: its runs report its memory and CPU per operation, as
    /// --server-pid does for geomatch.
    #[arg(long, value_name = "PID", requires = "valkey")]
    pub(crate) valkey_pid: Option<u32>,
    /// shake / soak: derive the shakers' user ids from this seed, so two invocations shake
    /// as the same users. Without it each invocation's shakers are fresh (a per-run random
    /// nonce in their ids): the server would otherwise refuse a second run's shakers, who
    /// already shook in the first (per-user shake rate limit, impossible travel).
    #[arg(long, value_name = "N")]
    pub(crate) shake_seed: Option<u64>,
    /// soak: users active at once (the sliding window).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) soak_active: u64,
    /// soak: how long the window takes to move by its own size (users' turnover).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) soak_turnover: Duration,
    /// The server's metrics address (loopback), to check after a soak that no shakes are
    /// left waiting and no watches open.
    #[arg(long)]
    pub(crate) metrics_addr: Option<SocketAddr>,
}

impl Args {
    /// The processes whose memory and CPU the runs against `target` report: geomatch's
    /// (`--server-pid`, every replica) for "grpc", the peer's for "redis" and "valkey".
    pub(crate) fn pids(&self, target: &str) -> Vec<u32> {
        match target {
            "grpc" => self.server_pid.clone(),
            "redis" => self.redis_pid.into_iter().collect(),
            "valkey" => self.valkey_pid.into_iter().collect(),
            _ => Vec::new(),
        }
    }

    /// The store processes behind geomatch whose CPU the runs against `target` also
    /// report (`--store-pid`): gRPC runs only (a peer is its own store).
    pub(crate) fn store_pids(&self, target: &str) -> Vec<u32> {
        if target == "grpc" {
            self.store_pid.clone()
        } else {
            Vec::new()
        }
    }

    /// The runs' rates: `--sweep`'s (each open loop), or `--rate` alone (`None`: closed loop).
    pub(crate) fn rates(&self) -> anyhow::Result<Vec<Option<f64>>> {
        for &rate in self.rate.iter().chain(&self.sweep) {
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("rate {rate}: must be a positive number of requests per second");
            }
        }
        if self.sweep.is_empty() {
            return Ok(vec![self.rate]);
        }
        if self.scenario == Scenario::Soak {
            bail!("--sweep: not with the soak (one long run)");
        }
        Ok(self.sweep.iter().map(|&r| Some(r)).collect())
    }
}

/// Refuses any gRPC target that is not a loopback address.
pub(crate) fn ensure_loopback(addr: SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("--grpc {addr}: load tests may only target loopback addresses");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_has_its_own_pids() {
        let a = Args::try_parse_from([
            "geomatch-load",
            "--grpc",
            "127.0.0.1:50401",
            "--grpc",
            "127.0.0.1:50402",
            "--server-pid",
            "11",
            "--server-pid",
            "12",
            "--redis",
            "redis://127.0.0.1:6400",
            "--redis-pid",
            "21",
            "--valkey",
            "redis://127.0.0.1:6401",
            "--valkey-pid",
            "31",
        ])
        .unwrap();
        assert_eq!(a.pids("grpc"), [11, 12]);
        assert_eq!(a.pids("redis"), [21]);
        assert_eq!(a.pids("valkey"), [31]);
        assert!(a.store_pids("grpc").is_empty());
        let a = Args::try_parse_from([
            "geomatch-load",
            "--grpc",
            "127.0.0.1:50401",
            "--redis",
            "redis://127.0.0.1:6400",
            "--store-pid",
            "41",
            "--store-pid",
            "42",
        ])
        .unwrap();
        // The Cluster nodes behind geomatch count for its runs, not for the GEO peer's.
        assert_eq!(a.store_pids("grpc"), [41, 42]);
        assert!(a.store_pids("redis").is_empty());
        assert!(a.pids("grpc").is_empty());
        let a = Args::try_parse_from(["geomatch-load", "--server-pid", "11"]).unwrap();
        assert_eq!(a.pids("grpc"), [11]);
        assert!(a.pids("redis").is_empty());
        // A peer's pid without the peer.
        assert!(Args::try_parse_from(["geomatch-load", "--redis-pid", "21"]).is_err());
        assert!(Args::try_parse_from(["geomatch-load", "--valkey-pid", "31"]).is_err());
    }
}
