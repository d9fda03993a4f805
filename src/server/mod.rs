//! Serves geomatch: mounts the gRPC services (with health and reflection) over the
//! [`App`], runs its background tasks (`tasks`) and, at shutdown, drains, stops the
//! tasks and writes the final snapshot.

use std::{future::Future, sync::Arc};

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;

use crate::{
    grpc::{
        NearbyService, ShakeService,
        admission::AdmissionLayer,
        auth::{AuthLayer, Rules, RulesError},
        layer::RpcLayer,
        pb::{self, nearby_server::NearbyServer, shake_server::ShakeServer},
        stamp_deadline,
    },
    nearby::snapshot::SnapshotError,
};

mod app;
pub mod coalesce;
mod reload;
mod store_health;
mod tasks;
pub mod tls;

pub use crate::config::{ServerConfig, SnapshotConfig};
pub use app::App;

/// Why the server could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum ServeError {
    /// A flag has a bad value.
    #[error("invalid configuration: {0:#}")]
    Config(anyhow::Error),
    /// No randomness for the page-token key.
    #[error("drawing the page token key: {0}")]
    Random(getrandom::Error),
    /// The reflection service could not load the descriptors.
    #[error("building reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The snapshot could not be loaded (and --snapshot-ignore-corrupt was not given).
    #[error("loading snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The metrics recorder could not be installed.
    #[error("installing metrics: {0}")]
    Metrics(String),
    /// The transport failed.
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The Redis / Valkey store could not be opened.
    #[error("opening the store: {0}")]
    Store(#[from] crate::store::redis::StoreError),
    /// The TLS files could not be used at start.
    #[error("loading TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The auth files could not be used at start.
    #[error("loading the auth files: {0}")]
    Auth(#[from] RulesError),
    /// Tracing could not start.
    #[error("starting tracing: {0}")]
    Trace(#[from] crate::telemetry::trace::TraceError),
}

/// Largest HTTP/2 header block a call may send (metadata included), bytes.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Streams a client may open and reset before the server has served them, at once; more
/// ends the connection (the HTTP/2 "rapid reset" attack).
const MAX_PENDING_RESETS: usize = 20;
/// Streams the server may reset on one connection because the client misbehaved; more
/// ends the connection.
const MAX_LOCAL_RESETS: usize = 1_024;

/// The sockets geomatch serves on.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC.
    pub grpc: TcpListener,
    /// Prometheus `/metrics` over HTTP, if enabled.
    pub metrics: Option<TcpListener>,
}

/// Serves geomatch until `shutdown` resolves, then drains: health turns NOT_SERVING,
/// watches are closed, new connections stop, in-flight calls finish (within the drain
/// timeout); then the background tasks are stopped and joined and the final snapshot is
/// written.
///
/// # Errors
/// [`ServeError`] when reflection or metrics cannot be set up or the transport fails.
pub async fn serve(
    app: App,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let cfg = app.config.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<NearbyServer<NearbyService>>().await;
    health.set_serving::<ShakeServer<ShakeService>>().await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.BadRequest, so grpcurl can print error details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let tasks = tasks::start(&app, listeners.metrics, health.clone())?;
    let nearby = NearbyServer::new(NearbyService::new(
        app.store.clone(),
        app.limits.clone(),
        app.clock.clone(),
    ))
    .max_decoding_message_size(cfg.max_message_bytes);
    let shake = InterceptedService::new(
        ShakeServer::new(ShakeService::new(
            app.shakes.clone(),
            app.limits.clone(),
            app.clock.clone(),
        ))
        .max_decoding_message_size(cfg.max_message_bytes),
        stamp_deadline,
    );
    // TLS when configured (the files are loaded now: bad ones stop the start, with the
    // reason); plaintext otherwise, with a warning when that is reachable from elsewhere.
    let tls = match &cfg.tls {
        Some(files) => Some(tls::Reloading::start(files.clone())?),
        None => {
            if listeners
                .grpc
                .local_addr()
                .is_ok_and(|a| !a.ip().is_loopback())
            {
                tracing::warn!(
                    "serving plaintext gRPC beyond loopback: anyone who reaches the port can read and write locations; use --tls-cert and --tls-key"
                );
            }
            None
        }
    };

    let draining = Arc::new(tokio::sync::Notify::new());
    let drain = {
        let (health, draining) = (health.clone(), draining.clone());
        let nearby = app.nearby.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: draining");
            // Watch streams never end by themselves: end them, so clients reconnect elsewhere.
            nearby.close_watches();
            health
                .set_not_serving::<NearbyServer<NearbyService>>()
                .await;
            health.set_not_serving::<ShakeServer<ShakeService>>().await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            draining.notify_one();
        }
    };

    // Who may call what, read again when the files change (the old rules stay on a bad
    // file); no auth flags: everyone may call everything.
    let (rules, _auth_watch) = if cfg.auth.enabled() {
        let load =
            |f: &crate::config::AuthFiles| Rules::load(f.tokens.as_deref(), f.authz.as_deref());
        let rules = Arc::new(arc_swap::ArcSwap::from_pointee(load(&cfg.auth)?));
        let (live, files) = (rules.clone(), cfg.auth.clone());
        let paths = [files.tokens.clone(), files.authz.clone()]
            .into_iter()
            .flatten()
            .collect();
        let watch = reload::watch("auth", paths, move || {
            live.store(Arc::new(load(&files).map_err(|e| e.to_string())?));
            Ok(())
        });
        (Some(rules), Some(AbortOnDrop(watch)))
    } else {
        (None, None)
    };
    // Transport limits, so that no one client can exhaust the server: streams per
    // connection, the header block, and (h2 0.4.20's own defaults, made explicit) streams
    // reset before they are served (rapid reset) and streams the server had to reset.
    let router = Server::builder()
        .http2_keepalive_interval(Some(cfg.keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .layer(RpcLayer::new(app.tracing.clone()))
        .layer(AuthLayer::new(rules))
        .layer(AdmissionLayer::new(
            cfg.max_queue_delay,
            cfg.max_concurrent_requests,
            cfg.max_concurrent_shakes,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(nearby)
        .add_service(shake);
    let serving: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match &tls {
        // Each connection's responses that are ready together go out in one write.
        Some(tls) => Box::pin(
            router.serve_with_incoming_shutdown(
                tls.incoming(listeners.grpc, cfg.keepalive_interval)
                    .map(|conn| conn.map(coalesce::Coalesced::new)),
                drain,
            ),
        ),
        None => {
            let incoming = TcpIncoming::from(listeners.grpc)
                .with_nodelay(Some(true))
                .with_keepalive(Some(cfg.keepalive_interval))
                .map(|conn| conn.map(coalesce::Coalesced::new));
            Box::pin(router.serve_with_incoming_shutdown(incoming, drain))
        }
    };
    // A graceful shutdown waits for every connection to close; a client holding a stream
    // open (a health Watch, say) must not keep the process up forever.
    let deadline = async {
        draining.notified().await;
        tokio::time::sleep(cfg.drain_timeout).await;
    };
    let served = tokio::select! {
        served = serving => served,
        () = deadline => {
            tracing::warn!(
                drain_timeout_ms = cfg.drain_timeout.as_millis() as u64,
                "drain timeout: closing the remaining connections"
            );
            Ok(())
        }
    };
    // Stopped and joined on every path, so nothing keeps running after serve returns.
    tasks.shutdown().await;
    if served.is_ok() && cfg.snapshot.path.is_some() {
        // Written once the periodic writer is joined: the last write, after the drain.
        let app = app.clone();
        if tokio::task::spawn_blocking(move || app.write_snapshot())
            .await
            .is_err()
        {
            tracing::error!("final snapshot task failed");
        }
    }
    // The last spans (the final snapshot's included) are exported before serve returns.
    if let Some(tracing) = &app.tracing {
        tracing.shutdown().await;
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Stops a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
