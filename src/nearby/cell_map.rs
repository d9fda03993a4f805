//! A map keyed by H3 cell in a table sized by its count ([`crate::base::table`]): the
//! index's `cells`, `coarse` and `regions` shards. A slot is the cell (none when vacant)
//! and its value, with a tag byte beside it ([`Slot::TAGGED`]).

use h3o::CellIndex;

use crate::base::table::{Slot, Table};

/// A cell's slot: the cell, or `None` when vacant, and its value.
#[derive(Debug)]
struct Keyed<V> {
    cell: Option<CellIndex>,
    value: V,
}

/// The hash a cell is filed under: splitmix64's finaliser, so it owes nothing to the
/// shard function (whose top bits every key of one shard shares) and its top bits, which
/// pick the home slot, depend on every bit of the cell.
fn spread(cell: CellIndex) -> u64 {
    let mut z = u64::from(cell);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<V: Default> Slot for Keyed<V> {
    // Searches ask for many cells that are not there.
    const TAGGED: bool = true;

    fn vacant() -> Self {
        Self {
            cell: None,
            value: V::default(),
        }
    }

    fn is_vacant(&self) -> bool {
        self.cell.is_none()
    }

    fn hash(&self) -> u64 {
        self.cell.map_or(0, spread)
    }
}

/// Cell -> `V` (see the module docs). `V::default()` must own nothing (it fills vacant
/// slots).
#[derive(Debug)]
pub(crate) struct CellMap<V> {
    table: Table<Keyed<V>>,
}

impl<V> Default for CellMap<V> {
    fn default() -> Self {
        Self {
            table: Table::default(),
        }
    }
}

impl<V: Default> CellMap<V> {
    /// Cells held.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Bytes of the table's slots and tags (the values' own heap contents not included).
    pub(crate) fn table_bytes(&self) -> usize {
        self.table.bytes()
    }

    /// `cell`'s value.
    pub(crate) fn get(&self, cell: CellIndex) -> Option<&V> {
        self.table
            .find(spread(cell), |k| k.cell == Some(cell))
            .map(|k| &k.value)
    }

    /// `cell`'s value, to change.
    pub(crate) fn get_mut(&mut self, cell: CellIndex) -> Option<&mut V> {
        self.table
            .find_mut(spread(cell), |k| k.cell == Some(cell))
            .map(|k| &mut k.value)
    }

    /// Whether `cell` is held.
    pub(crate) fn contains_key(&self, cell: CellIndex) -> bool {
        self.get(cell).is_some()
    }

    /// `cell`'s value, made by `make` first if the cell is not held.
    pub(crate) fn get_or_insert_with(
        &mut self,
        cell: CellIndex,
        make: impl FnOnce() -> V,
    ) -> &mut V {
        let at = match self
            .table
            .find_index(spread(cell), |k| k.cell == Some(cell))
        {
            Some(at) => at,
            None => self.table.insert_unique(Keyed {
                cell: Some(cell),
                value: make(),
            }),
        };
        &mut self.table.at_mut(at).value
    }

    /// Takes `cell` out, returning its value.
    pub(crate) fn remove(&mut self, cell: CellIndex) -> Option<V> {
        self.table
            .remove(spread(cell), |k| k.cell == Some(cell))
            .map(|k| k.value)
    }

    /// Every cell and its value, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (CellIndex, &V)> {
        self.table
            .iter()
            .filter_map(|k| k.cell.map(|cell| (cell, &k.value)))
    }

    /// Every cell held.
    #[cfg(test)]
    pub(crate) fn keys(&self) -> impl Iterator<Item = CellIndex> + '_ {
        self.iter().map(|(cell, _)| cell)
    }

    /// Every value held.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use h3o::{LatLng, Resolution};

    use super::*;

    #[test]
    fn a_slot_is_a_cell_and_its_value() {
        assert_eq!(size_of::<Keyed<Box<[u8]>>>(), 24);
    }

    #[test]
    fn holds_what_a_hash_map_holds() {
        // Every res-9 cell of a few km of a city, added, overwritten and partly removed.
        let origin = LatLng::new(31.23, 121.47)
            .unwrap()
            .to_cell(Resolution::Nine);
        let cells: Vec<CellIndex> = origin.grid_disk::<Vec<_>>(30);
        let mut m: CellMap<u32> = CellMap::default();
        let mut want: HashMap<CellIndex, u32> = HashMap::new();
        for (i, &c) in cells.iter().enumerate() {
            *m.get_or_insert_with(c, || 7) += i as u32;
            *want.entry(c).or_insert(7) += i as u32;
        }
        for &c in cells.iter().step_by(3) {
            assert_eq!(m.remove(c), want.remove(&c));
            assert_eq!(m.remove(c), None);
        }
        assert_eq!(m.len(), want.len());
        for &c in &cells {
            assert_eq!(m.get(c), want.get(&c));
            assert_eq!(m.contains_key(c), want.contains_key(&c));
        }
        let mut held: Vec<(CellIndex, u32)> = m.iter().map(|(c, &v)| (c, v)).collect();
        held.sort_unstable();
        let mut wanted: Vec<(CellIndex, u32)> = want.into_iter().collect();
        wanted.sort_unstable();
        assert_eq!(held, wanted);
        if let Some(v) = m.get_mut(cells[1]) {
            *v = 0;
        }
        assert_eq!(m.get(cells[1]), Some(&0));
        assert_eq!(m.keys().count(), m.values().count());
    }
}
