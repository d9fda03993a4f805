//! Shake over a Redis / Valkey store, through real gRPC and real servers the tests start
//! themselves: shakes sent to different replicas pair exactly once and symmetrically with
//! one match id, across the border of two hash tags; retries through another replica get
//! the recorded outcome; exclusions, supersede, cancel and the ANYWHERE tier hold across
//! replicas; a concurrent crowd over three replicas keeps every invariant; and a replica
//! killed with `kill -9` mid-shake leaves its partner a consistent answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use common::{
    TestServer,
    build::shake,
    fixtures::{BEIJING, SHANGHAI, moved, north_of},
    process, redis, start_store,
};
use geomatch::grpc::pb::{self, shake_client::ShakeClient, shake_response};
use h3o::{LatLng, Resolution};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::{Code, transport::Channel};

/// Two points ~200 m apart whose shake buckets (resolution 7) have different resolution-5
/// parents: their shakes live in two hash tags, so pairing them crosses slots.
fn across_a_tag_border() -> ((f64, f64), (f64, f64)) {
    // Tests run at once over one cluster: each gets its own stretch of the map, so no
    // test's shakes pair with another's.
    static LANE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let lane = LANE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    across_a_tag_border_from(north_of(SHANGHAI, f64::from(lane) * 30_000.0))
}

/// As [`across_a_tag_border`], walking east from `start`.
fn across_a_tag_border_from(start: (f64, f64)) -> ((f64, f64), (f64, f64)) {
    // As the server files them: the bucket of the privacy cell's centre.
    let tag = |p: (f64, f64)| {
        let p = common::fixtures::cell_centre(p);
        LatLng::new(p.0, p.1)
            .unwrap()
            .to_cell(Resolution::Seven)
            .parent(Resolution::Five)
            .unwrap()
    };
    let mut a = start;
    for _ in 0..2_000 {
        let b = moved(a, 200.0, 0.0);
        if tag(a) != tag(b) {
            return (a, b);
        }
        a = b;
    }
    panic!("no tag border within 400 km east of {start:?}");
}

type Call = tokio::task::JoinHandle<Result<pb::ShakeResponse, tonic::Status>>;

fn send(mut c: ShakeClient<Channel>, req: pb::ShakeRequest) -> Call {
    tokio::spawn(async move { c.shake(req).await.map(tonic::Response::into_inner) })
}

fn matched(r: &pb::ShakeResponse) -> bool {
    r.outcome == shake_response::Outcome::Matched as i32
}

/// Both sides matched each other, with one match id and one distance.
fn assert_pair(a: &pb::ShakeResponse, b: &pb::ShakeResponse, ua: &str, ub: &str) {
    assert!(matched(a) && matched(b), "{a:?} {b:?}");
    assert_eq!(
        (a.partner_user_id.as_str(), b.partner_user_id.as_str()),
        (ub, ua)
    );
    assert_eq!(a.match_id, b.match_id);
    assert_eq!(a.match_id.len(), 32);
    assert_eq!(a.distance_m, b.distance_m);
    assert_eq!(a.tier, b.tier);
}

async fn cluster_flags() -> Option<(redis::SharedCluster, Vec<String>)> {
    let cluster = redis::shared_cluster().await?;
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes]
        .map(String::from)
        .to_vec();
    Some((cluster, flags))
}

async fn replicas(flags: &[String], extra: &[&str], n: usize) -> Vec<TestServer> {
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(start_store(&args).await);
    }
    out
}

/// Two users about to shake on either side of a tag border, and replicas over the shared
/// cluster to shake through.
struct Border {
    _cluster: redis::SharedCluster,
    rs: Vec<TestServer>,
    pa: (f64, f64),
    pb: (f64, f64),
    ua: String,
    ub: String,
}

/// [`Border`] with `n` replicas started with `extra` flags, users named under `label`;
/// `None` (the test skips) without a cluster.
async fn border(label: &str, extra: &[&str], n: usize) -> Option<Border> {
    let (cluster, flags) = cluster_flags().await?;
    let p = redis::unique_prefix(label);
    let (pa, pb) = across_a_tag_border();
    Some(Border {
        rs: replicas(&flags, extra, n).await,
        _cluster: cluster,
        pa,
        pb,
        ua: format!("{p}a"),
        ub: format!("{p}b"),
    })
}

/// Two shakes at a tag border, one through each replica, sent together: one pairing, seen
/// alike from both sides; a retry of either id through the other replica returns it.
async fn pair_across_replicas(flags: &[String], prefix: &str) {
    let rs = replicas(flags, &[], 2).await;
    let (pa, pb) = across_a_tag_border();
    let (ua, ub) = (format!("{prefix}a"), format!("{prefix}b"));
    let a = send(rs[0].shake().await, shake(&ua, "s1", pa));
    let b = send(rs[1].shake().await, shake(&ub, "s1", pb));
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert_pair(&a, &b, &ua, &ub);
    assert_eq!(a.tier, shake_response::Tier::Nearby as i32);

    let again_a = rs[1]
        .shake()
        .await
        .shake(shake(&ua, "s1", pa))
        .await
        .unwrap();
    let again_b = rs[0]
        .shake()
        .await
        .shake(shake(&ub, "s1", pb))
        .await
        .unwrap();
    assert_eq!(again_a.into_inner(), a);
    assert_eq!(again_b.into_inner(), b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shakes_through_two_replicas_of_a_cluster_pair_once() {
    let Some((_cluster, flags)) = cluster_flags().await else {
        return;
    };
    pair_across_replicas(&flags, &redis::unique_prefix("shc")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shakes_through_two_replicas_of_one_server_pair_once() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    let flags = ["--store", "redis", "--redis-url", &server.url()]
        .map(String::from)
        .to_vec();
    // Ids may hold braces and key separators: keys never parse them back.
    pair_across_replicas(&flags, "shs:{b}}:s:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shakes_through_two_replicas_of_a_valkey_cluster_pair_once() {
    let Some(cluster) = redis::valkey_cluster(3, 0).await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let flags = ["--store", "redis-cluster", "--redis-nodes", &nodes]
        .map(String::from)
        .to_vec();
    pair_across_replicas(&flags, "shv:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusions_hold_across_replicas() {
    let Some(Border {
        rs, pa, pb, ua, ub, ..
    }) = border("shx", &["--shake-window", "600ms"], 2).await
    else {
        return;
    };
    let mut req = shake(&ua, "s1", pa);
    req.exclude_user_ids = vec![ub.clone()];
    let a = send(rs[0].shake().await, req);
    let b = send(rs[1].shake().await, shake(&ub, "s1", pb));
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert!(!matched(&a) && !matched(&b), "{a:?} {b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_shake_id_through_another_replica_supersedes_the_waiting_one() {
    let Some(Border {
        rs, pa, pb, ua, ub, ..
    }) = border("shp", &["--shake-window", "30s"], 2).await
    else {
        return;
    };
    let first = rs[0].waiting_shake(shake(&ua, "s1", pa)).await;
    let second = send(rs[1].shake().await, shake(&ua, "s2", pa));
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the superseded shake was not woken")
        .unwrap()
        .unwrap();
    assert!(!matched(&first), "{first:?}");
    // The new shake is the one a partner finds.
    rs[1].app.shakes.until_waiting(1).await;
    let b = rs[0]
        .shake()
        .await
        .shake(shake(&ub, "s1", pb))
        .await
        .unwrap();
    let second = second.await.unwrap().unwrap();
    assert_pair(&second, &b.into_inner(), &ua, &ub);
    // A retry of the superseded id still says NO_MATCH.
    let again = rs[1]
        .shake()
        .await
        .shake(shake(&ua, "s1", pa))
        .await
        .unwrap();
    assert!(!matched(&again.into_inner()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_shake_is_never_matched_through_another_replica() {
    let Some(Border {
        rs, pa, pb, ua, ub, ..
    }) = border("shk", &["--shake-window", "30s"], 2).await
    else {
        return;
    };
    let mut req = tonic::Request::new(shake(&ua, "s1", pa));
    req.set_timeout(Duration::from_millis(300));
    let err = rs[0].shake().await.shake(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // The cancelled shake was withdrawn before the call ended: B waits alone.
    let mut req = tonic::Request::new(shake(&ub, "s1", pb));
    req.set_timeout(Duration::from_millis(1_500));
    let err = rs[1].shake().await.shake(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anywhere_pairs_far_shakes_through_two_replicas() {
    let Some((_cluster, flags)) = cluster_flags().await else {
        return;
    };
    let p = redis::unique_prefix("sha");
    let rs = replicas(&flags, &["--shake-window", "1s"], 2).await;
    let (ua, ub) = (format!("{p}a"), format!("{p}b"));
    let anywhere = |u: &str, at| pb::ShakeRequest {
        fallback: pb::shake_request::Fallback::Anywhere.into(),
        ..shake(u, "s1", at)
    };
    let a = send(rs[0].shake().await, anywhere(&ua, SHANGHAI));
    let b = send(rs[1].shake().await, anywhere(&ub, BEIJING));
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert_pair(&a, &b, &ua, &ub);
    assert_eq!(a.tier, shake_response::Tier::Anywhere as i32);
    assert!(a.distance_m > 1_000_000, "{a:?}");
}

/// A crowd shakes at once around a tag border through three replicas, some excluding
/// others, some giving up early: every match id names exactly two shakes that name each
/// other, nobody is paired twice or with someone they excluded, and no shake whose caller
/// got DEADLINE_EXCEEDED is anyone's partner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_crowd_over_three_replicas_pairs_exactly_once() {
    let Some((_cluster, flags)) = cluster_flags().await else {
        return;
    };
    let p = redis::unique_prefix("shcrowd");
    let rs = replicas(&flags, &["--shake-window", "1s"], 3).await;
    let (border, _) = across_a_tag_border();
    let mut rng = StdRng::seed_from_u64(7);
    let users: Vec<String> = (0..60).map(|i| format!("{p}{i:02}")).collect();
    let mut excluded: HashSet<(String, String)> = HashSet::new();
    let mut calls = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let at = moved(
            border,
            rng.random_range(-600.0..600.0),
            rng.random_range(-600.0..600.0),
        );
        let mut req = shake(u, "s1", at);
        if rng.random_bool(0.2) {
            let other = users[rng.random_range(0..users.len())].clone();
            excluded.insert((u.clone(), other.clone()));
            excluded.insert((other.clone(), u.clone()));
            req.exclude_user_ids = vec![other];
        }
        let mut req = tonic::Request::new(req);
        if rng.random_bool(0.2) {
            req.set_timeout(Duration::from_millis(rng.random_range(30..400)));
        }
        let mut c = rs[i % 3].shake().await;
        calls.push(tokio::spawn(async move {
            c.shake(req).await.map(|r| r.into_inner())
        }));
    }
    let mut partner: HashMap<String, String> = HashMap::new();
    let mut ids: HashMap<String, Vec<String>> = HashMap::new();
    let mut cancelled: HashSet<String> = HashSet::new();
    let mut unknown: HashSet<String> = HashSet::new();
    for (u, call) in users.iter().zip(calls) {
        match call.await.unwrap() {
            Ok(r) if matched(&r) => {
                partner.insert(u.clone(), r.partner_user_id.clone());
                ids.entry(r.match_id.clone()).or_default().push(u.clone());
            }
            Ok(_) => {}
            Err(s) if s.code() == Code::DeadlineExceeded => {
                cancelled.insert(u.clone());
            }
            // The client's own timer fired before the server's answer arrived (a loaded
            // machine): the caller cannot know the outcome, so it is checked no further.
            Err(s) if s.code() == Code::Cancelled => {
                unknown.insert(u.clone());
            }
            Err(s) => panic!("{u}: {s:?}"),
        }
    }
    assert!(
        !partner.is_empty(),
        "a crowd within a few hundred metres pairs"
    );
    for (id, who) in &ids {
        assert!(who.len() <= 2, "match id {id} names {who:?}");
        let seen_by_both = who
            .iter()
            .all(|u| !unknown.contains(partner.get(u).unwrap()));
        if seen_by_both {
            assert_eq!(who.len(), 2, "match id {id} names {who:?}");
        }
    }
    for (u, v) in &partner {
        if unknown.contains(v) {
            continue;
        }
        assert_eq!(partner.get(v), Some(u), "{u} -> {v} is not symmetric");
        assert!(
            !excluded.contains(&(u.clone(), v.clone())),
            "{u} and {v} excluded"
        );
        assert!(!cancelled.contains(v), "{u} was paired with cancelled {v}");
    }
}

/// A geomatch process killed with `kill -9` while its shake waits: a partner through
/// another replica gets a consistent answer, and the killed shake's retry through that
/// replica returns the same pairing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_shake_leaves_a_consistent_outcome() {
    let Some((cluster, flags)) = cluster_flags().await else {
        return;
    };
    let p = redis::unique_prefix("sh9");
    let (pa, pb) = across_a_tag_border();
    let (ua, ub) = (format!("{p}a"), format!("{p}b"));
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["--shake-window", "20s"]);
    let mut child = process::spawn(&args).await;
    let channel = child.channel().await;
    let lost = send(ShakeClient::new(channel), shake(&ua, "s1", pa));
    // Its shake waits in the store once it is listed in its bucket's waiting index.
    let bucket = common::fixtures::cell_centre(pa);
    let bucket = LatLng::new(bucket.0, bucket.1)
        .unwrap()
        .to_cell(Resolution::Seven);
    let index = format!(
        "gm1:{{{}}}:sw:{bucket}",
        bucket.parent(Resolution::Five).unwrap()
    );
    let mut conn = cluster.connection().await;
    loop {
        let listed: Vec<String> = ::redis::cmd("ZRANGE")
            .arg(&index)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        if listed.iter().any(|l| l.ends_with(&ua)) {
            break;
        }
        tokio::task::yield_now().await;
    }
    child.child.start_kill().unwrap();
    child.child.wait().await.unwrap();
    assert!(
        lost.await.unwrap().is_err(),
        "the killed replica's call is lost"
    );

    let rs = replicas(&flags, &["--shake-window", "20s"], 1).await;
    let b = rs[0]
        .shake()
        .await
        .shake(shake(&ub, "s1", pb))
        .await
        .unwrap();
    let b = b.into_inner();
    let a = rs[0]
        .shake()
        .await
        .shake(shake(&ua, "s1", pa))
        .await
        .unwrap();
    assert_pair(&a.into_inner(), &b, &ua, &ub);
}

/// A retry of a waiting shake through another replica joins it: when a partner comes,
/// both calls return the one pairing (the joined replica is woken, not left to its window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_through_another_replica_joins_the_waiting_shake() {
    let Some(Border {
        rs, pa, pb, ua, ub, ..
    }) = border("shj", &["--shake-window", "30s"], 2).await
    else {
        return;
    };
    let first = rs[0].waiting_shake(shake(&ua, "s1", pa)).await;
    let retry = rs[1].waiting_shake(shake(&ua, "s1", pa)).await;
    let b = rs[1]
        .shake()
        .await
        .shake(shake(&ub, "s1", pb))
        .await
        .unwrap();
    let b = b.into_inner();
    for call in [first, retry] {
        let a = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("a waiting call was not woken")
            .unwrap()
            .unwrap();
        assert_pair(&a, &b, &ua, &ub);
    }
}

/// The Shake rate limit is one token bucket per user in the store: a burst spent through
/// one replica is spent for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shake_rate_limit_holds_across_replicas() {
    let Some((_cluster, flags)) = cluster_flags().await else {
        return;
    };
    let p = redis::unique_prefix("shr");
    let limits = [
        "--shake-burst",
        "2",
        "--shake-per-minute",
        "60",
        "--shake-window",
        "50ms",
    ];
    let rs = replicas(&flags, &limits, 2).await;
    let me = format!("{p}me");
    for (i, r) in rs.iter().enumerate() {
        r.shake()
            .await
            .shake(shake(&me, &format!("s{i}"), SHANGHAI))
            .await
            .unwrap();
    }
    let err = rs[0]
        .shake()
        .await
        .shake(shake(&me, "s9", SHANGHAI))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Another user has a bucket of their own; a second later a token is back.
    rs[1]
        .shake()
        .await
        .shake(shake(&format!("{p}other"), "s1", SHANGHAI))
        .await
        .unwrap();
    for r in &rs {
        r.clock.advance_ms(1_000);
    }
    rs[1]
        .shake()
        .await
        .shake(shake(&me, "s9", SHANGHAI))
        .await
        .unwrap();
}

#[tokio::test]
async fn shake_steps_answer_a_retried_call_as_the_first_run_did() {
    let Some(server) = redis::standalone().await else {
        return;
    };
    // Starting a replica loads the functions library.
    let url = server.url();
    let gm = start_store(&["--store", "redis", "--redis-url", &url]).await;
    let con = server.connection().await;
    let p = redis::unique_prefix("rerun");
    let ptr = format!("gm1:sh:{{{p}}}:p");
    let prefix = format!("gm1:sh:{{{p}}}:s:");
    let state = format!("{prefix}k1");
    let (now, deadline, keep) = (1_000_i64, 61_000_i64, 600_000_i64);
    let run = |cmd: ::redis::Cmd| {
        let mut con = con.clone();
        async move { cmd.query_async::<Vec<String>>(&mut con).await.unwrap() }
    };
    let fcall = |name: &str, keys: &[&str], args: &[String]| {
        let mut cmd = ::redis::cmd("FCALL");
        cmd.arg(name).arg(keys.len()).arg(keys).arg(args);
        cmd
    };
    let enter_with = |call: Option<&str>| {
        let mut args = vec![
            "k1".into(),
            now.to_string(),
            deadline.to_string(),
            format!("gm1:{{{p}}}:sw:x"),
            "listing".into(),
            String::new(),
            "replica".into(),
            keep.to_string(),
            prefix.clone(),
        ];
        args.extend(call.map(str::to_owned));
        fcall("gm_sh_enter", &[&ptr, &state], &args)
    };
    let enter = |call: &str| enter_with(Some(call));
    let leave = |call: &str| fcall("gm_sh_leave", &[&ptr, &state], &["k1".into(), call.into()]);
    let callers = || {
        let (mut con, state) = (con.clone(), state.clone());
        async move {
            ::redis::cmd("HGET")
                .arg(&state)
                .arg("n")
                .query_async::<Option<i64>>(&mut con)
                .await
                .unwrap()
        }
    };

    // Each step twice, as a retry after a lost reply sends it: the same answer both times,
    // and one caller counted.
    for _ in 0..2 {
        assert_eq!(run(enter("c1")).await, ["new"], "the starting call");
    }
    assert_eq!(callers().await, Some(1));
    for _ in 0..2 {
        assert_eq!(run(enter("c2")).await, ["join"], "another caller of the id");
    }
    assert_eq!(callers().await, Some(2));
    let reserve = fcall(
        "gm_sh_reserve",
        &[&state],
        &[
            "partner".into(),
            "partner-state".into(),
            "mid".into(),
            "1".into(),
            "0".into(),
            (now + 1_000).to_string(),
            now.to_string(),
        ],
    );
    for _ in 0..2 {
        assert_eq!(run(reserve.clone()).await, ["ok"], "its own reservation");
    }
    let other = fcall(
        "gm_sh_reserve",
        &[&state],
        &[
            "someone-else".into(),
            "their-state".into(),
            "mid2".into(),
            "1".into(),
            "0".into(),
            (now + 1_000).to_string(),
            now.to_string(),
        ],
    );
    assert_eq!(run(other).await, ["busy"], "another reservation waits");
    assert_eq!(run(fcall("gm_sh_revert", &[&state], &[])).await, ["ok"]);
    for _ in 0..2 {
        assert_eq!(run(leave("c2")).await, ["left"]);
    }
    assert_eq!(callers().await, Some(1), "one leave counted");
    // A caller that entered through an older library, which kept no names: its leave is
    // counted as before.
    assert_eq!(run(enter_with(None)).await, ["join"]);
    assert_eq!(callers().await, Some(2));
    assert_eq!(run(leave("entered-unnamed")).await, ["left"]);
    assert_eq!(callers().await, Some(1), "counted as before");
    let withdrawn = run(leave("c1")).await;
    assert_eq!(withdrawn[0], "withdrawn", "the last caller withdraws it");
    assert_eq!(run(leave("c1")).await, ["left"]);
    assert_eq!(callers().await, None, "the shake is forgotten");
    gm.stop().await;
}
