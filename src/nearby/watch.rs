//! WatchNearby: live ENTER / LEAVE events for the users around a watcher.
//!
//! Each watch keeps the set of users it has reported inside. It is registered under every
//! cell its leave radius may touch (resolution 8 for watches up to 2 km across, 6 for
//! wider ones), so an index change reaches only the watches whose area covers the user's
//! old or new privacy cell: ten thousand watches elsewhere cost an update two map lookups.
//! Each watch also publishes its centre in one atomic word, so the watches registered
//! around a change are filtered by distance without taking their locks; only those the
//! change can concern are locked.
//!
//! Events are decided from state, under the watch's own lock: "inside and still within the
//! leave radius: nothing; inside and now beyond it, cleared, expired or invisible: LEAVE;
//! outside and now within the radius: ENTER". The initial scan runs under the same lock
//! after the watch is registered, so a change racing the scan is applied after it and
//! nothing is missed or reported twice.
//!
//! Lock order: a `users` shard (held by index writers), then a watch's state, then the
//! area map. Notifiers collect the watches from the area map and release it before taking
//! any state lock.

use std::{
    collections::HashSet,
    hash::BuildHasher,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use h3o::{CellIndex, LatLng, Resolution};
use hashbrown::{DefaultHashBuilder, HashMap};
use tokio::sync::{Notify, mpsc};

use super::{
    Found, Gender,
    bucket::Member,
    maps::{Shards, cell_shard},
};
use crate::{
    geo::cell::{Centres, RingCover, max_circumradius_m},
    geo::{band_m, distance_m},
    id::UserId,
};

/// Area-index resolution of watches whose leave radius is at most [`FINE_AREA_MAX_M`]
/// (average edge 530 m: a 1 km watch registers in about 25 cells).
const FINE_AREA: Resolution = Resolution::Eight;
/// Area-index resolution of wider watches (average edge 3.7 km: a 10 km watch registers
/// in about 40 cells).
const WIDE_AREA: Resolution = Resolution::Six;
const FINE_AREA_MAX_M: f64 = 2_000.0;
/// The area cell of tier `res` a privacy cell files its changes under: its H3 ancestor
/// (a few bit operations), or, for privacy cells coarser than `res`, the cell holding its
/// centre. An ancestor's centre lies within two circumradii of any descendant's centre
/// (checked in the tests), so watches register with one circumradius of slack.
pub(super) fn area_of(cell: CellIndex, res: Resolution) -> CellIndex {
    cell.parent(res)
        .unwrap_or_else(|| LatLng::from(cell).to_cell(res))
}

/// Slack on the lock-free distance pre-filter, covering the f32 rounding of the
/// published centre (under a metre) many times over.
const PREFILTER_SLACK_M: f64 = 10.0;

/// Limits of the watches.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Events a stream may have queued; one more ends it.
    pub buffer: usize,
    /// Hysteresis as a fraction of the radius: a user leaves only beyond
    /// `radius × (1 + fraction)` (or one privacy cell, if that is more).
    pub hysteresis: f64,
    /// Watches open at once; more are refused.
    pub max_watches: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            buffer: 1_024,
            hysteresis: 0.1,
            max_watches: 65_536,
        }
    }
}

/// One event of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A user came within the radius (or was within it when the watch started).
    Enter(Found),
    /// A user went beyond the leave radius, cleared their location, expired or turned
    /// invisible. `distance_m` is their banded distance when they moved out, else 0.
    Leave(Found),
    /// The initial ENTER events are all sent.
    SnapshotEnd,
}

/// Why a watch stream ended before its caller closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchEnd {
    /// The consumer fell behind by more than the buffer.
    #[error("the stream fell more than {0} events behind; reconnect to start afresh")]
    Overflow(usize),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    Closing,
}

const LIVE: u8 = 0;
const OVERFLOW: u8 = 1;
const CLOSING: u8 = 2;

#[derive(Debug)]
pub(super) struct Watcher {
    user: UserId,
    radius_m: f64,
    leave_m: f64,
    gender: Gender,
    area_resolution: Resolution,
    /// The centre as two f32s, for the lock-free pre-filter; set before each re-scan.
    centre_bits: AtomicU64,
    end: AtomicU8,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    centre: LatLng,
    area: Vec<CellIndex>,
    /// The users reported inside, each with what the watch last saw of them.
    inside: HashMap<UserId, Seen>,
    tx: Option<mpsc::Sender<WatchEvent>>,
}

impl Watcher {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ended(&self) -> Option<WatchEnd> {
        match self.end.load(Ordering::Acquire) {
            OVERFLOW => Some(WatchEnd::Overflow(0)),
            CLOSING => Some(WatchEnd::Closing),
            _ => None,
        }
    }

    fn publish_centre(&self, c: LatLng) {
        let bits =
            (u64::from((c.lat() as f32).to_bits()) << 32) | u64::from((c.lng() as f32).to_bits());
        self.centre_bits.store(bits, Ordering::Release);
    }

    /// Whether a change from `old` to `new` may concern this watch: the new cell is within
    /// the radius, or the old one within the leave radius (where every user it reported
    /// inside is). Conservative: never false for a change that matters.
    fn may_care(&self, old: Option<LatLng>, new: Option<LatLng>) -> bool {
        let bits = self.centre_bits.load(Ordering::Acquire);
        let lat = f64::from(f32::from_bits((bits >> 32) as u32));
        let lng = f64::from(f32::from_bits(bits as u32));
        let Ok(c) = LatLng::new(lat, lng) else {
            return true;
        };
        new.is_some_and(|n| distance_m(c, n) <= self.radius_m + PREFILTER_SLACK_M)
            || old.is_some_and(|o| distance_m(c, o) <= self.leave_m + PREFILTER_SLACK_M)
    }

    fn admits(&self, m: &Member<'_>) -> bool {
        m.visible && (self.gender == Gender::Unspecified || m.gender == self.gender)
    }
}

impl State {
    /// Queues `event`; a full queue ends the watch (the consumer is too slow).
    fn send(&mut self, w: &Watcher, event: WatchEvent) {
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                w.end.store(OVERFLOW, Ordering::Release);
                self.tx = None;
                self.inside = HashMap::new();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.tx = None,
        }
    }
}

/// A change of one user in the index, as watches see it.
#[derive(Debug)]
pub(super) struct Change<'a> {
    /// The user.
    pub(super) user: &'a [u8],
    /// Their privacy cell before the change, if any.
    pub(super) old: Option<CellIndex>,
    /// Their cell and member after it; `None` when they were removed.
    pub(super) new: Option<(CellIndex, &'a Member<'a>)>,
}

/// Every open watch, indexed by area and by watcher.
#[derive(Debug)]
pub(super) struct Watchers {
    cfg: WatchConfig,
    /// Extra leave distance of at least one privacy cell's width.
    min_hysteresis_m: f64,
    live: AtomicUsize,
    /// Open watches per area tier: a change skips a tier with none.
    fine: AtomicUsize,
    wide: AtomicUsize,
    changed: Notify,
    by_area: Shards<HashMap<CellIndex, Vec<Arc<Watcher>>>>,
    by_user: Shards<HashMap<UserId, Vec<Arc<Watcher>>>>,
    hasher: DefaultHashBuilder,
}

impl Watchers {
    pub(super) fn new(cfg: WatchConfig, privacy_resolution: Resolution) -> Self {
        Self {
            cfg,
            // A hexagon is sqrt(3) edges wide: a snapped position hops by about that much.
            min_hysteresis_m: privacy_resolution.edge_length_m() * 3f64.sqrt(),
            live: AtomicUsize::new(0),
            fine: AtomicUsize::new(0),
            wide: AtomicUsize::new(0),
            changed: Notify::new(),
            by_area: Shards::default(),
            by_user: Shards::default(),
            hasher: DefaultHashBuilder::default(),
        }
    }

    /// Watches open now.
    pub(super) fn len(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Resolves once exactly `n` watches are open.
    pub(super) async fn until_len(&self, n: usize) {
        crate::base::wait::until(&self.changed, || self.len() == n).await;
    }

    fn tier(&self, w: &Watcher) -> &AtomicUsize {
        if w.area_resolution == FINE_AREA {
            &self.fine
        } else {
            &self.wide
        }
    }

    fn user_shard(&self, user: &str) -> usize {
        self.by_user.of(self.hasher.hash_one(user))
    }

    /// The leave radius of a watch of `radius_m`.
    pub(super) fn leave_radius_m(&self, radius_m: f64) -> f64 {
        radius_m + (radius_m * self.cfg.hysteresis).max(self.min_hysteresis_m)
    }

    /// Opens a watch centred on `centre`: registers it, runs `scan` (everyone it should
    /// start with) under its lock and queues ENTER for each, then SNAPSHOT_END.
    /// `None` when [`WatchConfig::max_watches`] are open.
    pub(super) fn open(
        self: &Arc<Self>,
        user: UserId,
        radius_m: f64,
        gender: Gender,
        centre: LatLng,
        scan: impl FnOnce(&Watcher, LatLng) -> Vec<Found>,
    ) -> Option<Watch> {
        let reserved = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cfg.max_watches).then_some(n + 1)
            });
        if reserved.is_err() {
            return None;
        }
        let leave_m = self.leave_radius_m(radius_m);
        let w = Arc::new(Watcher {
            user: user.clone(),
            radius_m,
            leave_m,
            gender,
            area_resolution: if leave_m <= FINE_AREA_MAX_M {
                FINE_AREA
            } else {
                WIDE_AREA
            },
            centre_bits: AtomicU64::new(0),
            end: AtomicU8::new(LIVE),
            state: Mutex::new(State {
                centre,
                area: Vec::new(),
                inside: HashMap::new(),
                tx: None,
            }),
        });
        self.tier(&w).fetch_add(1, Ordering::AcqRel);
        let rx = {
            let mut st = w.state();
            self.by_user
                .write(self.user_shard(user.as_str()))
                .entry(user)
                .or_default()
                .push(w.clone());
            self.move_area(&w, &mut st, centre);
            let start = scan(&w, centre);
            // Room for the whole initial set as well as the live buffer.
            let (tx, rx) = mpsc::channel(start.len() + 1 + self.cfg.buffer);
            st.tx = Some(tx);
            for f in start {
                st.inside.insert(f.user.clone(), Seen::of(&f));
                st.send(&w, WatchEvent::Enter(f));
            }
            st.send(&w, WatchEvent::SnapshotEnd);
            rx
        };
        self.changed.notify_waiters();
        Some(Watch {
            rx,
            watcher: w,
            registry: self.clone(),
            buffer: self.cfg.buffer,
            finished: false,
        })
    }

    /// Registers `w` under the area cells of a leave disk around `centre` (and no others).
    fn move_area(&self, w: &Arc<Watcher>, st: &mut State, centre: LatLng) {
        w.publish_centre(centre);
        let res = w.area_resolution;
        let reach = w.leave_m + max_circumradius_m(res);
        let mut area: Vec<CellIndex> =
            RingCover::cells_within(centre, res, reach, Centres::Remembered)
                .into_iter()
                .map(|(c, _)| c)
                .collect();
        area.sort_unstable();
        for &c in st.area.iter().filter(|c| area.binary_search(c).is_err()) {
            let mut map = self.by_area.write(cell_shard(c));
            if let Some(list) = map.get_mut(&c) {
                list.retain(|x| !Arc::ptr_eq(x, w));
                if list.is_empty() {
                    map.remove(&c);
                }
            }
        }
        for &c in area.iter().filter(|c| st.area.binary_search(c).is_err()) {
            self.by_area
                .write(cell_shard(c))
                .entry(c)
                .or_default()
                .push(w.clone());
        }
        st.centre = centre;
        st.area = area;
    }

    /// Closes `w` and forgets it.
    fn close(&self, w: &Arc<Watcher>) {
        let mut st = w.state();
        st.tx = None;
        let area = std::mem::take(&mut st.area);
        for c in area {
            let mut map = self.by_area.write(cell_shard(c));
            if let Some(list) = map.get_mut(&c) {
                list.retain(|x| !Arc::ptr_eq(x, w));
                if list.is_empty() {
                    map.remove(&c);
                }
            }
        }
        st.inside = HashMap::new();
        drop(st);
        let mut users = self.by_user.write(self.user_shard(w.user.as_str()));
        if let Some(list) = users.get_mut(w.user.as_str()) {
            let before = list.len();
            list.retain(|x| !Arc::ptr_eq(x, w));
            let removed = before - list.len();
            if list.is_empty() {
                users.remove(w.user.as_str());
            }
            if removed > 0 {
                self.live.fetch_sub(removed, Ordering::AcqRel);
                self.tier(w).fetch_sub(removed, Ordering::AcqRel);
            }
        }
        drop(users);
        self.changed.notify_waiters();
    }

    /// Ends every watch (server shutdown): each stream reports [`WatchEnd::Closing`].
    pub(super) fn close_all(&self) {
        let mut all = Vec::new();
        for shard in 0..self.by_user.len() {
            for list in self.by_user.read(shard).values() {
                all.extend(list.iter().cloned());
            }
        }
        for w in all {
            w.end.store(CLOSING, Ordering::Release);
            w.state().tx = None;
        }
    }

    /// Tells the watches around a change of another user about it.
    pub(super) fn changed(&self, ch: &Change<'_>) {
        if self.len() == 0 {
            return;
        }
        let Ok(user) = std::str::from_utf8(ch.user) else {
            return;
        };
        // Cell centres are computed only once some watch is registered around the change.
        let mut centres: Option<(Option<LatLng>, Option<LatLng>)> = None;
        let mut around: Vec<Arc<Watcher>> = Vec::new();
        let cells = ch.old.into_iter().chain(ch.new.map(|(c, _)| c));
        for cell in cells {
            for (res, count) in [(FINE_AREA, &self.fine), (WIDE_AREA, &self.wide)] {
                if count.load(Ordering::Acquire) == 0 {
                    continue;
                }
                let area = area_of(cell, res);
                if let Some(list) = self.by_area.read(cell_shard(area)).get(&area) {
                    let (old, new) = *centres.get_or_insert_with(|| {
                        (
                            ch.old.map(LatLng::from),
                            ch.new.map(|(c, _)| LatLng::from(c)),
                        )
                    });
                    around.extend(
                        list.iter()
                            .filter(|w| w.may_care(old, new) && w.user.as_str() != user)
                            .cloned(),
                    );
                }
            }
        }
        let new_centre = centres.and_then(|(_, new)| new);
        around.sort_unstable_by_key(Arc::as_ptr);
        around.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for w in around {
            let mut st = w.state();
            if st.tx.is_none() {
                continue;
            }
            let now = ch
                .new
                .zip(new_centre)
                .filter(|((_, m), _)| w.admits(m))
                .map(|((cell, m), p)| (distance_m(st.centre, p), cell, m));
            let inside = st.inside.contains_key(user);
            match now {
                Some((d, cell, m)) if !inside && d <= w.radius_m => {
                    let id = UserId::trusted(user);
                    let seen = Seen::new(cell, m);
                    st.inside.insert(id.clone(), seen);
                    st.send(&w, WatchEvent::Enter(seen.found(id, d)));
                }
                Some((d, cell, m)) if inside && d <= w.leave_m => {
                    if let Some(seen) = st.inside.get_mut(user) {
                        *seen = Seen::new(cell, m);
                    }
                }
                Some((d, cell, m)) if inside => {
                    st.inside.remove(user);
                    let id = UserId::trusted(user);
                    st.send(&w, WatchEvent::Leave(Seen::new(cell, m).found(id, d)));
                }
                None if inside => {
                    if let Some(seen) = st.inside.remove(user) {
                        st.send(
                            &w,
                            WatchEvent::Leave(gone(UserId::trusted(user), seen.cell)),
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// The radius, leave radius and gender filter of each of `user`'s open watches.
    pub(super) fn params_of(&self, user: &str) -> Vec<(f64, f64, Gender)> {
        if self.len() == 0 {
            return Vec::new();
        }
        self.by_user
            .read(self.user_shard(user))
            .get(user)
            .map(|list| {
                list.iter()
                    .map(|w| (w.radius_m, w.leave_m, w.gender))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Moves `user`'s own watches to their new exact position: re-registers their areas
    /// and re-scans, reporting who entered and who is now beyond the leave radius.
    /// `scan(w, centre, radius)` lists everyone `w` admits within `radius` of `centre`.
    pub(super) fn follow(
        &self,
        user: &str,
        centre: LatLng,
        scan: impl Fn(&Watcher, LatLng, f64) -> Vec<Found>,
    ) {
        if self.len() == 0 {
            return;
        }
        let mine: Vec<Arc<Watcher>> = match self.by_user.read(self.user_shard(user)).get(user) {
            Some(list) => list.clone(),
            None => return,
        };
        for w in mine {
            let mut st = w.state();
            if st.tx.is_none() {
                continue;
            }
            self.move_area(&w, &mut st, centre);
            let entered = scan(&w, centre, w.radius_m);
            let kept: HashSet<UserId> = scan(&w, centre, w.leave_m)
                .into_iter()
                .map(|f| f.user)
                .collect();
            // Those left behind are measured from the new centre to where the watch last
            // saw them: beyond the leave radius, a LEAVE with that banded distance (what a
            // search from here shows); within it, they stopped being found (expired or
            // turned invisible): a LEAVE with 0.
            let left: Vec<(UserId, Seen)> = st
                .inside
                .iter()
                .filter(|(u, _)| !kept.contains(*u))
                .map(|(u, seen)| (u.clone(), *seen))
                .collect();
            for (u, seen) in left {
                st.inside.remove(&u);
                let d = distance_m(centre, crate::geo::centre::centre(seen.cell));
                let event = if d > w.leave_m {
                    seen.found(u, d)
                } else {
                    gone(u, seen.cell)
                };
                st.send(&w, WatchEvent::Leave(event));
            }
            for f in entered {
                if let hashbrown::hash_map::Entry::Vacant(slot) = st.inside.entry(f.user.clone()) {
                    slot.insert(Seen::of(&f));
                    st.send(&w, WatchEvent::Enter(f));
                }
            }
        }
    }
}

impl Watcher {
    /// The watcher (never in its own events).
    pub(super) fn user(&self) -> &UserId {
        &self.user
    }

    /// The radius ENTER is decided by, metres.
    pub(super) fn radius_m(&self) -> f64 {
        self.radius_m
    }

    /// The gender filter.
    pub(super) fn gender(&self) -> Gender {
        self.gender
    }
}

fn gone(user: UserId, cell: CellIndex) -> Found {
    Found {
        user,
        distance_m: 0,
        gender: Gender::Unspecified,
        last_seen_ms: 0,
        cell,
    }
}

/// What a watch last saw of a user it reported inside: where (their privacy cell, to
/// measure a LEAVE from a new centre), and what their events carry.
#[derive(Debug, Clone, Copy)]
struct Seen {
    cell: CellIndex,
    gender: Gender,
    last_seen_ms: i64,
}

impl Seen {
    fn new(cell: CellIndex, m: &Member<'_>) -> Self {
        Self {
            cell,
            gender: m.gender,
            last_seen_ms: m.last_seen_ms,
        }
    }

    /// The user as last seen, `d` metres from the watch's centre.
    fn found(self, user: UserId, d: f64) -> Found {
        Found {
            user,
            distance_m: band_m(d),
            gender: self.gender,
            last_seen_ms: self.last_seen_ms,
            cell: self.cell,
        }
    }

    fn of(f: &Found) -> Self {
        Self {
            cell: f.cell,
            gender: f.gender,
            last_seen_ms: f.last_seen_ms,
        }
    }
}

/// An open watch: its events, in order. Dropping it closes the watch at once.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<WatchEvent>,
    watcher: Arc<Watcher>,
    registry: Arc<Watchers>,
    buffer: usize,
    finished: bool,
}

impl Watch {
    /// The next event; `Some(Err(_))` once if the watch was ended by the server, then
    /// `None`.
    pub fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<WatchEvent, WatchEnd>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let end = |w: &Watcher, buffer| match w.ended() {
            Some(WatchEnd::Overflow(_)) => Some(WatchEnd::Overflow(buffer)),
            other => other,
        };
        if let Some(e) = end(&self.watcher, self.buffer) {
            self.finished = true;
            return Poll::Ready(Some(Err(e)));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(e)) => Poll::Ready(Some(Ok(e))),
            Poll::Ready(None) => {
                self.finished = true;
                Poll::Ready(end(&self.watcher, self.buffer).map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// The next event (see [`Self::poll_event`]).
    pub async fn next_event(&mut self) -> Option<Result<WatchEvent, WatchEnd>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.registry.close(&self.watcher);
    }
}
