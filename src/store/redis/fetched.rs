//! The cells one search has read from the store so far, as a [`CellSource`]: the query
//! engine walks them like the in-memory maps and names the cells it misses, which the
//! next round trip reads.

// hashbrown's default hasher (foldhash): a search looks its cells up many times over.
use hashbrown::HashMap;

use h3o::{CellIndex, Resolution};
use redis::Value;

use crate::nearby::{
    bucket,
    source::{CellSource, SparseRead},
    sparse::{Listing, listed_near},
};

/// Most privacy cells a region (a hash tag) may list for the sparse shortcut to read it;
/// a region with more is dense country, where the search walks rings.
pub(super) const REGION_LIST_MAX: usize = 64;

/// The reads of one pipeline (one hash tag, or everything on one server).
#[derive(Debug, Default)]
pub(super) struct Group {
    /// Privacy cells, with their bucket keys: one MGET.
    pub(super) cells: Vec<(CellIndex, String)>,
    /// Coarse cells: an SMEMBERS of each one's occupancy.
    pub(super) coarse: Vec<CellIndex>,
    /// Regions (tags): a ZRANGE of the first [`REGION_LIST_MAX`] + 1 entries of each
    /// one's expiry ZSET, which lists its occupied privacy cells.
    pub(super) regions: Vec<CellIndex>,
}

/// The cells a search has read so far: a [`CellSource`] that misses the rest.
#[derive(Debug)]
pub(super) struct Fetched {
    res: Resolution,
    pub(super) cells: HashMap<CellIndex, Option<Box<[u8]>>>,
    pub(super) coarse: HashMap<CellIndex, Vec<CellIndex>>,
    /// Each region's occupied privacy cells, `None` when too many to list.
    pub(super) regions: HashMap<CellIndex, Option<Vec<CellIndex>>>,
}

impl Fetched {
    pub(super) fn new(res: Resolution) -> Self {
        Self {
            res,
            cells: HashMap::new(),
            coarse: HashMap::new(),
            regions: HashMap::new(),
        }
    }

    /// Files the replies of one pipeline: one MGET of the privacy cells (when there are
    /// any), then an SMEMBERS per coarse cell, then a ZRANGE per region, in that order.
    pub(super) fn put_replies(&mut self, group: Group, replies: Vec<Value>) {
        let Group {
            cells,
            coarse,
            regions,
        } = group;
        let mut replies = replies.into_iter();
        if !cells.is_empty() {
            let mut values = match replies.next() {
                Some(Value::Array(values)) => values.into_iter(),
                _ => Vec::new().into_iter(),
            };
            for (cell, _) in cells {
                let bucket = match values.next() {
                    Some(Value::BulkString(raw)) if !raw.is_empty() => {
                        Some(bucket::from_unsorted(&raw))
                    }
                    _ => None,
                };
                self.cells.insert(cell, bucket);
            }
        }
        for c in coarse {
            let members: Vec<String> = replies
                .next()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_default();
            self.coarse.insert(
                c,
                members
                    .iter()
                    .filter_map(|m| m.parse::<CellIndex>().ok())
                    .collect(),
            );
        }
        for r in regions {
            let entries: Vec<String> = replies
                .next()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_default();
            self.regions.insert(r, listed_cells(&entries));
        }
    }
}

/// The privacy cells an expiry ZSET's entries name (`coarse/cell`, or an earlier build's
/// `coarse/cell|user`), each once; `None` past [`REGION_LIST_MAX`] entries.
fn listed_cells(entries: &[String]) -> Option<Vec<CellIndex>> {
    if entries.len() > REGION_LIST_MAX {
        return None;
    }
    let mut cells: Vec<CellIndex> = entries
        .iter()
        .filter_map(|e| {
            let (_, rest) = e.split_once('/')?;
            let cell = rest.split_once('|').map_or(rest, |(cell, _)| cell);
            cell.parse().ok()
        })
        .collect();
    cells.sort_unstable();
    cells.dedup();
    Some(cells)
}

impl CellSource for Fetched {
    type Miss = ();

    fn resolution(&self) -> Resolution {
        self.res
    }

    fn bucket<R>(
        &self,
        cell: CellIndex,
        f: impl FnOnce(&[u8]) -> R,
    ) -> std::result::Result<Option<R>, ()> {
        match self.cells.get(&cell) {
            Some(Some(b)) => Ok(Some(f(b))),
            Some(None) => Ok(None),
            None => Err(()),
        }
    }

    fn occupied(&self, coarse: CellIndex, out: &mut Vec<CellIndex>) -> std::result::Result<(), ()> {
        let list = self.coarse.get(&coarse).ok_or(())?;
        out.extend_from_slice(list);
        Ok(())
    }

    /// Once the centre's own privacy cell is known to be empty (the walk's first round
    /// trip reads it), the regions in reach are read whole from their expiry ZSETs (one
    /// round trip) and measured as the in-memory shortcut measures its lists: a search in
    /// sparse country takes a few round trips instead of one per ring of coarse cells.
    fn sparse(&self, centre: h3o::LatLng, origin: CellIndex, radius_m: f64) -> SparseRead<()> {
        if !matches!(self.cells.get(&origin), Some(None)) {
            return Ok(None);
        }
        listed_near(centre, radius_m, |region| match self.regions.get(&region) {
            None => Listing::Unknown,
            Some(None) => Listing::Dense,
            Some(Some(cells)) => Listing::Cells(cells),
        })
        .map_err(|regions| (regions, ()))
    }
}
