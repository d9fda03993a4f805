//! `geomatch.v1.Shake` adapter. The handler future is dropped when the client cancels or
//! its `grpc-timeout` passes (tonic enforces it server-side), which withdraws the waiting
//! shake at once.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{convert, pb};
use crate::shake::{Matcher, ShakeRequest};

/// Serves `geomatch.v1.Shake` from a [`Matcher`].
#[derive(Debug, Clone)]
pub struct ShakeService {
    matcher: Arc<Matcher>,
}

impl ShakeService {
    /// An adapter over `matcher`.
    pub fn new(matcher: Arc<Matcher>) -> Self {
        Self { matcher }
    }
}

#[tonic::async_trait]
impl pb::shake_server::Shake for ShakeService {
    async fn shake(
        &self,
        request: Request<pb::ShakeRequest>,
    ) -> Result<Response<pb::ShakeResponse>, Status> {
        let req = request.into_inner();
        let shake = ShakeRequest {
            user: convert::user_id(&req.user_id)?,
            position: convert::position(req.position)?,
            shake_id: convert::shake_id(&req.shake_id)?,
            max_distance_m: req.max_distance_m,
            exclude: convert::excludes(&req.exclude_user_ids)?,
            deadline: None,
        };
        let outcome = self.matcher.shake(shake).await?;
        Ok(Response::new(convert::outcome(outcome)))
    }
}
