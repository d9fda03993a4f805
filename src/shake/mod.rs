//! Shake: pairs users who shake at about the same time near each other, exactly once each.
//!
//! Rooms: `types` (requests, outcomes, match ids), `waiter` (one waiting shake),
//! `stripes` (the striped waiting set and its one removal), `claim` (the nearby tier),
//! `fallback` (the ANYWHERE tier), `outcomes` (kept for retries), [`rule`] (the pure
//! pairing rule). This façade admits a shake, waits for its outcome and withdraws it.
//!
//! Waiting shakes sit in buckets keyed by the H3 cell (resolution 7 by default, average
//! edge 1.2 km) holding their snapped position, in lock stripes chosen by the cell's
//! resolution-5 parent. Under the stripes its disk touches a newcomer either claims the
//! best compatible waiter or becomes a waiter itself, so two concurrent shakes within
//! reach of each other are serialised on a shared stripe and neither can miss the other.
//!
//! Claiming removes the waiter from its bucket and resolves both sides while the locks are
//! held; withdrawal (window passed, client gone, superseded) flags the waiter first and
//! then removes it under its stripe lock. Whoever removes a waiter decides its outcome, so
//! no shake is paired twice and nobody is paired with a withdrawn ("ghost") shake.
//!
//! Lock order: the user's `active` shard, then stripes (ascending), then `anywhere`, then
//! `done`. A claim records both outcomes in `done` while it holds the stripes (so a retry
//! sees the match at once) and touches `active` only after releasing them; a superseded
//! shake is taken out of its bucket before its successor becomes visible in `active`.

mod claim;
mod fallback;
mod outcomes;
pub mod rule;
mod stripes;
mod types;
mod waiter;

use std::{
    hash::BuildHasher,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use hashbrown::{DefaultHashBuilder, HashMap};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

pub use types::{Fallback, Match, MatchId, Outcome, ShakeConfig, ShakeRequest, Tier, ValidShake};

use self::{
    outcomes::{Done, Outcomes},
    stripes::Stripes,
    waiter::{Waiter, Why},
};
use crate::{
    base::shard::Shards,
    error::{Error, Result},
    geo::snapped,
    id::UserId,
};

enum Enter {
    Done(Outcome),
    Join(Arc<Waiter>),
    New(Arc<Waiter>),
}

/// The Shake matcher. Share it behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Matcher {
    cfg: ShakeConfig,
    stripes: Stripes,
    /// Fallback shakes past half their window, still waiting (stale entries are dropped
    /// whenever the pool is scanned).
    anywhere: Mutex<Vec<Arc<Waiter>>>,
    /// Each user's current shake.
    active: Shards<HashMap<UserId, Arc<Waiter>>>,
    active_hasher: DefaultHashBuilder,
    done: Outcomes,
    seq: AtomicU64,
    waiting: AtomicUsize,
    /// Wakes [`Matcher::until_waiting`]; notified only while someone watches, so the hot
    /// path pays one atomic load, not the notifier's lock.
    changed: Notify,
    watchers: AtomicUsize,
}

/// Keeps a caller counted on a waiter; the last caller to leave an unresolved shake
/// (client cancelled, deadline passed) withdraws it at once.
///
/// The count is only changed under the user's `active` shard lock (incremented in
/// [`Matcher::enter`]), so a retry can never join a shake its last caller is abandoning.
struct CallerGuard<'a> {
    matcher: &'a Matcher,
    waiter: Arc<Waiter>,
}

impl Drop for CallerGuard<'_> {
    fn drop(&mut self) {
        let w = &self.waiter;
        let abandoned = {
            let _entry = self.matcher.active.read(self.matcher.active_shard(&w.user));
            let last = w.callers.fetch_sub(1, Ordering::SeqCst) == 1;
            if last && w.outcome().is_none() {
                // Flag it before anyone else can claim or join it.
                w.withdrawn.store(true, Ordering::SeqCst);
                true
            } else {
                false
            }
        };
        if abandoned {
            self.matcher.withdraw(w, Why::Cancelled);
        }
    }
}

impl Matcher {
    /// An idle matcher.
    pub fn new(cfg: ShakeConfig) -> Self {
        Self {
            cfg,
            stripes: Stripes::default(),
            anywhere: Mutex::new(Vec::new()),
            active: Shards::default(),
            active_hasher: DefaultHashBuilder::default(),
            done: Outcomes::default(),
            seq: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            changed: Notify::new(),
            watchers: AtomicUsize::new(0),
        }
    }

    /// The matcher's configuration.
    pub fn config(&self) -> &ShakeConfig {
        &self.cfg
    }

    /// Shakes waiting for a partner right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Finished outcomes kept for retries.
    pub fn remembered(&self) -> usize {
        self.done.len()
    }

    /// Resolves once exactly `n` shakes are waiting (for tests and drain logic).
    pub async fn until_waiting(&self, n: usize) {
        struct Watching<'a>(&'a AtomicUsize);
        impl Drop for Watching<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.watchers.fetch_add(1, Ordering::SeqCst);
        let _watching = Watching(&self.watchers);
        crate::base::wait::until(&self.changed, || self.waiting() == n).await;
    }

    /// Checks a shake as received against the matcher's limits.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `max_distance_m` or `exclude_user_ids`.
    pub fn validate(&self, req: ShakeRequest) -> Result<ValidShake> {
        ValidShake::new(req, &self.cfg)
    }

    fn waiting_changed(&self, delta: isize) {
        if delta > 0 {
            self.waiting.fetch_add(1, Ordering::SeqCst);
        } else {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        if self.watchers.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Forgets finished outcomes older than the retry window; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        self.done.sweep(now)
    }

    /// Shakes: pairs at once with the best waiting partner, or waits up to the window.
    ///
    /// Retrying the same `(user, shake_id)` joins the wait or returns the remembered
    /// outcome; a new `shake_id` from a waiting user supersedes the old shake (NO_MATCH).
    /// Dropping the returned future withdraws the shake if no other call is waiting on it.
    ///
    /// # Errors
    /// [`Error::DeadlineExceeded`] when the caller's own deadline passes first.
    pub async fn shake(&self, shake: ValidShake) -> Result<Outcome> {
        let ValidShake { req, max_distance } = shake;
        let max_distance_m = max_distance.m();
        let deadline = Instant::now() + self.cfg.window;
        let caller_deadline = req.deadline;
        let snapped = snapped(req.position.cell(self.cfg.privacy_resolution));
        let waiter = Arc::new(Waiter {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            user: req.user,
            shake_id: req.shake_id,
            snapped,
            bucket: snapped.to_cell(self.cfg.bucket_resolution),
            max_distance_m,
            excludes: req.exclude.into_boxed_slice(),
            deadline,
            result: watch::Sender::new(None),
            withdrawn: AtomicBool::new(false),
            callers: AtomicUsize::new(1),
            anywhere: req.fallback == Fallback::Anywhere,
            fell_back: AtomicBool::new(false),
        });
        let (waiter, fresh) = match self.enter(waiter) {
            Enter::Done(outcome) => return Ok(outcome),
            Enter::Join(w) => (w, false),
            Enter::New(w) => (w, true),
        };
        let guard = CallerGuard {
            matcher: self,
            waiter: waiter.clone(),
        };
        if fresh {
            self.place(&waiter);
        }
        let outcome = self.wait(&waiter, caller_deadline).await;
        drop(guard);
        match outcome {
            // This caller's deadline passed; its guard (if it was the last caller) has now
            // withdrawn the shake. A claim that won the race still stands: report it.
            Err(Error::DeadlineExceeded) => waiter
                .outcome()
                .filter(|o| matches!(o, Outcome::Matched(_)))
                .ok_or(Error::DeadlineExceeded),
            other => other,
        }
    }

    /// The shard of `active` holding `user`.
    fn active_shard(&self, user: &UserId) -> usize {
        self.active.of(self.active_hasher.hash_one(user))
    }

    fn enter(&self, w: Arc<Waiter>) -> Enter {
        {
            let mut active = self.active.write(self.active_shard(&w.user));
            if let Some(outcome) = self.done.get(&w.user, &w.shake_id, Instant::now()) {
                return Enter::Done(outcome);
            }
            match active.get(&w.user) {
                Some(cur)
                    if cur.shake_id == w.shake_id && !cur.withdrawn.load(Ordering::SeqCst) =>
                {
                    let joined = cur.clone();
                    joined.callers.fetch_add(1, Ordering::SeqCst);
                    return Enter::Join(joined);
                }
                Some(cur) => {
                    let old = cur.clone();
                    // Superseded (or abandoned by its callers): take it out before the new
                    // shake becomes visible, so it cannot be claimed once a retry of its id
                    // could start afresh. A claim that came first has already recorded it.
                    if !old.withdrawn.load(Ordering::SeqCst) && self.take_out(&old) {
                        self.record(&old, Outcome::NoMatch);
                    }
                    active.insert(w.user.clone(), w.clone());
                }
                None => {
                    active.insert(w.user.clone(), w.clone());
                }
            }
        }
        Enter::New(w)
    }

    /// Remembers a finished outcome for retries of the same shake id.
    fn record(&self, w: &Waiter, outcome: Outcome) {
        self.done.insert(
            &w.user,
            &w.shake_id,
            Done {
                outcome,
                expires: Instant::now() + self.cfg.result_ttl,
            },
        );
    }

    /// Lets the user shake afresh, unless a newer shake of theirs is active already.
    fn release(&self, w: &Arc<Waiter>) {
        let mut active = self.active.write(self.active_shard(&w.user));
        if active.get(&w.user).is_some_and(|a| Arc::ptr_eq(a, w)) {
            active.remove(&w.user);
        }
    }

    /// Takes `w` out of the waiting set. If it had no outcome yet it gets NO_MATCH, which
    /// is remembered for retries unless its callers went away.
    fn withdraw(&self, w: &Arc<Waiter>, why: Why) {
        if self.take_out(w) {
            if why == Why::Expired {
                self.record(w, Outcome::NoMatch);
            }
            self.release(w);
        }
    }

    /// Flags `w`, removes it from its bucket and gives it NO_MATCH unless it already had an
    /// outcome; returns whether this call decided the outcome. Locks only `w`'s stripe.
    fn take_out(&self, w: &Arc<Waiter>) -> bool {
        w.withdrawn.store(true, Ordering::SeqCst);
        let removed = {
            let mut stripe = self.stripes.lock_one(w.bucket);
            let removed = stripes::remove(&mut stripe, w);
            if removed {
                self.leave_pool(&[w]);
            }
            removed
        };
        if removed {
            self.waiting_changed(-1);
        }
        w.resolve(Outcome::NoMatch)
    }

    async fn wait(&self, w: &Arc<Waiter>, caller_deadline: Option<Instant>) -> Result<Outcome> {
        let mut rx = w.result.subscribe();
        let caller_first = caller_deadline.filter(|d| *d < w.deadline);
        if w.anywhere {
            let half = w.deadline - self.cfg.window / 2;
            if caller_first.is_none_or(|d| half < d) {
                if let Some(outcome) = outcome_before(&mut rx, half).await {
                    return Ok(outcome);
                }
                self.fall_back(w);
            }
        }
        if let Some(outcome) = outcome_before(&mut rx, caller_first.unwrap_or(w.deadline)).await {
            return Ok(outcome);
        }
        if caller_first.is_some() {
            // This caller gives up; its guard withdraws the shake if nobody else waits on it.
            return w.outcome().ok_or(Error::DeadlineExceeded);
        }
        self.withdraw(w, Why::Expired);
        Ok(w.outcome().unwrap_or(Outcome::NoMatch))
    }
}

/// The shake's outcome if it is decided before `until`.
async fn outcome_before(
    rx: &mut watch::Receiver<Option<Outcome>>,
    until: Instant,
) -> Option<Outcome> {
    tokio::select! {
        biased;
        got = rx.wait_for(Option::is_some) => got.ok().and_then(|slot| slot.clone()),
        () = tokio::time::sleep_until(until) => None,
    }
}

#[cfg(test)]
mod tests;
