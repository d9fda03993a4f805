//! Builds the domain state and background tasks, mounts the gRPC services (with health and
//! reflection) and serves until shutdown.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;

use crate::{
    clock::Clock,
    config::{Config, Settings},
    grpc::{
        NearbyService, ShakeService,
        admission::AdmissionLayer,
        layer::RpcLayer,
        pb::{self, nearby_server::NearbyServer, shake_server::ShakeServer},
        stamp_deadline,
    },
    guard::Limits,
    nearby::snapshot::{self, SnapshotError},
    nearby::{NearbyIndex, PageTokens},
    shake::Matcher,
    telemetry::{self, names},
};

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
}

/// How the server serves, drains, sweeps and snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest request message accepted, bytes.
    pub max_message_bytes: usize,
    /// Most Nearby calls served at once; more are shed.
    pub max_concurrent_requests: usize,
    /// Most Shake calls in flight at once; more are shed.
    pub max_concurrent_shakes: usize,
    /// A call that waited longer than this for its handler is shed; zero disables.
    pub max_queue_delay: Duration,
    /// Interval of HTTP/2 (and TCP) keepalive pings.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// How long calls and streams may take to finish once the drain starts.
    pub drain_timeout: Duration,
    /// How often expired pings, old shake outcomes and idle limits are reclaimed.
    pub sweep_interval: Duration,
    /// The snapshot of the People Nearby index.
    pub snapshot: SnapshotConfig,
}

impl Default for ServerConfig {
    /// 256 KiB messages, 4 096 Nearby calls and 200 000 shakes at once, 20 ms of queueing,
    /// keepalive every 30 s with 10 s to answer, 10 s to drain, a sweep every 10 s.
    fn default() -> Self {
        Self {
            max_message_bytes: 256 * 1024,
            max_concurrent_requests: 4_096,
            max_concurrent_shakes: 200_000,
            max_queue_delay: Duration::from_millis(20),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(10),
            snapshot: SnapshotConfig::default(),
        }
    }
}

/// Where and how often the People Nearby index is snapshotted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotConfig {
    /// The snapshot file; no snapshots when `None`.
    pub path: Option<PathBuf>,
    /// How often the snapshot is written (and once more at shutdown).
    pub interval: Duration,
    /// Start empty (moving the file aside) instead of refusing a corrupt or
    /// unknown-version snapshot.
    pub ignore_corrupt: bool,
}

impl Default for SnapshotConfig {
    /// No snapshots; when a file is given, written every 60 s.
    fn default() -> Self {
        Self {
            path: None,
            interval: Duration::from_secs(60),
            ignore_corrupt: false,
        }
    }
}

/// The service's shared state: cheap to clone, every part behind an `Arc`.
#[derive(Debug, Clone)]
pub struct App {
    /// The People Nearby index.
    pub nearby: Arc<NearbyIndex>,
    /// The Shake matcher.
    pub matcher: Arc<Matcher>,
    /// Rate limits and the impossible-travel check.
    pub limits: Arc<Limits>,
    /// Wall-clock time for TTLs.
    pub clock: Arc<dyn Clock>,
    /// How the server serves, drains, sweeps and snapshots.
    pub config: Arc<ServerConfig>,
    /// Serialises snapshot writers (the periodic one and the one at shutdown).
    snapshot_lock: Arc<std::sync::Mutex<()>>,
}

impl App {
    /// State configured by `cfg`, reading time from `clock`: empty, or restored from
    /// `--snapshot` when that file exists.
    ///
    /// # Errors
    /// [`ServeError::Config`] when a flag has a bad value; otherwise as
    /// [`Self::from_settings`].
    pub fn new(cfg: &Config, clock: Arc<dyn Clock>) -> Result<Self, ServeError> {
        Self::from_settings(cfg.settings().map_err(ServeError::Config)?, clock)
    }

    /// State built from `settings`, reading time from `clock`: empty, or restored from the
    /// snapshot file when one is configured and exists.
    ///
    /// # Errors
    /// When the operating system has no randomness for the page-token key, or the
    /// snapshot is unreadable, corrupt or of an unknown version (unless
    /// `ignore_corrupt`, which starts empty instead).
    pub fn from_settings(settings: Settings, clock: Arc<dyn Clock>) -> Result<Self, ServeError> {
        let tokens = PageTokens::random().map_err(ServeError::Random)?;
        let nearby = Arc::new(NearbyIndex::new(settings.nearby, tokens));
        let app = Self {
            limits: Arc::new(Limits::new(settings.guard, nearby.clone())),
            nearby,
            matcher: Arc::new(Matcher::new(settings.shake)),
            clock,
            config: Arc::new(settings.server),
            snapshot_lock: Arc::default(),
        };
        if let Some(path) = &app.config.snapshot.path {
            app.restore(path)?;
        }
        Ok(app)
    }

    fn restore(&self, path: &Path) -> Result<(), ServeError> {
        let started = std::time::Instant::now();
        match snapshot::load(&self.nearby, path, self.clock.now_ms()) {
            Ok(Some(stats)) => tracing::info!(
                users = stats.users,
                expired = stats.expired,
                bytes = stats.bytes,
                took_ms = started.elapsed().as_millis() as u64,
                "snapshot loaded"
            ),
            Ok(None) => tracing::info!(path = %path.display(), "no snapshot yet: starting empty"),
            Err(e @ SnapshotError::Io { .. }) => return Err(e.into()),
            Err(e) if self.config.snapshot.ignore_corrupt => {
                let mut aside = path.as_os_str().to_owned();
                aside.push(".corrupt");
                let moved = std::fs::rename(path, &aside).is_ok();
                tracing::warn!(error = %e, moved_to = %Path::new(&aside).display(), moved, "ignoring unusable snapshot: starting empty");
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Writes a snapshot now, if a snapshot file is configured. Blocking: call from a
    /// blocking thread.
    pub fn write_snapshot(&self) -> Option<Result<snapshot::Stats, SnapshotError>> {
        let path = self.config.snapshot.path.as_ref()?;
        let _one_writer = self
            .snapshot_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let started = std::time::Instant::now();
        let result = snapshot::write(&self.nearby, path, self.clock.now_ms());
        let took = started.elapsed();
        match &result {
            Ok(stats) => {
                metrics::histogram!(names::SNAPSHOT_SECONDS).record(took.as_secs_f64());
                metrics::gauge!(names::SNAPSHOT_BYTES).set(stats.bytes as f64);
                tracing::info!(
                    users = stats.users,
                    bytes = stats.bytes,
                    took_ms = took.as_millis() as u64,
                    "snapshot written"
                );
            }
            Err(e) => tracing::error!(error = %e, "snapshot failed"),
        }
        Some(result)
    }

    /// Reclaims expired pings and old shake outcomes once.
    pub fn sweep(&self) {
        let started = std::time::Instant::now();
        let users = self.nearby.sweep(self.clock.now_ms());
        let shakes = self.matcher.sweep(tokio::time::Instant::now());
        let tracked = self.limits.sweep(self.clock.now_ms());
        let took = started.elapsed();
        metrics::counter!(names::EXPIRATIONS).increment(users as u64);
        metrics::histogram!(names::SWEEP_SECONDS).record(took.as_secs_f64());
        tracing::debug!(
            expired_users = users,
            forgotten_shakes = shakes,
            forgotten_limits = tracked,
            took_ms = took.as_millis() as u64,
            "sweep done"
        );
    }

    /// Sets the gauges that describe the current state (read at scrape time, so the hot
    /// paths never touch them).
    pub fn publish_gauges(&self) {
        metrics::gauge!(names::INDEXED_USERS).set(self.nearby.len() as f64);
        metrics::gauge!(names::OCCUPIED_CELLS).set(self.nearby.cell_count() as f64);
        metrics::gauge!(names::WAITING_SHAKES).set(self.matcher.waiting() as f64);
        metrics::gauge!(names::WATCHES).set(self.nearby.watch_count() as f64);
        metrics::gauge!(names::SHAKE_OUTCOMES_KEPT).set(self.matcher.remembered() as f64);
        for (control, n) in [
            ("search", self.limits.search.len()),
            ("shake", self.limits.shake.len()),
            ("travel", self.limits.travel.len()),
        ] {
            metrics::gauge!(names::LIMITS_TRACKED, "control" => control).set(n as f64);
        }
    }
}

/// Aborts the background task it owns when dropped, so a stopped server leaves nothing running.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn_sweeper(app: App) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(app.config.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            // The sweep walks every shard: keep it off the async workers.
            let app = app.clone();
            if tokio::task::spawn_blocking(move || app.sweep())
                .await
                .is_err()
            {
                tracing::warn!("sweep task failed");
            }
        }
    }))
}

/// The snapshot writer: one long-lived OS thread at low CPU priority, so a snapshot of a
/// large index takes only CPU the request handlers leave idle. It writes every
/// `--snapshot-interval`, and once more when asked at shutdown.
struct Snapshotter {
    tx: std::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
}

impl Snapshotter {
    fn spawn(app: App) -> Option<Self> {
        app.config.snapshot.path.as_ref()?;
        let (tx, rx) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>();
        let spawned = std::thread::Builder::new()
            .name("geomatch-snapshot".into())
            .spawn(move || {
                lower_thread_priority();
                let interval = app.config.snapshot.interval;
                loop {
                    match rx.recv_timeout(interval) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            app.write_snapshot();
                        }
                        Ok(done) => {
                            app.write_snapshot();
                            let _ = done.send(());
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Self { tx }),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the snapshot thread: snapshots only at shutdown");
                None
            }
        }
    }

    /// Writes a final snapshot and stops the thread.
    async fn finish(self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.tx.send(done).is_ok() {
            let _ = written.await;
        }
    }
}

/// Nice 10 for the calling thread (Linux keeps nice values per thread), so background
/// work yields the CPU to request handlers. Best effort: a failure only costs latency.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions; setpriority only reads its arguments.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 10)
        };
        if rc != 0 {
            tracing::debug!("could not lower the snapshot thread's priority");
        }
    }
}

/// Serves `/metrics` on `listener` until the returned guard is dropped.
fn spawn_metrics(app: App, listener: TcpListener) -> Result<AbortOnDrop, ServeError> {
    let handle = telemetry::install_metrics().map_err(ServeError::Metrics)?;
    let upkeep_handle = handle.clone();
    let render = move || {
        let (app, handle) = (app.clone(), handle.clone());
        async move {
            app.publish_gauges();
            handle.run_upkeep();
            handle.render()
        }
    };
    let router = axum::Router::new().route("/metrics", axum::routing::get(render));
    Ok(AbortOnDrop(tokio::spawn(async move {
        // Histogram samples are buffered until upkeep folds them in: run it even when
        // nobody scrapes, or the buffer grows with every request.
        let upkeep = async {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tick.tick().await;
                upkeep_handle.run_upkeep();
            }
        };
        tokio::select! {
            served = axum::serve(listener, router) => {
                if let Err(e) = served {
                    tracing::warn!(error = %e, "metrics listener failed");
                }
            }
            () = upkeep => {}
        }
    })))
}

/// The sockets geomatch serves on.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC.
    pub grpc: TcpListener,
    /// Prometheus `/metrics` over HTTP, if enabled.
    pub metrics: Option<TcpListener>,
}

/// Serves geomatch until `shutdown` resolves, then drains: health turns NOT_SERVING, new
/// connections stop, in-flight calls finish.
///
/// # Errors
/// [`ServeError`] when reflection or metrics cannot be set up or the transport fails.
pub async fn serve(
    app: App,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let cfg = app.config.clone();
    let _metrics = listeners
        .metrics
        .map(|l| spawn_metrics(app.clone(), l))
        .transpose()?;

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

    let _sweeper = spawn_sweeper(app.clone());
    let snapshotter = Snapshotter::spawn(app.clone());
    let nearby = NearbyServer::new(NearbyService::new(
        app.nearby.clone(),
        app.limits.clone(),
        app.clock.clone(),
    ))
    .max_decoding_message_size(cfg.max_message_bytes);
    let shake = InterceptedService::new(
        ShakeServer::new(ShakeService::new(
            app.matcher.clone(),
            app.limits.clone(),
            app.clock.clone(),
        ))
        .max_decoding_message_size(cfg.max_message_bytes),
        stamp_deadline,
    );
    let incoming = TcpIncoming::from(listeners.grpc)
        .with_nodelay(Some(true))
        .with_keepalive(Some(cfg.keepalive_interval));

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

    let serving = Server::builder()
        .http2_keepalive_interval(Some(cfg.keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
        .layer(RpcLayer)
        .layer(AdmissionLayer::new(
            cfg.max_queue_delay,
            cfg.max_concurrent_requests,
            cfg.max_concurrent_shakes,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(nearby)
        .add_service(shake)
        .serve_with_incoming_shutdown(incoming, drain);
    // A graceful shutdown waits for every connection to close; a client holding a stream
    // open (a health Watch, say) must not keep the process up forever.
    let deadline = async {
        draining.notified().await;
        tokio::time::sleep(cfg.drain_timeout).await;
    };
    tokio::select! {
        served = serving => served?,
        () = deadline => tracing::warn!(
            drain_timeout_ms = cfg.drain_timeout.as_millis() as u64,
            "drain timeout: closing the remaining connections"
        ),
    }
    if let Some(s) = snapshotter {
        s.finish().await;
    }
    tracing::info!("stopped");
    Ok(())
}
