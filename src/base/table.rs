//! An open-addressing hash table sized by its count: the index's per-shard tables.
//!
//! A general-purpose table (hashbrown's) keeps a power of two of slots at most 7/8 full,
//! so it sits anywhere between 7/16 and 7/8 full, and every shard of a map with equal
//! shares doubles at the same population: at 1 M users the index's `users` tables were
//! 48 % full, 18.9 bytes per 8-byte entry. This table grows by a quarter when it would
//! pass [`MAX_LOAD`], so while it grows it is between 64 % and 80 % full whatever the
//! count (it never shrinks: after mass removals it is emptier, as hashbrown's was; and a
//! table of a handful of entries has 8 slots). A vacant slot is marked by the entry itself
//! ([`Slot::is_vacant`]); a table keeps no control bytes, or one tag byte per slot for
//! [`Slot::TAGGED`] entries (see [`Table`]).
//!
//! Linear probing from a home slot picked by the hash's top bits (a multiply, not a
//! power-of-two mask, so any slot count works); a removal shifts the entries after it
//! back (no tombstones), so a probe always ends at the first vacant slot. At 80 % full a
//! probe for an entry that is there reads 3 slots on average, one for an absent entry
//! 13, in order: a few cache lines.
//!
//! Growth moves every entry (a quarter more often than doubling would), under whatever
//! lock guards the table; a shard of 1 M users' tables holds about 16 000 entries. The
//! table never shrinks (neither did hashbrown's).

/// An entry of a [`Table`], which marks a vacant slot itself.
pub(crate) trait Slot: Sized {
    /// A vacant slot (owning nothing).
    fn vacant() -> Self;
    /// Whether this is a vacant slot.
    fn is_vacant(&self) -> bool;
    /// The hash the table files the entry under: a function of the entry alone, with
    /// well-mixed top and low bits.
    fn hash(&self) -> u64;
    /// Whether the table keeps a tag byte per slot beside the slots (see [`Table`]).
    const TAGGED: bool = false;
}

/// Most entries a table holds per slot, as a fraction (4/5).
pub(crate) const MAX_LOAD: (usize, usize) = (4, 5);

/// Fewest slots of a table that holds anything.
const MIN_SLOTS: usize = 8;

/// An open-addressing table of `T`s (see the module docs).
///
/// A table of [`Slot::TAGGED`] entries also keeps one byte per slot, 0 while vacant and
/// else 7 bits of the entry's hash: a probe reads those bytes, 64 to a cache line, and
/// looks at a slot only when its tag matches. Where most lookups are for keys that are
/// not there (the coarse cells and regions a search at a city's fringe asks for) the
/// tags, 1/24 of the 24-byte slots' size and 1/56 of a region's, stay in cache while the
/// slots would not.
#[derive(Debug)]
pub(crate) struct Table<T> {
    slots: Box<[T]>,
    /// One per slot when `T::TAGGED`, else empty.
    tags: Box<[u8]>,
    len: usize,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self {
            slots: Box::default(),
            tags: Box::default(),
            len: 0,
        }
    }
}

/// The tag of an entry with `hash`: never 0 (vacant).
fn tag_of(hash: u64) -> u8 {
    0x80 | (hash as u8 & 0x7F)
}

/// Slots needed to hold `len` entries at no more than [`MAX_LOAD`] (at least one vacant).
fn slots_for(len: usize) -> usize {
    let (num, den) = MAX_LOAD;
    (len.saturating_mul(den) / num + 1).max(MIN_SLOTS)
}

impl<T: Slot> Table<T> {
    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Slots allocated (what the table's memory is: this many `T`s, and as many tag bytes
    /// when tagged).
    #[cfg(test)]
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of the slots and tags.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.len() * size_of::<T>() + self.tags.len()
    }

    fn vacant_at(&self, i: usize) -> bool {
        if T::TAGGED {
            self.tags[i] == 0
        } else {
            self.slots[i].is_vacant()
        }
    }

    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// Where the entry with `hash` for which `eq` holds is, if any.
    pub(crate) fn find_index(&self, hash: u64, mut eq: impl FnMut(&T) -> bool) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mut i = self.home(hash);
        // Ends: the table always keeps a vacant slot.
        if T::TAGGED {
            let tag = tag_of(hash);
            loop {
                let t = self.tags[i];
                if t == 0 {
                    return None;
                }
                if t == tag && eq(&self.slots[i]) {
                    return Some(i);
                }
                i = self.next(i);
            }
        }
        loop {
            let s = &self.slots[i];
            if s.is_vacant() {
                return None;
            }
            if eq(s) {
                return Some(i);
            }
            i = self.next(i);
        }
    }

    /// The entry with `hash` for which `eq` holds.
    pub(crate) fn find(&self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&T> {
        self.find_index(hash, eq).map(|i| &self.slots[i])
    }

    /// The entry with `hash` for which `eq` holds, to change in place. Whatever the change,
    /// the entry's [`Slot::hash`] must stay the same.
    pub(crate) fn find_mut(&mut self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&mut T> {
        self.find_index(hash, eq).map(|i| &mut self.slots[i])
    }

    /// The entry at `index` (from [`Self::find_index`]).
    pub(crate) fn at(&self, index: usize) -> &T {
        &self.slots[index]
    }

    /// The entry at `index`, to change in place (keeping its hash).
    pub(crate) fn at_mut(&mut self, index: usize) -> &mut T {
        &mut self.slots[index]
    }

    /// Adds `entry`, which must not be vacant; the caller knows no equal entry is held.
    /// Returns where it went.
    pub(crate) fn insert_unique(&mut self, entry: T) -> usize {
        debug_assert!(!entry.is_vacant());
        if slots_for(self.len + 1) > self.slots.len() {
            // A quarter more than needed now, so growth comes every quarter of the count.
            let (num, den) = MAX_LOAD;
            let grown = slots_for(self.len + 1 + self.len / 4).max(self.slots.len() * den / num);
            self.rebuild(grown);
        }
        self.len += 1;
        self.place(entry)
    }

    /// Puts `entry` in the first vacant slot of its probe sequence (one exists).
    fn place(&mut self, entry: T) -> usize {
        let hash = entry.hash();
        let mut i = self.home(hash);
        while !self.vacant_at(i) {
            i = self.next(i);
        }
        self.slots[i] = entry;
        if T::TAGGED {
            self.tags[i] = tag_of(hash);
        }
        i
    }

    /// Moves every entry into `slots` new slots (at least [`slots_for`] the count).
    fn rebuild(&mut self, slots: usize) {
        let old = std::mem::replace(
            &mut self.slots,
            std::iter::repeat_with(T::vacant).take(slots).collect(),
        );
        if T::TAGGED {
            self.tags = vec![0; slots].into_boxed_slice();
        }
        for entry in old.into_vec() {
            if !entry.is_vacant() {
                self.place(entry);
            }
        }
    }

    /// Takes out the entry at `index` (from [`Self::find_index`]) and returns it. The
    /// entries after it on its probe run move back, so every probe still ends at the
    /// first vacant slot.
    pub(crate) fn remove_at(&mut self, index: usize) -> T {
        let removed = std::mem::replace(&mut self.slots[index], T::vacant());
        if T::TAGGED {
            self.tags[index] = 0;
        }
        self.len -= 1;
        let n = self.slots.len();
        let mut hole = index;
        let mut j = self.next(index);
        while !self.vacant_at(j) {
            let home = self.home(self.slots[j].hash());
            // The entry at j may move to the hole when the hole lies on its probe path,
            // from its home up to j: when it is at least as far from j as the hole is.
            if (j + n - home) % n >= (j + n - hole) % n {
                self.slots.swap(hole, j);
                if T::TAGGED {
                    self.tags.swap(hole, j);
                }
                hole = j;
            }
            j = self.next(j);
        }
        removed
    }

    /// Takes out the entry with `hash` for which `eq` holds.
    pub(crate) fn remove(&mut self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<T> {
        self.find_index(hash, eq).map(|i| self.remove_at(i))
    }

    /// Every entry, in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter(|s| !s.is_vacant())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// A key and a value; 0 is vacant. The hash is deliberately poor for some keys (their
    /// top bits collide), so probe runs form and cross the table's end.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct E(u32, u32);

    impl Slot for E {
        fn vacant() -> Self {
            E(0, 0)
        }
        fn is_vacant(&self) -> bool {
            self.0 == 0
        }
        fn hash(&self) -> u64 {
            // Keys below 64 all hash near the top: they crowd the table's last slots and
            // wrap around to its first.
            if self.0 < 64 {
                u64::MAX - u64::from(self.0)
            } else {
                u64::from(self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            }
        }
    }

    fn hash_of(k: u32) -> u64 {
        E(k, 0).hash()
    }

    /// The same entries, in a tagged table.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Tagged(E);

    impl Slot for Tagged {
        const TAGGED: bool = true;
        fn vacant() -> Self {
            Tagged(E::vacant())
        }
        fn is_vacant(&self) -> bool {
            self.0.is_vacant()
        }
        fn hash(&self) -> u64 {
            self.0.hash()
        }
    }

    proptest! {
        /// Any sequence of inserts, updates and removals leaves the table holding exactly
        /// what a `HashMap` holds, with every entry findable and the load within bounds.
        #[test]
        fn behaves_as_a_map(ops in proptest::collection::vec((1u32..200, any::<bool>(), any::<u32>()), 0..600)) {
            let mut t: Table<E> = Table::default();
            let mut tagged: Table<Tagged> = Table::default();
            let mut m: HashMap<u32, u32> = HashMap::new();
            for (k, insert, v) in ops {
                if insert {
                    match t.find_mut(hash_of(k), |e| e.0 == k) {
                        Some(e) => e.1 = v,
                        None => {
                            let at = t.insert_unique(E(k, v));
                            prop_assert_eq!(*t.at(at), E(k, v));
                        }
                    }
                    match tagged.find_mut(hash_of(k), |e| e.0.0 == k) {
                        Some(e) => e.0.1 = v,
                        None => {
                            tagged.insert_unique(Tagged(E(k, v)));
                        }
                    }
                    m.insert(k, v);
                } else {
                    let want = m.remove(&k);
                    prop_assert_eq!(t.remove(hash_of(k), |e| e.0 == k).map(|e| e.1), want);
                    prop_assert_eq!(tagged.remove(hash_of(k), |e| e.0.0 == k).map(|e| e.0.1), want);
                }
                prop_assert_eq!(tagged.len(), m.len());
                prop_assert_eq!(tagged.bytes(), tagged.slot_count() * (size_of::<Tagged>() + 1));
                prop_assert_eq!(t.len(), m.len());
                prop_assert!(t.slot_count() == 0 || t.len() * MAX_LOAD.1 < t.slot_count() * MAX_LOAD.0);
                prop_assert!(tagged.slot_count() == 0 || tagged.len() * MAX_LOAD.1 < tagged.slot_count() * MAX_LOAD.0);
            }
            for (&k, &v) in &m {
                prop_assert_eq!(t.find(hash_of(k), |e| e.0 == k), Some(&E(k, v)));
                prop_assert_eq!(tagged.find(hash_of(k), |e| e.0.0 == k), Some(&Tagged(E(k, v))));
            }
            for k in 1u32..200 {
                if !m.contains_key(&k) {
                    prop_assert!(tagged.find(hash_of(k), |e| e.0.0 == k).is_none());
                }
            }
            let mut held: Vec<(u32, u32)> = t.iter().map(|e| (e.0, e.1)).collect();
            held.sort_unstable();
            let mut want: Vec<(u32, u32)> = m.into_iter().collect();
            want.sort_unstable();
            prop_assert_eq!(&held, &want);
        }
    }

    #[test]
    fn a_growing_table_stays_between_64_and_80_percent_full() {
        let mut t: Table<E> = Table::default();
        let mut lowest: f64 = 1.0;
        for k in 1000..201_000u32 {
            t.insert_unique(E(k, k));
            let load = t.len() as f64 / t.slot_count() as f64;
            assert!(load <= 0.8 + 1e-9, "{load} at {}", t.len());
            if t.len() > 1_000 {
                lowest = lowest.min(load);
            }
        }
        assert!(lowest >= 0.63, "lowest load {lowest}");
        for k in (1000..201_000u32).step_by(7) {
            assert_eq!(t.find(hash_of(k), |e| e.0 == k), Some(&E(k, k)));
        }
        assert_eq!(t.find(hash_of(5), |e| e.0 == 5), None);
    }
}
