//! WatchNearby over a Redis / Valkey store, through real gRPC and real servers the tests
//! start themselves: a watch open on one replica reports ENTER / LEAVE for pings, moves,
//! clears, visibility changes and expiries made through another replica, on a Cluster and
//! on one server, including a user who moves across the border of two hash tags.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    TestServer,
    build::{clear, ping, watch},
    fixtures::{BEIJING, cell_centre, moved, north_of, point},
    redis, start_store,
};
use geomatch::{
    geo::{band_m, distance_m},
    grpc::pb::{self, nearby_event::Kind},
};
use h3o::{LatLng, Resolution};
use tonic::{Code, Streaming};

/// The next event, or a failure after 10 s (a lost event must fail the test, not hang it).
async fn next(s: &mut Streaming<pb::NearbyEvent>) -> (Kind, String, u32) {
    let e = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("no event within 10 s")
        .unwrap()
        .expect("an event");
    let kind = e.kind();
    let user = e.user.unwrap_or_default();
    (kind, user.user_id, user.distance_m)
}

async fn replicas(flags: &[&str]) -> (TestServer, TestServer) {
    let mut args = flags.to_vec();
    args.extend_from_slice(&["--sweep-interval", "50ms"]);
    (start_store(&args).await, start_store(&args).await)
}

/// Every kind of change through B, seen by a watch through A.
async fn watch_across_replicas(flags: &[&str], p: &str, at: (f64, f64)) {
    let (a, b) = replicas(flags).await;
    let (mut ca, mut cb) = (a.nearby().await, b.nearby().await);
    let north = |dy: f64| cell_centre(north_of(at, dy));
    let d = |q| band_m(distance_m(point(north(0.0)), point(q)));
    let u = |name: &str| format!("{p}{name}");

    ca.update_location(ping(&u("me"), north(0.0)))
        .await
        .unwrap();
    cb.update_location(ping(&u("near"), north(400.0)))
        .await
        .unwrap();
    cb.update_location(ping(&u("far"), north(3_000.0)))
        .await
        .unwrap();
    let mut events = ca
        .watch_nearby(watch(&u("me"), 1_000.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next(&mut events).await,
        (Kind::Enter, u("near"), d(north(400.0)))
    );
    assert_eq!(next(&mut events).await.0, Kind::SnapshotEnd);

    // A ping into the radius, a move out of it, a clear.
    cb.update_location(ping(&u("far"), north(600.0)))
        .await
        .unwrap();
    assert_eq!(
        next(&mut events).await,
        (Kind::Enter, u("far"), d(north(600.0)))
    );
    cb.update_location(ping(&u("near"), north(5_000.0)))
        .await
        .unwrap();
    assert_eq!(
        next(&mut events).await,
        (Kind::Leave, u("near"), d(north(5_000.0)))
    );
    cb.clear_location(clear(&u("far"))).await.unwrap();
    assert_eq!(next(&mut events).await, (Kind::Leave, u("far"), 0));

    // Turning invisible is a LEAVE; a move within the radius is nothing.
    cb.update_location(ping(&u("vis"), north(200.0)))
        .await
        .unwrap();
    assert_eq!(
        next(&mut events).await,
        (Kind::Enter, u("vis"), d(north(200.0)))
    );
    cb.update_location(ping(&u("vis"), north(300.0)))
        .await
        .unwrap();
    let hidden = pb::UpdateLocationRequest {
        visibility: pb::Visibility::Invisible.into(),
        ..ping(&u("vis"), north(300.0))
    };
    cb.update_location(hidden).await.unwrap();
    assert_eq!(next(&mut events).await.0, Kind::Leave);

    // An expiry, once a replica sweeps.
    let brief = pb::UpdateLocationRequest {
        ttl_s: 60,
        ..ping(&u("brief"), north(100.0))
    };
    cb.update_location(brief).await.unwrap();
    assert_eq!(
        next(&mut events).await,
        (Kind::Enter, u("brief"), d(north(100.0)))
    );
    a.clock.advance_ms(61_000);
    b.clock.advance_ms(61_000);
    assert_eq!(next(&mut events).await, (Kind::Leave, u("brief"), 0));
    drop(events);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_one_replica_of_a_cluster_sees_changes_made_through_another() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    watch_across_replicas(&flags, &redis::unique_prefix("wc"), BEIJING).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_one_replica_of_one_server_sees_changes_made_through_another() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let flags = ["--store", "redis", "--redis-url", &url];
    watch_across_replicas(&flags, "ws:", BEIJING).await;
}

/// A user moving across the border of two hash tags (their changes come from two nodes)
/// within the watch: no event; then out of it: one LEAVE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_across_a_tag_border_inside_a_watch_is_no_event() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    let (a, b) = replicas(&flags).await;
    let p = redis::unique_prefix("wb");
    let tag = |q: (f64, f64)| {
        let c = cell_centre(q);
        LatLng::new(c.0, c.1)
            .unwrap()
            .to_cell(Resolution::Seven)
            .parent(Resolution::Five)
            .unwrap()
    };
    // Away from the other watch test on the shared cluster (its watch would see these).
    let mut west = moved(BEIJING, 0.0, 60_000.0);
    let east = loop {
        let next = moved(west, 100.0, 0.0);
        if tag(next) != tag(west) {
            break next;
        }
        west = next;
    };
    let (mut ca, mut cb) = (a.nearby().await, b.nearby().await);
    ca.update_location(ping(&format!("{p}me"), west))
        .await
        .unwrap();
    cb.update_location(ping(&format!("{p}mover"), west))
        .await
        .unwrap();
    let mut events = ca
        .watch_nearby(watch(&format!("{p}me"), 2_000.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut events).await.0, Kind::Enter);
    assert_eq!(next(&mut events).await.0, Kind::SnapshotEnd);
    for _ in 0..5 {
        cb.update_location(ping(&format!("{p}mover"), east))
            .await
            .unwrap();
        cb.update_location(ping(&format!("{p}mover"), west))
            .await
            .unwrap();
    }
    let gone = moved(west, 0.0, 20_000.0);
    cb.update_location(ping(&format!("{p}mover"), gone))
        .await
        .unwrap();
    // The first event after all those moves is the LEAVE of the last one, with its
    // distance (a move mistaken for a removal would show as a LEAVE at 0, then an ENTER).
    let want = band_m(distance_m(
        point(cell_centre(west)),
        point(cell_centre(gone)),
    ));
    assert_eq!(
        next(&mut events).await,
        (Kind::Leave, format!("{p}mover"), want)
    );
    cb.update_location(ping(&format!("{p}marker"), west))
        .await
        .unwrap();
    assert_eq!(next(&mut events).await.1, format!("{p}marker"));
}

#[tokio::test]
async fn a_watcher_without_a_location_is_refused_over_a_store() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let (a, _b) = replicas(&["--store", "redis", "--redis-url", &url]).await;
    let err = a
        .nearby()
        .await
        .watch_nearby(watch("wr:nobody", 1_000.0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

/// A watch follows its watcher: a ping of the watcher through another replica moves the
/// watch there, reporting who was left behind and who is around the new spot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_follows_its_watchers_pings_through_another_replica() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    let (a, b) = replicas(&flags).await;
    let p = redis::unique_prefix("wf");
    let home = moved(BEIJING, 30_000.0, -40_000.0);
    let away = moved(home, 8_000.0, 0.0);
    let (mut ca, mut cb) = (a.nearby().await, b.nearby().await);
    let u = |n: &str| format!("{p}{n}");
    ca.update_location(ping(&u("me"), home)).await.unwrap();
    cb.update_location(ping(&u("near"), north_of(home, 300.0)))
        .await
        .unwrap();
    cb.update_location(ping(&u("there"), north_of(away, 300.0)))
        .await
        .unwrap();
    let mut events = ca
        .watch_nearby(watch(&u("me"), 1_000.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut events).await.1, u("near"));
    assert_eq!(next(&mut events).await.0, Kind::SnapshotEnd);
    // The watcher moves, through the other replica.
    cb.update_location(ping(&u("me"), away)).await.unwrap();
    let left = next(&mut events).await;
    assert_eq!((left.0, left.1), (Kind::Leave, u("near")));
    let entered = next(&mut events).await;
    assert_eq!((entered.0, entered.1), (Kind::Enter, u("there")));
    // And from there on it sees changes around the new spot.
    cb.update_location(ping(&u("later"), north_of(away, 500.0)))
        .await
        .unwrap();
    let later = next(&mut events).await;
    assert_eq!((later.0, later.1), (Kind::Enter, u("later")));
    drop(events);
    a.stop().await;
    b.stop().await;
}
