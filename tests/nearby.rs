//! People Nearby over real gRPC: indexing, exact pagination, filters, TTL, privacy, errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    T0, bad_field,
    build::{PingExt as _, SearchExt as _, clear, latlng, ping, search},
    contract,
    fixtures::{SHANGHAI, privacy_cell, scattered},
    found, start,
};
use geomatch::grpc::pb::{self, Gender};
use rand::{SeedableRng, rngs::StdRng};

#[tokio::test]
async fn update_reports_the_privacy_cell_and_expiry() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let r = c
        .update_location(ping("alice", SHANGHAI))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cell, privacy_cell(SHANGHAI).to_string());
    assert_eq!(r.expires_at_ms, T0 + 15 * 60 * 1_000);
    server.stop().await;
}

#[tokio::test]
async fn walking_all_pages_matches_brute_force() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let mut rng = StdRng::seed_from_u64(9);
    let model = contract::populate(&mut c, &mut rng, "user:", 1_500, SHANGHAI, 0.04).await;
    for _ in 0..25 {
        let req = contract::random_query(&mut rng, &model, SHANGHAI, 0.03);
        let got = contract::walk(std::slice::from_mut(&mut c), req.clone()).await;
        assert_eq!(got, contract::expected(&model, &req), "{req:?}");
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
        c.update_location(ping(id, SHANGHAI).with_gender(g))
            .await
            .unwrap();
    }
    let females = search("me", SHANGHAI).with_gender(Gender::Female);
    let users = c.search_nearby(females).await.unwrap().into_inner().users;
    let ids: Vec<_> = users.iter().map(|u| u.user_id.as_str()).collect();
    assert_eq!(ids, ["f1", "f2"]);
    assert!(users.iter().all(|u| u.gender == i32::from(Gender::Female)));
    assert_eq!(
        found(&mut c, search("me", SHANGHAI)).await,
        ["f1", "f2", "m1"]
    );
    server.stop().await;
}

#[tokio::test]
async fn pings_expire_with_the_clock_and_clear_forgets() {
    let server = start(&["--location-ttl", "10m"]).await;
    let mut c = server.nearby().await;
    c.update_location(ping("alice", SHANGHAI)).await.unwrap();
    server.clock.advance_ms(5 * 60 * 1_000);
    c.update_location(ping("bob", SHANGHAI)).await.unwrap();
    let q = search("me", SHANGHAI);
    assert_eq!(found(&mut c, q.clone()).await, ["alice", "bob"]);
    let bob_seen = c.search_nearby(q.clone()).await.unwrap().into_inner().users[1].last_seen_ms;
    assert_eq!(bob_seen, T0 + 5 * 60 * 1_000);
    server.clock.advance_ms(5 * 60 * 1_000);
    assert_eq!(found(&mut c, q.clone()).await, ["bob"]);
    // The sweep reclaims alice's memory.
    server.app.sweep();
    assert_eq!(server.app.nearby.len(), 1);
    let cleared = c.clear_location(clear("bob")).await.unwrap();
    assert!(cleared.into_inner().existed);
    let again = c.clear_location(clear("bob")).await.unwrap();
    assert!(!again.into_inner().existed);
    assert!(found(&mut c, q).await.is_empty());
    assert_eq!(server.app.nearby.len(), 0);
    server.stop().await;
}

#[tokio::test]
async fn distances_are_banded_and_measured_to_snapped_positions() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let mut rng = StdRng::seed_from_u64(5);
    for i in 0..200 {
        let at = scattered(&mut rng, SHANGHAI, 0.05);
        c.update_location(ping(&format!("u{i}"), at)).await.unwrap();
    }
    let users = c
        .search_nearby(search("me", SHANGHAI).radius(5_000.0).limit(100))
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
    let origin = (0.0, 0.0);
    let bad_updates = [
        (ping("", origin), "user_id"),
        (ping(&long, origin), "user_id"),
        (
            pb::UpdateLocationRequest {
                position: None,
                ..ping("a", origin)
            },
            "position",
        ),
        (ping("a", (f64::NAN, 0.0)), "position.lat"),
        (ping("a", (90.5, 0.0)), "position.lat"),
        (ping("a", (f64::NEG_INFINITY, 0.0)), "position.lat"),
        (ping("a", (0.0, 181.0)), "position.lng"),
        (ping("a", (0.0, f64::INFINITY)), "position.lng"),
        (ping("a", origin).with_gender(7), "gender"),
        (
            pb::UpdateLocationRequest {
                visibility: 9,
                ..ping("a", origin)
            },
            "visibility",
        ),
        (
            pb::UpdateLocationRequest {
                ttl_s: 72 * 3_600 + 1,
                ..ping("a", origin)
            },
            "ttl_s",
        ),
    ];
    for (req, field) in bad_updates {
        let err = c.update_location(req.clone()).await.unwrap_err();
        assert_eq!(bad_field(&err), field, "{req:?}");
    }
    assert_eq!(server.app.nearby.len(), 0, "nothing stored");

    let ok = search("me", origin);
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
    let err = c.clear_location(clear(&long)).await.unwrap_err();
    assert_eq!(bad_field(&err), "user_id");
    server.stop().await;
}

#[tokio::test]
async fn a_token_from_one_query_is_refused_for_another() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    for i in 0..5 {
        c.update_location(ping(&format!("u{i}"), SHANGHAI))
            .await
            .unwrap();
    }
    let first = c
        .search_nearby(search("me", SHANGHAI).limit(2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.users.len(), 2);
    let other = pb::SearchNearbyRequest {
        page_token: first.next_page_token.clone(),
        ..search("someone-else", SHANGHAI).limit(2)
    };
    assert_eq!(
        bad_field(&c.search_nearby(other).await.unwrap_err()),
        "page_token"
    );
    // Flipping one character corrupts it.
    let mut token = first.next_page_token.into_bytes();
    token[3] = if token[3] == b'A' { b'B' } else { b'A' };
    let corrupt = pb::SearchNearbyRequest {
        page_token: String::from_utf8(token).unwrap(),
        ..search("me", SHANGHAI).limit(2)
    };
    assert_eq!(
        bad_field(&c.search_nearby(corrupt).await.unwrap_err()),
        "page_token"
    );
    server.stop().await;
}

/// User ids that would print as something else downstream (controls, bidi overrides,
/// edge white space) are refused on every RPC that takes one, and nothing is stored.
#[tokio::test]
async fn user_ids_with_controls_bidi_or_edge_space_are_refused() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let mut s = server.shake().await;
    for bad in [
        "a\u{0}b",
        "a\nb",
        "\u{202e}evil",
        " ",
        " lead",
        "trail\u{2029}",
    ] {
        let err = c.update_location(ping(bad, SHANGHAI)).await.unwrap_err();
        assert_eq!(bad_field(&err), "user_id", "{bad:?}");
        let err = c.search_nearby(search(bad, SHANGHAI)).await.unwrap_err();
        assert_eq!(bad_field(&err), "user_id", "{bad:?}");
        let mut sh = common::build::shake("ok-user", "s1", SHANGHAI);
        sh.exclude_user_ids = vec![bad.to_owned()];
        let err = s.shake(sh).await.unwrap_err();
        assert_eq!(bad_field(&err), "exclude_user_ids", "{bad:?}");
    }
    assert!(found(&mut c, search("watcher", SHANGHAI)).await.is_empty());
    server.stop().await;
}
