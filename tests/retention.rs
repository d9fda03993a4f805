//! Bulk ingest (`UpdateLocations`), visibility, per-ping TTL and `GetLocationStatus`, over
//! real gRPC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    T0, bad_field,
    build::{PingExt as _, SearchExt as _, clear, latlng, ping, search, status},
    fixtures::{SHANGHAI, privacy_cell},
    found, start,
};
use geomatch::grpc::pb::{self, Gender, Visibility, nearby_client::NearbyClient};
use tonic::transport::Channel;

/// Whom `searcher` finds within 2 km of Shanghai, sorted.
async fn seen_by(c: &mut NearbyClient<Channel>, searcher: &str) -> Vec<String> {
    let mut ids = found(c, search(searcher, SHANGHAI).radius(2_000.0).limit(100)).await;
    ids.sort();
    ids
}

#[tokio::test]
async fn a_bulk_stream_applies_good_items_and_reports_bad_ones_by_index() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let mut items = Vec::new();
    for i in 0..1_000 {
        let mut p = ping(&format!("u{i:04}"), SHANGHAI);
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
    c.update_location(ping("shown", SHANGHAI)).await.unwrap();
    c.update_location(pb::UpdateLocationRequest {
        visibility: Visibility::Invisible.into(),
        ..ping("hidden", SHANGHAI)
    })
    .await
    .unwrap();
    assert_eq!(seen_by(&mut c, "observer").await, ["shown"]);
    // The invisible user still sees others.
    assert_eq!(seen_by(&mut c, "hidden").await, ["shown"]);
    // Turning visible again (the default) makes them findable.
    c.update_location(ping("hidden", SHANGHAI)).await.unwrap();
    assert_eq!(seen_by(&mut c, "observer").await, ["hidden", "shown"]);
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
            ..ping("alice", SHANGHAI).with_gender(Gender::Female)
        })
        .await
        .unwrap()
        .into_inner();
    let expires = T0 + 3 * 24 * 3_600 * 1_000;
    assert_eq!(placed.expires_at_ms, expires);

    let s = c
        .get_location_status(status("alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s,
        pb::GetLocationStatusResponse {
            found: true,
            cell: privacy_cell(SHANGHAI).to_string(),
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
    c.update_location(ping("bob", SHANGHAI)).await.unwrap();
    assert!(
        c.get_location_status(status("bob"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    c.clear_location(clear("bob")).await.unwrap();
    assert!(
        !c.get_location_status(status("bob"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    assert_eq!(
        bad_field(&c.get_location_status(status("")).await.unwrap_err()),
        "user_id"
    );
    server.stop().await;
}
