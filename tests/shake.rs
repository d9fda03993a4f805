//! Shake over real gRPC: pairing, NO_MATCH, cancellation, idempotency, exclusion, errors,
//! and the pairing invariants with hundreds of simultaneous callers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{
    bad_field,
    build::{latlng, shake},
    fixtures::{SHANGHAI, north_of},
    start,
};
use geomatch::grpc::pb::{self, shake_response::Outcome};
use tokio::sync::Barrier;

#[tokio::test]
async fn two_shakes_pair_and_retries_return_the_same_answer() {
    let server = start(&["--shake-window", "30s"]).await;
    let first = server.waiting_shake(shake("alice", "s1", SHANGHAI)).await;
    let mut b = server.shake().await;
    let second = b
        .shake(shake("bob", "s2", north_of(SHANGHAI, 250.0)))
        .await
        .unwrap()
        .into_inner();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.outcome(), Outcome::Matched);
    assert_eq!(second.outcome(), Outcome::Matched);
    assert_eq!(first.partner_user_id, "bob");
    assert_eq!(second.partner_user_id, "alice");
    assert_eq!(first.match_id, second.match_id);
    assert_eq!(first.tier(), pb::shake_response::Tier::Nearby);
    assert!(!first.match_id.is_empty());
    assert_eq!(first.distance_m, second.distance_m);
    // A retry of the same shake_id returns the same outcome at once.
    let retry = b
        .shake(shake("bob", "s2", north_of(SHANGHAI, 250.0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry, second);
    server.stop().await;
}

#[tokio::test]
async fn fallback_shakes_far_apart_pair_in_the_anywhere_tier() {
    use pb::shake_request::Fallback;
    use pb::shake_response::Tier;
    let server = start(&["--shake-window", "600ms"]).await;
    let anywhere = |user: &str, at| pb::ShakeRequest {
        fallback: Fallback::Anywhere.into(),
        ..shake(user, "s", at)
    };
    let first = server.waiting_shake(anywhere("alice", SHANGHAI)).await;
    // 1 200 km north: far beyond any max_distance_m.
    let mut b = server.shake().await;
    let second = b
        .shake(anywhere("bob", north_of(SHANGHAI, 1_200_000.0)))
        .await
        .unwrap()
        .into_inner();
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        (first.outcome(), second.outcome()),
        (Outcome::Matched, Outcome::Matched)
    );
    assert_eq!(
        (first.tier(), second.tier()),
        (Tier::Anywhere, Tier::Anywhere)
    );
    assert_eq!(first.match_id, second.match_id);
    assert_eq!(first.partner_user_id, "bob");
    assert!(first.distance_m >= 1_100_000, "{}", first.distance_m);
    server.stop().await;
}

#[tokio::test]
async fn a_lone_shake_gets_no_match_after_the_window() {
    let server = start(&["--shake-window", "150ms"]).await;
    let mut c = server.shake().await;
    let r = c
        .shake(shake("alice", "s1", SHANGHAI))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), Outcome::NoMatch);
    assert!(r.partner_user_id.is_empty() && r.match_id.is_empty());
    assert_eq!(server.app.matcher.waiting(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_caller_whose_deadline_passes_is_withdrawn_and_never_paired() {
    let server = start(&["--shake-window", "30s"]).await;
    let mut c = server.shake().await;
    let mut req = tonic::Request::new(shake("ghost", "s1", SHANGHAI));
    req.set_timeout(Duration::from_millis(100));
    let err = c.shake(req).await.unwrap_err();
    // The server answers DEADLINE_EXCEEDED (grpcurl and grpcio show it); tonic's own client
    // enforces the same deadline locally and reports CANCELLED, whichever comes first.
    let gave_up = |code| matches!(code, tonic::Code::DeadlineExceeded | tonic::Code::Cancelled);
    assert!(gave_up(err.code()), "{err:?}");
    // The server withdraws it when the deadline passes, long before the 30 s window.
    tokio::time::timeout(Duration::from_secs(10), server.app.matcher.until_waiting(0))
        .await
        .expect("withdrawn at the caller's deadline");
    let mut req = tonic::Request::new(shake("bob", "s2", SHANGHAI));
    req.set_timeout(Duration::from_millis(200));
    let err = c.shake(req).await.unwrap_err();
    assert!(
        gave_up(err.code()),
        "bob must not pair with the ghost: {err:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_cancelled_call_is_withdrawn_at_once() {
    let server = start(&["--shake-window", "30s"]).await;
    let call = server.waiting_shake(shake("ghost", "s1", SHANGHAI)).await;
    // Dropping the client's call resets the HTTP/2 stream; the server withdraws the shake.
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    tokio::time::timeout(Duration::from_secs(10), server.app.matcher.until_waiting(0))
        .await
        .expect("withdrawn when the client went away");
    // A retry of the cancelled shake starts afresh rather than replaying an outcome.
    let retry = server.waiting_shake(shake("ghost", "s1", SHANGHAI)).await;
    let mut b = server.shake().await;
    let bob = b
        .shake(shake("bob", "s2", SHANGHAI))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bob.partner_user_id, "ghost");
    assert_eq!(retry.await.unwrap().unwrap().match_id, bob.match_id);
    server.stop().await;
}

#[tokio::test]
async fn exclusions_hold_both_ways() {
    let server = start(&["--shake-window", "300ms"]).await;
    let blocked = pb::ShakeRequest {
        exclude_user_ids: vec!["bob".into()],
        ..shake("alice", "s1", SHANGHAI)
    };
    let first = server.waiting_shake(blocked).await;
    let mut b = server.shake().await;
    let second = b
        .shake(shake("bob", "s2", SHANGHAI))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.outcome(), Outcome::NoMatch);
    assert_eq!(first.await.unwrap().unwrap().outcome(), Outcome::NoMatch);
    server.stop().await;
}

#[tokio::test]
async fn bad_shakes_name_their_field() {
    let server = start(&[]).await;
    let mut c = server.shake().await;
    let ok = shake("alice", "s1", SHANGHAI);
    let cases = [
        (
            pb::ShakeRequest {
                user_id: String::new(),
                ..ok.clone()
            },
            "user_id",
        ),
        (
            pb::ShakeRequest {
                fallback: 7,
                ..ok.clone()
            },
            "fallback",
        ),
        (
            pb::ShakeRequest {
                shake_id: String::new(),
                ..ok.clone()
            },
            "shake_id",
        ),
        (
            pb::ShakeRequest {
                shake_id: "s".repeat(129),
                ..ok.clone()
            },
            "shake_id",
        ),
        (
            pb::ShakeRequest {
                position: None,
                ..ok.clone()
            },
            "position",
        ),
        (
            pb::ShakeRequest {
                position: latlng(0.0, -180.5),
                ..ok.clone()
            },
            "position.lng",
        ),
        (
            pb::ShakeRequest {
                max_distance_m: -1.0,
                ..ok.clone()
            },
            "max_distance_m",
        ),
        (
            pb::ShakeRequest {
                max_distance_m: 50_001.0,
                ..ok.clone()
            },
            "max_distance_m",
        ),
        (
            pb::ShakeRequest {
                max_distance_m: f64::NAN,
                ..ok.clone()
            },
            "max_distance_m",
        ),
        (
            pb::ShakeRequest {
                exclude_user_ids: vec![String::new()],
                ..ok.clone()
            },
            "exclude_user_ids",
        ),
        (
            pb::ShakeRequest {
                exclude_user_ids: vec!["x".into(); 1_001],
                ..ok.clone()
            },
            "exclude_user_ids",
        ),
    ];
    for (req, field) in cases {
        let err = c.shake(req.clone()).await.unwrap_err();
        assert_eq!(bad_field(&err), field, "{:?}", req.shake_id);
    }
    assert_eq!(server.app.matcher.waiting(), 0);
    assert_eq!(server.app.matcher.remembered(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_simultaneous_shakes_pair_exactly_once() {
    let server = start(&["--shake-window", "30s"]).await;
    let n = 400;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(server.shake().await);
    }
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let at = north_of(SHANGHAI, (i % 37) as f64 * 5.0);
                barrier.wait().await;
                let r = c.shake(shake(&format!("u{i}"), "s", at)).await;
                (format!("u{i}"), r.unwrap().into_inner())
            })
        })
        .collect();
    let mut by_user = HashMap::new();
    for h in handles {
        let (user, r) = h.await.unwrap();
        by_user.insert(user, r);
    }
    // Everyone is within reach of everyone and the count is even: all pair, none waits.
    let mut by_match: HashMap<String, Vec<String>> = HashMap::new();
    for (user, r) in &by_user {
        assert_eq!(r.outcome(), Outcome::Matched, "{user} left over");
        assert_ne!(&r.partner_user_id, user);
        assert_eq!(
            by_user[&r.partner_user_id].partner_user_id, *user,
            "asymmetric pair"
        );
        assert_eq!(by_user[&r.partner_user_id].match_id, r.match_id);
        by_match
            .entry(r.match_id.clone())
            .or_default()
            .push(user.clone());
    }
    assert_eq!(by_match.len(), n / 2);
    assert!(by_match.values().all(|v| v.len() == 2));
    server.stop().await;
}

/// Match ids say nothing about the server: consecutive pairings share no prefix and
/// follow no order, so a client cannot read the shake volume or rate off its own ids.
#[tokio::test]
async fn match_ids_are_random_not_counted() {
    let server = start(&["--shake-window", "30s"]).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let first = server
            .waiting_shake(shake(&format!("mi:a{i}"), "s", SHANGHAI))
            .await;
        let mut b = server.shake().await;
        let second = b
            .shake(shake(&format!("mi:b{i}"), "s", SHANGHAI))
            .await
            .unwrap()
            .into_inner();
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.match_id, second.match_id);
        ids.push(u128::from_str_radix(&second.match_id, 16).unwrap());
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    let prefixes: std::collections::HashSet<_> = ids.iter().map(|id| id >> 64).collect();
    assert_eq!(prefixes.len(), ids.len(), "no shared prefix");
    let rising = ids.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        (3..=16).contains(&rising),
        "no order: {rising} of 19 steps rise"
    );
    let steps: std::collections::HashSet<_> =
        ids.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    assert!(steps.len() > 15, "no fixed stride");
    server.stop().await;
}
