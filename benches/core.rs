//! In-process benches of the hot paths: cell centres, index update, search, page tokens,
//! shake pairing.
//!
//! `cargo bench --bench core` (add `GEOMATCH_BENCH_10M=1` for 10 M users); populations are the standard one (`geomatch_load::population`):
//! 80 % Gaussian around ten city centres, 20 % uniform, from a fixed seed.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use geomatch::{
    geo::Coordinates,
    id::{ShakeId, UserId},
    nearby::{
        Cursor, Gender, NearbyConfig, NearbyIndex, PageTokens, Scope, SearchRequest, WatchConfig,
        WatchRequest,
    },
    shake::{Fallback, Matcher, Outcome, ShakeConfig, ShakeRequest, Tier},
};
use geomatch_load::population;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// The server's allocator, so allocation costs are the ones it pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CITY: (f64, f64) = (31.2304, 121.4737);
const NOW: i64 = 1_700_000_000_000;

fn user(i: usize) -> UserId {
    UserId::new("user_id", &population::user_id(i as u64)).unwrap()
}

fn position(rng: &mut StdRng) -> Coordinates {
    let (lat, lng) = population::position(rng);
    Coordinates::new("position", lat, lng).unwrap()
}

fn populated(n: usize) -> NearbyIndex {
    let idx = NearbyIndex::new(NearbyConfig::default(), PageTokens::new([1; 32]));
    let mut rng = StdRng::seed_from_u64(42);
    for i in 0..n {
        idx.update(user(i), position(&mut rng), Gender::Female, NOW);
    }
    idx
}

fn nearby(c: &mut Criterion) {
    let mut g = c.benchmark_group("nearby");
    g.measurement_time(Duration::from_secs(3));
    // 10 M users (~3 GB, a minute to build) only when asked: GEOMATCH_BENCH_10M=1.
    let mut sizes = vec![100_000, 1_000_000];
    if std::env::var_os("GEOMATCH_BENCH_10M").is_some() {
        sizes.push(10_000_000);
    }
    for n in sizes {
        let idx = populated(n);
        let mut rng = StdRng::seed_from_u64(7);
        g.bench_with_input(BenchmarkId::new("update", n), &n, |b, &n| {
            b.iter(|| {
                let i = rng.random_range(0..n);
                idx.update(user(i), position(&mut rng), Gender::Female, NOW)
            });
        });
        let mut sparse_rng = StdRng::seed_from_u64(3);
        let (slat, slng) = population::sparse_point(&mut sparse_rng);
        for (name, (lat, lng), radius) in [
            ("search-1km", CITY, 1_000.0),
            ("search-5km", CITY, 5_000.0),
            ("search-sparse-10km", (slat, slng), 10_000.0),
        ] {
            let q = SearchRequest {
                searcher: user(0),
                centre: Coordinates::new("position", lat, lng).unwrap(),
                radius_m: radius,
                limit: 50,
                gender: Gender::Unspecified,
                page_token: String::new(),
            };
            g.bench_with_input(BenchmarkId::new(name, n), &q, |b, q| {
                b.iter(|| idx.search(&idx.query(black_box(q)).unwrap(), NOW));
            });
        }
        // The load generator's sparse searches: a new point ≥ 100 km from every city each
        // time (256 of them, in turn), so the mix of empty and rural country is its mix.
        // `-fresh`: 65 536 of them, so (as over gRPC) few are repeated while their data is
        // still cached.
        let mut points_rng = StdRng::seed_from_u64(5);
        let mut sparse_queries = |count: usize| -> Vec<SearchRequest> {
            (0..count)
                .map(|_| {
                    let (lat, lng) = population::sparse_point(&mut points_rng);
                    SearchRequest {
                        searcher: user(0),
                        centre: Coordinates::new("position", lat, lng).unwrap(),
                        radius_m: 10_000.0,
                        limit: 50,
                        gender: Gender::Unspecified,
                        page_token: String::new(),
                    }
                })
                .collect()
        };
        // A city's fringe, 15 to 22 km from its centre (3 to 4.4 sigma at 1 M users):
        // 1 km searches where the crowd thins out, from cells often empty and regions
        // sometimes listing their cells and sometimes only counting them. 256 points.
        let mut fringe_rng = StdRng::seed_from_u64(9);
        let fringe: Vec<SearchRequest> = (0..256)
            .map(|_| {
                let (_, lat, lng) = population::CITIES[fringe_rng.random_range(0..10)];
                let bearing = fringe_rng.random_range(0.0..std::f64::consts::TAU);
                let d = fringe_rng.random_range(15_000.0..22_000.0);
                let (lat, lng) = population::offset(lat, lng, d * bearing.sin(), d * bearing.cos());
                SearchRequest {
                    searcher: user(0),
                    centre: Coordinates::new("position", lat, lng).unwrap(),
                    radius_m: 1_000.0,
                    limit: 50,
                    gender: Gender::Unspecified,
                    page_token: String::new(),
                }
            })
            .collect();
        g.bench_with_input(
            BenchmarkId::new("search-1km-fringe", n),
            &fringe,
            |b, queries| {
                let mut next = 0;
                b.iter(|| {
                    next = (next + 1) % queries.len();
                    idx.search(&idx.query(black_box(&queries[next])).unwrap(), NOW)
                });
            },
        );
        for (name, count) in [
            ("search-sparse-10km-any", 256),
            ("search-sparse-10km-fresh", 1 << 16),
        ] {
            let queries = sparse_queries(count);
            g.bench_with_input(BenchmarkId::new(name, n), &queries, |b, queries| {
                let mut next = 0;
                b.iter(|| {
                    next = (next + 1) % queries.len();
                    idx.search(&idx.query(black_box(&queries[next])).unwrap(), NOW)
                });
            });
        }
    }
    g.finish();
}

/// Dense 1 km search at equal local density: the cities' spread grows with the square
/// root of the population (5 km at 1 M users), so a search sees the same crowd at every
/// size and only the index's size changes.
fn equal_density(c: &mut Criterion) {
    let mut g = c.benchmark_group("nearby-equal-density");
    g.measurement_time(Duration::from_secs(3));
    let mut sizes = vec![100_000usize, 1_000_000];
    if std::env::var_os("GEOMATCH_BENCH_10M").is_some() {
        sizes.push(10_000_000);
    }
    for n in sizes {
        let sigma = 5_000.0 * (n as f64 / 1e6).sqrt();
        let idx = NearbyIndex::new(NearbyConfig::default(), PageTokens::new([1; 32]));
        let mut rng = StdRng::seed_from_u64(42);
        for i in 0..n {
            let (lat, lng) = population::position_spread(&mut rng, sigma);
            let p = Coordinates::new("position", lat, lng).unwrap();
            idx.update(user(i), p, Gender::Female, NOW);
        }
        let q = SearchRequest {
            searcher: user(0),
            centre: Coordinates::new("position", CITY.0, CITY.1).unwrap(),
            radius_m: 1_000.0,
            limit: 50,
            gender: Gender::Unspecified,
            page_token: String::new(),
        };
        g.bench_with_input(BenchmarkId::new("search-1km", n), &q, |b, q| {
            b.iter(|| idx.search(&idx.query(black_box(q)).unwrap(), NOW));
        });
    }
    g.finish();
}

/// Update cost (a random user jumps to a fresh standard-population position) with no
/// watches open; with 10 000 watches (1 km) away from the population (sparse points), which
/// updates must not pay for; and with 10 000 among it (standard-population positions),
/// where every update legitimately makes events for the watches around its old and new
/// position. Events are drained outside the timed loop; the count per update is printed.
fn watch(c: &mut Criterion) {
    use std::task::{Context, Poll, Waker};

    let mut g = c.benchmark_group("watch");
    g.measurement_time(Duration::from_secs(3));
    let n = 100_000;
    for (name, watchers) in [("none", 0usize), ("elsewhere", 10_000), ("among", 10_000)] {
        let cfg = NearbyConfig {
            watch: WatchConfig {
                buffer: 1 << 16,
                ..WatchConfig::default()
            },
            ..NearbyConfig::default()
        };
        let idx = NearbyIndex::new(cfg, PageTokens::new([1; 32]));
        let mut rng = StdRng::seed_from_u64(42);
        for i in 0..n {
            idx.update(user(i), position(&mut rng), Gender::Female, NOW);
        }
        let mut watches: Vec<_> = (0..watchers)
            .map(|i| {
                let w = UserId::new("user_id", &format!("watcher:{i}")).unwrap();
                let at = if name == "elsewhere" {
                    let (lat, lng) = population::sparse_point(&mut rng);
                    Coordinates::new("position", lat, lng).unwrap()
                } else {
                    position(&mut rng)
                };
                idx.update(w.clone(), at, Gender::Male, NOW);
                let req = WatchRequest {
                    watcher: w,
                    radius: idx.config().radius.apply(1_000.0).unwrap(),
                    gender: Gender::Unspecified,
                };
                idx.watch(&req, NOW).unwrap()
            })
            .collect();
        let mut cx = Context::from_waker(Waker::noop());
        let (mut events, mut updates) = (0u64, 0u64);
        g.bench_with_input(
            BenchmarkId::new("update-with-10k-watches", name),
            &n,
            |b, &n| {
                b.iter_custom(|iters| {
                    updates += iters;
                    let t = std::time::Instant::now();
                    for _ in 0..iters {
                        let i = rng.random_range(0..n);
                        idx.update(user(i), position(&mut rng), Gender::Female, NOW);
                    }
                    let took = t.elapsed();
                    for w in &mut watches {
                        while let Poll::Ready(Some(e)) = w.poll_event(&mut cx) {
                            assert!(e.is_ok(), "a watch fell behind");
                            events += 1;
                        }
                    }
                    took
                });
            },
        );
        eprintln!(
            "watch/{name}: {:.2} events per update",
            events as f64 / updates.max(1) as f64
        );
    }
    g.finish();
}

fn tokens(c: &mut Criterion) {
    let t = PageTokens::new([1; 32]);
    let scope = Scope {
        searcher: "user:000000000001",
        lat: CITY.0,
        lng: CITY.1,
        radius_m: 1_000.0,
        gender: 0,
    };
    let cursor = Cursor {
        distance_key: 123_456,
        user: user(42),
    };
    let token = t.encode(&scope, &cursor);
    c.bench_function("page-token/encode", |b| {
        b.iter(|| t.encode(black_box(&scope), &cursor))
    });
    c.bench_function("page-token/decode", |b| {
        b.iter(|| t.decode(black_box(&scope), &token).unwrap())
    });
}

fn shake(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let m = Arc::new(Matcher::new(ShakeConfig::default()));
    let mut i = 0usize;
    c.bench_function("shake/pair", |b| {
        b.iter(|| {
            i += 2;
            let req = |u: usize| ShakeRequest {
                user: user(u),
                position: Coordinates::new("position", CITY.0, CITY.1).unwrap(),
                shake_id: ShakeId::new("shake_id", "s").unwrap(),
                max_distance_m: 0.0,
                exclude: Vec::new(),
                deadline: None,
                fallback: Fallback::None,
            };
            rt.block_on(async {
                let m2 = m.clone();
                let first =
                    tokio::spawn(async move { m2.shake(m2.validate(req(i)).unwrap()).await });
                m.until_waiting(1).await;
                let second = m.shake(m.validate(req(i + 1)).unwrap()).await.unwrap();
                first.await.unwrap().unwrap();
                second
            })
        });
    });
}

/// CPU cost of one ANYWHERE pairing: two fallback shakes 1 000 km apart, each waiting half
/// the window (virtual time: the runtime's clock is paused and skips the wait) before the
/// pool pairs them. Compare with `shake/pair`, a nearby pairing.
fn shake_anywhere(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let m = Arc::new(Matcher::new(ShakeConfig::default()));
    let mut i = 0usize;
    c.bench_function("shake/pair-anywhere", |b| {
        b.iter(|| {
            i += 2;
            let req = |u: usize, lat: f64| ShakeRequest {
                user: user(u),
                position: Coordinates::new("position", lat, CITY.1).unwrap(),
                shake_id: ShakeId::new("shake_id", "s").unwrap(),
                max_distance_m: 0.0,
                exclude: Vec::new(),
                deadline: None,
                fallback: Fallback::Anywhere,
            };
            rt.block_on(async {
                let m2 = m.clone();
                let first =
                    tokio::spawn(
                        async move { m2.shake(m2.validate(req(i, CITY.0)).unwrap()).await },
                    );
                m.until_waiting(1).await;
                let second = m
                    .shake(m.validate(req(i + 1, CITY.0 + 9.0)).unwrap())
                    .await
                    .unwrap();
                first.await.unwrap().unwrap();
                assert!(matches!(&second, Outcome::Matched(mm) if mm.tier == Tier::Anywhere));
                second
            })
        });
    });
}

/// A cell centre as h3o computes it and as [`geomatch::geo::centre::centre`] remembers it,
/// over the res-9 cells of a 1 km search's ring walk (a disk of 7 rings, 127 cells): what
/// each ring cell costs a search, a shake or a watch.
fn centres(c: &mut Criterion) {
    use h3o::{LatLng, Resolution};
    let origin = LatLng::new(CITY.0, CITY.1)
        .unwrap()
        .to_cell(Resolution::Nine);
    let disk: Vec<_> = origin.grid_disk(6);
    let mut g = c.benchmark_group("geo/centre-127-cells");
    g.bench_function("computed", |b| {
        b.iter(|| {
            disk.iter()
                .map(|&cell| LatLng::from(black_box(cell)).lat_radians())
                .sum::<f64>()
        })
    });
    g.bench_function("remembered", |b| {
        b.iter(|| {
            disk.iter()
                .map(|&cell| geomatch::geo::centre::centre(black_box(cell)).lat_radians())
                .sum::<f64>()
        })
    });
}

/// The cells a 100 m shake locks and reads at the matcher's bucket resolution (7), over
/// 4 096 spots of the standard population snapped to their privacy cells, as a shake's
/// are: the ring walk, or one cell when the disk lies inside it.
fn shake_cover(c: &mut Criterion) {
    use geomatch::geo::cell::{Centres, PRIVACY_RESOLUTION, RingCover};
    use h3o::{LatLng, Resolution};
    let mut rng = StdRng::seed_from_u64(5);
    let spots: Vec<LatLng> = (0..4_096)
        .map(|_| {
            let p = position(&mut rng).latlng();
            LatLng::from(p.to_cell(PRIVACY_RESOLUTION))
        })
        .collect();
    let mut i = 0usize;
    c.bench_function("geo/shake-cover-100m", |b| {
        b.iter(|| {
            i = (i + 1) % spots.len();
            RingCover::cells_within(
                black_box(spots[i]),
                Resolution::Seven,
                100.0,
                Centres::Computed,
            )
            .len()
        })
    });
}

criterion_group!(
    benches,
    centres,
    shake_cover,
    nearby,
    equal_density,
    watch,
    tokens,
    shake,
    shake_anywhere
);
criterion_main!(benches);
