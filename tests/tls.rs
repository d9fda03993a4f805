//! TLS and mutual TLS on the gRPC port, with certificates the tests make themselves
//! (rcgen): plaintext to a TLS port fails; under mutual TLS a client without a
//! certificate, with an expired one or with one from another CA is refused; rotated files
//! are served to new connections without a restart while an open WatchNearby stream
//! survives; a bad new file keeps the old one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    build::{ping, watch},
    fixtures::{SHANGHAI, north_of},
    pki::{Ca, connect, dir, put, server_files, serves},
    start,
};
use geomatch::grpc::pb::{nearby_client::NearbyClient, nearby_event::Kind};
use tonic::transport::Endpoint;

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn tls_serves_and_plaintext_is_refused() {
    let d = dir("basic");
    let ca = Ca::new("test ca");
    let flags = server_files(&d, &ca);
    let server = start(&args(&flags)).await;
    assert!(serves(server.addr, &ca.pem(), None).await);
    // Plaintext HTTP/2 to the TLS port: no call gets through.
    let plain = async {
        let ch = Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await?;
        NearbyClient::new(ch)
            .update_location(ping("tls:plain", SHANGHAI))
            .await
            .map_err(|s| Box::new(s) as Box<dyn std::error::Error>)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let plain = tokio::time::timeout(Duration::from_secs(10), plain)
        .await
        .expect("plaintext to a TLS port ends, one way or another");
    assert!(plain.is_err(), "plaintext must not be served");
    // A client that trusts another CA refuses the server.
    assert!(!serves(server.addr, &Ca::new("other").pem(), None).await);
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_refuses_missing_expired_and_foreign_certificates() {
    let d = dir("mutual");
    let ca = Ca::new("test ca");
    let mut flags = server_files(&d, &ca);
    put(&d.join("clients.pem"), &ca.pem());
    flags.extend([
        "--tls-client-ca".into(),
        d.join("clients.pem").display().to_string(),
    ]);
    let server = start(&args(&flags)).await;
    let backend = ca.leaf("backend", &["backend"], false);
    let operator = ca.leaf("operator", &["operator"], false);
    let expired = ca.leaf("old", &["old"], true);
    let foreign = Ca::new("someone else").leaf("backend", &["backend"], false);
    assert!(serves(server.addr, &ca.pem(), Some(&backend)).await);
    assert!(serves(server.addr, &ca.pem(), Some(&operator)).await);
    assert!(
        !serves(server.addr, &ca.pem(), None).await,
        "no certificate"
    );
    assert!(
        !serves(server.addr, &ca.pem(), Some(&expired)).await,
        "expired"
    );
    assert!(
        !serves(server.addr, &ca.pem(), Some(&foreign)).await,
        "other CA"
    );
    server.stop().await;
}

#[tokio::test]
async fn rotated_certificates_reach_new_connections_and_open_streams_survive() {
    let d = dir("rotate");
    let (old_ca, new_ca) = (Ca::new("old ca"), Ca::new("new ca"));
    let flags = server_files(&d, &old_ca);
    let server = start(&args(&flags)).await;

    // A watch open over a connection made with the old certificate.
    let ch = connect(server.addr, &old_ca.pem(), None).await.unwrap();
    let mut c = NearbyClient::new(ch);
    c.update_location(ping("tls:watcher", SHANGHAI))
        .await
        .unwrap();
    let mut events = c
        .watch_nearby(watch("tls:watcher", 1_000.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        events.message().await.unwrap().unwrap().kind(),
        Kind::SnapshotEnd
    );

    // Rotated in place: new connections get the new certificate, within seconds.
    server_files(&d, &new_ca);
    let rotated = async {
        while !serves(server.addr, &new_ca.pem(), None).await {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), rotated)
        .await
        .expect("the new certificate is served");
    assert!(
        !serves(server.addr, &old_ca.pem(), None).await,
        "the old one is gone"
    );

    // The stream opened before the rotation still works.
    let ch = connect(server.addr, &new_ca.pem(), None).await.unwrap();
    NearbyClient::new(ch)
        .update_location(ping("tls:near", north_of(SHANGHAI, 300.0)))
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("an event on the old stream")
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.kind(), e.user.unwrap().user_id.as_str()),
        (Kind::Enter, "tls:near")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_bad_new_certificate_keeps_the_old_one() {
    let d = dir("bad");
    let ca = Ca::new("test ca");
    let mut flags = server_files(&d, &ca);
    flags.extend(["--metrics-listen".into(), "127.0.0.1:0".into()]);
    let server = start(&args(&flags)).await;
    assert!(serves(server.addr, &ca.pem(), None).await);
    put(
        &d.join("server.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    // Wait for the failed reload to be counted, then: still served, with the old files.
    let failed = async {
        loop {
            let body = common::http_get(server.metrics_addr.unwrap(), "/metrics").await;
            if body.contains(r#"geomatch_reloads_total{files="tls",result="error"}"#) {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), failed)
        .await
        .expect("the bad file was tried");
    assert!(serves(server.addr, &ca.pem(), None).await);
    server.stop().await;
}

#[tokio::test]
async fn tls_flags_that_do_not_go_together_are_named() {
    for (flags, needle) in [
        (&["--tls-cert", "/x.pem"][..], "--tls-cert: needs --tls-key"),
        (&["--tls-key", "/x.key"][..], "--tls-key: needs --tls-cert"),
        (&["--tls-client-ca", "/ca.pem"][..], "--tls-client-ca"),
    ] {
        let argv = std::iter::once("geomatch").chain(flags.iter().copied());
        let cfg = <geomatch::config::Config as clap::Parser>::try_parse_from(argv).unwrap();
        let err = cfg.settings().unwrap_err().to_string();
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
    // Files that do not exist stop the start with the file named.
    let err = common::serve_error(&[
        "--tls-cert",
        "/nonexistent/c.pem",
        "--tls-key",
        "/nonexistent/k.pem",
    ])
    .await;
    assert!(err.to_string().contains("/nonexistent/c.pem"), "{err}");
}
