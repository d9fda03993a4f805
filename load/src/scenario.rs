//! What one operation of a scenario does, whichever target it goes to.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use geomatch::grpc::pb;
use geomatch_load::population::{self, CITIES};
use rand::{Rng, rngs::StdRng};
use tonic::transport::Channel;

use crate::cli::Scenario;

/// Where operations go.
#[derive(Clone)]
pub(crate) enum Conn {
    /// A geomatch HTTP/2 connection.
    Grpc(Channel),
    /// A Redis / Valkey connection.
    Redis(redis::aio::MultiplexedConnection),
}

/// Everything a worker needs to issue one operation.
#[derive(Clone)]
pub(crate) struct Ctx {
    /// What runs.
    pub(crate) scenario: Scenario,
    /// Population size.
    pub(crate) users: u64,
    /// Every user's population position.
    pub(crate) positions: Arc<Vec<(f64, f64)>>,
    /// The next shake id (shakes of a run never reuse one).
    pub(crate) pair_seq: Arc<AtomicU64>,
    /// When the run started (the soak's window moves from here).
    pub(crate) started: Instant,
    /// soak: users active at once.
    pub(crate) soak_active: u64,
    /// soak: how long the window takes to move by its own size.
    pub(crate) soak_turnover: Duration,
}

impl Ctx {
    /// A user of the soak's current window.
    pub(crate) fn active_user(&self, rng: &mut StdRng) -> u64 {
        let turns = self.started.elapsed().as_secs_f64() / self.soak_turnover.as_secs_f64();
        let base = (turns * self.soak_active as f64) as u64;
        (base + rng.random_range(0..self.soak_active.max(1))) % self.users.max(1)
    }

    /// User `i` moved a few metres from their population position.
    pub(crate) fn moved(&self, i: u64, rng: &mut StdRng) -> (f64, f64) {
        let (lat, lng) = self.positions[i as usize];
        population::offset(
            lat,
            lng,
            rng.random_range(-10.0..10.0),
            rng.random_range(-10.0..10.0),
        )
    }
}

/// A search of `radius_m` around (lat, lng) by a fresh searcher, limit 50.
pub(crate) fn search(
    rng: &mut StdRng,
    (lat, lng): (f64, f64),
    radius_m: f64,
) -> pb::SearchNearbyRequest {
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

/// A random city centre of the standard population.
pub(crate) fn city(rng: &mut StdRng) -> (f64, f64) {
    let (_, lat, lng) = CITIES[rng.random_range(0..CITIES.len())];
    (lat, lng)
}

/// Pings per `update-bulk` operation.
pub(crate) const BULK_BATCH: u64 = 1_000;

/// Pings that make one bulk batch: random users, each moved a few metres.
pub(crate) fn bulk_batch(ctx: &Ctx, rng: &mut StdRng) -> Vec<(u64, (f64, f64))> {
    (0..BULK_BATCH)
        .map(|_| {
            let i = rng.random_range(0..ctx.users);
            (i, ctx.moved(i, rng))
        })
        .collect()
}

/// Operations one call of `scenario` counts for.
pub(crate) fn weight(scenario: Scenario) -> u64 {
    if scenario == Scenario::UpdateBulk {
        BULK_BATCH
    } else {
        1
    }
}

/// The scenario one operation of `scenario` runs (mixed picks one).
pub(crate) fn pick(scenario: Scenario, rng: &mut StdRng) -> Scenario {
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

/// One operation's outcome: `Ok(true)` as expected, `Ok(false)` unexpected, `Err` an error.
pub(crate) type OpResult = Result<bool, String>;
