//! The index's three sharded maps and the one place that keeps them consistent: every
//! write (a ping, a restore, a clear, an expiry) goes through [`Maps::upsert`] or
//! [`Maps::remove`], which update all three under one lock order.
//!
//! * `users` ([`Users`]): user id -> privacy cell, **without storing the id**. Each entry is one
//!   `u64`: 26 bits of the id's hash and the privacy cell packed into 38 bits. A lookup
//!   probes entries with the id's hash and confirms a candidate by finding the id in that
//!   cell's bucket, where it is stored (once). Two users whose 26-bit hashes are equal and
//!   who share a cell have bit-identical entries at identical probe positions, so either
//!   entry serves either user: lookups stay exact.
//! * `cells`: privacy cell -> its packed, id-sorted member list ([`super::bucket`]).
//! * `coarse`: coarse cell (resolution [`COARSE_RESOLUTION`]) -> the occupied privacy
//!   cells whose centres lie in it, so wide searches skip empty country.
//! * `regions`: region (resolution [`REGION_RESOLUTION`], the H3 parent of the coarse
//!   cell) -> its occupied privacy cells with their centres while they are few, their
//!   count once they are many ([`Region`]), so a search in sparse country finds and
//!   measures every occupied cell near it in a handful of lookups, without walking rings
//!   (see `nearby::sparse`). A write touches its region only when a privacy cell becomes
//!   occupied or empty, with the centre it computed for the coarse cell anyway.
//!
//! Lock order, for every writer: the user's `users` shard, then `cells` shards (one at a
//! time), then `coarse`, then `regions`. Searches only read `cells`, `coarse` and
//! `regions`, one shard at a time, and never hold a guard while taking another (the
//! region-centre table a search fills takes no lock, see `nearby::region_centres`). A
//! writer's `changed` callback runs while the user's `users` shard is held, so observers
//! (watches) see one user's changes in order.

use std::{
    hash::BuildHasher,
    sync::atomic::{AtomicUsize, Ordering},
};

use h3o::{CellIndex, Resolution};
use hashbrown::DefaultHashBuilder;

pub(super) use super::region_centres::REGION_RESOLUTION;
use super::{
    LocationStatus, Record,
    bucket::{self, Member},
    cell_map::CellMap,
    region::{AfterRemoval, Listed, Region},
    region_centres::RegionCentres,
};
pub(super) use crate::base::shard::{SHARDS, Shards};
use crate::{
    base::{
        shard::{mix, shard_of},
        table::{self, Table},
    },
    id::UserId,
};

/// The shard of a map keyed by cell.
pub(super) fn cell_shard(cell: CellIndex) -> usize {
    shard_of(u64::from(cell), SHARDS)
}

/// Resolution of the coarse occupancy map (average edge 1.4 km, 49 privacy cells each): a
/// 10 km search visits about 560 coarse cells instead of 5 400 privacy cells.
pub(super) const COARSE_RESOLUTION: Resolution = Resolution::Seven;

/// The coarse cell holding the privacy cell's centre (geometric containment, which the
/// ring cover's lower bounds rely on; H3 parents do not contain their children exactly).
pub(crate) fn coarse_of(cell: CellIndex) -> CellIndex {
    crate::geo::centre::centre(cell).to_cell(COARSE_RESOLUTION)
}

/// Occupied privacy cells, each with its packed, id-sorted member list.
pub(super) type Cells = CellMap<Box<[u8]>>;

/// A coarse cell's occupied privacy cells (read as a slice). Outside cities most coarse
/// cells hold one, kept inline with no allocation (at 1 M standard users nearly every
/// one: 178 k of the 278 k occupied privacy cells sit alone in theirs); more are an
/// exactly sized list. 16 bytes either way.
#[derive(Debug)]
pub(super) enum Occupied {
    /// The one occupied cell.
    One(CellIndex),
    /// Two or more (none only as a vacant table slot).
    Many(Box<[CellIndex]>),
}

impl Default for Occupied {
    fn default() -> Self {
        Self::Many(Box::default())
    }
}

impl std::ops::Deref for Occupied {
    type Target = [CellIndex];

    fn deref(&self) -> &[CellIndex] {
        match self {
            Self::One(cell) => std::slice::from_ref(cell),
            Self::Many(cells) => cells,
        }
    }
}

impl Occupied {
    /// With `cell` added at the end.
    fn with(&self, cell: CellIndex) -> Self {
        if self.is_empty() {
            return Self::One(cell);
        }
        let mut grown = Vec::with_capacity(self.len() + 1);
        grown.extend_from_slice(self);
        grown.push(cell);
        Self::Many(grown.into_boxed_slice())
    }

    /// Without `cell` (empty when it was the only one).
    fn without(&self, cell: CellIndex) -> Self {
        let mut kept = self.iter().copied().filter(|&c| c != cell);
        match (kept.next(), kept.next()) {
            (None, _) => Self::default(),
            (Some(one), None) => Self::One(one),
            (Some(a), Some(b)) => Self::Many([a, b].into_iter().chain(kept).collect()),
        }
    }

    /// Bytes held apart from the table slot.
    fn heap_bytes(&self) -> usize {
        match self {
            Self::One(_) => 0,
            Self::Many(cells) => size_of_val::<[CellIndex]>(cells),
        }
    }
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
    pub(super) fn entry(&self, codec: CellCodec, cell: CellIndex) -> Entry {
        Entry((self.tag << CELL_BITS) | codec.pack(cell))
    }

    /// Whether `entry` carries this user's hash bits.
    pub(super) fn tagged(&self, entry: Entry) -> bool {
        entry.0 >> CELL_BITS == self.tag
    }
}

fn table_hash(tag: u64) -> u64 {
    mix(tag)
}

/// One `users` entry: the id's kept hash bits and the packed cell. All ones marks a
/// vacant slot, which no entry is: a packed cell leaves bit 37 clear
/// ([`CellCodec::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry(u64);

impl table::Slot for Entry {
    fn vacant() -> Self {
        Entry(u64::MAX)
    }

    fn is_vacant(&self) -> bool {
        self.0 == u64::MAX
    }

    fn hash(&self) -> u64 {
        table_hash(self.0 >> CELL_BITS)
    }
}

/// User id -> privacy cell, in one `u64` per user (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Users {
    /// The entries, sharded by id hash, in tables sized by their count (`base::table`).
    pub(super) tables: Shards<Table<Entry>>,
    hasher: DefaultHashBuilder,
}

impl Users {
    /// Where `user`'s entry lives.
    pub(super) fn slot(&self, user: &[u8]) -> Slot {
        let h = self.hasher.hash_one(user);
        Slot {
            shard: shard_of(h, SHARDS),
            tag: h & ((1 << HASH_BITS) - 1),
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.tables.sum(Table::len)
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
    /// Packs cells at `res` (at most resolution 10: 7 + 3 x 10 = 37 bits, so bit 37 of a
    /// packed cell is clear and no `users` entry is all ones, the vacant mark; the
    /// configuration allows privacy cells up to resolution 10).
    pub(super) fn new(res: Resolution) -> Self {
        let r = u64::from(u8::from(res));
        debug_assert!(r <= 10, "privacy cells at resolution {r}");
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
    pub(super) fn unpack(&self, entry: Entry) -> Option<CellIndex> {
        let packed = entry.0 & ((1 << CELL_BITS) - 1);
        let unused = (1u64 << self.unused_digit_bits) - 1;
        CellIndex::try_from(self.header | (packed << self.unused_digit_bits) | unused).ok()
    }
}

/// What the maps hold, in bytes of the structures themselves (entries, free slots and
/// control bytes, list contents), before the allocator's own rounding and overhead: where
/// a user's bytes go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// The `users` tables: one `u64` per user, at the tables' load factor.
    pub users_table: usize,
    /// The `cells` tables: a cell and its bucket's pointer and length per occupied cell.
    pub cells_table: usize,
    /// The members themselves: every bucket's bytes (ids included).
    pub members: usize,
    /// The `coarse` tables.
    pub coarse_table: usize,
    /// The coarse cells' lists of occupied privacy cells.
    pub coarse_lists: usize,
    /// The `regions` tables and their lists.
    pub regions: usize,
    /// The region centres searches have kept.
    pub region_centres: usize,
}

impl Footprint {
    /// Every part together.
    pub fn total(&self) -> usize {
        self.users_table
            + self.cells_table
            + self.members
            + self.coarse_table
            + self.coarse_lists
            + self.regions
            + self.region_centres
    }
}

/// The three maps (see the module docs).
#[derive(Debug)]
pub(super) struct Maps {
    /// Resolution of the privacy cells.
    pub(super) res: Resolution,
    pub(super) codec: CellCodec,
    pub(super) users: Users,
    pub(super) cells: Shards<Cells>,
    pub(super) coarse: Shards<CellMap<Occupied>>,
    pub(super) regions: Shards<CellMap<Region>>,
    /// Centres of the regions searches have looked at, as unit vectors: the sparse
    /// shortcut measures a few dozen regions per search, and each centre costs H3
    /// arithmetic and trigonometry to compute (see [`Maps::region_centre`]).
    region_centres: RegionCentres,
    /// Users held (kept with every insert and removal, under the user's `users` shard).
    held: AtomicUsize,
}

impl Maps {
    /// Empty maps for privacy cells at `res`.
    pub(super) fn new(res: Resolution) -> Self {
        Self {
            res,
            codec: CellCodec::new(res),
            users: Users::default(),
            cells: Shards::default(),
            coarse: Shards::default(),
            regions: Shards::default(),
            region_centres: RegionCentres::default(),
            held: AtomicUsize::new(0),
        }
    }

    /// Users held, including expired ones not yet removed.
    pub(super) fn len(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Occupied privacy cells.
    pub(super) fn cell_count(&self) -> usize {
        self.cells.sum(CellMap::len)
    }

    /// Whether privacy cell `cell` holds `user`.
    fn bucket_contains(&self, cell: CellIndex, user: &[u8]) -> bool {
        self.cells
            .read(cell_shard(cell))
            .get(cell)
            .is_some_and(|b| bucket::contains(b, user))
    }

    /// Whether a `Users` entry stands for `user` (see the module docs).
    pub(super) fn is_entry_of(&self, slot: &Slot, entry: Entry, user: &[u8]) -> bool {
        slot.tagged(entry)
            && self
                .codec
                .unpack(entry)
                .is_some_and(|cell| self.bucket_contains(cell, user))
    }

    /// Puts `member` in privacy cell `cell` (last write wins), then calls `changed` with
    /// the cell the user was in before (if any) while the user's `users` shard is still
    /// held.
    ///
    /// A user not held yet is refused (returns `false`, nothing changes, `changed` is not
    /// called) when `max_users` are held already.
    pub(super) fn upsert(
        &self,
        cell: CellIndex,
        member: &Member<'_>,
        max_users: usize,
        changed: impl FnOnce(Option<CellIndex>),
    ) -> bool {
        let slot = self.users.slot(member.user);
        let mut table = self.users.tables.write(slot.shard);
        let entry = slot.entry(self.codec, cell);
        let old = match table.find_mut(slot.hash(), |&e| self.is_entry_of(&slot, e, member.user)) {
            Some(e) => {
                let old = self.codec.unpack(*e);
                if let Some(old) = old.filter(|&old| old != cell) {
                    self.bucket_remove(old, member.user, |_| true);
                }
                self.bucket_upsert(cell, member);
                *e = entry;
                old
            }
            None => {
                // Reserve first, so concurrent newcomers can never overshoot the cap.
                if self.held.fetch_add(1, Ordering::Relaxed) >= max_users {
                    self.held.fetch_sub(1, Ordering::Relaxed);
                    return false;
                }
                self.bucket_upsert(cell, member);
                table.insert_unique(entry);
                None
            }
        };
        changed(old);
        true
    }

    /// Takes `user` out of every map if `remove_if` agrees, given the cell it is in and its
    /// member there; then calls `changed` with that cell, the user's `users` shard still
    /// held. Returns the removed member, or `None` when the user was not held or
    /// `remove_if` refused.
    pub(super) fn remove(
        &self,
        user: &[u8],
        remove_if: impl FnOnce(CellIndex, &Member<'_>) -> bool,
        changed: impl FnOnce(Option<CellIndex>),
    ) -> Option<Option<Member<'static>>> {
        let slot = self.users.slot(user);
        let mut table = self.users.tables.write(slot.shard);
        let at = table.find_index(slot.hash(), |&e| self.is_entry_of(&slot, e, user))?;
        let cell = self.codec.unpack(*table.at(at));
        let removed = match cell {
            Some(cell) => {
                let mut refused = false;
                let removed = self.bucket_remove(cell, user, |m| {
                    refused = !remove_if(cell, m);
                    !refused
                });
                if refused {
                    return None;
                }
                removed
            }
            None => None,
        };
        table.remove_at(at);
        self.held.fetch_sub(1, Ordering::Relaxed);
        changed(cell);
        Some(removed)
    }

    /// What the maps hold about `user`, unless nothing or only an expired ping.
    pub(super) fn status(&self, user: &[u8], now_ms: i64) -> Option<LocationStatus> {
        let slot = self.users.slot(user);
        let table = self.users.tables.read(slot.shard);
        let &entry = table.find(slot.hash(), |&e| self.is_entry_of(&slot, e, user))?;
        let cell = self.codec.unpack(entry)?;
        let cells = self.cells.read(cell_shard(cell));
        let m = bucket::get(cells.get(cell)?, user)?;
        (!m.expired(now_ms)).then(|| LocationStatus {
            cell,
            visible: m.visible,
            gender: m.gender,
            last_seen_ms: m.last_seen_ms,
            expires_at_ms: m.expires_at_ms(),
        })
    }

    /// Calls `f` with every user held, one shard of cells at a time, under that shard's
    /// read lock. `f` must not call back into the maps.
    pub(super) fn for_each_record(&self, mut f: impl FnMut(&Record)) {
        for shard in 0..SHARDS {
            let cells = self.cells.read(shard);
            for (cell, b) in cells.iter() {
                for m in bucket::iter(b) {
                    f(&Record {
                        user: UserId::trusted(&m.user_str()),
                        cell,
                        gender: m.gender,
                        last_seen_ms: m.last_seen_ms,
                        ttl_ms: m.ttl_ms,
                        visible: m.visible,
                    });
                }
            }
        }
    }

    /// Removes every user expired at `now_ms`, calling `changed` for each (with its
    /// `users` shard held); returns how many.
    ///
    /// One shard of cells at a time, it lists the expired members under a read lock, then
    /// removes them one by one through [`Self::remove`]: no lock is held for longer than
    /// a scan of one shard or one removal, so searches and updates go on throughout.
    pub(super) fn sweep(&self, now_ms: i64, mut changed: impl FnMut(&[u8], CellIndex)) -> usize {
        let mut removed = 0;
        let mut ids: Vec<u8> = Vec::new();
        let mut doomed: Vec<(CellIndex, usize, usize)> = Vec::new();
        for shard in 0..SHARDS {
            ids.clear();
            doomed.clear();
            {
                let cells = self.cells.read(shard);
                for (cell, b) in cells.iter() {
                    for m in bucket::iter(b).filter(|m| m.expired(now_ms)) {
                        doomed.push((cell, ids.len(), m.user.len()));
                        ids.extend_from_slice(m.user);
                    }
                }
            }
            for &(cell, at, len) in &doomed {
                let user = &ids[at..at + len];
                // Still in that cell and still expired (it may have pinged meanwhile).
                let gone = self.remove(
                    user,
                    |now_in, m| now_in == cell && m.expired(now_ms),
                    |_| changed(user, cell),
                );
                if gone.is_some() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The centre of `region` (any cell at [`REGION_RESOLUTION`]) as a unit vector, within
    /// a metre: kept once computed ([`RegionCentres`]). A region's centre never changes,
    /// so the table needs no invalidation.
    pub(super) fn region_centre(&self, region: CellIndex) -> [f32; 3] {
        self.region_centres.get(region)
    }

    /// Bytes held by each map (see [`Footprint`]).
    pub(super) fn footprint(&self) -> Footprint {
        Footprint {
            users_table: self.users.tables.sum(Table::bytes),
            cells_table: self.cells.sum(CellMap::table_bytes),
            members: self.cells.sum(|m| m.values().map(|b| b.len()).sum()),
            coarse_table: self.coarse.sum(CellMap::table_bytes),
            coarse_lists: self
                .coarse
                .sum(|m| m.values().map(Occupied::heap_bytes).sum()),
            regions: self
                .regions
                .sum(|m| m.table_bytes() + m.values().map(Region::list_bytes).sum::<usize>()),
            region_centres: self.region_centres.footprint(),
        }
    }

    fn bucket_upsert(&self, cell: CellIndex, member: &Member<'_>) {
        let mut cells = self.cells.write(cell_shard(cell));
        let mut fresh = false;
        let b = cells.get_or_insert_with(cell, || {
            fresh = true;
            bucket::single(member)
        });
        if !fresh {
            bucket::upsert(b, member);
            return;
        }
        // A new bucket: registered while this shard of `cells` is still locked, so a
        // concurrent removal of the same bucket cannot interleave (lock order: cells, then
        // coarse). The coarse cell is `coarse_of(cell)`, from the centre the region keeps.
        let at = crate::geo::centre::centre(cell);
        let key = at.to_cell(COARSE_RESOLUTION);
        let mut coarse = self.coarse.write(cell_shard(key));
        let list = coarse.get_or_insert_with(key, Occupied::default);
        let first = list.is_empty();
        *list = list.with(cell);
        if let Some(region) = key.parent(REGION_RESOLUTION) {
            // Its region files it (coarse still held, so a relisting that reads this
            // coarse list sees the change counted).
            let mut regions = self.regions.write(cell_shard(region));
            regions
                .get_or_insert_with(region, Region::default)
                .add(cell, at, first);
        }
    }

    /// Takes `user` out of `cell` if `pred` holds for it; drops the bucket once empty.
    fn bucket_remove(
        &self,
        cell: CellIndex,
        user: &[u8],
        pred: impl FnOnce(&Member<'_>) -> bool,
    ) -> Option<Member<'static>> {
        let mut relist = None;
        let removed = {
            let mut cells = self.cells.write(cell_shard(cell));
            let b = cells.get_mut(cell)?;
            let removed = bucket::remove_if(b, user, pred)?;
            if b.is_empty() {
                cells.remove(cell);
                let key = coarse_of(cell);
                let mut coarse = self.coarse.write(cell_shard(key));
                let mut emptied = false;
                if let Some(list) = coarse.get_mut(key) {
                    let kept = list.without(cell);
                    if kept.is_empty() {
                        coarse.remove(key);
                        emptied = true;
                    } else {
                        *list = kept;
                    }
                }
                // No longer occupied: out of its region (coarse still held).
                if let Some(region) = key.parent(REGION_RESOLUTION) {
                    let mut regions = self.regions.write(cell_shard(region));
                    if let Some(r) = regions.get_mut(region) {
                        match r.remove(cell, emptied) {
                            AfterRemoval::Keep => {}
                            AfterRemoval::Drop => {
                                regions.remove(region);
                            }
                            AfterRemoval::Relist(changes) => relist = Some((region, changes)),
                        }
                    }
                }
            }
            removed
        };
        if let Some((region, changes)) = relist {
            self.relist(region, changes);
        }
        Some(removed)
    }

    /// Lists a counted region's cells again (see `nearby::region`): reads its coarse
    /// children's lists one shard at a time, with no `cells`, `coarse` or `regions` guard
    /// held (only, from a write, the user's `users` shard, which comes first in the lock
    /// order), computes their centres, and hands them to the region, which keeps them only
    /// if nothing changed since its removal asked for them (`changes`).
    fn relist(&self, region: CellIndex, changes: u32) {
        let mut cells: Vec<CellIndex> = Vec::new();
        for key in region.children(COARSE_RESOLUTION) {
            if let Some(list) = self.coarse.read(cell_shard(key)).get(key) {
                cells.extend_from_slice(list);
            }
        }
        let listed: Vec<Listed> = cells
            .into_iter()
            .map(|c| (c, crate::geo::centre::centre(c)))
            .collect();
        if let Some(r) = self.regions.write(cell_shard(region)).get_mut(region) {
            r.relist(changes, listed);
        }
    }
}

#[cfg(test)]
mod tests {
    use h3o::LatLng;

    use super::*;

    #[test]
    fn a_coarse_cells_list_is_inline_while_it_holds_one() {
        let cells: Vec<CellIndex> = LatLng::new(31.23, 121.47)
            .unwrap()
            .to_cell(Resolution::Nine)
            .grid_disk(1);
        let mut list = Occupied::default();
        assert!(list.is_empty());
        list = list.with(cells[0]);
        assert!(matches!(list, Occupied::One(c) if c == cells[0]));
        assert_eq!(list.heap_bytes(), 0);
        for &c in &cells[1..] {
            list = list.with(c);
        }
        assert_eq!(&*list, &cells[..]);
        assert_eq!(list.heap_bytes(), cells.len() * 8);
        for &c in &cells[..cells.len() - 1] {
            list = list.without(c);
        }
        assert!(matches!(list, Occupied::One(c) if c == cells[cells.len() - 1]));
        assert!(
            list.without(cells[0]).len() == 1,
            "a cell not listed changes nothing"
        );
        assert!(list.without(cells[cells.len() - 1]).is_empty());
        assert_eq!(size_of::<Occupied>(), 16);
    }

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
