//! The alert rules (deploy/prometheus/geomatch-rules.yml) name only series a real server
//! exports: a renamed metric would otherwise leave an alert silently never firing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::{
    build::{ping, search},
    fixtures::SHANGHAI,
    http_get, start,
};

/// The metric names the rules' expressions read (recording rules' own names, which hold
/// a colon, and labels excluded), with histogram suffixes taken off.
fn metrics_named_by_rules() -> BTreeSet<String> {
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/geomatch-rules.yml"
    ))
    .unwrap();
    let mut names = BTreeSet::new();
    let mut in_expr = false;
    for line in rules.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("expr:") {
            in_expr = true;
        } else if trimmed.starts_with("- ")
            || (trimmed.contains(':') && !trimmed.starts_with('(') && trimmed.ends_with(':'))
            || trimmed.starts_with("for:")
            || trimmed.starts_with("labels:")
            || trimmed.starts_with("annotations:")
            || trimmed.starts_with("record:")
            || trimmed.starts_with("alert:")
        {
            in_expr = false;
        }
        if !in_expr || trimmed.starts_with('#') {
            continue;
        }
        for token in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if token.contains(':') {
                continue;
            }
            if token.starts_with("geomatch_") || token.starts_with("grpc_server_") {
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| token.strip_suffix(s))
                    .unwrap_or(token);
                names.insert(base.to_owned());
            }
        }
    }
    names
}

#[tokio::test]
async fn every_metric_an_alert_rule_reads_is_exported() {
    let named = metrics_named_by_rules();
    // The rules watch errors, latency, shedding, the cap, snapshots, watches and the store.
    for must in [
        "grpc_server_handled_total",
        "geomatch_accepted_handling_seconds",
        "geomatch_rejections_total",
        "geomatch_snapshot_failures_total",
        "geomatch_store_up",
    ] {
        assert!(
            named.contains(must),
            "the rules no longer read {must}: {named:?}"
        );
    }
    let server = start(&["--metrics-listen", "127.0.0.1:0"]).await;
    let mut c = server.nearby().await;
    // One call answered OK and one refused, as any live server has seen.
    c.update_location(ping("alice", SHANGHAI)).await.unwrap();
    c.search_nearby(search("alice", SHANGHAI)).await.unwrap();
    assert!(
        c.update_location(ping("alice", (95.0, SHANGHAI.1)))
            .await
            .is_err()
    );
    let body = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    let exported: BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
        })
        .collect();
    let missing: Vec<&String> = named
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{body}");
    server.stop().await;
}
