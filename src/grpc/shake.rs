//! `geomatch.v1.Shake` adapter, in the handlers' one order: decode and validate, guard,
//! shake, encode. The handler future is dropped when the client cancels,
//! which withdraws the waiting shake at once. A caller's `grpc-timeout` is stamped into
//! the request on arrival by [`stamp_deadline`] and ends the wait with DEADLINE_EXCEEDED
//! just before tonic's own enforcement would (which reports a less useful CANCELLED).

use std::{sync::Arc, time::Duration};

use opentelemetry::context::FutureExt as _;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{convert, pb};
use crate::{
    clock::Clock,
    guard::Limits,
    shake::{Outcome, Tier},
    store::ShakeStore,
    telemetry::{names, trace},
};

/// Serves `geomatch.v1.Shake` from a [`ShakeStore`].
#[derive(Debug, Clone)]
pub struct ShakeService {
    matcher: ShakeStore,
    limits: Arc<Limits>,
    clock: Arc<dyn Clock>,
}

impl ShakeService {
    /// An adapter over `matcher`, guarded by `limits`, reading time from `clock`.
    pub fn new(matcher: ShakeStore, limits: Arc<Limits>, clock: Arc<dyn Clock>) -> Self {
        Self {
            matcher,
            limits,
            clock,
        }
    }
}

#[tonic::async_trait]
impl pb::shake_server::Shake for ShakeService {
    async fn shake(
        &self,
        request: Request<pb::ShakeRequest>,
    ) -> Result<Response<pb::ShakeResponse>, Status> {
        // End our own wait a little before tonic's `grpc-timeout` enforcement does.
        let margin = self.matcher.deadline_margin();
        let deadline = request
            .extensions()
            .get::<CallerDeadline>()
            .map(|d| d.0.checked_sub(margin).unwrap_or(d.0));
        let shake = convert::shake(request.into_inner(), &self.matcher, deadline)?;
        let now = self.clock.now_ms();
        if let ShakeStore::Redis(remote) = &self.matcher {
            // Shared by every replica over the store, not one bucket per replica.
            remote
                .rate_limit(shake.user(), self.limits.shake.config(), now)
                .await?;
        }
        self.limits.shake(shake.user(), &shake.position(), now)?;
        // The wait for a partner, as a span of its own when the call is traced.
        let wait = trace::child(trace::Kind::Internal, || "geomatch.shake.wait".into());
        let outcome = match &wait {
            Some(span) => self.matcher.shake(shake).with_context(span.context()).await,
            None => self.matcher.shake(shake).await,
        }?;
        if let Some(span) = &wait {
            let shown = match &outcome {
                Outcome::Matched(_) => "matched",
                Outcome::NoMatch => "no_match",
            };
            span.attribute("geomatch.shake.outcome", shown);
        }
        drop(wait);
        match &outcome {
            Outcome::Matched(m) => {
                let tier = match m.tier {
                    Tier::Nearby => "nearby",
                    Tier::Anywhere => "anywhere",
                };
                metrics::counter!(names::MATCHES, "tier" => tier).increment(1);
            }
            Outcome::NoMatch => metrics::counter!(names::NO_MATCHES).increment(1),
        }
        Ok(Response::new(convert::outcome(outcome)))
    }
}

/// When the caller's `grpc-timeout` runs out, as seen on arrival.
#[derive(Debug, Clone, Copy)]
struct CallerDeadline(Instant);

/// Interceptor for the Shake service: records the caller's deadline the moment the call
/// arrives. Tonic runs interceptors synchronously inside its own timeout layer's `call`,
/// before that layer starts its timer, so this deadline never falls after tonic's.
///
/// # Errors
/// Never; the signature is the interceptor's.
pub fn stamp_deadline(mut request: Request<()>) -> Result<Request<()>, Status> {
    let arrived = Instant::now();
    if let Some(timeout) = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
    {
        let deadline = arrived + timeout;
        request.extensions_mut().insert(CallerDeadline(deadline));
    }
    Ok(request)
}

/// Parses a `grpc-timeout` value: up to 8 ASCII digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3_600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_per_the_spec() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3_600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "100", "100x", "123456789S", "-1S", "1.5S", "é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
