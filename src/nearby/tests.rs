//! Index behaviour against a brute-force model, TTLs, privacy and concurrency.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Barrier},
};

use h3o::{LatLng, Resolution};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::geo::{band_m, distance_key, distance_m, snapped};
use maps::{SHARDS, coarse_of};

impl NearbyIndex {
    /// Validates and runs a search as received, as the gRPC edge does.
    pub(super) fn search_raw(&self, req: &SearchRequest, now_ms: i64) -> Result<SearchPage> {
        Ok(self.search(&self.query(req)?, now_ms))
    }
}

const SHANGHAI: (f64, f64) = (31.2304, 121.4737);
const TTL: i64 = 15 * 60 * 1_000;

fn index() -> NearbyIndex {
    NearbyIndex::new(NearbyConfig::default(), PageTokens::new([3; 32]))
}

fn uid(s: &str) -> UserId {
    UserId::new("user_id", s).unwrap()
}

fn pos(lat: f64, lng: f64) -> Coordinates {
    Coordinates::new("position", lat, lng).unwrap()
}

fn query(
    searcher: &str,
    centre: Coordinates,
    radius_m: f64,
    limit: u32,
    gender: Gender,
) -> SearchRequest {
    SearchRequest {
        searcher: uid(searcher),
        centre,
        radius_m,
        limit,
        gender,
        page_token: String::new(),
    }
}

/// The ids of a page's users, in order.
fn ids(users: &[Found]) -> Vec<&str> {
    users.iter().map(|f| f.user.as_str()).collect()
}

/// Walks every page; fails if a page is over-long or a user repeats.
fn all_pages(idx: &NearbyIndex, mut q: SearchRequest, now: i64) -> Vec<Found> {
    let limit = if q.limit == 0 { 20 } else { q.limit as usize };
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let page = idx.search_raw(&q, now).unwrap();
        assert!(page.users.len() <= limit);
        if page.next_page_token.is_some() {
            assert_eq!(page.users.len(), limit, "a page before the last is full");
        }
        out.extend(page.users);
        match page.next_page_token {
            Some(t) => q.page_token = t,
            None => return out,
        }
    }
    panic!("pagination did not end");
}

#[derive(Clone)]
struct ModelUser {
    position: Coordinates,
    gender: Gender,
    last_seen: i64,
}

/// The brute-force reference: every visible user within the radius of the searcher's exact
/// position, measured to each user's snapped position, nearest first, ties by id.
fn brute_force(model: &HashMap<String, ModelUser>, q: &SearchRequest, now: i64) -> Vec<Found> {
    let radius = if q.radius_m == 0.0 {
        1_000.0
    } else {
        q.radius_m
    };
    let mut out: Vec<(u64, Found)> = model
        .iter()
        .filter(|(id, u)| {
            id.as_str() != q.searcher.as_str()
                && now < u.last_seen + TTL
                && (q.gender == Gender::Unspecified || q.gender == u.gender)
        })
        .filter_map(|(id, u)| {
            let d = distance_m(
                q.centre.latlng(),
                snapped(u.position.cell(Resolution::Nine)),
            );
            (d <= radius).then(|| {
                (
                    distance_key(d),
                    Found {
                        user: uid(id),
                        distance_m: band_m(d),
                        gender: u.gender,
                        last_seen_ms: u.last_seen,
                        cell: u.position.cell(Resolution::Nine),
                    },
                )
            })
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.user.cmp(&b.1.user)));
    out.into_iter().map(|(_, f)| f).collect()
}

fn random_gender(rng: &mut StdRng) -> Gender {
    [Gender::Unspecified, Gender::Female, Gender::Male][rng.random_range(0..3)]
}

#[test]
fn paginated_search_matches_brute_force_over_a_random_population() {
    let mut rng = StdRng::seed_from_u64(42);
    let idx = index();
    let mut model = HashMap::new();
    let mut now = 1_700_000_000_000;
    // A dense city blob plus a sparse scatter, with some users moving and some expiring.
    for i in 0..4_000 {
        let (lat, lng) = if i % 5 == 0 {
            (
                SHANGHAI.0 + rng.random_range(-0.2..0.2),
                SHANGHAI.1 + rng.random_range(-0.2..0.2),
            )
        } else {
            (
                SHANGHAI.0 + rng.random_range(-0.03..0.03),
                SHANGHAI.1 + rng.random_range(-0.03..0.03),
            )
        };
        let id = format!("user:{:012}", rng.random_range(0..3_000));
        let u = ModelUser {
            position: pos(lat, lng),
            gender: random_gender(&mut rng),
            last_seen: now,
        };
        idx.update(uid(&id), u.position, u.gender, now);
        model.insert(id, u);
        now += rng.random_range(0..400);
    }
    for _ in 0..120 {
        let centre = pos(
            SHANGHAI.0 + rng.random_range(-0.05..0.05),
            SHANGHAI.1 + rng.random_range(-0.05..0.05),
        );
        let radius = [0.0, 150.0, 1_000.0, 2_500.0, 10_000.0][rng.random_range(0..5)];
        let limit = [0, 1, 7, 50, 100][rng.random_range(0..5)];
        let searcher = format!("user:{:012}", rng.random_range(0..3_000));
        let q = query(&searcher, centre, radius, limit, random_gender(&mut rng));
        let at = now + rng.random_range(0..TTL);
        let got = all_pages(&idx, q.clone(), at);
        let want = brute_force(&model, &q, at);
        assert_eq!(got.len(), want.len(), "radius {radius}, limit {limit}");
        assert_eq!(got, want, "radius {radius}, limit {limit}");
    }
}

#[test]
fn pagination_is_exact_when_everyone_shares_one_cell() {
    // Many users with one snapped position: order is by id alone, and pages split ties.
    let idx = index();
    let now = 1_000;
    for i in 0..257 {
        idx.update(
            uid(&format!("u{i:04}")),
            pos(SHANGHAI.0, SHANGHAI.1),
            Gender::Female,
            now,
        );
    }
    assert_eq!(idx.cell_count(), 1);
    let got = all_pages(
        &idx,
        query(
            "me",
            pos(SHANGHAI.0, SHANGHAI.1),
            0.0,
            10,
            Gender::Unspecified,
        ),
        now,
    );
    let ids: Vec<_> = got.iter().map(|f| f.user.to_string()).collect();
    let want: Vec<_> = (0..257).map(|i| format!("u{i:04}")).collect();
    assert_eq!(ids, want);
}

#[test]
fn last_write_wins_and_a_moved_user_is_in_exactly_one_cell() {
    let idx = index();
    let old = pos(SHANGHAI.0, SHANGHAI.1);
    let new = pos(SHANGHAI.0 + 0.05, SHANGHAI.1);
    idx.update(uid("alice"), old, Gender::Female, 1_000);
    let placed = idx.update(uid("alice"), new, Gender::Male, 2_000);
    assert_eq!(placed.cell, new.cell(Resolution::Nine));
    assert_eq!(placed.expires_at_ms, 2_000 + TTL);
    assert_eq!((idx.len(), idx.cell_count()), (1, 1));
    let near_old = idx
        .search_raw(&query("me", old, 1_000.0, 0, Gender::Unspecified), 2_000)
        .unwrap();
    assert!(near_old.users.is_empty());
    let near_new = idx
        .search_raw(&query("me", new, 1_000.0, 0, Gender::Unspecified), 2_000)
        .unwrap();
    assert_eq!(near_new.users.len(), 1);
    assert_eq!(near_new.users[0].gender, Gender::Male);
    assert_eq!(near_new.users[0].last_seen_ms, 2_000);
}

#[test]
fn the_searcher_is_never_in_its_own_results() {
    let idx = index();
    let p = pos(SHANGHAI.0, SHANGHAI.1);
    idx.update(uid("me"), p, Gender::Female, 0);
    idx.update(uid("you"), p, Gender::Female, 0);
    let page = idx
        .search_raw(&query("me", p, 0.0, 0, Gender::Unspecified), 0)
        .unwrap();
    assert_eq!(ids(&page.users), ["you"]);
}

#[test]
fn pings_expire_after_the_ttl_and_the_sweep_reclaims_them() {
    let idx = index();
    let p = pos(SHANGHAI.0, SHANGHAI.1);
    idx.update(uid("old"), p, Gender::Female, 0);
    idx.update(uid("fresh"), p, Gender::Female, 60_000);
    let q = query("me", p, 0.0, 0, Gender::Unspecified);
    assert_eq!(idx.search_raw(&q, TTL - 1).unwrap().users.len(), 2);
    let later = idx.search_raw(&q, TTL).unwrap();
    assert_eq!(ids(&later.users), ["fresh"]);
    // Memory is reclaimed by the sweep, not only hidden.
    assert_eq!(idx.sweep(TTL), 1);
    assert_eq!((idx.len(), idx.cell_count()), (1, 1));
    assert_eq!(idx.sweep(TTL + 60_000), 1);
    assert_eq!((idx.len(), idx.cell_count()), (0, 0));
    // An expired user no longer "exists" for ClearLocation.
    idx.update(uid("gone"), p, Gender::Female, 0);
    assert!(!idx.clear(&uid("gone"), TTL));
    assert!(idx.is_empty());
}

#[test]
fn clear_removes_from_both_maps() {
    let idx = index();
    let p = pos(SHANGHAI.0, SHANGHAI.1);
    idx.update(uid("alice"), p, Gender::Female, 0);
    assert!(idx.clear(&uid("alice"), 1));
    assert!(!idx.clear(&uid("alice"), 1));
    assert_eq!((idx.len(), idx.cell_count()), (0, 0));
}

#[test]
fn users_in_one_privacy_cell_are_indistinguishable_but_for_their_id() {
    let idx = index();
    let cell = pos(SHANGHAI.0, SHANGHAI.1).cell(Resolution::Nine);
    let centre = LatLng::from(cell);
    // Two users at different exact spots inside the same cell ("z" nearer the searcher).
    let searcher = pos(centre.lat() + 0.004, centre.lng());
    idx.update(
        uid("a"),
        pos(centre.lat() - 0.0004, centre.lng()),
        Gender::Female,
        0,
    );
    idx.update(
        uid("z"),
        pos(centre.lat() + 0.0004, centre.lng()),
        Gender::Female,
        0,
    );
    assert_eq!(idx.cell_count(), 1);
    let page = idx
        .search_raw(&query("me", searcher, 0.0, 0, Gender::Unspecified), 0)
        .unwrap();
    assert_eq!(ids(&page.users), ["a", "z"]);
    let d = distance_m(searcher.latlng(), centre);
    assert_eq!(page.users[0].distance_m, band_m(d));
    assert_eq!(page.users[1].distance_m, band_m(d));
}

#[test]
fn gender_filter_keeps_only_that_gender() {
    let idx = index();
    let p = pos(SHANGHAI.0, SHANGHAI.1);
    idx.update(uid("f"), p, Gender::Female, 0);
    idx.update(uid("m"), p, Gender::Male, 0);
    idx.update(uid("u"), p, Gender::Unspecified, 0);
    let only = |g| {
        idx.search_raw(&query("me", p, 0.0, 0, g), 0)
            .unwrap()
            .users
            .into_iter()
            .map(|f| f.user.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(only(Gender::Female), ["f"]);
    assert_eq!(only(Gender::Male), ["m"]);
    assert_eq!(only(Gender::Unspecified), ["f", "m", "u"]);
}

#[test]
fn bad_queries_name_their_field_and_tokens_are_bound_to_the_query() {
    let idx = index();
    let p = pos(SHANGHAI.0, SHANGHAI.1);
    for i in 0..5 {
        idx.update(uid(&format!("u{i}")), p, Gender::Female, 0);
    }
    let field = |q: &SearchRequest| match idx.search_raw(q, 0) {
        Err(Error::InvalidArgument { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    for r in [-1.0, f64::NAN, f64::INFINITY, 10_000.5] {
        assert_eq!(
            field(&query("me", p, r, 0, Gender::Unspecified)),
            "radius_m"
        );
    }
    assert_eq!(
        field(&query("me", p, 0.0, 101, Gender::Unspecified)),
        "limit"
    );
    let mut q = query("me", p, 0.0, 2, Gender::Unspecified);
    q.page_token = "not-a-token".into();
    assert_eq!(field(&q), "page_token");
    // A real token replayed with another radius is refused.
    q.page_token = String::new();
    let token = idx.search_raw(&q, 0).unwrap().next_page_token.unwrap();
    q.page_token = token.clone();
    assert!(idx.search_raw(&q, 0).is_ok());
    q.radius_m = 500.0;
    assert_eq!(field(&q), "page_token");
    // The page size may change between pages.
    q.radius_m = 0.0;
    q.limit = 3;
    assert_eq!(idx.search_raw(&q, 0).unwrap().users.len(), 3);
}

#[test]
fn searches_concurrent_with_moves_never_return_a_user_twice() {
    let idx = Arc::new(index());
    let a = pos(SHANGHAI.0, SHANGHAI.1);
    let b = pos(SHANGHAI.0 + 0.003, SHANGHAI.1);
    let users: Vec<_> = (0..200).map(|i| uid(&format!("u{i:03}"))).collect();
    for u in &users {
        idx.update(u.clone(), a, Gender::Female, 0);
    }
    let barrier = Arc::new(Barrier::new(4));
    std::thread::scope(|s| {
        for t in 0..2 {
            let (idx, barrier, users) = (idx.clone(), barrier.clone(), users.clone());
            s.spawn(move || {
                barrier.wait();
                for round in 0..200 {
                    for u in users.iter().skip(t).step_by(2) {
                        idx.update(
                            u.clone(),
                            if round % 2 == 0 { b } else { a },
                            Gender::Female,
                            0,
                        );
                    }
                }
            });
        }
        for _ in 0..2 {
            let (idx, barrier) = (idx.clone(), barrier.clone());
            s.spawn(move || {
                barrier.wait();
                for _ in 0..300 {
                    let page = idx
                        .search_raw(&query("me", a, 2_000.0, 100, Gender::Unspecified), 0)
                        .unwrap();
                    let mut seen = HashSet::new();
                    for f in &page.users {
                        assert!(seen.insert(f.user.clone()), "{} returned twice", f.user);
                    }
                }
            });
        }
    });
    assert_coarse_consistent(&idx);
    // Afterwards every user is in exactly one bucket, the one the users map names.
    assert_eq!(idx.len(), users.len());
    assert_users_consistent(&idx);
}

/// Every entry of the users map finds its user, in the one bucket that holds it.
fn assert_users_consistent(idx: &NearbyIndex) {
    let mut members = Vec::new();
    for shard in 0..SHARDS {
        for (cell, b) in idx.maps.cells.read(shard).iter() {
            assert!(!b.is_empty(), "empty bucket kept");
            for m in bucket::iter(b) {
                members.push((m.user.to_vec(), cell));
            }
        }
    }
    assert_eq!(members.len(), idx.len(), "one entry per member");
    assert_eq!(
        idx.maps.users.len(),
        idx.len(),
        "the count matches the users map"
    );
    for (user, cell) in &members {
        let slot = idx.maps.users.slot(user);
        let table = idx.maps.users.tables.read(slot.shard);
        let found = table.find(slot.hash(), |&e| idx.maps.is_entry_of(&slot, e, user));
        assert_eq!(found.and_then(|&e| idx.maps.codec.unpack(e)), Some(*cell));
    }
    let distinct: HashSet<&Vec<u8>> = members.iter().map(|(u, _)| u).collect();
    assert_eq!(distinct.len(), members.len(), "a user in two buckets");
}

/// The coarse map lists exactly the occupied privacy cells, each once, under its centre's
/// coarse cell.
fn assert_coarse_consistent(idx: &NearbyIndex) {
    let mut listed = Vec::new();
    for shard in 0..SHARDS {
        for (key, list) in idx.maps.coarse.read(shard).iter() {
            assert!(!list.is_empty(), "empty coarse list kept");
            assert!(list.iter().all(|c| coarse_of(*c) == key));
            listed.extend_from_slice(list);
        }
    }
    listed.sort_unstable();
    let mut occupied: Vec<CellIndex> = Vec::new();
    for shard in 0..SHARDS {
        occupied.extend(idx.maps.cells.read(shard).keys());
    }
    occupied.sort_unstable();
    assert_eq!(listed, occupied);
}

#[test]
fn wide_sparse_searches_find_far_users_exactly_at_the_edge() {
    let idx = index();
    let centre = pos(SHANGHAI.0, SHANGHAI.1);
    // Users along a line north, every 250 m out to 12 km: the coarse phase must find
    // exactly those whose snapped position is within 10 km.
    for i in 0..48 {
        let p = pos(SHANGHAI.0 + f64::from(i) * 250.0 / 111_195.0, SHANGHAI.1);
        idx.update(uid(&format!("u{i:02}")), p, Gender::Female, 0);
    }
    let q = query("me", centre, 10_000.0, 100, Gender::Unspecified);
    let got: Vec<_> = all_pages(&idx, q, 0)
        .into_iter()
        .map(|f| f.user.to_string())
        .collect();
    let mut want: Vec<(u64, String)> = (0..48)
        .filter_map(|i| {
            let p = pos(SHANGHAI.0 + f64::from(i) * 250.0 / 111_195.0, SHANGHAI.1);
            let d = distance_m(centre.latlng(), snapped(p.cell(Resolution::Nine)));
            (d <= 10_000.0).then(|| (distance_key(d), format!("u{i:02}")))
        })
        .collect();
    want.sort();
    assert_eq!(got, want.into_iter().map(|(_, u)| u).collect::<Vec<_>>());
    assert!(got.len() > 35, "far users found: {}", got.len());
    assert_coarse_consistent(&idx);
}

#[test]
fn the_coarse_map_follows_moves_clears_and_sweeps() {
    let idx = index();
    let mut rng = StdRng::seed_from_u64(8);
    for round in 0..5 {
        for i in 0..300 {
            let p = pos(
                SHANGHAI.0 + rng.random_range(-0.3..0.3),
                SHANGHAI.1 + rng.random_range(-0.3..0.3),
            );
            idx.update(uid(&format!("u{i}")), p, Gender::Male, round * 1_000);
        }
        for i in (0..300).step_by(7) {
            idx.clear(&uid(&format!("u{i}")), round * 1_000);
        }
        assert_coarse_consistent(&idx);
    }
    assert_users_consistent(&idx);
    let status = idx.status(&uid("u1"), 4_000).unwrap();
    assert_eq!(status.last_seen_ms, 4_000);
    assert_eq!(status.expires_at_ms, 4_000 + TTL);
    assert!(status.visible);
    assert_eq!(idx.status(&uid("u0"), 4_000), None, "cleared");
    assert_eq!(idx.status(&uid("u1"), 4_000 + TTL), None, "expired");
    idx.sweep(i64::MAX / 2);
    assert_coarse_consistent(&idx);
    assert_eq!(idx.maps.coarse.sum(|m| m.len()), 0);
    assert_eq!(idx.len(), 0);
}

#[test]
fn the_user_cap_holds_exactly_under_concurrent_newcomers() {
    let idx = NearbyIndex::new(
        NearbyConfig {
            max_users: 1_000,
            ..NearbyConfig::default()
        },
        PageTokens::new([3; 32]),
    );
    let threads = 8;
    let barrier = Barrier::new(threads);
    let refused: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (idx, barrier) = (&idx, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    (0..500)
                        .filter(|i| {
                            let ping = Ping {
                                user: uid(&format!("t{t}-u{i}")),
                                position: pos(SHANGHAI.0, SHANGHAI.1),
                                gender: Gender::Female,
                                visible: true,
                                ttl: idx.config().ttl.server(),
                            };
                            idx.ping(&ping, 0).is_err()
                        })
                        .count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(idx.len(), 1_000);
    assert_eq!(refused, threads * 500 - 1_000);
    assert_users_consistent(&idx);
    // A held user still updates at the cap.
    let someone = idx
        .search_raw(
            &query(
                "x",
                pos(SHANGHAI.0, SHANGHAI.1),
                1_000.0,
                1,
                Gender::Unspecified,
            ),
            0,
        )
        .unwrap()
        .users[0]
        .user
        .clone();
    let again = Ping {
        user: someone,
        position: pos(SHANGHAI.0 + 0.001, SHANGHAI.1),
        gender: Gender::Male,
        visible: true,
        ttl: idx.config().ttl.server(),
    };
    assert!(idx.ping(&again, 1).is_ok());
}

/// The footprint counts each member's bytes exactly, and a table slot for every user
/// and every occupied cell; clearing everyone empties the members and the lists.
#[test]
fn footprint_counts_the_members_and_a_slot_per_entry() {
    let idx = index();
    let mut rng = StdRng::seed_from_u64(37);
    let n = 3_000;
    for i in 0..n {
        let (lat, lng) = (
            31.2 + rng.random_range(-0.2..0.2),
            121.4 + rng.random_range(-0.2..0.2),
        );
        idx.update(
            uid(&format!("u{i:05}")),
            pos(lat, lng),
            Gender::Female,
            1_000,
        );
    }
    let f = idx.footprint();
    // "u" and five digits: 6 bytes of id, 12 of the rest.
    assert_eq!(f.members, n * (6 + 12));
    // Tables at most 80 % full: 8-byte user entries, 24-byte cell slots and a tag byte.
    assert!(f.users_table * 4 >= n * 8 * 5, "{f:?}");
    assert!(f.cells_table * 4 >= idx.cell_count() * 25 * 5, "{f:?}");
    // A coarse cell holding one privacy cell keeps it inline; longer lists 8 bytes each.
    let mut listed_apart = 0;
    for shard in 0..SHARDS {
        for (_, list) in idx.maps.coarse.read(shard).iter() {
            if list.len() > 1 {
                listed_apart += list.len();
            }
        }
    }
    assert!(
        listed_apart > 0 && listed_apart < idx.cell_count(),
        "{listed_apart}"
    );
    assert_eq!(f.coarse_lists, listed_apart * 8);
    assert!(f.regions > 0 && f.coarse_table > 0);
    assert_eq!(
        f.total(),
        f.members
            + f.users_table
            + f.cells_table
            + f.coarse_table
            + f.coarse_lists
            + f.regions
            + f.region_centres
    );
    for i in 0..n {
        idx.clear(&uid(&format!("u{i:05}")), 2_000);
    }
    let f = idx.footprint();
    assert_eq!((f.members, f.coarse_lists), (0, 0));
}
