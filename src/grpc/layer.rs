//! Per-RPC instrumentation for every service: the conventional `grpc_server_*` series and a
//! `rpc` tracing span with method, status code and latency. Labels are static strings
//! looked up from the path, so recording allocates nothing.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::{Instrument as _, field::Empty};

use crate::telemetry::names;

/// Wraps a service with [`RpcService`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcLayer;

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService { inner }
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

/// The conventional name of a gRPC status code, as `grpc_code` label values use.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
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
        let fut = self.inner.call(req).instrument(span.clone());
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                // Errors travel in the headers ("trailers-only"); a unary success has none.
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .map_or("OK", code_name),
                Err(_) => "Internal",
            };
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
