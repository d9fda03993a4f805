//! The cells one search has read from the store so far, as a [`CellSource`]: the query
//! engine walks them like the in-memory maps and names the cells it misses, which the
//! next round trip reads.

use std::collections::HashMap;

use h3o::{CellIndex, Resolution};
use redis::Value;

use crate::nearby::{bucket, source::CellSource};

/// The reads of one pipeline: privacy cells with their bucket keys, and coarse cells.
pub(super) type Group = (Vec<(CellIndex, String)>, Vec<CellIndex>);

/// The cells a search has read so far: a [`CellSource`] that misses the rest.
#[derive(Debug)]
pub(super) struct Fetched {
    res: Resolution,
    pub(super) cells: HashMap<CellIndex, Option<Box<[u8]>>>,
    pub(super) coarse: HashMap<CellIndex, Vec<CellIndex>>,
}

impl Fetched {
    pub(super) fn new(res: Resolution) -> Self {
        Self {
            res,
            cells: HashMap::new(),
            coarse: HashMap::new(),
        }
    }

    /// Files the replies of one pipeline: one MGET of the privacy cells (when there are
    /// any), then an SMEMBERS per coarse cell, in that order.
    pub(super) fn put_replies(
        &mut self,
        cells: Vec<(CellIndex, String)>,
        coarse: Vec<CellIndex>,
        replies: Vec<Value>,
    ) {
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
    }
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
}
