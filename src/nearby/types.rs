//! The index's request and result types: what callers hand the index and what it hands
//! back. Requests arrive validated ([`Ping`], [`Query`], [`WatchRequest`] hold only checked
//! values); results carry banded distances and privacy cells, never coordinates.

use h3o::{CellIndex, Resolution};

use super::{token::Cursor, watch::WatchConfig};
use crate::{
    geo::{
        Coordinates,
        value::{PageRule, PageSize, Radius, RadiusRule, Ttl, TtlRule},
    },
    id::UserId,
};

/// A user's self-declared gender, used only as a search filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gender {
    /// Not given; as a search filter: everyone.
    #[default]
    Unspecified,
    /// Female.
    Female,
    /// Male.
    Male,
}

impl Gender {
    /// The wire number (also the snapshot encoding).
    pub fn wire(self) -> u8 {
        match self {
            Self::Unspecified => 0,
            Self::Female => 1,
            Self::Male => 2,
        }
    }

    /// The gender with wire number `n`, if there is one.
    pub fn from_wire(n: u8) -> Option<Self> {
        match n {
            0 => Some(Self::Unspecified),
            1 => Some(Self::Female),
            2 => Some(Self::Male),
            _ => None,
        }
    }
}

/// Limits and defaults of the index.
#[derive(Debug, Clone)]
pub struct NearbyConfig {
    /// Resolution of the privacy cells users are snapped to (and indexed by).
    pub privacy_resolution: Resolution,
    /// How long a ping stays visible after the user's last update, and the longest a ping
    /// may ask for.
    pub ttl: TtlRule,
    /// Radius of searches and watches.
    pub radius: RadiusRule,
    /// Page size of searches.
    pub page: PageRule,
    /// Limits of WatchNearby streams.
    pub watch: WatchConfig,
    /// Most users held at once: pings from new users beyond it are refused (existing users
    /// keep updating). [`NearbyIndex::update`](super::NearbyIndex::update) (loading, tests)
    /// does not check it.
    pub max_users: usize,
}

impl Default for NearbyConfig {
    fn default() -> Self {
        Self {
            privacy_resolution: crate::geo::cell::PRIVACY_RESOLUTION,
            ttl: TtlRule::default(),
            radius: RadiusRule::SEARCH,
            page: PageRule::default(),
            watch: WatchConfig::default(),
            max_users: usize::MAX,
        }
    }
}

/// A location ping with its options.
#[derive(Debug, Clone)]
pub struct Ping {
    /// Who.
    pub user: UserId,
    /// Where, exactly (only the privacy cell is kept).
    pub position: Coordinates,
    /// Their gender, for search filters.
    pub gender: Gender,
    /// Whether others may find them; an invisible user can still search.
    pub visible: bool,
    /// How long the ping stays (the server's TTL unless the ping asked for its own).
    pub ttl: Ttl,
}

/// A WatchNearby request, validated.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// The watcher: the watch is centred on their own latest position.
    pub watcher: UserId,
    /// Radius (same rule as a search's).
    pub radius: Radius,
    /// Only users of this gender; `Unspecified` = everyone.
    pub gender: Gender,
}

/// Where an update put the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The privacy cell the user is indexed in.
    pub cell: CellIndex,
    /// Unix ms when the ping stops being visible.
    pub expires_at_ms: i64,
}

/// A "who is near me" query, as received; [`NearbyIndex::query`](super::NearbyIndex::query)
/// validates it into a [`Query`].
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// The searcher, never in its own results.
    pub searcher: UserId,
    /// Search centre: the searcher's own exact position.
    pub centre: Coordinates,
    /// Radius in metres; 0 = default.
    pub radius_m: f64,
    /// Page size; 0 = default.
    pub limit: u32,
    /// Only users of this gender; `Unspecified` = everyone.
    pub gender: Gender,
    /// Token from the previous page; empty = first page.
    pub page_token: String,
}

/// A validated "who is near me" query: what [`NearbyIndex::search`](super::NearbyIndex::search)
/// runs.
#[derive(Debug, Clone)]
pub struct Query {
    /// The searcher, never in its own results.
    pub searcher: UserId,
    /// Search centre: the searcher's own exact position.
    pub centre: Coordinates,
    /// Radius.
    pub radius: Radius,
    /// Page size.
    pub limit: PageSize,
    /// Only users of this gender; `Unspecified` = everyone.
    pub gender: Gender,
    /// Where the previous page ended; `None` on the first page.
    pub after: Option<Cursor>,
}

/// One user in a search result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The user.
    pub user: UserId,
    /// Banded distance from the searcher to the user's snapped position, metres.
    pub distance_m: u32,
    /// The user's gender.
    pub gender: Gender,
    /// Unix ms of the user's last ping.
    pub last_seen_ms: i64,
    /// The user's privacy cell, the position distances are measured to. Kept inside the
    /// server (a watch measures a LEAVE from it); the wire shows only the banded distance.
    pub cell: CellIndex,
}

/// One page of results.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SearchPage {
    /// Nearest first, ties by user id.
    pub users: Vec<Found>,
    /// Token for the next page; `None` when there is none.
    pub next_page_token: Option<String>,
}

/// What the index holds about one user, as shown to that user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocationStatus {
    /// The privacy cell the user is indexed in: the finest position held.
    pub cell: CellIndex,
    /// Whether others can find the user.
    pub visible: bool,
    /// The gender given with the last ping.
    pub gender: Gender,
    /// Unix ms of the last ping.
    pub last_seen_ms: i64,
    /// Unix ms when the location is forgotten.
    pub expires_at_ms: i64,
}

/// Everything the index holds about one user: what a snapshot stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The user.
    pub user: UserId,
    /// Their privacy cell (the finest position held).
    pub cell: CellIndex,
    /// Their gender.
    pub gender: Gender,
    /// Unix ms of their last ping.
    pub last_seen_ms: i64,
    /// How long the ping stays, from `last_seen_ms`, in ms.
    pub ttl_ms: u32,
    /// Whether others may find them.
    pub visible: bool,
}
