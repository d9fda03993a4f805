//! `geomatch.v1.Nearby` adapter: decode, validate, call the index, encode.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{convert, pb};
use crate::{
    clock::Clock,
    nearby::{NearbyIndex, SearchRequest},
};

/// Serves `geomatch.v1.Nearby` from a [`NearbyIndex`].
#[derive(Debug, Clone)]
pub struct NearbyService {
    index: Arc<NearbyIndex>,
    clock: Arc<dyn Clock>,
}

impl NearbyService {
    /// An adapter over `index`, reading time from `clock`.
    pub fn new(index: Arc<NearbyIndex>, clock: Arc<dyn Clock>) -> Self {
        Self { index, clock }
    }
}

#[tonic::async_trait]
impl pb::nearby_server::Nearby for NearbyService {
    async fn update_location(
        &self,
        request: Request<pb::UpdateLocationRequest>,
    ) -> Result<Response<pb::UpdateLocationResponse>, Status> {
        let req = request.into_inner();
        let user = convert::user_id(&req.user_id)?;
        let position = convert::position(req.position)?;
        let gender = convert::gender(req.gender)?;
        let placed = self
            .index
            .update(user, position, gender, self.clock.now_ms());
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
        let user = convert::user_id(&request.get_ref().user_id)?;
        let existed = self.index.clear(&user, self.clock.now_ms());
        Ok(Response::new(pb::ClearLocationResponse { existed }))
    }

    async fn search_nearby(
        &self,
        request: Request<pb::SearchNearbyRequest>,
    ) -> Result<Response<pb::SearchNearbyResponse>, Status> {
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
        Ok(Response::new(pb::SearchNearbyResponse {
            users: page.users.into_iter().map(convert::found).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}
