//! The sparse-country shortcut of a search: where few cells are occupied, every occupied
//! privacy cell near the centre is found through the region level in a handful of
//! lookups and measured straight from its region's list, instead of walking thousands of
//! empty cells ring by ring.
//!
//! Why it finds everyone the ring walk would. A user is within `r` of the centre `q` when
//! their privacy cell's centre `p` is. `p` lies in coarse cell `c` (geometric containment,
//! [`coarse_of`](super::maps::coarse_of)), so `c`'s centre is within `C7` (the coarse
//! circumradius bound) of `p`, and within `reach = r + C7` of `q`. `p`'s cell is filed
//! under `c`'s region `R`, its H3 parent, whose centre is within `C5` (the region
//! circumradius bound) of `c`'s centre — the test
//! `descendants_lie_within_their_parents_circumradius_bound` checks that at every
//! pentagon, its neighbours and a global sample — so `R`'s centre is within `reach + C5`
//! of `q`, which is exactly what puts `R` among the regions visited (`regions_within`:
//! every region whose centre is within `reach + C5`, rings walked until no later centre
//! can be). `R` lists `p`'s cell with `p` itself, as [`crate::geo::centre::centre`] gives
//! it, so the distance measured is the ring walk's own, bit for bit; the latitude and
//! longitude window only skips cells that cannot be within `r` (a region keeps its list
//! in order of latitude, so the cells outside the window's band of latitude are not even
//! read).
//!
//! A region that only counts its cells (toward a city) is read, by searches of up to
//! 2 km, through the coarse map instead (wider searches near one walk rings): `p` lies within `r` of `q` in coarse cell `c`, so `c`'s centre is within `r +
//! C7` of `q` and `c` is among the coarse cells the ring cover of the disk yields (the
//! cover's own guarantee, which the ring walk relies on); `c`'s list holds `p`'s cell,
//! measured from its exact centre. Only coarse cells whose region was seen counting are
//! read, so no cell is found twice.

use h3o::{CellIndex, LatLng};

use super::{
    maps::{COARSE_RESOLUTION, Maps, REGION_RESOLUTION, cell_shard},
    region::Window,
    region_centres::RegionCentres,
};
use crate::geo::{
    cell::{Ring, RingCover, max_circumradius_m},
    centre::centre as centre_of,
    chord2, chord2_of_m, distance_m, unit_vector,
};

/// Most privacy cells within the radius the shortcut hands to a search; beyond, the ring
/// walk goes on (its early stop is cheaper than sorting this many). The search reads
/// buckets only until its page is complete (the cells come nearest first).
const MAX_CELLS: usize = 256;
/// Most privacy cells the shortcut reads from coarse lists (for regions that only count
/// their cells) before leaving the search to the ring walk.
const MAX_SCAN: usize = 256;
/// Widest search whose disk the shortcut covers with coarse cells when a region in reach
/// only counts its cells: about 19 to 37 coarse centres. A wider disk's cover costs more
/// centres than the walk's early stop, and the walk takes it.
const THROUGH_COARSE_MAX_M: f64 = 2_000.0;
/// Slack for the `f32` region centres (within a metre of the exact ones).
const F32_SLACK_M: f64 = 10.0;

/// Every occupied privacy cell within `radius_m` of `centre`, with its centre's distance;
/// `None` in dense country (the ring walk is cheaper there).
#[inline]
pub(super) fn cells_near(
    maps: &Maps,
    centre: LatLng,
    origin: CellIndex,
    radius_m: f64,
) -> Option<Vec<(CellIndex, f64)>> {
    // Dense country is told at once: the centre's own privacy cell is occupied (one
    // lookup the walk makes anyway), or, for a search wider than the coarse reading
    // takes, its region only counts its cells. The region is the privacy cell's H3
    // parent, a few bit operations (near a region's edge that may be the neighbour of
    // the region holding the centre: this only chooses the method; the cover below is
    // exact).
    if maps.cells.read(cell_shard(origin)).contains_key(origin) {
        return None;
    }
    let through_coarse = radius_m <= THROUGH_COARSE_MAX_M;
    if !through_coarse {
        let home = origin.parent(REGION_RESOLUTION)?;
        if maps
            .regions
            .read(cell_shard(home))
            .get(home)
            .is_some_and(|r| r.listed().is_none())
        {
            return None;
        }
    }
    beyond_the_centre(maps, centre, radius_m, through_coarse)
}

/// [`cells_near`] once the centre's own cell is empty; kept out of line, so the dense
/// path's code stays as it was.
#[inline(never)]
fn beyond_the_centre(
    maps: &Maps,
    centre: LatLng,
    radius_m: f64,
    through_coarse: bool,
) -> Option<Vec<(CellIndex, f64)>> {
    let reach = radius_m + max_circumradius_m(COARSE_RESOLUTION);
    let q = unit_vector(centre);
    let window = Window::new(centre, radius_m);
    let mut out: Vec<(CellIndex, f64)> = Vec::new();
    // Regions in reach that only count their cells (a city's edge): read afterwards
    // through the coarse cells of the disk.
    let mut counted: Vec<CellIndex> = Vec::new();
    let mut dense = false;
    regions_within(
        |r| maps.region_centre(r),
        centre,
        q,
        reach,
        |region| {
            let regions = maps.regions.read(cell_shard(region));
            let Some(r) = regions.get(region) else {
                return true;
            };
            let Some(band) = r.band(&window) else {
                if !through_coarse {
                    dense = true;
                    return false;
                }
                counted.push(region);
                return true;
            };
            for &(cell, at) in band {
                if window.admits(at) {
                    let d = distance_m(centre, at);
                    if d <= radius_m {
                        out.push((cell, d));
                    }
                }
            }
            if out.len() > MAX_CELLS {
                dense = true;
                return false;
            }
            true
        },
    );
    if dense
        || !(counted.is_empty() || through_coarse_cells(maps, centre, radius_m, &counted, &mut out))
    {
        return None;
    }
    Some(out)
}

/// What a source that lists each region's occupied privacy cells (a remote store) knows
/// of one region, for [`listed_near`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Listing<'a> {
    /// Not read yet.
    Unknown,
    /// Too many cells to list: dense country.
    Dense,
    /// The privacy cells filed under the region (by their coarse cell's H3 parent, as
    /// the in-memory regions file them); more than are occupied does no harm.
    Cells(&'a [CellIndex]),
}

/// The sparse shortcut over a source that lists whole regions: every occupied privacy
/// cell within `radius_m` of `centre`, with the distance to its centre; `Ok(None)` in
/// dense country (a region in reach too full to list, or more than [`MAX_CELLS`] cells
/// found). It visits the regions [`cells_near`] visits, so it finds the cells the ring
/// walk would (the proof at the top of this module), each measured from
/// [`crate::geo::centre::centre`] as the walk measures it.
///
/// # Errors
/// Every region in reach whose listing is [`Listing::Unknown`] (none is named once one
/// in reach is known to be dense).
pub(crate) fn listed_near<'a>(
    centre: LatLng,
    radius_m: f64,
    mut listing: impl FnMut(CellIndex) -> Listing<'a>,
) -> Result<Option<Vec<(CellIndex, f64)>>, Vec<CellIndex>> {
    let reach = radius_m + max_circumradius_m(COARSE_RESOLUTION);
    let q = unit_vector(centre);
    let mut missing = Vec::new();
    let mut dense = false;
    let mut out = Vec::new();
    regions_within(
        |r| shared_region_centres().get(r),
        centre,
        q,
        reach,
        |region| {
            match listing(region) {
                Listing::Unknown => missing.push(region),
                Listing::Dense => dense = true,
                Listing::Cells(cells) => {
                    for &cell in cells {
                        let d = distance_m(centre, centre_of(cell));
                        if d <= radius_m {
                            out.push((cell, d));
                        }
                    }
                }
            }
            !dense && out.len() <= MAX_CELLS
        },
    );
    if dense || out.len() > MAX_CELLS {
        return Ok(None);
    }
    if !missing.is_empty() {
        return Err(missing);
    }
    Ok(Some(out))
}

/// Region centres for sources without maps of their own (a remote store's searches).
fn shared_region_centres() -> &'static RegionCentres {
    static CENTRES: std::sync::OnceLock<RegionCentres> = std::sync::OnceLock::new();
    CENTRES.get_or_init(RegionCentres::default)
}

#[cfg(test)]
thread_local! {
    /// Privacy cells this thread's shortcuts read through coarse lists.
    pub(super) static COARSE_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Adds to `out` the occupied privacy cells within `radius_m` of `centre` filed under the
/// `counted` regions, read from the coarse lists of the coarse cells the disk reaches,
/// ring by ring; `false` (dense country) once more than [`MAX_SCAN`] listed cells have
/// been read or [`MAX_CELLS`] found.
fn through_coarse_cells(
    maps: &Maps,
    centre: LatLng,
    radius_m: f64,
    counted: &[CellIndex],
    out: &mut Vec<(CellIndex, f64)>,
) -> bool {
    let mut cover = RingCover::new(centre, COARSE_RESOLUTION, radius_m);
    let slack = max_circumradius_m(COARSE_RESOLUTION);
    let mut ring = Ring::default();
    let mut scanned = 0usize;
    while cover.next_ring(&mut ring) {
        for &(coarse, d) in &ring.cells {
            if d - slack > radius_m
                || !coarse
                    .parent(REGION_RESOLUTION)
                    .is_some_and(|r| counted.contains(&r))
            {
                continue;
            }
            let lists = maps.coarse.read(cell_shard(coarse));
            let Some(list) = lists.get(coarse) else {
                continue;
            };
            scanned += list.len();
            if scanned > MAX_SCAN {
                return false;
            }
            #[cfg(test)]
            COARSE_READS.set(COARSE_READS.get() + list.len());
            for &cell in list.iter() {
                let at = centre_of(cell);
                let d = distance_m(centre, at);
                if d <= radius_m {
                    out.push((cell, d));
                }
            }
        }
        if out.len() > MAX_CELLS {
            return false;
        }
    }
    true
}

/// Calls `visit` with every region (cell at [`REGION_RESOLUTION`]) whose centre lies
/// within `reach` plus the region circumradius bound of `centre` (`q`, its unit vector),
/// until `visit` returns `false`: ring by ring from the region holding the centre, as
/// [`RingCover`] walks, with region centres from [`Maps::region_centre`] compared as
/// chords. It stops one circumradius later than [`RingCover::cells_within`] would: that
/// cover proves no later *point* is within its radius, and what is needed here is that
/// no later region's *centre* is within the visiting distance. The `f32` centres are
/// within a metre; the slack on the thresholds keeps the cover a superset of the exact
/// one.
fn regions_within(
    region_centre: impl Fn(CellIndex) -> [f32; 3],
    centre: LatLng,
    q: [f64; 3],
    reach: f64,
    mut visit: impl FnMut(CellIndex) -> bool,
) {
    let region_circumradius = max_circumradius_m(REGION_RESOLUTION);
    let beyond = chord2_of_m(reach + region_circumradius + F32_SLACK_M);
    // A centre in a later ring is at least the ring's nearest centre less a circumradius
    // away (the ring cover's lower bound, for the centre as a point), so once the nearest
    // is beyond the visiting distance plus a circumradius, no later centre is within it.
    let done = chord2_of_m(reach + 2.0 * region_circumradius + F32_SLACK_M);
    let origin = centre.to_cell(REGION_RESOLUTION);
    for k in 0.. {
        let mut nearest = f64::INFINITY;
        let mut any = false;
        for region in origin.grid_ring::<Vec<_>>(k) {
            any = true;
            let c = chord2(q, widen(region_centre(region)));
            nearest = nearest.min(c);
            if c <= beyond && !visit(region) {
                return;
            }
        }
        if k > 0 && (!any || nearest > done) {
            return;
        }
    }
}

/// A kept `f32` unit vector, for arithmetic.
fn widen(v: [f32; 3]) -> [f64; 3] {
    v.map(f64::from)
}
