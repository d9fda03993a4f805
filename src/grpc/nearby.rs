//! `geomatch.v1.Nearby` adapter: decode, validate, call the index, encode.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use super::{convert, pb, status::overloaded};
use crate::{
    clock::Clock,
    nearby::{NearbyIndex, SearchRequest},
    telemetry::names,
};

/// Serves `geomatch.v1.Nearby` from a [`NearbyIndex`].
#[derive(Debug, Clone)]
pub struct NearbyService {
    index: Arc<NearbyIndex>,
    clock: Arc<dyn Clock>,
    in_flight: Arc<Semaphore>,
}

impl NearbyService {
    /// An adapter over `index`, reading time from `clock`, serving at most `max_in_flight`
    /// calls at once (more are shed with RESOURCE_EXHAUSTED).
    pub fn new(index: Arc<NearbyIndex>, clock: Arc<dyn Clock>, max_in_flight: usize) -> Self {
        Self {
            index,
            clock,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        self.in_flight
            .try_acquire()
            .map_err(|_| overloaded("requests"))
    }
}

#[tonic::async_trait]
impl pb::nearby_server::Nearby for NearbyService {
    async fn update_location(
        &self,
        request: Request<pb::UpdateLocationRequest>,
    ) -> Result<Response<pb::UpdateLocationResponse>, Status> {
        let _permit = self.admit()?;
        let req = request.into_inner();
        let user = convert::user_id(&req.user_id)?;
        let position = convert::position(req.position)?;
        let gender = convert::gender(req.gender)?;
        let placed = self
            .index
            .update(user, position, gender, self.clock.now_ms());
        metrics::counter!(names::PINGS).increment(1);
        tracing::debug!(cell = %placed.cell, "location updated");
        Ok(Response::new(pb::UpdateLocationResponse {
            cell: placed.cell.to_string(),
            expires_at_ms: placed.expires_at_ms,
        }))
    }

    async fn clear_location(
        &self,
        request: Request<pb::ClearLocationRequest>,
    ) -> Result<Response<pb::ClearLocationResponse>, Status> {
        let _permit = self.admit()?;
        let user = convert::user_id(&request.get_ref().user_id)?;
        let existed = self.index.clear(&user, self.clock.now_ms());
        metrics::counter!(names::CLEARS).increment(1);
        Ok(Response::new(pb::ClearLocationResponse { existed }))
    }

    async fn search_nearby(
        &self,
        request: Request<pb::SearchNearbyRequest>,
    ) -> Result<Response<pb::SearchNearbyResponse>, Status> {
        let _permit = self.admit()?;
        let req = request.into_inner();
        let query = SearchRequest {
            searcher: convert::user_id(&req.user_id)?,
            centre: convert::position(req.position)?,
            radius_m: req.radius_m,
            limit: req.limit,
            gender: convert::gender(req.gender)?,
            page_token: req.page_token,
        };
        let page = self.index.search(&query, self.clock.now_ms())?;
        metrics::counter!(names::SEARCHES).increment(1);
        Ok(Response::new(pb::SearchNearbyResponse {
            users: page.users.into_iter().map(convert::found).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}
