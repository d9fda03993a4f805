//! The pairing invariants under real concurrency: hundreds of simultaneous shakes, random
//! schedules with cancels, retries, supersedes and fallback, and a proptest model. Every
//! schedule ends with each shake paired at most once, symmetrically, within reach, and
//! never with a ghost.

use super::*;

/// Checks the pairing invariants over a set of finished shakes: every match_id names
/// exactly two different users who name each other, within both sides' distance, and
/// excluded by neither.
fn check_pairs(reqs: &[ShakeRequest], outcomes: &[Outcome], snap: Resolution) {
    let mut by_match: HashMap<MatchId, Vec<usize>> = HashMap::new();
    for (i, o) in outcomes.iter().enumerate() {
        if let Outcome::Matched(mm) = o {
            by_match.entry(mm.match_id).or_default().push(i);
        }
    }
    for (id, sides) in &by_match {
        assert_eq!(sides.len(), 2, "match {id} has {} sides", sides.len());
        let (a, b) = (sides[0], sides[1]);
        let (ra, rb) = (&reqs[a], &reqs[b]);
        assert_ne!(ra.user, rb.user, "self pair");
        assert_eq!(matched(&outcomes[a]).partner, rb.user);
        assert_eq!(matched(&outcomes[b]).partner, ra.user);
        let d = distance_m(
            snapped(ra.position.cell(snap)),
            snapped(rb.position.cell(snap)),
        );
        let max = |r: &ShakeRequest| {
            if r.max_distance_m == 0.0 {
                1_000.0
            } else {
                r.max_distance_m
            }
        };
        assert_eq!(matched(&outcomes[a]).tier, matched(&outcomes[b]).tier);
        match matched(&outcomes[a]).tier {
            Tier::Nearby => assert!(d <= max(ra) && d <= max(rb), "pair {d} m apart"),
            Tier::Anywhere => assert!(
                ra.fallback == Fallback::Anywhere && rb.fallback == Fallback::Anywhere,
                "ANYWHERE pair without both asking"
            ),
        }
        assert!(!ra.exclude.contains(&rb.user) && !rb.exclude.contains(&ra.user));
        assert_eq!(matched(&outcomes[a]).distance_m, band_m(d));
    }
}

/// Runs every request at once (all released by one barrier) and returns the answers in order.
async fn run_all_raw(m: &Arc<Matcher>, reqs: &[ShakeRequest]) -> Vec<Result<Outcome>> {
    let barrier = Arc::new(Barrier::new(reqs.len()));
    let handles: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| {
            let (m, barrier) = (m.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                m.shake_raw(r).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

async fn run_all(m: &Arc<Matcher>, reqs: &[ShakeRequest]) -> Vec<Outcome> {
    run_all_raw(m, reqs)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_simultaneous_compatible_shakes_all_pair_exactly_once() {
    // Everyone within reach of everyone: with an even count, nobody may be left over,
    // and nobody waits for the (long) window.
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(60))));
    let mut rng = StdRng::seed_from_u64(1);
    let reqs: Vec<_> = (0..600)
        .map(|i| {
            at(
                &format!("u{i}"),
                &format!("s{i}"),
                rng.random_range(0.0..300.0),
            )
        })
        .collect();
    let outcomes = run_all(&m, &reqs).await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Matched(_))),
        "someone was left over"
    );
    check_pairs(&reqs, &outcomes, Resolution::Nine);
    assert_eq!(m.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_concurrent_schedules_keep_the_pairing_invariants() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_millis(300))));
    let mut rng = StdRng::seed_from_u64(2);
    let users: Vec<String> = (0..150).map(|i| format!("u{i}")).collect();
    let reqs: Vec<_> = (0..500)
        .map(|i| {
            // Users repeat (supersede), positions spread over ~6 km, random reach and exclusions.
            let user = &users[rng.random_range(0..users.len())];
            let mut r = at(user, &format!("s{i}"), rng.random_range(0.0..6_000.0));
            r.max_distance_m = [0.0, 200.0, 2_000.0, 50_000.0][rng.random_range(0..4)];
            r.exclude = (0..rng.random_range(0..4))
                .map(|_| UserId::new("x", &users[rng.random_range(0..users.len())]).unwrap())
                .collect();
            r
        })
        .collect();
    let outcomes = run_all(&m, &reqs).await;
    check_pairs(&reqs, &outcomes, Resolution::Nine);
    assert!(outcomes.iter().any(|o| matches!(o, Outcome::Matched(_))));
    assert_eq!(m.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_waiters_racing_claims_never_yield_a_ghost() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_secs(30))));
    for round in 0..20 {
        // Waiters exclude each other, so all 20 wait until newcomers arrive.
        let names: Vec<UserId> = (0..20)
            .map(|i| UserId::new("x", &format!("w{round}-{i}")).unwrap())
            .collect();
        let waiters: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut w = at(name.as_str(), "s", i as f64);
                w.exclude = names.clone();
                w
            })
            .collect();
        let mut handles = Vec::new();
        for w in &waiters {
            let m2 = m.clone();
            let w = w.clone();
            handles.push(tokio::spawn(async move { m2.shake_raw(w).await.unwrap() }));
        }
        m.until_waiting(20).await;
        // Cancel every waiter while 10 newcomers claim concurrently.
        let barrier = Arc::new(Barrier::new(11));
        let newcomers: Vec<_> = (0..10)
            .map(|i| {
                let (m, barrier) = (m.clone(), barrier.clone());
                let r = at(&format!("n{round}-{i}"), "s", 0.0);
                tokio::spawn(async move {
                    barrier.wait().await;
                    let mut r2 = r.clone();
                    r2.deadline = Some(Instant::now() + Duration::from_millis(200));
                    (r, m.shake_raw(r2).await.unwrap_or(Outcome::NoMatch))
                })
            })
            .collect();
        barrier.wait().await;
        for h in &handles {
            h.abort();
        }
        for n in newcomers {
            let (req, outcome) = n.await.unwrap();
            if let Outcome::Matched(mm) = outcome {
                // The claimed waiter must have been paired for real: its own retry returns
                // the same match at once instead of starting a new shake.
                let partner = waiters.iter().find(|w| w.user == mm.partner);
                let partner =
                    partner.map_or_else(|| at(mm.partner.as_str(), "s", 0.0), Clone::clone);
                let retry = m.shake_raw(partner).await.unwrap();
                assert_eq!(
                    matched(&retry).match_id,
                    mm.match_id,
                    "{} paired with a ghost",
                    req.user
                );
                assert_eq!(matched(&retry).partner, req.user);
            }
        }
        m.until_waiting(0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_deadlines_and_supersedes_racing_claims_never_leave_a_one_sided_match() {
    races_never_leave_a_one_sided_match(500.0, Fallback::None, 40).await;
}

/// The same races in the ANYWHERE tier: shakes far apart, caller deadlines around the
/// half-window moment (50 ms) at which they fall back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fallback_claims_racing_cancels_never_leave_a_one_sided_match() {
    races_never_leave_a_one_sided_match(2_000_000.0, Fallback::Anywhere, 100).await;
}

async fn races_never_leave_a_one_sided_match(spread_m: f64, fallback: Fallback, cut_ms: u64) {
    let m = Arc::new(Matcher::new(cfg(Duration::from_millis(100))));
    let mut rng = StdRng::seed_from_u64(3);
    let reqs: Vec<_> = (0..400)
        .map(|_| {
            // Few users and two shake ids each: retries (joins), supersedes and short caller
            // deadlines all race the claims.
            let user = format!("u{}", rng.random_range(0..60));
            let id = ["a", "b"][rng.random_range(0..2)];
            let mut r = at(&user, id, rng.random_range(0.0..spread_m));
            r.fallback = fallback;
            if rng.random_bool(0.4) {
                r.deadline =
                    Some(Instant::now() + Duration::from_millis(rng.random_range(0..cut_ms)));
            }
            r
        })
        .collect();
    let answers = run_all_raw(&m, &reqs).await;
    let mut sides: HashMap<MatchId, HashMap<UserId, UserId>> = HashMap::new();
    for (req, got) in reqs.iter().zip(answers) {
        let user = req.user.clone();
        match got {
            Ok(Outcome::Matched(mm)) => {
                assert_ne!(mm.partner, user, "self pair");
                let seen = sides.entry(mm.match_id).or_default();
                if let Some(prev) = seen.insert(user.clone(), mm.partner.clone()) {
                    assert_eq!(prev, mm.partner, "{user} told two partners for one match");
                }
            }
            Ok(Outcome::NoMatch) | Err(Error::DeadlineExceeded) => {}
            Err(e) => panic!("{e}"),
        }
    }
    m.until_waiting(0).await;
    for (id, seen) in &sides {
        assert!(seen.len() <= 2, "match {id} has {} sides", seen.len());
        for (user, partner) in seen {
            // Whether or not the partner's caller stayed to hear it, the partner's side of
            // the match was recorded: nobody was paired with a ghost.
            let recorded = ["a", "b"].iter().any(|s| {
                matches!(m.done.kept(partner, s), Some(Outcome::Matched(x)) if &x.match_id == id && &x.partner == user)
            });
            assert!(
                recorded,
                "{user} matched {partner} in {id}, but {partner} never was"
            );
        }
    }
    assert!(
        m.anywhere.lock().unwrap().is_empty(),
        "no leaked pool entries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_schedules_with_fallback_keep_the_pairing_invariants() {
    let m = Arc::new(Matcher::new(cfg(Duration::from_millis(300))));
    let mut rng = StdRng::seed_from_u64(21);
    let users: Vec<String> = (0..200).map(|i| format!("u{i}")).collect();
    let reqs: Vec<_> = (0..600)
        .map(|i| {
            let user = &users[rng.random_range(0..users.len())];
            // Half near Shanghai, half scattered over 2 000 km; half ask for ANYWHERE.
            let north = if rng.random_bool(0.5) {
                rng.random_range(0.0..3_000.0)
            } else {
                rng.random_range(0.0..2_000_000.0)
            };
            let mut r = at(user, &format!("s{i}"), north);
            r.max_distance_m = [0.0, 200.0, 2_000.0][rng.random_range(0..3)];
            if rng.random_bool(0.5) {
                r.fallback = Fallback::Anywhere;
            }
            r.exclude = (0..rng.random_range(0..3))
                .map(|_| UserId::new("x", &users[rng.random_range(0..users.len())]).unwrap())
                .collect();
            r
        })
        .collect();
    let outcomes = run_all(&m, &reqs).await;
    check_pairs(&reqs, &outcomes, Resolution::Nine);
    let anywhere = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Matched(mm) if mm.tier == Tier::Anywhere))
        .count();
    assert!(anywhere > 0, "some pairs were made in the ANYWHERE tier");
    assert_eq!(m.waiting(), 0);
    assert!(
        m.anywhere.lock().unwrap().is_empty(),
        "no leaked pool entries"
    );
}

mod model {
    //! Property test: random concurrent schedules (users repeating, random reach,
    //! exclusions, fallback, and caller deadlines that cancel waiters while newcomers
    //! claim them) always keep the pairing invariants.

    use proptest::{collection::vec, prelude::*};

    use super::*;

    #[derive(Debug, Clone)]
    struct Spec {
        user: u8,
        north_m: u32,
        reach: usize,
        anywhere: bool,
        exclude: Vec<u8>,
        deadline_ms: Option<u64>,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            0u8..24,
            0u32..4_000,
            0usize..3,
            any::<bool>(),
            vec(0u8..24, 0..3),
            proptest::option::weighted(0.3, 0u64..120),
        )
            .prop_map(
                |(user, north_m, reach, anywhere, exclude, deadline_ms)| Spec {
                    user,
                    north_m,
                    reach,
                    anywhere,
                    exclude,
                    deadline_ms,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

        #[test]
        fn random_schedules_keep_the_pairing_invariants(specs in vec(spec(), 2..60)) {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async {
                let m = Arc::new(Matcher::new(cfg(Duration::from_millis(100))));
                let reqs: Vec<ShakeRequest> = specs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let mut r = at(&format!("u{}", s.user), &format!("s{i}"), f64::from(s.north_m));
                        r.max_distance_m = [0.0, 300.0, 5_000.0][s.reach];
                        if s.anywhere {
                            r.fallback = Fallback::Anywhere;
                        }
                        r.exclude = s
                            .exclude
                            .iter()
                            .map(|x| UserId::new("x", &format!("u{x}")).unwrap())
                            .collect();
                        r.deadline = s
                            .deadline_ms
                            .map(|ms| Instant::now() + Duration::from_millis(ms));
                        r
                    })
                    .collect();
                let answers = run_all_raw(&m, &reqs).await;
                m.until_waiting(0).await;
                let mut sides: HashMap<MatchId, Vec<usize>> = HashMap::new();
                for (i, a) in answers.iter().enumerate() {
                    match a {
                        Ok(Outcome::Matched(mm)) => sides.entry(mm.match_id).or_default().push(i),
                        Ok(Outcome::NoMatch) | Err(Error::DeadlineExceeded) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                for (id, who) in &sides {
                    // Every match has at most two callers who heard it, of two different users.
                    assert!(who.len() <= 2, "match {id} told to {} callers", who.len());
                    let a = &reqs[who[0]];
                    let ma = matched(answers[who[0]].as_ref().unwrap());
                    assert_ne!(ma.partner, a.user, "self pair");
                    assert!(!a.exclude.contains(&ma.partner), "excluded partner");
                    // The partner's side was recorded, naming this user back, whether or not
                    // its caller stayed: no ghost pairs, symmetric.
                    let back = reqs.iter().filter(|r| r.user == ma.partner).any(|r| {
                        matches!(m.done.kept(&r.user, r.shake_id.as_str()), Some(Outcome::Matched(x)) if &x.match_id == id && x.partner == a.user && x.tier == ma.tier)
                    });
                    assert!(back, "{} matched {} in {id}, one-sided", a.user, ma.partner);
                    if who.len() == 2 {
                        let b = &reqs[who[1]];
                        assert_eq!(ma.partner, b.user);
                        assert!(!b.exclude.contains(&a.user), "excluded partner");
                        let d = distance_m(
                            snapped(a.position.cell(Resolution::Nine)),
                            snapped(b.position.cell(Resolution::Nine)),
                        );
                        match ma.tier {
                            Tier::Nearby => {
                                let max = |r: &ShakeRequest| if r.max_distance_m == 0.0 { 1_000.0 } else { r.max_distance_m };
                                assert!(d <= max(a) && d <= max(b), "nearby pair {d} m apart");
                            }
                            Tier::Anywhere => assert!(
                                a.fallback == Fallback::Anywhere && b.fallback == Fallback::Anywhere
                            ),
                        }
                    }
                }
                assert!(m.anywhere.lock().unwrap().is_empty(), "no leaked pool entries");
            });
        }
    }
}
