//! The Redis / Valkey GEO target: connecting, loading the population, each scenario's
//! operation, and the cross-check against geomatch.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use geomatch::grpc::pb::nearby_client::NearbyClient;
use geomatch_load::population;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::transport::Channel;

use crate::{
    cli::Scenario,
    retry::{self, Backoff},
    scenario::{Ctx, bulk_batch, city, pick, search},
};

/// The sorted set that holds the population.
const REDIS_KEY: &str = "geomatch:users";

/// A RESP target's name for people: "Redis" for the target `redis`, "Valkey" for `valkey`.
pub(crate) fn human(target: &str) -> &str {
    match target {
        "redis" => "Redis",
        "valkey" => "Valkey",
        other => other,
    }
}

/// Opens `n` (at least one) connections to the Redis / Valkey at `url` (loopback only),
/// the target `target` (`redis` or `valkey`: its flag in messages).
pub(crate) async fn connect(
    target: &str,
    url: &str,
    n: usize,
) -> anyhow::Result<Vec<redis::aio::MultiplexedConnection>> {
    let client = redis::Client::open(url).with_context(|| format!("--{target} {url}"))?;
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
        bail!("--{target} {url}: load tests may only target loopback addresses");
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

/// Loads the population into the target `target` with GEOADD, 1 000 members per command
/// (not timed). A command the server is too busy for (or whose reply timed out) is retried
/// after a backoff (see [`retry`]); the load fails on another error, or once one command
/// has failed for [`retry::GIVE_UP`].
pub(crate) async fn load(
    target: &str,
    conns: &[redis::aio::MultiplexedConnection],
    users: u64,
    seed: u64,
) -> anyhow::Result<()> {
    let positions = population::positions(users, seed);
    let started = Instant::now();
    let retries = Arc::new(AtomicU64::new(0));
    let c = &conns[0];
    let mut backoff = Backoff::standard();
    retry::retry(&mut backoff, &retries, retry::redis_transient, || {
        let mut c = c.clone();
        async move {
            redis::cmd("DEL")
                .arg(REDIS_KEY)
                .query_async::<()>(&mut c)
                .await
        }
    })
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
        let c = conns[b % conns.len()].clone();
        let retries = retries.clone();
        // Adding the same members again is harmless: a retried batch changes nothing more.
        in_flight.push(tokio::spawn(async move {
            let mut backoff = Backoff::standard();
            retry::retry(&mut backoff, &retries, retry::redis_transient, || {
                let (mut c, cmd) = (c.clone(), cmd.clone());
                async move { cmd.query_async::<i64>(&mut c).await }
            })
            .await
        }));
        if in_flight.len() >= 8 {
            in_flight.remove(0).await??;
        }
    }
    for t in in_flight {
        t.await??;
    }
    eprintln!(
        "{target}: loaded {users} users in {:.1} s ({} retries)",
        started.elapsed().as_secs_f64(),
        retries.load(Ordering::Relaxed)
    );
    Ok(())
}

/// GEOSEARCH of `radius_m` around (lat, lng), nearest first, at most 50 with distances.
async fn geo_search(
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

/// One Redis operation of the scenario.
pub(crate) async fn op(
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
            Ok(!geo_search(c, city(rng), r).await?.is_empty())
        }
        Scenario::SearchSparse => {
            geo_search(c, population::sparse_point(rng), 10_000.0).await?;
            Ok(true)
        }
        Scenario::Noop => Ok(redis::cmd("PING").query_async::<String>(c).await? == "PONG"),
        Scenario::Shake | Scenario::Mixed | Scenario::Soak => Ok(false),
    }
}

/// Checks that geomatch and the RESP target `target` hold the same population and do the
/// same work, on a sample of dense 1 km searches. geomatch measures to privacy-snapped
/// positions (cell centres, at most ~300 m from the true position), so: everyone Redis /
/// Valkey finds within 700 m must be in geomatch's full 1 km answer (all pages), and both
/// find about as many within 1 km.
pub(crate) async fn cross_check(
    target: &str,
    channels: &[Channel],
    redis: &[redis::aio::MultiplexedConnection],
    seed: u64,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xC4EC);
    let mut nearby = NearbyClient::new(channels[0].clone());
    let mut r = redis[0].clone();
    let mut ratios = Vec::new();
    let nonce = rand::random();
    for _ in 0..20 {
        let (clat, clng) = city(&mut rng);
        let centre = population::offset(
            clat,
            clng,
            rng.random_range(-3_000.0..3_000.0),
            rng.random_range(-3_000.0..3_000.0),
        );
        let mut req = search(&mut rng, nonce, centre, 1_000.0);
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
                "cross-check failed: geomatch misses {missing} of the {} users {} finds within 700 m",
                inner.len(),
                human(target)
            );
        }
        if all.len() >= 20 {
            ratios.push(ours.len() as f64 / all.len() as f64);
        }
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(1.0);
    eprintln!(
        "cross-check: 20 dense 1 km searches agree with {} (inner 700 m fully found; geomatch/{} count ratio, median {median:.2})",
        human(target),
        human(target)
    );
    if !(0.8..=1.25).contains(&median) {
        bail!(
            "cross-check failed: geomatch and {} hold different populations (count ratio {median:.2})",
            human(target)
        );
    }
    Ok(())
}
