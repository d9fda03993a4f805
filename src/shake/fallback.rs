//! The ANYWHERE tier (WeChat's worldwide shake): a shake that asked for
//! [`Fallback::Anywhere`](super::Fallback::Anywhere) and is still unpaired at half its
//! window joins the `anywhere` pool and pairs with the nearest compatible shake there,
//! ignoring distance.
//!
//! The pool only proposes: the pair is made under the stripe locks of both shakes'
//! buckets, after checking both are still waiting there, exactly like a nearby claim, so
//! the two tiers can never both claim one shake.

use std::sync::{Arc, PoisonError, atomic::Ordering};

use super::{
    Matcher, Tier,
    rule::{compatible, preference},
    stripes,
    waiter::Waiter,
};
use crate::geo::{distance_key, distance_m};

impl Matcher {
    /// Drops `gone` from the `anywhere` pool (call with their stripes locked).
    pub(super) fn leave_pool(&self, gone: &[&Arc<Waiter>]) {
        if gone.iter().any(|w| w.fell_back.load(Ordering::SeqCst)) {
            let mut pool = self.anywhere.lock().unwrap_or_else(PoisonError::into_inner);
            pool.retain(|p| !gone.iter().any(|g| Arc::ptr_eq(p, g)));
        }
    }

    /// The nearest compatible shake in the pool for `x`, or `None` after parking `x` there.
    fn propose(&self, x: &Arc<Waiter>) -> Option<Arc<Waiter>> {
        let mut pool = self.anywhere.lock().unwrap_or_else(PoisonError::into_inner);
        pool.retain(|c| !c.withdrawn.load(Ordering::SeqCst) && c.outcome().is_none());
        let me = x.shaker().anywhere();
        let best = pool
            .iter()
            .filter(|c| c.callers.load(Ordering::SeqCst) > 0)
            .map(|c| (c, distance_m(x.snapped, c.snapped)))
            .filter(|(c, d)| compatible(&me, &c.shaker().anywhere(), *d))
            .min_by_key(|(c, d)| preference(distance_key(*d), c.seq))
            .map(|(c, _)| c.clone());
        if best.is_none() {
            pool.push(x.clone());
        }
        best
    }

    /// `x` has waited half its window without a nearby partner: pair it with the nearest
    /// compatible shake in the `anywhere` pool, or put it there.
    pub(super) fn fall_back(&self, x: &Arc<Waiter>) {
        if !x.anywhere || x.fell_back.swap(true, Ordering::SeqCst) {
            return;
        }
        // Each round either pairs, parks `x`, or finds its candidate gone and drops it
        // from the pool; the bound only guards against a pathological stream of races.
        for _ in 0..64 {
            if x.withdrawn.load(Ordering::SeqCst) || x.outcome().is_some() {
                return;
            }
            let Some(y) = self.propose(x) else {
                return;
            };
            let (sx, sy) = (self.stripes.of(x.bucket), self.stripes.of(y.bucket));
            let mut held = self.stripes.lock([x.bucket, y.bucket]);
            let waits = |s: usize, w: &Arc<Waiter>| {
                held.get(s)
                    .and_then(|stripe| stripes::position(stripe, w))
                    .is_some()
            };
            if !waits(sx, x) {
                // Claimed nearby or withdrawn meanwhile: its outcome is decided.
                return;
            }
            if !waits(sy, &y) || y.withdrawn.load(Ordering::SeqCst) {
                drop(held);
                self.leave_pool(&[&y]);
                continue;
            }
            for (s, w) in [(sx, x), (sy, &y)] {
                if let Some(stripe) = held.get_mut(s) {
                    stripes::remove(stripe, w);
                }
                self.waiting_changed(-1);
            }
            self.leave_pool(&[x, &y]);
            self.pair(x, &y, distance_m(x.snapped, y.snapped), Tier::Anywhere);
            drop(held);
            self.release(&y);
            self.release(x);
            return;
        }
    }
}
