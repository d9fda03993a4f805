//! What the query engine reads through: [`CellSource`], answered at once by the in-memory
//! maps, or batch by batch by a remote store (the walk then stops with what it [`Need`]s).

use h3o::{CellIndex, LatLng, Resolution};

use super::maps::{Maps, cell_shard};

/// Privacy cells, each with the distance from a search's centre to its own.
pub(crate) type Measured = Vec<(CellIndex, f64)>;

/// What [`CellSource::sparse`] answers: the cells (`None`: walk ring by ring), or the
/// regions to fetch first with the source's miss.
pub(crate) type SparseRead<M> = Result<Option<Measured>, (Vec<CellIndex>, M)>;

/// What the query engine reads: the occupied privacy cells and their members.
///
/// The in-memory maps answer every read at once (`Miss = Infallible`, so the engine's
/// "fetch and walk again" branch compiles away for them). A remote store answers from
/// what it has fetched so far and misses the rest: the engine then stops with [`Need`],
/// naming the whole batch the walk is at (a ring of privacy cells, or a ring of coarse
/// cells), the caller fetches it in one round trip and runs the walk again. Ring order,
/// early stop, filtering and pagination are the same code for every store.
pub(crate) trait CellSource {
    /// What a read that cannot be answered yet returns.
    type Miss;

    /// Resolution of the privacy cells.
    fn resolution(&self) -> Resolution;

    /// `f` over the packed, id-sorted members of privacy cell `cell`; `Ok(None)` when the
    /// cell is empty.
    ///
    /// # Errors
    /// `Miss` when the source does not know yet.
    fn bucket<R>(
        &self,
        cell: CellIndex,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, Self::Miss>;

    /// Appends the occupied privacy cells of coarse cell `coarse` to `out`.
    ///
    /// # Errors
    /// `Miss` when the source does not know yet.
    fn occupied(&self, coarse: CellIndex, out: &mut Vec<CellIndex>) -> Result<(), Self::Miss>;

    /// In sparse country, every occupied privacy cell that may hold a point within
    /// `radius_m` of `centre` (whose privacy cell is `origin`), with its centre's
    /// distance: the whole walk in one batch. `Ok(None)` where the source cannot tell
    /// cheaply (dense country, or a source without the region level): the walk goes ring
    /// by ring.
    ///
    /// # Errors
    /// The regions (cells at the region resolution) whose lists the source must fetch
    /// first, with its miss.
    fn sparse(
        &self,
        _centre: LatLng,
        _origin: CellIndex,
        _radius_m: f64,
    ) -> SparseRead<Self::Miss> {
        Ok(None)
    }
}

/// What a walk over a partial [`CellSource`] needs fetched before it can go on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Need {
    /// Privacy cells whose members are wanted.
    pub(crate) cells: Vec<CellIndex>,
    /// Coarse cells whose occupied privacy cells are wanted.
    pub(crate) coarse: Vec<CellIndex>,
    /// Regions whose lists of occupied privacy cells are wanted (the sparse shortcut).
    pub(crate) regions: Vec<CellIndex>,
}

impl CellSource for Maps {
    type Miss = std::convert::Infallible;

    fn resolution(&self) -> Resolution {
        self.res
    }

    fn bucket<R>(
        &self,
        cell: CellIndex,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, Self::Miss> {
        Ok(self.cells.read(cell_shard(cell)).get(cell).map(|b| f(b)))
    }

    fn occupied(&self, coarse: CellIndex, out: &mut Vec<CellIndex>) -> Result<(), Self::Miss> {
        if let Some(list) = self.coarse.read(cell_shard(coarse)).get(coarse) {
            out.extend_from_slice(list);
        }
        Ok(())
    }

    fn sparse(&self, centre: LatLng, origin: CellIndex, radius_m: f64) -> SparseRead<Self::Miss> {
        Ok(super::sparse::cells_near(self, centre, origin, radius_m))
    }
}

/// A walk stopped because its source missed: what to fetch, and the source's own miss.
#[derive(Debug)]
pub(crate) struct Missed<M> {
    /// The batch to fetch before walking again (read by sources that can miss; the
    /// in-memory maps never do).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) need: Need,
    /// What the source said (uninhabited for sources that never miss).
    pub(crate) miss: M,
}

/// The result of a walk over `S`.
pub(crate) type Walked<T, S> = Result<T, Missed<<S as CellSource>::Miss>>;
