//! Snapshot and restore end to end: graceful restarts, expiry across a restart, corrupt
//! files, and `kill -9` of a real server process in the middle of snapshot writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{path::PathBuf, sync::Arc, time::Duration};

use common::{
    T0,
    build::{SearchExt as _, ping, search},
    config,
    fixtures::{SHANGHAI, north_of},
    found,
    process::{self, Process},
    start, start_at,
};
use geomatch::{
    clock::ManualClock,
    grpc::pb::nearby_client::NearbyClient,
    nearby::{NearbyConfig, NearbyIndex, PageTokens, snapshot},
    server::{App, ServeError},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("geomatch-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whom a search within 10 km of Shanghai finds.
async fn visible(c: &mut NearbyClient<tonic::transport::Channel>) -> Vec<String> {
    found(c, search("probe", SHANGHAI).radius(10_000.0).limit(100)).await
}

#[tokio::test]
async fn a_graceful_restart_keeps_people_nearby_and_drops_what_expired_meanwhile() {
    let dir = temp_dir("restart");
    let path = dir.join("index.snap");
    let path_s = path.to_str().unwrap();
    let flags = ["--snapshot", path_s, "--location-ttl", "10m"];
    let server = start(&flags).await;
    let mut c = server.nearby().await;
    c.update_location(ping("early", SHANGHAI)).await.unwrap();
    server.clock.advance_ms(6 * 60 * 1_000);
    c.update_location(ping("late", north_of(SHANGHAI, 100.0)))
        .await
        .unwrap();
    assert_eq!(visible(&mut c).await, ["early", "late"]);
    server.stop().await;
    assert!(path.exists(), "written on graceful shutdown");

    // Back up at once: both are there.
    let server = start_at(&flags, T0 + 6 * 60 * 1_000).await;
    let mut c = server.nearby().await;
    assert_eq!(visible(&mut c).await, ["early", "late"]);
    server.stop().await;

    // Back up five minutes later: "early" expired while the server was down.
    let server = start_at(&flags, T0 + 11 * 60 * 1_000).await;
    let mut c = server.nearby().await;
    assert_eq!(visible(&mut c).await, ["late"]);
    assert_eq!(
        server.app.nearby.len(),
        1,
        "expired pings are not even loaded"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_corrupt_snapshot_stops_start_up_unless_told_to_ignore_it() {
    let dir = temp_dir("corrupt");
    let path = dir.join("index.snap");
    let path_s = path.to_str().unwrap();
    let server = start(&["--snapshot", path_s]).await;
    let mut c = server.nearby().await;
    c.update_location(ping("alice", SHANGHAI)).await.unwrap();
    server.stop().await;
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let clock = Arc::new(ManualClock::new(T0));
    let err = App::new(&config(&["--snapshot", path_s]), clock.clone()).unwrap_err();
    assert!(matches!(err, ServeError::Snapshot(_)), "{err}");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");

    let app = App::new(
        &config(&["--snapshot", path_s, "--snapshot-ignore-corrupt"]),
        clock,
    )
    .unwrap();
    assert!(app.nearby.is_empty());
    let mut aside = path.clone().into_os_string();
    aside.push(".corrupt");
    assert!(
        PathBuf::from(aside).exists(),
        "the bad file is kept for inspection"
    );
}

/// A real `geomatch` process writing snapshots every 20 ms.
async fn spawn_server(snapshot: &str) -> Process {
    process::spawn(&[
        "--snapshot",
        snapshot,
        "--snapshot-interval",
        "20ms",
        // A debug build on a busy machine: no load shedding, so every ping lands.
        "--max-queue-delay",
        "0",
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_snapshot_writes_always_leaves_a_loadable_snapshot() {
    let dir = temp_dir("kill9");
    let path = dir.join("index.snap");
    let path_s = path.to_str().unwrap().to_string();
    let mut rng = StdRng::seed_from_u64(99);

    let mut server = spawn_server(&path_s).await;
    let channel = server.channel().await;
    let users = 20_000;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut c = NearbyClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            for i in (t..users).step_by(8) {
                let at = north_of(SHANGHAI, i as f64);
                c.update_location(ping(&format!("user:{i:012}"), at))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let fresh = || NearbyIndex::new(NearbyConfig::default(), PageTokens::new([0; 32]));
    let mut killed_mid_write = 0;
    let mut last_count = 0;
    for round in 0..20 {
        // Snapshots are written every 20 ms: kill at a random moment, often mid-write.
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..60))).await;
        server.child.start_kill().unwrap();
        server.child.wait().await.unwrap();
        if dir.join("index.snap.tmp").exists() {
            killed_mid_write += 1;
        }
        // Whatever is on disk is a whole snapshot: the old or the new one, never torn.
        let index = fresh();
        let stats = snapshot::load(&index, &path, i64::MAX / 4 - 1)
            .map(|s| s.map(|s| s.users + s.expired))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        // The old snapshot or the new one: a snapshot taken while the population was still
        // loading holds fewer users, and later ones never hold fewer than earlier ones.
        let n = stats.unwrap_or(0);
        assert!(
            n >= last_count && n <= users as u64,
            "round {round}: {n} users after {last_count}"
        );
        last_count = n;
        // And a real server starts from it.
        server = spawn_server(&path_s).await;
    }
    assert!(last_count > 0, "no snapshot was ever written");
    eprintln!(
        "{killed_mid_write} of 20 kills left a partial temp file behind; {last_count} users survived"
    );
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
}
