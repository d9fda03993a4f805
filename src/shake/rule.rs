//! The pairing rule, pure: who may pair with whom, and whom a newcomer prefers.

use crate::id::UserId;

/// What the rule needs to know about one shake.
#[derive(Debug, Clone, Copy)]
pub struct Shaker<'a> {
    /// Who shook.
    pub user: &'a UserId,
    /// Farthest partner this shake accepts, metres.
    pub max_distance_m: f64,
    /// Users this shake must never pair with.
    pub excludes: &'a [UserId],
}

impl Shaker<'_> {
    /// The same shake in the ANYWHERE tier: any distance.
    pub fn anywhere(self) -> Self {
        Self {
            max_distance_m: f64::INFINITY,
            ..self
        }
    }
}

/// Whether two shakes `distance_m` apart (snapped to snapped) may pair: different users,
/// within both sides' maximum distance, and excluded by neither side.
pub fn compatible(a: &Shaker<'_>, b: &Shaker<'_>, distance_m: f64) -> bool {
    a.user != b.user
        && distance_m <= a.max_distance_m
        && distance_m <= b.max_distance_m
        && !a.excludes.contains(b.user)
        && !b.excludes.contains(a.user)
}

/// Preference key among compatible waiters: nearest first (distance key, see
/// [`crate::geo::distance_key`]), then the one that has waited longest (lowest arrival
/// sequence). Lower is preferred.
pub fn preference(distance_key: u64, arrival_seq: u64) -> (u64, u64) {
    (distance_key, arrival_seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> UserId {
        UserId::new("user_id", s).unwrap()
    }

    #[test]
    fn exhaustive_small_cases() {
        let users = [id("a"), id("b")];
        let dists = [0.0, 500.0, 1_000.0, 1_000.1, 5_000.0];
        let maxes = [0.0, 1_000.0, 50_000.0];
        for ua in 0..2 {
            for ub in 0..2 {
                for &d in &dists {
                    for &ma in &maxes {
                        for &mb in &maxes {
                            for ea in [false, true] {
                                for eb in [false, true] {
                                    let ex_a: Vec<UserId> =
                                        if ea { vec![users[ub].clone()] } else { vec![] };
                                    let ex_b: Vec<UserId> =
                                        if eb { vec![users[ua].clone()] } else { vec![] };
                                    let a = Shaker {
                                        user: &users[ua],
                                        max_distance_m: ma,
                                        excludes: &ex_a,
                                    };
                                    let b = Shaker {
                                        user: &users[ub],
                                        max_distance_m: mb,
                                        excludes: &ex_b,
                                    };
                                    let want = ua != ub && d <= ma && d <= mb && !ea && !eb;
                                    assert_eq!(
                                        compatible(&a, &b, d),
                                        want,
                                        "{ua} {ub} {d} {ma} {mb} {ea} {eb}"
                                    );
                                    // Symmetric.
                                    assert_eq!(compatible(&a, &b, d), compatible(&b, &a, d));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn nearest_then_longest_waiting() {
        assert!(preference(100, 9) < preference(101, 1));
        assert!(preference(100, 1) < preference(100, 2));
    }
}
