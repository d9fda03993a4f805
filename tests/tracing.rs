//! OpenTelemetry tracing against a real OTLP/gRPC receiver run in-process (the official
//! collector service definitions): a call carrying a W3C `traceparent` produces a server
//! span in the caller's trace, named and attributed by the RPC conventions, with its
//! status; child spans join it; and no span holds a user id, coordinate, cell or token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    build::{SearchExt as _, ping, search, shake},
    fixtures::{SHANGHAI, north_of, privacy_cell},
    start,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// An OTLP trace receiver that hands every span it gets to the test.
struct Receiver(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let _ = self.0.send(span);
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts the receiver on a free loopback port; returns its endpoint and the spans.
async fn receiver() -> (String, mpsc::UnboundedReceiver<Span>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    (format!("http://{addr}"), rx)
}

/// The spans received until `done` holds of them (bounded: a missing span fails).
async fn spans_until(
    rx: &mut mpsc::UnboundedReceiver<Span>,
    done: impl Fn(&[Span]) -> bool,
) -> Vec<Span> {
    let mut got = Vec::new();
    while !done(&got) {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Some(span)) => got.push(span),
            _ => panic!("spans missing; received {got:#?}"),
        }
    }
    got
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn traced<T>(mut req: Request<T>, parent: &str) -> Request<T> {
    req.metadata_mut()
        .insert("traceparent", parent.parse().unwrap());
    req
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_call_makes_a_server_span_in_the_callers_trace_and_nothing_private() {
    let (endpoint, mut rx) = receiver().await;
    // New traces are never sampled here: only the caller's sampled flag makes spans.
    let server = start(&[
        "--otlp-endpoint",
        &endpoint,
        "--trace-sample-ratio",
        "0",
        "--shake-window",
        "100ms",
    ])
    .await;
    let mut c = server.nearby().await;
    let secret_user = "private-user-7731";
    // Untraced: a ratio of 0 keeps nothing of it.
    c.update_location(ping("untraced-user", SHANGHAI))
        .await
        .unwrap();
    let parent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let at = north_of(SHANGHAI, 120.0);
    c.update_location(traced(Request::new(ping(secret_user, at)), &parent))
        .await
        .unwrap();
    let page = c
        .search_nearby(traced(
            Request::new(search("searcher-5521", SHANGHAI).limit(1)),
            &parent,
        ))
        .await
        .unwrap()
        .into_inner();
    let bad = c
        .update_location(traced(
            Request::new(ping(secret_user, (95.0, 0.0))),
            &parent,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let mut s = server.shake().await;
    let req = shake("shaker-0192", "shake-id-77", SHANGHAI);
    let shaken = s
        .shake(traced(Request::new(req), &parent))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shaken.outcome(),
        geomatch::grpc::pb::shake_response::Outcome::NoMatch
    );

    let spans = spans_until(&mut rx, |got| {
        let n = |name: &str| got.iter().filter(|s| s.name == name).count();
        n("geomatch.v1.Nearby/UpdateLocation") >= 2
            && n("geomatch.v1.Nearby/SearchNearby") >= 1
            && n("geomatch.v1.Shake/Shake") >= 1
            && n("geomatch.shake.wait") >= 1
    })
    .await;
    // Every span is in the caller's trace: the untraced call (sent first, so exported
    // first) made none.
    for span in &spans {
        assert_eq!(hex(&span.trace_id), TRACE_ID, "{span:#?}");
    }
    let rpc = |name: &'static str| spans.iter().filter(move |s| s.name == name);
    for span in
        rpc("geomatch.v1.Nearby/UpdateLocation").chain(rpc("geomatch.v1.Nearby/SearchNearby"))
    {
        assert_eq!(hex(&span.parent_span_id), PARENT_ID);
        assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
        assert_eq!(
            attr(span, "rpc.system"),
            Some(&Value::StringValue("grpc".into()))
        );
        assert_eq!(
            attr(span, "rpc.service"),
            Some(&Value::StringValue("geomatch.v1.Nearby".into()))
        );
    }
    let codes: Vec<_> = rpc("geomatch.v1.Nearby/UpdateLocation")
        .map(|s| attr(s, "rpc.grpc.status_code").cloned())
        .collect();
    assert!(codes.contains(&Some(Value::IntValue(0))), "{codes:?}");
    assert!(codes.contains(&Some(Value::IntValue(3))), "{codes:?}");
    // A client's mistake is not the server's error: no error status on either.
    for span in rpc("geomatch.v1.Nearby/UpdateLocation") {
        assert_ne!(span.status.as_ref().map_or(0, |s| s.code), 2, "{span:#?}");
    }
    let search_span = rpc("geomatch.v1.Nearby/SearchNearby").next().unwrap();
    assert_eq!(
        attr(search_span, "rpc.method"),
        Some(&Value::StringValue("SearchNearby".into()))
    );
    // The shake wait is a child of the Shake call's server span.
    let shake_span = rpc("geomatch.v1.Shake/Shake").next().unwrap();
    let wait = rpc("geomatch.shake.wait").next().unwrap();
    assert_eq!(wait.parent_span_id, shake_span.span_id);

    // Nothing private anywhere: ids, coordinates, the cell, the page token.
    let all = format!("{spans:?}");
    let cell = privacy_cell(at).to_string();
    for private in [
        secret_user,
        "searcher-5521",
        "shaker-0192",
        "shake-id-77",
        "31.23",
        "121.47",
        cell.as_str(),
        page.next_page_token.as_str(),
    ] {
        assert!(!private.is_empty());
        assert!(!all.contains(private), "{private:?} found in spans: {all}");
    }
    server.stop().await;
}

/// A collector that is down costs the calls nothing: they are served, and the spans
/// that could not be exported are counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_never_fails_a_call() {
    // A port nothing listens on: bound, then closed.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    // The process's recorder, read directly below (a test binary is one process).
    let recorder = geomatch::telemetry::install_metrics().unwrap();
    let server = start(&["--otlp-endpoint", &endpoint]).await;
    let mut c = server.nearby().await;
    for i in 0..50 {
        c.update_location(ping(&format!("u{i}"), SHANGHAI))
            .await
            .unwrap();
    }
    // Stopping flushes the queue: the export fails (connection refused) and its spans
    // are counted. The recorder is the process's own, so read it directly.
    server.stop().await;
    let body = recorder.render();
    let dropped = body
        .lines()
        .find(|l| l.starts_with("geomatch_trace_spans_dropped_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(dropped >= 50.0, "{body}");
}

/// Over a Redis store, the store calls are client spans under the call's server span,
/// named by command and Function only (never a key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_calls_are_child_spans_named_without_keys() {
    let Some(redis) = common::redis::standalone().await else {
        return;
    };
    let (endpoint, mut rx) = receiver().await;
    let url = redis.url();
    let server = common::start_store(&[
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--otlp-endpoint",
        &endpoint,
    ])
    .await;
    let mut c = server.nearby().await;
    let parent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    c.update_location(traced(
        Request::new(ping("stored-user-4410", SHANGHAI)),
        &parent,
    ))
    .await
    .unwrap();
    let spans = spans_until(&mut rx, |got| {
        got.iter()
            .any(|s| s.name == "geomatch.v1.Nearby/UpdateLocation")
            && got.iter().any(|s| s.name.starts_with("FCALL gm_"))
    })
    .await;
    let rpc = spans
        .iter()
        .find(|s| s.name == "geomatch.v1.Nearby/UpdateLocation")
        .unwrap();
    let store: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("FCALL ") && hex(&s.trace_id) == TRACE_ID)
        .collect();
    assert!(!store.is_empty(), "{spans:#?}");
    for s in &store {
        assert_eq!(s.parent_span_id, rpc.span_id, "{s:#?}");
        assert_eq!(s.kind, 3, "SPAN_KIND_CLIENT");
        assert_eq!(
            attr(s, "db.system.name"),
            Some(&Value::StringValue("redis".into()))
        );
    }
    let all = format!("{spans:?}");
    assert!(!all.contains("stored-user-4410"), "{all}");
    assert!(!all.contains("gm1:"), "a key in a span: {all}");
    server.stop().await;
}
