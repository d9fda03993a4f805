//! WatchNearby over Redis / Valkey: a watch open on one replica reports ENTER / LEAVE for
//! pings, clears, expiries and visibility changes made through any replica.
//!
//! Every change of a member is told by the Function that makes it, on its tag's change
//! channel (`gm1:c:{T}`, sharded in a Cluster, so the message goes out from the node that
//! holds the tag). A replica subscribes to the tags its open watches cover and feeds each
//! change to its own watch registry, the same one the in-memory index uses (the same
//! ENTER / LEAVE rule, hysteresis and buffers). A watch opens by subscribing first, then
//! pausing the changes while it scans the store for everyone inside; changes that arrived
//! meanwhile are applied after the scan, and the rule is decided from state, so none is
//! missed or reported twice.
//!
//! Messages of one tag arrive in the order they were made. Across tags (a user moving
//! from one tag to another) they may not: each change carries the member's last-seen time,
//! and a change older than one already applied for that user is dropped. A move is told
//! twice, as the member put in the new cell and as the member that moved out of the old
//! one (`M`, naming the new cell and member), so whichever arrives first reports the move
//! and the other changes nothing: a move is never mistaken for a LEAVE. The sweep's
//! removals are told like any other, so expiries produce LEAVE once a replica sweeps.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use h3o::{CellIndex, LatLng, Resolution};
use tokio::{sync::mpsc::UnboundedReceiver, task::JoinHandle};

use super::{
    RedisNearby, StoreError, Target, change_channel,
    pubsub::{Subscription, message},
    tag_of_coarse,
};
use crate::{
    error::{Error, Result},
    geo::{
        Coordinates,
        cell::{Centres, RingCover},
    },
    nearby::{NearbyIndex, SearchRequest, Watch, WatchRequest, bucket},
};

/// The watches of this replica over a remote store.
#[derive(Debug)]
pub(super) struct RemoteWatches {
    index: Arc<NearbyIndex>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// The newest change applied for a user: its cell (when it came from a change, not a
/// scan) and the member's last-seen time.
type Latest = (Option<CellIndex>, i64);

#[derive(Debug)]
struct Shared {
    /// Open watches per tag they cover.
    tags: Mutex<HashMap<String, usize>>,
    /// The newest change applied for each user of the watched tags: its cell (when it came
    /// from a change) and the member's last-seen time.
    latest: Mutex<HashMap<Box<[u8]>, Latest>>,
    /// Held while a watch scans: changes arriving meanwhile wait until it has opened.
    gate: tokio::sync::Mutex<()>,
    /// The store, to re-scan a watch whose watcher moved (set once it exists).
    store: std::sync::OnceLock<std::sync::Weak<RedisNearby>>,
    /// The tags around where each watcher moved to, kept subscribed while they watch.
    followed: Mutex<HashMap<Box<[u8]>, TagLease>>,
    /// The subscription connection the tags are subscribed on.
    sub: Subscription,
}

impl Drop for RemoteWatches {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps a watch's tags subscribed while it is open.
#[derive(Debug)]
pub struct TagLease {
    tags: Vec<String>,
    shared: Arc<Shared>,
    /// A stream's lease: its watcher, whose followed tags go too once its last watch does.
    watcher: Option<(Box<[u8]>, Arc<NearbyIndex>)>,
}

impl Drop for TagLease {
    fn drop(&mut self) {
        if let Some((watcher, index)) = &self.watcher
            && std::str::from_utf8(watcher).is_ok_and(|w| index.watches_of(w).is_empty())
        {
            let followed = self
                .shared
                .followed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(watcher);
            drop(followed);
        }
        let mut gone = Vec::new();
        {
            let mut tags = self
                .shared
                .tags
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for t in &self.tags {
                if let Some(n) = tags.get_mut(t) {
                    *n -= 1;
                    if *n == 0 {
                        tags.remove(t);
                        gone.push(t.clone());
                    }
                }
            }
            if tags.is_empty() {
                self.shared
                    .latest
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
            }
        }
        if gone.is_empty() {
            return;
        }
        let sub = self.shared.sub.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for t in gone {
                    let _ = sub.unsubscribe(&change_channel(&t)).await;
                }
            });
        }
    }
}

impl RemoteWatches {
    /// Opens the change subscription to `target`; changes go to `index`'s watches.
    ///
    /// # Errors
    /// [`StoreError::Unreachable`] when the subscription cannot be made.
    pub(super) async fn open(
        target: &Target,
        timeout: std::time::Duration,
        index: Arc<NearbyIndex>,
    ) -> std::result::Result<Self, StoreError> {
        let (sub, rx) = Subscription::open(target, timeout).await?;
        let shared = Arc::new(Shared {
            tags: Mutex::default(),
            latest: Mutex::default(),
            gate: tokio::sync::Mutex::default(),
            store: std::sync::OnceLock::new(),
            followed: Mutex::default(),
            sub,
        });
        let task = tokio::spawn(apply_all(rx, index.clone(), shared.clone()));
        Ok(Self {
            index,
            shared,
            task,
        })
    }

    /// Opens a watch for `req`, centred on the watcher's own privacy cell as the store
    /// holds it.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] when the watcher has no location;
    /// [`Error::ResourceExhausted`] when too many watches are open;
    /// [`Error::Unavailable`] when the store does not answer.
    pub(super) async fn watch(
        &self,
        store: &RedisNearby,
        req: &WatchRequest,
        now_ms: i64,
    ) -> Result<(Watch, TagLease)> {
        let Some(own) = store.status(&req.watcher, now_ms).await? else {
            return Err(Error::FailedPrecondition {
                field: "user_id",
                reason: "has no location: send UpdateLocation first".into(),
            });
        };
        let centre = LatLng::from(own.cell);
        let mut lease = self.subscribe(centre, req.radius.m()).await?;
        lease.watcher = Some((req.watcher.as_str().as_bytes().into(), self.index.clone()));
        let _paused = self.shared.gate.lock().await;
        let start = self.scan(store, req, centre, now_ms).await?;
        {
            let mut latest = self
                .shared
                .latest
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for f in &start {
                let seen = latest
                    .entry(f.user.as_str().as_bytes().into())
                    .or_insert((None, f.last_seen_ms));
                seen.1 = seen.1.max(f.last_seen_ms);
            }
        }
        let watch = self.index.watch_from(req, centre, start)?;
        Ok((watch, lease))
    }

    /// Lets watches follow their watchers' pings, re-scanning through `store`.
    pub(super) fn follow_through(&self, store: std::sync::Weak<RedisNearby>) {
        let _ = self.shared.store.set(store);
    }

    /// Subscribes to every tag a watch of `radius_m` around `centre` covers.
    async fn subscribe(&self, centre: LatLng, radius_m: f64) -> Result<TagLease> {
        subscribe(&self.index, &self.shared, centre, radius_m).await
    }

    /// Everyone the watch admits within its radius, as the store holds them now.
    async fn scan(
        &self,
        store: &RedisNearby,
        req: &WatchRequest,
        centre: LatLng,
        now_ms: i64,
    ) -> Result<Vec<crate::nearby::Found>> {
        let mut found = Vec::new();
        let mut page_token = String::new();
        loop {
            let search = SearchRequest {
                searcher: req.watcher.clone(),
                centre: Coordinates::new("position", centre.lat(), centre.lng())?,
                radius_m: req.radius.m(),
                limit: store.config().page.max,
                gender: req.gender,
                page_token,
            };
            let page = store.search(&store.query(&search)?, now_ms).await?;
            found.extend(page.users);
            match page.next_page_token {
                Some(t) => page_token = t,
                None => return Ok(found),
            }
        }
    }
}

/// Subscribes to every tag a watch of `radius_m` around `centre` covers.
async fn subscribe(
    index: &NearbyIndex,
    shared: &Arc<Shared>,
    centre: LatLng,
    radius_m: f64,
) -> Result<TagLease> {
    // Members are filed by the coarse cell holding their privacy cell's centre, and
    // distances are measured to that centre: every coarse cell within the leave
    // radius may hold a member the watch cares about.
    let leave_m = index.watch_leave_radius_m(radius_m);
    let mut tags: Vec<String> =
        RingCover::cells_within(centre, Resolution::Seven, leave_m, Centres::Remembered)
            .into_iter()
            .map(|(c, _)| tag_of_coarse(c))
            .collect();
    tags.sort_unstable();
    tags.dedup();
    let fresh: Vec<String> = {
        let mut held = shared.tags.lock().unwrap_or_else(PoisonError::into_inner);
        tags.iter()
            .filter(|t| {
                let n = held.entry((*t).clone()).or_insert(0);
                *n += 1;
                *n == 1
            })
            .cloned()
            .collect()
    };
    let lease = TagLease {
        tags,
        shared: shared.clone(),
        watcher: None,
    };
    for t in fresh {
        shared.sub.subscribe(&change_channel(&t)).await?;
    }
    Ok(lease)
}

/// Moves `watcher`'s watches to `cell`'s centre in the background: subscribes to the tags
/// around it, then, with changes paused, re-scans the store for each watch and reports who
/// entered and who is now beyond the leave radius. `now` is the moving ping's own time
/// (as in memory, where a watch follows its watcher's ping at that ping's time).
fn follow(
    index: &Arc<NearbyIndex>,
    shared: &Arc<Shared>,
    watcher: String,
    cell: CellIndex,
    now: i64,
) {
    let Some(store) = shared.store.get().and_then(std::sync::Weak::upgrade) else {
        return;
    };
    let (index, shared) = (index.clone(), shared.clone());
    tokio::spawn(async move {
        let centre = LatLng::from(cell);
        let Ok(at) = Coordinates::new("position", centre.lat(), centre.lng()) else {
            return;
        };
        let Ok(who) = crate::id::UserId::new("user_id", &watcher) else {
            return;
        };
        let watches = index.watches_of(&watcher);
        let Some(widest) = watches.iter().map(|w| w.0).reduce(f64::max) else {
            return;
        };
        let Ok(lease) = subscribe(&index, &shared, centre, widest).await else {
            return;
        };
        let _paused = shared.gate.lock().await;
        let mut scans: Vec<((u64, crate::nearby::Gender, u64), Vec<crate::nearby::Found>)> =
            Vec::new();
        for (radius, leave, gender) in watches {
            for within in [radius, leave] {
                match store.within(&who, at, within, gender, now).await {
                    Ok(found) => scans.push(((radius.to_bits(), gender, within.to_bits()), found)),
                    // The store is away: the watch stays where it was.
                    Err(_) => return,
                }
            }
        }
        index.follow_elsewhere(&watcher, centre, |radius, gender, within| {
            scans
                .iter()
                .find(|(k, _)| *k == (radius.to_bits(), gender, within.to_bits()))
                .map(|(_, f)| f.clone())
                .unwrap_or_default()
        });
        shared
            .followed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(watcher.as_bytes().into(), lease);
    });
}

/// Applies every change message, in arrival order.
async fn apply_all(
    mut rx: UnboundedReceiver<redis::PushInfo>,
    index: Arc<NearbyIndex>,
    shared: Arc<Shared>,
) {
    while let Some(push) = rx.recv().await {
        let Some((_, payload)) = message(&push) else {
            continue;
        };
        let _open = shared.gate.lock().await;
        apply(&index, &shared, payload);
    }
}

/// A cell and what follows its `|`.
fn cell_then(b: &[u8]) -> Option<(CellIndex, &[u8])> {
    let bar = b.iter().position(|&c| c == b'|')?;
    let cell = std::str::from_utf8(&b[..bar]).ok()?.parse().ok()?;
    Some((cell, &b[bar + 1..]))
}

/// A member as stored: its id and fields, and its last-seen time.
fn stored(member: &[u8]) -> Option<(&[u8], &[u8], i64)> {
    let (&len, tail) = member.split_first()?;
    let (user, fields) = tail.split_at_checked(usize::from(len))?;
    let seen = bucket::from_fields(user, fields)?.last_seen_ms;
    Some((user, fields, seen))
}

/// One change: `P` (now in the cell) or `D` (gone from it), the cell, `|` and the member
/// as stored; or `M`, the cell moved from, `|`, the cell moved to, `|` and the new member.
fn apply(index: &Arc<NearbyIndex>, shared: &Arc<Shared>, payload: &[u8]) {
    let Some((&kind, rest)) = payload.split_first() else {
        return;
    };
    let Some((cell, rest)) = cell_then(rest) else {
        return;
    };
    let (from, cell, member) = if kind == b'M' {
        match cell_then(rest) {
            Some((to, member)) => (Some(cell), to, member),
            None => return,
        }
    } else {
        (None, cell, rest)
    };
    let Some((user, fields, seen)) = stored(member) else {
        return;
    };
    let mut latest = shared.latest.lock().unwrap_or_else(PoisonError::into_inner);
    if latest.get(user).is_some_and(|(_, s)| *s > seen) {
        // An older change than one already applied (it came through another tag).
        return;
    }
    match kind {
        b'P' | b'M' => {
            let before = latest
                .insert(user.into(), (Some(cell), seen))
                .and_then(|(c, _)| c);
            // A move names where it came from; a put, what this replica saw last.
            let old = if kind == b'M' { from } else { before };
            drop(latest);
            index.changed_elsewhere(user, old, Some((cell, fields)));
            // The watcher's own watches move with them (after this change is applied).
            if old != Some(cell)
                && let Ok(watcher) = std::str::from_utf8(user)
                && !index.watches_of(watcher).is_empty()
            {
                follow(index, shared, watcher.to_owned(), cell, seen);
            }
        }
        b'D' => {
            latest.remove(user);
            drop(latest);
            index.changed_elsewhere(user, Some(cell), None);
        }
        _ => {}
    }
}
