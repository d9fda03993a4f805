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

/// Characters no user id may hold: controls (C0, DEL, C1), the bidirectional formatting
/// characters (embeddings, overrides, isolates, marks), line and paragraph separators and
/// the byte-order mark. They make an id print as something else in a log line or a chat
/// app's list (`"\u{202e}evil"` shows reversed), so they are refused, not stored.
fn forbidden_in_user_id(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
                | '\u{2028}' | '\u{2029}' | '\u{feff}'
        )
}

/// A user id as received: [`validate`], then the alphabet: printable, with no leading or
/// trailing white space.
fn validate_user(field: &'static str, value: &str) -> Result<Arc<str>> {
    if let Some(c) = value.chars().find(|&c| forbidden_in_user_id(c)) {
        return Err(Error::invalid(
            field,
            format!(
                "must be printable: no control, bidirectional-formatting or separator characters (found U+{:04X})",
                u32::from(c)
            ),
        ));
    }
    if value.starts_with(char::is_whitespace) || value.ends_with(char::is_whitespace) {
        return Err(Error::invalid(
            field,
            "must not begin or end with white space",
        ));
    }
    validate(field, value)
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $validate:ident, $rules:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates an id read from the request field `field`.
            ///
            /// # Errors
            #[doc = $rules]
            pub fn new(field: &'static str, value: &str) -> Result<Self> {
                $validate(field, value).map(Self)
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
    /// A user's id: 1 to 128 bytes of printable UTF-8 (no control, bidirectional-formatting
    /// or separator characters), not beginning or ending with white space.
    UserId,
    validate_user,
    "[`Error::InvalidArgument`] naming `field` when the id is empty, longer than [`MAX_ID_BYTES`], holds a control, bidirectional-formatting or separator character, or begins or ends with white space."
);
id_type!(
    /// A client-chosen idempotency key for one shake: 1 to 128 bytes of UTF-8.
    ShakeId,
    validate,
    "[`Error::InvalidArgument`] naming `field` when the id is empty or longer than [`MAX_ID_BYTES`]."
);

impl UserId {
    /// An id read back from the index's own storage, which holds only ids that were
    /// validated on the way in.
    pub(crate) fn trusted(value: &str) -> Self {
        Self(Arc::from(value))
    }

    /// An id read back from storage that may predate the alphabet rule (a snapshot, a
    /// store, a page token): only its length is checked, so old data still loads.
    pub(crate) fn stored(value: &str) -> Option<Self> {
        validate("user_id", value).ok().map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_printable_without_edge_space() {
        for bad in [
            "a\u{0}b",
            "a\nb",
            "tab\t",
            "\u{7f}",
            "\u{85}",
            "\u{202e}evil",
            "\u{2066}x",
            "x\u{200f}",
            "\u{feff}bom",
            "a\u{2028}b",
            " ",
            " lead",
            "trail ",
            "\u{3000}wide",
        ] {
            let err = UserId::new("user_id", bad).unwrap_err();
            assert_eq!(err.field(), Some("user_id"), "{bad:?}");
        }
        for good in [
            "alice",
            "名字",
            "a b",
            "user:0042",
            "émile",
            "o'brien",
            "x\u{200d}y",
        ] {
            assert!(UserId::new("user_id", good).is_ok(), "{good:?}");
        }
        // Shake ids keep the plain rule; stored ids load whatever they hold.
        assert!(ShakeId::new("shake_id", " s\n").is_ok());
        assert!(UserId::stored("a\u{0}b").is_some());
        assert!(UserId::stored("").is_none());
    }

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
