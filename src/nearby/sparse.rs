//! The sparse-country shortcut of a search: where few cells are occupied, every occupied
//! privacy cell near the centre is found through the region level in a handful of
//! lookups and measured once, instead of walking thousands of empty cells ring by ring.
//!
//! Why it finds everyone the ring walk would. A user is within `r` of the centre `q` when
//! their privacy cell's centre `p` is. `p` lies in coarse cell `c` (geometric containment,
//! [`coarse_of`](super::maps::coarse_of)), so `c`'s centre is within `reach = r + C7` of
//! `q` (`C7`: the coarse circumradius bound). `c`'s region `R` is its H3 parent, whose
//! centre is within `C5` (the region circumradius bound) of `c`'s centre — the test
//! `descendants_lie_within_their_parents_circumradius_bound` checks that at every
//! pentagon, its neighbours and a global sample — so `R`'s centre is within `reach + C5`
//! of `q`, which is exactly what puts `R` in the region cover of `reach`
//! ([`RingCover::cells_within`]). `R` lists `c` with a point inside it (to within a metre),
//! which is within `C7` of `c`'s centre; the pre-filter allows for both. So `c`, hence
//! `p`, is measured, with the ring walk's own distance (`distance_m` to `LatLng::from(p)`).

use h3o::{CellIndex, LatLng};

use super::maps::{COARSE_RESOLUTION, Maps, REGION_RESOLUTION, cell_shard};
use crate::geo::{
    cell::{RingCover, max_circumradius_m},
    distance_m,
};

/// A region listing more occupied coarse cells than this is dense country, where the ring
/// walk's early stop is cheaper than measuring every cell.
const DENSE_REGION: usize = 24;
/// Most occupied privacy cells the shortcut measures; beyond, the ring walk goes on.
const MAX_CELLS: usize = 64;
/// Slack for the `f32` points the regions keep (within a metre of the exact ones).
const F32_SLACK_M: f64 = 10.0;

/// Every occupied privacy cell that may hold a user within `radius_m` of `centre`, with
/// its centre's distance; `None` in dense country (the ring walk is cheaper there).
#[inline]
pub(super) fn cells_near(
    maps: &Maps,
    centre: LatLng,
    origin: CellIndex,
    radius_m: f64,
) -> Option<Vec<(CellIndex, f64)>> {
    // Dense country is told at once: the centre's own privacy cell is occupied (one
    // lookup the walk makes anyway), or its region lists many coarse cells. The region
    // is the privacy cell's H3 parent, a few bit operations (near a region's edge that
    // may be the neighbour of the region holding the centre: this only chooses the
    // method; the cover below is exact).
    if maps.cells.read(cell_shard(origin)).contains_key(&origin) {
        return None;
    }
    beyond_the_centre(maps, centre, origin, radius_m)
}

/// [`cells_near`] once the centre's own cell is empty; kept out of line, so the dense
/// path's code stays as it was.
#[inline(never)]
fn beyond_the_centre(
    maps: &Maps,
    centre: LatLng,
    origin: CellIndex,
    radius_m: f64,
) -> Option<Vec<(CellIndex, f64)>> {
    let home = origin.parent(REGION_RESOLUTION)?;
    if maps
        .regions
        .read(cell_shard(home))
        .get(&home)
        .is_some_and(|list| list.len() > DENSE_REGION)
    {
        return None;
    }
    let coarse_circumradius = max_circumradius_m(COARSE_RESOLUTION);
    let reach = radius_m + coarse_circumradius;
    let mut near: Vec<CellIndex> = Vec::new();
    for (region, _) in RingCover::cells_within(centre, REGION_RESOLUTION, reach) {
        let regions = maps.regions.read(cell_shard(region));
        let Some(list) = regions.get(&region) else {
            continue;
        };
        if list.len() > DENSE_REGION {
            return None;
        }
        for &(coarse, [lat, lng]) in list.iter() {
            let Ok(at) = LatLng::new(f64::from(lat), f64::from(lng)) else {
                // A centre h3o made is always valid; were it not, measure the cell.
                near.push(coarse);
                continue;
            };
            // `at` is inside the coarse cell: its centre is within the circumradius of it.
            if distance_m(centre, at) - coarse_circumradius - F32_SLACK_M <= reach {
                near.push(coarse);
            }
        }
    }
    let mut out: Vec<(CellIndex, f64)> = Vec::new();
    for coarse in near {
        let map = maps.coarse.read(cell_shard(coarse));
        let Some(cells) = map.get(&coarse) else {
            continue;
        };
        if out.len() + cells.len() > MAX_CELLS {
            return None;
        }
        out.extend(cells.iter().map(|&cell| (cell, 0.0)));
    }
    // Measured with no lock held.
    for (cell, d) in &mut out {
        *d = distance_m(centre, LatLng::from(*cell));
    }
    Some(out)
}
