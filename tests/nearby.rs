//! People Nearby over real gRPC: indexing, exact pagination, filters, TTL, privacy, errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::{T0, bad_field, latlng, start};
use geomatch::{
    geo::{band_m, distance_key, distance_m, snapped},
    grpc::pb::{self, Gender},
};
use h3o::{LatLng, Resolution};
use rand::{Rng, SeedableRng, rngs::StdRng};

const SHANGHAI: (f64, f64) = (31.2304, 121.4737);

fn update(user: &str, lat: f64, lng: f64, gender: Gender) -> pb::UpdateLocationRequest {
    pb::UpdateLocationRequest {
        user_id: user.into(),
        position: latlng(lat, lng),
        gender: gender.into(),
        ..Default::default()
    }
}

fn search(user: &str, lat: f64, lng: f64, radius_m: f64, limit: u32) -> pb::SearchNearbyRequest {
    pb::SearchNearbyRequest {
        user_id: user.into(),
        position: latlng(lat, lng),
        radius_m,
        limit,
        ..Default::default()
    }
}

#[tokio::test]
async fn update_reports_the_privacy_cell_and_expiry() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let r = c
        .update_location(update("alice", SHANGHAI.0, SHANGHAI.1, Gender::Female))
        .await
        .unwrap()
        .into_inner();
    let cell = LatLng::new(SHANGHAI.0, SHANGHAI.1)
        .unwrap()
        .to_cell(Resolution::Nine);
    assert_eq!(r.cell, cell.to_string());
    assert_eq!(r.expires_at_ms, T0 + 15 * 60 * 1_000);
    server.stop().await;
}

#[tokio::test]
async fn walking_all_pages_matches_brute_force() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let mut rng = StdRng::seed_from_u64(9);
    let mut model: HashMap<String, (f64, f64, i32)> = HashMap::new();
    for i in 0..1_500 {
        let id = format!("user:{i:012}");
        let (lat, lng) = (
            SHANGHAI.0 + rng.random_range(-0.04..0.04),
            SHANGHAI.1 + rng.random_range(-0.04..0.04),
        );
        let gender = [Gender::Unspecified, Gender::Female, Gender::Male][rng.random_range(0..3)];
        c.update_location(update(&id, lat, lng, gender))
            .await
            .unwrap();
        model.insert(id, (lat, lng, gender.into()));
    }
    for _ in 0..25 {
        let (lat, lng) = (
            SHANGHAI.0 + rng.random_range(-0.03..0.03),
            SHANGHAI.1 + rng.random_range(-0.03..0.03),
        );
        let radius = [0.0, 300.0, 1_000.0, 3_000.0][rng.random_range(0..4)];
        let limit = [0, 3, 50, 100][rng.random_range(0..4)];
        let gender = rng.random_range(0..3);
        let searcher = format!("user:{:012}", rng.random_range(0..1_500));
        let mut req = search(&searcher, lat, lng, radius, limit);
        req.gender = gender;

        let mut got = Vec::new();
        loop {
            let page = c.search_nearby(req.clone()).await.unwrap().into_inner();
            got.extend(page.users.into_iter().map(|u| (u.user_id, u.distance_m)));
            if page.next_page_token.is_empty() {
                break;
            }
            req.page_token = page.next_page_token;
        }

        let q = LatLng::new(lat, lng).unwrap();
        let r = if radius == 0.0 { 1_000.0 } else { radius };
        let mut want: Vec<_> = model
            .iter()
            .filter(|(id, (_, _, g))| **id != searcher && (gender == 0 || *g == gender))
            .filter_map(|(id, (ulat, ulng, _))| {
                let p = snapped(LatLng::new(*ulat, *ulng).unwrap().to_cell(Resolution::Nine));
                let d = distance_m(q, p);
                (d <= r).then(|| (distance_key(d), id.clone(), band_m(d)))
            })
            .collect();
        want.sort();
        let want: Vec<_> = want.into_iter().map(|(_, id, band)| (id, band)).collect();
        assert_eq!(got, want, "radius {radius} limit {limit} gender {gender}");
    }
    server.stop().await;
}

#[tokio::test]
async fn gender_filter_and_searcher_exclusion() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    for (id, g) in [
        ("me", Gender::Male),
        ("f1", Gender::Female),
        ("m1", Gender::Male),
        ("f2", Gender::Female),
    ] {
        c.update_location(update(id, SHANGHAI.0, SHANGHAI.1, g))
            .await
            .unwrap();
    }
    let mut req = search("me", SHANGHAI.0, SHANGHAI.1, 0.0, 0);
    req.gender = Gender::Female.into();
    let users = c.search_nearby(req).await.unwrap().into_inner().users;
    let ids: Vec<_> = users.iter().map(|u| u.user_id.as_str()).collect();
    assert_eq!(ids, ["f1", "f2"]);
    assert!(users.iter().all(|u| u.gender == i32::from(Gender::Female)));
    let all = c
        .search_nearby(search("me", SHANGHAI.0, SHANGHAI.1, 0.0, 0))
        .await
        .unwrap();
    let ids: Vec<_> = all
        .into_inner()
        .users
        .into_iter()
        .map(|u| u.user_id)
        .collect();
    assert_eq!(ids, ["f1", "f2", "m1"]);
    server.stop().await;
}

#[tokio::test]
async fn pings_expire_with_the_clock_and_clear_forgets() {
    let server = start(&["--location-ttl", "10m"]).await;
    let mut c = server.nearby().await;
    c.update_location(update("alice", SHANGHAI.0, SHANGHAI.1, Gender::Female))
        .await
        .unwrap();
    server.clock.advance_ms(5 * 60 * 1_000);
    c.update_location(update("bob", SHANGHAI.0, SHANGHAI.1, Gender::Male))
        .await
        .unwrap();
    let ids =
        |r: pb::SearchNearbyResponse| r.users.into_iter().map(|u| u.user_id).collect::<Vec<_>>();
    let q = search("me", SHANGHAI.0, SHANGHAI.1, 0.0, 0);
    assert_eq!(
        ids(c.search_nearby(q.clone()).await.unwrap().into_inner()),
        ["alice", "bob"]
    );
    let bob_seen = c.search_nearby(q.clone()).await.unwrap().into_inner().users[1].last_seen_ms;
    assert_eq!(bob_seen, T0 + 5 * 60 * 1_000);
    server.clock.advance_ms(5 * 60 * 1_000);
    assert_eq!(
        ids(c.search_nearby(q.clone()).await.unwrap().into_inner()),
        ["bob"]
    );
    // The sweep reclaims alice's memory.
    server.app.sweep();
    assert_eq!(server.app.nearby.len(), 1);
    let cleared = c
        .clear_location(pb::ClearLocationRequest {
            user_id: "bob".into(),
        })
        .await
        .unwrap();
    assert!(cleared.into_inner().existed);
    let again = c
        .clear_location(pb::ClearLocationRequest {
            user_id: "bob".into(),
        })
        .await
        .unwrap();
    assert!(!again.into_inner().existed);
    assert!(ids(c.search_nearby(q).await.unwrap().into_inner()).is_empty());
    assert_eq!(server.app.nearby.len(), 0);
    server.stop().await;
}

#[tokio::test]
async fn distances_are_banded_and_measured_to_snapped_positions() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let mut rng = StdRng::seed_from_u64(5);
    for i in 0..200 {
        let (lat, lng) = (
            SHANGHAI.0 + rng.random_range(-0.05..0.05),
            SHANGHAI.1 + rng.random_range(-0.05..0.05),
        );
        c.update_location(update(&format!("u{i}"), lat, lng, Gender::Female))
            .await
            .unwrap();
    }
    let users = c
        .search_nearby(search("me", SHANGHAI.0, SHANGHAI.1, 5_000.0, 100))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert!(users.len() > 20);
    let mut last = 0;
    for u in &users {
        let d = u.distance_m;
        assert!(
            d == 100 || (d <= 1_000 && d % 100 == 0) || d % 1_000 == 0,
            "{d} is not a band"
        );
        assert!(d >= last, "nearest first");
        last = d;
    }
    server.stop().await;
}

#[tokio::test]
async fn every_bad_input_names_its_field_and_stores_nothing() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let long = "x".repeat(129);
    let bad_updates = [
        (update("", 0.0, 0.0, Gender::Female), "user_id"),
        (update(&long, 0.0, 0.0, Gender::Female), "user_id"),
        (
            pb::UpdateLocationRequest {
                user_id: "a".into(),
                position: None,
                gender: 0,
                ..Default::default()
            },
            "position",
        ),
        (update("a", f64::NAN, 0.0, Gender::Female), "position.lat"),
        (update("a", 90.5, 0.0, Gender::Female), "position.lat"),
        (
            update("a", f64::NEG_INFINITY, 0.0, Gender::Female),
            "position.lat",
        ),
        (update("a", 0.0, 181.0, Gender::Female), "position.lng"),
        (
            update("a", 0.0, f64::INFINITY, Gender::Female),
            "position.lng",
        ),
        (
            pb::UpdateLocationRequest {
                user_id: "a".into(),
                position: latlng(0.0, 0.0),
                gender: 7,
                ..Default::default()
            },
            "gender",
        ),
        (
            pb::UpdateLocationRequest {
                visibility: 9,
                ..update("a", 0.0, 0.0, Gender::Female)
            },
            "visibility",
        ),
        (
            pb::UpdateLocationRequest {
                ttl_s: 72 * 3_600 + 1,
                ..update("a", 0.0, 0.0, Gender::Female)
            },
            "ttl_s",
        ),
    ];
    for (req, field) in bad_updates {
        let err = c.update_location(req.clone()).await.unwrap_err();
        assert_eq!(bad_field(&err), field, "{req:?}");
    }
    assert_eq!(server.app.nearby.len(), 0, "nothing stored");

    let ok = search("me", 0.0, 0.0, 0.0, 0);
    let bad_searches = [
        (
            pb::SearchNearbyRequest {
                user_id: String::new(),
                ..ok.clone()
            },
            "user_id",
        ),
        (
            pb::SearchNearbyRequest {
                position: None,
                ..ok.clone()
            },
            "position",
        ),
        (
            pb::SearchNearbyRequest {
                position: latlng(-91.0, 0.0),
                ..ok.clone()
            },
            "position.lat",
        ),
        (
            pb::SearchNearbyRequest {
                radius_m: -5.0,
                ..ok.clone()
            },
            "radius_m",
        ),
        (
            pb::SearchNearbyRequest {
                radius_m: f64::NAN,
                ..ok.clone()
            },
            "radius_m",
        ),
        (
            pb::SearchNearbyRequest {
                radius_m: 10_001.0,
                ..ok.clone()
            },
            "radius_m",
        ),
        (
            pb::SearchNearbyRequest {
                limit: 101,
                ..ok.clone()
            },
            "limit",
        ),
        (
            pb::SearchNearbyRequest {
                gender: -1,
                ..ok.clone()
            },
            "gender",
        ),
        (
            pb::SearchNearbyRequest {
                page_token: "garbage".into(),
                ..ok.clone()
            },
            "page_token",
        ),
        (
            pb::SearchNearbyRequest {
                page_token: "A".repeat(5_000),
                ..ok.clone()
            },
            "page_token",
        ),
    ];
    for (req, field) in bad_searches {
        let err = c.search_nearby(req.clone()).await.unwrap_err();
        assert_eq!(bad_field(&err), field, "{req:?}");
    }
    let err = c
        .clear_location(pb::ClearLocationRequest { user_id: long })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err), "user_id");
    server.stop().await;
}

#[tokio::test]
async fn a_token_from_one_query_is_refused_for_another() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    for i in 0..5 {
        c.update_location(update(
            &format!("u{i}"),
            SHANGHAI.0,
            SHANGHAI.1,
            Gender::Female,
        ))
        .await
        .unwrap();
    }
    let first = c
        .search_nearby(search("me", SHANGHAI.0, SHANGHAI.1, 0.0, 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.users.len(), 2);
    let mut other = search("someone-else", SHANGHAI.0, SHANGHAI.1, 0.0, 2);
    other.page_token = first.next_page_token.clone();
    assert_eq!(
        bad_field(&c.search_nearby(other).await.unwrap_err()),
        "page_token"
    );
    // Flipping one character corrupts it.
    let mut token = first.next_page_token.into_bytes();
    token[3] = if token[3] == b'A' { b'B' } else { b'A' };
    let mut corrupt = search("me", SHANGHAI.0, SHANGHAI.1, 0.0, 2);
    corrupt.page_token = String::from_utf8(token).unwrap();
    assert_eq!(
        bad_field(&c.search_nearby(corrupt).await.unwrap_err()),
        "page_token"
    );
    server.stop().await;
}
