//! WatchNearby over real gRPC: initial set, live events, errors, clean-up, overflow and
//! shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{bad_field, latlng, start};
use geomatch::{
    geo::{band_m, distance_m},
    grpc::pb::{self, Gender, nearby_event::Kind},
};
use geomatch_load::population::offset;
use h3o::{LatLng, Resolution};
use tonic::{Code, Streaming};

const SHANGHAI: (f64, f64) = (31.2304, 121.4737);

/// The centre of the privacy cell `dy` metres north of Shanghai's.
fn north(dy: f64) -> (f64, f64) {
    let (lat, lng) = offset(SHANGHAI.0, SHANGHAI.1, 0.0, dy);
    let c = LatLng::from(LatLng::new(lat, lng).unwrap().to_cell(Resolution::Nine));
    (c.lat(), c.lng())
}

fn ping(user: &str, (lat, lng): (f64, f64)) -> pb::UpdateLocationRequest {
    pb::UpdateLocationRequest {
        user_id: user.into(),
        position: latlng(lat, lng),
        gender: Gender::Female.into(),
        ..Default::default()
    }
}

fn watch_req(user: &str, radius_m: f64) -> pb::WatchNearbyRequest {
    pb::WatchNearbyRequest {
        user_id: user.into(),
        radius_m,
        gender: Gender::Unspecified.into(),
    }
}

async fn next(s: &mut Streaming<pb::NearbyEvent>) -> (Kind, String, u32) {
    let e = s.message().await.unwrap().expect("an event");
    let kind = e.kind();
    let user = e.user.unwrap_or_default();
    (kind, user.user_id, user.distance_m)
}

#[tokio::test]
async fn a_watch_reports_the_initial_set_then_live_changes() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    c.update_location(ping("me", north(0.0))).await.unwrap();
    c.update_location(ping("near", north(400.0))).await.unwrap();
    c.update_location(ping("far", north(3_000.0)))
        .await
        .unwrap();
    let mut events = c
        .watch_nearby(watch_req("me", 1_000.0))
        .await
        .unwrap()
        .into_inner();
    let me = LatLng::new(north(0.0).0, north(0.0).1).unwrap();
    let d = |p: (f64, f64)| band_m(distance_m(me, LatLng::new(p.0, p.1).unwrap()));
    assert_eq!(
        next(&mut events).await,
        (Kind::Enter, "near".into(), d(north(400.0)))
    );
    assert_eq!(
        next(&mut events).await,
        (Kind::SnapshotEnd, String::new(), 0)
    );

    c.update_location(ping("far", north(600.0))).await.unwrap();
    assert_eq!(
        next(&mut events).await,
        (Kind::Enter, "far".into(), d(north(600.0)))
    );
    c.update_location(ping("near", north(5_000.0)))
        .await
        .unwrap();
    assert_eq!(
        next(&mut events).await,
        (Kind::Leave, "near".into(), d(north(5_000.0)))
    );
    c.clear_location(pb::ClearLocationRequest {
        user_id: "far".into(),
    })
    .await
    .unwrap();
    assert_eq!(next(&mut events).await, (Kind::Leave, "far".into(), 0));
    assert_eq!(server.app.nearby.watch_count(), 1);

    // The client going away closes the watch on the server at once.
    drop(events);
    server.app.nearby.until_watch_count(0).await;
    server.stop().await;
}

#[tokio::test]
async fn watching_without_a_location_or_with_a_bad_radius_is_refused() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let err = c.watch_nearby(watch_req("ghost", 0.0)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().starts_with("user_id"), "{err:?}");
    c.update_location(ping("me", north(0.0))).await.unwrap();
    let err = c.watch_nearby(watch_req("me", -1.0)).await.unwrap_err();
    assert_eq!(bad_field(&err), "radius_m");
    let err = c.watch_nearby(watch_req("", 0.0)).await.unwrap_err();
    assert_eq!(bad_field(&err), "user_id");
    assert_eq!(server.app.nearby.watch_count(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_consumer_that_stops_reading_is_cut_off_not_buffered_forever() {
    let server = start(&["--watch-buffer", "8"]).await;
    let mut c = server.nearby().await;
    c.update_location(ping("me", north(0.0))).await.unwrap();
    let mut events = c
        .watch_nearby(watch_req("me", 1_000.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut events).await.0, Kind::SnapshotEnd);
    // Far more ENTER / LEAVE than the transport's windows and the buffer hold, while the
    // watcher reads nothing.
    let churn: Vec<_> = (0..40_000)
        .map(|i| {
            let dy = if i % 2 == 0 { 100.0 } else { 5_000.0 };
            ping(
                &format!("user-with-a-longish-id-{:06}", i / 2 % 500),
                north(dy),
            )
        })
        .collect();
    c.update_locations(tokio_stream::iter(churn)).await.unwrap();
    let mut received = 0;
    let status = loop {
        match events.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(received < 40_000, "cut off after {received} events");
    server.app.nearby.until_watch_count(0).await;
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_watches_with_unavailable() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    c.update_location(ping("me", north(0.0))).await.unwrap();
    let mut events = c
        .watch_nearby(watch_req("me", 1_000.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut events).await.0, Kind::SnapshotEnd);
    let stopping = tokio::spawn(server.stop());
    let status = events.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    stopping.await.unwrap();
}
