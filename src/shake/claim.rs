//! The nearby tier: a newcomer claims the best compatible waiter within reach, or waits.
//!
//! Under the stripes of every bucket its search disk touches, a newcomer either claims
//! the best compatible waiter or becomes a waiter itself: two concurrent shakes within
//! reach of each other are serialised on a shared stripe, so neither can miss the other.
//! Claiming removes the waiter from its bucket and resolves both sides while the locks
//! are held, so whoever removes a waiter decides its outcome.

use std::sync::{Arc, atomic::Ordering};

use h3o::CellIndex;

use super::{
    Match, MatchId, Matcher, Outcome, Tier,
    rule::{compatible, preference},
    stripes,
    waiter::Waiter,
};
use crate::geo::{
    band_m,
    cell::{Centres, RingCover},
    distance_key, distance_m,
};

impl Matcher {
    /// Claims the best compatible waiter for `w`, or makes `w` wait.
    pub(super) fn place(&self, w: &Arc<Waiter>) {
        let cells = RingCover::cells_within(
            w.snapped,
            self.cfg.bucket_resolution,
            w.max_distance_m,
            Centres::Computed,
        );
        let mut held = self.stripes.lock(cells.iter().map(|&(c, _)| c));
        if w.withdrawn.load(Ordering::SeqCst) {
            return;
        }

        /// The best candidate so far: preference key, its bucket and slot, distance.
        struct Best {
            pref: (u64, u64),
            cell: CellIndex,
            slot: usize,
            distance_m: f64,
        }
        let me = w.shaker();
        let mut best: Option<Best> = None;
        for &(cell, _) in &cells {
            let Some(bucket) = held.get(self.stripes.of(cell)).and_then(|s| s.get(&cell)) else {
                continue;
            };
            for (slot, c) in bucket.iter().enumerate() {
                if !c.claimable() {
                    continue;
                }
                let d = distance_m(w.snapped, c.snapped);
                if !compatible(&me, &c.shaker(), d) {
                    continue;
                }
                let pref = preference(distance_key(d), c.seq);
                if best.as_ref().is_none_or(|b| pref < b.pref) {
                    best = Some(Best {
                        pref,
                        cell,
                        slot,
                        distance_m: d,
                    });
                }
            }
        }

        let Some(Best {
            cell,
            slot,
            distance_m: d,
            ..
        }) = best
        else {
            match held.get_mut(self.stripes.of(w.bucket)) {
                Some(own) => {
                    own.entry(w.bucket).or_default().push(w.clone());
                    self.waiting_changed(1);
                }
                // Unreachable: ring 0 of the cover is the waiter's own bucket. Never strand
                // the caller regardless.
                None => {
                    w.resolve(Outcome::NoMatch);
                }
            }
            return;
        };

        let Some(partner) = held
            .get_mut(self.stripes.of(cell))
            .and_then(|stripe| stripes::take(stripe, cell, slot))
        else {
            return;
        };
        self.waiting_changed(-1);
        self.leave_pool(&[&partner]);
        self.pair(w, &partner, d, Tier::Nearby);
        drop(held);
        self.release(&partner);
        self.release(w);
    }

    /// Resolves and records both sides of a pair. Called with both shakes out of their
    /// buckets and their stripes still locked, so a concurrent withdrawal of either side
    /// sees the outcome rather than racing it, and a retry of either shake id sees the
    /// match from this moment on.
    pub(super) fn pair(&self, a: &Waiter, b: &Waiter, d: f64, tier: Tier) {
        let match_id = MatchId::random();
        let distance_m = band_m(d);
        let for_b = Outcome::Matched(Match {
            partner: a.user.clone(),
            distance_m,
            match_id,
            tier,
        });
        let for_a = Outcome::Matched(Match {
            partner: b.user.clone(),
            distance_m,
            match_id,
            tier,
        });
        b.resolve(for_b.clone());
        a.resolve(for_a.clone());
        self.record(b, for_b);
        self.record(a, for_a);
    }
}
