//! Per-RPC instrumentation for every service: the conventional `grpc_server_*` series, a
//! `rpc` log span with method, status code and latency, and (with `--otlp-endpoint`) an
//! OpenTelemetry server span continuing the caller's trace. Labels are static strings
//! looked up from the path, so recording allocates nothing.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use opentelemetry::{context::FutureExt as _, propagation::Extractor};

use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::{Instrument as _, field::Empty};

pub use crate::telemetry::names::code_name;
use crate::telemetry::{names, trace::Tracing};

/// Wraps a service with [`RpcService`].
#[derive(Debug, Clone, Default)]
pub struct RpcLayer {
    tracing: Option<Arc<Tracing>>,
}

impl RpcLayer {
    /// Instruments every call; with `tracing`, each also gets a server span.
    pub fn new(tracing: Option<Arc<Tracing>>) -> Self {
        Self { tracing }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            tracing: self.tracing.clone(),
        }
    }
}

/// A call's HTTP/2 headers, read by the W3C trace-context propagator.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// When the server took a call off the connection: admission compares it with the time
/// the call is first served, to shed calls that queued too long (see
/// [`AdmissionLayer`](super::admission::AdmissionLayer)).
#[derive(Debug, Clone, Copy)]
pub struct Arrival(pub Instant);

/// Records metrics and a span around each call of the inner service.
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    tracing: Option<Arc<Tracing>>,
}

/// `(path, service, method, type)` of every RPC served.
const KNOWN: &[(&str, &str, &str, &str)] = &[
    (
        "/geomatch.v1.Nearby/UpdateLocation",
        "geomatch.v1.Nearby",
        "UpdateLocation",
        "unary",
    ),
    (
        "/geomatch.v1.Nearby/ClearLocation",
        "geomatch.v1.Nearby",
        "ClearLocation",
        "unary",
    ),
    (
        "/geomatch.v1.Nearby/SearchNearby",
        "geomatch.v1.Nearby",
        "SearchNearby",
        "unary",
    ),
    (
        "/geomatch.v1.Nearby/UpdateLocations",
        "geomatch.v1.Nearby",
        "UpdateLocations",
        "client_stream",
    ),
    (
        "/geomatch.v1.Nearby/GetLocationStatus",
        "geomatch.v1.Nearby",
        "GetLocationStatus",
        "unary",
    ),
    (
        "/geomatch.v1.Nearby/WatchNearby",
        "geomatch.v1.Nearby",
        "WatchNearby",
        "server_stream",
    ),
    (
        "/geomatch.v1.Shake/Shake",
        "geomatch.v1.Shake",
        "Shake",
        "unary",
    ),
    (
        "/grpc.health.v1.Health/Check",
        "grpc.health.v1.Health",
        "Check",
        "unary",
    ),
    (
        "/grpc.health.v1.Health/Watch",
        "grpc.health.v1.Health",
        "Watch",
        "server_stream",
    ),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
];

fn classify(path: &str) -> (&'static str, &'static str, &'static str) {
    KNOWN
        .iter()
        .find(|(p, ..)| *p == path)
        .map_or(("unknown", "unknown", "unknown"), |&(_, s, m, t)| (s, m, t))
}

impl<S, B, RB> Service<http::Request<B>> for RpcService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(Arrival(Instant::now()));
        let (service, method, kind) = classify(req.uri().path());
        metrics::counter!(names::GRPC_STARTED, "grpc_type" => kind, "grpc_service" => service, "grpc_method" => method)
            .increment(1);
        let span = tracing::debug_span!("rpc", service, method, code = Empty, latency_us = Empty);
        let started = Instant::now();
        let otel = self
            .tracing
            .as_ref()
            .map(|t| t.rpc(service, method, &Headers(req.headers())));
        let fut = self.inner.call(req).instrument(span.clone());
        let cx = otel.as_ref().map(|o| o.context());
        Box::pin(async move {
            let res = match cx {
                // The handler runs in the span's context, so its child spans join the trace.
                Some(cx) => fut.with_context(cx).await,
                None => fut.await,
            };
            let number = match &res {
                // Errors travel in the headers ("trailers-only"); a unary success has none.
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                Err(_) => 13,
            };
            let code = code_name(number);
            if let Some(otel) = otel {
                otel.end(number);
            }
            let elapsed = started.elapsed();
            metrics::counter!(names::GRPC_HANDLED, "grpc_type" => kind, "grpc_service" => service, "grpc_method" => method, "grpc_code" => code)
                .increment(1);
            metrics::histogram!(names::GRPC_HANDLING_SECONDS, "grpc_type" => kind, "grpc_service" => service, "grpc_method" => method)
                .record(elapsed.as_secs_f64());
            if code == "OK" {
                metrics::histogram!(names::ACCEPTED_SECONDS, "grpc_method" => method)
                    .record(elapsed.as_secs_f64());
            }
            span.record("code", code);
            span.record("latency_us", elapsed.as_micros() as u64);
            tracing::debug!(parent: &span, "rpc finished");
            res
        })
    }
}
