//! What a run reports: latency histograms and counts, the table row and JSON line, the
//! server's RSS and CPU time per operation, and the soak's verdicts.

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
    /// Per second of the run (index: whole seconds from its start to the call's end): the
    /// operations that succeeded and the calls that failed, for the report's time series.
    pub(crate) per_second: Vec<Second>,
}

/// One second of a run: what ended in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Second {
    /// Operations that succeeded (as [`Stats::ops`] counts them).
    pub(crate) ok: u64,
    /// Calls that failed (as [`Stats::errors`] counts them).
    pub(crate) errors: u64,
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
            per_second: Vec::new(),
        }
    }

    /// The bucket of second `second` of the run (grown as needed).
    fn second(&mut self, second: u64) -> &mut Second {
        // At most an hour (--duration), plus the last calls' tail.
        let i = usize::try_from(second).unwrap_or(usize::MAX).min(4 * 3_600);
        if self.per_second.len() <= i {
            self.per_second.resize(i + 1, Second::default());
        }
        &mut self.per_second[i]
    }

    /// Records a scheduled call that was not sent (open loop, `--concurrency` in flight):
    /// an error, in second `second` of the run.
    pub(crate) fn record_dropped(&mut self, second: u64) {
        self.errors += 1;
        self.dropped += 1;
        self.second(second).errors += 1;
    }

    /// Records one call that counted for `weight` operations and ended in second `second`
    /// of the run.
    pub(crate) fn record(&mut self, second: u64, latency: Duration, result: OpResult, weight: u64) {
        self.record_sent(second, latency, latency, result, weight);
    }

    /// Records one call: `latency` from its scheduled time, `sent` from its actual send;
    /// it ended in second `second` of the run.
    pub(crate) fn record_sent(
        &mut self,
        second: u64,
        latency: Duration,
        sent: Duration,
        result: OpResult,
        weight: u64,
    ) {
        let bucket = self.second(second);
        match &result {
            Ok(_) => bucket.ok += weight,
            Err(_) => bucket.errors += 1,
        }
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
        if self.per_second.len() < other.per_second.len() {
            self.per_second
                .resize(other.per_second.len(), Second::default());
        }
        for (mine, theirs) in self.per_second.iter_mut().zip(&other.per_second) {
            mine.ok += theirs.ok;
            mine.errors += theirs.errors;
        }
    }
}

/// One run (one target at one rate) as the `--report` draws it.
pub(crate) struct RunOutcome {
    /// The target's name ("grpc", "redis").
    pub(crate) target: String,
    /// Open loop: the requests per second scheduled (`--rate`, or one of `--sweep`).
    pub(crate) rate: Option<f64>,
    /// Operations one call counts for (1 but for `update-bulk`).
    pub(crate) weight: u64,
    /// How long the scenario ran (`--duration`).
    pub(crate) duration: Duration,
    /// Seconds from the start to the last call's end (what the table's ops/s divides by).
    pub(crate) elapsed: f64,
    /// The run's counts, histograms and per-second buckets.
    pub(crate) stats: Stats,
    /// The target's CPU time (user + system, every process given for it) per successful
    /// operation over the run, in µs; `None` without its pid.
    pub(crate) server_cpu_us_per_op: Option<f64>,
}

impl RunOutcome {
    /// Successful operations per second, as the table prints it.
    pub(crate) fn ops_per_s(&self) -> f64 {
        self.stats.ops as f64 / self.elapsed.max(1e-9)
    }

    /// Open loop: the offered load in operations per second.
    pub(crate) fn offered(&self) -> Option<f64> {
        self.rate.map(|r| r * self.weight as f64)
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

/// The resident memory of the processes `pids`, summed; `None` when there are none or one
/// cannot be read.
pub(crate) fn rss_sum(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| rss_bytes(p)).sum()
}

/// Clock ticks per second: the unit of the CPU times in /proc/<pid>/stat.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a configuration value; it has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The CPU time in a /proc/<pid>/stat line, in clock ticks: utime + stime (fields 14 and
/// 15; the process's every thread, including those that exited).
pub(crate) fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    // Field 2, the command name, is in parentheses and may hold spaces or parentheses:
    // count from after its last ')', where field 3 begins.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU time the processes `pids` have used so far, in seconds, summed; `None` when
/// there are none or one cannot be read.
pub(crate) fn cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    let mut ticks = 0;
    for pid in pids {
        ticks += stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    }
    Some(ticks as f64 / ticks_per_second())
}

/// CPU µs per operation: the CPU seconds used from `before` to `after` over `ops`
/// operations; `None` when either reading is missing or nothing succeeded.
pub(crate) fn cpu_us_per_op(before: Option<f64>, after: Option<f64>, ops: u64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (ops > 0 && after >= before).then(|| (after - before) * 1e6 / ops as f64)
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
/// once) and its JSON line. `cpu_us_per_op`: the target's CPU time per operation, when
/// its pid was given, and the store's behind it, when its pids were (`--store-pid`).
pub(crate) fn print_run(
    args: &Args,
    target: &str,
    stats: &Stats,
    elapsed: f64,
    (cpu_us_per_op, store_cpu_us_per_op): (Option<f64>, Option<f64>),
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
            "| scenario | target | mode | ops/s | p50 µs | p99 µs | p99.9 µs | errors | unexpected | server CPU µs/op |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        *printed_header = true;
    }
    println!(
        "| {} | {target} | {mode} | {ops_per_s:.0} | {} | {} | {} | {} | {} | {} |",
        args.scenario.name(),
        q(0.5),
        q(0.99),
        q(0.999),
        stats.errors,
        stats.misses,
        cpu_us_per_op.map_or("—".to_string(), |c| format!("{c:.2}"))
    );
    let rss = rss_sum(&args.pids(target)).map_or(String::new(), |b| format!(",\"rss_bytes\":{b}"));
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
        // Closed loop: the sheds among the errors.
        format!(",\"shed\":{}", stats.shed)
    };
    let cpu = cpu_fields(cpu_us_per_op, store_cpu_us_per_op);
    println!(
        "{{\"scenario\":\"{}\",\"target\":\"{target}\",\"ops_per_s\":{ops_per_s:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{}{rss}{open}{cpu}}}",
        args.scenario.name(),
        q(0.5),
        q(0.99),
        q(0.999),
        stats.errors
    );
}

/// The JSON line's CPU fields: the target's (`server_cpu_us_per_op`) and the store's
/// behind it (`store_cpu_us_per_op`), each only when measured.
fn cpu_fields(server: Option<f64>, store: Option<f64>) -> String {
    let mut out = String::new();
    if let Some(c) = server {
        out.push_str(&format!(",\"server_cpu_us_per_op\":{c:.3}"));
    }
    if let Some(c) = store {
        out.push_str(&format!(",\"store_cpu_us_per_op\":{c:.3}"));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A synthetic run: `calls` successful calls a second for `secs` seconds, latencies
    /// spread from `base_ms` up to 10 × `base_ms`, and one error a second.
    pub(crate) fn synthetic(
        target: &str,
        rate: Option<f64>,
        base_ms: f64,
        calls: u64,
        secs: u64,
    ) -> RunOutcome {
        let mut stats = Stats::new();
        for s in 0..secs {
            for i in 0..calls {
                let ms = base_ms * (1.0 + 9.0 * (i as f64 / calls as f64).powi(4));
                stats.record(s, Duration::from_secs_f64(ms / 1e3), Ok(true), 1);
            }
            stats.record(
                s,
                Duration::from_millis(1),
                Err("Unavailable: down".into()),
                1,
            );
        }
        RunOutcome {
            target: target.into(),
            rate,
            weight: 1,
            duration: Duration::from_secs(secs),
            elapsed: secs as f64,
            stats,
            server_cpu_us_per_op: Some(base_ms * 100.0),
        }
    }

    #[test]
    fn cpu_time_is_read_from_proc_stat() {
        // A command name with spaces and a parenthesis; utime 1234, stime 56.
        let stat = "4242 (geo match) x) S 1 4242 4242 0 -1 4194560 9 0 0 0 1234 56 0 0 20 0 9 0 \
                    77 1000000 500 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat), Some(1290));
        assert_eq!(stat_cpu_ticks("4242 (x) S 1 2"), None);
        // This process has a readable stat; a pid that does not exist has none.
        let me = std::process::id();
        assert!(cpu_seconds(&[me]).is_some_and(|s| s >= 0.0));
        assert!(cpu_seconds(&[me, me]).is_some());
        assert_eq!(cpu_seconds(&[]), None);
        assert_eq!(cpu_seconds(&[me, u32::MAX]), None);
        assert!(rss_sum(&[me]).is_some_and(|b| b > 0));
        // 0.5 CPU s over 100 000 operations: 5 µs each.
        assert_eq!(cpu_us_per_op(Some(10.0), Some(10.5), 100_000), Some(5.0));
        assert_eq!(cpu_us_per_op(Some(10.0), Some(10.5), 0), None);
        assert_eq!(cpu_us_per_op(None, Some(10.5), 10), None);
    }

    #[test]
    fn the_json_line_carries_each_cpu_figure_measured() {
        assert_eq!(cpu_fields(None, None), "");
        assert_eq!(
            cpu_fields(Some(36.0), None),
            ",\"server_cpu_us_per_op\":36.000"
        );
        assert_eq!(
            cpu_fields(Some(36.0), Some(61.25)),
            ",\"server_cpu_us_per_op\":36.000,\"store_cpu_us_per_op\":61.250"
        );
        assert_eq!(
            cpu_fields(None, Some(4.5)),
            ",\"store_cpu_us_per_op\":4.500"
        );
    }

    #[test]
    fn per_second_buckets_count_ok_and_errors_and_merge() {
        let mut a = Stats::new();
        a.record(0, Duration::from_millis(1), Ok(true), 1);
        a.record(2, Duration::from_millis(1), Ok(false), 1000);
        a.record(2, Duration::from_millis(1), Err("x".into()), 1000);
        let mut b = Stats::new();
        b.record(1, Duration::from_millis(1), Ok(true), 1);
        b.record_dropped(3);
        a.merge(&b);
        let got: Vec<(u64, u64)> = a.per_second.iter().map(|s| (s.ok, s.errors)).collect();
        assert_eq!(got, vec![(1, 0), (1, 0), (1000, 1), (0, 1)]);
        assert_eq!((a.ops, a.errors, a.dropped), (1002, 2, 1));
    }
}
