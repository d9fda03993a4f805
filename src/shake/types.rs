//! The matcher's request and result types.

use std::{fmt, time::Duration};

use h3o::Resolution;
use tokio::time::Instant;

use crate::{
    error::{Error, Result},
    geo::{
        Coordinates,
        value::{Radius, RadiusRule},
    },
    id::{ShakeId, UserId},
};

/// Limits and timing of the matcher.
#[derive(Debug, Clone)]
pub struct ShakeConfig {
    /// Resolution positions are snapped to before any distance is measured.
    pub privacy_resolution: Resolution,
    /// Resolution of the buckets waiting shakes are kept in.
    pub bucket_resolution: Resolution,
    /// How long a shake waits for a partner.
    pub window: Duration,
    /// How long a finished shake's outcome is kept for retries.
    pub result_ttl: Duration,
    /// How `max_distance_m` is read: its default and maximum.
    pub max_distance: RadiusRule,
    /// Most user ids one shake may exclude.
    pub max_excludes: usize,
}

impl Default for ShakeConfig {
    fn default() -> Self {
        Self {
            privacy_resolution: crate::geo::cell::PRIVACY_RESOLUTION,
            bucket_resolution: Resolution::Seven,
            window: Duration::from_secs(2),
            result_ttl: Duration::from_secs(60),
            max_distance: RadiusRule::SHAKE,
            max_excludes: 1_000,
        }
    }
}

/// A shake as received; [`Matcher::validate`](super::Matcher::validate) checks it into a
/// [`ValidShake`].
#[derive(Debug, Clone)]
pub struct ShakeRequest {
    /// Who shook.
    pub user: UserId,
    /// Where, exactly (snapped before use).
    pub position: Coordinates,
    /// The client's idempotency key.
    pub shake_id: ShakeId,
    /// Farthest acceptable partner, metres; 0 = default.
    pub max_distance_m: f64,
    /// Never pair with these users (and they never pair with this one).
    pub exclude: Vec<UserId>,
    /// The caller's own deadline. If it passes before the window ends (and before a
    /// partner is found) the call fails with [`Error::DeadlineExceeded`] and, unless
    /// another call is waiting on the same shake, the shake is withdrawn.
    pub deadline: Option<Instant>,
    /// What to do when nobody nearby shakes within half the window.
    pub fallback: Fallback,
}

/// A shake whose every field is checked: what [`Matcher::shake`](super::Matcher::shake)
/// takes.
#[derive(Debug, Clone)]
pub struct ValidShake {
    pub(super) req: ShakeRequest,
    pub(super) max_distance: Radius,
}

impl ValidShake {
    /// Checks `req` against `cfg`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `max_distance_m` or `exclude_user_ids`.
    pub fn new(req: ShakeRequest, cfg: &ShakeConfig) -> Result<Self> {
        let max_distance = cfg.max_distance.apply(req.max_distance_m)?;
        if req.exclude.len() > cfg.max_excludes {
            return Err(Error::invalid(
                "exclude_user_ids",
                format!(
                    "must hold at most {} ids, got {}",
                    cfg.max_excludes,
                    req.exclude.len()
                ),
            ));
        }
        Ok(Self { req, max_distance })
    }

    /// Who shook.
    pub fn user(&self) -> &UserId {
        &self.req.user
    }

    /// Where, exactly.
    pub fn position(&self) -> Coordinates {
        self.req.position
    }

    /// The request, every field checked.
    pub fn request(&self) -> &ShakeRequest {
        &self.req
    }

    /// Farthest acceptable partner, metres (the default applied).
    pub fn max_distance_m(&self) -> f64 {
        self.max_distance.m()
    }
}

/// A shake's fallback when nobody nearby shakes in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// Only nearby partners.
    #[default]
    None,
    /// After half the window without a nearby partner, also any other such shake
    /// anywhere, nearest first.
    Anywhere,
}

/// Which tier a match was made in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Within both sides' distance.
    Nearby,
    /// Between two fallback shakes, at any distance.
    Anywhere,
}

/// Names one pairing, identically on both sides: 128 random bits (from a CSPRNG seeded by
/// the operating system), shown as 32 hex digits. Random, so a client can neither guess
/// another pairing's id nor read the server's shake volume or rate off its own ids, and
/// unique across replicas without coordination. Held as two integers, not a string,
/// because every outcome kept for retries holds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MatchId {
    pub(super) prefix: u64,
    pub(super) seq: u64,
}

impl MatchId {
    /// The id made of these two halves (as read back from storage).
    pub fn new(prefix: u64, seq: u64) -> Self {
        Self { prefix, seq }
    }

    /// A fresh random id.
    pub fn random() -> Self {
        Self {
            prefix: rand::random(),
            seq: rand::random(),
        }
    }

    /// Reads an id as [`Display`](fmt::Display) writes it: exactly 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let prefix = u64::from_str_radix(&s[..16], 16).ok()?;
        let seq = u64::from_str_radix(&s[16..], 16).ok()?;
        Some(Self { prefix, seq })
    }
}

impl fmt::Display for MatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.prefix, self.seq)
    }
}

/// A successful pairing, as seen by one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// The other side.
    pub partner: UserId,
    /// Banded distance between both sides' snapped positions, metres.
    pub distance_m: u32,
    /// Identical on both sides.
    pub match_id: MatchId,
    /// How they were paired.
    pub tier: Tier,
}

/// How a shake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Paired.
    Matched(Match),
    /// The window passed (or the shake was superseded) without a partner.
    NoMatch,
}
