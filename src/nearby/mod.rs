//! People Nearby: the location index.
//!
//! The index cell *is* the privacy cell (H3 resolution 9 by default, ~0.1 km², average
//! edge 201 m). Nothing finer than that cell is stored, and every user in a bucket shares
//! one snapped position, so a search computes one distance per cell, not per user.
//!
//! Rooms: [`types`](self) (requests and results), `maps` (the sharded maps and the
//! one place that keeps them consistent, with their lock order), `search` (the two-pass
//! query engine), `sparse`, `region` and `region_centres` (its shortcut through sparse
//! country),
//! [`token`](PageTokens) (opaque page tokens), `watch` (live ENTER/LEAVE
//! streams), [`snapshot`] (crash-safe files of the index). This façade ties them: every
//! write goes through the maps and tells the watches, under the maps' lock order.

pub(crate) mod bucket;
mod cell_map;
mod maps;
mod region;
mod region_centres;
pub(crate) mod search;
pub mod snapshot;
pub(crate) mod source;
pub(crate) mod sparse;
mod token;
mod types;
mod watch;

use std::sync::Arc;

use h3o::{CellIndex, LatLng};

pub use maps::Footprint;
pub use token::{Cursor, MAX_TOKEN_LEN, PageTokens, Scope, TokenError};
pub use types::{
    Found, Gender, LocationStatus, NearbyConfig, Ping, Placement, Query, Record, SearchPage,
    SearchRequest, WatchRequest,
};
pub use watch::{Watch, WatchConfig, WatchEnd, WatchEvent};

pub(crate) use maps::coarse_of;

use self::{
    bucket::Member,
    maps::Maps,
    search::Filter,
    watch::{Change, Watcher, Watchers},
};
use crate::{
    error::{Error, Result},
    geo::Coordinates,
    id::UserId,
};

/// The People Nearby index. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct NearbyIndex {
    cfg: NearbyConfig,
    tokens: PageTokens,
    maps: Maps,
    watchers: Arc<Watchers>,
}

impl NearbyIndex {
    /// An empty index.
    pub fn new(cfg: NearbyConfig, tokens: PageTokens) -> Self {
        Self {
            maps: Maps::new(cfg.privacy_resolution),
            tokens,
            watchers: Arc::new(Watchers::new(cfg.watch.clone(), cfg.privacy_resolution)),
            cfg,
        }
    }

    /// The index's configuration.
    pub fn config(&self) -> &NearbyConfig {
        &self.cfg
    }

    /// Users held, including expired ones the sweep has not reclaimed yet.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether the index holds nobody.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Occupied privacy cells.
    pub fn cell_count(&self) -> usize {
        self.maps.cell_count()
    }

    /// Bytes held by each of the index's maps, before the allocator's overhead.
    pub fn footprint(&self) -> Footprint {
        self.maps.footprint()
    }

    /// The server's location TTL in ms.
    pub fn ttl_ms(&self) -> u32 {
        self.cfg.ttl.server().ms()
    }

    /// Records `user` at `position`, visible for the server's TTL (last write wins), and
    /// returns where it was indexed. Not bounded by [`NearbyConfig::max_users`] (loading,
    /// tests, benches).
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

    /// Records a ping (last write wins) and returns where it was indexed.
    ///
    /// # Errors
    /// [`Error::ResourceExhausted`] when the user is new and the index holds
    /// [`NearbyConfig::max_users`] already. Nothing is stored then.
    pub fn ping(&self, ping: &Ping, now_ms: i64) -> Result<Placement> {
        let member = ping.member(now_ms);
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

    /// Puts `member` in privacy cell `cell` through the maps; watches around the old and
    /// new cell hear of the change, and when `exact` is given (a live ping) the user's own
    /// watches move there, both while the maps hold the user's shard, so each watch sees
    /// one user's changes in order. Returns `false` when the user is new and `max_users`
    /// are held.
    fn place(
        &self,
        cell: CellIndex,
        member: &Member<'_>,
        exact: Option<LatLng>,
        max_users: usize,
    ) -> bool {
        self.maps.upsert(cell, member, max_users, |old| {
            self.watchers.changed(&Change {
                user: member.user,
                old,
                new: Some((cell, member)),
            });
            if let (Some(centre), Ok(user)) = (exact, std::str::from_utf8(member.user)) {
                self.watchers.follow(user, centre, |w, centre, radius| {
                    self.maps
                        .within(centre, radius, &watch_filter(w, member.last_seen_ms))
                });
            }
        })
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
    pub fn for_each_record(&self, f: impl FnMut(&Record)) {
        self.maps.for_each_record(f);
    }

    /// What the index holds about `user`: `None` when nothing, or only an expired ping.
    pub fn status(&self, user: &UserId, now_ms: i64) -> Option<LocationStatus> {
        self.maps.status(user.as_str().as_bytes(), now_ms)
    }

    /// Validates a search as received: radius and page size by the index's rules, the
    /// page token by its key and the query it was issued for.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `radius_m`, `limit` or `page_token`.
    pub fn query(&self, req: &SearchRequest) -> Result<Query> {
        search::query(&self.cfg, &self.tokens, req)
    }

    /// Visible users within the radius, nearest first (ties by user id), one page at a
    /// time.
    ///
    /// Distances run from the searcher's exact position to each other user's snapped
    /// position (their privacy cell's centre); membership, order and the reported band all
    /// use that one figure.
    pub fn search(&self, q: &Query, now_ms: i64) -> SearchPage {
        self.maps.search(&self.tokens, q, now_ms)
    }

    /// Opens a live watch of the users around `req.watcher`'s latest position: ENTER for
    /// everyone within the radius now (nearest first), SNAPSHOT_END, then ENTER / LEAVE
    /// as users arrive, move out (beyond the radius plus hysteresis), clear, expire (when
    /// the sweep reclaims them) or turn invisible. Until the watcher's next ping gives an
    /// exact position, the watch is centred on their privacy cell.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] naming
    /// `user_id` when the watcher has no location; [`Error::ResourceExhausted`] when the
    /// configured number of watches is open.
    pub fn watch(&self, req: &WatchRequest, now_ms: i64) -> Result<Watch> {
        let radius = req.radius.m();
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
                |w, centre| self.maps.within(centre, radius, &watch_filter(w, now_ms)),
            )
            .ok_or_else(|| {
                Error::ResourceExhausted(format!(
                    "too many watches open (at most {}); retry later",
                    self.cfg.watch.max_watches
                ))
            })
    }

    /// Opens a watch centred on `centre` that starts with `start` (everyone it admits
    /// within its radius, found elsewhere: a remote store's replica holds no maps), and
    /// from then on learns of changes through [`Self::changed_elsewhere`].
    ///
    /// # Errors
    /// [`Error::ResourceExhausted`] when too many watches are open.
    pub fn watch_from(
        &self,
        req: &WatchRequest,
        centre: LatLng,
        start: Vec<Found>,
    ) -> Result<Watch> {
        self.watchers
            .open(
                req.watcher.clone(),
                req.radius.m(),
                req.gender,
                centre,
                |_, _| start,
            )
            .ok_or_else(|| {
                Error::ResourceExhausted(format!(
                    "too many watches open (at most {}); retry later",
                    self.cfg.watch.max_watches
                ))
            })
    }

    /// Tells the watches about a change made elsewhere (another replica, through a remote
    /// store): `user` left `old` (if known) and is now `new`, a cell and the member's
    /// encoded fields, or gone. Fields that do not decode are ignored.
    pub fn changed_elsewhere(
        &self,
        user: &[u8],
        old: Option<CellIndex>,
        new: Option<(CellIndex, &[u8])>,
    ) {
        let member = match new {
            Some((_, fields)) => match bucket::from_fields(user, fields) {
                Some(m) => Some(m),
                None => return,
            },
            None => None,
        };
        let new = new.zip(member.as_ref()).map(|((cell, _), m)| (cell, m));
        self.watchers.changed(&watch::Change { user, old, new });
    }

    /// The radius, leave radius and gender filter of each watch `user` has open.
    pub fn watches_of(&self, user: &str) -> Vec<(f64, f64, Gender)> {
        self.watchers.params_of(user)
    }

    /// Moves `user`'s own watches to `centre` (their new position, learnt elsewhere):
    /// `found(radius_m, gender, within_m)` lists everyone a watch of that radius and
    /// filter admits within `within_m` of `centre` (its radius, then its leave radius).
    pub fn follow_elsewhere(
        &self,
        user: &str,
        centre: LatLng,
        found: impl Fn(f64, Gender, f64) -> Vec<Found>,
    ) {
        self.watchers.follow(user, centre, |w, _, within| {
            found(w.radius_m(), w.gender(), within)
        });
    }

    /// How far a user watched with `radius_m` may move before the watch reports LEAVE.
    pub fn watch_leave_radius_m(&self, radius_m: f64) -> f64 {
        self.watchers.leave_radius_m(radius_m)
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
        let removed = self.maps.remove(
            user,
            |_, _| true,
            |old| {
                self.watchers.changed(&Change {
                    user,
                    old,
                    new: None,
                });
            },
        );
        removed.flatten().is_some_and(|m| !m.expired(now_ms))
    }

    /// Reclaims every expired user; returns how many. Watches hear of each removal.
    pub fn sweep(&self, now_ms: i64) -> usize {
        self.maps.sweep(now_ms, |user, cell| {
            self.watchers.changed(&Change {
                user,
                old: Some(cell),
                new: None,
            });
        })
    }
}

impl Ping {
    /// The member this ping makes at `now_ms`: what every store keeps of it.
    pub(crate) fn member(&self, now_ms: i64) -> Member<'_> {
        Member {
            user: self.user.as_str().as_bytes(),
            last_seen_ms: now_ms,
            ttl_ms: self.ttl.ms(),
            gender: self.gender,
            visible: self.visible,
        }
    }
}

impl crate::guard::KnownPositions for NearbyIndex {
    fn known_position(&self, user: &UserId, now_ms: i64) -> crate::guard::Known {
        NearbyIndex::known_position(self, user, now_ms)
    }
}

/// Who a watch reports: everyone its watcher's search would return, at `now_ms`.
fn watch_filter(w: &Watcher, now_ms: i64) -> Filter<'_> {
    Filter {
        searcher: w.user(),
        gender: w.gender(),
        after: None,
        now_ms,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod watch_tests;

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod search_tests;
