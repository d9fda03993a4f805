//! What a run reports: latency histograms and counts, the table row and JSON line, the
//! server's RSS, and the soak's verdicts.

use std::{
    net::SocketAddr,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;

use crate::{cli::Args, scenario::OpResult};

/// Errors a run reports word for word (on stderr).
const FIRST_ERRORS: usize = 5;

/// A latency histogram in µs: 1 µs to 60 s, 3 significant figures.
#[allow(clippy::expect_used)] // constant bounds, valid by construction
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("1 µs to 60 s at 3 figures is valid")
}

/// Locks the shared stats. A worker that panicked while holding them left plain counters,
/// still worth reporting; its panic surfaces when it is joined.
pub(crate) fn lock(stats: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A run's counts and latency histograms (per worker, then merged).
pub(crate) struct Stats {
    /// Latency of the calls that succeeded (open loop: from the scheduled send time).
    pub(crate) hist: Histogram<u64>,
    /// Open loop: latency from the actual send, which leaves out the harness's own lag
    /// behind the schedule (the server's share).
    pub(crate) sent_hist: Histogram<u64>,
    /// Operations that succeeded.
    pub(crate) ops: u64,
    /// Calls that failed (open loop: including the scheduled calls dropped).
    pub(crate) errors: u64,
    /// Errors that were the server shedding load (RESOURCE_EXHAUSTED).
    pub(crate) shed: u64,
    /// Open loop: scheduled calls not sent because `--concurrency` were in flight.
    pub(crate) dropped: u64,
    /// Calls that succeeded but did not do what the scenario expects ("unexpected").
    pub(crate) misses: u64,
    /// The first few errors, as reported (code and message), to say what went wrong.
    pub(crate) first_errors: Vec<String>,
}

impl Stats {
    /// Empty stats.
    pub(crate) fn new() -> Self {
        Self {
            hist: latency_histogram(),
            sent_hist: latency_histogram(),
            ops: 0,
            errors: 0,
            shed: 0,
            dropped: 0,
            misses: 0,
            first_errors: Vec::new(),
        }
    }

    /// Records one call that counted for `weight` operations.
    pub(crate) fn record(&mut self, latency: Duration, result: OpResult, weight: u64) {
        self.record_sent(latency, latency, result, weight);
    }

    /// Records one call: `latency` from its scheduled time, `sent` from its actual send.
    pub(crate) fn record_sent(
        &mut self,
        latency: Duration,
        sent: Duration,
        result: OpResult,
        weight: u64,
    ) {
        match result {
            Ok(good) => {
                self.ops += weight;
                self.misses += u64::from(!good);
                let _ = self.hist.record((latency.as_micros() as u64).max(1));
                let _ = self.sent_hist.record((sent.as_micros() as u64).max(1));
            }
            Err(e) => {
                self.errors += 1;
                self.shed += u64::from(e.contains("ResourceExhausted"));
                if self.first_errors.len() < FIRST_ERRORS {
                    self.first_errors.push(e);
                }
            }
        }
    }

    /// Adds another worker's stats.
    pub(crate) fn merge(&mut self, other: &Stats) {
        let _ = self.hist.add(&other.hist);
        let _ = self.sent_hist.add(&other.sent_hist);
        self.ops += other.ops;
        self.errors += other.errors;
        self.shed += other.shed;
        self.dropped += other.dropped;
        for e in &other.first_errors {
            if self.first_errors.len() < FIRST_ERRORS {
                self.first_errors.push(e.clone());
            }
        }
        self.misses += other.misses;
    }
}

/// The resident memory of process `pid`, from /proc.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The soak's verdicts: RSS flat after warm-up (the first fifth of the run, which covers
/// the loaded population expiring), and nothing left waiting once the load stops.
pub(crate) async fn soak_report(args: &Args, samples: &[(u64, u64)]) -> anyhow::Result<()> {
    let warm = args.duration.as_secs() / 5;
    let after: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= warm)
        .map(|(_, b)| *b)
        .collect();
    let mb = |b: u64| b as f64 / 1e6;
    let series: Vec<String> = samples
        .iter()
        .map(|(t, b)| format!("[{t},{:.1}]", mb(*b)))
        .collect();
    let (lo, hi) = (
        after.iter().copied().min().unwrap_or(0),
        after.iter().copied().max().unwrap_or(0),
    );
    let spread = if lo > 0 {
        hi as f64 / lo as f64 - 1.0
    } else {
        0.0
    };
    let mut waiting = String::new();
    if let Some(addr) = args.metrics_addr {
        if !addr.ip().is_loopback() {
            bail!("--metrics-addr {addr}: loopback only");
        }
        // Past the shake window and the server's 5 s gauge refresh.
        tokio::time::sleep(Duration::from_secs(7)).await;
        let shakes = scrape(addr, "geomatch_waiting_shakes").await?;
        let watches = scrape(addr, "geomatch_watches").await.unwrap_or(0.0);
        waiting = format!(",\"waiting_shakes_after\":{shakes},\"watches_after\":{watches}");
    }
    println!(
        "{{\"soak_rss_mb\":[{}],\"rss_spread_after_warmup\":{spread:.3},\"rss_flat\":{}{waiting}}}",
        series.join(","),
        spread <= 0.10
    );
    Ok(())
}

/// Fetches the server's /metrics and returns the value of `series` (no labels).
async fn scrape(addr: SocketAddr, series: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .with_context(|| format!("{series} not in /metrics"))
}

/// Prints a run's errors (the first few, on stderr), its table row (after the header,
/// once) and its JSON line.
pub(crate) fn print_run(
    args: &Args,
    target: &str,
    stats: &Stats,
    elapsed: f64,
    printed_header: &mut bool,
) {
    for e in &stats.first_errors {
        eprintln!("{target} error: {e}");
    }
    let ops_per_s = stats.ops as f64 / elapsed;
    let q = |p: f64| stats.hist.value_at_quantile(p);
    let mode = args
        .rate
        .map_or("closed".to_string(), |r| format!("open {r}/s"));
    if !*printed_header {
        println!(
            "| scenario | target | mode | ops/s | p50 µs | p99 µs | p99.9 µs | errors | unexpected |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        *printed_header = true;
    }
    println!(
        "| {} | {target} | {mode} | {ops_per_s:.0} | {} | {} | {} | {} | {} |",
        args.scenario.name(),
        q(0.5),
        q(0.99),
        q(0.999),
        stats.errors,
        stats.misses
    );
    let rss = if target == "grpc" {
        args.server_pid.and_then(rss_bytes)
    } else {
        None
    };
    let rss = rss.map_or(String::new(), |b| format!(",\"rss_bytes\":{b}"));
    // Open loop adds what an overload run needs: the server's share of the latency (from
    // the actual send), and errors split into server sheds and harness drops.
    let open = if args.rate.is_some() {
        format!(
            ",\"p99_sent_us\":{},\"shed\":{},\"dropped\":{}",
            stats.sent_hist.value_at_quantile(0.99),
            stats.shed,
            stats.dropped
        )
    } else {
        String::new()
    };
    println!(
        "{{\"scenario\":\"{}\",\"target\":\"{target}\",\"ops_per_s\":{ops_per_s:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{}{rss}{open}}}",
        args.scenario.name(),
        q(0.5),
        q(0.99),
        q(0.999),
        stats.errors
    );
}
