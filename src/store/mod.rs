//! Where People Nearby is held: in this process (`--store memory`, the default and the
//! fastest) or in Redis / Valkey ([`redis`]: `--store redis | redis-cluster`), so that any
//! number of replicas serve one world.
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
        SearchRequest,
    },
};

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
