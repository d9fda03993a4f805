//! People Nearby over Redis / Valkey: the same validated requests, the same query engine
//! ([`crate::nearby::search`]) and the same privacy rules as in memory, with the maps in the
//! store so that every replica serves one world.
//!
//! A ping writes the new cell first, then the user's record, then removes the member from
//! the cell the record named before (only if that member is not newer than this ping),
//! then marks its member as recorded; a ping that finds a newer one recorded takes back
//! its own member. So concurrent pings of one user through different replicas leave only
//! the newest, under any interleaving: a user moving between cells is in the new one
//! before leaving the old, and a search that meets both copies keeps the nearer one (the
//! engine dedupes by id). Reads filter out expired members, so correctness never waits
//! for the sweep.
//!
//! A ping to the cell the user's marked member is in, within [`RECORD_EPOCH`] or the
//! epoch after the record's, is one store call: the record already names that cell and
//! outlives the ping (a record lives two epochs longer than its ping), so it is not
//! written again (`gm_ping` in `geomatch.lua`). Such a ping leaves the record's time
//! behind the member's; a move that then finds the newer member in the cell it leaves
//! records that member again and takes the user out of the cell it moved to instead
//! (`RedisNearby::settle`), so last write wins as before. What a replica dying between
//! a move's record write and its removal of the old member can leave is bounded by the
//! epochs: see the README ("Running a cluster").

use std::{
    collections::HashSet,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use h3o::CellIndex;

use super::{
    CellKeys, Conn, StoreError, TAGS_KEY, Target,
    fetched::{Fetched, Group, REGION_LIST_MAX},
    occupancy_key, tag_of_coarse, user_key,
};
use crate::{
    error::{Error, Result},
    id::UserId,
    nearby::{
        LocationStatus, NearbyConfig, PageTokens, Ping, Placement, Query, SearchPage,
        SearchRequest, bucket, search, source::Need,
    },
};

/// Most round trips one search may take before it gives up (a 10 km search in sparse
/// country takes about 15; a dense one, 1).
const MAX_ROUNDS: usize = 64;
/// How long a user's record, once written and marked in its member, lets later pings to
/// the same cell skip writing it: pings made in the record's epoch or the next one.
pub const RECORD_EPOCH: Duration = Duration::from_secs(120);
/// [`RECORD_EPOCH`] in ms.
const EPOCH_MS: i64 = RECORD_EPOCH.as_millis() as i64;
/// Most records a move writes again for newer pings it finds (each one newer than the
/// last, so this only bounds a user pinging through many replicas at once).
const HEAL_ROUNDS: usize = 8;
/// `gm_ping`'s answer for a ping whose record stands.
const RECORD_STANDS: i64 = 2;

/// Due cells one sweep call handles (a cell's expiry entry covers all its members; a call
/// runs for as long as its cells' members take to read).
const SWEEP_BATCH: usize = 256;

/// People Nearby held in Redis / Valkey. Share it behind an `Arc`.
#[derive(Debug)]
pub struct RedisNearby {
    conn: Conn,
    cfg: NearbyConfig,
    tokens: PageTokens,
    /// Tags this replica has registered in `gm1:tags` (so each is registered once per
    /// replica, not once per ping).
    registered: Mutex<HashSet<String>>,
    /// This replica's name in the sweep lease: random, so two replicas never share one.
    replica: String,
    /// The watches open on this replica, fed by the store's change channels.
    watches: super::watch::RemoteWatches,
    /// Pings that were one store call (their record stood), and pings that wrote it.
    pings_one_call: AtomicU64,
    pings_recorded: AtomicU64,
}

impl RedisNearby {
    /// Connects to `target`, loads the functions and checks the schema. The page-token
    /// key is the store's own (made by the first replica), so a token from one replica
    /// continues its walk on any other. Each store call is bounded by `timeout`.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be reached or holds incompatible data.
    ///
    /// Watches opened through it live in `watch_index`'s registry (its maps stay empty).
    pub async fn connect(
        target: &Target,
        cfg: NearbyConfig,
        timeout: Duration,
        watch_index: std::sync::Arc<crate::nearby::NearbyIndex>,
    ) -> std::result::Result<std::sync::Arc<Self>, StoreError> {
        let conn = Conn::open(target, timeout).await?;
        conn.prepare().await?;
        let key = token_key(&conn).await?;
        let watches = super::watch::RemoteWatches::open(target, timeout, watch_index).await?;
        let me = std::sync::Arc::new(Self {
            conn,
            cfg,
            tokens: PageTokens::new(key),
            registered: Mutex::default(),
            replica: replica_name()?,
            watches,
            pings_one_call: AtomicU64::new(0),
            pings_recorded: AtomicU64::new(0),
        });
        // A watcher's own pings move its watches: re-scanning needs the store.
        me.watches.follow_through(std::sync::Arc::downgrade(&me));
        Ok(me)
    }

    /// Everyone `searcher` would find within `radius_m` of `centre` with `gender`, every
    /// page (the radius may exceed the search limit: a watch's leave radius does).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the store does not answer.
    pub(crate) async fn within(
        &self,
        searcher: &UserId,
        centre: crate::geo::Coordinates,
        radius_m: f64,
        gender: crate::nearby::Gender,
        now_ms: i64,
    ) -> Result<Vec<crate::nearby::Found>> {
        let mut cfg = self.cfg.clone();
        cfg.radius.max_m = cfg.radius.max_m.max(radius_m);
        let mut found = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = SearchRequest {
                searcher: searcher.clone(),
                centre,
                radius_m,
                limit: cfg.page.max,
                gender,
                page_token,
            };
            let page = self
                .search(&search::query(&cfg, &self.tokens, &req)?, now_ms)
                .await?;
            found.extend(page.users);
            match page.next_page_token {
                Some(t) => page_token = t,
                None => return Ok(found),
            }
        }
    }

    /// Opens a watch: ENTER / LEAVE for changes made through any replica. The lease keeps
    /// the watch's tags subscribed; drop it with the watch.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] when the watcher has no location;
    /// [`Error::ResourceExhausted`] when too many watches are open;
    /// [`Error::Unavailable`] when the store does not answer.
    pub async fn watch(
        &self,
        req: &crate::nearby::WatchRequest,
        now_ms: i64,
    ) -> Result<(crate::nearby::Watch, super::watch::TagLease)> {
        self.watches.watch(self, req, now_ms).await
    }

    /// Takes or renews the sweep lease for `hold`: whether this replica is the one that
    /// sweeps now. One replica at a time holds it; when the holder dies, the lease runs
    /// out and another takes it over (so the work is shared, not done N times).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the store does not answer.
    pub async fn sweep_lease(&self, hold: Duration) -> Result<bool> {
        let ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
        let lease = redis::cmd("FCALL")
            .arg("gm_lease")
            .arg(1)
            .arg(LEASE_KEY)
            .arg(&self.replica)
            .arg(ms)
            .clone();
        let held: i64 = self.conn.query(&lease).await?;
        Ok(held == 1)
    }

    /// The rules requests are validated by.
    pub fn config(&self) -> &NearbyConfig {
        &self.cfg
    }

    /// Whether the store answers now, and if not, how it failed.
    pub async fn probe(&self) -> super::Probe {
        self.conn.probe().await
    }

    /// Makes a store that came back usable again: a server restarted without its data
    /// has lost the functions and the metadata, so they are loaded again (this replica's
    /// page-token key is written back unless another replica wrote one first).
    ///
    /// # Errors
    /// [`StoreError`] as [`Self::connect`].
    pub async fn prepare_again(&self) -> std::result::Result<(), StoreError> {
        self.conn.prepare().await?;
        let _: bool = self
            .conn
            .query(
                redis::cmd("HSETNX")
                    .arg(super::META_KEY)
                    .arg("token_key")
                    .arg(&self.tokens.key()[..]),
            )
            .await?;
        Ok(())
    }

    /// Takes one call of `what` from `user`'s token bucket, kept in the store so every
    /// replica shares it (`cfg.burst` 0 disables it).
    ///
    /// # Errors
    /// [`Error::RateLimited`] with the time to wait; [`Error::Unavailable`] when the store
    /// does not answer.
    pub async fn rate_limit(
        &self,
        what: &'static str,
        user: &UserId,
        cfg: crate::guard::RateConfig,
        now_ms: i64,
    ) -> Result<()> {
        if cfg.burst == 0 {
            return Ok(());
        }
        super::take_token(&self.conn, what, user, cfg, now_ms).await
    }

    /// Validates a search as received, exactly as the in-memory index does.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `radius_m`, `limit` or `page_token`.
    pub fn query(&self, req: &SearchRequest) -> Result<Query> {
        search::query(&self.cfg, &self.tokens, req)
    }

    /// Records a ping (last write wins) and returns where it was indexed.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the store does not answer; the ping may then have been
    /// applied or not, and retrying it is safe.
    pub async fn ping(&self, ping: &Ping, now_ms: i64) -> Result<Placement> {
        let member = ping.member(now_ms);
        let cell = ping.position.cell(self.cfg.privacy_resolution);
        let keys = CellKeys::new(cell);
        let expires = member.expires_at_ms();
        let placement = Placement {
            cell,
            expires_at_ms: expires,
        };
        self.register(&keys.tag).await?;
        let fields = bucket::fields(&member);
        let user = ping.user.as_str();
        let mut put = redis::cmd("FCALL");
        put.arg("gm_ping")
            .arg(3)
            .arg(&keys.bucket)
            .arg(&keys.occupancy)
            .arg(&keys.expiry)
            .arg(user)
            .arg(&fields[..])
            .arg(super::cell_hex(keys.coarse))
            .arg(super::cell_hex(cell))
            .arg(expires)
            .arg(self.conn.tell_mode())
            .arg(super::change_channel(&keys.tag))
            .arg(EPOCH_MS);
        // In this order: the member first, then the record. A newer ping of the same user
        // that then reads this record finds the member to clean up; an older one that
        // reads the newer record cleans up its own member.
        let put: i64 = self.new_function(&put).await?;
        if put == RECORD_STANDS {
            self.pings_one_call.fetch_add(1, Ordering::Relaxed);
            return Ok(placement);
        }
        self.pings_recorded.fetch_add(1, Ordering::Relaxed);
        if self.settle(user, cell, fields.to_vec()).await? {
            // The record names this cell now: mark the member so that the next pings here
            // skip writing it (not if a newer ping replaced the member meanwhile).
            let mark = redis::cmd("FCALL")
                .arg("gm_mark")
                .arg(1)
                .arg(&keys.bucket)
                .arg(user)
                .arg(now_ms)
                .arg(EPOCH_MS)
                .clone();
            let _: i64 = self.new_function(&mark).await?;
        }
        Ok(placement)
    }

    /// Runs a call of a Function this build added to the library: a replica of an earlier
    /// build that started meanwhile loads its own library over this one's, so a "function
    /// not found" loads this build's again (which keeps every earlier Function) and runs
    /// the call once more.
    async fn new_function<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        match self.conn.query(cmd).await {
            Err(StoreError::Unreachable(e)) if e.contains("Function not found") => {
                tracing::warn!("the store's functions library is an earlier build's: loading ours");
                self.conn.prepare().await?;
                Ok(self.conn.query(cmd).await?)
            }
            r => Ok(r?),
        }
    }

    /// Pings that were one store call (their record stood), and pings that wrote the
    /// user's record, since start.
    pub fn ping_calls(&self) -> (u64, u64) {
        (
            self.pings_one_call.load(Ordering::Relaxed),
            self.pings_recorded.load(Ordering::Relaxed),
        )
    }

    /// Records `user`'s member `fields` in `cell` (its ping just put there) and takes the
    /// user out of the cells the record named before, unless their member is newer. A
    /// newer member met there (a ping that skipped writing the record) is the user's
    /// latest: it is recorded in turn, the same way. A member whose record loses to a
    /// newer one is taken back. Returns whether the record names the first member now.
    async fn settle(&self, user: &str, cell: CellIndex, fields: Vec<u8>) -> Result<bool> {
        let mut todo = vec![(cell, fields)];
        let mut own = true;
        for round in 0..HEAL_ROUNDS {
            let Some((cell, fields)) = todo.pop() else {
                break;
            };
            let Some(m) = bucket::from_fields(user.as_bytes(), &fields) else {
                continue;
            };
            let seen = m.last_seen_ms;
            let Some((before, also)) = self.record(user, cell, seen, m.ttl_ms).await? else {
                // A newer ping is recorded: this member lost; take it back (unless a newer
                // ping put one in the same cell, which is settled in turn).
                if round == 0 {
                    own = false;
                }
                if let Taken::Newer(newer) = self.take(cell, user, seen, None).await? {
                    todo.push((cell, newer));
                }
                continue;
            };
            let stored = stored_member(user, &fields);
            let mut stale: Vec<CellIndex> = Vec::with_capacity(2);
            for old in [before, also].into_iter().flatten() {
                if old != cell && !stale.contains(&old) {
                    stale.push(old);
                }
            }
            let taken = futures_util::future::join_all(
                stale
                    .iter()
                    .map(|&old| self.take(old, user, seen, Some((cell, &stored)))),
            )
            .await;
            for (&old, t) in stale.iter().zip(taken) {
                if let Taken::Newer(newer) = t? {
                    todo.push((old, newer));
                }
            }
        }
        Ok(own)
    }

    /// Records `user` in `cell` for a ping seen at `seen_ms` (see the module docs: the
    /// record lives two epochs past the ping). `None` when a newer ping is recorded;
    /// else the cell the record named before and the one before that when this moves
    /// the user (each `None` when none, or not a cell this build reads).
    async fn record(
        &self,
        user: &str,
        cell: CellIndex,
        seen_ms: i64,
        ttl_ms: u32,
    ) -> Result<Option<(Option<CellIndex>, Option<CellIndex>)>> {
        let record = redis::cmd("FCALL")
            .arg("gm_user")
            .arg(1)
            .arg(user_key(user))
            .arg(cell.to_string())
            .arg(seen_ms)
            .arg(i64::from(ttl_ms.max(1)) + 2 * EPOCH_MS)
            .arg("p")
            .clone();
        let old: Option<(String, String)> = self.conn.query(&record).await?;
        Ok(old.map(|(before, also)| (before.parse().ok(), also.parse().ok())))
    }

    /// `gm_del` of `user` in `cell` unless its member is newer than `not_after_ms`;
    /// `moved_to` the cell and member of the ping that moved the user, if one did.
    async fn take(
        &self,
        cell: CellIndex,
        user: &str,
        not_after_ms: i64,
        moved_to: Option<(CellIndex, &[u8])>,
    ) -> Result<Taken> {
        // A move is told to watches as one change: "cell|member" of where the user is now.
        let moved_to = moved_to.map_or_else(Vec::new, |(to, member)| {
            let mut note = to.to_string().into_bytes();
            note.push(b'|');
            note.extend_from_slice(member);
            note
        });
        let keys = CellKeys::new(cell);
        let del = redis::cmd("FCALL")
            .arg("gm_del")
            .arg(3)
            .arg(&keys.bucket)
            .arg(&keys.occupancy)
            .arg(&keys.expiry)
            .arg(user)
            .arg(super::cell_hex(keys.coarse))
            .arg(super::cell_hex(cell))
            .arg(not_after_ms)
            .arg(self.conn.tell_mode())
            .arg(super::change_channel(&keys.tag))
            .arg(moved_to)
            .arg("newer")
            .clone();
        let answer: redis::Value = self.conn.query(&del).await?;
        Ok(match answer {
            redis::Value::BulkString(fields) => Taken::Removed(fields),
            redis::Value::Array(mut items) if items.len() == 1 => match items.pop() {
                Some(redis::Value::BulkString(fields)) => Taken::Newer(fields),
                _ => Taken::Absent,
            },
            _ => Taken::Absent,
        })
    }

    /// Registers `tag` for the sweep, once per replica.
    async fn register(&self, tag: &str) -> Result<()> {
        let known = self
            .registered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(tag);
        if !known {
            let _: i64 = self
                .conn
                .query(redis::cmd("SADD").arg(TAGS_KEY).arg(tag))
                .await?;
            self.registered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(tag.to_string());
        }
        Ok(())
    }

    /// Forgets `user`. Returns whether a visible location existed.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the store does not answer.
    pub async fn clear(&self, user: &UserId, now_ms: i64) -> Result<bool> {
        // The cell before the last one too: a ping whose last step failed (the replica
        // died, or the store did not answer) leaves a copy of the user there. Read with
        // the forget in one step, and both cells emptied only of members not newer than
        // the forgotten ping or the clear (a ping to the same cell may have skipped the
        // record, which then holds an older time): a ping through another replica after
        // the clear stays.
        let key = user_key(user.as_str());
        let mut forget = redis::pipe();
        forget
            .atomic()
            .cmd("HMGET")
            .arg(&key)
            .arg("p")
            .arg("t")
            .cmd("FCALL")
            .arg("gm_forget")
            .arg(1)
            .arg(&key)
            .arg(now_ms);
        let ((before, seen), cell): ((Option<String>, Option<i64>), String) =
            self.conn.pipe(&forget).await?;
        let Ok(cell) = cell.parse::<CellIndex>() else {
            return Ok(false);
        };
        let not_after = seen.map_or(now_ms, |t| t.max(now_ms));
        let mut cells = vec![cell];
        if let Some(before) = before
            .and_then(|b| b.parse::<CellIndex>().ok())
            .filter(|&b| b != cell)
        {
            cells.push(before);
        }
        let mut existed = false;
        for (i, cell) in cells.into_iter().enumerate() {
            match self.take(cell, user.as_str(), not_after, None).await? {
                Taken::Removed(f) if i == 0 => {
                    existed = bucket::from_fields(user.as_str().as_bytes(), &f)
                        .is_some_and(|m| !m.expired(now_ms));
                }
                // A ping newer than the clear, to a cell whose record write it skipped:
                // it stays, and is recorded again.
                Taken::Newer(f) => {
                    self.settle(user.as_str(), cell, f).await?;
                }
                _ => {}
            }
        }
        Ok(existed)
    }

    /// What the store holds about `user`: `None` when nothing, or only an expired ping.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the store does not answer.
    pub async fn status(&self, user: &UserId, now_ms: i64) -> Result<Option<LocationStatus>> {
        let cell: Option<String> = self
            .conn
            .query(redis::cmd("HGET").arg(user_key(user.as_str())).arg("c"))
            .await?;
        let Some(cell) = cell.and_then(|c| c.parse::<CellIndex>().ok()) else {
            return Ok(None);
        };
        let keys = CellKeys::new(cell);
        let raw: Option<Vec<u8>> = self.conn.query(redis::cmd("GET").arg(&keys.bucket)).await?;
        let id = user.as_str().as_bytes();
        let cell_members = raw
            .as_deref()
            .map(bucket::from_unsorted)
            .unwrap_or_default();
        Ok(bucket::get(&cell_members, id)
            .filter(|m| !m.expired(now_ms))
            .map(|m| LocationStatus {
                cell,
                visible: m.visible,
                gender: m.gender,
                last_seen_ms: m.last_seen_ms,
                expires_at_ms: m.expires_at_ms(),
            }))
    }

    /// One page of a validated query: the in-memory engine's walk, fed batch by batch
    /// from the store.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the store does not answer.
    pub async fn search(&self, q: &Query, now_ms: i64) -> Result<SearchPage> {
        let mut fetched = Fetched::new(self.cfg.privacy_resolution);
        for _ in 0..MAX_ROUNDS {
            match search::page(&fetched, &self.tokens, q, now_ms) {
                Ok(page) => return Ok(page),
                Err(missed) => self.fetch(&mut fetched, &missed.need).await?,
            }
        }
        Err(Error::Unavailable(format!(
            "the search needed more than {MAX_ROUNDS} round trips to the store"
        )))
    }

    /// Reads `need` into `into`: one pipeline per hash tag (one slot each), run at once.
    async fn fetch(&self, into: &mut Fetched, need: &Need) -> Result<()> {
        // Each cell's keys are worked out once (the coarse cell takes H3 geometry).
        let mut by_tag: hashbrown::HashMap<String, Group> = hashbrown::HashMap::new();
        for &cell in &need.cells {
            if !into.cells.contains_key(&cell) {
                let tag = tag_of_coarse(crate::nearby::coarse_of(cell));
                let key = super::bucket_key(&tag, cell);
                by_tag.entry(tag).or_default().cells.push((cell, key));
            }
        }
        for &coarse in &need.coarse {
            if !into.coarse.contains_key(&coarse) {
                by_tag
                    .entry(tag_of_coarse(coarse))
                    .or_default()
                    .coarse
                    .push(coarse);
            }
        }
        // A region is a hash tag: its expiry ZSET lists its occupied cells.
        for &region in &need.regions {
            if !into.regions.contains_key(&region) {
                by_tag
                    .entry(region.to_string())
                    .or_default()
                    .regions
                    .push(region);
            }
        }
        // One server: everything in one pipeline. A Cluster: one per slot, concurrently.
        let groups: Vec<Group> = if self.conn.clustered() {
            by_tag.into_values().collect()
        } else {
            let mut all = Group::default();
            for group in by_tag.into_values() {
                all.cells.extend(group.cells);
                all.coarse.extend(group.coarse);
                all.regions.extend(group.regions);
            }
            vec![all]
        };
        let mut pipes = Vec::new();
        for group in groups {
            if group.cells.is_empty() && group.coarse.is_empty() && group.regions.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            if !group.cells.is_empty() {
                let get = pipe.cmd("MGET");
                for (_, bucket) in &group.cells {
                    get.arg(bucket);
                }
            }
            for &c in &group.coarse {
                pipe.cmd("SMEMBERS")
                    .arg(occupancy_key(&tag_of_coarse(c), c));
            }
            for &r in &group.regions {
                pipe.cmd("ZRANGE")
                    .arg(super::expiry_key(&r.to_string()))
                    .arg(0)
                    .arg(REGION_LIST_MAX);
            }
            pipes.push((group, pipe));
        }
        // Several pipelines (one per slot) are sent at once from this task, those of one
        // master's slots as one pipeline (`Conn::reads`).
        let (groups, pipes): (Vec<Group>, Vec<redis::Pipeline>) = pipes.into_iter().unzip();
        let replies = self.conn.reads(&pipes).await;
        for (group, replies) in groups.into_iter().zip(replies) {
            into.put_replies(group, replies?);
        }
        Ok(())
    }

    /// Removes members whose ping expired by `now_ms`, tag by tag; returns how many.
    /// Any replica may run it (each step is idempotent), and reads never wait for it.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the store does not answer.
    pub async fn sweep(&self, now_ms: i64) -> Result<usize> {
        self.sweep_by(now_ms, SWEEP_BATCH).await
    }

    /// [`Self::sweep`], handling up to `batch` due cells per call.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the store does not answer.
    pub async fn sweep_by(&self, now_ms: i64, batch: usize) -> Result<usize> {
        let tags: Vec<String> = self
            .conn
            .query(redis::cmd("SMEMBERS").arg(TAGS_KEY))
            .await?;
        let mut removed = 0;
        for tag in tags {
            loop {
                let expire = redis::cmd("FCALL")
                    .arg("gm_expire")
                    .arg(1)
                    .arg(super::expiry_key(&tag))
                    .arg(now_ms)
                    .arg(batch)
                    .arg(format!("gm1:{{{tag}}}:b:"))
                    .arg(format!("gm1:{{{tag}}}:o:"))
                    .arg(self.conn.tell_mode())
                    .arg(super::change_channel(&tag))
                    .clone();
                // Entries handled, not members removed, tell whether more are due: the
                // entry of a cell whose members pinged again is moved on, not removed.
                let (n, due): (usize, usize) = self.conn.query(&expire).await?;
                removed += n;
                if due < batch.max(1) {
                    break;
                }
            }
        }
        Ok(removed)
    }
}

/// The sweep lease: who sweeps the store now.
const LEASE_KEY: &str = "gm1:sweep-lease";

/// What `gm_del` did with a member.
enum Taken {
    /// Taken out: its fields.
    Removed(Vec<u8>),
    /// Kept, being newer: its fields.
    Newer(Vec<u8>),
    /// Not there.
    Absent,
}

/// A member as a cell stores it: id length, id, fields.
fn stored_member(user: &str, fields: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(1 + user.len() + fields.len());
    stored.push(u8::try_from(user.len()).unwrap_or(0));
    stored.extend_from_slice(user.as_bytes());
    stored.extend_from_slice(fields);
    stored
}

/// A random name for this replica (hex of 64 random bits).
pub(super) fn replica_name() -> std::result::Result<String, StoreError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b)
        .map_err(|e| StoreError::Unreachable(format!("no randomness for the replica name: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The page-token key every replica shares: the store's, made by the first replica that
/// finds none.
async fn token_key(conn: &Conn) -> std::result::Result<[u8; 32], StoreError> {
    let mut fresh = [0u8; 32];
    getrandom::fill(&mut fresh)
        .map_err(|e| StoreError::Unreachable(format!("no randomness for the token key: {e}")))?;
    let _: bool = conn
        .query(
            redis::cmd("HSETNX")
                .arg(super::META_KEY)
                .arg("token_key")
                .arg(&fresh[..]),
        )
        .await?;
    let key: Vec<u8> = conn
        .query(redis::cmd("HGET").arg(super::META_KEY).arg("token_key"))
        .await?;
    key.try_into()
        .map_err(|_| StoreError::Incompatible("the store's page-token key is not 32 bytes".into()))
}
