//! Validated request values: each is built once, from what a request asked for and the
//! server's rule for that field, so the rooms that act on a request never check it again.
//!
//! A rule holds the default (what a request's 0 means) and the maximum; the config builds
//! each rule once, and its `Default` is the one place a default value is written.

use std::time::Duration;

use crate::error::{Error, Result};

/// How a distance field of a request is read: 0 means the default, more than the maximum
/// is refused. One rule for SearchNearby's and WatchNearby's `radius_m` and Shake's
/// `max_distance_m`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RadiusRule {
    /// The request field, named in errors.
    pub field: &'static str,
    /// Distance used when a request gives 0, metres.
    pub default_m: f64,
    /// Largest distance a request may ask for, metres.
    pub max_m: f64,
}

/// A validated distance, metres: finite, positive, within its rule's maximum.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Radius(f64);

impl Radius {
    /// The distance in metres.
    pub fn m(self) -> f64 {
        self.0
    }
}

impl RadiusRule {
    /// SearchNearby and WatchNearby `radius_m`: 1 km unless asked, at most 10 km.
    pub const SEARCH: Self = Self {
        field: "radius_m",
        default_m: 1_000.0,
        max_m: 10_000.0,
    };

    /// Shake `max_distance_m`: 1 km unless asked, at most 50 km.
    pub const SHAKE: Self = Self {
        field: "max_distance_m",
        default_m: 1_000.0,
        max_m: 50_000.0,
    };

    /// The distance a request asking for `requested_m` gets.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the rule's field when `requested_m` is negative,
    /// not finite, or beyond the maximum.
    pub fn apply(&self, requested_m: f64) -> Result<Radius> {
        if !requested_m.is_finite() || requested_m < 0.0 {
            return Err(Error::invalid(
                self.field,
                format!(
                    "must be a finite number of metres >= 0, got {}",
                    super::Shown(requested_m)
                ),
            ));
        }
        if requested_m > self.max_m {
            return Err(Error::invalid(
                self.field,
                format!(
                    "must be at most {} m, got {}",
                    self.max_m,
                    super::Shown(requested_m)
                ),
            ));
        }
        Ok(Radius(if requested_m == 0.0 {
            self.default_m
        } else {
            requested_m
        }))
    }
}

/// How SearchNearby's `limit` is read: 0 means the default, more than the maximum is
/// refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRule {
    /// Page size used when a request gives 0.
    pub default: u32,
    /// Largest page size a request may ask for.
    pub max: u32,
}

impl Default for PageRule {
    fn default() -> Self {
        Self {
            default: 20,
            max: 100,
        }
    }
}

/// A validated page size: at least 1, within its rule's maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSize(usize);

impl PageSize {
    /// The page size.
    pub fn get(self) -> usize {
        self.0
    }
}

impl PageRule {
    /// The page size a request asking for `requested` gets.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `limit` when `requested` exceeds the maximum.
    pub fn apply(&self, requested: u32) -> Result<PageSize> {
        if requested > self.max {
            return Err(Error::invalid(
                "limit",
                format!("must be at most {}, got {requested}", self.max),
            ));
        }
        let n = if requested == 0 {
            self.default
        } else {
            requested
        };
        Ok(PageSize(n.max(1) as usize))
    }
}

/// How long a location ping stays: the server's time to live unless the ping asks for
/// its own (`ttl_s`), which may not exceed the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlRule {
    /// Time to live of a ping that asks for none.
    pub default: Duration,
    /// Longest time to live a ping may ask for (at most `u32::MAX` ms, 49 days).
    pub max: Duration,
}

impl Default for TtlRule {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(15 * 60),
            max: Duration::from_secs(72 * 3_600),
        }
    }
}

/// A validated time to live, in ms (it is stored in 32 bits per user).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ttl(u32);

impl Ttl {
    /// The time to live in ms.
    pub fn ms(self) -> u32 {
        self.0
    }
}

fn ms_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl TtlRule {
    /// The server's own time to live.
    pub fn server(&self) -> Ttl {
        Ttl(ms_u32(self.default))
    }

    /// The time to live of a ping asking for `ttl_s` seconds (0 = the server's).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `ttl_s` when it exceeds the maximum.
    pub fn apply(&self, ttl_s: u32) -> Result<Ttl> {
        if ttl_s == 0 {
            return Ok(self.server());
        }
        let max_s = self.max.as_secs();
        if u64::from(ttl_s) > max_s {
            return Err(Error::invalid(
                "ttl_s",
                format!("must be at most {max_s} s, got {ttl_s}"),
            ));
        }
        Ok(Ttl(ttl_s.saturating_mul(1_000)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radius_zero_is_the_default_and_bad_values_name_the_field() {
        let rule = RadiusRule::SHAKE;
        assert_eq!(rule.apply(0.0).unwrap().m(), 1_000.0);
        assert_eq!(rule.apply(50_000.0).unwrap().m(), 50_000.0);
        for bad in [-1.0, f64::NAN, f64::INFINITY, 50_000.1] {
            match rule.apply(bad) {
                Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "max_distance_m"),
                other => panic!("{bad} gave {other:?}"),
            }
        }
        assert!(RadiusRule::SEARCH.apply(10_001.0).is_err());
    }

    #[test]
    fn a_huge_radius_is_quoted_in_scientific_notation() {
        let Err(err) = RadiusRule::SEARCH.apply(1e308) else {
            panic!("1e308 m accepted");
        };
        let text = err.to_string();
        assert!(text.contains("got 1e308"), "{text}");
        assert!(text.len() < 80, "{text}");
        let Err(err) = RadiusRule::SEARCH.apply(10_000.5) else {
            panic!("10000.5 m accepted");
        };
        assert!(err.to_string().contains("got 10000.5"), "{err}");
    }

    #[test]
    fn page_size_and_ttl_follow_their_rules() {
        let page = PageRule::default();
        assert_eq!(page.apply(0).unwrap().get(), 20);
        assert_eq!(page.apply(100).unwrap().get(), 100);
        assert!(page.apply(101).is_err());
        let ttl = TtlRule::default();
        assert_eq!(ttl.apply(0).unwrap().ms(), 15 * 60 * 1_000);
        assert_eq!(ttl.apply(72 * 3_600).unwrap().ms(), 72 * 3_600 * 1_000);
        match ttl.apply(72 * 3_600 + 1) {
            Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "ttl_s"),
            other => panic!("{other:?}"),
        }
    }
}
