//! Domain errors. No transport types here: `grpc::status` maps them to gRPC codes in one place.

use thiserror::Error;

/// Everything that can go wrong inside geomatch's domain.
#[derive(Debug, Clone, PartialEq, Error)]
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
    /// The caller is over its rate limit for `what`.
    #[error("{what}: rate limit exceeded, retry in {} ms", retry_after.as_millis())]
    RateLimited {
        /// The limited call.
        what: &'static str,
        /// When the next call will be allowed.
        retry_after: std::time::Duration,
    },
    /// The position is farther from the user's last one than anyone could have travelled.
    #[error(
        "position: impossible travel: {:.0} km from the last position in {seconds:.0} s; \
         the position was not used",
        distance_m / 1_000.0
    )]
    ImpossibleTravel {
        /// How far, metres.
        distance_m: f64,
        /// In how long, seconds.
        seconds: f64,
    },
    /// A bounded resource is full; the caller may retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller's own deadline passed before the operation finished.
    #[error("the caller's deadline passed")]
    DeadlineExceeded,
    /// The store holding the state cannot be reached right now; nothing was decided, and
    /// the caller may retry (on this replica or another).
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl Error {
    /// The request field the error is about, if any.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::InvalidArgument { field, .. } | Self::FailedPrecondition { field, .. } => {
                Some(field)
            }
            Self::ImpossibleTravel { .. } => Some("position"),
            Self::RateLimited { .. }
            | Self::ResourceExhausted(_)
            | Self::DeadlineExceeded
            | Self::Unavailable(_) => None,
        }
    }

    /// The reason, without the field name.
    pub fn reason(&self) -> String {
        match self {
            Self::InvalidArgument { reason, .. } | Self::FailedPrecondition { reason, .. } => {
                reason.clone()
            }
            other => {
                let text = other.to_string();
                match other.field() {
                    Some(f) => text
                        .strip_prefix(f)
                        .and_then(|t| t.strip_prefix(": "))
                        .map_or(text.clone(), str::to_string),
                    None => text,
                }
            }
        }
    }

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
