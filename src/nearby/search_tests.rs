//! The query engine over a source that holds only what was fetched (how a remote store
//! runs it): every page is identical to the in-memory one, and the walk asks for whole
//! batches, so a search costs a few round trips, not one per cell.

use std::{cell::RefCell, collections::HashSet};

use h3o::CellIndex;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{
    search::page,
    source::{CellSource, Need},
    *,
};
use crate::geo::offset;

/// The maps, revealed a batch at a time: a cell reads only once it was asked for.
struct Partial<'a> {
    maps: &'a maps::Maps,
    cells: RefCell<HashSet<CellIndex>>,
    coarse: RefCell<HashSet<CellIndex>>,
}

/// How a staged walk went: its page, round trips, and privacy cells fetched.
struct Staged {
    page: SearchPage,
    rounds: usize,
    cells: usize,
}

impl<'a> Partial<'a> {
    fn new(maps: &'a maps::Maps) -> Self {
        Self {
            maps,
            cells: RefCell::default(),
            coarse: RefCell::default(),
        }
    }

    /// Fetches `need`; returns how many of its cells were new (a walk that asks for
    /// nothing new would never end).
    fn fetch(&self, need: &Need) -> usize {
        let mut fresh = 0;
        for c in &need.cells {
            fresh += usize::from(self.cells.borrow_mut().insert(*c));
        }
        for c in &need.coarse {
            fresh += usize::from(self.coarse.borrow_mut().insert(*c));
        }
        fresh
    }
}

impl CellSource for Partial<'_> {
    type Miss = ();

    fn resolution(&self) -> h3o::Resolution {
        self.maps.resolution()
    }

    fn bucket<R>(&self, cell: CellIndex, f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>, ()> {
        if !self.cells.borrow().contains(&cell) {
            return Err(());
        }
        match self.maps.bucket(cell, f) {
            Ok(r) => Ok(r),
            Err(never) => match never {},
        }
    }

    fn occupied(&self, coarse: CellIndex, out: &mut Vec<CellIndex>) -> Result<(), ()> {
        if !self.coarse.borrow().contains(&coarse) {
            return Err(());
        }
        match self.maps.occupied(coarse, out) {
            Ok(()) => Ok(()),
            Err(never) => match never {},
        }
    }
}

const SHANGHAI: (f64, f64) = (31.2304, 121.4737);
const NOW: i64 = 1_700_000_000_000;

fn uid(s: &str) -> UserId {
    UserId::new("user_id", s).unwrap()
}

fn pos((lat, lng): (f64, f64)) -> Coordinates {
    Coordinates::new("position", lat, lng).unwrap()
}

/// Walks `q` to completion over a fresh partial source.
fn staged(idx: &NearbyIndex, q: &Query) -> Staged {
    let src = Partial::new(&idx.maps);
    for rounds in 0..200 {
        match page(&src, &idx.tokens, q, NOW) {
            Ok(page) => {
                let cells = src.cells.borrow().len();
                return Staged {
                    page,
                    rounds,
                    cells,
                };
            }
            Err(m) => assert!(src.fetch(&m.need) > 0, "a miss must ask for something new"),
        }
    }
    panic!("the walk did not finish in 200 round trips");
}

/// A dense city (a few thousand users within ~3 km) and a sparse country around it.
fn populated() -> NearbyIndex {
    let idx = NearbyIndex::new(NearbyConfig::default(), PageTokens::new([5; 32]));
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..4_000 {
        let (dx, dy) = if i % 5 == 0 {
            (
                rng.random_range(-60_000.0..60_000.0),
                rng.random_range(-60_000.0..60_000.0),
            )
        } else {
            (
                rng.random_range(-3_000.0..3_000.0),
                rng.random_range(-3_000.0..3_000.0),
            )
        };
        let gender = if i % 2 == 0 {
            Gender::Female
        } else {
            Gender::Male
        };
        idx.update(
            uid(&format!("u{i:05}")),
            pos(offset(SHANGHAI.0, SHANGHAI.1, dx, dy)),
            gender,
            NOW,
        );
    }
    idx
}

/// Two pages are the same: the same users, and tokens (each sealed under its own random
/// nonce) that continue from the same cursor.
fn assert_same_page(idx: &NearbyIndex, req: &SearchRequest, a: &SearchPage, b: &SearchPage) {
    assert_eq!(a.users, b.users, "{req:?}");
    let after = |t: &Option<String>| {
        t.as_ref().map(|t| {
            let next = SearchRequest {
                page_token: t.clone(),
                ..req.clone()
            };
            idx.query(&next).unwrap().after
        })
    };
    assert_eq!(
        after(&a.next_page_token),
        after(&b.next_page_token),
        "{req:?}"
    );
}

/// Searches `searches` random spots within `span` metres of Shanghai, paging each to its
/// end, over the partial source (which walks ring by ring: it has no region level) and
/// over the in-memory maps (which take the sparse-country shortcut where they can), and
/// asserts equal pages. Returns how many spots the shortcut took and how many of those
/// handed out more than one batch.
fn shortcut_pages_equal_the_walks(
    idx: &NearbyIndex,
    seed: u64,
    searches: usize,
    span: f64,
    radii: &[f64],
) -> (usize, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut shortcut, mut batches) = (0, 0);
    for _ in 0..searches {
        let centre = offset(
            SHANGHAI.0,
            SHANGHAI.1,
            rng.random_range(-span..span),
            rng.random_range(-span..span),
        );
        let mut req = SearchRequest {
            searcher: uid("u00007"),
            centre: pos(centre),
            radius_m: radii[rng.random_range(0..radii.len())],
            limit: rng.random_range(1..60),
            gender: [Gender::Unspecified, Gender::Female, Gender::Male][rng.random_range(0..3)],
            page_token: String::new(),
        };
        let at = pos(centre);
        if let Some(cells) = idx
            .maps
            .sparse(at.latlng(), at.cell(idx.maps.res), req.radius_m)
        {
            shortcut += 1;
            batches += usize::from(cells.len() > super::search::SPARSE_BATCH);
        }
        // Every page of the walk, in order, including the last.
        for _ in 0..200 {
            let q = idx.query(&req).unwrap();
            let direct = idx.search(&q, NOW);
            assert_same_page(idx, &req, &staged(idx, &q).page, &direct);
            match direct.next_page_token {
                Some(t) => req.page_token = t,
                None => break,
            }
        }
    }
    (shortcut, batches)
}

/// The shortcut's pages are the walk's, in a city with sparse country around it.
#[test]
fn every_page_over_a_partial_source_equals_the_in_memory_page() {
    let idx = populated();
    let searches = 60;
    let (shortcut, _) = shortcut_pages_equal_the_walks(
        &idx,
        12,
        searches,
        40_000.0,
        &[300.0, 1_000.0, 5_000.0, 10_000.0],
    );
    // Both paths were compared, many times each.
    assert!(
        shortcut >= 10 && searches - shortcut >= 2,
        "{shortcut} of {searches} by the shortcut"
    );
}

/// And in country of medium density (one user per 3 km², a hundred within 10 km), where
/// the shortcut hands its cells out in several batches and pages stop between them.
#[test]
fn medium_density_pages_from_the_shortcut_equal_the_walks() {
    let idx = NearbyIndex::new(NearbyConfig::default(), PageTokens::new([6; 32]));
    let mut rng = StdRng::seed_from_u64(13);
    for i in 0..1_200 {
        let at = offset(
            SHANGHAI.0,
            SHANGHAI.1,
            rng.random_range(-30_000.0..30_000.0),
            rng.random_range(-30_000.0..30_000.0),
        );
        let gender = [Gender::Female, Gender::Male][i % 2];
        idx.update(uid(&format!("m{i:05}")), pos(at), gender, NOW);
    }
    let searches = 30;
    let (shortcut, batches) =
        shortcut_pages_equal_the_walks(&idx, 14, searches, 15_000.0, &[5_000.0, 10_000.0]);
    assert!(
        shortcut * 2 >= searches && batches * 3 >= searches,
        "{shortcut} by the shortcut, {batches} of them in several batches, of {searches}"
    );
}

#[test]
fn a_walk_asks_for_whole_batches() {
    let idx = populated();
    let dense = idx
        .query(&SearchRequest {
            searcher: uid("nobody"),
            centre: pos(SHANGHAI),
            radius_m: 1_000.0,
            limit: 20,
            gender: Gender::Unspecified,
            page_token: String::new(),
        })
        .unwrap();
    // A dense search reads a few rings of cells in a few round trips, never the whole
    // fine disk (91 cells within 1 km at resolution 9).
    let s = staged(&idx, &dense);
    assert_eq!(s.page.users.len(), 20);
    assert!(
        s.rounds <= 3 && s.cells <= 37,
        "{} rounds, {} cells",
        s.rounds,
        s.cells
    );
    // A wide search in sparse country walks coarse rings: a round trip for each ring's
    // occupancy and one for its occupied cells, never one per cell.
    let sparse = idx
        .query(&SearchRequest {
            centre: pos(offset(SHANGHAI.0, SHANGHAI.1, 45_000.0, 45_000.0)),
            radius_m: 10_000.0,
            ..SearchRequest {
                searcher: uid("nobody"),
                centre: pos(SHANGHAI),
                radius_m: 0.0,
                limit: 50,
                gender: Gender::Unspecified,
                page_token: String::new(),
            }
        })
        .unwrap();
    let s = staged(&idx, &sparse);
    assert_eq!(s.page.users, idx.search(&sparse, NOW).users);
    assert!(
        s.rounds <= 30,
        "{} round trips for {} users",
        s.rounds,
        s.page.users.len()
    );
}

/// The region level lists exactly the occupied coarse cells, each once, under the region
/// holding its centre, through moves, clears and expiry.
#[test]
fn regions_list_exactly_the_occupied_coarse_cells() {
    use h3o::LatLng;
    let idx = populated();
    let mut rng = StdRng::seed_from_u64(13);
    // Moves and clears churn the maps.
    for i in 0..6_000 {
        let u = uid(&format!("u{:05}", rng.random_range(0..4_000)));
        if i % 7 == 0 {
            idx.clear(&u, NOW);
        } else {
            let at = offset(
                SHANGHAI.0,
                SHANGHAI.1,
                rng.random_range(-60_000.0..60_000.0),
                rng.random_range(-60_000.0..60_000.0),
            );
            idx.update(u, pos(at), Gender::Female, NOW);
        }
    }
    let mut coarse: Vec<CellIndex> = Vec::new();
    for shard in 0..maps::SHARDS {
        coarse.extend(idx.maps.coarse.read(shard).keys().copied());
    }
    let mut listed: Vec<CellIndex> = Vec::new();
    for shard in 0..maps::SHARDS {
        for (region, list) in idx.maps.regions.read(shard).iter() {
            for &(c, [x, y, z]) in list.iter() {
                // Filed under its H3 parent, with its centre (a unit vector, within a
                // metre: the sparse shortcut's slack is ten).
                assert_eq!(c.parent(maps::REGION_RESOLUTION), Some(*region));
                let (x, y, z) = (f64::from(x), f64::from(y), f64::from(z));
                assert!((x * x + y * y + z * z - 1.0).abs() < 1e-6);
                let point = LatLng::from_radians(z.asin(), y.atan2(x)).unwrap();
                let from_centre = crate::geo::distance_m(point, LatLng::from(c));
                assert!(from_centre <= 1.0, "{from_centre}");
                listed.push(c);
            }
        }
    }
    coarse.sort_unstable();
    listed.sort_unstable();
    assert_eq!(coarse, listed);
}
