//! Shake: pairs users who shake at about the same time near each other, exactly once each.
//!
//! Waiting shakes sit in buckets keyed by the H3 cell (resolution 7 by default, average
//! edge 1.2 km) holding their snapped position. Buckets live in lock stripes chosen by the
//! cell's resolution-5 parent, so nearby cells share a stripe and a newcomer locks only the
//! few stripes its search disk touches, in ascending order (no deadlock). Under those locks
//! a newcomer either claims the best compatible waiter or becomes a waiter itself: two
//! concurrent shakes within reach of each other are serialised on a shared stripe, so
//! neither can miss the other.
//!
//! Claiming removes the waiter from its bucket and resolves both sides while the locks are
//! held; withdrawal (window passed, client gone, superseded) flags the waiter first and
//! then removes it under its stripe lock. Whoever removes a waiter decides its outcome, so
//! no shake is paired twice and nobody is paired with a withdrawn ("ghost") shake.
//!
//! Fallback (WeChat's worldwide shake): a shake that asked for [`Fallback::Anywhere`] and
//! is still unpaired at half its window joins the `anywhere` pool and pairs with the
//! nearest compatible shake there, ignoring distance. The pool only proposes: the pair is
//! made under the stripe locks of both shakes' buckets, after checking both are still
//! waiting there, exactly like a nearby claim, so the two tiers can never both claim one
//! shake.
//!
//! Lock order: `active` entry, then stripes, then `anywhere`, then `done`. A claim records both outcomes in
//! `done` while it holds the stripes (so a retry sees the match at once) and touches
//! `active` only after releasing them; a superseded shake is taken out of its bucket before
//! its successor becomes visible in `active`.

pub mod rule;

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry};
use h3o::{CellIndex, LatLng, Resolution};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use crate::{
    base::shard::Shards,
    error::{Error, Result},
    geo::cell::RingCover,
    geo::{Coordinates, band_m, distance_key, distance_m, snapped},
    id::{ShakeId, UserId},
};
use rule::{Shaker, compatible, preference};

const STRIPES: usize = 256;
const STRIPE_RESOLUTION: Resolution = Resolution::Five;

/// Limits and timing of the matcher.
#[derive(Debug, Clone)]
pub struct ShakeConfig {
    /// Resolution positions are snapped to before any distance is measured.
    pub privacy_resolution: Resolution,
    /// Resolution of the buckets waiting shakes are kept in.
    pub bucket_resolution: Resolution,
    /// How long a shake waits for a partner.
    pub window: Duration,
    /// How long a finished shake's outcome is kept for retries.
    pub result_ttl: Duration,
    /// Distance used when a shake asks for 0, metres.
    pub default_max_distance_m: f64,
    /// Largest distance a shake may ask for, metres.
    pub max_distance_m: f64,
    /// Most user ids one shake may exclude.
    pub max_excludes: usize,
}

impl Default for ShakeConfig {
    fn default() -> Self {
        Self {
            privacy_resolution: Resolution::Nine,
            bucket_resolution: Resolution::Seven,
            window: Duration::from_secs(2),
            result_ttl: Duration::from_secs(60),
            default_max_distance_m: 1_000.0,
            max_distance_m: 50_000.0,
            max_excludes: 1_000,
        }
    }
}

/// A shake as received (validated by [`Matcher::shake`]).
#[derive(Debug, Clone)]
pub struct ShakeRequest {
    /// Who shook.
    pub user: UserId,
    /// Where, exactly (snapped before use).
    pub position: Coordinates,
    /// The client's idempotency key.
    pub shake_id: ShakeId,
    /// Farthest acceptable partner, metres; 0 = default.
    pub max_distance_m: f64,
    /// Never pair with these users (and they never pair with this one).
    pub exclude: Vec<UserId>,
    /// The caller's own deadline. If it passes before the window ends (and before a
    /// partner is found) the call fails with [`Error::DeadlineExceeded`] and, unless
    /// another call is waiting on the same shake, the shake is withdrawn.
    pub deadline: Option<Instant>,
    /// What to do when nobody nearby shakes within half the window.
    pub fallback: Fallback,
}

/// A shake's fallback when nobody nearby shakes in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// Only nearby partners.
    #[default]
    None,
    /// After half the window without a nearby partner, also any other such shake
    /// anywhere, nearest first.
    Anywhere,
}

/// Which tier a match was made in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Within both sides' distance.
    Nearby,
    /// Between two fallback shakes, at any distance.
    Anywhere,
}

/// Names one pairing, identically on both sides: the matcher's random 64-bit prefix and a
/// sequence number, shown as 32 hex digits. Held as two integers, not a string, because
/// every outcome kept for retries holds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MatchId {
    prefix: u64,
    seq: u64,
}

impl fmt::Display for MatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.prefix, self.seq)
    }
}

/// A successful pairing, as seen by one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// The other side.
    pub partner: UserId,
    /// Banded distance between both sides' snapped positions, metres.
    pub distance_m: u32,
    /// Identical on both sides.
    pub match_id: MatchId,
    /// How they were paired.
    pub tier: Tier,
}

/// How a shake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Paired.
    Matched(Match),
    /// The window passed (or the shake was superseded) without a partner.
    NoMatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// The window passed: the NO_MATCH is remembered for retries.
    Expired,
    /// Every caller went away: nothing to remember, a retry starts afresh.
    Cancelled,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    user: UserId,
    shake_id: ShakeId,
    snapped: LatLng,
    bucket: CellIndex,
    max_distance_m: f64,
    excludes: Box<[UserId]>,
    deadline: Instant,
    result: watch::Sender<Option<Outcome>>,
    withdrawn: AtomicBool,
    callers: AtomicUsize,
    /// Asked for [`Fallback::Anywhere`].
    anywhere: bool,
    /// Has reached half its window and entered the `anywhere` pool (or tried to).
    fell_back: AtomicBool,
}

impl Waiter {
    fn shaker(&self) -> Shaker<'_> {
        Shaker {
            user: &self.user,
            max_distance_m: self.max_distance_m,
            excludes: &self.excludes,
        }
    }

    /// Sets the outcome unless one is set already; returns whether this call set it.
    fn resolve(&self, outcome: Outcome) -> bool {
        self.result.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(outcome);
                true
            } else {
                false
            }
        })
    }

    fn outcome(&self) -> Option<Outcome> {
        self.result.borrow().clone()
    }
}

#[derive(Debug)]
struct Done {
    outcome: Outcome,
    expires: Instant,
}

type Stripe = HashMap<CellIndex, Vec<Arc<Waiter>>>;

/// Finished outcomes kept for retries of the same `(user, shake_id)`, sharded.
///
/// Hundreds of thousands of entries churn through it at a steady size (every shake adds
/// one, every sweep removes those past the retry window), so it is kept small and each
/// sweep rebuilds the shards it removed from ([`crate::base::shard::retain_compact`]) rather
/// than letting removal tombstones double the tables.
///
/// An entry is keyed by a 128-bit BLAKE3 digest of the user and shake ids rather than the
/// ids themselves: 16 bytes inline instead of two shared strings kept alive for the retry
/// window. Two different `(user, shake_id)` pairs share a digest with probability about
/// 2⁻¹²⁸ per pair, and finding such a pair on purpose is as hard as breaking BLAKE3.
#[derive(Debug, Default)]
struct Outcomes {
    shards: Shards<hashbrown::HashMap<u128, Done>>,
}

impl Outcomes {
    fn key(user: &UserId, shake_id: &ShakeId) -> u128 {
        let (user, shake) = (user.as_str().as_bytes(), shake_id.as_str().as_bytes());
        let mut h = blake3::Hasher::new();
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        h.update(&(user.len() as u64).to_le_bytes());
        h.update(user);
        h.update(shake);
        let digest = h.finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest.as_bytes()[..16]);
        u128::from_le_bytes(key)
    }

    fn shard(key: u128) -> usize {
        (key >> 122) as usize
    }

    /// The outcome of `(user, shake_id)` if it is still within its retry window.
    fn get(&self, user: &UserId, shake_id: &ShakeId, now: Instant) -> Option<Outcome> {
        let key = Self::key(user, shake_id);
        let shard = self.shards.read(Self::shard(key));
        shard
            .get(&key)
            .filter(|d| d.expires > now)
            .map(|d| d.outcome.clone())
    }

    fn insert(&self, user: &UserId, shake_id: &ShakeId, done: Done) {
        let key = Self::key(user, shake_id);
        self.shards.write(Self::shard(key)).insert(key, done);
    }

    fn len(&self) -> usize {
        self.shards.sum(hashbrown::HashMap::len)
    }

    /// The outcome kept for `user`'s shake `shake_id`, if any and still in its window.
    #[cfg(test)]
    fn kept(&self, user: &UserId, shake_id: &str) -> Option<Outcome> {
        let shake_id = ShakeId::new("shake_id", shake_id).ok()?;
        self.get(user, &shake_id, Instant::now())
    }

    /// Drops outcomes past their window, one shard at a time; returns how many.
    fn sweep(&self, now: Instant) -> usize {
        self.shards.retain_compact(|_, d| d.expires > now)
    }
}

enum Enter {
    Done(Outcome),
    Join(Arc<Waiter>),
    New(Arc<Waiter>),
}

/// The Shake matcher. Share it behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Matcher {
    cfg: ShakeConfig,
    stripes: Box<[Mutex<Stripe>]>,
    /// Fallback shakes past half their window, still waiting (stale entries are dropped
    /// whenever the pool is scanned).
    anywhere: Mutex<Vec<Arc<Waiter>>>,
    active: DashMap<UserId, Arc<Waiter>>,
    done: Outcomes,
    seq: AtomicU64,
    match_prefix: u64,
    waiting: AtomicUsize,
    /// Wakes [`Matcher::until_waiting`]; notified only while someone watches, so the hot
    /// path pays one atomic load, not the notifier's lock.
    changed: Notify,
    watchers: AtomicUsize,
}

fn lock(m: &Mutex<Stripe>) -> MutexGuard<'_, Stripe> {
    // A panic while holding a stripe cannot leave a bucket half-edited (every edit is a
    // single Vec operation), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps a caller counted on a waiter; the last caller to leave an unresolved shake
/// (client cancelled, deadline passed) withdraws it at once.
///
/// The count is only changed under the user's `active` entry lock (incremented in
/// [`Matcher::enter`]), so a retry can never join a shake its last caller is abandoning.
struct CallerGuard<'a> {
    matcher: &'a Matcher,
    waiter: Arc<Waiter>,
}

impl Drop for CallerGuard<'_> {
    fn drop(&mut self) {
        let w = &self.waiter;
        let abandoned = {
            let _entry = self.matcher.active.get(&w.user);
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
        let match_prefix = getrandom::u64().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Self {
            cfg,
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            anywhere: Mutex::new(Vec::new()),
            active: DashMap::new(),
            done: Outcomes::default(),
            seq: AtomicU64::new(0),
            match_prefix,
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

    fn max_distance(&self, requested: f64) -> Result<f64> {
        let max = self.cfg.max_distance_m;
        if !requested.is_finite() || requested < 0.0 {
            return Err(Error::invalid(
                "max_distance_m",
                format!("must be a finite number of metres >= 0, got {requested}"),
            ));
        }
        if requested > max {
            return Err(Error::invalid(
                "max_distance_m",
                format!("must be at most {max} m, got {requested}"),
            ));
        }
        Ok(if requested == 0.0 {
            self.cfg.default_max_distance_m
        } else {
            requested
        })
    }

    /// Checks a request without acting on it; returns its effective maximum distance.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `max_distance_m` or `exclude_user_ids`.
    pub fn validate(&self, req: &ShakeRequest) -> Result<f64> {
        let max_distance_m = self.max_distance(req.max_distance_m)?;
        if req.exclude.len() > self.cfg.max_excludes {
            return Err(Error::invalid(
                "exclude_user_ids",
                format!(
                    "must hold at most {} ids, got {}",
                    self.cfg.max_excludes,
                    req.exclude.len()
                ),
            ));
        }
        Ok(max_distance_m)
    }

    /// Shakes: pairs at once with the best waiting partner, or waits up to the window.
    ///
    /// Retrying the same `(user, shake_id)` joins the wait or returns the remembered
    /// outcome; a new `shake_id` from a waiting user supersedes the old shake (NO_MATCH).
    /// Dropping the returned future withdraws the shake if no other call is waiting on it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `max_distance_m` or `exclude_user_ids`.
    pub async fn shake(&self, req: ShakeRequest) -> Result<Outcome> {
        let max_distance_m = self.validate(&req)?;
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

    fn enter(&self, w: Arc<Waiter>) -> Enter {
        {
            let slot = self.active.entry(w.user.clone());
            if let Some(outcome) = self.done.get(&w.user, &w.shake_id, Instant::now()) {
                return Enter::Done(outcome);
            }
            match slot {
                Entry::Occupied(o)
                    if o.get().shake_id == w.shake_id
                        && !o.get().withdrawn.load(Ordering::SeqCst) =>
                {
                    let joined = o.get().clone();
                    joined.callers.fetch_add(1, Ordering::SeqCst);
                    return Enter::Join(joined);
                }
                Entry::Occupied(mut o) => {
                    let old = o.get().clone();
                    // Superseded (or abandoned by its callers): take it out before the new
                    // shake becomes visible, so it cannot be claimed once a retry of its id
                    // could start afresh. A claim that came first has already recorded it.
                    if !old.withdrawn.load(Ordering::SeqCst) && self.take_out(&old) {
                        self.record(&old, Outcome::NoMatch);
                    }
                    o.insert(w.clone());
                }
                Entry::Vacant(v) => {
                    v.insert(w.clone());
                }
            }
        }
        Enter::New(w)
    }

    fn stripe_of(&self, cell: CellIndex) -> usize {
        let group = cell.parent(STRIPE_RESOLUTION).unwrap_or(cell);
        // Fibonacci hashing of the parent's bits.
        (u64::from(group).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize % STRIPES
    }

    /// Claims the best compatible waiter for `w`, or makes `w` wait.
    fn place(&self, w: &Arc<Waiter>) {
        let cells =
            RingCover::cells_within(w.snapped, self.cfg.bucket_resolution, w.max_distance_m);
        let mut ids: Vec<usize> = cells.iter().map(|(c, _)| self.stripe_of(*c)).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut guards: Vec<MutexGuard<'_, Stripe>> =
            ids.iter().map(|&i| lock(&self.stripes[i])).collect();
        if w.withdrawn.load(Ordering::SeqCst) {
            return;
        }

        /// The best candidate so far: preference key, stripe guard, bucket cell, slot, distance.
        struct Best {
            pref: (u64, u64),
            guard: usize,
            cell: CellIndex,
            slot: usize,
            distance_m: f64,
        }
        let me = w.shaker();
        let mut best: Option<Best> = None;
        for (cell, _) in &cells {
            let Ok(g) = ids.binary_search(&self.stripe_of(*cell)) else {
                continue;
            };
            let Some(bucket) = guards[g].get(cell) else {
                continue;
            };
            for (i, c) in bucket.iter().enumerate() {
                if c.withdrawn.load(Ordering::SeqCst) || c.callers.load(Ordering::SeqCst) == 0 {
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
                        guard: g,
                        cell: *cell,
                        slot: i,
                        distance_m: d,
                    });
                }
            }
        }

        let Some(Best {
            guard: g,
            cell,
            slot: i,
            distance_m: d,
            ..
        }) = best
        else {
            let own = ids.binary_search(&self.stripe_of(w.bucket));
            if let Ok(g) = own {
                guards[g].entry(w.bucket).or_default().push(w.clone());
                self.waiting_changed(1);
            } else {
                // Unreachable: ring 0 of the cover is the waiter's own bucket. Never strand
                // the caller regardless.
                w.resolve(Outcome::NoMatch);
            }
            return;
        };

        let partner = {
            let stripe = &mut guards[g];
            let Some(bucket) = stripe.get_mut(&cell) else {
                return;
            };
            let partner = bucket.swap_remove(i);
            if bucket.is_empty() {
                stripe.remove(&cell);
            }
            partner
        };
        self.waiting_changed(-1);
        self.leave_pool(&[&partner]);
        self.pair(w, &partner, d, Tier::Nearby);
        drop(guards);
        self.release(&partner);
        self.release(w);
    }

    /// Resolves and records both sides of a pair. Called with both shakes out of their
    /// buckets and their stripes still locked, so a concurrent withdrawal of either side
    /// sees the outcome rather than racing it, and a retry of either shake id sees the
    /// match from this moment on.
    fn pair(&self, a: &Waiter, b: &Waiter, d: f64, tier: Tier) {
        let match_id = MatchId {
            prefix: self.match_prefix,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        };
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

    /// Drops `gone` from the `anywhere` pool (call with their stripes locked).
    fn leave_pool(&self, gone: &[&Arc<Waiter>]) {
        if gone.iter().any(|w| w.fell_back.load(Ordering::SeqCst)) {
            let mut pool = self.anywhere.lock().unwrap_or_else(PoisonError::into_inner);
            pool.retain(|p| !gone.iter().any(|g| Arc::ptr_eq(p, g)));
        }
    }

    /// `x` has waited half its window without a nearby partner: pair it with the nearest
    /// compatible shake in the `anywhere` pool, or put it there.
    fn fall_back(&self, x: &Arc<Waiter>) {
        if !x.anywhere || x.fell_back.swap(true, Ordering::SeqCst) {
            return;
        }
        // Each round either pairs, parks `x`, or finds its candidate gone and drops it
        // from the pool; the bound only guards against a pathological stream of races.
        for _ in 0..64 {
            if x.withdrawn.load(Ordering::SeqCst) || x.outcome().is_some() {
                return;
            }
            let y = {
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
                match best {
                    Some(y) => y,
                    None => {
                        pool.push(x.clone());
                        return;
                    }
                }
            };
            let (sx, sy) = (self.stripe_of(x.bucket), self.stripe_of(y.bucket));
            let (first, second) = (sx.min(sy), sx.max(sy));
            let mut g1 = lock(&self.stripes[first]);
            let mut g2 = (second != first).then(|| lock(&self.stripes[second]));
            let waiting = |stripe: &Stripe, w: &Arc<Waiter>| {
                stripe
                    .get(&w.bucket)
                    .and_then(|b| b.iter().position(|c| Arc::ptr_eq(c, w)))
            };
            let stripe_for = |s: usize| if s == first { 0 } else { 1 };
            let slot = |g1: &Stripe, g2: Option<&Stripe>, s: usize, w: &Arc<Waiter>| match (
                stripe_for(s),
                g2,
            ) {
                (1, Some(g2)) => waiting(g2, w),
                _ => waiting(g1, w),
            };
            if slot(&g1, g2.as_deref(), sx, x).is_none() {
                // Claimed nearby or withdrawn meanwhile: its outcome is decided.
                return;
            }
            if slot(&g1, g2.as_deref(), sy, &y).is_none() || y.withdrawn.load(Ordering::SeqCst) {
                drop(g2);
                drop(g1);
                self.leave_pool(&[&y]);
                continue;
            }
            for (s, w) in [(sx, x), (sy, &y)] {
                let stripe: &mut Stripe = match (stripe_for(s), g2.as_mut()) {
                    (1, Some(g2)) => g2,
                    _ => &mut g1,
                };
                if let Some(bucket) = stripe.get_mut(&w.bucket) {
                    bucket.retain(|c| !Arc::ptr_eq(c, w));
                    if bucket.is_empty() {
                        stripe.remove(&w.bucket);
                    }
                }
                self.waiting_changed(-1);
            }
            self.leave_pool(&[x, &y]);
            self.pair(x, &y, distance_m(x.snapped, y.snapped), Tier::Anywhere);
            drop(g2);
            drop(g1);
            self.release(&y);
            self.release(x);
            return;
        }
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
        self.active.remove_if(&w.user, |_, a| Arc::ptr_eq(a, w));
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
            let mut stripe = lock(&self.stripes[self.stripe_of(w.bucket)]);
            let mut removed = false;
            if let Some(bucket) = stripe.get_mut(&w.bucket) {
                if let Some(i) = bucket.iter().position(|x| Arc::ptr_eq(x, w)) {
                    bucket.swap_remove(i);
                    removed = true;
                }
                if bucket.is_empty() {
                    stripe.remove(&w.bucket);
                }
            }
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
