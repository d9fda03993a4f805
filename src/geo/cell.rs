//! H3 policy: which resolutions geomatch indexes at, and how a radius is covered by cells.
//!
//! [`RingCover`] walks grid rings outwards from the cell holding the query point and stops
//! at the first ring that provably lies entirely beyond the radius. The proof needs no
//! lookup table of ring counts per resolution, so it stays exact near pentagons and at the
//! icosahedron's distorted face edges:
//!
//! * grid distance changes by at most one between adjacent cells, so the great-circle path
//!   from the query point `q` to any point `p` in ring `k' >= k` crosses a cell of ring `k`;
//! * every point of a cell lies within [`max_circumradius_m`] of its centre;
//! * hence `dist(q, p) >= min over ring k of (dist(q, centre) - max_circumradius)`, the
//!   ring's lower bound, and once that exceeds the radius no further ring can hold a match.
//!
//! The same bound lets a search stop early once it holds enough results nearer than the
//! next ring's lower bound.

use h3o::{CellIndex, LatLng, Resolution};

use crate::geo::distance_m;

/// Default resolution of privacy cells, the one the index and the matcher snap positions to.
pub const PRIVACY_RESOLUTION: Resolution = Resolution::Nine;

/// Upper bound on the distance from any H3 cell's centre to any point of that cell, at
/// `resolution`: 1.5 times the resolution's average edge length.
///
/// Regular hexagons have circumradius equal to their edge; H3's largest cells are about
/// 1.3 times the average edge (measured over every pentagon, its neighbours and a random
/// global sample in the tests below), so 1.5 leaves margin.
pub fn max_circumradius_m(resolution: Resolution) -> f64 {
    1.5 * resolution.edge_length_m()
}

/// One ring of a cover: its cells with the distance from the query point to each centre.
#[derive(Debug, Default)]
pub struct Ring {
    /// Cells at exactly this grid distance from the origin, with centre distances in metres.
    pub cells: Vec<(CellIndex, f64)>,
    /// No point in this ring or any later one is nearer than this, in metres.
    pub lower_bound_m: f64,
}

/// How a cover gets the centres of its cells (the same `LatLng`s either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Centres {
    /// From this thread's table ([`super::centre::centre`]): for walks that come back to
    /// the same cells (searches and watches, which ask around where users are; the
    /// index's write path uses the table too, for the cells its users ping from).
    Remembered,
    /// From h3o every time: for a cover of a spot whose cells seldom come back to this
    /// thread, where a miss in the table costs more than it saves (a shake's few bucket
    /// cells, measured once per shake; the load generator shakes at a new spot each time).
    Computed,
}

/// Ring-by-ring cover of a disk of `radius_m` around a point, nearest ring first.
#[derive(Debug, Clone)]
pub struct RingCover {
    origin: CellIndex,
    centre: LatLng,
    radius_m: f64,
    circumradius_m: f64,
    centres: Centres,
    next_k: u32,
    done: bool,
}

impl RingCover {
    /// Starts a cover of the disk of `radius_m` around `centre` with cells at `resolution`,
    /// their centres [`Centres::Remembered`].
    pub fn new(centre: LatLng, resolution: Resolution, radius_m: f64) -> Self {
        Self::with_centres(centre, resolution, radius_m, Centres::Remembered)
    }

    /// [`RingCover::new`], with the centres got as `centres` says.
    pub fn with_centres(
        centre: LatLng,
        resolution: Resolution,
        radius_m: f64,
        centres: Centres,
    ) -> Self {
        Self {
            origin: centre.to_cell(resolution),
            centre,
            radius_m,
            circumradius_m: max_circumradius_m(resolution),
            centres,
            next_k: 0,
            done: false,
        }
    }

    /// The cell holding the centre, at the cover's resolution.
    pub fn origin(&self) -> CellIndex {
        self.origin
    }

    /// Fills `ring` with the next ring of cells, or returns `false` once every remaining
    /// ring lies entirely beyond the radius. Ring 0, the cell holding the centre, always
    /// comes first.
    pub fn next_ring(&mut self, ring: &mut Ring) -> bool {
        if self.done {
            return false;
        }
        ring.cells.clear();
        let k = self.next_k;
        let centre = self.centre;
        let mut nearest = f64::INFINITY;
        for cell in self.origin.grid_ring::<Vec<_>>(k) {
            let at = match self.centres {
                Centres::Remembered => super::centre::centre(cell),
                Centres::Computed => LatLng::from(cell),
            };
            let d = distance_m(centre, at);
            nearest = nearest.min(d);
            ring.cells.push((cell, d));
        }
        ring.lower_bound_m = if k == 0 {
            0.0
        } else {
            (nearest - self.circumradius_m).max(0.0)
        };
        if k > 0 && (ring.cells.is_empty() || ring.lower_bound_m > self.radius_m) {
            self.done = true;
            return false;
        }
        self.next_k = k + 1;
        true
    }

    /// Every cell that may hold a point within the radius, with its centre distance.
    pub fn cells_within(
        centre: LatLng,
        resolution: Resolution,
        radius_m: f64,
        centres: Centres,
    ) -> Vec<(CellIndex, f64)> {
        let mut cover = Self::with_centres(centre, resolution, radius_m, centres);
        let slack = cover.circumradius_m;
        let mut ring = Ring::default();
        let mut out = Vec::new();
        while cover.next_ring(&mut ring) {
            out.extend(ring.cells.iter().filter(|(_, d)| *d - slack <= radius_m));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn circumradius(cell: CellIndex) -> f64 {
        let c = LatLng::from(cell);
        cell.boundary()
            .iter()
            .map(|v| distance_m(c, *v))
            .fold(0.0, f64::max)
    }

    #[test]
    fn circumradius_bound_holds_at_pentagons_their_neighbours_and_random_cells() {
        let mut rng = StdRng::seed_from_u64(7);
        for res in [
            Resolution::Five,
            Resolution::Seven,
            Resolution::Eight,
            Resolution::Nine,
            Resolution::Ten,
        ] {
            let bound = max_circumradius_m(res);
            let mut worst: f64 = 0.0;
            for pentagon in res.pentagons() {
                for cell in pentagon.grid_disk::<Vec<_>>(3) {
                    worst = worst.max(circumradius(cell));
                }
            }
            for _ in 0..20_000 {
                let lat = rng.random_range(-90.0..=90.0);
                let lng = rng.random_range(-180.0..=180.0);
                let cell = LatLng::new(lat, lng).unwrap().to_cell(res);
                worst = worst.max(circumradius(cell));
            }
            assert!(
                worst <= bound,
                "{res:?}: worst circumradius {worst} over bound {bound}"
            );
            // The bound is not absurdly loose either: it costs extra rings.
            assert!(worst > 0.8 * bound / 1.5, "{res:?}: worst {worst}");
        }
    }

    /// Every descendant's centre lies within its ancestor's circumradius bound of the
    /// ancestor's centre (the sparse-country shortcut files coarse cells under their H3
    /// parent and relies on it): at every pentagon and its neighbours and a global sample.
    #[test]
    fn descendants_lie_within_their_parents_circumradius_bound() {
        let mut rng = StdRng::seed_from_u64(17);
        let (parent_res, child_res) = (Resolution::Five, Resolution::Seven);
        let bound = max_circumradius_m(parent_res);
        let mut parents: Vec<CellIndex> = parent_res
            .pentagons()
            .flat_map(|p| p.grid_disk::<Vec<_>>(2))
            .collect();
        for _ in 0..3_000 {
            let lat = rng.random_range(-90.0..=90.0);
            let lng = rng.random_range(-180.0..=180.0);
            parents.push(LatLng::new(lat, lng).unwrap().to_cell(parent_res));
        }
        let mut worst: f64 = 0.0;
        for parent in parents {
            let centre = LatLng::from(parent);
            for child in parent.children(child_res) {
                worst = worst.max(distance_m(centre, LatLng::from(child)));
            }
        }
        assert!(worst <= bound, "worst {worst} over bound {bound}");
    }

    /// Brute force: every cell whose centre is within `r` of `q` appears in the cover.
    #[test]
    fn cover_contains_every_cell_within_the_radius() {
        let mut rng = StdRng::seed_from_u64(11);
        let res = Resolution::Nine;
        let mut points: Vec<LatLng> = res.pentagons().map(LatLng::from).collect();
        for _ in 0..60 {
            points.push(
                LatLng::new(
                    rng.random_range(-89.0..89.0),
                    rng.random_range(-180.0..180.0),
                )
                .unwrap(),
            );
        }
        for q in points {
            let r = rng.random_range(0.0..3_000.0);
            let remembered = RingCover::cells_within(q, res, r, Centres::Remembered);
            // Both ways of getting centres give the same cover, distances included.
            assert_eq!(
                remembered,
                RingCover::cells_within(q, res, r, Centres::Computed)
            );
            let covered: std::collections::HashSet<_> =
                remembered.into_iter().map(|(c, _)| c).collect();
            // Brute force over a generous disk: far more rings than any bound needs.
            let k = (r / (res.edge_length_m() * 0.5)).ceil() as u32 + 2;
            for cell in q.to_cell(res).grid_disk::<Vec<_>>(k) {
                if distance_m(q, LatLng::from(cell)) <= r {
                    assert!(
                        covered.contains(&cell),
                        "{cell} within {r} m of {q:?} missed"
                    );
                }
            }
        }
    }

    #[test]
    fn rings_lower_bounds_never_exceed_true_distances() {
        let q = LatLng::new(31.2304, 121.4737).unwrap();
        let mut cover = RingCover::new(q, Resolution::Nine, 2_000.0);
        let mut ring = Ring::default();
        let mut rings = 0;
        while cover.next_ring(&mut ring) {
            for (cell, d) in &ring.cells {
                assert!(
                    *d >= ring.lower_bound_m,
                    "{cell}: {d} < {}",
                    ring.lower_bound_m
                );
            }
            rings += 1;
        }
        assert!(
            rings > 3,
            "a 2 km cover at res 9 needs several rings, got {rings}"
        );
        assert!(
            rings < 20,
            "a 2 km cover at res 9 should stop early, got {rings}"
        );
    }
}
