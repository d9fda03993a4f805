//! Server plumbing over real gRPC: health, reflection (v1 and v1alpha), graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    build::{ping, search, shake},
    fixtures::SHANGHAI,
    http_get, process, start,
};
use geomatch::grpc::pb;
use tokio_stream::StreamExt as _;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test]
async fn health_reports_serving_for_each_service() {
    let server = start(&[]).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "geomatch.v1.Nearby", "geomatch.v1.Shake"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_services_in_v1alpha_and_v1() {
    let server = start(&[]).await;
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut c = ServerReflectionClient::new(server.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = c
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected {resp:?}");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "geomatch.v1.Nearby",
            "geomatch.v1.Shake",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    }
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut c = ServerReflectionClient::new(server.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "geomatch.v1.Nearby".into(),
            )),
        };
        let mut stream = c
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.next().await.unwrap().unwrap();
        assert!(
            matches!(resp.message_response, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
            "{resp:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_calls_finish() {
    let server = start(&["--shake-window", "200ms"]).await;
    let call = server.waiting_shake(shake("alice", "s", SHANGHAI)).await;
    server.stop().await;
    let r = call.await.unwrap().unwrap();
    assert_eq!(r.outcome(), pb::shake_response::Outcome::NoMatch);
}

/// GET over plain HTTP/1.1; returns the body.
#[tokio::test]
async fn metrics_expose_grpc_and_domain_series() {
    let server = start(&["--metrics-listen", "127.0.0.1:0"]).await;
    let mut c = server.nearby().await;
    c.update_location(ping("alice", SHANGHAI)).await.unwrap();
    let bad = c.update_location(ping("alice", (95.0, SHANGHAI.1))).await;
    assert!(bad.is_err());
    c.search_nearby(search("bob", SHANGHAI)).await.unwrap();
    let body = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    for needle in [
        r#"grpc_server_started_total{grpc_type="unary",grpc_service="geomatch.v1.Nearby",grpc_method="UpdateLocation"}"#,
        r#"grpc_server_handled_total{grpc_type="unary",grpc_service="geomatch.v1.Nearby",grpc_method="UpdateLocation",grpc_code="OK"}"#,
        r#"grpc_server_handled_total{grpc_type="unary",grpc_service="geomatch.v1.Nearby",grpc_method="UpdateLocation",grpc_code="InvalidArgument"}"#,
        r#"grpc_server_handling_seconds_bucket{grpc_type="unary",grpc_service="geomatch.v1.Nearby",grpc_method="SearchNearby",le="0.001"}"#,
        "geomatch_indexed_users 1",
        "geomatch_occupied_cells 1",
        "geomatch_waiting_shakes 0",
        "geomatch_pings_total",
        "geomatch_searches_total",
        r#"geomatch_rejections_total{reason="position.lat"}"#,
    ] {
        assert!(body.contains(needle), "{needle} missing from:\n{body}");
    }
    server.stop().await;
}

#[tokio::test]
async fn calls_beyond_the_concurrency_limit_are_shed_at_once() {
    let server = start(&["--max-concurrent-shakes", "1", "--shake-window", "30s"]).await;
    let req = |user: &str| pb::ShakeRequest {
        max_distance_m: 1.0,
        exclude_user_ids: vec!["x".into()],
        ..shake(user, "s", SHANGHAI)
    };
    let first = server.waiting_shake(req("alice")).await;
    let mut b = server.shake().await;
    let err = b.shake(req("bob")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    first.abort();
    server.stop().await;
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    let server = start(&["--max-message-bytes", "2048"]).await;
    let mut c = server.shake().await;
    let err = c
        .shake(pb::ShakeRequest {
            exclude_user_ids: (0..40).map(|i| format!("{i:0100}")).collect(),
            ..shake("alice", "s", SHANGHAI)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert_eq!(server.app.matcher.waiting(), 0);
    server.stop().await;
}

#[tokio::test]
async fn health_turns_not_serving_when_the_drain_starts() {
    let server = start(&["--shake-window", "300ms", "--drain-timeout", "1s"]).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "geomatch.v1.Nearby".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    // Keep a call in flight so the drain lasts a moment.
    let call = server.waiting_shake(shake("alice", "s", SHANGHAI)).await;
    let stopping = tokio::spawn(server.stop());
    let next = watch.next().await.unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    assert!(
        call.await.unwrap().is_ok(),
        "in-flight calls finish during the drain"
    );
    stopping.await.unwrap();
}

#[tokio::test]
async fn calls_that_queued_too_long_are_shed_at_once() {
    // A limit no call can meet: every call is shed, with a message saying why.
    let server = start(&["--max-queue-delay", "1ns"]).await;
    let mut c = server.nearby().await;
    let err = c
        .search_nearby(search("alice", SHANGHAI))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("waited"), "{err:?}");
    let mut s = server.shake().await;
    let err = s.shake(shake("alice", "s", SHANGHAI)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(server.app.nearby.len(), 0);
    server.stop().await;
}

/// Text logs written to a pipe (not a terminal) carry no ANSI colour escapes.
#[tokio::test]
async fn logs_to_a_pipe_are_plain_text() {
    let mut lines = 0;
    let server = process::spawn_logging(&["--log-format", "text"], &[], |line| {
        lines += 1;
        assert!(!line.contains('\u{1b}'), "colour escape in {line:?}");
    })
    .await;
    assert!(lines > 0);
    // And it serves: the address read from the plain text line is the real one.
    let mut health = HealthClient::new(server.channel().await);
    let resp = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(resp.into_inner().status(), ServingStatus::Serving);
}

/// A request body that is not a protobuf message is the client's fault: INVALID_ARGUMENT
/// naming the request, counted as such, never INTERNAL (which server-error alerts page on).
#[tokio::test]
async fn an_undecodable_request_is_invalid_argument_not_internal() {
    let server = start(&["--metrics-listen", "127.0.0.1:0"]).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(format!(
        "http://{}/geomatch.v1.Nearby/UpdateLocation",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, mut body) = client.send_request(req, false).unwrap();
    // One uncompressed gRPC frame of 5 bytes: "hello".
    body.send_data(
        bytes::Bytes::from_static(b"\x00\x00\x00\x00\x05hello"),
        true,
    )
    .unwrap();
    let response = response.await.unwrap();
    // A trailers-only answer carries the status in its headers, others in trailers.
    let mut trailers = response.headers().clone();
    let mut recv = response.into_body();
    while let Some(chunk) = recv.data().await {
        chunk.unwrap();
    }
    if let Some(t) = recv.trailers().await.unwrap() {
        trailers.extend(t);
    }
    let status = trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let message = trailers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        status, "3",
        "grpc-status (3 = INVALID_ARGUMENT); message {message:?}"
    );
    assert!(message.starts_with("request"), "{message}");
    let body = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert!(
        body.contains(r#"grpc_method="UpdateLocation",grpc_code="InvalidArgument"} 1"#),
        "{body}"
    );
    assert!(!body.contains(r#"grpc_code="Internal""#), "{body}");
    assert!(
        body.contains(r#"geomatch_rejections_total{reason="request"} 1"#),
        "{body}"
    );
    server.stop().await;
}
