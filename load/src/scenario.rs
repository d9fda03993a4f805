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
    /// In every shaker's user id (see [`shakers`]): fresh per invocation unless
    /// `--shake-seed` fixes it.
    pub(crate) shake_nonce: u64,
    /// In every searcher's user id (see [`search`]): fresh per invocation.
    pub(crate) search_nonce: u64,
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

/// The nonce in an invocation's shaker ids: `--shake-seed` when given (the same shakers
/// every time), else random, so a second run against the same server shakes as new users
/// (the ones of the first run would be refused by the per-user shake rate limit).
pub(crate) fn shake_nonce(shake_seed: Option<u64>) -> u64 {
    shake_seed.unwrap_or_else(rand::random)
}

/// The pair of shake `n` (its users are this with `:0` and `:1` appended).
pub(crate) fn shakers(nonce: u64, n: u64) -> String {
    format!("shaker:{nonce:016x}:{n}")
}

/// A search of `radius_m` around (lat, lng) by a fresh searcher, limit 50. `nonce` is the
/// invocation's (see [`Ctx::search_nonce`]).
pub(crate) fn search(
    rng: &mut StdRng,
    nonce: u64,
    (lat, lng): (f64, f64),
    radius_m: f64,
) -> pb::SearchNearbyRequest {
    // A fresh searcher each time: a population user searching from a random city would
    // be refused as impossible travel, and one id searching all run long would be
    // rate-limited, as a scraper is. The nonce keeps them fresh across invocations too:
    // the request stream repeats with --seed, and a searcher of an earlier run searching
    // again from another city (another scenario's) would be refused the same way.
    pb::SearchNearbyRequest {
        user_id: format!("searcher:{nonce:016x}:{:016x}", rng.random::<u64>()),
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::Args;

    /// The first shakers an invocation with these flags would use.
    fn first_shakers(flags: &[&str]) -> String {
        let args =
            Args::try_parse_from([&["geomatch-load", "--scenario", "shake"], flags].concat())
                .unwrap();
        shakers(shake_nonce(args.shake_seed), args.seed << 40)
    }

    #[test]
    fn shakers_are_fresh_per_run_unless_a_shake_seed_is_given() {
        // Two runs with the same --seed: different shakers.
        assert_ne!(first_shakers(&[]), first_shakers(&[]));
        assert_ne!(
            first_shakers(&["--seed", "7"]),
            first_shakers(&["--seed", "7"])
        );
        // The same --shake-seed: the same shakers; another: others.
        let a = first_shakers(&["--shake-seed", "9"]);
        assert_eq!(a, first_shakers(&["--shake-seed", "9"]));
        assert_ne!(a, first_shakers(&["--shake-seed", "10"]));
        // Ids the server accepts (at most 128 bytes, with the ":0" / ":1" side).
        assert!(format!("{}:1", shakers(u64::MAX, u64::MAX)).len() <= 128);
    }

    #[test]
    fn searchers_are_fresh_per_invocation_with_the_same_request_stream() {
        use rand::SeedableRng as _;
        let req = |nonce| search(&mut StdRng::seed_from_u64(42), nonce, (1.0, 2.0), 1_000.0);
        let (a, b) = (req(rand::random()), req(rand::random()));
        assert_ne!(a.user_id, b.user_id);
        assert_eq!((a.position, a.radius_m), (b.position, b.radius_m));
        assert!(req(u64::MAX).user_id.len() <= 128);
    }
}
