//! Bulk ingest (`UpdateLocations`), visibility, per-ping TTL and `GetLocationStatus`, over
//! real gRPC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, latlng, start};
use geomatch::grpc::pb::{self, Gender, Visibility};
use h3o::{LatLng, Resolution};

const SHANGHAI: (f64, f64) = (31.2304, 121.4737);

fn ping(user: &str, lat: f64, lng: f64) -> pb::UpdateLocationRequest {
    pb::UpdateLocationRequest {
        user_id: user.into(),
        position: latlng(lat, lng),
        gender: Gender::Female.into(),
        ..Default::default()
    }
}

fn search(user: &str) -> pb::SearchNearbyRequest {
    pb::SearchNearbyRequest {
        user_id: user.into(),
        position: latlng(SHANGHAI.0, SHANGHAI.1),
        radius_m: 2_000.0,
        limit: 100,
        ..Default::default()
    }
}

/// Whom `searcher` finds, sorted.
async fn found(
    c: &mut pb::nearby_client::NearbyClient<tonic::transport::Channel>,
    searcher: &str,
) -> Vec<String> {
    let mut ids: Vec<String> = c
        .search_nearby(search(searcher))
        .await
        .unwrap()
        .into_inner()
        .users
        .into_iter()
        .map(|u| u.user_id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_bulk_stream_applies_good_items_and_reports_bad_ones_by_index() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let mut items = Vec::new();
    for i in 0..1_000 {
        let mut p = ping(&format!("u{i:04}"), SHANGHAI.0, SHANGHAI.1);
        match i % 100 {
            // Every hundredth item is bad in a different way.
            7 => p.position = latlng(91.0, 0.0),
            8 => p.user_id = String::new(),
            9 => p.gender = 42,
            _ => {}
        }
        items.push(p);
    }
    let summary = c
        .update_locations(tokio_stream::iter(items))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, 970);
    assert_eq!(summary.rejected, 30);
    assert_eq!(summary.rejections.len(), 16, "the first 16 are reported");
    let first: Vec<(u64, &str)> = summary
        .rejections
        .iter()
        .take(4)
        .map(|r| (r.index, r.field.as_str()))
        .collect();
    assert_eq!(
        first,
        [
            (7, "position.lat"),
            (8, "user_id"),
            (9, "gender"),
            (107, "position.lat")
        ]
    );
    assert!(summary.rejections.iter().all(|r| !r.reason.is_empty()));
    assert_eq!(
        server.app.nearby.len(),
        970,
        "exactly the good items are held"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_empty_bulk_stream_is_an_empty_summary() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let summary = c
        .update_locations(tokio_stream::iter(Vec::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary, pb::UpdateLocationsSummary::default());
    server.stop().await;
}

#[tokio::test]
async fn invisible_users_search_but_are_never_found() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    c.update_location(ping("shown", SHANGHAI.0, SHANGHAI.1))
        .await
        .unwrap();
    c.update_location(pb::UpdateLocationRequest {
        visibility: Visibility::Invisible.into(),
        ..ping("hidden", SHANGHAI.0, SHANGHAI.1)
    })
    .await
    .unwrap();
    assert_eq!(found(&mut c, "observer").await, ["shown"]);
    // The invisible user still sees others.
    assert_eq!(found(&mut c, "hidden").await, ["shown"]);
    // Turning visible again (the default) makes them findable.
    c.update_location(ping("hidden", SHANGHAI.0, SHANGHAI.1))
        .await
        .unwrap();
    assert_eq!(found(&mut c, "observer").await, ["hidden", "shown"]);
    server.stop().await;
}

#[tokio::test]
async fn a_per_ping_ttl_sets_expiry_and_status_tells_the_user_what_is_held() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let placed = c
        .update_location(pb::UpdateLocationRequest {
            ttl_s: 3 * 24 * 3_600,
            visibility: Visibility::Invisible.into(),
            ..ping("alice", SHANGHAI.0, SHANGHAI.1)
        })
        .await
        .unwrap()
        .into_inner();
    let expires = T0 + 3 * 24 * 3_600 * 1_000;
    assert_eq!(placed.expires_at_ms, expires);

    let status = |user: &str| pb::GetLocationStatusRequest {
        user_id: user.into(),
    };
    let s = c
        .get_location_status(status("alice"))
        .await
        .unwrap()
        .into_inner();
    let cell = LatLng::new(SHANGHAI.0, SHANGHAI.1)
        .unwrap()
        .to_cell(Resolution::Nine);
    assert_eq!(
        s,
        pb::GetLocationStatusResponse {
            found: true,
            cell: cell.to_string(),
            visibility: Visibility::Invisible.into(),
            last_seen_ms: T0,
            expires_at_ms: expires,
            gender: Gender::Female.into(),
        }
    );

    // Still held after the server's default TTL (15 min), gone at its own expiry.
    server.clock.set(expires - 1);
    assert!(
        c.get_location_status(status("alice"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    server.clock.set(expires);
    let gone = c
        .get_location_status(status("alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone, pb::GetLocationStatusResponse::default());

    // ClearLocation removes everything held.
    server.clock.set(T0);
    c.update_location(ping("bob", SHANGHAI.0, SHANGHAI.1))
        .await
        .unwrap();
    assert!(
        c.get_location_status(status("bob"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    c.clear_location(pb::ClearLocationRequest {
        user_id: "bob".into(),
    })
    .await
    .unwrap();
    assert!(
        !c.get_location_status(status("bob"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    assert_eq!(
        common::bad_field(&c.get_location_status(status("")).await.unwrap_err()),
        "user_id"
    );
    server.stop().await;
}
