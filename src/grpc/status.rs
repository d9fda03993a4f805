//! Domain errors to gRPC statuses, in exactly one place.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::{error::Error, telemetry::names};

/// Sheds a call the server has no capacity for, at once.
pub fn overloaded(what: &'static str) -> Status {
    metrics::counter!(names::REJECTIONS, "reason" => "overloaded").increment(1);
    Status::resource_exhausted(format!(
        "server overloaded: too many {what} in flight, retry with backoff"
    ))
}

/// Sheds a call that waited too long for a worker.
pub fn queued_too_long(waited: std::time::Duration, max: std::time::Duration) -> Status {
    metrics::counter!(names::REJECTIONS, "reason" => "overloaded").increment(1);
    Status::resource_exhausted(format!(
        "server overloaded: the call waited {} ms for a worker (limit {} ms), retry with backoff",
        waited.as_millis(),
        max.as_millis()
    ))
}

/// Maps a domain error to the status a client sees. INVALID_ARGUMENT carries a
/// `google.rpc.BadRequest` field violation naming the field.
pub fn to_status(err: Error) -> Status {
    match err {
        Error::InvalidArgument { field, reason } => {
            metrics::counter!(names::REJECTIONS, "reason" => field).increment(1);
            let message = format!("{field}: {reason}");
            Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation(field, reason),
            )
        }
        Error::FailedPrecondition { field, reason } => {
            metrics::counter!(names::REJECTIONS, "reason" => field).increment(1);
            Status::with_error_details(
                Code::FailedPrecondition,
                format!("{field}: {reason}"),
                ErrorDetails::with_precondition_failure_violation("STATE", field, reason),
            )
        }
        Error::RateLimited { retry_after, .. } => {
            metrics::counter!(names::REJECTIONS, "reason" => "rate_limited").increment(1);
            Status::with_error_details(
                Code::ResourceExhausted,
                err.to_string(),
                ErrorDetails::with_retry_info(Some(retry_after)),
            )
        }
        Error::ImpossibleTravel { .. } => {
            metrics::counter!(names::IMPOSSIBLE_TRAVEL).increment(1);
            metrics::counter!(names::REJECTIONS, "reason" => "impossible_travel").increment(1);
            let reason = err.to_string();
            Status::with_error_details(
                Code::FailedPrecondition,
                reason.clone(),
                ErrorDetails::with_precondition_failure_violation("TRAVEL", "position", reason),
            )
        }
        Error::ResourceExhausted(what) => {
            metrics::counter!(names::REJECTIONS, "reason" => "exhausted").increment(1);
            Status::resource_exhausted(what)
        }
        Error::DeadlineExceeded => Status::deadline_exceeded(Error::DeadlineExceeded.to_string()),
        Error::Unavailable(_) => {
            metrics::counter!(names::REJECTIONS, "reason" => "store_unavailable").increment(1);
            Status::unavailable(err.to_string())
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        to_status(err)
    }
}
