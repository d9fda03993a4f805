//! What a region (a cell at [`REGION_RESOLUTION`]) keeps for the sparse shortcut: its
//! occupied privacy cells, each with its centre exactly as
//! [`crate::geo::centre::centre`] gives it, while they are few; only how many once they
//! are many (a city). A search in sparse country reads the lists of the regions near it
//! and measures their cells straight away: no coarse level, no centre to compute. Of a
//! counting region near it (a city's edge) a search of up to 2 km reads the coarse lists
//! of the coarse cells its disk reaches, while they are short; otherwise it walks rings.
//!
//! A privacy cell is filed under the H3 parent of the coarse cell holding its centre
//! (geometric containment, [`super::maps::coarse_of`]), so a region's cells are exactly
//! those in the coarse lists of its coarse children: what [`super::maps::Maps`] reads to
//! list a region again once a crowd has left it ([`RELIST_AT`]).
//!
//! Every change counts in [`Region::changes`]; a relisting reads the coarse lists with no
//! region lock held and is kept only if no change came in between. A writer changes a
//! region while it holds the coarse cell's lock, after changing that coarse list, so a
//! relisting that saw a change in a coarse list sees it counted too, and drops itself
//! if it was counted after the relisting began.

use h3o::{CellIndex, LatLng};

#[cfg(doc)]
use super::region_centres::REGION_RESOLUTION;

/// A region with more of its (at most 49) coarse cells occupied than this is dense
/// country, and keeps only its cells' count: a search near it walks rings, whose early
/// stop is cheaper there than measuring every cell. A city's regions have all 49.
/// Toward a city the crowd gathers on the city side of a region, so a region can hold
/// hundreds of users on a few dozen coarse cells and still be listed.
pub(super) const DENSE_COARSE: u8 = 44;
/// Most cells a region lists, whatever its coarse cells: a removal finds its cell in the
/// list by a scan.
pub(super) const LISTED_MAX: usize = 512;
/// A counted region is listed again once its cells fall to this many and its occupied
/// coarse cells to [`RELIST_COARSE`] (below the bounds, so a region near them does not
/// switch back and forth).
pub(super) const RELIST_AT: usize = LISTED_MAX / 2;
/// See [`RELIST_AT`].
pub(super) const RELIST_COARSE: u8 = 40;

/// Lists longer than this are searched for a window's band ([`Region::band`]); shorter
/// ones are read whole.
const BAND_SEARCHED_FROM: usize = 64;

/// An occupied privacy cell as its region lists it: the cell and its centre.
pub(super) type Listed = (CellIndex, LatLng);

/// One region's occupied privacy cells (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Region {
    /// Changes made to this region, wrapping: a relisting started before one is dropped.
    changes: u32,
    /// How many cells, while they are not listed (0 while they are).
    counted: u32,
    /// How many of its coarse cells are occupied.
    coarse: u8,
    /// The cells, while at most [`LISTED_MAX`], in order of their centres' latitude: of
    /// a long list a search reads only the band its [`Window`] spans. Exactly sized (a
    /// change copies it; it was shifted anyway).
    listed: Box<[Listed]>,
    /// Where the listed centres lie: a search whose window misses it skips the list
    /// without reading it (one cache miss fewer per region out of reach).
    bounds: Bounds,
}

/// Latitudes and longitudes (radians, as `f32` rounded outward) holding every listed
/// centre of a region; empty ([`Default`]) when none is.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bounds {
    lat: [f32; 2],
    lng: [f32; 2],
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            lat: [f32::INFINITY, f32::NEG_INFINITY],
            lng: [f32::INFINITY, f32::NEG_INFINITY],
        }
    }
}

impl Bounds {
    /// The bounds of `cells`.
    fn of(cells: &[Listed]) -> Self {
        let mut b = Self::default();
        for &(_, at) in cells {
            b.widen(at);
        }
        b
    }

    /// Widened to hold `at`.
    fn widen(&mut self, at: LatLng) {
        let (lat, lng) = (at.lat_radians(), at.lng_radians());
        self.lat = [self.lat[0].min(down(lat)), self.lat[1].max(up(lat))];
        self.lng = [self.lng[0].min(down(lng)), self.lng[1].max(up(lng))];
    }
}

/// `x` as an `f32` no greater than it.
fn down(x: f64) -> f32 {
    let f = x as f32;
    if f64::from(f) > x { f.next_down() } else { f }
}

/// `x` as an `f32` no less than it.
fn up(x: f64) -> f32 {
    let f = x as f32;
    if f64::from(f) < x { f.next_up() } else { f }
}

/// What a removal asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterRemoval {
    /// Nothing.
    Keep,
    /// The region holds no cell: drop it.
    Drop,
    /// List the region again ([`Region::relist`] with these changes).
    Relist(u32),
}

impl Region {
    /// The listed cells, by latitude; `None` while only counted.
    pub(super) fn listed(&self) -> Option<&[Listed]> {
        (self.counted == 0).then_some(&self.listed[..])
    }

    /// The listed cells whose centres may lie in `window`'s band of latitude: of a long
    /// list, just those (a binary search for each end the band cuts off); a short one
    /// whole, read straight through (a binary search's scattered reads cost more than
    /// the cells they skip); none when the window misses the list's bounds. `None` while
    /// only counted.
    #[inline]
    pub(super) fn band(&self, window: &Window) -> Option<&[Listed]> {
        let listed = self.listed()?;
        if !window.meets(&self.bounds) {
            return Some(&[]);
        }
        if listed.len() <= BAND_SEARCHED_FROM {
            return Some(listed);
        }
        let (Some(first), Some(last)) = (listed.first(), listed.last()) else {
            return Some(listed);
        };
        let (lo, hi) = window.lat_band();
        let start = if first.1.lat_radians() >= lo {
            0
        } else {
            listed.partition_point(|(_, at)| at.lat_radians() < lo)
        };
        let end = if last.1.lat_radians() <= hi {
            listed.len()
        } else {
            start + listed[start..].partition_point(|(_, at)| at.lat_radians() <= hi)
        };
        Some(&listed[start..end])
    }

    /// Occupied cells filed under this region.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        if self.counted == 0 {
            self.listed.len()
        } else {
            self.counted as usize
        }
    }

    /// How many of its coarse cells are occupied.
    #[cfg(test)]
    pub(super) fn coarse(&self) -> u8 {
        self.coarse
    }

    /// Whether the kept bounds are exactly those of the listed centres.
    #[cfg(test)]
    pub(super) fn bounds_exact(&self) -> bool {
        self.bounds == Bounds::of(&self.listed)
    }

    /// Bytes of the list held apart from the region itself.
    pub(super) fn list_bytes(&self) -> usize {
        size_of_val::<[Listed]>(&self.listed)
    }

    /// `cell` (centred at `at`) became occupied; `coarse_filled`: the first of its coarse
    /// cell. Each cell is added once per occupancy: the maps call this under the coarse
    /// cell's lock, in the order the coarse lists change.
    pub(super) fn add(&mut self, cell: CellIndex, at: LatLng, coarse_filled: bool) {
        self.changes = self.changes.wrapping_add(1);
        if coarse_filled {
            self.coarse = self.coarse.saturating_add(1);
        }
        if self.counted > 0 {
            self.counted += 1;
        } else if self.listed.len() < LISTED_MAX && self.coarse <= DENSE_COARSE {
            let lat = at.lat_radians();
            let i = self.listed.partition_point(|(_, p)| p.lat_radians() <= lat);
            let mut grown = Vec::with_capacity(self.listed.len() + 1);
            grown.extend_from_slice(&self.listed[..i]);
            grown.push((cell, at));
            grown.extend_from_slice(&self.listed[i..]);
            self.listed = grown.into_boxed_slice();
            self.bounds.widen(at);
        } else {
            self.counted = u32::try_from(self.listed.len() + 1).unwrap_or(u32::MAX);
            self.listed = Box::default();
            self.bounds = Bounds::default();
        }
    }

    /// `cell` is no longer occupied; `coarse_emptied`: it was the last of its coarse cell.
    pub(super) fn remove(&mut self, cell: CellIndex, coarse_emptied: bool) -> AfterRemoval {
        self.changes = self.changes.wrapping_add(1);
        if coarse_emptied {
            self.coarse = self.coarse.saturating_sub(1);
        }
        if self.counted > 0 {
            self.counted -= 1;
            if self.counted == 0 {
                // Emptied while counted (every relisting on the way raced a change).
                return AfterRemoval::Drop;
            }
            if self.counted as usize <= RELIST_AT && self.coarse <= RELIST_COARSE {
                return AfterRemoval::Relist(self.changes);
            }
            return AfterRemoval::Keep;
        }
        if let Some(at) = self.listed.iter().position(|&(c, _)| c == cell) {
            let mut kept = Vec::with_capacity(self.listed.len() - 1);
            kept.extend_from_slice(&self.listed[..at]);
            kept.extend_from_slice(&self.listed[at + 1..]);
            self.listed = kept.into_boxed_slice();
            self.bounds = Bounds::of(&self.listed);
        }
        if self.listed.is_empty() {
            AfterRemoval::Drop
        } else {
            AfterRemoval::Keep
        }
    }

    /// Lists `cells` (read from the coarse lists after [`Self::remove`] returned
    /// `changes`), unless the region changed since or is listed already.
    pub(super) fn relist(&mut self, changes: u32, mut cells: Vec<Listed>) {
        if self.changes == changes && self.counted > 0 {
            debug_assert_eq!(cells.len(), self.counted as usize);
            cells.sort_unstable_by(|(_, a), (_, b)| a.lat_radians().total_cmp(&b.lat_radians()));
            self.counted = 0;
            self.bounds = Bounds::of(&cells);
            self.listed = cells.into_boxed_slice();
        }
    }
}

/// The part of the sphere a disk of `radius_m` around `centre` can reach, in latitude and
/// longitude: a test cheaper than measuring, passed by every point of the disk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Window {
    lat: f64,
    lng: f64,
    /// Largest latitude difference, in radians.
    dlat: f64,
    /// Largest longitude difference, in radians; `None` when the disk reaches a pole.
    dlng: Option<f64>,
}

/// Relative slack on the window's bounds, far above the rounding of the distance itself.
const WINDOW_SLACK: f64 = 1e-6;

impl Window {
    pub(super) fn new(centre: LatLng, radius_m: f64) -> Self {
        let angle = radius_m / crate::geo::EARTH_RADIUS_M;
        let lat = centre.lat_radians();
        // On a sphere, the points within angle `a` of latitude `φ` span at most
        // `asin(sin a / cos φ)` of longitude either way, while `|φ| + a` stays below a pole.
        let dlng = (lat.abs() + angle < std::f64::consts::FRAC_PI_2 * (1.0 - WINDOW_SLACK))
            .then(|| (angle.sin() / lat.cos()).asin() * (1.0 + WINDOW_SLACK) + 1e-12);
        Self {
            lat,
            lng: centre.lng_radians(),
            dlat: angle * (1.0 + WINDOW_SLACK) + 1e-12,
            dlng,
        }
    }

    /// The latitudes (radians) the disk can reach: every point of it lies in between.
    pub(super) fn lat_band(&self) -> (f64, f64) {
        (self.lat - self.dlat, self.lat + self.dlat)
    }

    /// Whether any point within `b` may lie in the disk (none does when this says no):
    /// `b`'s latitudes overlap the window's, and the nearest of its longitudes (as a
    /// plain interval, so a region across the antimeridian spans them all) is within
    /// the window's reach. Never `false` while some point within `b` passes
    /// [`Self::admits`].
    fn meets(&self, b: &Bounds) -> bool {
        let (south, north) = self.lat_band();
        if f64::from(b.lat[1]) < south || f64::from(b.lat[0]) > north {
            return false;
        }
        let Some(dlng) = self.dlng else {
            return true;
        };
        let (lo, hi) = (f64::from(b.lng[0]), f64::from(b.lng[1]));
        (lo..=hi).contains(&self.lng) || self.lng_apart(lo).min(self.lng_apart(hi)) <= dlng
    }

    /// How far longitude `lng` (radians) lies from the window's, the short way round.
    fn lng_apart(&self, lng: f64) -> f64 {
        let d = (lng - self.lng).abs();
        if d > std::f64::consts::PI {
            std::f64::consts::TAU - d
        } else {
            d
        }
    }

    /// Whether `p` may lie in the disk (it surely does not when this says no).
    pub(super) fn admits(&self, p: LatLng) -> bool {
        if (p.lat_radians() - self.lat).abs() > self.dlat {
            return false;
        }
        let Some(dlng) = self.dlng else {
            return true;
        };
        self.lng_apart(p.lng_radians()) <= dlng
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::geo::distance_m;

    /// No point within the radius is ever left out by the window, at every latitude
    /// (poles and the antimeridian included) and radii from metres to a thousand km; and
    /// the window does leave out most of a wide box around a mid-latitude disk.
    #[test]
    fn the_window_admits_every_point_of_its_disk() {
        let mut rng = StdRng::seed_from_u64(17);
        let mut left_out = 0usize;
        let mut tried = 0usize;
        for _ in 0..4_000 {
            let centre = crate::geo::anywhere(&mut rng);
            let radius = 10f64.powf(rng.random_range(0.0..6.0));
            let w = Window::new(centre, radius);
            // Points at random bearings and distances near the rim, inside and out.
            for _ in 0..50 {
                let bearing = rng.random_range(0.0..std::f64::consts::TAU);
                let d = radius * rng.random_range(0.9..1.1);
                let p = destination(centre, bearing, d);
                let inside = distance_m(centre, p) <= radius;
                if inside {
                    assert!(w.admits(p), "{centre:?} r {radius}: {p:?} left out");
                } else {
                    tried += 1;
                    left_out += usize::from(!w.admits(p));
                }
            }
        }
        assert!(tried > 1_000, "{tried}");
        // Near the rim, most outside points still fall in the box; far ones do not.
        let centre = LatLng::new(35.0, 110.0).unwrap();
        let w = Window::new(centre, 10_000.0);
        let far = (0..1_000)
            .map(|i| destination(centre, f64::from(i) * 0.01, 30_000.0))
            .filter(|&p| w.admits(p))
            .count();
        assert_eq!(far, 0, "{left_out} of {tried} near-rim points left out");
    }

    /// The point `d` metres from `from` along `bearing` (radians from north).
    fn destination(from: LatLng, bearing: f64, d: f64) -> LatLng {
        let a = d / crate::geo::EARTH_RADIUS_M;
        let (lat1, lng1) = (from.lat_radians(), from.lng_radians());
        let lat2 = (lat1.sin() * a.cos() + lat1.cos() * a.sin() * bearing.cos()).asin();
        let lng2 =
            lng1 + (bearing.sin() * a.sin() * lat1.cos()).atan2(a.cos() - lat1.sin() * lat2.sin());
        let lng2 =
            (lng2 + std::f64::consts::PI).rem_euclid(std::f64::consts::TAU) - std::f64::consts::PI;
        LatLng::from_radians(lat2, lng2).unwrap()
    }

    fn cell(i: u64) -> CellIndex {
        LatLng::new(30.0 + i as f64 * 0.01, 110.0)
            .unwrap()
            .to_cell(h3o::Resolution::Nine)
    }

    /// Through adds and removals a list stays in order of latitude, its bounds hold
    /// exactly its centres, and a window's band holds every listed cell the window
    /// admits: at mid-latitude, across the antimeridian and near a pole. Windows that
    /// miss the bounds skip the list.
    #[test]
    fn a_windows_band_holds_every_cell_it_admits() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut skipped = 0;
        // (latitude, longitude) of each area's corner, each 0.2 degrees square: the
        // second touches the antimeridian, and windows reach it from the other side.
        for (lat0, lng0) in [(30.0, 110.0), (-10.0, -180.0), (89.7, -20.0)] {
            let spot = |rng: &mut StdRng, pad: f64| {
                let lng: f64 = rng.random_range(lng0 - pad..lng0 + 0.2 + pad);
                let lng = (lng + 180.0).rem_euclid(360.0) - 180.0;
                let lat: f64 = rng.random_range(lat0 - pad..lat0 + 0.2 + pad);
                LatLng::new(lat.min(90.0), lng).unwrap()
            };
            let mut r = Region::default();
            let mut present: Vec<Listed> = Vec::new();
            for round in 0..2_000 {
                if present.len() < 300 && rng.random_bool(0.6) {
                    let mut at = spot(&mut rng, 0.0);
                    // Now and then on the latitude of a listed centre: ties in the order.
                    if !present.is_empty() && rng.random_bool(0.2) {
                        let (_, same) = present[rng.random_range(0..present.len())];
                        at = LatLng::from_radians(same.lat_radians(), at.lng_radians()).unwrap();
                    }
                    let c = at.to_cell(h3o::Resolution::Fifteen);
                    if present.iter().any(|&(p, _)| p == c) {
                        continue;
                    }
                    r.add(c, at, false);
                    present.push((c, at));
                } else if !present.is_empty() {
                    let (c, _) = present.swap_remove(rng.random_range(0..present.len()));
                    r.remove(c, false);
                }
                let list = r.listed().unwrap_or_default();
                assert_eq!(list.len(), present.len());
                assert!(list.is_sorted_by(|(_, a), (_, b)| a.lat_radians() <= b.lat_radians()));
                assert_eq!(r.bounds, Bounds::of(list));
                if round % 5 == 0 {
                    let w = Window::new(spot(&mut rng, 0.3), rng.random_range(10.0..20_000.0));
                    let band = r.band(&w).unwrap_or_default();
                    let admitted = list.iter().filter(|&&(_, at)| w.admits(at)).count();
                    let in_band = band.iter().filter(|&&(_, at)| w.admits(at)).count();
                    assert_eq!(in_band, admitted, "({lat0}, {lng0}) round {round}");
                    // A long list the window reaches is cut to exactly its band of latitude.
                    if list.len() > BAND_SEARCHED_FROM && w.meets(&r.bounds) {
                        let (lo, hi) = w.lat_band();
                        let want: Vec<Listed> = list
                            .iter()
                            .copied()
                            .filter(|(_, at)| (lo..=hi).contains(&at.lat_radians()))
                            .collect();
                        assert_eq!(band, want.as_slice(), "({lat0}, {lng0}) round {round}");
                    }
                    skipped += usize::from(band.is_empty() && !list.is_empty());
                }
            }
        }
        assert!(skipped > 20, "{skipped} windows skipped a list");
    }

    /// Bounds rounded to `f32` still hold the `f64` centres they were widened with.
    #[test]
    fn bounds_round_outward() {
        let mut rng = StdRng::seed_from_u64(6);
        for _ in 0..10_000 {
            let at = crate::geo::anywhere(&mut rng);
            let b = Bounds::of(&[(at.to_cell(h3o::Resolution::Nine), at)]);
            assert!(
                f64::from(b.lat[0]) <= at.lat_radians() && at.lat_radians() <= f64::from(b.lat[1])
            );
            assert!(
                f64::from(b.lng[0]) <= at.lng_radians() && at.lng_radians() <= f64::from(b.lng[1])
            );
        }
    }

    /// Past [`LISTED_MAX`] cells a region counts; at [`RELIST_AT`] it asks to be listed
    /// again, and a relisting is dropped if a change came in between.
    #[test]
    fn a_region_counts_its_crowd_and_lists_it_again_when_it_thins() {
        let at = LatLng::new(30.0, 110.0).unwrap();
        let mut r = Region::default();
        let n = LISTED_MAX as u64 + 10;
        for i in 0..n {
            r.add(cell(i), at, false);
            if i < LISTED_MAX as u64 {
                assert_eq!(r.listed().map(<[_]>::len), Some(i as usize + 1));
            }
        }
        assert!(r.listed().is_none());
        let mut ask = None;
        let mut removed = 0;
        while ask.is_none() {
            if let AfterRemoval::Relist(c) = r.remove(cell(removed), false) {
                ask = Some(c);
            }
            removed += 1;
        }
        assert_eq!(r.len(), RELIST_AT);
        let ask = ask.unwrap();
        // Handed over in no order, at varied centres: the relisting sorts them and bounds
        // them.
        let cells: Vec<Listed> = (0..RELIST_AT as u64)
            .map(|i| {
                let c = cell(1_000 + i);
                (c, LatLng::from(c))
            })
            .rev()
            .collect();
        // A change in between: the relisting is stale.
        r.add(cell(5_000), at, false);
        r.relist(ask, cells.clone());
        assert!(r.listed().is_none());
        let AfterRemoval::Relist(now) = r.remove(cell(5_000), false) else {
            panic!("still at most RELIST_AT");
        };
        // A counted region whose relistings all raced changes, emptied: dropped, not
        // kept as an empty list.
        let mut other = Region::default();
        for i in 0..=LISTED_MAX as u64 {
            other.add(cell(i), at, false);
        }
        let mut last = AfterRemoval::Keep;
        for i in 0..=LISTED_MAX as u64 {
            last = other.remove(cell(i), false);
        }
        assert_eq!(last, AfterRemoval::Drop);
        r.relist(now, cells);
        assert_eq!(r.listed().map(<[_]>::len), Some(RELIST_AT));
        let list = r.listed().unwrap_or_default();
        assert!(list.is_sorted_by(|(_, a), (_, b)| a.lat_radians() <= b.lat_radians()));
        assert!(r.bounds_exact());
        assert!(
            r.bounds.lat[0] < r.bounds.lat[1],
            "varied centres: {:?}",
            r.bounds
        );
        for i in 0..RELIST_AT as u64 {
            let last = i + 1 == RELIST_AT as u64;
            let want = if last {
                AfterRemoval::Drop
            } else {
                AfterRemoval::Keep
            };
            assert_eq!(r.remove(cell(1_000 + i), false), want);
        }
    }

    /// A few cells on most of a region's coarse cells count too (dense country), and are
    /// listed again once the occupied coarse cells fall to [`RELIST_COARSE`].
    #[test]
    fn a_region_with_most_coarse_cells_occupied_counts_them() {
        let at = LatLng::new(30.0, 110.0).unwrap();
        let mut r = Region::default();
        for i in 0..u64::from(DENSE_COARSE) {
            r.add(cell(i), at, true);
        }
        assert_eq!(r.listed().map(<[_]>::len), Some(usize::from(DENSE_COARSE)));
        r.add(cell(100), at, true);
        assert!(r.listed().is_none(), "{} coarse cells occupied", r.coarse());
        let mut i = 0;
        let ask = loop {
            match r.remove(cell(i), true) {
                AfterRemoval::Relist(c) => break c,
                AfterRemoval::Keep => i += 1,
                AfterRemoval::Drop => panic!("not empty"),
            }
        };
        assert_eq!(r.coarse(), RELIST_COARSE);
        let left: Vec<Listed> = (i + 1..u64::from(DENSE_COARSE))
            .chain([100])
            .map(|i| (cell(i), at))
            .collect();
        r.relist(ask, left);
        assert_eq!(r.listed().map(<[_]>::len), Some(usize::from(RELIST_COARSE)));
    }
}
