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

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use h3o::{CellIndex, LatLng};
use redis::{
    PushKind,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
};
use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use super::{Conn, StoreError, Target, tag_of_coarse};
use crate::{
    error::{Error, Result},
    geo::{band_m, cell::RingCover, distance_key, distance_m, snapped},
    id::UserId,
    shake::{
        Fallback, Match, MatchId, Outcome, ShakeConfig, Tier, ValidShake, random_prefix,
        rule::{Shaker, compatible, preference},
    },
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
    prefix: u64,
    seq: AtomicU64,
    wakes: Arc<Wakes>,
    waiting: AtomicUsize,
    /// Notified whenever [`Self::waiting`] changes.
    changed: Notify,
    /// How long a reservation holds before anyone may settle it.
    hold: Duration,
    _subscription: Subscription,
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

/// The keys of one shake.
#[derive(Debug, Clone)]
struct Keys {
    pointer: String,
    state: String,
}

impl Keys {
    fn new(user: &str, shake_id: &str) -> Self {
        Self {
            pointer: format!("gm1:sh:{{{user}}}:p"),
            state: format!("gm1:sh:{{{user}}}:s:{shake_id}"),
        }
    }

    fn tombstone(state: &str, mid: &str) -> String {
        format!("{state}:a:{mid}")
    }
}

/// The waiting index of a bucket.
fn index_key(bucket: CellIndex) -> String {
    format!("gm1:{{{}}}:sw:{bucket}", tag_of_coarse(bucket))
}

/// A waiting shake as listed: what a newcomer needs to judge it before claiming it.
#[derive(Debug, Clone, PartialEq)]
struct Listing {
    cell: CellIndex,
    max_distance_m: u32,
    seq: u64,
    shake_id: String,
    user: String,
}

impl Listing {
    /// `<cell: 16 hex><max m: 8 hex><seq: 16 hex><id length: 2 hex><shake id><user>`.
    fn encode(&self) -> String {
        format!(
            "{:016x}{:08x}{:016x}{:02x}{}{}",
            u64::from(self.cell),
            self.max_distance_m,
            self.seq,
            self.shake_id.len(),
            self.shake_id,
            self.user
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let hex =
            |r: std::ops::Range<usize>| s.get(r).and_then(|h| u64::from_str_radix(h, 16).ok());
        let cell = CellIndex::try_from(hex(0..16)?).ok()?;
        let max_distance_m = u32::try_from(hex(16..24)?).ok()?;
        let seq = hex(24..40)?;
        let id_len = usize::try_from(hex(40..42)?).ok()?;
        let shake_id = s.get(42..42 + id_len)?.to_owned();
        let user = s.get(42 + id_len..)?.to_owned();
        Some(Self {
            cell,
            max_distance_m,
            seq,
            shake_id,
            user,
        })
    }

    fn state(&self) -> String {
        Keys::new(&self.user, &self.shake_id).state
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

/// A store reply: a status word and its fields.
type Reply = Vec<Option<String>>;

fn word(r: &Reply) -> &str {
    r.first().and_then(Option::as_deref).unwrap_or("")
}

fn field(r: &Reply, i: usize) -> &str {
    r.get(i).and_then(Option::as_deref).unwrap_or("")
}

/// The outcome in a `{'done', st, p, d, mid, t}` reply (fields from 1).
fn outcome_of(r: &Reply) -> Result<Option<Outcome>> {
    match field(r, 1) {
        "N" => Ok(Some(Outcome::NoMatch)),
        "M" => matched(field(r, 2), field(r, 3), field(r, 4), field(r, 5)).map(Some),
        _ => Ok(None),
    }
}

fn matched(partner: &str, band: &str, mid: &str, tier: &str) -> Result<Outcome> {
    let corrupt = || Error::Unavailable("the store holds a malformed shake outcome".into());
    Ok(Outcome::Matched(Match {
        partner: UserId::new("partner_user_id", partner).map_err(|_| corrupt())?,
        distance_m: band.parse().map_err(|_| corrupt())?,
        match_id: MatchId::from_hex(mid).ok_or_else(corrupt)?,
        tier: if tier == "a" {
            Tier::Anywhere
        } else {
            Tier::Nearby
        },
    }))
}

fn tier_code(tier: Tier) -> &'static str {
    match tier {
        Tier::Nearby => "n",
        Tier::Anywhere => "a",
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
        let subscription = Subscription::open(target, timeout, &channel, wakes.clone()).await?;
        Ok(Self {
            conn,
            cfg,
            clock: WallClock::now(),
            replica,
            prefix: random_prefix(),
            seq: AtomicU64::new(0),
            wakes,
            waiting: AtomicUsize::new(0),
            changed: Notify::new(),
            hold: (timeout * 4).max(Duration::from_millis(500)),
            _subscription: subscription,
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
            self.after_withdrawn(field(&entered, 2), field(&entered, 3));
            self.wake_all(field(&entered, 1), &old.state());
        }
        let _waiting = Counted::new(&self.waiting, &self.changed);
        let mut guard = Leave {
            shake: self.clone(),
            keys: me.keys.clone(),
            task: creator.then(|| {
                let (this, me) = (self.clone(), me.clone());
                tokio::spawn(async move { this.drive(&me).await })
            }),
            armed: true,
        };
        let fallback = (creator && req.fallback == Fallback::Anywhere)
            .then(|| deadline.checked_sub(window / 2).unwrap_or(deadline));
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
                match self.leave(&me.keys).await? {
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
    async fn leave(&self, keys: &Keys) -> Result<Option<Outcome>> {
        let id = keys.state.rsplit_once(":s:").map_or("", |(_, id)| id);
        let r = self
            .fcall("gm_sh_leave", &[&keys.pointer, &keys.state], &[id])
            .await?;
        match word(&r) {
            "withdrawn" => {
                self.after_withdrawn(field(&r, 1), field(&r, 2));
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
                self.settle(&Keys::new(&me.listing.user, &old).state, false)
                    .await?;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Finds a partner for a new shake: lists it, scans every bucket its disk touches,
    /// and tries the candidates best first.
    async fn drive(&self, me: &Me) -> Result<Option<Outcome>> {
        let cells =
            RingCover::cells_within(me.snapped, self.cfg.bucket_resolution, me.max_distance_m);
        // Keys grouped by tag, the caller's own tag first (listing and scanning there is
        // one step).
        let mut tags: Vec<(String, Vec<String>)> =
            vec![(tag_of_coarse(me.bucket), vec![me.index.clone()])];
        for (cell, _) in cells {
            let key = index_key(cell);
            if key == me.index {
                continue;
            }
            let tag = tag_of_coarse(cell);
            match tags.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, keys)) => keys.push(key),
                None => tags.push((tag, vec![key])),
            }
        }
        for pass in 0..PASSES {
            let listed = self.scan(me, &tags, pass == 0).await?;
            let mut candidates: Vec<(Listing, f64)> = listed
                .into_iter()
                .filter_map(|l| {
                    let d = distance_m(me.snapped, snapped(l.cell));
                    self.judge(me, &l, d, false).then_some((l, d))
                })
                .collect();
            candidates.sort_by_key(|(l, d)| preference(distance_key(*d), l.seq));
            match self.try_all(me, &candidates, Tier::Nearby).await? {
                (Some(o), _) => return Ok(Some(o)),
                (None, false) => return Ok(None),
                (None, true) => tokio::time::sleep(Duration::from_millis(1 << pass)).await,
            }
        }
        Ok(None)
    }

    /// Joins the ANYWHERE pool and tries its shakes, nearest first.
    async fn fall_back(&self, me: &Me) -> Result<Option<Outcome>> {
        let keep = ms(self.cfg.window) + 1_000;
        let dl = self.clock.now_ms() + ms(self.cfg.window / 2);
        for pass in 0..PASSES {
            let now = self.clock.now_ms();
            let listed: Vec<String> = {
                let add = if pass == 0 { "1" } else { "0" };
                let mut cmd = redis::cmd("FCALL");
                cmd.arg("gm_sh_scan")
                    .arg(1)
                    .arg(POOL_KEY)
                    .arg(now)
                    .arg(add)
                    .arg(me.listing.encode())
                    .arg(dl)
                    .arg(keep);
                self.conn.query(&cmd).await?
            };
            let mut candidates: Vec<(Listing, f64)> = listed
                .iter()
                .filter_map(|s| Listing::decode(s))
                .filter_map(|l| {
                    let d = distance_m(me.snapped, snapped(l.cell));
                    self.judge(me, &l, d, true).then_some((l, d))
                })
                .collect();
            candidates.sort_by_key(|(l, d)| preference(distance_key(*d), l.seq));
            match self.try_all(me, &candidates, Tier::Anywhere).await? {
                (Some(o), _) => return Ok(Some(o)),
                (None, false) => return Ok(None),
                (None, true) => tokio::time::sleep(Duration::from_millis(1 << pass)).await,
            }
        }
        Ok(None)
    }

    /// Whether `them` may pair with `me` as far as the listing tells (their exclusions
    /// are checked by the claim itself).
    fn judge(&self, me: &Me, them: &Listing, d: f64, anywhere: bool) -> bool {
        let Ok(their_user) = UserId::new("user_id", &them.user) else {
            return false;
        };
        let mine = Shaker {
            user: &me.user,
            max_distance_m: me.max_distance_m,
            excludes: &me.excludes,
        };
        let theirs = Shaker {
            user: &their_user,
            max_distance_m: f64::from(them.max_distance_m),
            excludes: &[],
        };
        if anywhere {
            compatible(&mine.anywhere(), &theirs.anywhere(), d)
        } else {
            compatible(&mine, &theirs, d)
        }
    }

    /// Lists the shake (first pass) and reads every bucket of the disk.
    async fn scan(
        &self,
        me: &Me,
        tags: &[(String, Vec<String>)],
        list: bool,
    ) -> Result<Vec<Listing>> {
        let now = self.clock.now_ms();
        let keep = ms(self.cfg.window) + 1_000;
        let dl = now + ms(self.cfg.window);
        let listing = me.listing.encode();
        let call = |keys: &[String], add: bool| {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("gm_sh_scan").arg(keys.len());
            for k in keys {
                cmd.arg(k);
            }
            cmd.arg(now)
                .arg(if add { "1" } else { "0" })
                .arg(&listing)
                .arg(dl)
                .arg(keep);
            cmd
        };
        // The own tag first and alone: the other tags are read only after the shake is
        // listed, which is what makes simultaneous shakes see each other.
        let Some(((_, home), others)) = tags.split_first() else {
            return Ok(Vec::new());
        };
        let mut out: Vec<String> = self.conn.query(&call(home, list)).await?;
        for (_, keys) in others {
            out.extend(self.conn.query::<Vec<String>>(&call(keys, false)).await?);
        }
        Ok(out
            .iter()
            .filter_map(|s| Listing::decode(s))
            .filter(|l| l.user != me.listing.user)
            .collect())
    }

    /// Tries `candidates` in order: the outcome once one pairs (or someone paired us), and
    /// whether any was busy.
    async fn try_all(
        &self,
        me: &Me,
        candidates: &[(Listing, f64)],
        tier: Tier,
    ) -> Result<(Option<Outcome>, bool)> {
        let mut busy = false;
        for (them, d) in candidates {
            match self.pair(me, them, *d, tier).await? {
                Tried::Decided(o) => return Ok((Some(o), busy)),
                Tried::Busy => busy = true,
                Tried::Gone => {}
            }
        }
        Ok((None, busy))
    }

    /// Reserve ourselves, claim `them`, commit (or revert).
    async fn pair(&self, me: &Me, them: &Listing, d: f64, tier: Tier) -> Result<Tried> {
        let mid = MatchId::new(self.prefix, self.seq.fetch_add(1, Ordering::Relaxed)).to_string();
        let band = band_m(d).to_string();
        let tier = tier_code(tier);
        let now = self.clock.now_ms();
        let their_state = them.state();
        let reserved = self
            .fcall(
                "gm_sh_reserve",
                &[&me.keys.state],
                &[
                    &them.user,
                    &their_state,
                    &mid,
                    &band,
                    tier,
                    &(now + ms(self.hold)).to_string(),
                    &now.to_string(),
                ],
            )
            .await?;
        match word(&reserved) {
            "ok" => {}
            "done" => {
                return Ok(outcome_of(&reserved)?.map_or(Tried::Gone, Tried::Decided));
            }
            // Our own window has passed, or we were withdrawn: stop trying.
            _ => return Ok(Tried::Gone),
        }
        let tombstone = Keys::tombstone(&their_state, &mid);
        let claimed = self
            .fcall(
                "gm_sh_claim",
                &[&their_state, &tombstone],
                &[&me.listing.user, &mid, &band, tier, &now.to_string()],
            )
            .await;
        let claimed = match claimed {
            Ok(c) => c,
            // The claim may or may not have landed: settle it for certain.
            Err(_) => {
                return Ok(self
                    .settle(&me.keys.state, true)
                    .await?
                    .map_or(Tried::Gone, Tried::Decided));
            }
        };
        match word(&claimed) {
            "ok" => {
                let (mid, band, tier) =
                    (field(&claimed, 1), field(&claimed, 2), field(&claimed, 3));
                let committed = self
                    .fcall(
                        "gm_sh_commit",
                        &[&me.keys.state],
                        &[&them.user, mid, band, tier],
                    )
                    .await?;
                if word(&committed) != "ok" {
                    return Err(Error::Unavailable(format!(
                        "a claimed shake could not be committed ({})",
                        field(&committed, 1)
                    )));
                }
                self.wake_all(field(&claimed, 4), &their_state);
                // Retries of our own shake waiting through other replicas.
                self.wake_others(field(&committed, 1), &me.keys.state);
                self.after_withdrawn(
                    &index_key_of(them, self.cfg.bucket_resolution),
                    &them.encode(),
                );
                self.after_withdrawn(&me.index, &me.listing.encode());
                Ok(Tried::Decided(matched(&them.user, band, mid, tier)?))
            }
            other => {
                let busy = other == "busy";
                let reverted = self.fcall("gm_sh_revert", &[&me.keys.state], &[]).await?;
                if word(&reverted) == "done" {
                    return Ok(outcome_of(&reverted)?.map_or(Tried::Gone, Tried::Decided));
                }
                Ok(if busy { Tried::Busy } else { Tried::Gone })
            }
        }
    }

    /// Settles a reservation on `state` (once it has run out, unless `now`): asks its
    /// partner whether the claim landed, then commits or reverts. The outcome when the
    /// shake has one.
    async fn settle(&self, state: &str, now: bool) -> Result<Option<Outcome>> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(state)
            .arg(&["st", "ri", "rk", "rm", "rx", "p", "d", "mid", "t"][..]);
        let s: Reply = self.conn.query(&cmd).await?;
        match field(&s, 0) {
            "M" => {
                return matched(field(&s, 5), field(&s, 6), field(&s, 7), field(&s, 8)).map(Some);
            }
            "N" => return Ok(Some(Outcome::NoMatch)),
            "R" => {}
            _ => return Ok(None),
        }
        let expired = field(&s, 4)
            .parse::<i64>()
            .is_ok_and(|rx| rx <= self.clock.now_ms());
        if !now && !expired {
            return Ok(None);
        }
        let (partner, their_state, mid) = (field(&s, 1), field(&s, 2), field(&s, 3));
        let keep = ms(self.cfg.window + self.cfg.result_ttl) + 1_000;
        let tombstone = Keys::tombstone(their_state, mid);
        let user = state
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once("}:s:"))
            .map_or("", |(u, _)| u);
        let aborted = self
            .fcall(
                "gm_sh_abort",
                &[their_state, &tombstone],
                &[user, &keep.to_string()],
            )
            .await?;
        if word(&aborted) == "claimed" {
            let (mid, band, tier) = (field(&aborted, 1), field(&aborted, 2), field(&aborted, 3));
            let committed = self
                .fcall("gm_sh_commit", &[state], &[partner, mid, band, tier])
                .await?;
            if word(&committed) == "ok" {
                self.wake_all(field(&committed, 1), state);
                return matched(partner, band, mid, tier).map(Some);
            }
            return Ok(None);
        }
        let reverted = self.fcall("gm_sh_revert", &[state], &[]).await?;
        outcome_of(&reverted)
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
                    self.after_withdrawn(field(&r, 1), field(&r, 2));
                    return Ok(Outcome::NoMatch);
                }
                "busy" => {
                    if let Some(o) = self.settle(&me.keys.state, false).await? {
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

    /// Drops a withdrawn or matched shake's listings (best effort: listings only help
    /// others find a shake, and a stale one is skipped at its claim).
    fn after_withdrawn(&self, index: &str, listing: &str) {
        if index.is_empty() || listing.is_empty() {
            return;
        }
        let conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM").arg(index).arg(listing).ignore();
        let mut pool = redis::pipe();
        pool.cmd("ZREM").arg(POOL_KEY).arg(listing).ignore();
        tokio::spawn(async move {
            let _ = conn.pipe::<()>(&pipe).await;
            let _ = conn.pipe::<()>(&pool).await;
        });
    }

    /// Wakes the replicas (space-separated) waiting on `state`, but for this one.
    fn wake_others(&self, replicas: &str, state: &str) {
        let others: Vec<&str> = replicas
            .split(' ')
            .filter(|r| !r.is_empty() && *r != self.replica)
            .collect();
        self.wake_all(&others.join(" "), state);
    }

    /// Wakes the replicas (space-separated) waiting on `state`.
    fn wake_all(&self, replicas: &str, state: &str) {
        let conn = self.conn.clone();
        let publish = if conn.clustered() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let cmds: Vec<redis::Cmd> = replicas
            .split(' ')
            .filter(|r| !r.is_empty())
            .map(|r| redis::cmd(publish).arg(channel(r)).arg(state).clone())
            .collect();
        if cmds.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for cmd in cmds {
                let _ = conn.query::<i64>(&cmd).await;
            }
        });
    }
}

fn index_key_of(l: &Listing, bucket_resolution: h3o::Resolution) -> String {
    index_key(snapped(l.cell).to_cell(bucket_resolution))
}

fn encode_excludes(ids: &[UserId]) -> String {
    let mut out = String::new();
    for id in ids {
        let s = id.as_str();
        // Ids are at most MAX_ID_BYTES (128) long: one length byte, below 0x80, is ASCII.
        out.push(char::from(u8::try_from(s.len()).unwrap_or(0)));
        out.push_str(s);
    }
    out
}

/// A replica's wake channel (a sharded channel in a Cluster).
fn channel(replica: &str) -> String {
    format!("gm1:w:{{{replica}}}")
}

/// The calls of this replica waiting on each shake state, woken by its channel.
#[derive(Debug, Default)]
struct Wakes {
    map: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
}

/// One call's registration in [`Wakes`].
#[derive(Debug)]
struct Waker {
    wakes: Arc<Wakes>,
    state: String,
    notify: Arc<Notify>,
}

impl Wakes {
    fn register(self: &Arc<Self>, state: &str) -> Waker {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map
            .entry(state.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Waker {
            wakes: self.clone(),
            state: state.to_owned(),
            notify: entry.0.clone(),
        }
    }

    fn wake(&self, state: &str) {
        let map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((n, _)) = map.get(state) {
            n.notify_waiters();
        }
    }

    /// After a reconnect messages may have been lost: every call reads its state again.
    fn wake_everyone(&self) {
        let map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (n, _) in map.values() {
            n.notify_waiters();
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        let mut map = self
            .wakes
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&self.state) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.state);
            }
        }
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
    task: Option<JoinHandle<Result<Option<Outcome>>>>,
    armed: bool,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let shake = self.shake.clone();
        let keys = self.keys.clone();
        let task = self.task.take();
        tokio::spawn(async move {
            if let Some(d) = task {
                let _ = d.await;
            }
            let _ = shake.leave(&keys).await;
        });
    }
}

/// This replica's subscription to its wake channel, on a connection of its own (RESP3,
/// resubscribed by the client after a reconnect).
struct Subscription {
    task: JoinHandle<()>,
    _link: SubLink,
}

#[allow(dead_code)]
enum SubLink {
    Server(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription")
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    async fn open(
        target: &Target,
        timeout: Duration,
        channel: &str,
        wakes: Arc<Wakes>,
    ) -> std::result::Result<Self, StoreError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
        let fail = |e: redis::RedisError| StoreError::Unreachable(format!("subscribing: {e}"));
        let made = async {
            match target {
                Target::Server(url) => {
                    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                        .map_err(fail)?;
                    let settings = info
                        .redis_settings()
                        .clone()
                        .set_protocol(redis::ProtocolVersion::RESP3);
                    let client =
                        redis::Client::open(info.set_redis_settings(settings)).map_err(fail)?;
                    let config = ConnectionManagerConfig::new()
                        .set_number_of_retries(2)
                        .set_min_delay(Duration::from_millis(10))
                        .set_max_delay(Duration::from_millis(200))
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout))
                        .set_push_sender(tx)
                        .set_automatic_resubscription();
                    let mut c = ConnectionManager::new_with_config(client, config)
                        .await
                        .map_err(fail)?;
                    c.subscribe(channel).await.map_err(fail)?;
                    Ok::<_, StoreError>(SubLink::Server(c))
                }
                Target::Cluster(nodes) => {
                    let urls: Vec<String> = nodes.iter().map(|n| format!("redis://{n}")).collect();
                    let client = ClusterClient::builder(urls)
                        .retries(2)
                        .min_retry_wait(10)
                        .max_retry_wait(100)
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .use_protocol(redis::ProtocolVersion::RESP3)
                        .push_sender(tx)
                        .build()
                        .map_err(fail)?;
                    let mut c = client.get_async_connection().await.map_err(fail)?;
                    c.ssubscribe(channel).await.map_err(fail)?;
                    Ok(SubLink::Cluster(c))
                }
            }
        };
        let link = tokio::time::timeout(timeout, made).await.map_err(|_| {
            StoreError::Unreachable(format!("no subscription within {timeout:?}"))
        })??;
        let task = tokio::spawn(async move {
            while let Some(push) = rx.recv().await {
                match push.kind {
                    PushKind::Message | PushKind::SMessage => {
                        if let Some(redis::Value::BulkString(b)) = push.data.get(1)
                            && let Ok(state) = std::str::from_utf8(b)
                        {
                            wakes.wake(state);
                        }
                    }
                    // Messages may have been lost while the link was down.
                    PushKind::Disconnection | PushKind::Subscribe | PushKind::SSubscribe => {
                        wakes.wake_everyone();
                    }
                    _ => {}
                }
            }
        });
        Ok(Self { task, _link: link })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_read_back() {
        let cell = crate::geo::Coordinates::new("p", 31.23, 121.47)
            .unwrap()
            .cell(h3o::Resolution::Nine);
        for (id, user) in [("s1", "alice"), ("", "b"), ("ü|x", "名字:{x}")] {
            let l = Listing {
                cell,
                max_distance_m: 5_000,
                seq: 123_456_789,
                shake_id: id.into(),
                user: user.into(),
            };
            assert_eq!(Listing::decode(&l.encode()), Some(l));
        }
        assert_eq!(Listing::decode("zz"), None);
    }

    #[test]
    fn outcomes_read_back() {
        let mid = MatchId::new(7, 9).to_string();
        let r: Reply = ["done", "M", "bob", "200", mid.as_str(), "a"]
            .into_iter()
            .map(|s| Some(s.to_owned()))
            .collect();
        let Some(Outcome::Matched(m)) = outcome_of(&r).unwrap() else {
            panic!("not a match");
        };
        assert_eq!(
            (m.partner.as_str(), m.distance_m, m.tier),
            ("bob", 200, Tier::Anywhere)
        );
        assert_eq!(m.match_id, MatchId::new(7, 9));
        let none: Reply = vec![Some("done".into()), Some("N".into())];
        assert_eq!(outcome_of(&none).unwrap(), Some(Outcome::NoMatch));
        let bad: Reply = ["done", "M", "bob", "x", "y", "n"]
            .into_iter()
            .map(|s| Some(s.to_owned()))
            .collect();
        assert!(outcome_of(&bad).is_err());
    }
}
