//! Server plumbing over real gRPC: health, reflection (v1 and v1alpha), graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::start;
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
    let mut c = server.shake().await;
    let call = tokio::spawn(async move {
        c.shake(geomatch::grpc::pb::ShakeRequest {
            user_id: "alice".into(),
            position: common::latlng(1.0, 1.0),
            shake_id: "s".into(),
            ..Default::default()
        })
        .await
    });
    server.app.matcher.until_waiting(1).await;
    server.stop().await;
    let r = call.await.unwrap().unwrap().into_inner();
    assert_eq!(
        r.outcome(),
        geomatch::grpc::pb::shake_response::Outcome::NoMatch
    );
}
