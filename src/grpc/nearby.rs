//! `geomatch.v1.Nearby` adapter: decode, validate, call the index, encode.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming, codegen::http};

use super::{convert, pb, status::overloaded};
use crate::{
    clock::Clock,
    error::Error,
    guard::Limits,
    nearby::{NearbyIndex, Placement, Watch, WatchEnd, WatchEvent, WatchRequest},
    telemetry::names,
};

/// A WatchNearby response stream. Dropping it (the client went away) closes the watch.
#[derive(Debug)]
pub struct WatchStream(Watch);

impl tokio_stream::Stream for WatchStream {
    type Item = Result<pb::NearbyEvent, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use pb::nearby_event::Kind;
        self.0.poll_event(cx).map(|event| {
            event.map(|e| match e {
                Ok(WatchEvent::Enter(f)) => Ok(pb::NearbyEvent {
                    kind: Kind::Enter.into(),
                    user: Some(convert::found(f)),
                }),
                Ok(WatchEvent::Leave(f)) => Ok(pb::NearbyEvent {
                    kind: Kind::Leave.into(),
                    user: Some(convert::found(f)),
                }),
                Ok(WatchEvent::SnapshotEnd) => Ok(pb::NearbyEvent {
                    kind: Kind::SnapshotEnd.into(),
                    user: None,
                }),
                Err(end @ WatchEnd::Overflow(_)) => {
                    metrics::counter!(names::WATCH_OVERFLOWS).increment(1);
                    Err(Status::resource_exhausted(end.to_string()))
                }
                Err(end @ WatchEnd::Closing) => Err(Status::unavailable(end.to_string())),
            })
        })
    }
}

/// The user's indexed position, for the travel check (not looked up when it is off).
pub(super) fn known(
    index: &NearbyIndex,
    limits: &Limits,
    user: &crate::id::UserId,
    now_ms: i64,
) -> crate::guard::Known {
    if limits.checks_travel() {
        index.known_position(user, now_ms)
    } else {
        None
    }
}

/// Rejections an `UpdateLocations` summary reports in detail (all are counted).
const MAX_REPORTED_REJECTIONS: usize = 16;

/// Serves `geomatch.v1.Nearby` from a [`NearbyIndex`].
#[derive(Debug, Clone)]
pub struct NearbyService {
    index: Arc<NearbyIndex>,
    limits: Arc<Limits>,
    clock: Arc<dyn Clock>,
    in_flight: Arc<Semaphore>,
    max_queue: std::time::Duration,
}

impl NearbyService {
    /// An adapter over `index`, reading time from `clock`, serving at most `max_in_flight`
    /// calls at once (more are shed with RESOURCE_EXHAUSTED).
    pub fn new(
        index: Arc<NearbyIndex>,
        limits: Arc<Limits>,
        clock: Arc<dyn Clock>,
        max_in_flight: usize,
        max_queue: std::time::Duration,
    ) -> Self {
        Self {
            index,
            limits,
            clock,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_queue,
        }
    }

    /// Validates and applies one ping (unary or streamed).
    fn ping(&self, req: pb::UpdateLocationRequest) -> Result<Placement, Error> {
        let ping = convert::ping(req)?;
        self.index.ping_ttl_ms(&ping)?;
        let now = self.clock.now_ms();
        let known = known(&self.index, &self.limits, &ping.user, now);
        self.limits.ping(&ping.user, &ping.position, now, known)?;
        let placed = self.index.ping(&ping, now)?;
        metrics::counter!(names::PINGS).increment(1);
        Ok(placed)
    }

    fn admit(
        &self,
        extensions: &http::Extensions,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        super::layer::admit(extensions, self.max_queue)?;
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
        let _permit = self.admit(request.extensions())?;
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
        let _permit = self.admit(request.extensions())?;
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
                        summary.rejections.push(pb::Rejection {
                            index,
                            field: e.field().unwrap_or_default().to_string(),
                            reason: e.reason(),
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

    type WatchNearbyStream = WatchStream;

    async fn watch_nearby(
        &self,
        request: Request<pb::WatchNearbyRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let req = request.into_inner();
        let watch = WatchRequest {
            watcher: convert::user_id(&req.user_id)?,
            radius_m: req.radius_m,
            gender: convert::gender(req.gender)?,
        };
        let watch = self.index.watch(&watch, self.clock.now_ms())?;
        metrics::counter!(names::WATCHES_OPENED).increment(1);
        Ok(Response::new(WatchStream(watch)))
    }

    async fn get_location_status(
        &self,
        request: Request<pb::GetLocationStatusRequest>,
    ) -> Result<Response<pb::GetLocationStatusResponse>, Status> {
        let _permit = self.admit(request.extensions())?;
        let user = convert::user_id(&request.get_ref().user_id)?;
        let status = self.index.status(&user, self.clock.now_ms());
        Ok(Response::new(convert::location_status(status)))
    }

    async fn clear_location(
        &self,
        request: Request<pb::ClearLocationRequest>,
    ) -> Result<Response<pb::ClearLocationResponse>, Status> {
        let _permit = self.admit(request.extensions())?;
        let user = convert::user_id(&request.get_ref().user_id)?;
        let existed = self.index.clear(&user, self.clock.now_ms());
        metrics::counter!(names::CLEARS).increment(1);
        Ok(Response::new(pb::ClearLocationResponse { existed }))
    }

    async fn search_nearby(
        &self,
        request: Request<pb::SearchNearbyRequest>,
    ) -> Result<Response<pb::SearchNearbyResponse>, Status> {
        let _permit = self.admit(request.extensions())?;
        let req = request.into_inner();
        let query = convert::search(req)?;
        let now = self.clock.now_ms();
        let page = self.index.search(&query, now)?;
        // Limits apply to valid requests only (a rejected one leaves no trace); a refused
        // search returns nothing.
        let known = known(&self.index, &self.limits, &query.searcher, now);
        self.limits
            .search(&query.searcher, &query.centre, now, known)?;
        metrics::counter!(names::SEARCHES).increment(1);
        Ok(Response::new(pb::SearchNearbyResponse {
            users: page.users.into_iter().map(convert::found).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}
