//! The query engine: who is near a point, nearest first, one page at a time.
//!
//! Two passes over the privacy cells in ring order ([`Walk`]): the first counts eligible
//! users per cell without copying them, until the page is provably complete (every ring
//! carries a lower bound on the distance to anything in it or beyond); the second copies
//! out just the users that make the page. Distances run from the searcher's exact position
//! to each other user's snapped position (their privacy cell's centre): membership, order
//! and the reported band all use that one figure, so a search costs one distance per cell.

use hashbrown::HashSet;

use h3o::{CellIndex, LatLng};

use super::{
    Found, Gender, NearbyConfig, Query, SearchPage, SearchRequest,
    bucket::{self, Member},
    maps::{COARSE_RESOLUTION, Maps},
    source::{CellSource, Missed, Need, Walked},
    token::{Cursor, PageTokens, Scope},
};
use crate::{
    error::{Error, Result},
    geo::{
        band_m,
        cell::{Ring, RingCover, max_circumradius_m},
        centre, distance_key, distance_m,
    },
    id::UserId,
};

/// Privacy-cell rings a search walks before switching to the coarse map (rings 0-5: 91
/// cells, a 1 km search at resolution 9): dense searches finish within them, wide sparse
/// ones go on coarse.
const FINE_RINGS: u32 = 6;

/// Cells of a sparse-country walk handed to the search at a time: its page can stop after
/// any batch (each carries the bound of its nearest cell), so a search that finds its page
/// among the nearest cells reads no other bucket.
pub(super) const SPARSE_BATCH: usize = 16;

/// Validates a search as received into a [`Query`]: radius and page size by the index's
/// rules, the page token by its key and the query it was issued for.
pub(crate) fn query(cfg: &NearbyConfig, tokens: &PageTokens, req: &SearchRequest) -> Result<Query> {
    let radius = cfg.radius.apply(req.radius_m)?;
    let limit = cfg.page.apply(req.limit)?;
    let mut q = Query {
        searcher: req.searcher.clone(),
        centre: req.centre,
        radius,
        limit,
        gender: req.gender,
        after: None,
    };
    if !req.page_token.is_empty() {
        q.after = Some(
            tokens
                .decode(&scope(&q), &req.page_token)
                .map_err(|e| Error::invalid("page_token", e.to_string()))?,
        );
    }
    Ok(q)
}

/// What a page token is bound to: the query, less its cursor.
fn scope(q: &Query) -> Scope<'_> {
    let centre = q.centre.latlng();
    Scope {
        searcher: q.searcher.as_str(),
        lat: centre.lat(),
        lng: centre.lng(),
        radius_m: q.radius.m(),
        gender: q.gender.wire(),
    }
}

#[derive(Debug)]
struct Hit {
    key: u64,
    distance_m: f64,
    user: UserId,
    gender: Gender,
    last_seen_ms: i64,
    cell: CellIndex,
}

impl Hit {
    fn found(self) -> Found {
        Found {
            distance_m: band_m(self.distance_m),
            user: self.user,
            gender: self.gender,
            last_seen_ms: self.last_seen_ms,
            cell: self.cell,
        }
    }
}

/// One page of the visible users within the query's radius, nearest first (ties by user
/// id), with the token of the next page if there is one.
///
/// # Errors
/// [`Missed`] when `src` does not hold a batch the walk reached yet.
pub(crate) fn page<S: CellSource>(
    src: &S,
    tokens: &PageTokens,
    q: &Query,
    now_ms: i64,
) -> Walked<SearchPage, S> {
    let limit = q.limit.get();
    // One more than the page, to know whether another page follows.
    let need = limit + 1;
    let filter = Filter {
        searcher: &q.searcher,
        gender: q.gender,
        after: q.after.as_ref(),
        now_ms,
    };
    let mut hits = find(src, q.centre.latlng(), q.radius.m(), need, &filter)?;
    let next_page_token = (hits.len() > limit).then(|| {
        let last = &hits[limit - 1];
        tokens.encode(
            &scope(q),
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

/// Every user `filter` admits within `radius_m` of `centre`, nearest first (ties by id):
/// what a watch starts from.
///
/// # Errors
/// [`Missed`] as [`page`].
pub(crate) fn within<S: CellSource>(
    src: &S,
    centre: LatLng,
    radius_m: f64,
    filter: &Filter<'_>,
) -> Walked<Vec<Found>, S> {
    Ok(find(src, centre, radius_m, usize::MAX, filter)?
        .into_iter()
        .map(Hit::found)
        .collect())
}

impl Maps {
    /// [`page`] over the in-memory maps, which never miss.
    pub(super) fn search(&self, tokens: &PageTokens, q: &Query, now_ms: i64) -> SearchPage {
        match page(self, tokens, q, now_ms) {
            Ok(p) => p,
            Err(m) => match m.miss {},
        }
    }

    /// [`within`] over the in-memory maps, which never miss.
    pub(super) fn within(&self, centre: LatLng, radius_m: f64, filter: &Filter<'_>) -> Vec<Found> {
        match within(self, centre, radius_m, filter) {
            Ok(f) => f,
            Err(m) => match m.miss {},
        }
    }
}

/// The first `need` users `filter` admits within `radius` of `centre`, in result order.
fn find<S: CellSource>(
    src: &S,
    centre: LatLng,
    radius: f64,
    need: usize,
    filter: &Filter<'_>,
) -> Walked<Vec<Hit>, S> {
    let mut cover = Walk::new(src, centre, radius);
    let mut ring = Ring::default();
    let mut cands: Vec<Candidate> = Vec::new();
    let mut counted = 0usize;
    let mut pending = cover.next_ring(&mut ring)?;
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
            let mut missed: Option<S::Miss> = None;
            let mut missing = Vec::new();
            for &(cell, d) in &ring.cells {
                if d > radius {
                    continue;
                }
                let key = distance_key(d);
                if filter.after.is_some_and(|c| key < c.distance_key) {
                    continue;
                }
                // Counting stops at `need`: the walk only ever compares counts with
                // `need`, and a crowded cell then costs what a page does.
                let counted_here = src.bucket(cell, |bucket| {
                    filter
                        .start(bucket, key)
                        .filter(|m| filter.matches(m))
                        .take(need)
                        .count()
                });
                let eligible = match counted_here {
                    Ok(Some(n)) => n,
                    Ok(None) => continue,
                    Err(m) => {
                        missed.get_or_insert(m);
                        missing.push(cell);
                        continue;
                    }
                };
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
            if let Some(miss) = missed {
                missing.extend(cover.ahead());
                return Err(Missed {
                    need: Need {
                        cells: missing,
                        ..Need::default()
                    },
                    miss,
                });
            }
            pending = cover.next_ring(&mut ring)?;
        }
        // Pass 2: copy out just the users that make the page, nearest cells first.
        cands.sort_unstable_by_key(|c| (c.key, c.cell));
        let hits = collect(src, &cands, need, filter)?;
        // Buckets may have changed between the passes (moves, expiry): make sure the
        // page is still provably complete, or walk on.
        let complete = !pending
            || (hits.len() >= need && hits[need - 1].key < distance_key(ring.lower_bound_m));
        if complete {
            return Ok(hits);
        }
        recheck = true;
    }
}

/// Copies the first `need` eligible users out of `cands` (sorted by distance), in result
/// order. Cells at exactly the same distance are merged by user id; a user seen twice
/// (moved between two cells during the search) is kept once, at the nearer cell.
fn collect<S: CellSource>(
    src: &S,
    cands: &[Candidate],
    need: usize,
    filter: &Filter<'_>,
) -> Walked<Vec<Hit>, S> {
    let mut hits: Vec<Hit> = Vec::with_capacity(need.min(1_024));
    // SipHash (std's keyed hasher): user ids are chosen by clients, and a group of cells
    // at one distance can hold more ids than the page, so the set must stay fast whatever
    // they are. (The walk's `visited` set holds cells, which geometry chooses.)
    let mut seen: std::collections::HashSet<UserId> =
        std::collections::HashSet::with_capacity(need.min(1_024));
    let mut group_start = 0;
    while group_start < cands.len() && hits.len() < need {
        let key = cands[group_start].key;
        let group_end = cands[group_start..]
            .iter()
            .position(|c| c.key != key)
            .map_or(cands.len(), |n| group_start + n);
        let first_new = hits.len();
        let single = group_end - group_start == 1;
        for c in &cands[group_start..group_end] {
            let copied = src.bucket(c.cell, |bucket| {
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
                        cell: c.cell,
                    });
                    // A lone cell is already in id order: stop as soon as the page is full.
                    if single && hits.len() == need {
                        break;
                    }
                }
            });
            if let Err(miss) = copied {
                // Pass 1 read this cell: only a source that forgot it can miss here.
                return Err(Missed {
                    need: Need {
                        cells: vec![c.cell],
                        ..Need::default()
                    },
                    miss,
                });
            }
            if single && hits.len() == need {
                break;
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
    Ok(hits)
}

/// The order a search visits privacy cells in: rings of privacy cells around the centre
/// first; then, for wide searches, coarse cells one at a time, nearest first, each expanded
/// into the occupied privacy cells it holds (skipping those already visited). Every batch
/// carries a lower bound on the distance to anything in it or in later batches, so the
/// search can stop as soon as its page is provably complete.
struct Walk<'a, S: CellSource> {
    src: &'a S,
    centre: LatLng,
    radius_m: f64,
    fine: RingCover,
    fine_rings: u32,
    visited: HashSet<CellIndex>,
    coarse: Option<RingCover>,
    coarse_circumradius_m: f64,
    /// No point outside the walked privacy-cell disk is nearer than this.
    beyond_fine_m: f64,
    /// Coarse cells of the current coarse ring not yet visited, farthest first.
    current: Vec<(CellIndex, f64)>,
    /// The next coarse ring, fetched ahead so its bound is known.
    lookahead: Ring,
    lookahead_valid: bool,
    /// Reused for the occupied cells of one coarse cell.
    scratch: Vec<CellIndex>,
    /// In sparse country, every cell the walk needs ([`CellSource::sparse`]), nearest
    /// first, handed out [`SPARSE_BATCH`] at a time; once they are, the walk is over.
    sparse: Option<Vec<(CellIndex, f64)>>,
    /// Cells of `sparse` handed out so far.
    sparse_at: usize,
    /// The region lists the source must fetch before the shortcut can tell (given out
    /// by the first [`Self::next_ring`]; boxed: a remote store's rare case, kept out of
    /// the way of every walk).
    regions_missed: Option<Box<Missed<S::Miss>>>,
}

impl<'a, S: CellSource> Walk<'a, S> {
    fn new(src: &'a S, centre: LatLng, radius_m: f64) -> Self {
        let fine = RingCover::new(centre, src.resolution(), radius_m);
        let (sparse, regions_missed) = match src.sparse(centre, fine.origin(), radius_m) {
            Ok(cells) => (
                cells.map(|mut cells| {
                    cells.sort_unstable_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
                    cells
                }),
                None,
            ),
            Err((regions, miss)) => (
                None,
                Some(Box::new(Missed {
                    need: Need {
                        regions,
                        ..Need::default()
                    },
                    miss,
                })),
            ),
        };
        Self {
            src,
            centre,
            radius_m,
            fine,
            fine_rings: 0,
            visited: HashSet::default(),
            coarse: None,
            coarse_circumradius_m: max_circumradius_m(COARSE_RESOLUTION),
            beyond_fine_m: 0.0,
            current: Vec::new(),
            lookahead: Ring::default(),
            lookahead_valid: false,
            scratch: Vec::new(),
            sparse,
            sparse_at: 0,
            regions_missed,
        }
    }

    /// The privacy cells a remote source should fetch along with a missed ring. In the
    /// fine disk, ring 0 brings rings 1 and 2, and later rings come one at a time: what a
    /// store sends is the members of the cells fetched, so a dense search (done within
    /// ring 2) reads 19 cells in one round trip, not the disk's 91. In the coarse walk,
    /// the occupied cells of the rest of the current coarse ring (those whose occupancy
    /// is known) come at once.
    fn ahead(&self) -> Vec<CellIndex> {
        let mut out = Vec::new();
        if self.coarse.is_none() {
            let mut rest = self.fine.clone();
            let mut ring = Ring::default();
            let more = (2 * u32::from(self.fine_rings == 1)).min(FINE_RINGS - self.fine_rings);
            for _ in 0..more {
                if !rest.next_ring(&mut ring) {
                    break;
                }
                out.extend(
                    ring.cells
                        .iter()
                        .filter(|(_, d)| *d <= self.radius_m)
                        .map(|&(c, _)| c),
                );
            }
        } else {
            let mut list = Vec::new();
            for &(coarse, _) in &self.current {
                list.clear();
                if self.src.occupied(coarse, &mut list).is_ok() {
                    out.extend(list.iter().filter(|c| !self.visited.contains(*c)));
                }
            }
        }
        out
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

    fn next_ring(&mut self, ring: &mut Ring) -> Walked<bool, S> {
        if let Some(missed) = self.regions_missed.take() {
            return Err(*missed);
        }
        if let Some(cells) = &self.sparse {
            // Every occupied cell near the centre, nearest first: no cell of this batch or
            // a later one is nearer than its first, and nothing lies beyond them all.
            let batch = cells.get(self.sparse_at..).unwrap_or_default();
            let Some(&(_, nearest)) = batch.first() else {
                return Ok(false);
            };
            let n = batch.len().min(SPARSE_BATCH);
            ring.cells.clear();
            ring.cells.extend_from_slice(&batch[..n]);
            ring.lower_bound_m = nearest;
            self.sparse_at += n;
            return Ok(true);
        }
        if self.coarse.is_none() {
            if !self.fine.next_ring(ring) {
                return Ok(false);
            }
            if self.fine_rings < FINE_RINGS {
                self.fine_rings += 1;
                return Ok(true);
            }
            // The ring just computed is the first one outside the fine disk: its bound holds
            // for everything not yet visited. Go coarse from here. (The visited set is built
            // only now: most searches never get here.)
            self.beyond_fine_m = ring.lower_bound_m;
            let origin = self.centre.to_cell(self.src.resolution());
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
                return Ok(false);
            }
        }
        let Some(&(coarse_cell, d)) = self.current.last() else {
            return Ok(false);
        };
        ring.cells.clear();
        let mut list = std::mem::take(&mut self.scratch);
        list.clear();
        if let Err(miss) = self.src.occupied(coarse_cell, &mut list) {
            // Fetch the occupancy of the whole coarse ring at once.
            return Err(Missed {
                need: Need {
                    coarse: self.current.iter().map(|&(c, _)| c).collect(),
                    ..Need::default()
                },
                miss,
            });
        }
        self.current.pop();
        // Later coarse cells of this ring are farther (sorted); later rings are bounded by
        // the lookahead ring's bound.
        let later_rings = if self.lookahead_valid {
            self.lookahead.lower_bound_m
        } else {
            f64::INFINITY
        };
        let this_and_rest = (d - self.coarse_circumradius_m).min(later_rings);
        ring.lower_bound_m = this_and_rest.max(self.beyond_fine_m).max(0.0);
        for &cell in &list {
            if !self.visited.contains(&cell) {
                ring.cells
                    .push((cell, distance_m(self.centre, centre::centre(cell))));
            }
        }
        self.scratch = list;
        Ok(true)
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
pub(crate) struct Filter<'a> {
    pub(super) searcher: &'a UserId,
    pub(super) gender: Gender,
    pub(super) after: Option<&'a Cursor>,
    pub(super) now_ms: i64,
}

impl Filter<'_> {
    pub(super) fn matches(&self, m: &Member<'_>) -> bool {
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
