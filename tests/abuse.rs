//! Abuse controls over real gRPC: rate limits, impossible travel, the user cap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    build::{clear, ping, search, shake, status},
    fixtures::{BEIJING, SHANGHAI, north_of},
    start,
};
use geomatch::grpc::pb;
use tonic::Code;
use tonic_types::StatusExt as _;

#[tokio::test]
async fn searches_over_the_rate_get_resource_exhausted_with_a_retry_delay() {
    let server = start(&["--search-burst", "3", "--search-per-minute", "60"]).await;
    let mut c = server.nearby().await;
    for _ in 0..3 {
        c.search_nearby(search("scraper", SHANGHAI)).await.unwrap();
    }
    let err = c
        .search_nearby(search("scraper", SHANGHAI))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let retry = err.get_details_retry_info().expect("RetryInfo details");
    assert_eq!(retry.retry_delay, Some(std::time::Duration::from_secs(1)));
    // Other users are not affected, and the limit refills.
    c.search_nearby(search("someone-else", SHANGHAI))
        .await
        .unwrap();
    server.clock.advance_ms(1_000);
    c.search_nearby(search("scraper", SHANGHAI)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn shakes_over_the_rate_get_resource_exhausted() {
    let server = start(&[
        "--shake-burst",
        "1",
        "--shake-per-minute",
        "1",
        "--shake-window",
        "10ms",
    ])
    .await;
    let mut c = server.shake().await;
    let first = c.shake(shake("eager", "s1", SHANGHAI)).await.unwrap();
    assert_eq!(
        first.into_inner().outcome(),
        pb::shake_response::Outcome::NoMatch
    );
    let err = c.shake(shake("eager", "s2", SHANGHAI)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.get_details_retry_info().is_some());
    server.stop().await;
}

#[tokio::test]
async fn impossible_travel_is_refused_everywhere_and_leaves_the_location_alone() {
    let server = start(&["--max-speed", "300", "--max-jump", "5km"]).await;
    let mut c = server.nearby().await;
    let placed = c
        .update_location(ping("u", SHANGHAI))
        .await
        .unwrap()
        .into_inner();
    server.clock.advance_ms(10 * 60 * 1_000);
    // Shanghai to Beijing in ten minutes, by ping, search, shake or bulk item.
    let err = c.update_location(ping("u", BEIJING)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().starts_with("position: impossible travel"),
        "{err:?}"
    );
    let status = c
        .get_location_status(status("u"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.cell, placed.cell, "stored location unchanged");
    let err = c.search_nearby(search("u", BEIJING)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let mut s = server.shake().await;
    let err = s.shake(shake("u", "s1", BEIJING)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let summary = c
        .update_locations(tokio_stream::iter(vec![ping("u", BEIJING)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.accepted, summary.rejected), (0, 1));
    assert_eq!(summary.rejections[0].field, "position");
    // Short hops are ordinary GPS noise, however fast.
    c.update_location(ping("u", north_of(SHANGHAI, 3_000.0)))
        .await
        .unwrap();
    // A phone off for hours may reappear in another city.
    server.clock.advance_ms(4 * 3_600 * 1_000);
    c.update_location(ping("u", BEIJING)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn max_speed_zero_turns_the_travel_check_off() {
    let server = start(&["--max-speed", "0"]).await;
    let mut c = server.nearby().await;
    c.update_location(ping("u", SHANGHAI)).await.unwrap();
    c.update_location(ping("u", BEIJING)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn at_the_user_cap_new_users_are_refused_and_existing_ones_keep_updating() {
    let server = start(&["--max-users", "2"]).await;
    let mut c = server.nearby().await;
    c.update_location(ping("a", SHANGHAI)).await.unwrap();
    c.update_location(ping("b", SHANGHAI)).await.unwrap();
    let err = c.update_location(ping("c", SHANGHAI)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(server.app.nearby.len(), 2, "nothing stored");
    c.update_location(ping("a", north_of(SHANGHAI, 100.0)))
        .await
        .unwrap();
    c.clear_location(clear("b")).await.unwrap();
    c.update_location(ping("c", SHANGHAI)).await.unwrap();
    assert_eq!(server.app.nearby.len(), 2);
    server.stop().await;
}
