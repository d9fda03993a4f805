//! The floor under geomatch's per-call cost: a tonic server with nothing but the gRPC
//! health service, no layers, on the same runtime, allocator and socket options as
//! `geomatch`. Measure it exactly as the server, with the load generator's `noop`
//! scenario:
//!
//! ```sh
//! cargo build --release --example bare_health
//! target/release/examples/bare_health 127.0.0.1:16593 &
//! target/release/geomatch-load --grpc 127.0.0.1:16593 --scenario noop --server-pid $! --duration 5s
//! ```
//!
//! What `geomatch` costs per health check above this is its own layers (metrics,
//! authorization, admission); what this costs is tonic, HTTP/2 and the TCP stack.

use std::net::SocketAddr;

use tonic::transport::{Server, server::TcpIncoming};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:16593".into())
        .parse()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .add_service(health)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
