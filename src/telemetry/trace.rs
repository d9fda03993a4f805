//! Distributed tracing with OpenTelemetry: one server span per RPC, continuing the
//! caller's W3C trace context, with child spans where time goes (store calls, the shake
//! wait, snapshot writes); exported over OTLP/gRPC by the official exporter.
//!
//! Off unless `--otlp-endpoint` is given, and then free: no span is made, no context is
//! read ([`child`] checks one atomic first).
//!
//! Export never slows or fails a call: an ended span is handed to a bounded queue with
//! `try_send` (a full queue drops the span and counts it in
//! `geomatch_trace_spans_dropped_total`), and one background task exports the queue in
//! batches, each bounded by a timeout. The SDK's own batch processor does the same on a
//! thread of its own, but keeps its drop count to itself; operators need it as a metric.
//!
//! Privacy: spans carry the RPC's service, method and status code, the store command's
//! name, and nothing about a user: no id, coordinate, cell, token or key.

use std::{
    borrow::Cow,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

pub use opentelemetry::trace::SpanKind as Kind;
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, TextMapPropagator as _},
    trace::{SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor},
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::names;

/// Where spans go and how many are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// The OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// The share of new traces sampled, `0..=1`; a caller's sampled flag is followed
    /// (parent-based).
    pub sample_ratio: f64,
}

/// Why tracing could not start.
#[derive(Debug, Error)]
pub enum TraceError {
    /// The exporter could not be built (a bad endpoint, or no async runtime).
    #[error("building the OTLP exporter for {endpoint}: {reason}")]
    Exporter {
        /// The endpoint given.
        endpoint: String,
        /// What the exporter said.
        reason: String,
    },
}

/// Spans ended but not yet exported, at most; more are dropped and counted.
const QUEUE: usize = 2_048;
/// Spans in one export request, at most.
const BATCH: usize = 512;
/// How long one export may take before it is abandoned (its spans counted as dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Tracers alive in this process: [`child`] makes no span and reads no context while
/// there are none.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// A running tracer: its provider, and the task exporting its spans.
#[derive(Debug)]
pub struct Tracing {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    /// Tells the export task to close the queue, and the task itself: taken at shutdown.
    exporting: Mutex<Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
}

/// The tracer of the RPC a task serves, kept in its context so child spans need no
/// handle passed down.
#[derive(Debug, Clone)]
struct Current(SdkTracer);

impl Tracing {
    /// Starts exporting to `cfg.endpoint`. Must run inside a tokio runtime (the exporter's
    /// channel and the export task live on it). The collector need not be up: the
    /// channel connects lazily and retries with each batch.
    ///
    /// # Errors
    /// [`TraceError::Exporter`] when the endpoint is unusable or there is no runtime.
    pub fn start(cfg: &TraceConfig) -> Result<Arc<Self>, TraceError> {
        let fail = |reason: String| TraceError::Exporter {
            endpoint: cfg.endpoint.clone(),
            reason,
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| fail(e.to_string()))?;
        let exporter = {
            let _inside = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|e| fail(e.to_string()))?
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let (stop, stopped) = oneshot::channel();
        let exporting = runtime.spawn(export(rx, stopped, exporter));
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_span_processor(Queue { tx })
            .with_resource(Resource::builder().with_service_name("geomatch").build())
            .build();
        let tracer = provider.tracer("geomatch");
        LIVE.fetch_add(1, Ordering::AcqRel);
        Ok(Arc::new(Self {
            tracer,
            provider,
            exporting: Mutex::new(Some((stop, exporting))),
        }))
    }

    /// The server span of one RPC, continuing the trace `headers` carry (W3C
    /// `traceparent` / `tracestate`), named and attributed by the OpenTelemetry RPC
    /// conventions.
    pub fn rpc(
        &self,
        service: &'static str,
        method: &'static str,
        headers: &dyn Extractor,
    ) -> RpcSpan {
        let parent = TraceContextPropagator::new().extract(headers);
        let span = self
            .tracer
            .span_builder(format!("{service}/{method}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service),
                KeyValue::new("rpc.method", method),
            ])
            .start_with_context(&self.tracer, &parent);
        RpcSpan {
            cx: parent
                .with_span(span)
                .with_value(Current(self.tracer.clone())),
        }
    }

    /// A span of work no call asked for (a snapshot write), in a trace of its own.
    pub fn background(&self, name: &'static str) -> ChildSpan {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .start(&self.tracer);
        ChildSpan {
            cx: Context::new().with_span(span),
        }
    }

    /// Ends tracing: the queue is closed and what it holds is exported (bounded by the
    /// export timeout).
    pub async fn shutdown(&self) {
        let _ = self.provider.shutdown();
        let exporting = self
            .exporting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((stop, task)) = exporting {
            // The task closes the queue and ends once it has sent what is left.
            let _ = stop.send(());
            let _ = tokio::time::timeout(EXPORT_TIMEOUT * 2, task).await;
        }
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The server span of one RPC and the context its handler runs in.
#[derive(Debug)]
pub struct RpcSpan {
    cx: Context,
}

impl RpcSpan {
    /// The context to run the handler in, so its child spans join this trace.
    pub fn context(&self) -> Context {
        self.cx.clone()
    }

    /// Ends the span with the call's gRPC status code. Server-side faults (UNKNOWN,
    /// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) mark it as an
    /// error, as the RPC conventions say; a client's mistake does not.
    pub fn end(self, code: i32) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
        if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
            span.set_status(Status::error(super::names::code_name(code)));
        }
        span.end();
    }
}

/// A child span, ended when dropped.
#[derive(Debug)]
pub struct ChildSpan {
    cx: Context,
}

impl ChildSpan {
    /// The context to run the spanned work in, so store calls inside it nest under it.
    pub fn context(&self) -> Context {
        self.cx.clone()
    }

    /// Adds an attribute (a static fact of the operation, never a user's data).
    pub fn attribute(&self, key: &'static str, value: &'static str) {
        self.cx.span().set_attribute(KeyValue::new(key, value));
    }

    /// Marks the operation as failed, with a short reason that names no user.
    pub fn failed(&self, reason: &'static str) {
        self.cx.span().set_status(Status::error(reason));
    }
}

impl Drop for ChildSpan {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// A child span of the RPC the current task serves, named by `name` (called only when a
/// span is made); `None` when tracing is off (then it costs one atomic load) or the task
/// serves no traced RPC.
pub fn child(kind: SpanKind, name: impl FnOnce() -> Cow<'static, str>) -> Option<ChildSpan> {
    if LIVE.load(Ordering::Acquire) == 0 {
        return None;
    }
    let cx = Context::current();
    let tracer = cx.get::<Current>()?.0.clone();
    let span = tracer
        .span_builder(name())
        .with_kind(kind)
        .start_with_context(&tracer, &cx);
    Some(ChildSpan {
        cx: cx.with_span(span),
    })
}

/// The span processor: hands each ended, sampled span to the export queue without
/// waiting (and without a lock), dropping and counting it when the queue is full or
/// closed.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<SpanData>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            metrics::counter!(names::TRACE_SPANS_DROPPED).increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // The export task closes the queue ([`Tracing::shutdown`]).
        Ok(())
    }
}

/// Exports the queue in batches; once `stop` fires, closes it and exports what it holds.
/// A batch that fails or times out is dropped and counted: the collector's outage is not
/// the calls' problem.
async fn export(
    mut rx: mpsc::Receiver<SpanData>,
    mut stop: oneshot::Receiver<()>,
    exporter: opentelemetry_otlp::SpanExporter,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut warned = false;
    let mut closed = false;
    loop {
        let n = if closed {
            rx.recv_many(&mut batch, BATCH).await
        } else {
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => n,
                _ = &mut stop => {
                    rx.close();
                    closed = true;
                    continue;
                }
            }
        };
        if n == 0 {
            break;
        }
        let spans = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
        let n = spans.len() as u64;
        let failed = match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {EXPORT_TIMEOUT:?}")),
        };
        if let Some(reason) = failed {
            metrics::counter!(names::TRACE_SPANS_DROPPED).increment(n);
            // One warning per outage, not one per batch.
            if !warned {
                tracing::warn!(error = %reason, "span export failed: spans dropped until the collector answers");
                warned = true;
            }
        } else {
            warned = false;
        }
    }
}
