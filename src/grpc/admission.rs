//! Admission: one tower layer in front of every service decides whether a call runs at
//! all, before any of its work is done. A call is shed with RESOURCE_EXHAUSTED when it
//! waited longer than `--max-queue-delay` between arriving and being served (overload:
//! better an immediate answer than one nobody waits for, and the queue drains at once when
//! the load drops), or when its service already has its most calls in flight
//! (`--max-concurrent-requests` for Nearby, `--max-concurrent-shakes` for Shake).
//!
//! Health and reflection are always admitted (probes and operators), and so are
//! WatchNearby streams, which `--max-watches` bounds instead.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::Semaphore;
use tonic::{body::Body, codegen::http};
use tower::{Layer, Service};

use super::{
    layer::Arrival,
    status::{overloaded, queued_too_long},
};

/// The admission policy, shared by every connection.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    max_queue: Duration,
    nearby: Arc<Semaphore>,
    shake: Arc<Semaphore>,
}

impl AdmissionLayer {
    /// Admits calls that queued at most `max_queue` (0 = any time), with at most
    /// `max_nearby` Nearby and `max_shakes` Shake calls in flight.
    pub fn new(max_queue: Duration, max_nearby: usize, max_shakes: usize) -> Self {
        Self {
            max_queue,
            nearby: Arc::new(Semaphore::new(max_nearby)),
            shake: Arc::new(Semaphore::new(max_shakes)),
        }
    }

    /// The in-flight limit a call to `path` counts against, and its name in the shed
    /// message; `None` for calls that are always admitted.
    fn limit(&self, path: &str) -> Option<(&Arc<Semaphore>, &'static str)> {
        if path == "/geomatch.v1.Nearby/WatchNearby" {
            None
        } else if path.starts_with("/geomatch.v1.Nearby/") {
            Some((&self.nearby, "requests"))
        } else if path.starts_with("/geomatch.v1.Shake/") {
            Some((&self.shake, "shakes"))
        } else {
            None
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            policy: self.clone(),
            inner,
        }
    }
}

/// A service behind [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct Admission<S> {
    policy: AdmissionLayer,
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Admission<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some((slots, what)) = self.policy.limit(req.uri().path()) else {
            return Box::pin(self.inner.call(req));
        };
        let (slots, max_queue) = (slots.clone(), self.policy.max_queue);
        let arrival = req.extensions().get::<Arrival>().copied();
        // The handler's future is made now but first polled below: the time between the
        // two is the queue this call waited in.
        let handler = self.inner.call(req);
        Box::pin(async move {
            if let Some(Arrival(at)) = arrival {
                let waited = at.elapsed();
                if !max_queue.is_zero() && waited > max_queue {
                    return Ok(queued_too_long(waited, max_queue).into_http());
                }
            }
            let Ok(_permit) = slots.try_acquire() else {
                return Ok(overloaded(what).into_http());
            };
            handler.await
        })
    }
}
