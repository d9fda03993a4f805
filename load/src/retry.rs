//! Loading the population through load shedding: a call the target refused for now (gRPC
//! RESOURCE_EXHAUSTED or UNAVAILABLE; a busy or timed-out Redis / Valkey) is retried after
//! an exponential backoff, and the load gives up only once one item has kept failing for
//! [`GIVE_UP`].

use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::anyhow;

/// The first wait after a failure.
pub(crate) const FIRST: Duration = Duration::from_millis(1);
/// The longest wait between two tries (the waits double up to it).
pub(crate) const MAX: Duration = Duration::from_millis(200);
/// How long one item may keep failing before the load gives up.
pub(crate) const GIVE_UP: Duration = Duration::from_secs(10);

/// One worker's backoff: waits from `first`, doubling up to `max`, while its current item
/// keeps failing; it gives up once that item has failed for `give_up` without a success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    /// The first wait after a success.
    first: Duration,
    /// The longest wait.
    max: Duration,
    /// How long an item may keep failing.
    give_up: Duration,
    /// The next wait.
    next: Duration,
    /// When the current item first failed (none: its last try succeeded).
    failing_since: Option<Instant>,
    /// Tries of the current item that failed.
    failures: u64,
}

impl Backoff {
    /// A backoff from `first` doubling to `max`, giving up after `give_up` of failures.
    pub(crate) fn new(first: Duration, max: Duration, give_up: Duration) -> Self {
        Self {
            first,
            max,
            give_up,
            next: first,
            failing_since: None,
            failures: 0,
        }
    }

    /// The population loaders' backoff: [`FIRST`], [`MAX`], [`GIVE_UP`].
    pub(crate) fn standard() -> Self {
        Self::new(FIRST, MAX, GIVE_UP)
    }

    /// A try failed at `now`: how long to wait before the next one, or `None` once the item
    /// has been failing for `give_up` (since its first failure).
    pub(crate) fn failed(&mut self, now: Instant) -> Option<Duration> {
        let since = *self.failing_since.get_or_insert(now);
        self.failures += 1;
        if now.saturating_duration_since(since) >= self.give_up {
            return None;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(wait)
    }

    /// A try succeeded: the next item starts again from `first`.
    pub(crate) fn succeeded(&mut self) {
        self.next = self.first;
        self.failing_since = None;
        self.failures = 0;
    }
}

/// Runs `op` until it succeeds. A failure `transient` accepts is retried after the
/// backoff's wait (each retry counted in `retries`); any other failure, or a transient one
/// that lasted the backoff's `give_up`, is returned as an error that says so.
pub(crate) async fn retry<T, E, F, Fut>(
    backoff: &mut Backoff,
    retries: &AtomicU64,
    transient: impl Fn(&E) -> bool,
    mut op: F,
) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        match op().await {
            Ok(v) => {
                backoff.succeeded();
                return Ok(v);
            }
            Err(e) if transient(&e) => match backoff.failed(Instant::now()) {
                Some(wait) => {
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                }
                None => {
                    return Err(anyhow!(
                        "gave up after {} tries over {:?} of the target refusing the same item \
                         (is it overloaded or down?); last answer: {e}",
                        backoff.failures,
                        backoff.give_up
                    ));
                }
            },
            Err(e) => return Err(anyhow::Error::new(e)),
        }
    }
}

/// Whether a gRPC failure is the server shedding load or briefly unreachable: worth a retry.
pub(crate) fn grpc_transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::ResourceExhausted | tonic::Code::Unavailable
    )
}

/// Whether a Redis / Valkey failure is worth a retry on the same connection: the server
/// busy or loading, asking to try again, or a reply that timed out.
pub(crate) fn redis_transient(e: &redis::RedisError) -> bool {
    e.is_timeout()
        || (matches!(
            e.retry_method(),
            redis::RetryMethod::WaitAndRetry | redis::RetryMethod::RetryImmediately
        ) && !e.is_connection_dropped())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    #[test]
    fn waits_double_from_1ms_to_200ms_and_give_up_after_10s_of_one_item() {
        let mut b = Backoff::standard();
        let t0 = Instant::now();
        let mut waits = Vec::new();
        let mut now = t0;
        while let Some(w) = b.failed(now) {
            waits.push(w.as_millis());
            now += w;
        }
        assert_eq!(&waits[..9], [1, 2, 4, 8, 16, 32, 64, 128, 200]);
        assert!(waits[9..].iter().all(|&w| w == 200), "{waits:?}");
        // It gave up at the first failure 10 s or more after the first one.
        let failing: u128 = waits.iter().sum();
        assert!((10_000..10_200).contains(&failing), "{failing} ms");

        // A success resets both the wait and the clock: the next item has its own 10 s.
        b.succeeded();
        assert_eq!(b.failed(now), Some(FIRST));
        assert_eq!(b.failed(now + Duration::from_secs(9)), Some(FIRST * 2));
        assert_eq!(b.failed(now + Duration::from_secs(10)), None);
    }

    /// A fake target error: `transient` or not.
    #[derive(Debug)]
    struct Fake(bool);

    impl std::fmt::Display for Fake {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(if self.0 { "shed" } else { "bad request" })
        }
    }

    impl std::error::Error for Fake {}

    #[tokio::test]
    async fn a_shed_item_is_retried_until_it_goes_through() {
        let tries = AtomicU32::new(0);
        let retries = AtomicU64::new(0);
        let mut b = Backoff::standard();
        let started = Instant::now();
        // Refused 4 times (waits 1 + 2 + 4 + 8 ms), then accepted.
        let got = retry(
            &mut b,
            &retries,
            |e: &Fake| e.0,
            || {
                let n = tries.fetch_add(1, Ordering::Relaxed);
                async move { if n < 4 { Err(Fake(true)) } else { Ok(n) } }
            },
        )
        .await
        .unwrap();
        assert_eq!(got, 4);
        assert_eq!(retries.load(Ordering::Relaxed), 4);
        assert!(started.elapsed() >= Duration::from_millis(15));
        // The next item starts from the first wait again.
        assert_eq!(b.failed(Instant::now()), Some(FIRST));
    }

    #[tokio::test]
    async fn a_permanent_error_is_not_retried_and_a_lasting_refusal_gives_up() {
        let retries = AtomicU64::new(0);
        let mut b = Backoff::standard();
        let e = retry(
            &mut b,
            &retries,
            |e: &Fake| e.0,
            || async { Err::<(), _>(Fake(false)) },
        )
        .await
        .unwrap_err();
        assert_eq!(e.to_string(), "bad request");
        assert_eq!(retries.load(Ordering::Relaxed), 0);

        let mut b = Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(4),
            Duration::from_millis(30),
        );
        let started = Instant::now();
        let e = retry(
            &mut b,
            &retries,
            |e: &Fake| e.0,
            || async { Err::<(), _>(Fake(true)) },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(e.starts_with("gave up after "), "{e}");
        assert!(e.ends_with("last answer: shed"), "{e}");
        assert!(retries.load(Ordering::Relaxed) >= 7);
    }
}
