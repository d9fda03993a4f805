//! `geomatch.v1.Nearby` adapter. Every handler runs in one order: decode and validate into
//! a domain request ([`convert`]), guard (rate limit, travel check), act on the index,
//! encode. A refused request costs no index work. Admission (load shedding) happened
//! before, in [`AdmissionLayer`](super::admission::AdmissionLayer).

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::{bulk, convert, pb};
use crate::{
    clock::Clock,
    error::Error,
    guard::Limits,
    nearby::{Placement, Watch, WatchEnd, WatchEvent},
    store::{NearbyStore, redis::TagLease},
    telemetry::names,
};

/// A WatchNearby response stream. Dropping it (the client went away) closes the watch.
#[derive(Debug)]
pub struct WatchStream {
    watch: Watch,
    /// Over a remote store: keeps the watch's change channels subscribed.
    _lease: Option<TagLease>,
}

impl tokio_stream::Stream for WatchStream {
    type Item = Result<pb::NearbyEvent, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use pb::nearby_event::Kind;
        self.watch.poll_event(cx).map(|event| {
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

/// Serves `geomatch.v1.Nearby` from a [`NearbyStore`].
#[derive(Debug, Clone)]
pub struct NearbyService {
    store: NearbyStore,
    limits: Arc<Limits>,
    clock: Arc<dyn Clock>,
}

impl NearbyService {
    /// An adapter over `store`, guarded by `limits`, reading time from `clock`.
    pub fn new(store: NearbyStore, limits: Arc<Limits>, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            limits,
            clock,
        }
    }

    /// Validates, guards and applies one ping (unary or streamed).
    async fn ping(&self, req: pb::UpdateLocationRequest) -> Result<Placement, Error> {
        let ping = convert::ping(req, &self.store.config().ttl)?;
        let now = self.clock.now_ms();
        self.limits.ping(&ping.user, &ping.position, now)?;
        let placed = self.store.ping(&ping, now).await?;
        metrics::counter!(names::PINGS).increment(1);
        Ok(placed)
    }
}

#[tonic::async_trait]
impl pb::nearby_server::Nearby for NearbyService {
    async fn update_location(
        &self,
        request: Request<pb::UpdateLocationRequest>,
    ) -> Result<Response<pb::UpdateLocationResponse>, Status> {
        let placed = self.ping(request.into_inner()).await?;
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
        let stream = request.into_inner();
        // One after another in memory; over a remote store several at once (each waits
        // for its round trips), never two of one user (`bulk`).
        let summary = match self.store.pings_in_flight() {
            0 | 1 => bulk::in_order(stream, |item| self.ping(item)).await?,
            n => {
                let this = self.clone();
                bulk::overlapped(
                    stream,
                    n,
                    |item: &pb::UpdateLocationRequest| item.user_id.clone(),
                    move |item| {
                        let this = this.clone();
                        async move { this.ping(item).await }
                    },
                )
                .await?
            }
        };
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
        let req = convert::watch(request.get_ref(), &self.store.config().radius)?;
        let (watch, lease) = self.store.watch(&req, self.clock.now_ms()).await?;
        metrics::counter!(names::WATCHES_OPENED).increment(1);
        Ok(Response::new(WatchStream {
            watch,
            _lease: lease,
        }))
    }

    async fn get_location_status(
        &self,
        request: Request<pb::GetLocationStatusRequest>,
    ) -> Result<Response<pb::GetLocationStatusResponse>, Status> {
        let user = convert::user_id(&request.get_ref().user_id)?;
        let status = self.store.status(&user, self.clock.now_ms()).await?;
        Ok(Response::new(convert::location_status(status)))
    }

    async fn clear_location(
        &self,
        request: Request<pb::ClearLocationRequest>,
    ) -> Result<Response<pb::ClearLocationResponse>, Status> {
        let user = convert::user_id(&request.get_ref().user_id)?;
        let existed = self.store.clear(&user, self.clock.now_ms()).await?;
        metrics::counter!(names::CLEARS).increment(1);
        Ok(Response::new(pb::ClearLocationResponse { existed }))
    }

    async fn search_nearby(
        &self,
        request: Request<pb::SearchNearbyRequest>,
    ) -> Result<Response<pb::SearchNearbyResponse>, Status> {
        let query = convert::search(request.into_inner(), &self.store)?;
        let now = self.clock.now_ms();
        // Limits apply to valid requests only (a rejected one leaves no trace), and before
        // the search: a refused one costs no search work.
        if let NearbyStore::Redis(remote) = &self.store {
            // Shared by every replica over the store, not one bucket per replica.
            let cfg = self.limits.search.config();
            remote
                .rate_limit("SearchNearby", &query.searcher, cfg, now)
                .await?;
        }
        self.limits.search(&query.searcher, &query.centre, now)?;
        let page = self.store.search(&query, now).await?;
        metrics::counter!(names::SEARCHES).increment(1);
        Ok(Response::new(pb::SearchNearbyResponse {
            users: page.users.into_iter().map(convert::found).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}
