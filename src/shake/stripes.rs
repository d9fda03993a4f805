//! Where waiting shakes wait: buckets keyed by the H3 cell holding their snapped position,
//! in lock stripes chosen by the cell's resolution-5 parent, so nearby cells share a
//! stripe and a newcomer locks only the few stripes its search disk touches, all at once
//! and in ascending order ([`Shards::lock_many`]: no deadlock).

use std::sync::{Arc, RwLockWriteGuard};

use h3o::{CellIndex, Resolution};
use hashbrown::HashMap;

use super::waiter::Waiter;
use crate::base::shard::{Many, Shards};

/// Stripes of the waiting set.
const STRIPES: usize = 256;
/// Cells sharing a parent at this resolution share a stripe.
const STRIPE_RESOLUTION: Resolution = Resolution::Five;

/// One stripe: bucket cell -> the shakes waiting there.
pub(super) type Stripe = HashMap<CellIndex, Vec<Arc<Waiter>>>;

/// The striped waiting set.
#[derive(Debug)]
pub(super) struct Stripes(Shards<Stripe>);

impl Default for Stripes {
    fn default() -> Self {
        Self(Shards::new(STRIPES))
    }
}

impl Stripes {
    /// The stripe bucket `cell` lives in.
    pub(super) fn of(&self, cell: CellIndex) -> usize {
        let group = cell.parent(STRIPE_RESOLUTION).unwrap_or(cell);
        self.0.of(u64::from(group))
    }

    /// The stripes of every bucket cell in `cells`, held at once.
    pub(super) fn lock(&self, cells: impl IntoIterator<Item = CellIndex>) -> Many<'_, Stripe> {
        self.0
            .lock_many(cells.into_iter().map(|c| self.of(c)).collect())
    }

    /// The stripe of `cell` alone.
    pub(super) fn lock_one(&self, cell: CellIndex) -> RwLockWriteGuard<'_, Stripe> {
        self.0.write(self.of(cell))
    }
}

/// Where `w` waits in `stripe`, if it still does.
pub(super) fn position(stripe: &Stripe, w: &Arc<Waiter>) -> Option<usize> {
    stripe
        .get(&w.bucket)
        .and_then(|b| b.iter().position(|c| Arc::ptr_eq(c, w)))
}

/// Takes the shake at `slot` of bucket `cell` out of `stripe`, dropping the bucket once
/// empty: the one way a shake leaves the waiting set.
pub(super) fn take(stripe: &mut Stripe, cell: CellIndex, slot: usize) -> Option<Arc<Waiter>> {
    let bucket = stripe.get_mut(&cell)?;
    if slot >= bucket.len() {
        return None;
    }
    let w = bucket.swap_remove(slot);
    if bucket.is_empty() {
        stripe.remove(&cell);
    }
    Some(w)
}

/// Takes `w` out of `stripe` if it waits there; returns whether it did.
pub(super) fn remove(stripe: &mut Stripe, w: &Arc<Waiter>) -> bool {
    position(stripe, w).is_some_and(|slot| take(stripe, w.bucket, slot).is_some())
}
