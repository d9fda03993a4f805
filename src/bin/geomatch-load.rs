//! `geomatch-load`: a load generator for geomatch (and, for comparison, Redis GEO).
//!
//! It loads the standard population (see `geomatch::population`) in bulk, then runs one
//! scenario for a fixed duration, closed loop (`--concurrency` callers, as fast as they
//! go) or open loop (`--rate` requests/s on a fixed schedule, latency measured from each
//! request's scheduled send time so stalls are not hidden). It prints a progress line
//! every second, a table, and one JSON line per run. Loopback only; bounded in time.
//!
//! Scenarios:
//! - `update`: a random user moves a few metres;
//! - `search-dense-1km` / `search-dense-5km`: from a random city centre, limit 50;
//! - `search-sparse`: 10 km around a point at least 100 km from every city, limit 50;
//! - `shake`: pairs of users shake together at random places (every call should match);
//!   one op = one pair, latency = second arrival to both answered;
//! - `mixed`: 70 % update, 20 % search-dense-1km, 5 % search-dense-5km, 5 % search-sparse
//!   (the read/write blend of a People Nearby feature: pings far outnumber searches).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use geomatch::{
    grpc::pb::{
        self, nearby_client::NearbyClient, shake_client::ShakeClient, shake_response::Outcome,
    },
    population::{self, CITIES},
};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::transport::{Channel, Endpoint};

/// The same allocator as the server: the harness shares the machine with the target, and
/// a cheaper client leaves more CPU to whichever target it measures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
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
    /// Churn for a long run (gRPC only): a window of active users slides through the
    /// population (users join, move, clear, and expire once they fall behind it), with
    /// searches and bulk pings from active users and shakes from a fixed pool of pairs. The
    /// population is not preloaded: users enter through the churn. Refusals by the abuse controls count as "unexpected", not errors; RSS is sampled
    /// every 10 s, and the server's waiting shakes and watches must be back to zero after.
    Soak,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Update => "update",
            Self::UpdateBulk => "update-bulk",
            Self::SearchDense1km => "search-dense-1km",
            Self::SearchDense5km => "search-dense-5km",
            Self::SearchSparse => "search-sparse",
            Self::Shake => "shake",
            Self::Mixed => "mixed",
            Self::Soak => "soak",
        }
    }
}

/// Load generator for geomatch: standard population, scenarios, closed or open loop.
#[derive(Debug, Parser)]
#[command(name = "geomatch-load", version, about)]
struct Args {
    /// What to run.
    #[arg(long, value_enum, default_value = "search-dense-1km")]
    scenario: Scenario,
    /// geomatch gRPC address (loopback). Default 127.0.0.1:50051 when no --redis is given.
    #[arg(long)]
    grpc: Option<SocketAddr>,
    /// Redis/Valkey URL (loopback), e.g. redis://127.0.0.1:6390: the same scenario with
    /// GEOADD / GEOSEARCH. With --grpc as well, both are loaded, a sample of searches is
    /// cross-checked, and the scenario runs against each in turn (one JSON line each).
    #[arg(long)]
    redis: Option<String>,
    /// Population size.
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
    /// Concurrent callers (closed loop) or most requests in flight (open loop).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How long the scenario runs (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Open loop: requests per second on a fixed schedule. Closed loop when not given.
    #[arg(long)]
    rate: Option<f64>,
    /// Population and request seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Do not load the population (the server already holds it from an earlier run).
    #[arg(long)]
    skip_load: bool,
    /// Report this process's resident memory (e.g. the server's pid) in the JSON line.
    #[arg(long)]
    server_pid: Option<u32>,
    /// soak: users active at once (the sliding window).
    #[arg(long, default_value_t = 100_000)]
    soak_active: u64,
    /// soak: how long the window takes to move by its own size (users' turnover).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    soak_turnover: Duration,
    /// The server's metrics address (loopback), to check after a soak that no shakes are
    /// left waiting and no watches open.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
}

fn ensure_loopback(addr: SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("--grpc {addr}: load tests may only target loopback addresses");
    }
    Ok(())
}

const REDIS_KEY: &str = "geomatch:users";

async fn redis_connect(
    url: &str,
    n: usize,
) -> anyhow::Result<Vec<redis::aio::MultiplexedConnection>> {
    let client = redis::Client::open(url).with_context(|| format!("--redis {url}"))?;
    let loopback = match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => {
            host == "localhost"
                || host
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        _ => true,
    };
    if !loopback {
        bail!("--redis {url}: load tests may only target loopback addresses");
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(
            client
                .get_multiplexed_async_connection_with_config(
                    // A slow command (a 5 km GEOSEARCH) queued behind others is slow, not
                    // an error.
                    &redis::AsyncConnectionConfig::new()
                        .set_response_timeout(Some(Duration::from_secs(60))),
                )
                .await
                .with_context(|| format!("connecting to {url}"))?,
        );
    }
    Ok(out)
}

async fn redis_load(
    conns: &[redis::aio::MultiplexedConnection],
    users: u64,
    seed: u64,
) -> anyhow::Result<()> {
    let positions = population::positions(users, seed);
    let started = Instant::now();
    let mut c = conns[0].clone();
    redis::cmd("DEL")
        .arg(REDIS_KEY)
        .query_async::<()>(&mut c)
        .await?;
    // Bulk, not timed in the scenario: 1 000 members per GEOADD, 8 batches in flight.
    let mut in_flight = Vec::new();
    for (b, chunk) in positions.chunks(1_000).enumerate() {
        let mut cmd = redis::cmd("GEOADD");
        cmd.arg(REDIS_KEY);
        for (j, (lat, lng)) in chunk.iter().enumerate() {
            let i = (b * 1_000 + j) as u64;
            cmd.arg(*lng)
                .arg(lat.clamp(-85.05, 85.05))
                .arg(population::user_id(i));
        }
        let mut c = conns[b % conns.len()].clone();
        in_flight.push(tokio::spawn(
            async move { cmd.query_async::<i64>(&mut c).await },
        ));
        if in_flight.len() >= 8 {
            in_flight.remove(0).await??;
        }
    }
    for t in in_flight {
        t.await??;
    }
    eprintln!(
        "redis: loaded {users} users in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn redis_search(
    c: &mut redis::aio::MultiplexedConnection,
    (lat, lng): (f64, f64),
    radius_m: f64,
) -> redis::RedisResult<Vec<(String, f64)>> {
    redis::cmd("GEOSEARCH")
        .arg(REDIS_KEY)
        .arg("FROMLONLAT")
        .arg(lng)
        .arg(lat)
        .arg("BYRADIUS")
        .arg(radius_m)
        .arg("m")
        .arg("ASC")
        .arg("COUNT")
        .arg(50)
        .arg("WITHDIST")
        .query_async(c)
        .await
}

async fn connect(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        out.push(ch);
    }
    Ok(out)
}

fn update(i: u64, (lat, lng): (f64, f64)) -> pb::UpdateLocationRequest {
    pb::UpdateLocationRequest {
        user_id: population::user_id(i),
        position: Some(pb::LatLng { lat, lng }),
        gender: (i % 3) as i32,
        ..Default::default()
    }
}

async fn load_population(
    channels: &[Channel],
    users: u64,
    seed: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let positions = Arc::new(population::positions(users, seed));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency.max(1) {
        let mut c = NearbyClient::new(channels[w % channels.len()].clone());
        let (positions, next) = (positions.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= users {
                    return Ok::<_, tonic::Status>(());
                }
                c.update_location(update(i, positions[i as usize])).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    eprintln!(
        "loaded {users} users in {:.1} s ({:.0} pings/s)",
        started.elapsed().as_secs_f64(),
        users as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where operations go.
#[derive(Clone)]
enum Conn {
    Grpc(Channel),
    Redis(redis::aio::MultiplexedConnection),
}

/// Everything a worker needs to issue one operation.
#[derive(Clone)]
struct Ctx {
    scenario: Scenario,
    users: u64,
    positions: Arc<Vec<(f64, f64)>>,
    pair_seq: Arc<AtomicU64>,
    started: Instant,
    soak_active: u64,
    soak_turnover: Duration,
}

impl Ctx {
    /// A user of the soak's current window.
    fn active_user(&self, rng: &mut StdRng) -> u64 {
        let turns = self.started.elapsed().as_secs_f64() / self.soak_turnover.as_secs_f64();
        let base = (turns * self.soak_active as f64) as u64;
        (base + rng.random_range(0..self.soak_active.max(1))) % self.users.max(1)
    }

    /// User `i` moved a few metres from their population position.
    fn moved(&self, i: u64, rng: &mut StdRng) -> (f64, f64) {
        let (lat, lng) = self.positions[i as usize];
        population::offset(
            lat,
            lng,
            rng.random_range(-10.0..10.0),
            rng.random_range(-10.0..10.0),
        )
    }
}

type ShakeAnswer = Result<tonic::Response<pb::ShakeResponse>, tonic::Status>;

/// Users `{who}:0` and `{who}:1` shake at once at the same spot (shake id `n`), within
/// 100 m of each other: every call should match.
async fn shake_pair(
    ch: &Channel,
    who: &str,
    n: u64,
    (lat, lng): (f64, f64),
) -> (ShakeAnswer, ShakeAnswer) {
    let req = |side: u64| pb::ShakeRequest {
        user_id: format!("{who}:{side}"),
        position: Some(pb::LatLng { lat, lng }),
        shake_id: format!("{n}"),
        max_distance_m: 100.0,
        ..Default::default()
    };
    let mut a = ShakeClient::new(ch.clone());
    let mut b = ShakeClient::new(ch.clone());
    tokio::join!(a.shake(req(0)), b.shake(req(1)))
}

/// Pairs of soak shakers: each pair always shakes at its own fixed spot.
const SOAK_SHAKE_PAIRS: u64 = 20_000;

/// One soak operation. Refusals by the abuse controls (RESOURCE_EXHAUSTED,
/// FAILED_PRECONDITION) are `Ok(false)`; anything else unexpected is an error.
async fn soak_op(ctx: &Ctx, rng: &mut StdRng, ch: &Channel) -> Result<bool, tonic::Status> {
    let refusal = |s: tonic::Status| match s.code() {
        tonic::Code::ResourceExhausted | tonic::Code::FailedPrecondition => Ok(false),
        _ => Err(s),
    };
    let mut nearby = NearbyClient::new(ch.clone());
    match rng.random_range(0..100) {
        0..45 => {
            let i = ctx.active_user(rng);
            let p = ctx.moved(i, rng);
            match nearby.update_location(update(i, p)).await {
                Ok(_) => Ok(true),
                Err(s) => refusal(s),
            }
        }
        45..50 => {
            let i = ctx.active_user(rng);
            nearby
                .clear_location(pb::ClearLocationRequest {
                    user_id: population::user_id(i),
                })
                .await?;
            Ok(true)
        }
        50..80 => {
            let i = ctx.active_user(rng);
            let (lat, lng) = ctx.moved(i, rng);
            let req = pb::SearchNearbyRequest {
                user_id: population::user_id(i),
                position: Some(pb::LatLng { lat, lng }),
                radius_m: [1_000.0, 3_000.0][rng.random_range(0..2)],
                limit: 20,
                ..Default::default()
            };
            match nearby.search_nearby(req).await {
                Ok(_) => Ok(true),
                Err(s) => refusal(s),
            }
        }
        80..90 => {
            let batch: Vec<_> = (0..50)
                .map(|_| {
                    let i = ctx.active_user(rng);
                    update(i, ctx.moved(i, rng))
                })
                .collect();
            let s = nearby
                .update_locations(tokio_stream::iter(batch))
                .await?
                .into_inner();
            Ok(s.rejected == 0)
        }
        _ => {
            let k = rng.random_range(0..SOAK_SHAKE_PAIRS);
            let mut spot = StdRng::seed_from_u64(k);
            let (lat, lng) = (
                spot.random_range(20.0..45.0),
                spot.random_range(100.0..125.0),
            );
            let n = ctx.pair_seq.fetch_add(1, Ordering::Relaxed);
            match shake_pair(ch, &format!("soak-shaker:{k}"), n, (lat, lng)).await {
                (Ok(_), Ok(_)) => Ok(true),
                (Err(s), _) | (_, Err(s)) => refusal(s),
            }
        }
    }
}

/// The soak's verdicts: RSS flat after warm-up (the first fifth of the run, which covers
/// the loaded population expiring), and nothing left waiting once the load stops.
async fn soak_report(args: &Args, samples: &[(u64, u64)]) -> anyhow::Result<()> {
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

fn search(rng: &mut StdRng, (lat, lng): (f64, f64), radius_m: f64) -> pb::SearchNearbyRequest {
    // A fresh searcher each time: a population user searching from a random city would
    // be refused as impossible travel, and one id searching all run long would be
    // rate-limited, as a scraper is.
    pb::SearchNearbyRequest {
        user_id: format!("searcher:{:016x}", rng.random::<u64>()),
        position: Some(pb::LatLng { lat, lng }),
        radius_m,
        limit: 50,
        ..Default::default()
    }
}

fn city(rng: &mut StdRng) -> (f64, f64) {
    let (_, lat, lng) = CITIES[rng.random_range(0..CITIES.len())];
    (lat, lng)
}

/// Pings per `update-bulk` operation.
const BULK_BATCH: u64 = 1_000;

/// Pings that make one bulk batch: random users, each moved a few metres.
fn bulk_batch(ctx: &Ctx, rng: &mut StdRng) -> Vec<(u64, (f64, f64))> {
    (0..BULK_BATCH)
        .map(|_| {
            let i = rng.random_range(0..ctx.users);
            (i, ctx.moved(i, rng))
        })
        .collect()
}

/// Operations one call of `scenario` counts for.
fn weight(scenario: Scenario) -> u64 {
    if scenario == Scenario::UpdateBulk {
        BULK_BATCH
    } else {
        1
    }
}

/// The scenario one operation of `scenario` runs (mixed picks one).
fn pick(scenario: Scenario, rng: &mut StdRng) -> Scenario {
    match scenario {
        Scenario::Mixed => match rng.random_range(0..100) {
            0..70 => Scenario::Update,
            70..90 => Scenario::SearchDense1km,
            90..95 => Scenario::SearchDense5km,
            _ => Scenario::SearchSparse,
        },
        s => s,
    }
}

type OpResult = Result<bool, String>;

/// Runs one operation; `Ok(true)` when it did what the scenario expects.
async fn one_op(ctx: &Ctx, rng: &mut StdRng, conn: &Conn) -> OpResult {
    match conn {
        Conn::Grpc(ch) => grpc_op(ctx, rng, ch)
            .await
            .map_err(|e| format!("{:?}: {}", e.code(), e.message())),
        Conn::Redis(c) => redis_op(ctx, rng, &mut c.clone())
            .await
            .map_err(|e| e.to_string()),
    }
}

async fn redis_op(
    ctx: &Ctx,
    rng: &mut StdRng,
    c: &mut redis::aio::MultiplexedConnection,
) -> redis::RedisResult<bool> {
    match pick(ctx.scenario, rng) {
        Scenario::UpdateBulk => {
            let mut pipe = redis::pipe();
            for (i, (lat, lng)) in bulk_batch(ctx, rng) {
                pipe.cmd("GEOADD")
                    .arg(REDIS_KEY)
                    .arg(lng)
                    .arg(lat.clamp(-85.05, 85.05))
                    .arg(population::user_id(i))
                    .ignore();
            }
            pipe.query_async::<()>(c).await?;
            Ok(true)
        }
        Scenario::Update => {
            let i = rng.random_range(0..ctx.users);
            let (lat, lng) = ctx.moved(i, rng);
            redis::cmd("GEOADD")
                .arg(REDIS_KEY)
                .arg(lng)
                .arg(lat.clamp(-85.05, 85.05))
                .arg(population::user_id(i))
                .query_async::<i64>(c)
                .await?;
            Ok(true)
        }
        s @ (Scenario::SearchDense1km | Scenario::SearchDense5km) => {
            let r = if s == Scenario::SearchDense1km {
                1_000.0
            } else {
                5_000.0
            };
            Ok(!redis_search(c, city(rng), r).await?.is_empty())
        }
        Scenario::SearchSparse => {
            redis_search(c, population::sparse_point(rng), 10_000.0).await?;
            Ok(true)
        }
        Scenario::Shake | Scenario::Mixed | Scenario::Soak => Ok(false),
    }
}

async fn grpc_op(ctx: &Ctx, rng: &mut StdRng, ch: &Channel) -> Result<bool, tonic::Status> {
    let scenario = pick(ctx.scenario, rng);
    if scenario == Scenario::Soak {
        return soak_op(ctx, rng, ch).await;
    }
    let mut nearby = NearbyClient::new(ch.clone());
    match scenario {
        Scenario::UpdateBulk => {
            let batch: Vec<_> = bulk_batch(ctx, rng)
                .into_iter()
                .map(|(i, moved)| update(i, moved))
                .collect();
            let summary = nearby
                .update_locations(tokio_stream::iter(batch))
                .await?
                .into_inner();
            Ok(summary.accepted == BULK_BATCH)
        }
        Scenario::Update => {
            let i = rng.random_range(0..ctx.users);
            nearby.update_location(update(i, ctx.moved(i, rng))).await?;
            Ok(true)
        }
        Scenario::SearchDense1km | Scenario::SearchDense5km => {
            let r = if scenario == Scenario::SearchDense1km {
                1_000.0
            } else {
                5_000.0
            };
            let centre = city(rng);
            let req = search(rng, centre, r);
            Ok(!nearby
                .search_nearby(req)
                .await?
                .into_inner()
                .users
                .is_empty())
        }
        Scenario::SearchSparse => {
            let centre = population::sparse_point(rng);
            let req = search(rng, centre, 10_000.0);
            nearby.search_nearby(req).await?;
            Ok(true)
        }
        Scenario::Shake | Scenario::Mixed | Scenario::Soak => {
            let n = ctx.pair_seq.fetch_add(1, Ordering::Relaxed);
            let (lat, lng) = (rng.random_range(20.0..45.0), rng.random_range(100.0..125.0));
            let (ra, rb) = shake_pair(ch, &format!("shaker:{n}"), n, (lat, lng)).await;
            let (ra, rb) = (ra?.into_inner(), rb?.into_inner());
            Ok(ra.outcome() == Outcome::Matched
                && rb.outcome() == Outcome::Matched
                && ra.match_id == rb.match_id)
        }
    }
}

/// Errors a run reports word for word (on stderr).
const FIRST_ERRORS: usize = 5;

struct Stats {
    hist: Histogram<u64>,
    /// Open loop: latency from the actual send, which leaves out the harness's own lag
    /// behind the schedule (the server's share).
    sent_hist: Histogram<u64>,
    ops: u64,
    errors: u64,
    /// Errors that were the server shedding load (RESOURCE_EXHAUSTED).
    shed: u64,
    /// Open loop: scheduled calls not sent because `--concurrency` were in flight.
    dropped: u64,
    misses: u64,
    /// The first few errors, as reported (code and message), to say what went wrong.
    first_errors: Vec<String>,
}

impl Stats {
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            sent_hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            ops: 0,
            errors: 0,
            shed: 0,
            dropped: 0,
            misses: 0,
            first_errors: Vec::new(),
        }
    }

    /// Records one call that counted for `weight` operations.
    fn record(&mut self, latency: Duration, result: OpResult, weight: u64) {
        self.record_sent(latency, latency, result, weight);
    }

    /// Records one call: `latency` from its scheduled time, `sent` from its actual send.
    fn record_sent(&mut self, latency: Duration, sent: Duration, result: OpResult, weight: u64) {
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

    fn merge(&mut self, other: &Stats) {
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

fn rss_bytes(pid: u32) -> Option<u64> {
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

/// Checks that both targets hold the same population and do the same work, on a sample of
/// dense 1 km searches. geomatch measures to privacy-snapped positions (cell centres, at
/// most ~300 m from the true position), so: everyone Redis finds within 700 m must be in
/// geomatch's full 1 km answer (all pages), and both find about as many within 1 km.
async fn cross_check(
    channels: &[Channel],
    redis: &[redis::aio::MultiplexedConnection],
    seed: u64,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xC4EC);
    let mut nearby = NearbyClient::new(channels[0].clone());
    let mut r = redis[0].clone();
    let mut ratios = Vec::new();
    for _ in 0..20 {
        let (clat, clng) = city(&mut rng);
        let centre = population::offset(
            clat,
            clng,
            rng.random_range(-3_000.0..3_000.0),
            rng.random_range(-3_000.0..3_000.0),
        );
        let mut req = search(&mut rng, centre, 1_000.0);
        req.limit = 100;
        let searcher = req.user_id.clone();
        let mut ours = std::collections::HashSet::new();
        loop {
            let page = nearby.search_nearby(req.clone()).await?.into_inner();
            ours.extend(page.users.into_iter().map(|u| u.user_id));
            if page.next_page_token.is_empty() {
                break;
            }
            req.page_token = page.next_page_token;
        }
        let within = |radius: f64| {
            redis::cmd("GEOSEARCH")
                .arg(REDIS_KEY)
                .arg("FROMLONLAT")
                .arg(centre.1)
                .arg(centre.0)
                .arg("BYRADIUS")
                .arg(radius)
                .arg("m")
                .clone()
        };
        let inner: Vec<String> = within(700.0).query_async(&mut r).await?;
        let all: Vec<String> = within(1_000.0).query_async(&mut r).await?;
        let missing = inner
            .iter()
            .filter(|u| **u != searcher && !ours.contains(*u))
            .count();
        if missing > 0 {
            bail!(
                "cross-check failed: geomatch misses {missing} of the {} users Redis finds within 700 m",
                inner.len()
            );
        }
        if all.len() >= 20 {
            ratios.push(ours.len() as f64 / all.len() as f64);
        }
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(1.0);
    eprintln!(
        "cross-check: 20 dense 1 km searches agree (inner 700 m fully found; geomatch/Redis count ratio, median {median:.2})"
    );
    if !(0.8..=1.25).contains(&median) {
        bail!(
            "cross-check failed: the targets hold different populations (count ratio {median:.2})"
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.duration > Duration::from_secs(3_600) {
        bail!("--duration: at most 1h");
    }
    let grpc_addr = match (args.grpc, &args.redis) {
        (Some(a), _) => Some(a),
        (None, None) => Some(SocketAddr::from(([127, 0, 0, 1], 50051))),
        (None, Some(_)) => None,
    };
    let channels = match grpc_addr {
        Some(addr) => {
            ensure_loopback(addr)?;
            connect(addr, args.connections).await?
        }
        None => Vec::new(),
    };
    let redis = match &args.redis {
        // One connection per caller: every command waits for its reply before the caller
        // sends the next (unpipelined), as a Redis client per request handler would.
        Some(url) => redis_connect(url, args.concurrency).await?,
        None => Vec::new(),
    };
    // Shakes need no population; the soak's users enter through its own churn (a preloaded
    // million expiring at once would be one mass event, not churn, and the allocator takes
    // minutes to hand that memory back, which would mask the steady state the soak checks).
    if !args.skip_load && !matches!(args.scenario, Scenario::Shake | Scenario::Soak) {
        if !channels.is_empty() {
            load_population(&channels, args.users, args.seed, args.concurrency.max(32)).await?;
        }
        if !redis.is_empty() {
            redis_load(&redis, args.users, args.seed).await?;
        }
    }
    if !channels.is_empty() && !redis.is_empty() {
        cross_check(&channels, &redis, args.seed).await?;
    }
    let ctx = Ctx {
        scenario: args.scenario,
        users: args.users,
        positions: Arc::new(population::positions(args.users, args.seed)),
        pair_seq: Arc::new(AtomicU64::new(args.seed << 40)),
        started: Instant::now(),
        soak_active: args.soak_active,
        soak_turnover: args.soak_turnover,
    };
    let mut printed_header = false;
    if !channels.is_empty() {
        let conns: Vec<Conn> = channels.iter().cloned().map(Conn::Grpc).collect();
        run(&args, &ctx, "grpc", &conns, &mut printed_header).await?;
    }
    if !redis.is_empty() {
        if matches!(args.scenario, Scenario::Shake | Scenario::Soak) {
            bail!("scenario {} has no Redis equivalent", args.scenario.name());
        }
        let conns: Vec<Conn> = redis.iter().cloned().map(Conn::Redis).collect();
        run(&args, &ctx, "redis", &conns, &mut printed_header).await?;
    }
    Ok(())
}

async fn run(
    args: &Args,
    ctx: &Ctx,
    target: &str,
    conns: &[Conn],
    printed_header: &mut bool,
) -> anyhow::Result<()> {
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
    let samples = (args.scenario == Scenario::Soak && target == "grpc")
        .then_some(args.server_pid)
        .flatten()
        .map(|pid| {
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
                    if let Some(b) = rss_bytes(pid) {
                        out.push((started.elapsed().as_secs(), b));
                    }
                }
                out
            })
        });
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
                        mine.record(t.elapsed(), r, weight(ctx.scenario));
                        ops.fetch_add(weight(ctx.scenario), Ordering::Relaxed);
                    }
                    total.lock().unwrap().merge(&mine);
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
                        total.lock().unwrap().record_sent(
                            scheduled.elapsed(),
                            sent.elapsed(),
                            r,
                            weight(ctx.scenario),
                        );
                        ops.fetch_add(weight(ctx.scenario), Ordering::Relaxed);
                        drop(permit);
                    })),
                    // Over the in-flight bound: counted as an error, never silently delayed.
                    Err(_) => {
                        let mut t = total.lock().unwrap();
                        t.errors += 1;
                        t.dropped += 1;
                    }
                }
                i += 1;
            }
        }
    }
    for w in workers {
        w.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = progress.await;
    if let Some(samples) = samples {
        soak_report(args, &samples.await?).await?;
    }

    let stats = total.lock().unwrap();
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
    Ok(())
}
