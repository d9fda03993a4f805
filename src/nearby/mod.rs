//! People Nearby: the location index.
//!
//! Two sharded maps kept consistent by one method each ([`NearbyIndex::update`],
//! [`NearbyIndex::clear`], [`NearbyIndex::sweep`]):
//!
//! * `users`: user id -> the privacy cell the user was last seen in, and when;
//! * `cells`: privacy cell -> the users in it, sorted by id.
//!
//! The index cell *is* the privacy cell (H3 resolution 9 by default, ~0.1 km², average
//! edge 201 m). Nothing finer than that cell is stored, and every user in a bucket shares
//! one snapped position, so a search computes one distance per cell, not per user.
//! Writers lock a `users` shard and then a `cells` shard, always in that order; searches
//! only read `cells`, one shard at a time, and never hold a guard while taking another.

mod bucket;
pub mod snapshot;
mod store;
mod token;
mod watch;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use h3o::{CellIndex, LatLng, Resolution};
use hashbrown::{HashMap, hash_map};

pub use token::{Cursor, MAX_TOKEN_LEN, PageTokens, Scope, TokenError};
pub use watch::{Watch, WatchConfig, WatchEnd, WatchEvent};

use self::{
    bucket::Member,
    store::{CellCodec, SHARDS, Shards, Slot, Users, cell_shard},
    watch::{Change, Watchers},
};
use crate::{
    error::{Error, Result},
    geo::cell::{Ring, RingCover},
    geo::{Coordinates, band_m, distance_key, distance_m},
    id::UserId,
};

/// A user's self-declared gender, used only as a search filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gender {
    /// Not given; as a search filter: everyone.
    #[default]
    Unspecified,
    /// Female.
    Female,
    /// Male.
    Male,
}

impl Gender {
    /// The wire number (also the snapshot encoding).
    pub fn wire(self) -> u8 {
        match self {
            Self::Unspecified => 0,
            Self::Female => 1,
            Self::Male => 2,
        }
    }

    /// The gender with wire number `n`, if there is one.
    pub fn from_wire(n: u8) -> Option<Self> {
        match n {
            0 => Some(Self::Unspecified),
            1 => Some(Self::Female),
            2 => Some(Self::Male),
            _ => None,
        }
    }
}

/// Limits and defaults of the index.
#[derive(Debug, Clone)]
pub struct NearbyConfig {
    /// Resolution of the privacy cells users are snapped to (and indexed by).
    pub privacy_resolution: Resolution,
    /// How long a ping stays visible after the user's last update, in ms, unless the ping
    /// asks for its own time to live.
    pub location_ttl_ms: i64,
    /// Longest time to live a ping may ask for, in ms (at most `u32::MAX`, 49 days).
    pub max_location_ttl_ms: i64,
    /// Radius used when a search asks for 0, in metres.
    pub default_radius_m: f64,
    /// Largest radius a search may ask for, in metres.
    pub max_radius_m: f64,
    /// Page size used when a search asks for 0.
    pub default_limit: u32,
    /// Largest page size a search may ask for.
    pub max_limit: u32,
    /// Limits of WatchNearby streams.
    pub watch: WatchConfig,
    /// Most users held at once: pings from new users beyond it are refused (existing users
    /// keep updating). [`NearbyIndex::update`] (loading, tests) does not check it.
    pub max_users: usize,
}

impl Default for NearbyConfig {
    fn default() -> Self {
        Self {
            privacy_resolution: Resolution::Nine,
            location_ttl_ms: 15 * 60 * 1_000,
            max_location_ttl_ms: 72 * 3_600 * 1_000,
            default_radius_m: 1_000.0,
            max_radius_m: 10_000.0,
            default_limit: 20,
            max_limit: 100,
            watch: WatchConfig::default(),
            max_users: usize::MAX,
        }
    }
}

/// A location ping with its options.
#[derive(Debug, Clone)]
pub struct Ping {
    /// Who.
    pub user: UserId,
    /// Where, exactly (only the privacy cell is kept).
    pub position: Coordinates,
    /// Their gender, for search filters.
    pub gender: Gender,
    /// Whether others may find them; an invisible user can still search.
    pub visible: bool,
    /// How long the ping stays, in seconds; 0 = the server's location TTL. At most the
    /// configured maximum.
    pub ttl_s: u32,
}

/// A WatchNearby request, as received.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// The watcher: the watch is centred on their own latest position.
    pub watcher: UserId,
    /// Radius in metres; 0 = default. Same limits as a search.
    pub radius_m: f64,
    /// Only users of this gender; `Unspecified` = everyone.
    pub gender: Gender,
}

/// Where an update put the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The privacy cell the user is indexed in.
    pub cell: CellIndex,
    /// Unix ms when the ping stops being visible.
    pub expires_at_ms: i64,
}

/// A "who is near me" query, as received (validated by [`NearbyIndex::search`]).
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// The searcher, never in its own results.
    pub searcher: UserId,
    /// Search centre: the searcher's own exact position.
    pub centre: Coordinates,
    /// Radius in metres; 0 = default.
    pub radius_m: f64,
    /// Page size; 0 = default.
    pub limit: u32,
    /// Only users of this gender; `Unspecified` = everyone.
    pub gender: Gender,
    /// Token from the previous page; empty = first page.
    pub page_token: String,
}

/// One user in a search result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The user.
    pub user: UserId,
    /// Banded distance from the searcher to the user's snapped position, metres.
    pub distance_m: u32,
    /// The user's gender.
    pub gender: Gender,
    /// Unix ms of the user's last ping.
    pub last_seen_ms: i64,
}

/// One page of results.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SearchPage {
    /// Nearest first, ties by user id.
    pub users: Vec<Found>,
    /// Token for the next page; `None` when there is none.
    pub next_page_token: Option<String>,
}

/// What the index holds about one user, as shown to that user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocationStatus {
    /// The privacy cell the user is indexed in: the finest position held.
    pub cell: CellIndex,
    /// Whether others can find the user.
    pub visible: bool,
    /// The gender given with the last ping.
    pub gender: Gender,
    /// Unix ms of the last ping.
    pub last_seen_ms: i64,
    /// Unix ms when the location is forgotten.
    pub expires_at_ms: i64,
}

/// Everything the index holds about one user: what a snapshot stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The user.
    pub user: UserId,
    /// Their privacy cell (the finest position held).
    pub cell: CellIndex,
    /// Their gender.
    pub gender: Gender,
    /// Unix ms of their last ping.
    pub last_seen_ms: i64,
    /// How long the ping stays, from `last_seen_ms`, in ms.
    pub ttl_ms: u32,
    /// Whether others may find them.
    pub visible: bool,
}

#[derive(Debug)]
struct Hit {
    key: u64,
    distance_m: f64,
    user: UserId,
    gender: Gender,
    last_seen_ms: i64,
}

impl Hit {
    fn found(self) -> Found {
        Found {
            distance_m: band_m(self.distance_m),
            user: self.user,
            gender: self.gender,
            last_seen_ms: self.last_seen_ms,
        }
    }
}

/// Occupied privacy cells, each with its packed, id-sorted member list.
type Cells = HashMap<CellIndex, Box<[u8]>>;

/// The People Nearby index. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct NearbyIndex {
    cfg: NearbyConfig,
    tokens: PageTokens,
    codec: CellCodec,
    users: Users,
    cells: Shards<Cells>,
    /// Coarse cell (resolution [`COARSE_RESOLUTION`]) -> the occupied privacy cells whose
    /// centres lie in it. Lets wide searches skip empty country at 1/49 of the cost.
    coarse: Shards<HashMap<CellIndex, Box<[CellIndex]>>>,
    watchers: Arc<Watchers>,
    /// Users held (kept with every insert and removal, under the user's `users` shard).
    held: AtomicUsize,
}

/// Resolution of the coarse occupancy map (average edge 1.4 km, 49 privacy cells each): a
/// 10 km search visits about 560 coarse cells instead of 5 400 privacy cells.
const COARSE_RESOLUTION: Resolution = Resolution::Seven;

/// Privacy-cell rings a search walks before switching to the coarse map (rings 0-5: 91
/// cells, a 1 km search at resolution 9): dense searches finish within them, wide sparse
/// ones go on coarse.
const FINE_RINGS: u32 = 6;

fn coarse_of(cell: CellIndex) -> CellIndex {
    // The coarse cell holding the privacy cell's centre (geometric containment, which the
    // ring cover's lower bounds rely on; H3 parents do not contain their children exactly).
    LatLng::from(cell).to_cell(COARSE_RESOLUTION)
}

impl NearbyIndex {
    /// An empty index.
    pub fn new(cfg: NearbyConfig, tokens: PageTokens) -> Self {
        Self {
            codec: CellCodec::new(cfg.privacy_resolution),
            tokens,
            users: Users::default(),
            cells: Shards::default(),
            coarse: Shards::default(),
            watchers: Arc::new(Watchers::new(cfg.watch.clone(), cfg.privacy_resolution)),
            held: AtomicUsize::new(0),
            cfg,
        }
    }

    /// The index's configuration.
    pub fn config(&self) -> &NearbyConfig {
        &self.cfg
    }

    /// Users held, including expired ones the sweep has not reclaimed yet.
    pub fn len(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether the index holds nobody.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Occupied privacy cells.
    pub fn cell_count(&self) -> usize {
        self.cells.sum(HashMap::len)
    }

    /// The server's location TTL in ms (configuration keeps it within `u32`).
    pub fn ttl_ms(&self) -> u32 {
        u32::try_from(self.cfg.location_ttl_ms.max(0)).unwrap_or(u32::MAX)
    }

    /// Records `user` at `position`, visible for the server's TTL (last write wins), and
    /// returns where it was indexed.
    pub fn update(
        &self,
        user: UserId,
        position: Coordinates,
        gender: Gender,
        now_ms: i64,
    ) -> Placement {
        let member = Member {
            user: user.as_str().as_bytes(),
            last_seen_ms: now_ms,
            ttl_ms: self.ttl_ms(),
            gender,
            visible: true,
        };
        let cell = position.cell(self.cfg.privacy_resolution);
        self.place(cell, &member, Some(position.latlng()), usize::MAX);
        Placement {
            cell,
            expires_at_ms: member.expires_at_ms(),
        }
    }

    /// The time to live a ping asks for, checked against the configured maximum.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `ttl_s`.
    pub fn ping_ttl_ms(&self, ping: &Ping) -> Result<u32> {
        if ping.ttl_s == 0 {
            return Ok(self.ttl_ms());
        }
        let max_s = self.cfg.max_location_ttl_ms / 1_000;
        if i64::from(ping.ttl_s) > max_s {
            return Err(Error::invalid(
                "ttl_s",
                format!("must be at most {max_s} s, got {}", ping.ttl_s),
            ));
        }
        Ok(ping.ttl_s.saturating_mul(1_000))
    }

    /// Records a ping with its options (last write wins) and returns where it was indexed.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `ttl_s` when it exceeds the configured maximum;
    /// [`Error::ResourceExhausted`] when the user is new and the index holds
    /// [`NearbyConfig::max_users`] already. Nothing is stored then.
    pub fn ping(&self, ping: &Ping, now_ms: i64) -> Result<Placement> {
        let ttl_ms = self.ping_ttl_ms(ping)?;
        let member = Member {
            user: ping.user.as_str().as_bytes(),
            last_seen_ms: now_ms,
            ttl_ms,
            gender: ping.gender,
            visible: ping.visible,
        };
        let cell = ping.position.cell(self.cfg.privacy_resolution);
        if !self.place(
            cell,
            &member,
            Some(ping.position.latlng()),
            self.cfg.max_users,
        ) {
            return Err(Error::ResourceExhausted(format!(
                "the index is full ({} users): new users are refused until others expire or clear",
                self.cfg.max_users
            )));
        }
        Ok(Placement {
            cell,
            expires_at_ms: member.expires_at_ms(),
        })
    }

    /// Whether privacy cell `cell` holds `user`.
    fn bucket_contains(&self, cell: CellIndex, user: &[u8]) -> bool {
        self.cells
            .read(cell_shard(cell))
            .get(&cell)
            .is_some_and(|b| bucket::contains(b, user))
    }

    /// The user a `Users` entry stands for, if it is `user`'s (see [`store`]).
    fn is_entry_of(&self, slot: &Slot, entry: u64, user: &[u8]) -> bool {
        slot.tagged(entry)
            && self
                .codec
                .unpack(entry)
                .is_some_and(|cell| self.bucket_contains(cell, user))
    }

    /// Puts `member` in privacy cell `cell` (last write wins).
    ///
    /// Lock order, for every writer: the user's `users` shard, then `cells` shards (one at
    /// a time), then `coarse`.
    ///
    /// Watches around the old and new cell hear of the change, and when `exact` is given
    /// (a live ping), the user's own watches move there; both while the user's `users`
    /// shard is held, so each watch sees one user's changes in order.
    ///
    /// A user not held yet is refused (returns `false`, nothing changes) when `max_users`
    /// are held already.
    fn place(
        &self,
        cell: CellIndex,
        member: &Member<'_>,
        exact: Option<LatLng>,
        max_users: usize,
    ) -> bool {
        let slot = self.users.slot(member.user);
        let mut table = self.users.tables.write(slot.shard);
        let entry = slot.entry(self.codec, cell);
        let old = match table.find_mut(slot.hash(), |&e| self.is_entry_of(&slot, e, member.user)) {
            Some(e) => {
                let old = self.codec.unpack(*e);
                if let Some(old) = old.filter(|&old| old != cell) {
                    self.bucket_remove(old, member.user, |_| true);
                }
                self.bucket_upsert(cell, member);
                *e = entry;
                old
            }
            None => {
                // Reserve first, so concurrent newcomers can never overshoot the cap.
                if self.held.fetch_add(1, Ordering::Relaxed) >= max_users {
                    self.held.fetch_sub(1, Ordering::Relaxed);
                    return false;
                }
                self.bucket_upsert(cell, member);
                table.insert_unique(slot.hash(), entry, store::rehash);
                None
            }
        };
        self.watchers.changed(&Change {
            user: member.user,
            old,
            new: Some((cell, member)),
        });
        if let (Some(centre), Ok(user)) = (exact, std::str::from_utf8(member.user)) {
            self.watchers.follow(user, centre, |w, centre, radius| {
                let filter = Filter {
                    searcher: w.user(),
                    gender: w.gender(),
                    after: None,
                    now_ms: member.last_seen_ms,
                };
                self.within(centre, radius, &filter)
            });
        }
        true
    }

    /// Restores a user from a snapshot record, unless the ping has expired by `now_ms` or
    /// the cell is not at this index's privacy resolution, or the index is full. Returns
    /// whether it was restored.
    pub fn restore(&self, record: Record, now_ms: i64) -> bool {
        let member = Member {
            user: record.user.as_str().as_bytes(),
            last_seen_ms: record.last_seen_ms,
            ttl_ms: record.ttl_ms,
            gender: record.gender,
            visible: record.visible,
        };
        if record.cell.resolution() != self.cfg.privacy_resolution || member.expired(now_ms) {
            return false;
        }
        self.place(record.cell, &member, None, self.cfg.max_users)
    }

    /// Calls `f` with every user held, one shard of cells at a time, under that shard's
    /// read lock: searches proceed, and writers to a shard wait only while `f` runs over
    /// its buckets. `f` must not call back into the index.
    pub fn for_each_record(&self, mut f: impl FnMut(&Record)) {
        for shard in 0..SHARDS {
            let cells = self.cells.read(shard);
            for (&cell, b) in cells.iter() {
                for m in bucket::iter(b) {
                    f(&Record {
                        user: UserId::trusted(&m.user_str()),
                        cell,
                        gender: m.gender,
                        last_seen_ms: m.last_seen_ms,
                        ttl_ms: m.ttl_ms,
                        visible: m.visible,
                    });
                }
            }
        }
    }

    /// What the index holds about `user`: `None` when nothing, or only an expired ping.
    pub fn status(&self, user: &UserId, now_ms: i64) -> Option<LocationStatus> {
        let user = user.as_str().as_bytes();
        let slot = self.users.slot(user);
        let table = self.users.tables.read(slot.shard);
        let &entry = table.find(slot.hash(), |&e| self.is_entry_of(&slot, e, user))?;
        let cell = self.codec.unpack(entry)?;
        let cells = self.cells.read(cell_shard(cell));
        let m = bucket::get(cells.get(&cell)?, user)?;
        (!m.expired(now_ms)).then(|| LocationStatus {
            cell,
            visible: m.visible,
            gender: m.gender,
            last_seen_ms: m.last_seen_ms,
            expires_at_ms: m.expires_at_ms(),
        })
    }

    /// Opens a live watch of the users around `req.watcher`'s latest position: ENTER for
    /// everyone within the radius now (nearest first), SNAPSHOT_END, then ENTER / LEAVE
    /// as users arrive, move out (beyond the radius plus hysteresis), clear, expire (when
    /// the sweep reclaims them) or turn invisible. Until the watcher's next ping gives an
    /// exact position, the watch is centred on their privacy cell.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `radius_m`; [`Error::FailedPrecondition`] naming
    /// `user_id` when the watcher has no location; [`Error::ResourceExhausted`] when the
    /// configured number of watches is open.
    pub fn watch(&self, req: &WatchRequest, now_ms: i64) -> Result<Watch> {
        let radius = self.radius(req.radius_m)?;
        let Some(own) = self.status(&req.watcher, now_ms) else {
            return Err(Error::FailedPrecondition {
                field: "user_id",
                reason: "has no location: send UpdateLocation first".into(),
            });
        };
        let centre = LatLng::from(own.cell);
        self.watchers
            .open(
                req.watcher.clone(),
                radius,
                req.gender,
                centre,
                |w, centre| {
                    let filter = Filter {
                        searcher: w.user(),
                        gender: w.gender(),
                        after: None,
                        now_ms,
                    };
                    self.within(centre, radius, &filter)
                },
            )
            .ok_or_else(|| {
                Error::ResourceExhausted(format!(
                    "too many watches open (at most {}); retry later",
                    self.cfg.watch.max_watches
                ))
            })
    }

    /// Watches open now.
    pub fn watch_count(&self) -> usize {
        self.watchers.len()
    }

    /// Resolves once exactly `n` watches are open (for tests and orderly shutdown).
    pub async fn until_watch_count(&self, n: usize) {
        self.watchers.until_len(n).await;
    }

    /// Ends every open watch: each stream reports [`WatchEnd::Closing`].
    pub fn close_watches(&self) {
        self.watchers.close_all();
    }

    /// Where the index last placed `user` (their privacy cell's centre) and when, unless
    /// nothing or only an expired ping is held.
    pub fn known_position(&self, user: &UserId, now_ms: i64) -> Option<(LatLng, i64)> {
        self.status(user, now_ms)
            .map(|s| (LatLng::from(s.cell), s.last_seen_ms))
    }

    /// Forgets `user`. Returns whether a visible location existed.
    pub fn clear(&self, user: &UserId, now_ms: i64) -> bool {
        let user = user.as_str().as_bytes();
        let slot = self.users.slot(user);
        let mut table = self.users.tables.write(slot.shard);
        let Ok(entry) = table.find_entry(slot.hash(), |&e| self.is_entry_of(&slot, e, user)) else {
            return false;
        };
        let cell = self.codec.unpack(*entry.get());
        let removed = cell.and_then(|cell| self.bucket_remove(cell, user, |_| true));
        entry.remove();
        self.held.fetch_sub(1, Ordering::Relaxed);
        self.watchers.changed(&Change {
            user,
            old: cell,
            new: None,
        });
        removed.is_some_and(|m| !m.expired(now_ms))
    }

    /// Takes `user` out if it is still in `cell` and expired at `now_ms`.
    fn remove_expired(&self, user: &[u8], cell: CellIndex, now_ms: i64) -> bool {
        let slot = self.users.slot(user);
        let mut table = self.users.tables.write(slot.shard);
        let Ok(entry) = table.find_entry(slot.hash(), |&e| {
            self.codec.unpack(e) == Some(cell) && self.is_entry_of(&slot, e, user)
        }) else {
            return false;
        };
        if self
            .bucket_remove(cell, user, |m| m.expired(now_ms))
            .is_none()
        {
            return false;
        }
        entry.remove();
        self.held.fetch_sub(1, Ordering::Relaxed);
        self.watchers.changed(&Change {
            user,
            old: Some(cell),
            new: None,
        });
        true
    }

    /// Reclaims every expired user; returns how many.
    ///
    /// One shard of cells at a time, it lists the expired members under a read lock, then
    /// removes them one by one through the writers' path: no lock is held for longer than
    /// a scan of one shard or one removal, so searches and updates go on throughout.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let mut removed = 0;
        let mut ids: Vec<u8> = Vec::new();
        let mut doomed: Vec<(CellIndex, usize, usize)> = Vec::new();
        for shard in 0..SHARDS {
            ids.clear();
            doomed.clear();
            {
                let cells = self.cells.read(shard);
                for (&cell, b) in cells.iter() {
                    for m in bucket::iter(b).filter(|m| m.expired(now_ms)) {
                        doomed.push((cell, ids.len(), m.user.len()));
                        ids.extend_from_slice(m.user);
                    }
                }
            }
            for &(cell, at, len) in &doomed {
                if self.remove_expired(&ids[at..at + len], cell, now_ms) {
                    removed += 1;
                }
            }
        }
        removed
    }

    fn bucket_upsert(&self, cell: CellIndex, member: &Member<'_>) {
        let mut cells = self.cells.write(cell_shard(cell));
        match cells.entry(cell) {
            hash_map::Entry::Occupied(mut e) => bucket::upsert(e.get_mut(), member),
            hash_map::Entry::Vacant(e) => {
                // Registered while this shard of `cells` is locked, so a concurrent removal
                // of the same bucket cannot interleave (lock order: cells, then coarse).
                let key = coarse_of(cell);
                let mut coarse = self.coarse.write(cell_shard(key));
                let list = coarse.entry(key).or_default();
                let mut grown = std::mem::take(list).into_vec();
                grown.push(cell);
                *list = grown.into_boxed_slice();
                e.insert(bucket::single(member));
            }
        }
    }

    /// Takes `user` out of `cell` if `pred` holds for it; drops the bucket once empty.
    fn bucket_remove(
        &self,
        cell: CellIndex,
        user: &[u8],
        pred: impl FnOnce(&Member<'_>) -> bool,
    ) -> Option<Member<'static>> {
        let mut cells = self.cells.write(cell_shard(cell));
        let b = cells.get_mut(&cell)?;
        let removed = bucket::remove_if(b, user, pred)?;
        if b.is_empty() {
            cells.remove(&cell);
            let key = coarse_of(cell);
            let mut coarse = self.coarse.write(cell_shard(key));
            if let Some(list) = coarse.get_mut(&key) {
                let kept: Box<[CellIndex]> = list.iter().copied().filter(|&c| c != cell).collect();
                if kept.is_empty() {
                    coarse.remove(&key);
                } else {
                    *list = kept;
                }
            }
        }
        Some(removed)
    }

    fn radius(&self, requested: f64) -> Result<f64> {
        let max = self.cfg.max_radius_m;
        if !requested.is_finite() || requested < 0.0 {
            return Err(Error::invalid(
                "radius_m",
                format!("must be a finite number of metres >= 0, got {requested}"),
            ));
        }
        if requested > max {
            return Err(Error::invalid(
                "radius_m",
                format!("must be at most {max} m, got {requested}"),
            ));
        }
        Ok(if requested == 0.0 {
            self.cfg.default_radius_m
        } else {
            requested
        })
    }

    fn limit(&self, requested: u32) -> Result<usize> {
        let max = self.cfg.max_limit;
        if requested > max {
            return Err(Error::invalid(
                "limit",
                format!("must be at most {max}, got {requested}"),
            ));
        }
        let limit = if requested == 0 {
            self.cfg.default_limit
        } else {
            requested
        };
        Ok(limit as usize)
    }

    /// Visible users within the radius, nearest first (ties by user id), one page at a time.
    ///
    /// Distances run from the searcher's exact position to each other user's snapped
    /// position (their privacy cell's centre); membership, order and the reported band all
    /// use that one figure.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `radius_m`, `limit` or `page_token`.
    pub fn search(&self, req: &SearchRequest, now_ms: i64) -> Result<SearchPage> {
        let radius = self.radius(req.radius_m)?;
        let limit = self.limit(req.limit)?;
        let centre = req.centre.latlng();
        let scope = Scope {
            searcher: req.searcher.as_str(),
            lat: centre.lat(),
            lng: centre.lng(),
            radius_m: radius,
            gender: req.gender.wire(),
        };
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(
                self.tokens
                    .decode(&scope, &req.page_token)
                    .map_err(|e| Error::invalid("page_token", e.to_string()))?,
            )
        };

        // One more than the page, to know whether another page follows.
        let need = limit + 1;
        let filter = Filter {
            searcher: &req.searcher,
            gender: req.gender,
            after: after.as_ref(),
            now_ms,
        };
        let mut hits = self.find(centre, radius, need, &filter);
        let next_page_token = (hits.len() > limit).then(|| {
            let last = &hits[limit - 1];
            self.tokens.encode(
                &scope,
                &Cursor {
                    distance_key: last.key,
                    user: last.user.clone(),
                },
            )
        });
        hits.truncate(limit);
        Ok(SearchPage {
            users: hits.into_iter().map(Hit::found).collect(),
            next_page_token,
        })
    }

    /// Every user `filter` admits within `radius_m` of `centre`, nearest first (ties by
    /// id): what a watch starts from.
    fn within(&self, centre: LatLng, radius_m: f64, filter: &Filter<'_>) -> Vec<Found> {
        self.find(centre, radius_m, usize::MAX, filter)
            .into_iter()
            .map(Hit::found)
            .collect()
    }

    /// The first `need` users `filter` admits within `radius` of `centre`, in result order.
    fn find(&self, centre: LatLng, radius: f64, need: usize, filter: &Filter<'_>) -> Vec<Hit> {
        let mut cover = Walk::new(self, centre, radius);
        let mut ring = Ring::default();
        let mut cands: Vec<Candidate> = Vec::new();
        let mut counted = 0usize;
        let mut pending = cover.next_ring(&mut ring);
        let mut recheck = false;
        loop {
            // Pass 1: walk rings, counting eligible users per cell without copying them, until
            // `need` are nearer than anything the next ring can hold (or the radius is covered).
            while pending {
                if !recheck
                    && counted >= need
                    && enough_before(&cands, need, distance_key(ring.lower_bound_m))
                {
                    break;
                }
                recheck = false;
                for &(cell, d) in &ring.cells {
                    if d > radius {
                        continue;
                    }
                    let key = distance_key(d);
                    if filter.after.is_some_and(|c| key < c.distance_key) {
                        continue;
                    }
                    let cells = self.cells.read(cell_shard(cell));
                    let Some(bucket) = cells.get(&cell) else {
                        continue;
                    };
                    // Counting stops at `need`: the walk only ever compares counts with
                    // `need`, and a crowded cell then costs what a page does.
                    let eligible = filter
                        .start(bucket, key)
                        .filter(|m| filter.matches(m))
                        .take(need)
                        .count();
                    drop(cells);
                    if eligible > 0 {
                        cands.push(Candidate {
                            key,
                            distance_m: d,
                            cell,
                            eligible,
                        });
                        counted += eligible;
                    }
                }
                pending = cover.next_ring(&mut ring);
            }
            // Pass 2: copy out just the users that make the page, nearest cells first.
            cands.sort_unstable_by_key(|c| (c.key, c.cell));
            let hits = self.collect(&cands, need, filter);
            // Buckets may have changed between the passes (moves, expiry): make sure the
            // page is still provably complete, or walk on.
            let complete = !pending
                || (hits.len() >= need && hits[need - 1].key < distance_key(ring.lower_bound_m));
            if complete {
                return hits;
            }
            recheck = true;
        }
    }

    /// Copies the first `need` eligible users out of `cands` (sorted by distance), in result
    /// order. Cells at exactly the same distance are merged by user id; a user seen twice
    /// (moved between two cells during the search) is kept once, at the nearer cell.
    fn collect(&self, cands: &[Candidate], need: usize, filter: &Filter<'_>) -> Vec<Hit> {
        let mut hits: Vec<Hit> = Vec::with_capacity(need.min(1_024));
        let mut seen = std::collections::HashSet::with_capacity(need.min(1_024));
        let mut group_start = 0;
        while group_start < cands.len() && hits.len() < need {
            let key = cands[group_start].key;
            let group_end = cands[group_start..]
                .iter()
                .position(|c| c.key != key)
                .map_or(cands.len(), |n| group_start + n);
            let first_new = hits.len();
            let single = group_end - group_start == 1;
            'cells: for c in &cands[group_start..group_end] {
                let cells = self.cells.read(cell_shard(c.cell));
                let Some(bucket) = cells.get(&c.cell) else {
                    continue;
                };
                for m in filter.start(bucket, key) {
                    if !filter.matches(&m) {
                        continue;
                    }
                    let user = m.user_str();
                    if seen.contains(user.as_ref()) {
                        continue;
                    }
                    hits.push(Hit {
                        key,
                        distance_m: c.distance_m,
                        user: UserId::trusted(&user),
                        gender: m.gender,
                        last_seen_ms: m.last_seen_ms,
                    });
                    // A lone cell is already in id order: stop as soon as the page is full.
                    if single && hits.len() == need {
                        break 'cells;
                    }
                }
            }
            if !single {
                let mut group = hits.split_off(first_new);
                group.sort_unstable_by(|a, b| a.user.cmp(&b.user));
                group.dedup_by(|a, b| a.user == b.user);
                hits.extend(group);
            }
            seen.extend(hits[first_new..].iter().map(|h| h.user.clone()));
            hits.truncate(need);
            group_start = group_end;
        }
        hits
    }
}

/// The order a search visits privacy cells in: rings of privacy cells around the centre
/// first; then, for wide searches, coarse cells one at a time, nearest first, each expanded
/// into the occupied privacy cells it holds (skipping those already visited). Every batch
/// carries a lower bound on the distance to anything in it or in later batches, so the
/// search can stop as soon as its page is provably complete.
struct Walk<'a> {
    index: &'a NearbyIndex,
    centre: LatLng,
    radius_m: f64,
    fine: RingCover,
    fine_rings: u32,
    visited: std::collections::HashSet<CellIndex>,
    coarse: Option<RingCover>,
    coarse_circumradius_m: f64,
    /// No point outside the walked privacy-cell disk is nearer than this.
    beyond_fine_m: f64,
    /// Coarse cells of the current coarse ring not yet visited, farthest first.
    current: Vec<(CellIndex, f64)>,
    /// The next coarse ring, fetched ahead so its bound is known.
    lookahead: Ring,
    lookahead_valid: bool,
}

impl<'a> Walk<'a> {
    fn new(index: &'a NearbyIndex, centre: LatLng, radius_m: f64) -> Self {
        Self {
            index,
            centre,
            radius_m,
            fine: RingCover::new(centre, index.cfg.privacy_resolution, radius_m),
            fine_rings: 0,
            visited: std::collections::HashSet::new(),
            coarse: None,
            coarse_circumradius_m: crate::geo::cell::max_circumradius_m(COARSE_RESOLUTION),
            beyond_fine_m: 0.0,
            current: Vec::new(),
            lookahead: Ring::default(),
            lookahead_valid: false,
        }
    }

    fn advance_coarse_ring(&mut self) -> bool {
        let Some(coarse) = self.coarse.as_mut() else {
            return false;
        };
        if !self.lookahead_valid {
            return false;
        }
        let slack = self.coarse_circumradius_m;
        let radius = self.radius_m;
        self.current.clear();
        self.current.extend(
            self.lookahead
                .cells
                .iter()
                .filter(|(_, d)| d - slack <= radius)
                .copied(),
        );
        self.current.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        self.lookahead_valid = coarse.next_ring(&mut self.lookahead);
        true
    }

    fn next_ring(&mut self, ring: &mut Ring) -> bool {
        if self.coarse.is_none() {
            if !self.fine.next_ring(ring) {
                return false;
            }
            if self.fine_rings < FINE_RINGS {
                self.fine_rings += 1;
                return true;
            }
            // The ring just computed is the first one outside the fine disk: its bound holds
            // for everything not yet visited. Go coarse from here. (The visited set is built
            // only now: most searches never get here.)
            self.beyond_fine_m = ring.lower_bound_m;
            let origin = self.centre.to_cell(self.index.cfg.privacy_resolution);
            self.visited = origin
                .grid_disk::<Vec<_>>(FINE_RINGS - 1)
                .into_iter()
                .collect();
            let mut coarse = RingCover::new(self.centre, COARSE_RESOLUTION, self.radius_m);
            self.lookahead_valid = coarse.next_ring(&mut self.lookahead);
            self.coarse = Some(coarse);
        }
        while self.current.is_empty() {
            if !self.advance_coarse_ring() {
                return false;
            }
        }
        let Some((coarse_cell, d)) = self.current.pop() else {
            return false;
        };
        // Later coarse cells of this ring are farther (sorted); later rings are bounded by
        // the lookahead ring's bound.
        let later_rings = if self.lookahead_valid {
            self.lookahead.lower_bound_m
        } else {
            f64::INFINITY
        };
        let this_and_rest = (d - self.coarse_circumradius_m).min(later_rings);
        ring.cells.clear();
        ring.lower_bound_m = this_and_rest.max(self.beyond_fine_m).max(0.0);
        if let Some(list) = self
            .index
            .coarse
            .read(cell_shard(coarse_cell))
            .get(&coarse_cell)
        {
            for &cell in list.iter() {
                if !self.visited.contains(&cell) {
                    ring.cells
                        .push((cell, distance_m(self.centre, LatLng::from(cell))));
                }
            }
        }
        true
    }
}

/// A cell within the radius with at least one eligible user (counted up to the `need` of
/// the search).
#[derive(Debug)]
struct Candidate {
    key: u64,
    distance_m: f64,
    cell: CellIndex,
    eligible: usize,
}

/// Whether the cells nearer than `bound_key` already hold `need` eligible users.
fn enough_before(cands: &[Candidate], need: usize, bound_key: u64) -> bool {
    let mut n = 0;
    for c in cands {
        if c.key < bound_key {
            n += c.eligible;
            if n >= need {
                return true;
            }
        }
    }
    false
}

/// Who a search may return.
struct Filter<'a> {
    searcher: &'a UserId,
    gender: Gender,
    after: Option<&'a Cursor>,
    now_ms: i64,
}

impl Filter<'_> {
    fn matches(&self, m: &Member<'_>) -> bool {
        m.visible
            && !self.is_searcher(m.user)
            && !m.expired(self.now_ms)
            && (self.gender == Gender::Unspecified || m.gender == self.gender)
    }

    /// Whether `user` is the searcher. Compared from the end, inline: ids of one scheme
    /// share their prefix and differ in the last bytes, and this runs for every member a
    /// search reads.
    fn is_searcher(&self, user: &[u8]) -> bool {
        let me = self.searcher.as_str().as_bytes();
        user.len() == me.len() && user.iter().rev().zip(me.iter().rev()).all(|(a, b)| a == b)
    }

    /// The members of a bucket at distance `key` that come after the page cursor.
    fn start<'b>(&self, bucket: &'b [u8], key: u64) -> bucket::Iter<'b> {
        match self.after {
            Some(c) if c.distance_key == key => bucket::after(bucket, c.user.as_str().as_bytes()),
            _ => bucket::iter(bucket),
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod watch_tests;

#[cfg(test)]
mod proptests;
