//! Domain errors. No transport types here: `grpc::status` maps them to gRPC codes in one place.

use thiserror::Error;

/// Everything that can go wrong inside geomatch's domain.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// A request field is missing or out of range. `field` is the wire path of the field
    /// (for example `position.lat`), so a client can tell exactly what to fix.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Wire path of the offending field.
        field: &'static str,
        /// Human-readable reason, safe to show to the caller.
        reason: String,
    },
    /// The request is valid but the state it needs does not hold (for example: watching
    /// before having a location).
    #[error("{field}: {reason}")]
    FailedPrecondition {
        /// Wire path of the field the precondition is about.
        field: &'static str,
        /// Human-readable reason, safe to show to the caller.
        reason: String,
    },
    /// A bounded resource is full; the caller may retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller's own deadline passed before the operation finished.
    #[error("the caller's deadline passed")]
    DeadlineExceeded,
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

/// Result alias for the domain.
pub type Result<T, E = Error> = std::result::Result<T, E>;
