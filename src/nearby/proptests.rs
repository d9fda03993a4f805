//! Model-based property tests: random sequences of pings (visible or not, with their own
//! time to live), clears, clock moves, sweeps and paginated searches against a brute-force
//! model. Membership, order and pagination must agree exactly.

use std::collections::HashMap;

use h3o::LatLng;
use proptest::{collection::vec, prelude::*};

use super::*;
use crate::geo::{band_m, distance_key, distance_m, offset, snapped};

const SHANGHAI: (f64, f64) = (31.2304, 121.4737);
const T0: i64 = 1_700_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    Ping {
        user: u8,
        east: i16,
        north: i16,
        gender: u8,
        visible: bool,
        ttl_s: u16,
    },
    Clear {
        user: u8,
    },
    Advance {
        ms: u32,
    },
    Sweep,
    Search {
        searcher: u8,
        east: i16,
        north: i16,
        radius_m: u16,
        limit: u8,
        gender: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Positions on a 50 m grid over ±2.5 km, so users share cells and cell distances tie.
    let coord = -50i16..=50;
    prop_oneof![
        5 => (0u8..40, coord.clone(), coord.clone(), 0u8..3, any::<bool>(), 0u16..1_200)
            .prop_map(|(user, east, north, gender, visible, ttl_s)| Op::Ping {
                user, east, north, gender, visible, ttl_s,
            }),
        1 => (0u8..40).prop_map(|user| Op::Clear { user }),
        1 => (0u32..400_000).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Sweep),
        3 => (0u8..40, coord.clone(), coord, 0u16..3_000, 0u8..8, 0u8..3)
            .prop_map(|(searcher, east, north, radius_m, limit, gender)| Op::Search {
                searcher, east, north, radius_m, limit, gender,
            }),
    ]
}

fn at(east: i16, north: i16) -> Coordinates {
    let (lat, lng) = offset(
        SHANGHAI.0,
        SHANGHAI.1,
        f64::from(east) * 50.0,
        f64::from(north) * 50.0,
    );
    Coordinates::new("position", lat, lng).unwrap()
}

fn user(n: u8) -> UserId {
    UserId::new("user_id", &format!("u{n:02}")).unwrap()
}

#[derive(Debug, Clone)]
struct Held {
    cell: CellIndex,
    gender: Gender,
    visible: bool,
    expires_at_ms: i64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_index_agrees_with_a_brute_force_model(ops in vec(op(), 1..80)) {
        let idx = NearbyIndex::new(NearbyConfig::default(), PageTokens::new([4; 32]));
        let mut model: HashMap<String, Held> = HashMap::new();
        let mut now = T0;
        for op in ops {
            match op {
                Op::Ping { user: u, east, north, gender, visible, ttl_s } => {
                    let ping = Ping {
                        user: user(u),
                        position: at(east, north),
                        gender: Gender::from_wire(gender).unwrap(),
                        visible,
                        ttl: idx.cfg.ttl.apply(u32::from(ttl_s)).unwrap(),
                    };
                    let placed = idx.ping(&ping, now).unwrap();
                    let ttl = if ttl_s == 0 { i64::from(idx.ttl_ms()) } else { i64::from(ttl_s) * 1_000 };
                    prop_assert_eq!(placed.expires_at_ms, now + ttl);
                    model.insert(ping.user.to_string(), Held {
                        cell: placed.cell,
                        gender: ping.gender,
                        visible,
                        expires_at_ms: now + ttl,
                    });
                }
                Op::Clear { user: u } => {
                    let had = model
                        .remove(user(u).as_str())
                        .is_some_and(|h| h.expires_at_ms > now);
                    prop_assert_eq!(idx.clear(&user(u), now), had);
                }
                Op::Advance { ms } => now += i64::from(ms),
                Op::Sweep => {
                    let expired = model.values().filter(|h| h.expires_at_ms <= now).count();
                    prop_assert_eq!(idx.sweep(now), expired);
                    model.retain(|_, h| h.expires_at_ms > now);
                }
                Op::Search { searcher, east, north, radius_m, limit, gender } => {
                    let centre = at(east, north);
                    let gender = Gender::from_wire(gender).unwrap();
                    let radius = if radius_m == 0 { 1_000.0 } else { f64::from(radius_m) };
                    let me = user(searcher);
                    let mut want: Vec<(u64, String)> = model
                        .iter()
                        .filter(|(id, h)| {
                            id.as_str() != me.as_str()
                                && h.visible
                                && h.expires_at_ms > now
                                && (gender == Gender::Unspecified || h.gender == gender)
                        })
                        .filter_map(|(id, h)| {
                            let d = distance_m(centre.latlng(), snapped(h.cell));
                            (d <= radius).then(|| (distance_key(d), id.clone()))
                        })
                        .collect();
                    want.sort();
                    let page_size = if limit == 0 { 20 } else { usize::from(limit) };
                    let mut got = Vec::new();
                    let mut q = SearchRequest {
                        searcher: me,
                        centre,
                        radius_m: f64::from(radius_m),
                        limit: u32::from(limit),
                        gender,
                        page_token: String::new(),
                    };
                    loop {
                        let page = idx.search_raw(&q, now).unwrap();
                        prop_assert!(page.users.len() <= page_size);
                        for f in &page.users {
                            let d = distance_m(centre.latlng(), LatLng::from(model[f.user.as_str()].cell));
                            prop_assert_eq!(f.distance_m, band_m(d));
                        }
                        got.extend(page.users.into_iter().map(|f| f.user.to_string()));
                        match page.next_page_token {
                            Some(t) => q.page_token = t,
                            None => break,
                        }
                    }
                    let want: Vec<String> = want.into_iter().map(|(_, id)| id).collect();
                    prop_assert_eq!(got, want);
                }
            }
            prop_assert_eq!(idx.len(), model.len());
        }
    }
}
