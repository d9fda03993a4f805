//! WatchNearby in-process: initial set, live ENTER / LEAVE, hysteresis, following the
//! watcher, overflow, clean-up, and a concurrent run checked against the final state.

use std::{
    collections::HashSet,
    sync::Barrier,
    task::{Context, Poll, Waker},
};

use h3o::Resolution;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::geo::{band_m, distance_m, offset};

const SHANGHAI: (f64, f64) = (31.2304, 121.4737);
const NOW: i64 = 1_700_000_000_000;

fn index_with(watch: WatchConfig) -> NearbyIndex {
    let cfg = NearbyConfig {
        watch,
        ..NearbyConfig::default()
    };
    NearbyIndex::new(cfg, PageTokens::new([5; 32]))
}

fn uid(s: &str) -> UserId {
    UserId::new("user_id", s).unwrap()
}

/// The centre of the privacy cell `dx`, `dy` metres from the origin cell's centre, so a
/// user put there is snapped to exactly where they are.
fn at(dx: f64, dy: f64) -> Coordinates {
    let origin = origin();
    let (lat, lng) = offset(origin.lat(), origin.lng(), dx, dy);
    let c = LatLng::new(lat, lng).unwrap().to_cell(Resolution::Nine);
    let p = LatLng::from(c);
    Coordinates::new("position", p.lat(), p.lng()).unwrap()
}

fn origin() -> LatLng {
    LatLng::from(
        LatLng::new(SHANGHAI.0, SHANGHAI.1)
            .unwrap()
            .to_cell(Resolution::Nine),
    )
}

fn dist(p: Coordinates) -> f64 {
    distance_m(origin(), p.latlng())
}

fn watch(idx: &NearbyIndex, who: &str, radius_m: f64) -> Watch {
    idx.update(uid(who), at(0.0, 0.0), Gender::Male, NOW);
    idx.watch(
        &WatchRequest {
            watcher: uid(who),
            radius: idx.config().radius.apply(radius_m).unwrap(),
            gender: Gender::Unspecified,
        },
        NOW,
    )
    .unwrap()
}

/// Everything queued now, without waiting.
fn drain(w: &mut Watch) -> Vec<Result<WatchEvent, WatchEnd>> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    while let Poll::Ready(Some(e)) = w.poll_event(&mut cx) {
        out.push(e);
    }
    out
}

/// Queued events as "+id" (ENTER), "-id" (LEAVE) and "|" (SNAPSHOT_END).
fn marks(w: &mut Watch) -> Vec<String> {
    drain(w)
        .into_iter()
        .map(|e| match e.unwrap() {
            WatchEvent::Enter(f) => format!("+{}", f.user),
            WatchEvent::Leave(f) => format!("-{}", f.user),
            WatchEvent::SnapshotEnd => "|".into(),
        })
        .collect()
}

#[test]
fn a_watch_starts_with_everyone_inside_nearest_first() {
    let idx = index_with(WatchConfig::default());
    idx.update(uid("far"), at(0.0, 1_500.0), Gender::Female, NOW);
    idx.update(uid("b"), at(600.0, 0.0), Gender::Female, NOW);
    idx.update(uid("a"), at(0.0, 300.0), Gender::Female, NOW);
    idx.ping(
        &Ping {
            user: uid("hidden"),
            position: at(100.0, 0.0),
            gender: Gender::Female,
            visible: false,
            ttl: idx.config().ttl.server(),
        },
        NOW,
    )
    .unwrap();
    let mut w = watch(&idx, "me", 1_000.0);
    assert_eq!(marks(&mut w), ["+a", "+b", "|"]);
    assert_eq!(idx.watch_count(), 1);
    drop(w);
    assert_eq!(idx.watch_count(), 0, "dropping a watch closes it at once");
}

#[test]
fn arrivals_departures_clears_and_expiry_are_reported_once() {
    let idx = index_with(WatchConfig::default());
    let mut w = watch(&idx, "me", 1_000.0);
    assert_eq!(marks(&mut w), ["|"]);
    let leave = idx.watchers.leave_radius_m(1_000.0);
    assert!(leave >= 1_100.0);

    idx.update(uid("u"), at(0.0, 2_000.0), Gender::Male, NOW);
    assert!(marks(&mut w).is_empty(), "far away: nothing");
    idx.update(uid("u"), at(0.0, 500.0), Gender::Male, NOW);
    assert_eq!(marks(&mut w), ["+u"]);
    idx.update(uid("u"), at(0.0, 700.0), Gender::Male, NOW);
    assert!(marks(&mut w).is_empty(), "moving inside: nothing");
    let out = at(0.0, leave + 400.0);
    assert!(dist(out) > leave);
    idx.update(uid("u"), out, Gender::Male, NOW);
    assert_eq!(marks(&mut w), ["-u"]);

    idx.update(uid("v"), at(200.0, 0.0), Gender::Male, NOW);
    assert_eq!(marks(&mut w), ["+v"]);
    idx.clear(&uid("v"), NOW);
    assert_eq!(marks(&mut w), ["-v"]);

    idx.update(uid("x"), at(-200.0, 0.0), Gender::Male, NOW);
    let hide = Ping {
        user: uid("x"),
        position: at(-200.0, 0.0),
        gender: Gender::Male,
        visible: false,
        ttl: idx.config().ttl.server(),
    };
    idx.ping(&hide, NOW).unwrap();
    assert_eq!(marks(&mut w), ["+x", "-x"]);

    idx.update(uid("old"), at(0.0, -300.0), Gender::Male, NOW - 1_000);
    assert_eq!(marks(&mut w), ["+old"]);
    // "old" expires first and is swept; the LEAVE comes with the sweep.
    assert_eq!(idx.sweep(NOW - 1_000 + i64::from(idx.ttl_ms())), 1);
    assert_eq!(marks(&mut w), ["-old"]);
    // An expired user the watcher's own move finds is reported then, without the sweep.
    idx.update(uid("late"), at(0.0, -300.0), Gender::Male, NOW - 1_000);
    assert_eq!(marks(&mut w), ["+late"]);
    idx.update(
        uid("me"),
        at(0.0, 0.0),
        Gender::Male,
        NOW + i64::from(idx.ttl_ms()),
    );
    assert_eq!(marks(&mut w), ["-late"]);
}

#[test]
fn a_user_jittering_on_the_boundary_enters_once_and_never_flaps() {
    let idx = index_with(WatchConfig::default());
    let mut w = watch(&idx, "me", 1_000.0);
    drain(&mut w);
    let leave = idx.watchers.leave_radius_m(1_000.0);
    let mut rng = StdRng::seed_from_u64(4);
    let mut events = Vec::new();
    for _ in 0..300 {
        // Within +-150 m of the radius, on the east side.
        let p = at(1_000.0 + rng.random_range(-150.0..150.0), 0.0);
        assert!(dist(p) < leave);
        idx.update(uid("j"), p, Gender::Male, NOW);
        events.extend(marks(&mut w));
    }
    assert_eq!(events, ["+j"]);
}

#[test]
fn a_watch_follows_its_watcher() {
    let idx = index_with(WatchConfig::default());
    idx.update(uid("here"), at(300.0, 0.0), Gender::Female, NOW);
    idx.update(uid("there"), at(0.0, 20_300.0), Gender::Female, NOW);
    let mut w = watch(&idx, "me", 1_000.0);
    assert_eq!(marks(&mut w), ["+here", "|"]);
    idx.update(uid("me"), at(0.0, 20_000.0), Gender::Male, NOW);
    assert_eq!(marks(&mut w), ["-here", "+there"]);
    // Its area moved too: changes near the new position are heard.
    idx.update(uid("new"), at(0.0, 19_500.0), Gender::Female, NOW);
    assert_eq!(marks(&mut w), ["+new"]);
    idx.update(uid("here"), at(0.0, 200.0), Gender::Female, NOW);
    assert!(marks(&mut w).is_empty());
}

/// When the watcher's own ping moves it away, the LEAVE of a user left behind carries the
/// banded distance from the new position (0 is for cleared, expired or invisible users),
/// the same distance a search from there shows.
#[test]
fn a_watcher_moving_away_reports_the_banded_distance_of_whom_it_left() {
    let idx = index_with(WatchConfig::default());
    idx.update(uid("left"), at(300.0, 0.0), Gender::Female, NOW);
    let mut w = watch(&idx, "me", 1_000.0);
    assert_eq!(marks(&mut w), ["+left", "|"]);
    let new_spot = at(-3_000.0, 0.0);
    idx.update(uid("me"), new_spot, Gender::Male, NOW + 10);
    let leaves: Vec<(String, u32)> = drain(&mut w)
        .into_iter()
        .filter_map(|e| match e.unwrap() {
            WatchEvent::Leave(f) => Some((f.user.to_string(), f.distance_m)),
            _ => None,
        })
        .collect();
    let from_there = band_m(distance_m(new_spot.latlng(), at(300.0, 0.0).latlng()));
    assert!(from_there >= 3_000, "{from_there}");
    assert!(
        leaves.contains(&("left".to_string(), from_there)),
        "{leaves:?}"
    );
    // A search from the new spot shows the same distance.
    let q = idx
        .query(&SearchRequest {
            searcher: uid("me"),
            centre: new_spot,
            radius_m: 10_000.0,
            limit: 0,
            gender: Gender::Unspecified,
            page_token: String::new(),
        })
        .unwrap();
    let page = idx.search(&q, NOW + 10);
    let shown = page
        .users
        .iter()
        .find(|f| f.user.as_str() == "left")
        .unwrap();
    assert_eq!(shown.distance_m, from_there);
}

#[test]
fn a_consumer_too_far_behind_gets_its_watch_ended() {
    let idx = index_with(WatchConfig {
        buffer: 4,
        ..WatchConfig::default()
    });
    let mut w = watch(&idx, "me", 1_000.0);
    for i in 0..10 {
        idx.update(uid(&format!("u{i}")), at(100.0, 0.0), Gender::Male, NOW);
    }
    let got = drain(&mut w);
    assert_eq!(got, [Err(WatchEnd::Overflow(4))]);
    assert_eq!(idx.watch_count(), 1, "closed when the stream is dropped");
    drop(w);
    assert_eq!(idx.watch_count(), 0);
    // Changes after the close reach nobody, and nothing breaks.
    idx.update(uid("u0"), at(0.0, 100.0), Gender::Male, NOW);
}

#[test]
fn watching_needs_a_location_a_valid_radius_and_a_free_slot() {
    let idx = index_with(WatchConfig {
        max_watches: 1,
        ..WatchConfig::default()
    });
    let req = |who: &str, radius_m| WatchRequest {
        watcher: uid(who),
        radius: idx.config().radius.apply(radius_m).unwrap(),
        gender: Gender::Unspecified,
    };
    assert!(matches!(
        idx.watch(&req("nobody", 0.0), NOW),
        Err(Error::FailedPrecondition {
            field: "user_id",
            ..
        })
    ));
    idx.update(uid("a"), at(0.0, 0.0), Gender::Male, NOW);
    // The radius is checked by the index's rule before a watch request exists.
    assert!(matches!(
        idx.config().radius.apply(50_000.0),
        Err(Error::InvalidArgument {
            field: "radius_m",
            ..
        })
    ));
    let first = idx.watch(&req("a", 0.0), NOW).unwrap();
    assert!(matches!(
        idx.watch(&req("a", 0.0), NOW),
        Err(Error::ResourceExhausted(_))
    ));
    idx.close_watches();
    let mut first = first;
    assert_eq!(drain(&mut first).last(), Some(&Err(WatchEnd::Closing)));
}

/// Many writers move users about while a watch is open; replaying its events must never
/// ENTER a user already in or LEAVE one not in, and the final set must hold everyone
/// within the radius and nobody beyond the leave radius.
#[test]
fn concurrent_changes_leave_the_watch_consistent_with_the_index() {
    let idx = index_with(WatchConfig {
        buffer: 1 << 20,
        ..WatchConfig::default()
    });
    let mut w = watch(&idx, "me", 1_000.0);
    let leave = idx.watchers.leave_radius_m(1_000.0);
    let threads = 4;
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (idx, barrier) = (&idx, &barrier);
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(t as u64);
                barrier.wait();
                for _ in 0..3_000 {
                    let u = uid(&format!("u{}", rng.random_range(0..60)));
                    match rng.random_range(0..10) {
                        0 => {
                            idx.clear(&u, NOW);
                        }
                        _ => {
                            let p = at(
                                rng.random_range(-1_800.0..1_800.0),
                                rng.random_range(-1_800.0..1_800.0),
                            );
                            idx.update(u, p, Gender::Female, NOW);
                        }
                    }
                }
            });
        }
    });
    let mut inside: HashSet<String> = HashSet::new();
    for e in drain(&mut w) {
        match e.unwrap() {
            WatchEvent::Enter(f) => assert!(inside.insert(f.user.to_string()), "double ENTER"),
            WatchEvent::Leave(f) => assert!(inside.remove(f.user.as_str()), "LEAVE of an outsider"),
            WatchEvent::SnapshotEnd => {}
        }
    }
    for i in 0..60 {
        let u = uid(&format!("u{i}"));
        match idx.status(&u, NOW) {
            Some(s) => {
                let d = distance_m(origin(), LatLng::from(s.cell));
                if d <= 1_000.0 {
                    assert!(inside.contains(u.as_str()), "{u} at {d:.0} m missed");
                }
                if d > leave {
                    assert!(!inside.contains(u.as_str()), "{u} at {d:.0} m kept");
                }
            }
            None => assert!(!inside.contains(u.as_str()), "{u} cleared but kept"),
        }
    }
}

/// The bound watch registration relies on: an area cell's centre lies within two of its
/// circumradii of the centre of any privacy cell filed under it.
#[test]
fn area_cells_lie_near_the_privacy_cells_filed_under_them() {
    use crate::geo::cell::max_circumradius_m;
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..20_000 {
        let p = LatLng::new(
            rng.random_range(-89.0..89.0),
            rng.random_range(-180.0..180.0),
        )
        .unwrap();
        for privacy in [Resolution::Seven, Resolution::Nine, Resolution::Ten] {
            let cell = p.to_cell(privacy);
            for res in [Resolution::Six, Resolution::Eight] {
                let area = watch::area_of(cell, res);
                let d = distance_m(LatLng::from(cell), LatLng::from(area));
                assert!(
                    d <= 2.0 * max_circumradius_m(res),
                    "{cell} under {area}: {d:.0} m"
                );
            }
        }
    }
}
