//! Real faults under load over a Redis Cluster: `kill -9` of the master holding the
//! pinged area, with pings, searches and shakes through two geomatch replicas. Calls in
//! between fail only with UNAVAILABLE, service comes back by itself once the replica has
//! taken over, what was acknowledged well before the kill is still there, and no shake is
//! paired twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    build::{ping, search, shake, status},
    fixtures::{SHANGHAI, moved, privacy_cell},
    process, redis, start_store,
};
use geomatch::store;
use h3o::{LatLng, Resolution};
use tokio::sync::Mutex;
use tonic::Code;

/// When a call ended, and how.
type Outcome = (Instant, Result<(), Code>);

/// How long a failover may take before service is back.
const BACK_WITHIN: Duration = Duration::from_secs(10);

/// The tests here count the process's store calls by route: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Pings through `c` until a round of them goes straight to the slots' masters (fewer
/// than half the round's calls through the Cluster client: the rest are the replicas'
/// own background calls), within [`BACK_WITHIN`]; returns the rounds it took.
async fn until_calls_go_direct(
    c: &mut geomatch::grpc::pb::nearby_client::NearbyClient<tonic::transport::Channel>,
    label: &str,
) -> usize {
    const PINGS: u64 = 20;
    let deadline = Instant::now() + BACK_WITHIN;
    let mut round = 0usize;
    loop {
        let (direct_before, through_before) = store::redis::routed_calls();
        for i in 0..PINGS {
            c.update_location(ping(&format!("{label}{round}.{i}"), SHANGHAI))
                .await
                .unwrap();
        }
        let (direct, through) = store::redis::routed_calls();
        if through - through_before < PINGS / 2 && direct - direct_before >= PINGS {
            return round;
        }
        assert!(
            Instant::now() < deadline,
            "pings still go through the Cluster client: {} of the last round's calls",
            through - through_before
        );
        round += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_master_under_load_costs_only_unavailable_and_heals_itself() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = redis::shared_cluster_exclusive().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = [
        "--store",
        "redis-cluster",
        "--redis-nodes",
        &nodes,
        "--store-timeout",
        "300ms",
    ];
    let gm = start_store(&flags).await;
    let other = start_store(&flags).await;
    let mut c = gm.nearby().await;

    // Acknowledged pings, all in one area (one hash tag, so one master holds them).
    let users: Vec<String> = (0..200).map(|i| format!("f:{i:04}")).collect();
    for (i, u) in users.iter().enumerate() {
        let at = moved(SHANGHAI, (i % 20) as f64 * 20.0, (i / 20) as f64 * 20.0);
        c.update_location(ping(u, at)).await.unwrap();
    }
    let cell = privacy_cell(SHANGHAI);
    let tag = LatLng::from(cell)
        .to_cell(Resolution::Seven)
        .parent(Resolution::Five)
        .unwrap();
    let master = cluster.master_for_key(&format!("{{{tag}}}")).await;

    // Load: pings and searches in that area, each outcome recorded with its time.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let load = {
        let (stop, done, outcomes, mut c) =
            (stop.clone(), done.clone(), outcomes.clone(), c.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let r = if i.is_multiple_of(2) {
                    c.update_location(ping(&format!("f:load{}", i % 50), SHANGHAI))
                        .await
                        .map(drop)
                } else {
                    c.search_nearby(search("f:searcher", SHANGHAI))
                        .await
                        .map(drop)
                };
                outcomes
                    .lock()
                    .await
                    .push((Instant::now(), r.map_err(|s| s.code())));
                done.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    // Shakes meanwhile: four loops, each sending pairs of shakes at one spot, one side
    // through each replica (the loops' shakes may pair across loops too).
    type Shook = (String, Result<(String, String), Code>);
    let shook: Arc<Mutex<Vec<Shook>>> = Arc::default();
    let mut shakers = Vec::new();
    for l in 0..4 {
        let (stop, shook) = (stop.clone(), shook.clone());
        let (mut sa, mut sb) = (gm.shake().await, other.shake().await);
        shakers.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let (ua, ub) = (format!("f:s{l}a{}", n % 5), format!("f:s{l}b{}", n % 5));
                let id = format!("k{n}");
                let (ra, rb) = tokio::join!(
                    sa.shake(shake(&ua, &id, SHANGHAI)),
                    sb.shake(shake(&ub, &id, SHANGHAI))
                );
                let mut shook = shook.lock().await;
                for (u, r) in [(ua, ra), (ub, rb)] {
                    let r = r
                        .map(|r| {
                            let r = r.into_inner();
                            (r.partner_user_id, r.match_id)
                        })
                        .map_err(|s| s.code());
                    shook.push((format!("{u}/{id}"), r));
                }
                n += 1;
            }
        }));
    }
    // Let replication carry the acknowledged pings: a few hundred calls go by first.
    while done.load(Ordering::SeqCst) < 300 {
        tokio::task::yield_now().await;
    }

    let killed = Instant::now();
    cluster.kill9(master);
    cluster.wait_ok().await;
    // Run on until 200 calls in a row succeed (or the bound passes).
    let healed = loop {
        let recent = {
            let o = outcomes.lock().await;
            let tail: Vec<_> = o.iter().rev().take_while(|(_, r)| r.is_ok()).collect();
            (tail.len() >= 200).then(|| tail.last().map(|(t, _)| *t))
        };
        if let Some(Some(first_of_run)) = recent {
            break first_of_run;
        }
        assert!(
            killed.elapsed() < BACK_WITHIN + Duration::from_secs(20),
            "service did not come back"
        );
        tokio::task::yield_now().await;
    };
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    for s in shakers {
        s.await.unwrap();
    }

    let outcomes = outcomes.lock().await;
    let errors: Vec<Code> = outcomes.iter().filter_map(|(_, r)| r.err()).collect();
    assert!(
        errors.iter().all(|&e| e == Code::Unavailable),
        "only UNAVAILABLE during the failover, got {errors:?}"
    );
    let back_after = healed.saturating_duration_since(killed);
    eprintln!(
        "failover: {} calls failed (UNAVAILABLE), full service {:?} after the kill",
        errors.len(),
        back_after
    );
    assert!(back_after <= BACK_WITHIN, "back after {back_after:?}");

    // Shakes: only UNAVAILABLE, and every match id names at most two shakes, each other.
    let shook = shook.lock().await;
    let shake_errors: Vec<Code> = shook
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().copied())
        .collect();
    assert!(
        shake_errors.iter().all(|&e| e == Code::Unavailable),
        "only UNAVAILABLE for shakes, got {shake_errors:?}"
    );
    let mut by_id: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for (who, r) in shook.iter() {
        if let Ok((_, id)) = r
            && !id.is_empty()
        {
            by_id.entry(id.as_str()).or_default().push(who.as_str());
        }
    }
    assert!(
        by_id.values().any(|w| w.len() == 2),
        "shakes paired during the run"
    );
    for (id, who) in &by_id {
        assert!(
            who.len() <= 2,
            "match {id} names {who:?}: a shake paired twice"
        );
    }
    // A match seen from one side only is explained by the other side's failed call, never
    // by that side reporting another partner.
    let one_sided = by_id.values().filter(|w| w.len() == 1).count();
    assert!(
        one_sided <= shake_errors.len(),
        "{one_sided} matches seen from one side, only {} failed calls",
        shake_errors.len()
    );
    eprintln!(
        "failover: {} shakes, {} pairs, {} shake calls failed (UNAVAILABLE)",
        shook.len(),
        by_id.len(),
        shake_errors.len()
    );
    drop(shook);

    // Every ping acknowledged before the load began is still held.
    let mut missing = Vec::new();
    for u in &users {
        let st = c.get_location_status(status(u)).await.unwrap().into_inner();
        if !st.found {
            missing.push(u.clone());
        }
    }
    assert!(missing.is_empty(), "lost after the failover: {missing:?}");

    // Calls go straight to their slot's master again by themselves: a ping's member is
    // written in the failed-over slot, and that call no longer needs the Cluster client.
    let rounds = until_calls_go_direct(&mut c, "f:after").await;
    eprintln!("failover: direct routes back after {rounds} rounds of pings");
    drop(outcomes);
    // And both replicas report SERVING, by themselves: the one that carried the load
    // through the failover too (its Cluster client's slot map, read while the dead master
    // still owned its slots, is never read again, so a probe through that client would
    // wait on the dead address for good).
    for replica in [&gm, &other] {
        until_serving(replica.channel().await).await;
    }
    gm.stop().await;
    other.stop().await;
}

/// How many users a 1 km search at Shanghai finds.
async fn found_at_shanghai(
    c: &mut geomatch::grpc::pb::nearby_client::NearbyClient<tonic::transport::Channel>,
) -> usize {
    c.search_nearby(search("m:searcher", SHANGHAI))
        .await
        .unwrap()
        .into_inner()
        .users
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_slot_keeps_every_call_answered_and_calls_follow_it_to_its_new_master() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = redis::cluster(3, 0).await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let gm = start_store(&["--store", "redis-cluster", "--redis-nodes", &nodes]).await;
    let mut c = gm.nearby().await;
    let users: Vec<String> = (0..20).map(|i| format!("m:{i:02}")).collect();
    for (i, u) in users.iter().enumerate() {
        c.update_location(ping(u, moved(SHANGHAI, i as f64 * 30.0, 0.0)))
            .await
            .unwrap();
    }
    let found = |st: geomatch::grpc::pb::GetLocationStatusResponse| st.found;
    let tag = LatLng::from(privacy_cell(SHANGHAI))
        .to_cell(Resolution::Seven)
        .parent(Resolution::Five)
        .unwrap();
    let key = format!("{{{tag}}}");
    let from = cluster.master_for_key(&key).await;
    let to = cluster
        .masters()
        .await
        .into_iter()
        .find(|&p| p != from)
        .unwrap();
    let (mut src, mut dst) = (
        cluster.node_connection(from).await,
        cluster.node_connection(to).await,
    );
    let slot: u16 = ::redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&key)
        .query_async(&mut src)
        .await
        .unwrap();
    let id = |port| {
        let cluster = &cluster;
        async move {
            let mut con = cluster.node_connection(port).await;
            ::redis::cmd("CLUSTER")
                .arg("MYID")
                .query_async::<String>(&mut con)
                .await
                .unwrap()
        }
    };
    let (src_id, dst_id) = (id(from).await, id(to).await);

    // Half-way: the slot is migrating, and its keys are on the new master already. Calls
    // are answered through the Cluster client's ASK redirects.
    let _: () = ::redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("IMPORTING")
        .arg(&src_id)
        .query_async(&mut dst)
        .await
        .unwrap();
    let _: () = ::redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("MIGRATING")
        .arg(&dst_id)
        .query_async(&mut src)
        .await
        .unwrap();
    let keys: Vec<String> = ::redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(slot)
        .arg(100_000)
        .query_async(&mut src)
        .await
        .unwrap();
    assert!(
        !keys.is_empty(),
        "the pinged area's keys are in slot {slot}"
    );
    let _: String = ::redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(to)
        .arg("")
        .arg(0)
        .arg(5_000)
        .arg("KEYS")
        .arg(&keys)
        .query_async(&mut src)
        .await
        .unwrap();
    let (_, through_before) = store::redis::routed_calls();
    for u in &users {
        let st = c.get_location_status(status(u)).await.unwrap().into_inner();
        assert!(found(st), "{u} is found while its slot migrates");
    }
    // A search reads the migrating slot's cells (refused by the old master, ASK) and
    // finds every user there.
    let n = found_at_shanghai(&mut c).await;
    assert!(
        n >= users.len(),
        "a search finds the migrating area's users: {n}"
    );
    c.update_location(ping("m:mid", SHANGHAI)).await.unwrap();
    let (_, through) = store::redis::routed_calls();
    // Each status read the user's cell in the migrating slot: refused by its old master
    // (ASK), answered through the Cluster client.
    assert!(
        through - through_before >= users.len() as u64,
        "calls in the migrating slot went through the Cluster client: {}",
        through - through_before
    );

    // Done: every master knows the slot's new owner. The old one answers MOVED, and
    // calls follow the slot to its new master.
    for port in cluster.masters().await {
        let mut con = cluster.node_connection(port).await;
        let _: () = ::redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("NODE")
            .arg(&dst_id)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    assert_eq!(cluster.master_for_key(&key).await, to);
    let rounds = until_calls_go_direct(&mut c, "m:after").await;
    eprintln!("resharding: direct routes back after {rounds} rounds of pings");
    for u in users.iter().chain([&"m:mid".to_string()]) {
        let st = c.get_location_status(status(u)).await.unwrap().into_inner();
        assert!(found(st), "{u} is found after its slot moved");
    }
    let n = found_at_shanghai(&mut c).await;
    assert!(
        n >= users.len(),
        "a search finds the moved area's users: {n}"
    );
    gm.stop().await;
}

/// Resumes a process stopped with SIGSTOP when dropped, even on a panic.
struct Stopped(u32);

impl Stopped {
    fn stop(pid: u32) -> Self {
        signal(pid, libc::SIGSTOP);
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill only reads its arguments; the pid is a child this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to {pid}");
}

/// A replica's health probe of a Cluster goes straight to the masters it routes to, not
/// through the Cluster client: its calls all go straight, so that client's slot map is
/// never read again after a failover, and a probe through it (a `PING` to every master
/// it knows) would wait on the dead master's address for good, the replica NOT_SERVING
/// although the Cluster serves (seen under load: the map read while the dead master
/// still owned its slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clustered_replicas_probes_go_straight_to_the_masters() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let gm = start_store(&["--store", "redis-cluster", "--redis-nodes", &nodes]).await;
    let mut c = gm.nearby().await;
    let label = redis::unique_prefix("probe");
    until_calls_go_direct(&mut c, &label).await;
    let store::NearbyStore::Redis(remote) = &gm.app.store else {
        panic!("a Cluster store");
    };
    let (_, through_before) = store::redis::routed_calls();
    for _ in 0..3 {
        assert_eq!(remote.probe().await, store::redis::Probe::Answered);
    }
    let (_, through) = store::redis::routed_calls();
    assert_eq!(
        through, through_before,
        "probes went through the Cluster client"
    );
    gm.stop().await;
}

/// Waits until the replica behind `channel` reports its Nearby service SERVING; a
/// NOT_SERVING that lasts more than 30 s fails the test.
async fn until_serving(channel: tonic::transport::Channel) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut updates = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "geomatch.v1.Nearby".into(),
        })
        .await
        .unwrap()
        .into_inner();
    while next_status(&mut updates).await != i32::from(ServingStatus::Serving) {}
}

/// The next health status change on `updates`; waiting longer than 30 s fails the test
/// (the changes it waits for come within seconds).
async fn next_status(updates: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> i32 {
    tokio::time::timeout(Duration::from_secs(30), updates.message())
        .await
        .expect("a health status change within 30 s")
        .unwrap()
        .unwrap()
        .status
}

/// A store that freezes (SIGSTOP: it neither answers nor refuses, as behind a network
/// partition) turns the replica NOT_SERVING only once three probes in a row got no answer
/// in time, not at the first slow one; its calls get UNAVAILABLE meanwhile, and it serves
/// again by itself once the store wakes. (A refusal counts at once: `StoreHealth`'s unit
/// tests; killing the store: `tests/store.rs`.)
#[tokio::test]
async fn a_silent_store_turns_the_replica_not_serving_after_three_probes_in_a_row() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let Some(server) = redis::standalone().await else {
        return;
    };
    let url = server.url();
    let gm = process::spawn(&[
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--store-timeout",
        "300ms",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let metrics = gm.metrics.unwrap();
    let mut c = geomatch::grpc::pb::nearby_client::NearbyClient::new(gm.channel().await);
    c.update_location(ping("silent:a", SHANGHAI)).await.unwrap();
    let mut updates = HealthClient::new(gm.channel().await)
        .watch(HealthCheckRequest {
            service: "geomatch.v1.Nearby".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next_status(&mut updates).await,
        i32::from(ServingStatus::Serving)
    );

    let frozen = Stopped::stop(server.pid().unwrap());
    let err = c
        .search_nearby(search("silent:b", SHANGHAI))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The next status change: NOT_SERVING, and by then three probes in a row have gone
    // unanswered (the store stays frozen until `frozen` is dropped, so no probe has
    // answered since).
    assert_eq!(
        next_status(&mut updates).await,
        i32::from(ServingStatus::NotServing)
    );
    let body = common::http_get(metrics, "/metrics").await;
    let probes = |result: &str| {
        common::counter(
            &body,
            "geomatch_store_probes_total",
            &format!("result=\"{result}\""),
        )
    };
    // Exactly the third (the next probe is a second later; a fourth can only have been
    // counted if this scrape came that late).
    assert!((3..=4).contains(&probes("timed_out")), "{body}");
    assert_eq!(probes("failed"), 0, "{body}");
    assert!(body.contains("geomatch_store_up 0"), "{body}");

    drop(frozen);
    assert_eq!(
        next_status(&mut updates).await,
        i32::from(ServingStatus::Serving)
    );
    assert_eq!(found_at_shanghai(&mut c).await, 1);
}
