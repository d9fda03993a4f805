//! People Nearby over a Redis / Valkey store, through real gRPC and real servers the tests
//! start themselves: the same brute-force contract as in memory, two replicas over one
//! store serving one world (a ping through one found, reported and cleared through the
//! other, a page token from one continued on the other), TTL and visibility, health while
//! the store is down, stores behind a password or an ACL user, and stores geomatch must
//! refuse at start. WatchNearby over a store
//! is in `store_watch.rs`, Shake in `store_shake.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{
    T0,
    build::{SearchExt as _, clear, ping, search, status},
    config, contract,
    fixtures::{BEIJING, SHANGHAI, moved, privacy_cell},
    found, redis, start_store,
};
use geomatch::grpc::pb::nearby_client::NearbyClient;
use geomatch::{
    clock::{Clock as _, ManualClock},
    grpc::pb,
    server::{App, ServeError},
    store::NearbyStore,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::Code;
use tonic::transport::Channel;

/// Two replicas over one store, and every check of the contract across them.
async fn two_replicas_serve_one_world(flags: &[&str], prefix: &str, centre: (f64, f64)) {
    let a = start_store(flags).await;
    let b = start_store(flags).await;
    let (mut ca, mut cb) = (a.nearby().await, b.nearby().await);

    // The brute-force contract: pinged through A, every page walked alternately through
    // A and B (tokens from one continue on the other), exactly as in memory.
    let mut rng = StdRng::seed_from_u64(21);
    let model = contract::populate(&mut ca, &mut rng, prefix, 400, centre, 0.03).await;
    for _ in 0..12 {
        let req = contract::random_query(&mut rng, &model, centre, 0.02);
        let got = contract::walk(&mut [ca.clone(), cb.clone()], req.clone()).await;
        assert_eq!(got, contract::expected(&model, &req), "{req:?}");
    }

    // A ping through A: status through B names its privacy cell; a move through B is seen
    // through A; a clear through A is reported by B.
    let me = format!("{prefix}me");
    let placed = ca
        .update_location(ping(&me, centre))
        .await
        .unwrap()
        .into_inner();
    let st = held(&mut cb, &me).await;
    assert!(st.found);
    assert_eq!(st.cell, privacy_cell(centre).to_string());
    assert_eq!(st.cell, placed.cell);
    let far = common::fixtures::moved(centre, 2_000.0, 0.0);
    cb.update_location(ping(&me, far)).await.unwrap();
    let st = held(&mut ca, &me).await;
    assert_eq!(st.cell, privacy_cell(far).to_string());
    let near_far = found(&mut ca, search(&format!("{prefix}x"), far).limit(100)).await;
    assert!(near_far.contains(&me), "{near_far:?}");
    let near_old = found(&mut ca, search(&format!("{prefix}x"), centre).limit(100)).await;
    assert!(!near_old.contains(&me), "moved away: {near_old:?}");
    assert!(cleared(&mut ca, &me).await);
    assert!(!held(&mut cb, &me).await.found);
    assert!(!cleared(&mut cb, &me).await);

    // Invisible users search but are never found; a per-ping TTL ends visibility on every
    // replica (each reads its own clock: the store filters by the reader's now).
    let ghost = format!("{prefix}ghost");
    ca.update_location(pb::UpdateLocationRequest {
        visibility: pb::Visibility::Invisible.into(),
        ..ping(&ghost, centre)
    })
    .await
    .unwrap();
    let short = format!("{prefix}short");
    ca.update_location(pb::UpdateLocationRequest {
        ttl_s: 60,
        ..ping(&short, centre)
    })
    .await
    .unwrap();
    let seen = found(&mut cb, search(&format!("{prefix}y"), centre).limit(100)).await;
    assert!(!seen.contains(&ghost) && seen.contains(&short), "{seen:?}");
    b.clock.advance_ms(60_000);
    let seen = found(&mut cb, search(&format!("{prefix}y"), centre).limit(100)).await;
    assert!(!seen.contains(&short), "expired on B: {seen:?}");
    assert!(!held(&mut cb, &short).await.found);
    let seen = found(&mut ca, search(&format!("{prefix}y"), centre).limit(100)).await;
    assert!(
        seen.contains(&short),
        "not yet expired on A's clock: {seen:?}"
    );
    // B's sweep reclaims it from the store itself: gone for A too, whatever A's clock.
    let NearbyStore::Redis(remote) = &b.app.store else {
        panic!("a Redis store");
    };
    assert_eq!(remote.sweep(b.clock.now_ms()).await.unwrap(), 1);
    // The sweep lease: one replica at a time sweeps; the holder keeps it by renewing.
    let NearbyStore::Redis(other) = &a.app.store else {
        panic!("a Redis store");
    };
    let hold = std::time::Duration::from_secs(60);
    let (first, second) = if remote.sweep_lease(hold).await.unwrap() {
        (remote, other)
    } else {
        (other, remote)
    };
    assert!(first.sweep_lease(hold).await.unwrap(), "the holder renews");
    assert!(
        !second.sweep_lease(hold).await.unwrap(),
        "one holder at a time"
    );
    let seen = found(&mut ca, search(&format!("{prefix}y"), centre).limit(100)).await;
    assert!(!seen.contains(&short), "swept: {seen:?}");

    // The sweep follows each user's latest ping: a ping again with a shorter time to live
    // is swept at its own end; one again with a later end is kept until then (a ping
    // leaves its expiry entry where it was unless that moves it earlier, and the sweep
    // moves a due entry on to its member's real end).
    let ttl = |user: &str, ttl_s: u32| pb::UpdateLocationRequest {
        ttl_s,
        ..ping(user, centre)
    };
    let (shorter, again) = (format!("{prefix}shorter"), format!("{prefix}again"));
    cb.update_location(ttl(&shorter, 600)).await.unwrap();
    cb.update_location(ttl(&shorter, 60)).await.unwrap();
    cb.update_location(ttl(&again, 60)).await.unwrap();
    b.clock.advance_ms(30_000);
    cb.update_location(ttl(&again, 60)).await.unwrap();
    b.clock.advance_ms(30_000);
    assert_eq!(remote.sweep(b.clock.now_ms()).await.unwrap(), 1, "shorter");
    let seen = found(&mut cb, search(&format!("{prefix}y"), centre).limit(100)).await;
    assert!(
        seen.contains(&again) && !seen.contains(&shorter),
        "{seen:?}"
    );
    assert_eq!(remote.sweep(b.clock.now_ms()).await.unwrap(), 0);
    b.clock.advance_ms(30_000);
    assert_eq!(remote.sweep(b.clock.now_ms()).await.unwrap(), 1, "again");
    let seen = found(&mut ca, search(&format!("{prefix}y"), centre).limit(100)).await;
    assert!(
        !seen.contains(&again),
        "swept at its second ping's end: {seen:?}"
    );
    // A sweep goes on past whole batches of entries that only move on: 25 users, each in
    // a cell of their own, who pinged again come due just before one who did not, and the
    // sweep handles 10 cells per call.
    let keepers: Vec<pb::UpdateLocationRequest> = (0..25)
        .map(|i| pb::UpdateLocationRequest {
            ttl_s: 60,
            ..ping(
                &format!("{prefix}k{i:04}"),
                moved(
                    centre,
                    f64::from(i % 5 + 1) * 400.0,
                    f64::from(i / 5 + 1) * 400.0,
                ),
            )
        })
        .collect();
    let cells: std::collections::HashSet<_> = keepers
        .iter()
        .map(|k| {
            let p = k.position.as_ref().unwrap();
            privacy_cell((p.lat, p.lng))
        })
        .chain([privacy_cell(centre)])
        .collect();
    assert_eq!(cells.len(), 26, "a cell each");
    let through_b = cb.clone();
    let bulk = |items: Vec<pb::UpdateLocationRequest>| {
        let mut c = through_b.clone();
        async move {
            let s = c
                .update_locations(tokio_stream::iter(items))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(s.rejected, 0, "{:?}", s.rejections);
        }
    };
    bulk(keepers.clone()).await;
    b.clock.advance_ms(1);
    let gone = format!("{prefix}gone");
    cb.update_location(ttl(&gone, 60)).await.unwrap();
    b.clock.advance_ms(30_000);
    bulk(keepers).await;
    b.clock.advance_ms(30_000);
    // A's clock is behind: it still sees the ping until the store forgets it.
    assert!(held(&mut ca, &gone).await.found);
    assert_eq!(
        remote.sweep_by(b.clock.now_ms(), 10).await.unwrap(),
        1,
        "swept past batches of keepers"
    );
    assert!(!held(&mut ca, &gone).await.found);
    assert!(held(&mut ca, &format!("{prefix}k0024")).await.found);

    a.stop().await;
    b.stop().await;
}

/// Far from every other test's users: sparse country of its own.
const SPARSE_AT: (f64, f64) = (35.5, 100.5);

/// Searches in sparse country (a few hundred users over a square of 110 km): the store's
/// search reads whole regions (their expiry ZSETs) and finds exactly what the brute
/// force finds, every page walked alternately through two replicas.
async fn sparse_country_searches_equal_the_brute_force(flags: &[&str], prefix: &str) {
    let a = start_store(flags).await;
    let b = start_store(flags).await;
    let (mut ca, cb) = (a.nearby().await, b.nearby().await);
    let mut rng = StdRng::seed_from_u64(33);
    let model = contract::populate(&mut ca, &mut rng, prefix, 250, SPARSE_AT, 0.5).await;
    let mut ids: Vec<&String> = model.users.keys().collect();
    ids.sort();
    let mut found_some = 0;
    for _ in 0..24 {
        let searcher = ids[rng.random_range(0..ids.len())].clone();
        let at = common::fixtures::moved(
            SPARSE_AT,
            rng.random_range(-45_000.0..45_000.0),
            rng.random_range(-45_000.0..45_000.0),
        );
        let req = search(&searcher, at)
            .radius([3_000.0, 5_000.0, 10_000.0][rng.random_range(0..3)])
            .limit([2, 50][rng.random_range(0..2)])
            .with_gender(rng.random_range(0..3));
        let got = contract::walk(&mut [ca.clone(), cb.clone()], req.clone()).await;
        let want = contract::expected(&model, &req);
        found_some += usize::from(!want.is_empty());
        assert_eq!(got, want, "{req:?}");
    }
    assert!(found_some >= 8, "only {found_some} searches found anyone");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn sparse_country_searches_over_one_redis_server_equal_the_brute_force() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    sparse_country_searches_equal_the_brute_force(
        &["--store", "redis", "--redis-url", &url],
        "rs:",
    )
    .await;
}

#[tokio::test]
async fn sparse_country_searches_over_a_redis_cluster_equal_the_brute_force() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    sparse_country_searches_equal_the_brute_force(&flags, "cs:").await;
}

/// A store written by an earlier build keeps an expiry entry per user
/// (`coarse/cell|user`): the sweep still takes such a user out once expired, and moves a
/// user's entry on to their real expiry while they are kept.
#[tokio::test]
async fn expiry_entries_of_one_user_from_an_earlier_build_are_still_swept() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let a = start_store(&["--store", "redis", "--redis-url", &url]).await;
    let mut c = a.nearby().await;
    let at = SHANGHAI;
    let with_ttl = |user: &str, ttl_s: u32| pb::UpdateLocationRequest {
        ttl_s,
        ..ping(user, at)
    };
    c.update_location(with_ttl("old:gone", 60)).await.unwrap();
    c.update_location(with_ttl("old:kept", 600)).await.unwrap();
    // The tag's expiry ZSET as an earlier build kept it: an entry per user, both due at
    // the first one's end.
    let cell = privacy_cell(at);
    let coarse = h3o::LatLng::from(cell).to_cell(h3o::Resolution::Seven);
    let tag = coarse.parent(h3o::Resolution::Five).unwrap();
    let key = format!("gm1:{{{tag}}}:x");
    let due = a.clock.now_ms() + 60_000;
    let entry = |user: &str| format!("{coarse}/{cell}|{user}");
    let mut con = server.connection().await;
    let _: () = ::redis::pipe()
        .del(&key)
        .zadd(&key, entry("old:gone"), due)
        .zadd(&key, entry("old:kept"), due)
        .query_async(&mut con)
        .await
        .unwrap();
    let NearbyStore::Redis(remote) = &a.app.store else {
        panic!("a Redis store");
    };
    a.clock.advance_ms(60_000);
    assert_eq!(remote.sweep(a.clock.now_ms()).await.unwrap(), 1);
    assert!(!held(&mut c, "old:gone").await.found);
    assert!(held(&mut c, "old:kept").await.found);
    let (gone, kept): (Option<i64>, Option<i64>) = ::redis::pipe()
        .zscore(&key, entry("old:gone"))
        .zscore(&key, entry("old:kept"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(gone, None, "the swept user's entry is dropped");
    assert_eq!(
        kept,
        Some(due - 60_000 + 600_000),
        "moved on to the kept user's end"
    );
    a.clock.advance_ms(540_000);
    assert_eq!(remote.sweep(a.clock.now_ms()).await.unwrap(), 1);
    assert!(!held(&mut c, "old:kept").await.found);
    a.stop().await;
}

/// What `c`'s replica reports about `user`.
async fn held(c: &mut NearbyClient<Channel>, user: &str) -> pb::GetLocationStatusResponse {
    c.get_location_status(status(user))
        .await
        .unwrap()
        .into_inner()
}

/// Clears `user` through `c`'s replica; whether a location existed.
async fn cleared(c: &mut NearbyClient<Channel>, user: &str) -> bool {
    c.clear_location(clear(user))
        .await
        .unwrap()
        .into_inner()
        .existed
}

#[tokio::test]
async fn one_redis_server_serves_one_world_to_two_replicas() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    two_replicas_serve_one_world(&["--store", "redis", "--redis-url", &url], "r:", SHANGHAI).await;
}

#[tokio::test]
async fn a_redis_cluster_serves_one_world_to_two_replicas() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    two_replicas_serve_one_world(&flags, "c:", BEIJING).await;
}

#[tokio::test]
async fn a_valkey_cluster_serves_one_world_to_two_replicas() {
    let Some(cluster) = redis::valkey_cluster(3, 0).await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    two_replicas_serve_one_world(&flags, "vc:", SHANGHAI).await;
}

/// Sends every pair's first ping through `a` and second through `b`, all pairs at once and
/// each pair's two in flight together (which is sent first alternates); each must succeed.
async fn ping_pairs_at_once(
    a: &common::TestServer,
    b: &common::TestServer,
    pairs: Vec<(pb::UpdateLocationRequest, pb::UpdateLocationRequest)>,
) {
    let mut calls = tokio::task::JoinSet::new();
    for (i, (pa, pb)) in pairs.into_iter().enumerate() {
        let (mut ca, mut cb) = (a.nearby().await, b.nearby().await);
        calls.spawn(async move {
            if i % 2 == 0 {
                tokio::join!(ca.update_location(pa), cb.update_location(pb))
            } else {
                let (y, x) = tokio::join!(cb.update_location(pb), ca.update_location(pa));
                (x, y)
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        let (x, y) = done.unwrap();
        x.unwrap();
        y.unwrap();
    }
}

/// The users named `prefix...` found within 2.5 km of `at`, every page walked through `c`.
async fn found_within(c: &NearbyClient<Channel>, prefix: &str, at: (f64, f64)) -> Vec<String> {
    contract::walk(
        &mut [c.clone()],
        search(&format!("{prefix}searcher"), at)
            .limit(100)
            .radius(2_500.0),
    )
    .await
    .into_iter()
    .map(|(u, _)| u)
    .filter(|u| u.starts_with(prefix))
    .collect()
}

/// Two replicas ping the same users at once, one of them 10 s ahead: under any
/// interleaving of their store calls, each user ends where the newer ping put them, and
/// nobody is left behind at the older position.
async fn concurrent_pings_through_two_replicas_leave_only_the_newest(
    flags: &[&str],
    prefix: &str,
    clustered: bool,
) {
    let written_together = geomatch::store::redis::written_together();
    let (a, b) = (start_store(flags).await, start_store(flags).await);
    b.clock.advance_ms(10_000);
    let older = |i: usize| common::fixtures::moved(SHANGHAI, i as f64 * 10.0, 0.0);
    let newer = |i: usize| common::fixtures::moved(SHANGHAI, i as f64 * 10.0, 3_000.0);
    let pairs = (0..200)
        .map(|i| {
            let user = format!("{prefix}{i:03}");
            // Each user's newer ping lives a time of its own, so that a status answer
            // handed to the wrong caller shows even between users of one privacy cell.
            let (pa, mut pb) = (ping(&user, older(i)), ping(&user, newer(i)));
            pb.ttl_s = 600 + i as u32;
            (pa, pb)
        })
        .collect();
    ping_pairs_at_once(&a, &b, pairs).await;
    // All at once through one replica: over a Cluster the calls bound for one master are
    // written together, and each must still get its own user's answer.
    let mut asked = tokio::task::JoinSet::new();
    for i in 0..200 {
        let mut c = a.nearby().await;
        let user = format!("{prefix}{i:03}");
        asked.spawn(async move { (i, held(&mut c, &user).await) });
    }
    while let Some(done) = asked.join_next().await {
        let (i, st) = done.unwrap();
        assert_eq!(
            st.cell,
            privacy_cell(newer(i)).to_string(),
            "{prefix}{i:03}"
        );
        assert_eq!(
            st.expires_at_ms - st.last_seen_ms,
            (600 + i as i64) * 1000,
            "{prefix}{i:03}: another user's answer"
        );
    }
    if clustered {
        // The concurrent calls did share writes to a master (process-wide count; other
        // tests only add to it).
        assert!(
            geomatch::store::redis::written_together() > written_together,
            "no store command was written together with another"
        );
    }
    let left_behind = found_within(&a.nearby().await, prefix, SHANGHAI).await;
    assert!(left_behind.is_empty(), "stale copies: {left_behind:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pings_through_two_replicas_over_one_redis_server_leave_only_the_newest() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let flags = ["--store", "redis", "--redis-url", &url];
    concurrent_pings_through_two_replicas_leave_only_the_newest(&flags, "lww:", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pings_through_two_replicas_over_a_redis_cluster_leave_only_the_newest() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    concurrent_pings_through_two_replicas_leave_only_the_newest(&flags, "clww:", true).await;
}

/// Pings that were one store call and pings that wrote their record, through `server`.
fn ping_calls(server: &common::TestServer) -> (u64, u64) {
    let NearbyStore::Redis(remote) = &server.app.store else {
        panic!("a Redis store");
    };
    remote.ping_calls()
}

/// A ping to the cell a user's recorded ping is in skips the record write only while the
/// record is of this epoch or the one before and lives at least as long as the ping; each
/// answer is the ping's own.
async fn a_ping_to_the_recorded_cell_is_one_store_call(flags: &[&str], prefix: &str) {
    let a = start_store(flags).await;
    let mut c = a.nearby().await;
    let user = format!("{prefix}u");
    let here = SHANGHAI;
    let epoch_ms = geomatch::store::redis::RECORD_EPOCH.as_millis() as i64;
    let ping_for = |ttl_s: u32| pb::UpdateLocationRequest {
        ttl_s,
        ..ping(&user, here)
    };
    let mut expect = ping_calls(&a);
    let mut step = |stood: u64, written: u64, why: &str| {
        expect = (expect.0 + stood, expect.1 + written);
        assert_eq!(ping_calls(&a), expect, "{why}");
    };
    c.update_location(ping_for(600)).await.unwrap();
    step(0, 1, "a first ping writes the record");
    a.clock.advance_ms(1_000);
    c.update_location(ping_for(600)).await.unwrap();
    step(1, 0, "the same cell, the record standing: one call");
    let st = held(&mut c, &user).await;
    assert_eq!(
        st.last_seen_ms,
        T0 + 1_000,
        "the member is the newer ping's"
    );
    assert_eq!(st.expires_at_ms, T0 + 1_000 + 600_000);
    c.update_location(ping_for(1_200)).await.unwrap();
    step(0, 1, "a longer life than the record's writes it");
    a.clock.advance_ms(2 * epoch_ms);
    c.update_location(ping_for(600)).await.unwrap();
    step(0, 1, "two epochs on, the record is written again");
    a.clock.advance_ms(1_000);
    c.update_location(ping_for(600)).await.unwrap();
    step(1, 0, "and then stands again");
    // A move always writes the record; the next ping in the new cell stands on it.
    let there = moved(here, 3_000.0, 0.0);
    c.update_location(ping(&user, there)).await.unwrap();
    step(0, 1, "a move");
    c.update_location(ping(&user, there)).await.unwrap();
    step(1, 0, "a ping after the move");
    let st = held(&mut c, &user).await;
    assert_eq!(st.cell, privacy_cell(there).to_string());
    a.stop().await;
}

#[tokio::test]
async fn a_ping_to_the_recorded_cell_is_one_store_call_over_one_redis_server() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let flags = ["--store", "redis", "--redis-url", &url];
    a_ping_to_the_recorded_cell_is_one_store_call(&flags, "one:").await;
}

#[tokio::test]
async fn a_ping_to_the_recorded_cell_is_one_store_call_over_a_redis_cluster() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    a_ping_to_the_recorded_cell_is_one_store_call(&flags, "cone:").await;
}

/// A move that runs after a newer ping skipped its record write (the older ping reaches
/// the store last) records the newer ping again and takes back its own member; a clear
/// after a skipped record write still takes the user out.
async fn a_skipped_record_write_still_leaves_only_the_newest(flags: &[&str], prefix: &str) {
    let (a, b) = (start_store(flags).await, start_store(flags).await);
    let (mut ca, mut cb) = (a.nearby().await, b.nearby().await);
    let user = format!("{prefix}u");
    let here = SHANGHAI;
    let there = moved(SHANGHAI, 3_000.0, 0.0);
    ca.update_location(ping(&user, here)).await.unwrap();
    a.clock.advance_ms(3_000);
    let before = ping_calls(&a);
    ca.update_location(pb::UpdateLocationRequest {
        ttl_s: 700,
        ..ping(&user, here)
    })
    .await
    .unwrap();
    assert_eq!(
        ping_calls(&a).0,
        before.0 + 1,
        "the newer ping skipped the record"
    );
    // An older ping (B's clock is behind A's) to another cell reaches the store last.
    b.clock.advance_ms(2_000);
    cb.update_location(ping(&user, there)).await.unwrap();
    for c in [&mut ca, &mut cb] {
        let st = held(c, &user).await;
        assert_eq!(
            st.cell,
            privacy_cell(here).to_string(),
            "the newest ping's cell"
        );
        assert_eq!(st.last_seen_ms, T0 + 3_000);
        assert_eq!(st.expires_at_ms, T0 + 3_000 + 700_000);
    }
    let searcher = format!("{prefix}searcher");
    let near_there = found(&mut cb, search(&searcher, there).limit(100)).await;
    assert!(
        !near_there.contains(&user),
        "the older copy stays: {near_there:?}"
    );
    assert!(
        found(&mut ca, search(&searcher, here).limit(100))
            .await
            .contains(&user)
    );
    // The record holds the newest ping again, and the member lost its mark when the move
    // kept it: its next ping writes the record, and the one after stands on it.
    let short = pb::UpdateLocationRequest {
        ttl_s: 700,
        ..ping(&user, here)
    };
    for (stood, written) in [(0, 1), (1, 0)] {
        a.clock.advance_ms(1_000);
        let before = ping_calls(&a);
        ca.update_location(short.clone()).await.unwrap();
        assert_eq!(ping_calls(&a), (before.0 + stood, before.1 + written));
    }
    // A clear after that skipped record write takes the newer member too.
    b.clock.advance_ms(4_000);
    assert!(cleared(&mut cb, &user).await);
    assert!(!held(&mut ca, &user).await.found);
    assert!(
        !found(&mut ca, search(&searcher, here).limit(100))
            .await
            .contains(&user)
    );
    // A clear through a replica whose clock is behind a ping that skipped its record
    // write leaves that newer ping, recorded: reported, and cleared by a later clear.
    a.clock.advance_ms(3_000);
    for _ in 0..2 {
        a.clock.advance_ms(1);
        ca.update_location(short.clone()).await.unwrap();
    }
    assert!(!cleared(&mut cb, &user).await, "older than the ping");
    for c in [&mut ca, &mut cb] {
        let st = held(c, &user).await;
        assert!(st.found, "the newer ping is still recorded");
        assert_eq!(st.last_seen_ms, a.clock.now_ms());
    }
    assert!(
        found(&mut cb, search(&searcher, here).limit(100))
            .await
            .contains(&user)
    );
    assert!(cleared(&mut ca, &user).await);
    assert!(!held(&mut cb, &user).await.found);
    assert!(
        !found(&mut cb, search(&searcher, here).limit(100))
            .await
            .contains(&user)
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_skipped_record_write_still_leaves_only_the_newest_over_one_redis_server() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let flags = ["--store", "redis", "--redis-url", &url];
    a_skipped_record_write_still_leaves_only_the_newest(&flags, "skip:").await;
}

#[tokio::test]
async fn a_skipped_record_write_still_leaves_only_the_newest_over_a_redis_cluster() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    a_skipped_record_write_still_leaves_only_the_newest(&flags, "cskip:").await;
}

/// Many users at once: each pings the cell it is recorded in through A (skipping the
/// record write) while an older ping of it to another cell goes through B; whatever
/// reaches the store first, the newer ping is where each user is, with its own answer.
async fn pings_skipping_their_record_race_older_moves(flags: &[&str], prefix: &str) {
    let (a, b) = (start_store(flags).await, start_store(flags).await);
    let here = |i: usize| common::fixtures::moved(SHANGHAI, i as f64 * 10.0, 0.0);
    let there = |i: usize| common::fixtures::moved(SHANGHAI, i as f64 * 10.0, 3_000.0);
    let users: Vec<String> = (0..200).map(|i| format!("{prefix}{i:03}")).collect();
    let mut ca = a.nearby().await;
    for (i, user) in users.iter().enumerate() {
        ca.update_location(ping(user, here(i))).await.unwrap();
    }
    a.clock.advance_ms(20_000);
    b.clock.advance_ms(10_000);
    let before = ping_calls(&a);
    let pairs = users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let (mut pa, pb) = (ping(user, here(i)), ping(user, there(i)));
            pa.ttl_s = 600 + i as u32;
            (pa, pb)
        })
        .collect();
    ping_pairs_at_once(&a, &b, pairs).await;
    assert!(
        ping_calls(&a).0 > before.0,
        "no ping through A skipped its record write"
    );
    for (i, user) in users.iter().enumerate() {
        let st = held(&mut ca, user).await;
        assert_eq!(st.cell, privacy_cell(here(i)).to_string(), "{user}");
        assert_eq!(st.last_seen_ms, T0 + 20_000, "{user}");
        assert_eq!(
            st.expires_at_ms - st.last_seen_ms,
            (600 + i as i64) * 1000,
            "{user}"
        );
    }
    let left_behind = found_within(&ca, prefix, moved(SHANGHAI, 0.0, 3_000.0)).await;
    assert!(left_behind.is_empty(), "stale copies: {left_behind:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_skipping_their_record_race_older_moves_over_one_redis_server() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let flags = ["--store", "redis", "--redis-url", &url];
    pings_skipping_their_record_race_older_moves(&flags, "race:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_skipping_their_record_race_older_moves_over_a_redis_cluster() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    pings_skipping_their_record_race_older_moves(&flags, "crace:").await;
}

/// The SearchNearby rate limit is one token bucket per user in the store, not one per
/// replica: a burst spent through one replica is spent for all.
#[tokio::test]
async fn the_search_rate_limit_holds_across_replicas() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let flags = [
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--search-burst",
        "3",
        "--search-per-minute",
        "60",
    ];
    let (a, b) = (start_store(&flags).await, start_store(&flags).await);
    let (mut ca, mut cb) = (a.nearby().await, b.nearby().await);
    for _ in 0..3 {
        ca.search_nearby(search("rl:me", SHANGHAI)).await.unwrap();
    }
    let err = cb
        .search_nearby(search("rl:me", SHANGHAI))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    use tonic_types::StatusExt as _;
    let retry = err.get_details_retry_info().and_then(|r| r.retry_delay);
    assert_eq!(retry, Some(std::time::Duration::from_secs(1)), "{err:?}");
    // Others have their own bucket; a second later one token is back, on any replica.
    cb.search_nearby(search("rl:other", SHANGHAI))
        .await
        .unwrap();
    a.clock.advance_ms(1_000);
    b.clock.advance_ms(1_000);
    cb.search_nearby(search("rl:me", SHANGHAI)).await.unwrap();
    let err = ca
        .search_nearby(search("rl:me", SHANGHAI))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn valkey_serves_one_world_to_two_replicas() {
    let Some(server) = redis::valkey_standalone().await else {
        return;
    };
    let url = server.url();
    two_replicas_serve_one_world(&["--store", "redis", "--redis-url", &url], "v:", SHANGHAI).await;
}

/// Opens an app on `flags` (no server), for start-up failures.
async fn open(flags: &[&str]) -> Result<App, ServeError> {
    let cfg = config(flags);
    App::open(cfg.settings().unwrap(), Arc::new(ManualClock::new(T0))).await
}

#[tokio::test]
async fn stores_that_cannot_serve_are_refused_at_start() {
    // Nothing listens: a clear error, no panic, no hang past the store timeout.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("redis://127.0.0.1:{port}");
    let flags = [
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--store-timeout",
        "300ms",
    ];
    let err = open(&flags).await.unwrap_err();
    assert!(matches!(err, ServeError::Store(_)), "{err}");

    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let flags = ["--store", "redis", "--redis-url", &url];
    // A store holding another schema's data.
    let mut conn = server.connection().await;
    let _: () = ::redis::cmd("HSET")
        .arg("gm1:meta")
        .arg("schema")
        .arg("gm0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = open(&flags).await.unwrap_err().to_string();
    assert!(err.contains("schema"), "{err}");
    // A standalone server named as a Cluster seed.
    let nodes = server.addr();
    let flags = [
        "--store",
        "redis-cluster",
        "--redis-nodes",
        &nodes,
        "--store-timeout",
        "500ms",
    ];
    let err = open(&flags).await.unwrap_err();
    assert!(matches!(err, ServeError::Store(_)), "{err}");
}

#[tokio::test]
async fn health_is_not_serving_and_calls_unavailable_while_the_store_is_down() {
    let Some(mut server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let gm = start_store(&[
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--store-timeout",
        "300ms",
    ])
    .await;
    let mut c = gm.nearby().await;
    c.update_location(ping("h:a", SHANGHAI)).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(gm.channel().await);
    let mut updates = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "geomatch.v1.Nearby".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let serving = i32::from(tonic_health::pb::health_check_response::ServingStatus::Serving);
    let not_serving = i32::from(tonic_health::pb::health_check_response::ServingStatus::NotServing);
    assert_eq!(updates.message().await.unwrap().unwrap().status, serving);

    let port = server.port();
    server.kill9();
    let err = c.search_nearby(search("h:b", SHANGHAI)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The next status change the probe reports: NOT_SERVING.
    assert_eq!(
        updates.message().await.unwrap().unwrap().status,
        not_serving
    );

    // The server comes back on its port, empty (no persistence): the replica reconnects,
    // loads its functions again and serves by itself.
    let bin = redis::Env::from_process()
        .server(redis::Flavor::Redis)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("gm-restart-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let _again = Restarted(
        std::process::Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert_eq!(updates.message().await.unwrap().unwrap().status, serving);
    c.update_location(ping("h:a", SHANGHAI)).await.unwrap();
    assert_eq!(found(&mut c, search("h:b", SHANGHAI)).await, ["h:a"]);
    gm.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server the test restarted itself; killed when the test ends, even on a panic.
struct Restarted(std::process::Child);

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sets `password` as the `default` user's on the server at `port` (`requirepass`).
async fn require_password(port: u16, password: &str) {
    let mut conn = ::redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(password)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A store that wants a password (`flags` reach it): refused at start without one and with
/// a wrong one, each with an error that says so; with the right one (from
/// `--redis-password-file`) the whole two-replica contract holds, and two shakes through
/// two replicas pair, so every connection a replica makes (calls, the Cluster's masters,
/// subscriptions) authenticates.
async fn a_store_behind_a_password(flags: &[&str], password: &str, prefix: &str) {
    let dir = std::env::temp_dir().join(format!("gm-auth-{}", redis::unique_prefix(prefix)));
    std::fs::create_dir_all(&dir).unwrap();
    let right = dir.join("right");
    std::fs::write(&right, format!("{password}\n")).unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let with = |file: Option<&std::path::Path>| {
        let mut args: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        args.extend(["--store-timeout", "1s"].map(String::from));
        match file {
            Some(file) => {
                args.push("--redis-password-file".into());
                args.push(file.to_str().unwrap().into());
            }
            // A user name alone is refused with the flags (src/config/store.rs): without
            // a password, no user either.
            None => {
                if let Some(at) = args.iter().position(|a| a == "--redis-username") {
                    args.drain(at..at + 2);
                }
            }
        }
        args
    };
    let refused = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        open(&args).await.map(|_| ()).unwrap_err().to_string()
    };
    for file in [None, Some(wrong.as_path())] {
        let err = refused(with(file)).await;
        assert!(
            err.contains("refused to authenticate") && err.contains("--redis-password-file"),
            "{file:?}: {err}"
        );
        assert!(!err.contains("not-the-password"), "{err}");
    }

    let args = with(Some(&right));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    two_replicas_serve_one_world(&args, prefix, SHANGHAI).await;
    let (a, b) = (start_store(&args).await, start_store(&args).await);
    let (ua, ub) = (format!("{prefix}shake-a"), format!("{prefix}shake-b"));
    let mut sa = a.shake().await;
    let mut sb = b.shake().await;
    let (ra, rb) = tokio::join!(
        sa.shake(common::build::shake(&ua, "s1", SHANGHAI)),
        sb.shake(common::build::shake(&ub, "s1", SHANGHAI))
    );
    let (ra, rb) = (ra.unwrap().into_inner(), rb.unwrap().into_inner());
    assert_eq!(
        (ra.partner_user_id.as_str(), rb.partner_user_id.as_str()),
        (ub.as_str(), ua.as_str())
    );
    assert!(!ra.match_id.is_empty());
    assert_eq!(ra.match_id, rb.match_id);
    a.stop().await;
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_redis_server_with_an_acl_user_serves_only_with_its_password() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    // An ACL user with the grant the README gives, and no `default` user.
    let mut conn = server.connection().await;
    for rule in [
        &[
            "SETUSER",
            "geomatch",
            "on",
            ">s3cret-one",
            "+@all",
            "~gm1:*",
            "&gm1:*",
        ][..],
        &["SETUSER", "default", "off"][..],
    ] {
        let _: () = ::redis::cmd("ACL")
            .arg(rule)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let url = server.url();
    a_store_behind_a_password(
        &[
            "--store",
            "redis",
            "--redis-url",
            &url,
            "--redis-username",
            "geomatch",
        ],
        "s3cret-one",
        "pw:",
    )
    .await;

    // A user that may only read: refused at start, saying which grant is missing.
    let _: () = ::redis::cmd("ACL")
        .arg(&["SETUSER", "reader", "on", ">s3cret-r", "+@read", "~gm1:*"][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let file = std::env::temp_dir().join(format!("gm-reader-{}", std::process::id()));
    std::fs::write(&file, "s3cret-r\n").unwrap();
    let flags = [
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--redis-username",
        "reader",
        "--redis-password-file",
        file.to_str().unwrap(),
    ];
    let err = open(&flags).await.map(|_| ()).unwrap_err().to_string();
    let _ = std::fs::remove_file(&file);
    assert!(
        err.contains("lacks a permission") && err.contains("function|load"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_behind_a_password_serves_only_with_it() {
    let Some(cluster) = redis::cluster(3, 0).await else {
        return;
    };
    for port in cluster.ports() {
        require_password(port, "s3cret-two").await;
    }
    let nodes = cluster.seeds().join(",");
    a_store_behind_a_password(
        &["--store", "redis-cluster", "--redis-nodes", &nodes],
        "s3cret-two",
        "cpw:",
    )
    .await;

    // The connections straight to each slot's master authenticate too: a replica's pings
    // go there (its own metrics count them), not through the Cluster client.
    let file = std::env::temp_dir().join(format!("gm-auth-{}", std::process::id()));
    std::fs::write(&file, "s3cret-two\n").unwrap();
    let gm = common::process::spawn(&[
        "--store",
        "redis-cluster",
        "--redis-nodes",
        &nodes,
        "--redis-password-file",
        file.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let _ = std::fs::remove_file(&file);
    let mut c = NearbyClient::new(gm.channel().await);
    let direct = || async {
        let body = common::http_get(gm.metrics.unwrap(), "/metrics").await;
        common::counter(&body, "geomatch_store_calls_total", "route=\"direct\"")
    };
    // Routes are read in the background once connected: rounds of pings until one goes
    // straight to the masters, within 10 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for round in 0.. {
        let before = direct().await;
        for i in 0..20 {
            c.update_location(ping(&format!("cpw:direct{round}.{i}"), SHANGHAI))
                .await
                .unwrap();
        }
        if direct().await - before >= 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ping went straight to a master"
        );
    }
}

/// A full store (`maxmemory` with `noeviction`) refuses new pings, which get UNAVAILABLE,
/// and still serves searches (the shared rate limit runs even then).
#[tokio::test]
async fn a_full_store_refuses_pings_and_still_serves_searches() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let gm = start_store(&[
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--search-burst",
        "10",
    ])
    .await;
    let mut c = gm.nearby().await;
    c.update_location(ping("full:a", SHANGHAI)).await.unwrap();
    let mut conn = server.connection().await;
    let info: String = ::redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used / 2)
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = c
        .update_location(ping("full:b", SHANGHAI))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let seen = found(&mut c, search("full:me", SHANGHAI)).await;
    assert_eq!(seen, vec!["full:a".to_owned()]);
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    gm.stop().await;
}

/// Away from the other tests' users on the shared cluster.
const BULK_AT: (f64, f64) = (40.4, 117.1);

/// Bulk ingest over a Cluster: a stream through one replica is applied item by item (a
/// bad item is reported, the rest stored) and found through another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_ingest_through_one_replica_is_found_through_another() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes];
    let (a, b) = (start_store(&flags).await, start_store(&flags).await);
    let p = redis::unique_prefix("bulk");
    let mut items: Vec<pb::UpdateLocationRequest> = (0..40)
        .map(|i| {
            ping(
                &format!("{p}{i:02}"),
                common::fixtures::moved(BULK_AT, i as f64 * 15.0, 0.0),
            )
        })
        .collect();
    items[7].position = None;
    items[23].user_id = String::new();
    let summary = a
        .nearby()
        .await
        .update_locations(tokio_stream::iter(items))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.accepted, summary.rejected), (38, 2));
    let fields: Vec<(u64, &str)> = summary
        .rejections
        .iter()
        .map(|r| (r.index, r.field.as_str()))
        .collect();
    assert_eq!(fields, vec![(7, "position"), (23, "user_id")]);
    let mut cb = b.nearby().await;
    let seen = found(
        &mut cb,
        search(&format!("{p}me"), BULK_AT)
            .radius(2_000.0)
            .limit(100),
    )
    .await;
    let mut want: Vec<String> = (0..40)
        .filter(|i| *i != 7 && *i != 23)
        .map(|i| format!("{p}{i:02}"))
        .collect();
    want.sort();
    // Other tests share the cluster (and Beijing): only this test's users count.
    let mut seen: Vec<String> = seen.into_iter().filter(|u| u.starts_with(&p)).collect();
    seen.sort();
    assert_eq!(seen, want);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_bulk_stream_over_a_store_applies_each_users_pings_in_stream_order() {
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    // No travel check: the stream's pings share one clock reading.
    let gm = start_store(&[
        "--store",
        "redis-cluster",
        "--redis-nodes",
        &nodes,
        "--max-speed",
        "0",
    ])
    .await;
    let p = redis::unique_prefix("order");
    // 20 users pinged 20 times each, interleaved, every ping 400 m on from the last (a new
    // privacy cell each time, all at one clock reading: only the order tells them apart);
    // every ninth item is bad, more than the summary reports in detail.
    let mut items = Vec::new();
    let mut last = std::collections::HashMap::new();
    let mut bad = Vec::new();
    for i in 0..400u64 {
        let user = format!("{p}{:02}", i % 20);
        let at = common::fixtures::moved(BULK_AT, (i / 20) as f64 * 400.0, (i % 20) as f64 * 400.0);
        let mut item = ping(&user, at);
        if i % 9 == 4 {
            item.position = None;
            bad.push(i);
        } else {
            last.insert(user, at);
        }
        items.push(item);
    }
    let mut c = gm.nearby().await;
    let summary = c
        .update_locations(tokio_stream::iter(items))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.rejected, bad.len() as u64);
    assert_eq!(summary.accepted, 400 - bad.len() as u64);
    let reported: Vec<u64> = summary.rejections.iter().map(|r| r.index).collect();
    assert_eq!(
        reported,
        bad[..16],
        "the first 16 rejections, in stream order"
    );
    assert!(summary.rejections.iter().all(|r| r.field == "position"));
    for (user, at) in &last {
        let held = held(&mut c, user).await;
        assert_eq!(
            held.cell,
            privacy_cell(*at).to_string(),
            "{user} is where its last ping in the stream put it"
        );
    }
    gm.stop().await;
}

#[tokio::test]
async fn a_users_record_answers_a_retried_call_as_the_first_run_did() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    // Starting a replica loads the functions library.
    let url = server.url();
    let gm = start_store(&["--store", "redis", "--redis-url", &url]).await;
    let con = server.connection().await;
    let key = format!("gm1:u:{{{}}}", redis::unique_prefix("rerun"));
    let record_for = |cell: &str, seen_ms: i64, ttl_ms: i64| {
        ::redis::cmd("FCALL")
            .arg("gm_user")
            .arg(1)
            .arg(&key)
            .arg(cell)
            .arg(seen_ms)
            .arg(ttl_ms)
            .clone()
    };
    let record = |cell: &str, seen_ms: i64| record_for(cell, seen_ms, 60_000);
    let ttl_ms = || {
        let (key, con) = (key.clone(), con.clone());
        async move {
            ::redis::cmd("PTTL")
                .arg(&key)
                .query_async::<i64>(&mut con.clone())
                .await
                .unwrap()
        }
    };
    let forget = ::redis::cmd("FCALL")
        .arg("gm_forget")
        .arg(1)
        .arg(&key)
        .clone();
    let run = |cmd: &::redis::Cmd| {
        let (cmd, mut con) = (cmd.clone(), con.clone());
        async move { cmd.query_async::<Option<String>>(&mut con).await.unwrap() }
    };
    // Each call twice, as a retry after a lost reply sends it: the same answer both times.
    for _ in 0..2 {
        assert_eq!(
            run(&record("a", 10)).await.as_deref(),
            Some(""),
            "first ping"
        );
    }
    for _ in 0..2 {
        assert_eq!(run(&record("b", 20)).await.as_deref(), Some("a"), "a move");
    }
    for _ in 0..2 {
        assert_eq!(run(&record("c", 15)).await, None, "an older ping loses");
    }
    // Another ping of the same cell and millisecond asking a longer life: the record
    // lives as long as the later asks.
    assert_eq!(
        run(&record_for("b", 20, 600_000)).await.as_deref(),
        Some("a")
    );
    assert!(ttl_ms().await > 60_000, "the longer life holds");
    for _ in 0..2 {
        assert_eq!(
            run(&forget).await.as_deref(),
            Some("b"),
            "the forgotten cell"
        );
    }
    let held: Option<String> = ::redis::cmd("HGET")
        .arg(&key)
        .arg("c")
        .query_async(&mut server.connection().await)
        .await
        .unwrap();
    assert_eq!(held, None, "no current cell after a clear");
    let mut kept: Vec<String> = ::redis::cmd("HKEYS")
        .arg(&key)
        .query_async(&mut server.connection().await)
        .await
        .unwrap();
    kept.sort();
    assert_eq!(
        kept,
        ["f", "p", "t"],
        "only the forgotten cell, the one before and the time"
    );
    assert!(
        (1..=10_000).contains(&ttl_ms().await),
        "and only for a retried clear"
    );
    // A ping after the clear is recorded afresh.
    assert_eq!(run(&record("d", 30)).await.as_deref(), Some(""));
    gm.stop().await;
}

/// The ping's one-call step and its mark answer a retried call (a lost reply) as the first
/// run did, and a mark is only ever set on the ping it was made for.
#[tokio::test]
async fn a_pings_first_step_and_its_mark_answer_a_retried_call_as_the_first_run_did() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    // Starting a replica loads the functions library.
    let gm = start_store(&["--store", "redis", "--redis-url", &url]).await;
    let mut con = server.connection().await;
    let tag = redis::unique_prefix("mark");
    let bucket = format!("{{{tag}}}:b");
    let epoch_ms = geomatch::store::redis::RECORD_EPOCH.as_millis() as i64;
    let fields = |seen: i64, ttl_ms: u32| {
        let mut f = seen.to_le_bytes()[..6].to_vec();
        f.extend_from_slice(&ttl_ms.to_le_bytes());
        f.push(1);
        f
    };
    let put = |seen: i64, ttl_ms: u32| {
        ::redis::cmd("FCALL")
            .arg("gm_ping")
            .arg(3)
            .arg(&bucket)
            .arg(format!("{{{tag}}}:o"))
            .arg(format!("{{{tag}}}:x"))
            .arg("someone")
            .arg(fields(seen, ttl_ms))
            .arg("coarse")
            .arg("cell")
            .arg(seen + i64::from(ttl_ms))
            .arg("")
            .arg("")
            .arg(epoch_ms)
            .clone()
    };
    let mark = |seen: i64| {
        ::redis::cmd("FCALL")
            .arg("gm_mark")
            .arg(1)
            .arg(&bucket)
            .arg("someone")
            .arg(seen)
            .arg(epoch_ms)
            .clone()
    };
    let mut run = async |cmd: ::redis::Cmd| cmd.query_async::<i64>(&mut con).await.unwrap();
    let t = T0;
    for _ in 0..2 {
        assert_eq!(run(put(t, 60_000)).await, 1, "a first ping: record it");
    }
    assert_eq!(run(mark(t - 1)).await, 0, "not the ping in the cell");
    for _ in 0..2 {
        assert_eq!(run(mark(t)).await, 1, "marked");
    }
    for _ in 0..2 {
        assert_eq!(run(put(t + 5, 60_000)).await, 2, "the record stands");
    }
    assert_eq!(run(put(t + 4, 60_000)).await, 0, "an older ping is refused");
    assert_eq!(run(put(t + 6, 60_001)).await, 1, "a longer life: record it");
    let stored: Vec<u8> = ::redis::cmd("GET")
        .arg(&bucket)
        .query_async(&mut server.connection().await)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1 + "someone".len() + 11, "one member");
    assert_eq!(stored[stored.len() - 1], 1, "unmarked, flags kept");
    gm.stop().await;
}

/// A move whose last step never ran leaves a marked copy in the old cell; pings there
/// then skip the record, which names the new cell. The user's next move takes that copy
/// out too, so no copy outlives the record that could reach it.
#[tokio::test]
async fn a_copy_a_failed_move_left_and_later_pings_kept_fresh_goes_with_the_next_move() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let a = start_store(&["--store", "redis", "--redis-url", &url, "--max-speed", "0"]).await;
    let mut c = a.nearby().await;
    let p = redis::unique_prefix("fresh-orphan");
    let user = format!("{p}u");
    let here = SHANGHAI;
    let there = moved(SHANGHAI, 3_000.0, 0.0);
    let elsewhere = moved(SHANGHAI, 0.0, 6_000.0);
    c.update_location(ping(&user, here)).await.unwrap();
    let moved_away: Option<String> = ::redis::cmd("FCALL")
        .arg("gm_user")
        .arg(1)
        .arg(format!("gm1:u:{{{user}}}"))
        .arg(privacy_cell(there).to_string())
        .arg(T0 + 1_000)
        .arg(600_000)
        .query_async(&mut server.connection().await)
        .await
        .unwrap();
    assert_eq!(moved_away, Some(privacy_cell(here).to_string()));
    a.clock.advance_ms(2_000);
    let before = ping_calls(&a);
    c.update_location(ping(&user, here)).await.unwrap();
    assert_eq!(
        ping_calls(&a).0,
        before.0 + 1,
        "the copy's mark still stands"
    );
    a.clock.advance_ms(1_000);
    c.update_location(ping(&user, elsewhere)).await.unwrap();
    let searcher = format!("{p}searcher");
    assert!(
        !found(&mut c, search(&searcher, here).limit(100))
            .await
            .contains(&user),
        "the copy went with the move"
    );
    assert_eq!(
        held(&mut c, &user).await.cell,
        privacy_cell(elsewhere).to_string()
    );
    assert!(cleared(&mut c, &user).await);
    for at in [here, there, elsewhere] {
        assert!(
            !found(&mut c, search(&searcher, at).limit(100))
                .await
                .contains(&user)
        );
    }
    a.stop().await;
}

/// A replica of an earlier build that starts on the same store loads its own functions
/// library over this one's; this build's pings then load theirs again and go on.
#[tokio::test]
async fn pings_go_on_after_an_earlier_builds_library_replaced_this_ones() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let a = start_store(&["--store", "redis", "--redis-url", &url, "--max-speed", "0"]).await;
    let mut c = a.nearby().await;
    let user = format!("{}u", redis::unique_prefix("relib"));
    c.update_location(ping(&user, SHANGHAI)).await.unwrap();
    // Without gm_ping and gm_mark, as an earlier build's library is.
    let _: () = ::redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg("geomatch_v1")
        .query_async(&mut server.connection().await)
        .await
        .unwrap();
    let there = moved(SHANGHAI, 3_000.0, 0.0);
    c.update_location(ping(&user, there)).await.unwrap();
    assert_eq!(
        held(&mut c, &user).await.cell,
        privacy_cell(there).to_string()
    );
    a.stop().await;
}

#[tokio::test]
async fn a_clear_also_takes_the_user_out_of_a_cell_a_failed_move_left_them_in() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let gm = start_store(&["--store", "redis", "--redis-url", &url, "--max-speed", "0"]).await;
    let mut c = gm.nearby().await;
    let p = redis::unique_prefix("orphan");
    let user = format!("{p}u");
    let here = SHANGHAI;
    let there = common::fixtures::moved(SHANGHAI, 3_000.0, 0.0);
    c.update_location(ping(&user, here)).await.unwrap();
    // A move whose last step never ran (its replica died): the record names the new cell,
    // and the old cell still holds the user.
    let moved_away: Option<String> = ::redis::cmd("FCALL")
        .arg("gm_user")
        .arg(1)
        .arg(format!("gm1:u:{{{user}}}"))
        .arg(privacy_cell(there).to_string())
        .arg(T0 + 1_000)
        .arg(60_000)
        .query_async(&mut server.connection().await)
        .await
        .unwrap();
    assert_eq!(moved_away, Some(privacy_cell(here).to_string()));
    let searcher = format!("{p}searcher");
    assert!(found(&mut c, search(&searcher, here)).await.contains(&user));

    c.clear_location(clear(&user)).await.unwrap();
    assert!(
        !found(&mut c, search(&searcher, here)).await.contains(&user),
        "a cleared user is found nowhere"
    );
    assert!(!held(&mut c, &user).await.found);
    gm.stop().await;
}
