//! When a replica over a remote store reports NOT_SERVING, from its probes of the store.
//!
//! A store that refuses (no connection, a Cluster missing slots, an error answer) is gone
//! for now: the replica reports NOT_SERVING at the first such probe. A probe that gets no
//! answer within the store timeout says less: a replica or a store too busy to answer one
//! PING in time is still serving nearly every call, and a load balancer that drops it
//! for that moves its load onto the others, which are as busy. So only
//! [`TIMEOUTS_BEFORE_NOT_SERVING`] probes in a row without an answer turn it NOT_SERVING
//! (a store gone silent, as behind a network partition, is noticed within that many
//! probe intervals; its calls get UNAVAILABLE meanwhile, never a wrong answer). One
//! answer turns it SERVING again.

use crate::store::redis::Probe;

/// Probes in a row that get no answer in time before the replica reports NOT_SERVING.
pub(super) const TIMEOUTS_BEFORE_NOT_SERVING: u32 = 3;

/// Whether the replica serves, from the probes so far (see the module docs).
#[derive(Debug)]
pub(super) struct StoreHealth {
    serving: bool,
    /// Probes in a row without an answer in time.
    timeouts: u32,
}

impl StoreHealth {
    /// Serving: a replica starts only once its store answered.
    pub(super) fn new() -> Self {
        Self {
            serving: true,
            timeouts: 0,
        }
    }

    /// Whether the replica serves now.
    pub(super) fn serving(&self) -> bool {
        self.serving
    }

    /// Takes one probe's outcome (a store that answered but could not be prepared again
    /// is [`Probe::Failed`]); answers whether the replica serves now.
    pub(super) fn observe(&mut self, probe: Probe) -> bool {
        match probe {
            Probe::Answered => {
                self.timeouts = 0;
                self.serving = true;
            }
            Probe::Failed => {
                self.timeouts = 0;
                self.serving = false;
            }
            Probe::TimedOut => {
                self.timeouts = self.timeouts.saturating_add(1);
                if self.timeouts >= TIMEOUTS_BEFORE_NOT_SERVING {
                    self.serving = false;
                }
            }
        }
        self.serving
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(probes: &[Probe]) -> Vec<bool> {
        let mut health = StoreHealth::new();
        probes.iter().map(|&p| health.observe(p)).collect()
    }

    #[test]
    fn a_refusal_turns_it_not_serving_at_once_and_an_answer_back() {
        use Probe::*;
        assert_eq!(
            after(&[Answered, Failed, Failed, Answered]),
            [true, false, false, true]
        );
    }

    #[test]
    fn timeouts_turn_it_not_serving_only_when_they_come_in_a_row() {
        use Probe::*;
        let n = TIMEOUTS_BEFORE_NOT_SERVING as usize;
        let mut probes = vec![TimedOut; n - 1];
        probes.push(Answered);
        probes.extend(vec![TimedOut; n]);
        let mut want = vec![true; n - 1];
        want.push(true);
        want.extend(vec![true; n - 1]);
        want.push(false);
        assert_eq!(after(&probes), want);
    }

    #[test]
    fn not_serving_stays_so_through_timeouts_and_ends_at_an_answer() {
        use Probe::*;
        let mut health = StoreHealth::new();
        assert!(!health.observe(Failed));
        assert!(!health.observe(TimedOut));
        assert!(!health.serving());
        assert!(health.observe(Answered));
        // The count starts again after an answer: one timeout is not enough.
        assert!(health.observe(TimedOut));
    }

    #[test]
    fn a_refusal_after_timeouts_counts_at_once_and_resets_the_count() {
        use Probe::*;
        assert_eq!(
            after(&[TimedOut, Failed, Answered, TimedOut]),
            [true, false, true, true]
        );
    }
}
