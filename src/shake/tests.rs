//! Matcher behaviour: pairing, windows, cancellation, idempotency, and the pairing
//! invariants under real concurrency.

use std::{collections::HashMap, sync::Arc, time::Duration};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::sync::Barrier;

use h3o::Resolution;

use super::*;
use crate::{
    geo::{Coordinates, band_m, distance_m},
    id::ShakeId,
};

impl Matcher {
    /// Validates and runs a shake as received, as the gRPC edge does.
    async fn shake_raw(&self, req: ShakeRequest) -> Result<Outcome> {
        self.shake(self.validate(req)?).await
    }
}

const SHANGHAI: (f64, f64) = (31.2304, 121.4737);
/// Degrees of latitude per metre, near enough for placing test users.
const DEG_PER_M: f64 = 1.0 / 111_195.0;

fn cfg(window: Duration) -> ShakeConfig {
    ShakeConfig {
        window,
        ..ShakeConfig::default()
    }
}

fn at(user: &str, shake_id: &str, north_m: f64) -> ShakeRequest {
    ShakeRequest {
        user: UserId::new("user_id", user).unwrap(),
        position: Coordinates::new("position", SHANGHAI.0 + north_m * DEG_PER_M, SHANGHAI.1)
            .unwrap(),
        shake_id: ShakeId::new("shake_id", shake_id).unwrap(),
        max_distance_m: 0.0,
        exclude: Vec::new(),
        deadline: None,
        fallback: Fallback::None,
    }
}

fn matched(o: &Outcome) -> &Match {
    match o {
        Outcome::Matched(m) => m,
        Outcome::NoMatch => panic!("expected a match, got NO_MATCH"),
    }
}

async fn spawn_waiting(
    m: &Arc<Matcher>,
    req: ShakeRequest,
    now_waiting: usize,
) -> tokio::task::JoinHandle<Outcome> {
    let m2 = m.clone();
    let h = tokio::spawn(async move { m2.shake_raw(req).await.unwrap() });
    m.until_waiting(now_waiting).await;
    h
}

#[tokio::test(start_paused = true)]
async fn two_nearby_shakes_pair_with_one_match_id() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(2))));
    let a = spawn_waiting(&m, at("alice", "s1", 0.0), 1).await;
    let b = m.shake_raw(at("bob", "s2", 300.0)).await.unwrap();
    let a = a.await.unwrap();
    let (ma, mb) = (matched(&a), matched(&b));
    assert_eq!(ma.partner.as_str(), "bob");
    assert_eq!(mb.partner.as_str(), "alice");
    assert_eq!(ma.match_id, mb.match_id);
    assert_eq!(ma.distance_m, mb.distance_m);
    assert!(ma.distance_m <= 1_000, "{}", ma.distance_m);
    assert_eq!(m.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lone_shake_gets_no_match_when_the_window_passes() {
    let m = Matcher::new(cfg(Duration::from_secs(2)));
    let start = Instant::now();
    let o = m.shake_raw(at("alice", "s1", 0.0)).await.unwrap();
    assert_eq!(o, Outcome::NoMatch);
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
    assert_eq!(m.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_shorter_caller_deadline_ends_the_wait_early() {
    let m = Matcher::new(cfg(Duration::from_secs(2)));
    let start = Instant::now();
    let mut req = at("alice", "s1", 0.0);
    req.deadline = Some(start + Duration::from_millis(300));
    assert_eq!(m.shake_raw(req).await, Err(Error::DeadlineExceeded));
    assert_eq!(Instant::now() - start, Duration::from_millis(300));
    assert_eq!(m.waiting(), 0, "withdrawn with the caller");
    assert_eq!(m.remembered(), 0, "a retry starts afresh");
}

#[tokio::test(start_paused = true)]
async fn both_sides_max_distance_must_hold() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(2))));
    let mut near_only = at("alice", "s1", 0.0);
    near_only.max_distance_m = 100.0;
    let a = spawn_waiting(&m, near_only, 1).await;
    // 3 km away: within bob's 5 km but not alice's 100 m.
    let mut far = at("bob", "s2", 3_000.0);
    far.max_distance_m = 5_000.0;
    let b = m.shake_raw(far).await.unwrap();
    assert_eq!(b, Outcome::NoMatch);
    assert_eq!(a.await.unwrap(), Outcome::NoMatch);
}

#[tokio::test(start_paused = true)]
async fn exclusions_are_symmetric() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(2))));
    let mut alice = at("alice", "s1", 0.0);
    alice.exclude = vec![UserId::new("x", "bob").unwrap()];
    let a = spawn_waiting(&m, alice, 1).await;
    // Bob does not exclude alice, but alice excludes bob: bob waits instead of pairing.
    let b = spawn_waiting(&m, at("bob", "s2", 10.0), 2).await;
    // Carol may pair with either; she gets the one that waited longest: alice.
    let c = m.shake_raw(at("carol", "s3", 5.0)).await.unwrap();
    let a = a.await.unwrap();
    assert_eq!(matched(&c).partner.as_str(), "alice");
    assert_eq!(matched(&a).partner.as_str(), "carol");
    assert_eq!(b.await.unwrap(), Outcome::NoMatch);
}

#[tokio::test(start_paused = true)]
async fn nearest_waiter_wins_then_longest_waiting() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(2))));
    // Waiters exclude each other so that all three wait; the newcomers may take any.
    let ex = |names: &[&str]| {
        names
            .iter()
            .map(|n| UserId::new("x", n).unwrap())
            .collect::<Vec<_>>()
    };
    let mut far = at("far", "s1", 800.0);
    far.exclude = ex(&["near", "near-later"]);
    let mut near_later = at("near-later", "s3", 0.0);
    near_later.exclude = ex(&["near"]);
    let far = spawn_waiting(&m, far, 1).await;
    let near = spawn_waiting(&m, at("near", "s2", 0.0), 2).await;
    let near_too = spawn_waiting(&m, near_later, 3).await;
    let got = m.shake_raw(at("newcomer", "s4", 0.0)).await.unwrap();
    assert_eq!(matched(&got).partner.as_str(), "near");
    assert_eq!(matched(&near.await.unwrap()).partner.as_str(), "newcomer");
    // The next newcomer takes the remaining nearest one.
    let got = m.shake_raw(at("second", "s5", 0.0)).await.unwrap();
    assert_eq!(matched(&got).partner.as_str(), "near-later");
    assert_eq!(matched(&near_too.await.unwrap()).partner.as_str(), "second");
    assert_eq!(far.await.unwrap(), Outcome::NoMatch);
}

#[tokio::test(start_paused = true)]
async fn a_user_never_pairs_with_themselves_and_a_new_shake_supersedes() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(2))));
    let first = spawn_waiting(&m, at("alice", "s1", 0.0), 1).await;
    let second = m.clone();
    let second =
        tokio::spawn(async move { second.shake_raw(at("alice", "s2", 0.0)).await.unwrap() });
    // The superseded shake ends with NO_MATCH at once, long before its window.
    let start = Instant::now();
    assert_eq!(first.await.unwrap(), Outcome::NoMatch);
    assert_eq!(Instant::now(), start);
    m.until_waiting(1).await;
    let bob = m.shake_raw(at("bob", "s3", 0.0)).await.unwrap();
    assert_eq!(matched(&bob).partner.as_str(), "alice");
    assert_eq!(
        matched(&second.await.unwrap()).match_id,
        matched(&bob).match_id
    );
}

#[tokio::test(start_paused = true)]
async fn retries_return_the_same_outcome_and_join_a_wait() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(2))));
    let a1 = spawn_waiting(&m, at("alice", "s1", 0.0), 1).await;
    // A retry while waiting joins the same wait rather than queueing a second shake.
    let m2 = m.clone();
    let a2 = tokio::spawn(async move { m2.shake_raw(at("alice", "s1", 0.0)).await.unwrap() });
    tokio::task::yield_now().await;
    assert_eq!(m.waiting(), 1);
    let b = m.shake_raw(at("bob", "s2", 0.0)).await.unwrap();
    let (a1, a2) = (a1.await.unwrap(), a2.await.unwrap());
    assert_eq!(a1, a2);
    assert_eq!(matched(&a1).match_id, matched(&b).match_id);
    // After it ended, retries (from either side) get the same answer for the retry window.
    tokio::time::advance(Duration::from_secs(59)).await;
    m.sweep(Instant::now());
    assert_eq!(m.shake_raw(at("alice", "s1", 0.0)).await.unwrap(), a1);
    assert_eq!(m.shake_raw(at("bob", "s2", 0.0)).await.unwrap(), b);
    // NO_MATCH is remembered too.
    let lone = m.shake_raw(at("carol", "s3", 50_000.0)).await.unwrap();
    assert_eq!(lone, Outcome::NoMatch);
    let before = Instant::now();
    assert_eq!(
        m.shake_raw(at("carol", "s3", 50_000.0)).await.unwrap(),
        Outcome::NoMatch
    );
    assert_eq!(
        Instant::now(),
        before,
        "a remembered outcome returns at once"
    );
    // And is forgotten by the sweep after the retry window.
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(m.sweep(Instant::now()) >= 3);
    assert_eq!(m.remembered(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_shake_is_withdrawn_at_once_and_never_paired() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(2))));
    let ghost = spawn_waiting(&m, at("ghost", "s1", 0.0), 1).await;
    ghost.abort();
    assert!(ghost.await.unwrap_err().is_cancelled());
    assert_eq!(m.waiting(), 0, "withdrawn as soon as the call was dropped");
    assert_eq!(
        m.shake_raw(at("bob", "s2", 0.0)).await.unwrap(),
        Outcome::NoMatch
    );
    // The cancelled shake left no outcome behind: a retry starts afresh.
    let retry = spawn_waiting(&m, at("ghost", "s1", 0.0), 1).await;
    let carol = m.shake_raw(at("carol", "s3", 0.0)).await.unwrap();
    assert_eq!(matched(&carol).partner.as_str(), "ghost");
    assert_eq!(matched(&retry.await.unwrap()).partner.as_str(), "carol");
}

#[tokio::test(start_paused = true)]
async fn bad_distances_and_excludes_are_rejected() {
    let m = Matcher::new(cfg(Duration::from_secs(2)));
    for d in [-1.0, f64::NAN, f64::INFINITY, 50_000.1] {
        let mut r = at("alice", "s1", 0.0);
        r.max_distance_m = d;
        match m.shake_raw(r).await {
            Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "max_distance_m"),
            other => panic!("{d}: {other:?}"),
        }
    }
    let mut r = at("alice", "s1", 0.0);
    r.exclude = (0..1_001)
        .map(|i| UserId::new("x", &format!("u{i}")).unwrap())
        .collect();
    assert!(matches!(
        m.shake_raw(r).await,
        Err(Error::InvalidArgument {
            field: "exclude_user_ids",
            ..
        })
    ));
    assert_eq!(m.waiting(), 0);
    assert_eq!(m.remembered(), 0);
}

/// A fallback shake `north_km` kilometres north of Shanghai.
fn far(user: &str, north_km: f64) -> ShakeRequest {
    ShakeRequest {
        fallback: Fallback::Anywhere,
        ..at(user, "s", north_km * 1_000.0)
    }
}

#[tokio::test(start_paused = true)]
async fn fallback_shakes_far_apart_pair_anywhere_at_half_the_window() {
    let window = Duration::from_secs(2);
    let m = Arc::new(Matcher::new(cfg(window)));
    let start = Instant::now();
    let a = spawn_waiting(&m, far("a", 0.0), 1).await;
    let b = spawn_waiting(&m, far("b", 1_000.0), 2).await;
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(start.elapsed() < window, "paired before the window passed");
    let (ma, mb) = (matched(&a), matched(&b));
    assert_eq!((ma.tier, mb.tier), (Tier::Anywhere, Tier::Anywhere));
    assert_eq!(ma.match_id, mb.match_id);
    assert_eq!(ma.partner.as_str(), "b");
    let d = distance_m(
        snapped(far("a", 0.0).position.cell(Resolution::Nine)),
        snapped(far("b", 1_000.0).position.cell(Resolution::Nine)),
    );
    assert_eq!(ma.distance_m, band_m(d));
    assert!(m.anywhere.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_nearby_partner_comes_first_and_is_reported_as_nearby() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(2))));
    let a = spawn_waiting(&m, far("a", 0.0), 1).await;
    let b = m.shake_raw(at("b", "s", 100.0)).await.unwrap();
    assert_eq!(matched(&b).tier, Tier::Nearby);
    assert_eq!(matched(&a.await.unwrap()).tier, Tier::Nearby);
}

#[tokio::test(start_paused = true)]
async fn fallback_needs_both_sides_and_honours_exclusions() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(2))));
    // One side did not ask for ANYWHERE.
    let a = spawn_waiting(&m, far("a", 0.0), 1).await;
    let b = m.shake_raw(at("b", "s", 900_000.0)).await.unwrap();
    assert_eq!((a.await.unwrap(), b), (Outcome::NoMatch, Outcome::NoMatch));
    // Both asked, but one excludes the other.
    let c = spawn_waiting(&m, far("c", 0.0), 1).await;
    let mut d = far("d", 900.0);
    d.exclude = vec![UserId::new("x", "c").unwrap()];
    let d = m.shake_raw(d).await.unwrap();
    assert_eq!((c.await.unwrap(), d), (Outcome::NoMatch, Outcome::NoMatch));
    assert!(m.anywhere.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_nearest_fallback_shake_wins() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(2))));
    let near = spawn_waiting(&m, far("near", 500.0), 1).await;
    let mut r = far("far", 2_000.0);
    r.exclude = vec![UserId::new("x", "near").unwrap()];
    let far_one = spawn_waiting(&m, r, 2).await;
    tokio::time::advance(Duration::from_millis(100)).await;
    let me = m.shake_raw(far("me", 0.0)).await.unwrap();
    assert_eq!(matched(&me).partner.as_str(), "near");
    assert_eq!(matched(&near.await.unwrap()).partner.as_str(), "me");
    assert_eq!(far_one.await.unwrap(), Outcome::NoMatch);
}

#[test]
fn match_ids_show_as_32_hex_digits() {
    let id = MatchId {
        prefix: 0xdead_beef,
        seq: 42,
    };
    assert_eq!(id.to_string(), "00000000deadbeef000000000000002a");
}

#[test]
fn outcome_keys_tell_apart_ids_that_concatenate_alike() {
    let key = |u: &str, s: &str| {
        Outcomes::key(
            &UserId::new("user_id", u).unwrap(),
            &ShakeId::new("shake_id", s).unwrap(),
        )
    };
    assert_ne!(key("ab", "c"), key("a", "bc"));
    assert_ne!(key("a", "b"), key("b", "a"));
    assert_eq!(key("a", "b"), key("a", "b"));
}

#[path = "stress_tests.rs"]
mod stress;
