//! Validated identifiers. Cheap to clone (shared, immutable bytes), so the hot paths copy a
//! pointer rather than a string.

use std::{borrow::Borrow, fmt, sync::Arc};

use crate::error::{Error, Result};

/// Longest id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;

fn validate(field: &'static str, value: &str) -> Result<Arc<str>> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_ID_BYTES} bytes, got {}", value.len()),
        ));
    }
    Ok(Arc::from(value))
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates an id read from the request field `field`.
            ///
            /// # Errors
            /// [`Error::InvalidArgument`] naming `field` when the id is empty or longer than
            /// [`MAX_ID_BYTES`].
            pub fn new(field: &'static str, value: &str) -> Result<Self> {
                validate(field, value).map(Self)
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A user's id: 1 to 128 bytes of UTF-8.
    UserId
);
id_type!(
    /// A client-chosen idempotency key for one shake: 1 to 128 bytes of UTF-8.
    ShakeId
);

impl UserId {
    /// An id read back from the index's own storage, which holds only ids that were
    /// validated on the way in.
    pub(crate) fn trusted(value: &str) -> Self {
        Self(Arc::from(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded() {
        assert!(UserId::new("user_id", "").is_err());
        assert!(UserId::new("user_id", &"x".repeat(MAX_ID_BYTES)).is_ok());
        let err = UserId::new("user_id", &"x".repeat(MAX_ID_BYTES + 1)).unwrap_err();
        assert_eq!(
            err,
            Error::invalid("user_id", "must be at most 128 bytes, got 129")
        );
        // Multi-byte characters count in bytes, not chars.
        assert!(ShakeId::new("shake_id", &"é".repeat(65)).is_err());
    }
}
