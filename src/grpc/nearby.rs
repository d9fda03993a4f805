//! `geomatch.v1.Nearby` adapter: decode, validate, call the index, encode.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use super::{convert, pb, status::overloaded};
use crate::{
    clock::Clock,
    error::Error,
    nearby::{NearbyIndex, Placement, SearchRequest},
    telemetry::names,
};

/// Rejections an `UpdateLocations` summary reports in detail (all are counted).
const MAX_REPORTED_REJECTIONS: usize = 16;

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

    /// Validates and applies one ping (unary or streamed).
    fn ping(&self, req: pb::UpdateLocationRequest) -> Result<Placement, Error> {
        let ping = convert::ping(req)?;
        let placed = self.index.ping(&ping, self.clock.now_ms())?;
        metrics::counter!(names::PINGS).increment(1);
        Ok(placed)
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
        let placed = self.ping(request.into_inner())?;
        tracing::debug!(cell = %placed.cell, "location updated");
        Ok(Response::new(pb::UpdateLocationResponse {
            cell: placed.cell.to_string(),
            expires_at_ms: placed.expires_at_ms,
        }))
    }

    async fn update_locations(
        &self,
        request: Request<Streaming<pb::UpdateLocationRequest>>,
    ) -> Result<Response<pb::UpdateLocationsSummary>, Status> {
        let _permit = self.admit()?;
        let mut stream = request.into_inner();
        let mut summary = pb::UpdateLocationsSummary::default();
        let mut index = 0u64;
        // A transport or decoding error ends the call; the items before it stay applied.
        while let Some(item) = stream.message().await? {
            match self.ping(item) {
                Ok(_) => summary.accepted += 1,
                Err(e) => {
                    summary.rejected += 1;
                    if summary.rejections.len() < MAX_REPORTED_REJECTIONS {
                        let (field, reason) = match e {
                            Error::InvalidArgument { field, reason } => (field, reason),
                            other => ("", other.to_string()),
                        };
                        summary.rejections.push(pb::Rejection {
                            index,
                            field: field.to_string(),
                            reason,
                        });
                    }
                }
            }
            index += 1;
        }
        metrics::counter!(names::PINGS_REJECTED).increment(summary.rejected);
        tracing::debug!(
            accepted = summary.accepted,
            rejected = summary.rejected,
            "bulk update done"
        );
        Ok(Response::new(summary))
    }

    async fn get_location_status(
        &self,
        request: Request<pb::GetLocationStatusRequest>,
    ) -> Result<Response<pb::GetLocationStatusResponse>, Status> {
        let _permit = self.admit()?;
        let user = convert::user_id(&request.get_ref().user_id)?;
        let status = self.index.status(&user, self.clock.now_ms());
        Ok(Response::new(convert::location_status(status)))
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
