//! Cell centres, remembered per thread.
//!
//! `LatLng::from(cell)` costs h3o a walk down the cell's digits and a gnomonic projection
//! (`atan2`, `sin_cos`, `asin`): about 160 ns a cell, and every ring walk (searches,
//! shakes, watches) measures every cell of every ring it visits, so a 1 km search in a
//! city spent a sixth of its server CPU there. The walks of one city ask for the same
//! cells again and again, and so do the pings of its users (the index's write path finds
//! each privacy cell's coarse cell from its centre). [`centre`] gives the same `LatLng`,
//! bit for bit, from a table each thread keeps: direct-mapped, `SLOTS` slots of 24 bytes,
//! 768 KiB per thread that measures, allocated on first use and kept for the thread's life:
//! the runtime's workers, the main thread (a snapshot restore at start) and the blocking
//! threads sweeps run on (a few at a time; an idle one ends after 10 s). No lock and
//! nothing shared: a hit is one read of a slot (about 3 ns), a miss computes the centre and
//! overwrites the slot. A miss also costs a read of a slot that is seldom in cache, so
//! covers of spots that seldom come back (shakes) do not use it (see
//! [`super::cell::Centres`]); neither does [`super::snapped`].

use std::cell::RefCell;

use h3o::{CellIndex, LatLng};

use crate::base::shard::mix;

/// Slots of each thread's table (a power of two).
const SLOTS: usize = 1 << 15;

/// A remembered centre: the cell (0 for an empty slot: no cell index is 0) and its
/// centre in radians.
#[derive(Clone, Copy)]
struct Slot {
    cell: u64,
    lat: f64,
    lng: f64,
}

const EMPTY: Slot = Slot {
    cell: 0,
    lat: 0.0,
    lng: 0.0,
};

thread_local! {
    static TABLE: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// The slot of `cell` in a thread's table.
fn slot_of(cell: CellIndex) -> usize {
    (mix(u64::from(cell)) >> (64 - SLOTS.trailing_zeros())) as usize
}

/// The centre of `cell`: exactly `LatLng::from(cell)`, remembered by this thread.
#[inline]
pub fn centre(cell: CellIndex) -> LatLng {
    let key = u64::from(cell);
    let i = slot_of(cell);
    TABLE
        .try_with(|table| {
            let mut table = table.try_borrow_mut().ok()?;
            if table.is_empty() {
                *table = vec![EMPTY; SLOTS];
            }
            let slot = table.get_mut(i)?;
            if slot.cell == key
                && let Ok(at) = LatLng::from_radians(slot.lat, slot.lng)
            {
                return Some(at);
            }
            let at = LatLng::from(cell);
            *slot = Slot {
                cell: key,
                lat: at.lat_radians(),
                lng: at.lng_radians(),
            };
            Some(at)
        })
        .ok()
        .flatten()
        // The thread is shutting down (or the table is in use further up this thread's
        // stack, which nothing does): compute.
        .unwrap_or_else(|| LatLng::from(cell))
}

#[cfg(test)]
mod tests {
    use super::*;
    use h3o::Resolution;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// What this thread's table holds in `cell`'s slot: the cell there and its centre.
    fn held(cell: CellIndex) -> Option<(u64, f64, f64)> {
        TABLE.with_borrow(|t| t.get(slot_of(cell)).map(|s| (s.cell, s.lat, s.lng)))
    }

    fn same_bits(a: LatLng, b: LatLng) -> bool {
        a.lat_radians().to_bits() == b.lat_radians().to_bits()
            && a.lng_radians().to_bits() == b.lng_radians().to_bits()
    }

    /// Remembered centres are h3o's, bit for bit, whether the slot was empty, held the
    /// same cell or held another cell (more cells than slots, asked for twice over).
    #[test]
    fn remembered_centres_are_exactly_h3os() {
        let mut rng = StdRng::seed_from_u64(41);
        let cells: Vec<CellIndex> = (0..3 * SLOTS)
            .map(|_| {
                let at = crate::geo::anywhere(&mut rng);
                let res = Resolution::try_from(rng.random_range(0..=15u8)).unwrap();
                at.to_cell(res)
            })
            .collect();
        for _ in 0..2 {
            for &cell in &cells {
                let (got, want) = (centre(cell), LatLng::from(cell));
                assert!(same_bits(got, want), "{cell}: {got:?} vs {want:?}");
                // And it is kept: the slot now holds this cell and exactly this centre.
                let (kept, lat, lng) = held(cell).expect("the table is allocated");
                assert_eq!(kept, u64::from(cell));
                assert!(same_bits(LatLng::from_radians(lat, lng).unwrap(), want));
            }
        }
    }

    /// Two cells that share a slot displace each other and each still gets its own centre.
    #[test]
    fn cells_sharing_a_slot_each_get_their_own_centre() {
        let first = LatLng::new(48.85, 2.35).unwrap().to_cell(Resolution::Nine);
        let other = first
            .grid_disk::<Vec<_>>(200)
            .into_iter()
            .find(|&c| c != first && slot_of(c) == slot_of(first))
            .expect("a colliding cell within 200 rings");
        for cell in [first, other, first, other] {
            assert!(same_bits(centre(cell), LatLng::from(cell)));
            assert_eq!(held(cell).map(|h| h.0), Some(u64::from(cell)));
        }
    }
}
