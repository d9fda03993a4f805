//! Where People Nearby is held: in this process (`--store memory`, the default and the
//! fastest) or in Redis / Valkey ([`redis`]: `--store redis | redis-cluster`), so that any
//! number of replicas serve one world.
//!
//! Shake pairs in this process or through the same store ([`ShakeStore`]).
//!
//! [`NearbyStore`] is the seam the gRPC edge calls. Both stores take the same validated
//! requests (validated once, by the same rules) and answer through the same query engine,
//! bands and page tokens; only where the maps live differs.

pub mod redis;

use std::sync::Arc;

use crate::{
    error::Result,
    id::UserId,
    nearby::{
        LocationStatus, NearbyConfig, NearbyIndex, Ping, Placement, Query, SearchPage,
        SearchRequest, Watch, WatchRequest,
    },
    shake::{Matcher, Outcome, ShakeConfig, ShakeRequest, ValidShake},
};

/// Pings of one bulk stream under way at once over a remote store.
pub const REMOTE_PINGS_IN_FLIGHT: usize = 32;

/// The People Nearby store the services use. Cheap to clone.
#[derive(Debug, Clone)]
pub enum NearbyStore {
    /// The in-memory index.
    Memory(Arc<NearbyIndex>),
    /// Redis or Valkey, standalone or Cluster.
    Redis(Arc<redis::RedisNearby>),
}

impl NearbyStore {
    /// The rules requests are validated by.
    pub fn config(&self) -> &NearbyConfig {
        match self {
            Self::Memory(i) => i.config(),
            Self::Redis(r) => r.config(),
        }
    }

    /// The in-memory index, when that is the store (watches and snapshots need it).
    pub fn memory(&self) -> Option<&Arc<NearbyIndex>> {
        match self {
            Self::Memory(i) => Some(i),
            Self::Redis(_) => None,
        }
    }

    /// Opens a watch; over a remote store, with the lease that keeps its change channels
    /// subscribed (drop it with the watch).
    ///
    /// # Errors
    /// As [`NearbyIndex::watch`]; [`crate::error::Error::Unavailable`] when a remote store
    /// does not answer.
    pub async fn watch(
        &self,
        req: &WatchRequest,
        now_ms: i64,
    ) -> Result<(Watch, Option<redis::TagLease>)> {
        match self {
            Self::Memory(i) => Ok((i.watch(req, now_ms)?, None)),
            Self::Redis(r) => r.watch(req, now_ms).await.map(|(w, l)| (w, Some(l))),
        }
    }

    /// Validates a search as received.
    ///
    /// # Errors
    /// [`crate::error::Error::InvalidArgument`] naming `radius_m`, `limit` or
    /// `page_token`.
    pub fn query(&self, req: &SearchRequest) -> Result<Query> {
        match self {
            Self::Memory(i) => i.query(req),
            Self::Redis(r) => r.query(req),
        }
    }

    /// Records a ping.
    ///
    /// # Errors
    /// As [`NearbyIndex::ping`]; [`crate::error::Error::Unavailable`] when a remote store
    /// does not answer.
    pub async fn ping(&self, ping: &Ping, now_ms: i64) -> Result<Placement> {
        match self {
            Self::Memory(i) => i.ping(ping, now_ms),
            Self::Redis(r) => r.ping(ping, now_ms).await,
        }
    }

    /// How many pings of one bulk stream are best under way at once: 1 in memory (a ping
    /// is a few µs of CPU), [`REMOTE_PINGS_IN_FLIGHT`] over Redis / Valkey (a ping waits
    /// for its store round trips, so one stream would otherwise be bound by their latency).
    pub fn pings_in_flight(&self) -> usize {
        match self {
            Self::Memory(_) => 1,
            Self::Redis(_) => REMOTE_PINGS_IN_FLIGHT,
        }
    }

    /// Forgets a user; whether a visible location existed.
    ///
    /// # Errors
    /// [`crate::error::Error::Unavailable`] when a remote store does not answer.
    pub async fn clear(&self, user: &UserId, now_ms: i64) -> Result<bool> {
        match self {
            Self::Memory(i) => Ok(i.clear(user, now_ms)),
            Self::Redis(r) => r.clear(user, now_ms).await,
        }
    }

    /// What is held about a user.
    ///
    /// # Errors
    /// [`crate::error::Error::Unavailable`] when a remote store does not answer.
    pub async fn status(&self, user: &UserId, now_ms: i64) -> Result<Option<LocationStatus>> {
        match self {
            Self::Memory(i) => Ok(i.status(user, now_ms)),
            Self::Redis(r) => r.status(user, now_ms).await,
        }
    }

    /// One page of a validated query.
    ///
    /// # Errors
    /// [`crate::error::Error::Unavailable`] when a remote store does not answer.
    pub async fn search(&self, q: &Query, now_ms: i64) -> Result<SearchPage> {
        match self {
            Self::Memory(i) => Ok(i.search(q, now_ms)),
            Self::Redis(r) => r.search(q, now_ms).await,
        }
    }
}

/// Where Shake pairs: in this process, or through Redis / Valkey with every replica of the
/// store. Cheap to clone.
#[derive(Debug, Clone)]
pub enum ShakeStore {
    /// The in-memory matcher.
    Memory(Arc<Matcher>),
    /// Redis or Valkey, standalone or Cluster.
    Redis(Arc<redis::RedisShake>),
}

impl ShakeStore {
    /// The matcher's configuration.
    pub fn config(&self) -> &ShakeConfig {
        match self {
            Self::Memory(m) => m.config(),
            Self::Redis(r) => r.config(),
        }
    }

    /// Checks a shake as received against the matcher's limits.
    ///
    /// # Errors
    /// [`crate::error::Error::InvalidArgument`] naming `max_distance_m` or
    /// `exclude_user_ids`.
    pub fn validate(&self, req: ShakeRequest) -> Result<ValidShake> {
        ValidShake::new(req, self.config())
    }

    /// Shakes: pairs with the best waiting partner, or waits up to the window.
    ///
    /// # Errors
    /// As [`Matcher::shake`]; [`crate::error::Error::Unavailable`] when a remote store
    /// does not answer.
    pub async fn shake(&self, shake: ValidShake) -> Result<Outcome> {
        match self {
            Self::Memory(m) => m.shake(shake).await,
            Self::Redis(r) => r.shake(shake).await,
        }
    }

    /// Resolves once exactly `n` calls of this replica wait for a partner.
    pub async fn until_waiting(&self, n: usize) {
        match self {
            Self::Memory(m) => m.until_waiting(n).await,
            Self::Redis(r) => r.until_waiting(n).await,
        }
    }

    /// How long before the caller's own deadline a waiting shake gives up, so that it
    /// can still withdraw and answer before the transport's own time-out: a moment in
    /// memory, a few store round trips over Redis / Valkey.
    pub fn deadline_margin(&self) -> std::time::Duration {
        match self {
            Self::Memory(_) => std::time::Duration::from_millis(1),
            Self::Redis(_) => std::time::Duration::from_millis(20),
        }
    }

    /// Calls of this replica waiting for a partner right now.
    pub fn waiting(&self) -> usize {
        match self {
            Self::Memory(m) => m.waiting(),
            Self::Redis(r) => r.waiting(),
        }
    }
}
