//! The index's sharded maps, laid out for bytes per user.
//!
//! * [`Shards`]: a fixed array of cache-line-padded `RwLock`s, one hash map each.
//! * [`Users`]: user id -> privacy cell, **without storing the id**. Each entry is one
//!   `u64`: 26 bits of the id's hash and the privacy cell packed into 38 bits. A lookup
//!   probes entries with the id's hash and confirms a candidate by finding the id in that
//!   cell's bucket, where it is stored (once). Two users whose 26-bit hashes are equal and
//!   who share a cell have bit-identical entries at identical probe positions, so either
//!   entry serves either user: lookups stay exact.

use std::hash::BuildHasher;

use h3o::{CellIndex, Resolution};
use hashbrown::{DefaultHashBuilder, HashTable};

pub(super) use crate::base::shard::{SHARDS, Shards};

const SHARD_BITS: u32 = SHARDS.trailing_zeros();

/// The shard of a map keyed by cell.
pub(super) fn cell_shard(cell: CellIndex) -> usize {
    (u64::from(cell).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARD_BITS)) as usize
}

/// Bits of an id's hash kept in its entry.
const HASH_BITS: u32 = 26;
const CELL_BITS: u32 = 64 - HASH_BITS;

/// Where a user's entry lives: its shard and the part of its hash the entry keeps.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    /// Shard of [`Users::tables`].
    pub(super) shard: usize,
    tag: u64,
}

impl Slot {
    /// The hash the shard's table files the entry under: a function of the kept bits only,
    /// so equal entries always sit on equal probe sequences.
    pub(super) fn hash(&self) -> u64 {
        table_hash(self.tag)
    }

    /// The entry recording this user in `cell`.
    pub(super) fn entry(&self, codec: CellCodec, cell: CellIndex) -> u64 {
        (self.tag << CELL_BITS) | codec.pack(cell)
    }

    /// Whether `entry` carries this user's hash bits.
    pub(super) fn tagged(&self, entry: u64) -> bool {
        entry >> CELL_BITS == self.tag
    }
}

fn table_hash(tag: u64) -> u64 {
    tag.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Rehashes an entry when its table grows.
pub(super) fn rehash(entry: &u64) -> u64 {
    table_hash(entry >> CELL_BITS)
}

/// User id -> privacy cell, in one `u64` per user (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Users {
    /// The entries, sharded by id hash.
    pub(super) tables: Shards<HashTable<u64>>,
    hasher: DefaultHashBuilder,
}

impl Users {
    /// Where `user`'s entry lives.
    pub(super) fn slot(&self, user: &[u8]) -> Slot {
        let h = self.hasher.hash_one(user);
        Slot {
            shard: (h >> (64 - SHARD_BITS)) as usize,
            tag: h & ((1 << HASH_BITS) - 1),
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.tables.sum(HashTable::len)
    }
}

/// Packs privacy cells of one resolution into [`CELL_BITS`] bits: the base cell and the
/// resolution's digits, without the header and the unused digits, which are implied.
#[derive(Debug, Clone, Copy)]
pub(super) struct CellCodec {
    unused_digit_bits: u32,
    header: u64,
}

impl CellCodec {
    /// Packs cells at `res` (at most resolution 10: 7 + 3 x 10 = 37 bits).
    pub(super) fn new(res: Resolution) -> Self {
        let r = u64::from(u8::from(res));
        Self {
            unused_digit_bits: 3 * (15 - r as u32),
            // Mode 1 (cell) and the resolution.
            header: (1 << 59) | (r << 52),
        }
    }

    fn pack(&self, cell: CellIndex) -> u64 {
        let digits = u64::from(cell) & ((1 << 52) - 1);
        digits >> self.unused_digit_bits
    }

    /// The cell packed in `entry`. `None` only for entries not made by [`Slot::entry`].
    pub(super) fn unpack(&self, entry: u64) -> Option<CellIndex> {
        let packed = entry & ((1 << CELL_BITS) - 1);
        let unused = (1u64 << self.unused_digit_bits) - 1;
        CellIndex::try_from(self.header | (packed << self.unused_digit_bits) | unused).ok()
    }
}

#[cfg(test)]
mod tests {
    use h3o::LatLng;

    use super::*;

    #[test]
    fn cells_of_every_supported_resolution_pack_losslessly() {
        for r in 5..=10u8 {
            let res = Resolution::try_from(r).unwrap();
            let codec = CellCodec::new(res);
            let users = Users::default();
            for (lat, lng) in [(31.23, 121.47), (-89.9, 179.9), (0.0, 0.0), (64.1, -21.9)] {
                let cell = LatLng::new(lat, lng).unwrap().to_cell(res);
                let slot = users.slot(b"someone");
                let entry = slot.entry(codec, cell);
                assert!(slot.tagged(entry));
                assert_eq!(codec.unpack(entry), Some(cell), "res {r} at {lat},{lng}");
            }
        }
    }
}
