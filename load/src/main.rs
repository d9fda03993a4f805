//! `geomatch-load`: a load generator for geomatch (and, for comparison, Redis and Valkey
//! GEO).
//!
//! It loads the standard population (see `geomatch_load::population`) in bulk, then runs
//! one scenario for a fixed duration, closed loop (`--concurrency` callers, as fast as they
//! go) or open loop (`--rate` requests/s on a fixed schedule, latency measured from each
//! request's scheduled send time so stalls are not hidden). It prints a progress line
//! every second, a table, and one JSON line per run. Loopback only; bounded in time.
//!
//! Built with the server by `cargo build --release` at the workspace root, as
//! `target/release/geomatch-load`; alone by `cargo build --release -p geomatch-load`.
//!
//! Scenarios:
//! - `update`: a random user moves a few metres;
//! - `search-dense-1km` / `search-dense-5km`: from a random city centre, limit 50;
//! - `search-sparse`: 10 km around a point at least 100 km from every city, limit 50;
//! - `shake`: pairs of users shake together at random places (every call should match);
//!   one op = one pair, latency = second arrival to both answered;
//! - `mixed`: 70 % update, 20 % search-dense-1km, 5 % search-dense-5km, 5 % search-sparse
//!   (the read/write blend of a People Nearby feature: pings far outnumber searches);
//! - `update-bulk` and `soak`: see `--help`.
//!
//! `--sweep RATES` runs open loop at each rate in turn (latency against offered load), and
//! `--report FILE.html` also writes a self-contained HTML report with SVG charts. With the
//! targets' pids (`--server-pid`, `--redis-pid`, `--valkey-pid`) each run also reports the
//! target's memory and its CPU time per operation.
//!
//! Modules: [`cli`] (flags and scenarios), [`scenario`] (one operation, any target),
//! [`grpc`] and [`redis_geo`] (geomatch; Redis and Valkey), [`retry`] (loading through load
//! shedding), [`run`] (closed and open loop, sweeps), [`report`] (histograms, table, JSON
//! lines, CPU and memory, soak verdicts), [`charts`] and [`html`] (the `--report`).

mod charts;
mod cli;
mod grpc;
mod html;
mod redis_geo;
mod report;
mod retry;
mod run;
mod scenario;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::Parser;
use geomatch_load::population;

use crate::{
    cli::{Args, Scenario},
    scenario::{Conn, Ctx},
};

/// The same allocator as the server: the harness shares the machine with the target, and
/// a cheaper client leaves more CPU to whichever target it measures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.duration > Duration::from_secs(3_600) {
        bail!("--duration: at most 1h");
    }
    let rates = args.rates()?;
    if let Some(path) = &args.report {
        html::check_path(path)?;
    }
    let grpc_addrs = if !args.grpc.is_empty() {
        args.grpc.clone()
    } else if args.redis.is_none() && args.valkey.is_none() {
        vec![SocketAddr::from(([127, 0, 0, 1], 50051))]
    } else {
        Vec::new()
    };
    // Connections to several replicas interleave, so callers (which take connections in
    // turn) are spread over every replica.
    let tls = match &args.tls_ca {
        Some(ca) => {
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca)?))
                .domain_name("localhost");
            if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    std::fs::read(cert)?,
                    std::fs::read(key)?,
                ));
            }
            Some(tls)
        }
        None => None,
    };
    let mut per_replica = Vec::new();
    for &addr in &grpc_addrs {
        cli::ensure_loopback(addr)?;
        per_replica.push(grpc::connect(addr, args.connections, tls.as_ref()).await?);
    }
    let mut channels = Vec::new();
    for i in 0..args.connections.max(1) {
        for conns in &per_replica {
            if let Some(c) = conns.get(i) {
                channels.push(c.clone());
            }
        }
    }
    // The RESP targets: Redis, then Valkey. One connection per caller: every command waits
    // for its reply before the caller sends the next (unpipelined), as a Redis client per
    // request handler would.
    let mut peers = Vec::new();
    for (target, url) in [("redis", &args.redis), ("valkey", &args.valkey)] {
        if let Some(url) = url {
            let conns = redis_geo::connect(target, url, args.concurrency).await?;
            peers.push((target, url.clone(), conns));
        }
    }
    // Shakes need no population; the soak's users enter through its own churn (a preloaded
    // million expiring at once would be one mass event, not churn, and the allocator takes
    // minutes to hand that memory back, which would mask the steady state the soak checks).
    if !args.skip_load
        && !matches!(
            args.scenario,
            Scenario::Shake | Scenario::Soak | Scenario::Noop
        )
    {
        if !channels.is_empty() {
            grpc::load_population(&channels, args.users, args.seed, args.concurrency.max(32))
                .await?;
        }
        for (target, _, conns) in &peers {
            redis_geo::load(target, conns, args.users, args.seed).await?;
        }
    }
    if !channels.is_empty() {
        for (target, _, conns) in &peers {
            redis_geo::cross_check(target, &channels, conns, args.seed).await?;
        }
    }
    let ctx = Ctx {
        scenario: args.scenario,
        users: args.users,
        positions: Arc::new(population::positions(args.users, args.seed)),
        pair_seq: Arc::new(AtomicU64::new(args.seed << 40)),
        shake_nonce: scenario::shake_nonce(args.shake_seed),
        search_nonce: rand::random(),
        started: Instant::now(),
        soak_active: args.soak_active,
        soak_turnover: args.soak_turnover,
    };
    // Every target with its connections, in the order they run: geomatch, Redis, Valkey.
    let mut targets: Vec<(&str, Vec<Conn>)> = Vec::new();
    let mut addresses = Vec::new();
    if !channels.is_empty() {
        targets.push(("grpc", channels.iter().cloned().map(Conn::Grpc).collect()));
        let addrs: Vec<String> = grpc_addrs.iter().map(ToString::to_string).collect();
        addresses.push(("grpc", addrs.join(", ")));
    }
    for (target, url, conns) in &peers {
        targets.push((target, conns.iter().cloned().map(Conn::Redis).collect()));
        addresses.push((target, url.clone()));
    }
    let names: Vec<&str> = targets.iter().map(|(t, _)| *t).collect();
    let mut printed_header = false;
    let runs = run::run_all(&names, &rates, async |target, rate| {
        if target != "grpc" && matches!(args.scenario, Scenario::Shake | Scenario::Soak) {
            bail!(
                "scenario {} has no {} equivalent",
                args.scenario.name(),
                redis_geo::human(target)
            );
        }
        let Some((_, conns)) = targets.iter().find(|(t, _)| *t == target) else {
            bail!("no connections to {target}");
        };
        let mut at_rate = args.clone();
        at_rate.rate = rate;
        run::run(&at_rate, &ctx, target, conns, &mut printed_header).await
    })
    .await?;
    if let Some(path) = &args.report {
        let written = html::write(path, &args, &addresses, &runs)?;
        for f in written {
            eprintln!("report: {}", f.display());
        }
    }
    Ok(())
}
