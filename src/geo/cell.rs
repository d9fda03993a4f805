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

impl Centres {
    /// The centre of `cell`, got this way.
    fn of(self, cell: CellIndex) -> LatLng {
        match self {
            Self::Remembered => super::centre::centre(cell),
            Self::Computed => LatLng::from(cell),
        }
    }
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
            let d = distance_m(centre, self.centres.of(cell));
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
    ///
    /// A disk that lies inside the cell holding its centre (see [`disk_inside`]: a 100 m
    /// shake at resolution 7, five times in six) is answered with that one cell, without
    /// the ring walk's 7 to 19 centres.
    pub fn cells_within(
        centre: LatLng,
        resolution: Resolution,
        radius_m: f64,
        centres: Centres,
    ) -> Vec<(CellIndex, f64)> {
        let mut cover = Self::with_centres(centre, resolution, radius_m, centres);
        if radius_m < INSIDE_CHECK_EDGES * resolution.edge_length_m()
            && disk_inside(cover.origin, centre, radius_m)
        {
            return vec![(cover.origin, distance_m(centre, centres.of(cover.origin)))];
        }
        let slack = cover.circumradius_m;
        let mut ring = Ring::default();
        let mut out = Vec::new();
        while cover.next_ring(&mut ring) {
            out.extend(ring.cells.iter().filter(|(_, d)| *d - slack <= radius_m));
        }
        out
    }
}

/// Radii, in average edges of the cover's resolution, below which
/// [`RingCover::cells_within`] first asks whether the disk lies inside one cell. A
/// regular hexagon's inradius is 0.87 edges, so a larger disk seldom fits in one; H3's
/// smallest cells are about half the average.
const INSIDE_CHECK_EDGES: f64 = 0.5;

/// Metres a disk must clear a cell's edges by to count as inside it: far above the
/// floating-point error of the test below (nanometres) and of h3o's own point-in-cell.
const INSIDE_SLACK_M: f64 = 0.5;

/// Whether every point within `radius_m` of `centre` lies in `cell`, the cell holding
/// `centre`. `false` when unsure: it is a shortcut, never needed for correctness.
///
/// An H3 cell is bounded by arcs of great circles: each edge is a straight segment in the
/// gnomonic projection of an icosahedron face, and gnomonic lines are great circles; an
/// edge that crosses a face edge is split there by an extra boundary vertex, so each arc
/// is still one great circle. A point nearer `centre` than the distance from `centre` to
/// the great circle of every edge cannot be across any edge, so it lies in the same cell
/// as `centre`. That distance is the angle `asin(|q · n|)` for the unit vector `q` of
/// `centre` and the unit normal `n` of the edge's circle. The tests sample points on
/// circles around random spots, pentagons and cells on icosahedron edges.
fn disk_inside(cell: CellIndex, centre: LatLng, radius_m: f64) -> bool {
    let clear_rad = (radius_m + INSIDE_SLACK_M) / super::EARTH_RADIUS_M;
    if clear_rad >= std::f64::consts::FRAC_PI_2 {
        return false;
    }
    let limit = clear_rad.sin();
    let q = super::unit_vector(centre);
    let boundary = cell.boundary();
    let mut vertices = boundary.iter().map(|&v| super::unit_vector(v));
    let Some(first) = vertices.next() else {
        return false;
    };
    let mut a = first;
    for b in vertices.chain(std::iter::once(first)) {
        let n = [
            a[1] * b[2] - a[2] * b[1],
            a[2] * b[0] - a[0] * b[2],
            a[0] * b[1] - a[1] * b[0],
        ];
        let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
        let dot = q[0] * n[0] + q[1] * n[1] + q[2] * n[2];
        // Not `dot.abs() <= limit * len` alone: a degenerate edge (len 0) must say no.
        if len == 0.0 || dot.abs() <= limit * len {
            return false;
        }
        a = b;
    }
    true
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

    /// `p` moved `m` metres along `bearing` degrees.
    fn moved(p: LatLng, bearing: f64, m: f64) -> LatLng {
        use geo::{Destination as _, Haversine, Point};
        let to = Haversine.destination(Point::new(p.lng(), p.lat()), bearing, m);
        LatLng::new(to.y(), to.x()).unwrap()
    }

    /// Where the inside shortcut says a disk lies in its centre's cell, points on the
    /// disk's rim and within it all lie in that cell: at random spots, around every
    /// pentagon, and along the icosahedron's edges (the great circles between adjacent
    /// resolution-0 pentagons, where cells are split between two faces' projections).
    /// The shortcut must also fire often enough to matter.
    #[test]
    fn a_disk_said_to_be_inside_its_cell_is() {
        use geo::{Distance as _, Haversine, InterpolatePoint as _, Point};
        let mut rng = StdRng::seed_from_u64(23);
        let mut spots: Vec<LatLng> = Vec::new();
        for _ in 0..1_500 {
            spots.push(
                LatLng::new(
                    rng.random_range(-89.9..89.9),
                    rng.random_range(-180.0..180.0),
                )
                .unwrap(),
            );
        }
        let vertices: Vec<Point> = Resolution::Zero
            .pentagons()
            .map(|c| {
                let p = LatLng::from(c);
                Point::new(p.lng(), p.lat())
            })
            .collect();
        for (i, &a) in vertices.iter().enumerate() {
            for &b in &vertices[i + 1..] {
                // Adjacent icosahedron vertices are 63.4 degrees (7 054 km) apart.
                if Haversine.distance(a, b) > 7_500_000.0 {
                    continue;
                }
                for _ in 0..40 {
                    let on = Haversine.point_at_ratio_between(a, b, rng.random_range(0.0..1.0));
                    let on = LatLng::new(on.y(), on.x()).unwrap();
                    spots.push(moved(
                        on,
                        rng.random_range(0.0..360.0),
                        rng.random_range(0.0..3_000.0),
                    ));
                }
            }
            let vertex = LatLng::new(a.y(), a.x()).unwrap();
            for _ in 0..40 {
                spots.push(moved(
                    vertex,
                    rng.random_range(0.0..360.0),
                    rng.random_range(0.0..6_000.0),
                ));
            }
        }
        for res in [Resolution::Six, Resolution::Seven, Resolution::Nine] {
            let (mut inside, mut split, mut pentagons) = (0, 0, 0);
            for &q in &spots {
                let cell = q.to_cell(res);
                let r = rng.random_range(0.0..INSIDE_CHECK_EDGES * res.edge_length_m());
                if !disk_inside(cell, q, r) {
                    continue;
                }
                inside += 1;
                split += usize::from(cell.icosahedron_faces().len() > 1);
                pentagons += usize::from(cell.is_pentagon());
                for step in 0..48 {
                    let bearing = f64::from(step) * 7.5;
                    for m in [r, r * 0.5] {
                        let p = moved(q, bearing, m);
                        assert!(distance_m(q, p) <= r + 1e-6);
                        assert_eq!(
                            p.to_cell(res),
                            cell,
                            "{res:?}: {p:?}, {m} m from {q:?}, left {cell} (r {r})"
                        );
                    }
                }
                let cover = RingCover::cells_within(q, res, r, Centres::Computed);
                assert_eq!(cover.len(), 1);
                assert_eq!(cover[0].0, cell);
                assert_eq!(cover[0].1, distance_m(q, LatLng::from(cell)));
            }
            // Cells split between two faces, and pentagons, were among those tested.
            assert!(
                split > 20 && pentagons > 0,
                "{res:?}: {split} split, {pentagons} pentagons"
            );
            // The radii average a quarter of an edge: about half the disks fit.
            assert!(
                inside * 3 > spots.len(),
                "{res:?}: only {inside} of {} disks inside",
                spots.len()
            );
        }
    }

    /// The shortcut says no whenever the disk reaches across an edge: a point of the
    /// rim in another cell means the disk was not inside.
    #[test]
    fn a_disk_across_an_edge_is_not_inside() {
        let mut rng = StdRng::seed_from_u64(29);
        let res = Resolution::Seven;
        let mut across = 0;
        for _ in 0..2_000 {
            let q = LatLng::new(
                rng.random_range(-80.0..80.0),
                rng.random_range(-180.0..180.0),
            )
            .unwrap();
            let cell = q.to_cell(res);
            let r = rng.random_range(0.0..INSIDE_CHECK_EDGES * res.edge_length_m());
            let leaves =
                (0..72).any(|step| moved(q, f64::from(step) * 5.0, r).to_cell(res) != cell);
            if leaves {
                across += 1;
                assert!(!disk_inside(cell, q, r), "{q:?} r {r}");
            }
        }
        assert!(across > 100, "only {across} disks crossed an edge");
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
