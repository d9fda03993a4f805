//! Shake over Redis / Valkey: shakes sent to different replicas pair exactly once and
//! symmetrically, with the same match id; the same validation, snapping, bands and pairing
//! rule ([`crate::shake::rule`]) as in memory.
//!
//! A shake's state lives in its user's slot; a waiting shake is also listed in the waiting
//! index of its bucket, in its bucket's tag (see `geomatch.lua` for the keys). A newcomer
//! lists itself and scans its own tag in one atomic step, then scans the other tags its
//! disk touches: of two simultaneous shakes the later scan sees the earlier, so neither
//! misses the other. It then tries the candidates, best first by the rule's preference:
//! reserve itself, claim the candidate (which decides the candidate's outcome in one step),
//! commit itself. Two shakes claiming each other at once agree on the lower proposal; a
//! reservation whose claimer died is settled by `gm_sh_abort` on the partner, so no claim
//! lands after it and nobody is paired twice.
//!
//! A waiting call is woken by a message on its replica's own channel (sharded pub/sub in a
//! Cluster), sent by whoever decided its outcome, and then reads the state. At the deadline
//! it reads the state anyway, so a lost message never loses or invents a match: it only
//! delays the answer to the end of the window.
//!
//! The protocol steps of a shake run in a task of their own, so a caller that goes away
//! never leaves a step half done; the last caller to leave withdraws a shake still waiting.

mod keys;
mod pair;
mod wake;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use h3o::{CellIndex, LatLng};
use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use self::{
    keys::{Keys, Listing, Reply, encode_excludes, field, index_key, ms, outcome_of, word},
    wake::{Listener, Waker, Wakes, channel},
};
use super::{Conn, StoreError, Target};
use crate::{
    error::{Error, Result},
    geo::snapped,
    id::UserId,
    shake::{Fallback, Outcome, ShakeConfig, ValidShake},
};

/// How many passes a newcomer makes over its candidates while some of them are busy
/// reserving others.
const PASSES: u32 = 3;
/// The ANYWHERE pool's key (one slot: the pool only proposes partners).
const POOL_KEY: &str = "gm1:{sh-any}:pool";

/// Shake held in Redis / Valkey. Share it behind an `Arc`.
#[derive(Debug)]
pub struct RedisShake {
    conn: Conn,
    cfg: ShakeConfig,
    clock: WallClock,
    /// This replica's name: its wake channel, and how shakes it waits on name it.
    replica: String,
    seq: AtomicU64,
    wakes: Arc<Wakes>,
    waiting: AtomicUsize,
    /// Notified whenever [`Self::waiting`] changes.
    changed: Notify,
    /// How long a reservation holds before anyone may settle it.
    hold: Duration,
    _listener: Listener,
}

/// Wall-clock milliseconds for the deadlines replicas share, read off the same monotonic
/// clock as the matcher's own timers (the in-memory matcher's too), so a shake's window
/// is one length whichever clock is asked.
#[derive(Debug, Clone, Copy)]
struct WallClock {
    base_ms: i64,
    base: Instant,
}

impl WallClock {
    fn now() -> Self {
        let base_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, ms);
        Self {
            base_ms,
            base: Instant::now(),
        }
    }

    fn now_ms(&self) -> i64 {
        self.base_ms + ms(self.base.elapsed())
    }
}

/// The shake a replica is pairing.
#[derive(Debug, Clone)]
struct Me {
    user: UserId,
    keys: Keys,
    listing: Listing,
    bucket: CellIndex,
    index: String,
    snapped: LatLng,
    max_distance_m: f64,
    excludes: Vec<UserId>,
    /// Whether it may join the ANYWHERE pool.
    anywhere: bool,
    /// This call's name (the replica's, and a number of its own), by which a step run
    /// again for the same call is told from another caller's.
    call: String,
}

/// What trying one candidate came to.
enum Tried {
    /// Paired with it, or found ourselves paired by someone else.
    Decided(Outcome),
    /// It is reserving another partner right now.
    Busy,
    /// It is no longer waiting (or we are not).
    Gone,
}

impl RedisShake {
    /// Connects to `target` (loading the functions) and subscribes to this replica's wake
    /// channel. Each store call is bounded by `timeout`.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be reached or holds incompatible data.
    pub async fn connect(
        target: &Target,
        cfg: ShakeConfig,
        timeout: Duration,
    ) -> std::result::Result<Self, StoreError> {
        let conn = Conn::open(target, timeout).await?;
        conn.prepare().await?;
        let replica = super::nearby::replica_name()?;
        let wakes = Arc::new(Wakes::default());
        let channel = channel(&replica);
        let listener = wake::listen(target, timeout, &channel, wakes.clone()).await?;
        Ok(Self {
            conn,
            cfg,
            clock: WallClock::now(),
            replica,
            seq: AtomicU64::new(0),
            wakes,
            waiting: AtomicUsize::new(0),
            changed: Notify::new(),
            hold: (timeout * 4).max(Duration::from_millis(500)),
            _listener: listener,
        })
    }

    /// The matcher's configuration.
    pub fn config(&self) -> &ShakeConfig {
        &self.cfg
    }

    /// Calls of this replica waiting for a partner right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Takes one Shake call from `user`'s token bucket in the store, shared by every
    /// replica.
    ///
    /// # Errors
    /// [`Error::RateLimited`] with the time to wait; [`Error::Unavailable`] when the store
    /// does not answer.
    pub async fn rate_limit(
        &self,
        user: &UserId,
        cfg: crate::guard::RateConfig,
        now_ms: i64,
    ) -> Result<()> {
        super::take_token(&self.conn, "Shake", user, cfg, now_ms).await
    }

    /// Resolves once exactly `n` calls of this replica wait (for tests and drain logic).
    pub async fn until_waiting(&self, n: usize) {
        crate::base::wait::until(&self.changed, || self.waiting() == n).await;
    }

    /// Shakes, as [`crate::shake::Matcher::shake`], with every other replica of the store.
    ///
    /// # Errors
    /// [`Error::DeadlineExceeded`] when the caller's own deadline passes first;
    /// [`Error::Unavailable`] when the store does not answer.
    pub async fn shake(self: &Arc<Self>, shake: ValidShake) -> Result<Outcome> {
        let req = shake.request();
        let started = Instant::now();
        let now = self.clock.now_ms();
        let window = self.cfg.window;
        let deadline = started + window;
        let cell = req.position.cell(self.cfg.privacy_resolution);
        let snapped = snapped(cell);
        let bucket = snapped.to_cell(self.cfg.bucket_resolution);
        let max_distance_m = shake.max_distance_m();
        let me = Me {
            keys: Keys::new(req.user.as_str(), req.shake_id.as_str()),
            listing: Listing {
                cell,
                // Radius rules cap distances far below u32::MAX metres.
                max_distance_m: max_distance_m.floor() as u32,
                seq: u64::try_from(now).unwrap_or(0) << 16
                    | (self.seq.fetch_add(1, Ordering::Relaxed) & 0xffff),
                shake_id: req.shake_id.as_str().to_owned(),
                user: req.user.as_str().to_owned(),
            },
            user: req.user.clone(),
            bucket,
            index: index_key(bucket),
            snapped,
            max_distance_m,
            excludes: req.exclude.clone(),
            anywhere: req.fallback == Fallback::Anywhere,
            call: format!(
                "{}.{}",
                self.replica,
                self.seq.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let wake = self.wakes.register(&me.keys.state);
        let entered = self.enter(&me, now, now + ms(window)).await?;
        let word = word(&entered).to_owned();
        if word == "done" {
            return outcome_of(&entered)?.ok_or_else(|| {
                Error::Unavailable("the store holds a malformed shake outcome".into())
            });
        }
        let creator = word == "new";
        if let Some(old) = Listing::decode(field(&entered, 3)).filter(|_| creator) {
            // The user's previous shake was superseded: wake whoever waits on it.
            self.unlist(&[(field(&entered, 2), field(&entered, 3))], true);
            self.wake_all(field(&entered, 1), &old.state());
        }
        let _waiting = Counted::new(&self.waiting, &self.changed);
        let mut guard = Leave {
            shake: self.clone(),
            keys: me.keys.clone(),
            call: me.call.clone(),
            task: creator.then(|| {
                let (this, me) = (self.clone(), me.clone());
                tokio::spawn(async move { this.drive(&me).await })
            }),
            armed: true,
        };
        let fallback =
            (creator && me.anywhere).then(|| deadline.checked_sub(window / 2).unwrap_or(deadline));
        let outcome = self
            .wait(&me, &wake, &mut guard, deadline, fallback, req.deadline)
            .await;
        match outcome {
            // The caller's deadline passed: stop waiting now (after the pairing task, so
            // nothing is claimed behind this answer), and report a claim that came first.
            Err(Error::DeadlineExceeded) => {
                guard.armed = false;
                if let Some(task) = guard.task.take() {
                    let _ = task.await;
                }
                match self.leave(&me.keys, &me.call).await? {
                    Some(Outcome::Matched(m)) => Ok(Outcome::Matched(m)),
                    _ => Err(Error::DeadlineExceeded),
                }
            }
            other => {
                // A shake with an outcome has nothing to withdraw.
                guard.armed = other.is_err();
                other
            }
        }
    }

    /// This call stops waiting on the shake (the last one withdraws it); its outcome if it
    /// has one.
    async fn leave(&self, keys: &Keys, call: &str) -> Result<Option<Outcome>> {
        let r = self
            .fcall(
                "gm_sh_leave",
                &[&keys.pointer, &keys.state],
                &[&keys.shake_id, call],
            )
            .await?;
        match word(&r) {
            "withdrawn" => {
                self.unlist(&[(field(&r, 1), field(&r, 2))], true);
                Ok(None)
            }
            "done" => outcome_of(&r),
            _ => Ok(None),
        }
    }

    async fn fcall(&self, name: &str, keys: &[&str], args: &[&str]) -> Result<Reply> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(name).arg(keys.len());
        for k in keys {
            cmd.arg(*k);
        }
        for a in args {
            cmd.arg(*a);
        }
        Ok(self.conn.query(&cmd).await?)
    }

    /// Starts or joins the shake; retries while the user's previous shake is reserving.
    async fn enter(&self, me: &Me, now: i64, dl: i64) -> Result<Reply> {
        let keep = ms(self.cfg.window + self.cfg.result_ttl) + 1_000;
        let excludes = encode_excludes(&me.excludes);
        let prefix = format!("gm1:sh:{{{}}}:s:", me.listing.user);
        let listing = me.listing.encode();
        let give_up = Instant::now() + self.hold * 2;
        let mut pause = Duration::from_millis(1);
        loop {
            let r = self
                .fcall(
                    "gm_sh_enter",
                    &[&me.keys.pointer, &me.keys.state],
                    &[
                        &me.listing.shake_id,
                        &now.to_string(),
                        &dl.to_string(),
                        &me.index,
                        &listing,
                        &excludes,
                        &self.replica,
                        &keep.to_string(),
                        &prefix,
                        &me.call,
                    ],
                )
                .await?;
            if word(&r) != "busy" {
                return Ok(r);
            }
            // The previous shake is mid-claim: its claimer finishes in a round trip or two,
            // or (if it died) its reservation runs out and is settled here.
            if Instant::now() >= give_up {
                return Err(Error::Unavailable(
                    "the previous shake of this user is still pairing".into(),
                ));
            }
            let current: Option<String> = self
                .conn
                .query(redis::cmd("GET").arg(&me.keys.pointer))
                .await?;
            if let Some(old) = current {
                self.settle(
                    &me.listing.user,
                    &Keys::new(&me.listing.user, &old).state,
                    false,
                )
                .await?;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Waits for the shake's outcome: woken by its replica's channel, rechecked when a
    /// pairing task ends, at the fallback point and at the deadline.
    async fn wait(
        self: &Arc<Self>,
        me: &Me,
        wake: &Waker,
        guard: &mut Leave,
        deadline: Instant,
        mut fallback: Option<Instant>,
        caller_deadline: Option<Instant>,
    ) -> Result<Outcome> {
        let caller_first = caller_deadline.filter(|d| *d < deadline);
        let first_end = caller_first.unwrap_or(deadline);
        loop {
            let notified = wake.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(task) = guard.task.as_mut() {
                tokio::select! {
                    biased;
                    joined = task => {
                        guard.task = None;
                        if let Ok(Ok(Some(o))) = joined {
                            return Ok(o);
                        }
                        continue;
                    }
                    // The pairing task goes on; the guard leaves only after it ends.
                    () = tokio::time::sleep_until(first_end) => {}
                }
            }
            if let Some(o) = self.read(&me.keys.state).await? {
                return Ok(o);
            }
            let at = Instant::now();
            if caller_first.is_some_and(|c| at >= c) {
                return Err(Error::DeadlineExceeded);
            }
            if at >= deadline {
                return self.expire(me).await;
            }
            if fallback.is_some_and(|h| at >= h) {
                fallback = None;
                let (this, me) = (self.clone(), me.clone());
                guard.task = Some(tokio::spawn(async move { this.fall_back(&me).await }));
                continue;
            }
            let next = [fallback, caller_first, Some(deadline)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(deadline);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// The shake's outcome, if decided.
    async fn read(&self, state: &str) -> Result<Option<Outcome>> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(state).arg(&["st", "p", "d", "mid", "t"][..]);
        let s: Reply = self.conn.query(&cmd).await?;
        let mut r: Reply = vec![Some("done".into())];
        r.extend(s);
        outcome_of(&r)
    }

    /// Ends a shake whose window has passed: NO_MATCH unless a claim came first.
    async fn expire(&self, me: &Me) -> Result<Outcome> {
        for _ in 0..8 {
            let r = self
                .fcall(
                    "gm_sh_expire",
                    &[&me.keys.state],
                    &[&self.clock.now_ms().to_string()],
                )
                .await?;
            match word(&r) {
                "done" => return Ok(outcome_of(&r)?.unwrap_or(Outcome::NoMatch)),
                "expired" => {
                    self.unlist(&[(field(&r, 1), field(&r, 2))], me.anywhere);
                    return Ok(Outcome::NoMatch);
                }
                "busy" => {
                    if let Some(o) = self.settle(&me.listing.user, &me.keys.state, false).await? {
                        return Ok(o);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                "gone" => return Ok(Outcome::NoMatch),
                // Another replica's clock is behind ours: a moment more.
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        Ok(Outcome::NoMatch)
    }
}

/// Counts a waiting call while it lives.
struct Counted<'a>(&'a AtomicUsize, &'a Notify);

impl<'a> Counted<'a> {
    fn new(n: &'a AtomicUsize, changed: &'a Notify) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        changed.notify_waiters();
        Self(n, changed)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        self.1.notify_waiters();
    }
}

/// A caller that leaves without an outcome (gone, or its deadline passed) stops waiting
/// on the shake; the last one withdraws it. Runs after the shake's pairing task (the
/// first scan, or the fallback) ends, so no protocol step is ever cut half way.
struct Leave {
    shake: Arc<RedisShake>,
    keys: Keys,
    /// The call that entered ([`Me::call`]).
    call: String,
    task: Option<JoinHandle<Result<Option<Outcome>>>>,
    armed: bool,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let shake = self.shake.clone();
        let (keys, call) = (self.keys.clone(), self.call.clone());
        let task = self.task.take();
        tokio::spawn(async move {
            if let Some(d) = task {
                let _ = d.await;
            }
            let _ = shake.leave(&keys, &call).await;
        });
    }
}
