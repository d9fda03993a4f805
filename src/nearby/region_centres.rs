//! The centre of every region (cell at [`REGION_RESOLUTION`]) the sparse shortcut
//! measures, kept once computed in a table indexed by the region's place in H3's
//! hierarchy: no hash, no lock; a lookup reads its chunk's pointer and one 16-byte slot.
//!
//! A region index is a base cell (one of 122) and five digits (0..=6), so its place is a
//! number below 122 × 7⁵. The table is allocated in chunks of one resolution-1 cell's
//! 7⁴ = 2 401 regions (38 KiB), each on first use, so it holds only the part of the world
//! searches look at: all of it would be 854 chunks, 33 MB, the table's bound whatever
//! clients search for (the hash map it replaced was capped at 2^18 centres, ~10 MB).
//! The sparse shortcut reads a few dozen neighbouring regions per search; siblings (one
//! resolution-4 parent's seven) share two cache lines, and the rest of a walk's regions
//! sit in the same few chunks rather than scattered through a hash table.
//!
//! A slot is three `f32`s and a flag, as atomics: a reader that sees the flag set (acquire)
//! sees the three values the writer stored before setting it (release). Two threads may
//! compute the same centre at once; they store the same bits, so either write serves.

use std::sync::{
    OnceLock,
    atomic::{AtomicU32, Ordering},
};

use h3o::{CellIndex, LatLng, Resolution};

/// Resolution of the regions over the coarse cells (average edge 8.5 km; a region holds
/// at most about 49 coarse cells).
pub(super) const REGION_RESOLUTION: Resolution = Resolution::Five;

/// [`REGION_RESOLUTION`] as a number (a test checks they agree).
const REGION_RES: u32 = 5;
/// Regions per chunk (one resolution-1 cell's descendants at [`REGION_RESOLUTION`]).
const PER_CHUNK: usize = 7usize.pow(REGION_RES - 1);
/// Chunks: every base cell's seven resolution-1 children.
const CHUNKS: usize = 122 * 7;

/// One region's centre: `x`, `y`, `z` as `f32` bits, then 1 once they are stored.
#[derive(Debug, Default)]
#[repr(align(16))]
struct Slot([AtomicU32; 4]);

/// Region centres as unit vectors (see the module docs).
#[derive(Debug)]
pub(super) struct RegionCentres {
    chunks: Box<[OnceLock<Box<[Slot]>>]>,
}

impl Default for RegionCentres {
    fn default() -> Self {
        Self {
            chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
        }
    }
}

/// Where `region` is kept: its chunk and its slot in it; `None` for a cell at another
/// resolution. Read straight off the index's bits (H3's layout: the base cell in bits
/// 45..52, then three bits per resolution's digit from bit 42 down), which h3o has
/// checked: a digit is at most 6.
fn place(region: CellIndex) -> Option<(usize, usize)> {
    if region.resolution() != REGION_RESOLUTION {
        return None;
    }
    let bits = u64::from(region);
    let digit = |res: u32| ((bits >> (3 * (15 - res))) & 7) as usize;
    let chunk = ((bits >> 45) & 0x7f) as usize * 7 + digit(1);
    let slot = ((digit(2) * 7 + digit(3)) * 7 + digit(4)) * 7 + digit(REGION_RES);
    Some((chunk, slot))
}

impl RegionCentres {
    /// The centre of `region` as a unit vector of `f32`s (within a metre on the Earth),
    /// computed on the first call and read from the table after.
    pub(super) fn get(&self, region: CellIndex) -> [f32; 3] {
        let Some((chunk, slot)) = place(region) else {
            return compute(region);
        };
        let Some(chunk) = self.chunks.get(chunk) else {
            return compute(region);
        };
        let slots = chunk.get_or_init(|| (0..PER_CHUNK).map(|_| Slot::default()).collect());
        let Some(Slot(words)) = slots.get(slot) else {
            return compute(region);
        };
        if words[3].load(Ordering::Acquire) != 0 {
            return [0, 1, 2].map(|i| f32::from_bits(words[i].load(Ordering::Relaxed)));
        }
        let v = compute(region);
        for (word, x) in words.iter().zip(v) {
            word.store(x.to_bits(), Ordering::Relaxed);
        }
        words[3].store(1, Ordering::Release);
        v
    }

    /// Bytes allocated: the chunks in use and the chunk pointers.
    pub(super) fn footprint(&self) -> usize {
        let used = self.chunks.iter().filter(|c| c.get().is_some()).count();
        used * PER_CHUNK * size_of::<Slot>() + CHUNKS * size_of::<OnceLock<Box<[Slot]>>>()
    }
}

/// A unit vector kept as `f32`s (within a metre on the Earth).
pub(super) fn narrow(v: [f64; 3]) -> [f32; 3] {
    v.map(|x| x as f32)
}

fn compute(region: CellIndex) -> [f32; 3] {
    narrow(crate::geo::unit_vector(LatLng::from(region)))
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::Barrier};

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    fn regions_of(base: CellIndex) -> impl Iterator<Item = CellIndex> {
        base.children(REGION_RESOLUTION)
    }

    #[test]
    fn every_region_of_a_hexagon_and_a_pentagon_base_cell_has_its_own_slot() {
        let pentagon = Resolution::Zero
            .pentagons()
            .next()
            .expect("resolution 0 has pentagons");
        let hexagon = CellIndex::base_cells()
            .find(|c| !c.is_pentagon())
            .expect("resolution 0 has hexagons");
        assert_eq!(u32::from(u8::from(REGION_RESOLUTION)), REGION_RES);
        let mut seen = HashSet::new();
        for base in [pentagon, hexagon] {
            for region in regions_of(base) {
                let (chunk, slot) = place(region).expect("a region has a place");
                // The bits read are h3o's base cell and digits.
                let digit = |r: Resolution| {
                    usize::from(region.direction_at(r).expect("a digit at every resolution"))
                };
                assert_eq!(
                    chunk,
                    usize::from(u8::from(region.base_cell())) * 7 + digit(Resolution::One)
                );
                let below = [
                    Resolution::Two,
                    Resolution::Three,
                    Resolution::Four,
                    Resolution::Five,
                ];
                assert_eq!(slot, below.iter().fold(0, |s, &r| s * 7 + digit(r)));
                assert!(chunk < CHUNKS && slot < PER_CHUNK, "{region}");
                assert!(seen.insert((chunk, slot)), "{region} shares a slot");
            }
        }
        // A hexagon's 7⁵ regions and a pentagon's (one of whose resolution-1 children is
        // deleted, and one subtree more at each level below).
        assert!(seen.len() > 7usize.pow(5), "{}", seen.len());
        let not_a_region = LatLng::new(31.2, 121.5)
            .expect("valid")
            .to_cell(Resolution::Seven);
        assert_eq!(place(not_a_region), None);
    }

    #[test]
    fn centres_are_computed_once_then_read_back_bit_for_bit() {
        let table = RegionCentres::default();
        assert_eq!(
            table.footprint(),
            CHUNKS * size_of::<OnceLock<Box<[Slot]>>>()
        );
        let mut rng = StdRng::seed_from_u64(11);
        let mut regions: Vec<CellIndex> = (0..2_000)
            .map(|_| {
                let ll = LatLng::new(
                    rng.random_range(-90.0..=90.0),
                    rng.random_range(-180.0..180.0),
                )
                .expect("valid");
                ll.to_cell(REGION_RESOLUTION)
            })
            .collect();
        regions.extend(
            Resolution::Zero
                .pentagons()
                .flat_map(|p| p.center_child(REGION_RESOLUTION)),
        );
        for round in 0..2 {
            for &region in &regions {
                let want = compute(region).map(f32::to_bits);
                assert_eq!(
                    table.get(region).map(f32::to_bits),
                    want,
                    "{region} {round}"
                );
            }
        }
        // Kept: every slot holds its region's centre and is flagged.
        for &region in &regions {
            let (chunk, slot) = place(region).expect("a region");
            let Slot(words) = &table.chunks[chunk].get().expect("allocated")[slot];
            assert_eq!(words[3].load(Ordering::Acquire), 1);
            let kept = [0, 1, 2].map(|i| words[i].load(Ordering::Relaxed));
            assert_eq!(kept, compute(region).map(f32::to_bits), "{region}");
        }
        assert!(table.footprint() > PER_CHUNK * size_of::<Slot>());
    }

    #[test]
    fn threads_filling_the_same_regions_at_once_all_read_the_exact_centres() {
        let table = RegionCentres::default();
        let origin = LatLng::new(33.0, 112.0)
            .expect("valid")
            .to_cell(REGION_RESOLUTION);
        let regions: Vec<CellIndex> = origin.grid_disk(6);
        let want: Vec<[u32; 3]> = regions
            .iter()
            .map(|&r| compute(r).map(f32::to_bits))
            .collect();
        let barrier = Barrier::new(4);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (table, barrier, regions, want) = (&table, &barrier, &regions, &want);
                s.spawn(move || {
                    barrier.wait();
                    // Each thread walks the disk from another end, so fills interleave.
                    for i in 0..regions.len() {
                        let i = if t % 2 == 0 { i } else { regions.len() - 1 - i };
                        assert_eq!(table.get(regions[i]).map(f32::to_bits), want[i]);
                    }
                });
            }
        });
    }
}
