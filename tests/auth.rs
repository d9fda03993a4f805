//! Caller authentication and authorization over real gRPC: bearer tokens name callers,
//! the authz file says what each may call, mutual-TLS certificates name callers too;
//! unknown callers get UNAUTHENTICATED, known ones PERMISSION_DENIED naming the method;
//! health stays open; refusals are counted by caller name, never by token; changed files
//! are read again without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    build::{ping, search, status},
    fixtures::SHANGHAI,
    http_get,
    pki::{Ca, connect, dir, put, server_files},
    start,
};
use geomatch::grpc::pb::nearby_client::NearbyClient;
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const AUTHZ: &str = "\
# who may call what
backend   *
operator  geomatch.v1.Nearby/GetLocationStatus geomatch.v1.Nearby/SearchNearby grpc.reflection.*
";

fn bearer<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// What a call of `UpdateLocation` with `token` comes to.
async fn update(c: &mut NearbyClient<Channel>, token: Option<&str>) -> Result<(), Code> {
    let msg = ping("auth:user", SHANGHAI);
    let req = match token {
        Some(t) => bearer(msg, t),
        None => Request::new(msg),
    };
    c.update_location(req).await.map(drop).map_err(|s| s.code())
}

#[tokio::test]
async fn tokens_name_callers_and_the_authz_file_decides() {
    let d = dir("auth-tokens");
    let tokens = d.join("tokens");
    let authz = d.join("authz");
    put(
        &tokens,
        "backend tok-backend-1\noperator tok-operator-1\nloadtest tok-load-1\n",
    );
    put(&authz, AUTHZ);
    let server = start(&[
        "--auth-tokens-file",
        tokens.to_str().unwrap(),
        "--authz-file",
        authz.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let mut c = server.nearby().await;

    // Unknown callers: no token, a wrong one.
    assert_eq!(update(&mut c, None).await, Err(Code::Unauthenticated));
    assert_eq!(
        update(&mut c, Some("tok-backend-")).await,
        Err(Code::Unauthenticated)
    );
    // Health is open to everyone.
    let health = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest::default())
        .await;
    assert!(health.is_ok(), "{health:?}");

    // The backend may call everything; the operator only what its line says.
    assert_eq!(update(&mut c, Some("tok-backend-1")).await, Ok(()));
    let err = c
        .update_location(bearer(ping("auth:user", SHANGHAI), "tok-operator-1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("geomatch.v1.Nearby/UpdateLocation")
            && err.message().contains("operator"),
        "{err:?}"
    );
    c.search_nearby(bearer(search("auth:op", SHANGHAI), "tok-operator-1"))
        .await
        .unwrap();
    c.get_location_status(bearer(status("auth:user"), "tok-operator-1"))
        .await
        .unwrap();
    // A caller with a token but no line in the authz file may call nothing.
    assert_eq!(
        update(&mut c, Some("tok-load-1")).await,
        Err(Code::PermissionDenied)
    );

    // Refusals are counted by caller name; no token ever reaches the metrics.
    let body = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert!(
        body.contains(
            r#"geomatch_auth_refusals_total{caller="operator",reason="permission_denied"}"#
        ),
        "{body}"
    );
    assert!(
        body.contains(r#"geomatch_auth_refusals_total{caller="unknown",reason="unauthenticated"}"#)
    );
    assert!(!body.contains("tok-"), "a token in the metrics");

    // Rotated tokens: the old one stops working, the new one works, without a restart.
    put(&tokens, "backend tok-backend-2\noperator tok-operator-1\n");
    let rotated = async {
        while update(&mut c, Some("tok-backend-2")).await != Ok(()) {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), rotated)
        .await
        .expect("the new token is accepted");
    assert_eq!(
        update(&mut c, Some("tok-backend-1")).await,
        Err(Code::Unauthenticated)
    );
    // A bad file keeps the rules in force.
    put(&tokens, "backend\n");
    let failed = async {
        loop {
            let body = http_get(server.metrics_addr.unwrap(), "/metrics").await;
            if body.contains(r#"geomatch_reloads_total{files="auth",result="error"}"#) {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), failed)
        .await
        .expect("the bad file was tried");
    assert_eq!(update(&mut c, Some("tok-backend-2")).await, Ok(()));
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_certificates_name_callers() {
    let d = dir("auth-mtls");
    let ca = Ca::new("test ca");
    let mut flags = server_files(&d, &ca);
    put(&d.join("clients.pem"), &ca.pem());
    put(&d.join("authz"), AUTHZ);
    flags.extend([
        "--tls-client-ca".into(),
        d.join("clients.pem").display().to_string(),
        "--authz-file".into(),
        d.join("authz").display().to_string(),
    ]);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = start(&args).await;
    let client = |cn: &str| ca.leaf(cn, &[cn], false);
    let (backend, operator, stranger) = (client("backend"), client("operator"), client("stranger"));

    let mut b = NearbyClient::new(
        connect(server.addr, &ca.pem(), Some(&backend))
            .await
            .unwrap(),
    );
    assert_eq!(update(&mut b, None).await, Ok(()));
    let mut o = NearbyClient::new(
        connect(server.addr, &ca.pem(), Some(&operator))
            .await
            .unwrap(),
    );
    assert_eq!(update(&mut o, None).await, Err(Code::PermissionDenied));
    o.search_nearby(search("auth:op", SHANGHAI)).await.unwrap();
    // A certificate from the right CA that the authz file does not know.
    let mut s = NearbyClient::new(
        connect(server.addr, &ca.pem(), Some(&stranger))
            .await
            .unwrap(),
    );
    assert_eq!(update(&mut s, None).await, Err(Code::Unauthenticated));
    server.stop().await;
}

#[tokio::test]
async fn auth_files_that_do_not_parse_stop_the_start_with_the_line_named() {
    let d = dir("auth-bad");
    put(&d.join("authz"), "backend *\noperator\n");
    let err = common::serve_error(&["--authz-file", d.join("authz").to_str().unwrap()]).await;
    assert!(err.to_string().contains("authz:2"), "{err}");
}
