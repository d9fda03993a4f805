//! `geomatch.v1.Shake` adapter. The handler future is dropped when the client cancels or
//! its `grpc-timeout` passes (tonic enforces it server-side), which withdraws the waiting
//! shake at once.

use std::sync::Arc;

use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use super::{convert, pb};
use crate::shake::{Matcher, ShakeRequest};

/// Serves `geomatch.v1.Shake` from a [`Matcher`].
#[derive(Debug, Clone)]
pub struct ShakeService {
    matcher: Arc<Matcher>,
}

impl ShakeService {
    /// An adapter over `matcher`.
    pub fn new(matcher: Arc<Matcher>) -> Self {
        Self { matcher }
    }
}

#[tonic::async_trait]
impl pb::shake_server::Shake for ShakeService {
    async fn shake(
        &self,
        request: Request<pb::ShakeRequest>,
    ) -> Result<Response<pb::ShakeResponse>, Status> {
        let deadline = caller_deadline(request.metadata());
        let req = request.into_inner();
        let shake = ShakeRequest {
            user: convert::user_id(&req.user_id)?,
            position: convert::position(req.position)?,
            shake_id: convert::shake_id(&req.shake_id)?,
            max_distance_m: req.max_distance_m,
            exclude: convert::excludes(&req.exclude_user_ids)?,
            deadline,
        };
        let outcome = self.matcher.shake(shake).await?;
        Ok(Response::new(convert::outcome(outcome)))
    }
}

/// Ends our own wait a little before tonic's `grpc-timeout` enforcement does, so the caller
/// gets DEADLINE_EXCEEDED from us rather than tonic's CANCELLED.
const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// The caller's deadline from the `grpc-timeout` header, if it sent one.
fn caller_deadline(metadata: &MetadataMap) -> Option<Instant> {
    let timeout = parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    Some(Instant::now() + timeout.saturating_sub(DEADLINE_MARGIN))
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
