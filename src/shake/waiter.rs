//! A waiting shake and its one-shot outcome.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use h3o::{CellIndex, LatLng};
use tokio::{sync::watch, time::Instant};

use super::{Outcome, rule::Shaker};
use crate::id::{ShakeId, UserId};

/// Why a shake was withdrawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// The window passed: the NO_MATCH is remembered for retries.
    Expired,
    /// Every caller went away: nothing to remember, a retry starts afresh.
    Cancelled,
}

/// One waiting shake, shared by its callers (retries join it) and the stripes.
#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) seq: u64,
    pub(super) user: UserId,
    pub(super) shake_id: ShakeId,
    pub(super) snapped: LatLng,
    pub(super) bucket: CellIndex,
    pub(super) max_distance_m: f64,
    pub(super) excludes: Box<[UserId]>,
    pub(super) deadline: Instant,
    pub(super) result: watch::Sender<Option<Outcome>>,
    pub(super) withdrawn: AtomicBool,
    pub(super) callers: AtomicUsize,
    /// Asked for [`Fallback::Anywhere`](super::Fallback::Anywhere).
    pub(super) anywhere: bool,
    /// Has reached half its window and entered the `anywhere` pool (or tried to).
    pub(super) fell_back: AtomicBool,
}

impl Waiter {
    pub(super) fn shaker(&self) -> Shaker<'_> {
        Shaker {
            user: &self.user,
            max_distance_m: self.max_distance_m,
            excludes: &self.excludes,
        }
    }

    /// Sets the outcome unless one is set already; returns whether this call set it.
    pub(super) fn resolve(&self, outcome: Outcome) -> bool {
        self.result.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(outcome);
                true
            } else {
                false
            }
        })
    }

    /// Whether a newcomer may claim it: not withdrawn, and a caller still waits on it.
    pub(super) fn claimable(&self) -> bool {
        !self.withdrawn.load(Ordering::SeqCst) && self.callers.load(Ordering::SeqCst) > 0
    }

    pub(super) fn outcome(&self) -> Option<Outcome> {
        self.result.borrow().clone()
    }
}
