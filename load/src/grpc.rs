//! The gRPC target (geomatch): connecting, loading the population, and each scenario's
//! operation.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context as _;
use geomatch::grpc::pb::{
    self, nearby_client::NearbyClient, shake_client::ShakeClient, shake_response::Outcome,
};
use geomatch_load::population;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::{
    cli::Scenario,
    retry::{self, Backoff},
    scenario::{BULK_BATCH, Ctx, bulk_batch, city, pick, search, shakers},
};

/// Opens `n` (at least one) HTTP/2 connections to `addr`, over TLS when `tls` is given.
pub(crate) async fn connect(
    addr: SocketAddr,
    n: usize,
    tls: Option<&ClientTlsConfig>,
) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let ch = endpoint
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        out.push(ch);
    }
    Ok(out)
}

/// User `i` pings from (lat, lng).
fn update(i: u64, (lat, lng): (f64, f64)) -> pb::UpdateLocationRequest {
    pb::UpdateLocationRequest {
        user_id: population::user_id(i),
        position: Some(pb::LatLng { lat, lng }),
        gender: (i % 3) as i32,
        ..Default::default()
    }
}

/// Loads the population over gRPC, `concurrency` pings in flight (not timed). A ping the
/// server sheds (RESOURCE_EXHAUSTED) or cannot take yet (UNAVAILABLE) is retried after a
/// backoff (see [`retry`]); the load fails only on another error, or once one ping has
/// been refused for [`retry::GIVE_UP`].
pub(crate) async fn load_population(
    channels: &[Channel],
    users: u64,
    seed: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let positions = Arc::new(population::positions(users, seed));
    let next = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency.max(1) {
        let c = NearbyClient::new(channels[w % channels.len()].clone());
        let (positions, next, retries) = (positions.clone(), next.clone(), retries.clone());
        tasks.push(tokio::spawn(async move {
            let mut backoff = Backoff::standard();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= users {
                    return Ok::<_, anyhow::Error>(());
                }
                let req = update(i, positions[i as usize]);
                retry::retry(&mut backoff, &retries, retry::grpc_transient, || {
                    let (mut c, req) = (c.clone(), req.clone());
                    async move { c.update_location(req).await }
                })
                .await
                .with_context(|| format!("loading the population: user {i}"))?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    eprintln!(
        "loaded {users} users in {:.1} s ({:.0} pings/s, {} retries)",
        started.elapsed().as_secs_f64(),
        users as f64 / started.elapsed().as_secs_f64(),
        retries.load(Ordering::Relaxed)
    );
    Ok(())
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
            let who = format!("soak-shaker:{:016x}:{k}", ctx.shake_nonce);
            match shake_pair(ch, &who, n, (lat, lng)).await {
                (Ok(_), Ok(_)) => Ok(true),
                (Err(s), _) | (_, Err(s)) => refusal(s),
            }
        }
    }
}

/// One gRPC operation of the scenario.
pub(crate) async fn op(ctx: &Ctx, rng: &mut StdRng, ch: &Channel) -> Result<bool, tonic::Status> {
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
            let req = search(rng, ctx.search_nonce, centre, r);
            Ok(!nearby
                .search_nearby(req)
                .await?
                .into_inner()
                .users
                .is_empty())
        }
        Scenario::Noop => {
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            let status = health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await?
                .into_inner()
                .status;
            Ok(status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
        }
        Scenario::SearchSparse => {
            let centre = population::sparse_point(rng);
            let req = search(rng, ctx.search_nonce, centre, 10_000.0);
            nearby.search_nearby(req).await?;
            Ok(true)
        }
        Scenario::Shake | Scenario::Mixed | Scenario::Soak => {
            let n = ctx.pair_seq.fetch_add(1, Ordering::Relaxed);
            let (lat, lng) = (rng.random_range(20.0..45.0), rng.random_range(100.0..125.0));
            let (ra, rb) = shake_pair(ch, &shakers(ctx.shake_nonce, n), n, (lat, lng)).await;
            let (ra, rb) = (ra?.into_inner(), rb?.into_inner());
            Ok(ra.outcome() == Outcome::Matched
                && rb.outcome() == Outcome::Matched
                && ra.match_id == rb.match_id)
        }
    }
}
