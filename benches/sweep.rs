//! Memory per user, and search latency while the expiry sweep reclaims 1 M users.
//!
//! `cargo bench --bench sweep` (same allocator as the server). It prints:
//!
//! * `memory`: the RSS growth from indexing the standard population of 1 M users,
//!   per user (ids included), and each structure's share of it; `GEOMATCH_SWEEP_USERS=N`
//!   measures N users instead, and `GEOMATCH_SWEEP_MEMORY_ONLY=1` stops there;
//! * `sweep`: p50/p99 of dense 1 km searches on one thread, first with the index idle
//!   (baseline), then while another thread sweeps 1 M expired users out of 2 M, and the
//!   ratio of the two p99s (the target is at most 2x).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Barrier,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use geomatch::{
    geo::Coordinates,
    id::UserId,
    nearby::{Gender, NearbyConfig, NearbyIndex, PageTokens, SearchRequest},
};
use geomatch_load::population;
use hdrhistogram::Histogram;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: i64 = 1_700_000_000_000;
const USERS: u64 = 1_000_000;

/// Users the memory figure indexes (`GEOMATCH_SWEEP_USERS`, else [`USERS`]).
fn memory_users() -> u64 {
    std::env::var("GEOMATCH_SWEEP_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(USERS)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn fill(idx: &NearbyIndex, from: u64, seed: u64, now: i64) {
    for (i, (lat, lng)) in population::positions(USERS, seed).into_iter().enumerate() {
        let user = UserId::new("user_id", &population::user_id(from + i as u64)).unwrap();
        let p = Coordinates::new("position", lat, lng).unwrap();
        idx.update(user, p, Gender::Female, now);
    }
}

/// Searches until `stop`, returning the latency histogram (ns).
fn search_until(idx: &NearbyIndex, now: i64, stop: &AtomicBool, start: &Barrier) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new(3).unwrap();
    let (lat, lng) = (population::CITIES[0].1, population::CITIES[0].2);
    let q = SearchRequest {
        searcher: UserId::new("user_id", "searcher").unwrap(),
        centre: Coordinates::new("position", lat, lng).unwrap(),
        radius_m: 1_000.0,
        limit: 50,
        gender: Gender::Unspecified,
        page_token: String::new(),
    };
    start.wait();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let page = idx.search(&idx.query(&q).unwrap(), now);
        h.record(t.elapsed().as_nanos() as u64).unwrap();
        assert_eq!(page.users.len(), 50);
    }
    h
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1_000.0
}

fn main() {
    let cfg = NearbyConfig::default();
    let ttl = i64::from(cfg.ttl.server().ms());
    let idx = NearbyIndex::new(cfg, PageTokens::new([1; 32]));

    // Positions are generated before measuring, so only the index's growth is counted.
    let users = memory_users();
    let positions = population::positions(users, 42);
    let before = rss_bytes();
    for (i, (lat, lng)) in positions.iter().enumerate() {
        let user = UserId::new("user_id", &population::user_id(i as u64)).unwrap();
        let p = Coordinates::new("position", *lat, *lng).unwrap();
        idx.update(user, p, Gender::Female, NOW);
    }
    // As the server's workers do once idle (`geomatch::base::alloc`): what stays resident
    // is what the index holds, not the pages it freed while growing. (The positions, made
    // before the first reading, are kept until after the second.)
    geomatch::base::alloc::collect_now();
    let grown = rss_bytes().saturating_sub(before);
    drop(positions);
    println!(
        "memory: {} users, {} occupied cells, RSS +{:.1} MB, {:.1} B per user",
        idx.len(),
        idx.cell_count(),
        grown as f64 / 1e6,
        grown as f64 / users as f64
    );
    // Where the bytes go: each map's structures, per user; the rest of the RSS growth is
    // the allocator's rounding, per-allocation overhead and pages freed but kept.
    let f = idx.footprint();
    let per_user = |b: usize| b as f64 / users as f64;
    println!(
        "footprint per user: members {:.1} B, users table {:.1}, cells table {:.1}, \
         coarse table {:.1}, coarse lists {:.1}, regions {:.1}, region centres {:.1}; \
         total {:.1} B, RSS beyond it {:.1} B",
        per_user(f.members),
        per_user(f.users_table),
        per_user(f.cells_table),
        per_user(f.coarse_table),
        per_user(f.coarse_lists),
        per_user(f.regions),
        per_user(f.region_centres),
        per_user(f.total()),
        per_user(grown as usize) - per_user(f.total()),
    );

    if std::env::var_os("GEOMATCH_SWEEP_MEMORY_ONLY").is_some() || users != USERS {
        return;
    }

    // A second million, seen later: they stay while the first million expires.
    let later = NOW + ttl / 2;
    fill(&idx, USERS, 43, later);
    let at = NOW + ttl + 1;

    for round in 1..=3 {
        // Baseline: searches alone, for as long as a sweep takes (measured below).
        let stop = AtomicBool::new(false);
        let start = Barrier::new(2);
        let base = std::thread::scope(|s| {
            let h = s.spawn(|| search_until(&idx, at, &stop, &start));
            start.wait();
            std::thread::sleep(Duration::from_millis(800));
            stop.store(true, Ordering::Relaxed);
            h.join().unwrap()
        });

        let stop = AtomicBool::new(false);
        let start = Barrier::new(2);
        let (during, removed, took) = std::thread::scope(|s| {
            let h = s.spawn(|| search_until(&idx, at, &stop, &start));
            start.wait();
            let t = Instant::now();
            let removed = idx.sweep(at);
            let took = t.elapsed();
            stop.store(true, Ordering::Relaxed);
            (h.join().unwrap(), removed, took)
        });
        println!(
            "sweep round {round}: removed {removed} in {:.0} ms; search p50 {:.1} us -> {:.1} us, \
             p99 {:.1} us -> {:.1} us ({:.2}x), max {:.0} us -> {:.0} us",
            took.as_secs_f64() * 1e3,
            us(base.value_at_quantile(0.5)),
            us(during.value_at_quantile(0.5)),
            us(base.value_at_quantile(0.99)),
            us(during.value_at_quantile(0.99)),
            during.value_at_quantile(0.99) as f64 / base.value_at_quantile(0.99) as f64,
            us(base.max()),
            us(during.max()),
        );
        // Put the first million back, already expired, for the next round.
        if round < 3 {
            fill(&idx, 0, 42, NOW);
        }
    }
}
