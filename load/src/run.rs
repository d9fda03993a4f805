//! The driver: closed-loop workers or an open-loop schedule, a progress line, and the
//! soak's RSS sampler.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    cli::{Args, Scenario},
    grpc, redis_geo,
    report::{
        RunOutcome, Stats, cpu_seconds, cpu_us_per_op, lock, print_run, rss_sum, soak_report,
    },
    scenario::{Conn, Ctx, OpResult, weight},
};

/// Runs every target at every rate of `rates` in turn (target by target, the rates in the
/// order given), through `one`, and returns the runs' outcomes in that order.
pub(crate) async fn run_all(
    targets: &[&str],
    rates: &[Option<f64>],
    mut one: impl AsyncFnMut(&str, Option<f64>) -> anyhow::Result<RunOutcome>,
) -> anyhow::Result<Vec<RunOutcome>> {
    let mut out = Vec::with_capacity(targets.len() * rates.len());
    for target in targets {
        for &rate in rates {
            out.push(one(target, rate).await?);
        }
    }
    Ok(out)
}

/// Runs the scenario against one target for `--duration`, closed or open loop (`--rate`),
/// prints its table row (after the header, once) and JSON line, and returns its outcome.
pub(crate) async fn run(
    args: &Args,
    ctx: &Ctx,
    target: &str,
    conns: &[Conn],
    printed_header: &mut bool,
) -> anyhow::Result<RunOutcome> {
    let total = Arc::new(Mutex::new(Stats::new()));
    let done = Arc::new(AtomicBool::new(false));
    let progress_ops = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + args.duration;

    let progress = {
        let (done, ops) = (done.clone(), progress_ops.clone());
        let target = target.to_string();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                let now = ops.load(Ordering::Relaxed);
                eprint!(
                    "\r{target}: {:>5.1} s  {:>9} ops/s  ",
                    started.elapsed().as_secs_f64(),
                    now - last
                );
                last = now;
            }
            eprintln!();
        })
    };
    // Soak: the server's RSS every 10 s.
    let samples =
        (args.scenario == Scenario::Soak && target == "grpc" && !args.server_pid.is_empty())
            .then(|| args.server_pid.clone())
            .map(|pids| {
                let done = done.clone();
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    let mut tick = tokio::time::interval(Duration::from_secs(10));
                    loop {
                        tick.tick().await;
                        // Only samples taken under load: the last tick may fall after it.
                        if done.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Some(b) = rss_sum(&pids) {
                            out.push((started.elapsed().as_secs(), b));
                        }
                    }
                    out
                })
            });
    // The target's CPU time over the measured window: from here to the last call's answer.
    let pids = args.pids(target);
    let cpu_before = cpu_seconds(&pids);
    let store_pids = args.store_pids(target);
    let store_before = cpu_seconds(&store_pids);
    let mut workers = Vec::new();
    match args.rate {
        None => {
            for w in 0..args.concurrency.max(1) {
                let (ctx, conn, total, ops) = (
                    ctx.clone(),
                    conns[w % conns.len()].clone(),
                    total.clone(),
                    progress_ops.clone(),
                );
                let mut rng =
                    StdRng::seed_from_u64(args.seed ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9));
                workers.push(tokio::spawn(async move {
                    let mut mine = Stats::new();
                    while Instant::now() < end {
                        let t = Instant::now();
                        let r = one_op(&ctx, &mut rng, &conn).await;
                        mine.record(
                            started.elapsed().as_secs(),
                            t.elapsed(),
                            r,
                            weight(ctx.scenario),
                        );
                        ops.fetch_add(weight(ctx.scenario), Ordering::Relaxed);
                    }
                    lock(&total).merge(&mine);
                }));
            }
        }
        Some(rate) => {
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate {rate}: must be a positive number of requests per second");
            }
            let interval = Duration::from_secs_f64(1.0 / rate);
            // The schedule runs on its own OS thread: std's sleep is precise to tens of µs,
            // where tokio's timer wheel would add up to a millisecond to every latency.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let scheduled = started + interval.mul_f64(i as f64);
                    if scheduled >= end {
                        break;
                    }
                    if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if tx.send(scheduled).is_err() {
                        break;
                    }
                }
            });
            let in_flight = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
            let mut rng = StdRng::seed_from_u64(args.seed);
            let mut i: usize = 0;
            while let Some(scheduled) = rx.recv().await {
                let (ctx, conn, total, ops) = (
                    ctx.clone(),
                    conns[i % conns.len()].clone(),
                    total.clone(),
                    progress_ops.clone(),
                );
                let mut op_rng = StdRng::seed_from_u64(rng.random());
                match in_flight.clone().try_acquire_owned() {
                    Ok(permit) => workers.push(tokio::spawn(async move {
                        let sent = Instant::now();
                        let r = one_op(&ctx, &mut op_rng, &conn).await;
                        // Latency from the scheduled send time: a stalled server shows up here.
                        lock(&total).record_sent(
                            started.elapsed().as_secs(),
                            scheduled.elapsed(),
                            sent.elapsed(),
                            r,
                            weight(ctx.scenario),
                        );
                        ops.fetch_add(weight(ctx.scenario), Ordering::Relaxed);
                        drop(permit);
                    })),
                    // Over the in-flight bound: counted as an error, never silently delayed.
                    Err(_) => lock(&total).record_dropped(started.elapsed().as_secs()),
                }
                i += 1;
            }
        }
    }
    for w in workers {
        w.await?;
    }
    let cpu_after = cpu_seconds(&pids);
    let store_after = cpu_seconds(&store_pids);
    let elapsed = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = progress.await;
    if let Some(samples) = samples {
        soak_report(args, &samples.await?).await?;
    }

    let stats = std::mem::replace(&mut *lock(&total), Stats::new());
    let server_cpu_us_per_op = cpu_us_per_op(cpu_before, cpu_after, stats.ops);
    let store_cpu_us_per_op = cpu_us_per_op(store_before, store_after, stats.ops);
    print_run(
        args,
        target,
        &stats,
        elapsed,
        (server_cpu_us_per_op, store_cpu_us_per_op),
        printed_header,
    );
    Ok(RunOutcome {
        target: target.to_string(),
        rate: args.rate,
        weight: weight(args.scenario),
        duration: args.duration,
        elapsed,
        stats,
        server_cpu_us_per_op,
    })
}

/// Runs one operation; `Ok(true)` when it did what the scenario expects.
async fn one_op(ctx: &Ctx, rng: &mut StdRng, conn: &Conn) -> OpResult {
    match conn {
        Conn::Grpc(ch) => grpc::op(ctx, rng, ch)
            .await
            .map_err(|e| format!("{:?}: {}", e.code(), e.message())),
        Conn::Redis(c) => redis_geo::op(ctx, rng, &mut c.clone())
            .await
            .map_err(|e| e.to_string()),
    }
}
