//! The service's shared state and its upkeep: the rooms wired together, restored from and
//! written to the snapshot, swept, and described by gauges.

use std::{path::Path, sync::Arc};

use super::{ServeError, ServerConfig};
use crate::{
    clock::Clock,
    config::{Config, Settings},
    guard::Limits,
    nearby::snapshot::{self, SnapshotError},
    nearby::{NearbyIndex, PageTokens},
    shake::Matcher,
    store::{
        NearbyStore, ShakeStore,
        redis::{RedisNearby, RedisShake},
    },
    telemetry::{names, trace::Tracing},
};

/// The service's shared state: cheap to clone, every part behind an `Arc`.
#[derive(Debug, Clone)]
pub struct App {
    /// The in-memory People Nearby index (empty and unused when [`Self::store`] is
    /// remote).
    pub nearby: Arc<NearbyIndex>,
    /// Where People Nearby is held: the in-memory index, or Redis / Valkey.
    pub store: NearbyStore,
    /// The in-memory Shake matcher (idle when [`Self::shakes`] is remote).
    pub matcher: Arc<Matcher>,
    /// Where Shake pairs: the in-memory matcher, or Redis / Valkey.
    pub shakes: ShakeStore,
    /// Rate limits and the impossible-travel check.
    pub limits: Arc<Limits>,
    /// Wall-clock time for TTLs.
    pub clock: Arc<dyn Clock>,
    /// How the server serves, drains, sweeps and snapshots.
    pub config: Arc<ServerConfig>,
    /// OpenTelemetry spans, when `--otlp-endpoint` is given.
    pub tracing: Option<Arc<Tracing>>,
    /// Serialises snapshot writers.
    snapshot_lock: Arc<std::sync::Mutex<()>>,
}

/// Starts tracing when the config asks for it.
fn start_tracing(cfg: &ServerConfig) -> Result<Option<Arc<Tracing>>, ServeError> {
    Ok(match &cfg.trace {
        Some(t) => Some(Tracing::start(t)?),
        None => None,
    })
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
        if settings.store.target.is_some() {
            return Err(ServeError::Config(anyhow::anyhow!(
                "a Redis / Valkey store is opened with App::open"
            )));
        }
        let tokens = PageTokens::random().map_err(ServeError::Random)?;
        let nearby = Arc::new(NearbyIndex::new(settings.nearby, tokens));
        let matcher = Arc::new(Matcher::new(settings.shake));
        let app = Self {
            limits: Arc::new(Limits::new(settings.guard, Some(nearby.clone()))),
            store: NearbyStore::Memory(nearby.clone()),
            nearby,
            shakes: ShakeStore::Memory(matcher.clone()),
            matcher,
            clock,
            tracing: start_tracing(&settings.server)?,
            config: Arc::new(settings.server),
            snapshot_lock: Arc::default(),
        };
        if let Some(path) = &app.config.snapshot.path {
            app.restore(path)?;
        }
        Ok(app)
    }

    /// State built from `settings`, connected to its store: as [`Self::from_settings`] for
    /// the in-memory store; for Redis / Valkey, connects, loads the functions and checks
    /// the schema first.
    ///
    /// # Errors
    /// As [`Self::from_settings`]; [`ServeError::Store`] when the store cannot be reached
    /// or holds incompatible data.
    pub async fn open(settings: Settings, clock: Arc<dyn Clock>) -> Result<Self, ServeError> {
        let Some(target) = settings.store.target.clone() else {
            return Self::from_settings(settings, clock);
        };
        let tokens = PageTokens::random().map_err(ServeError::Random)?;
        // The replica's own index holds no pings over a remote store: only the watches.
        let nearby = Arc::new(NearbyIndex::new(settings.nearby.clone(), tokens));
        let remote = RedisNearby::connect(
            &target,
            settings.nearby,
            settings.store.timeout,
            nearby.clone(),
        )
        .await?;
        let shakes =
            RedisShake::connect(&target, settings.shake.clone(), settings.store.timeout).await?;
        Ok(Self {
            nearby,
            store: NearbyStore::Redis(remote),
            limits: Arc::new(Limits::new(settings.guard, None).with_shared_rates()),
            shakes: ShakeStore::Redis(Arc::new(shakes)),
            matcher: Arc::new(Matcher::new(settings.shake)),
            clock,
            tracing: start_tracing(&settings.server)?,
            config: Arc::new(settings.server),
            snapshot_lock: Arc::default(),
        })
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
        let span = self
            .tracing
            .as_ref()
            .map(|t| t.background("geomatch.snapshot.write"));
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
            Err(e) => {
                if let Some(span) = &span {
                    span.failed("snapshot failed");
                }
                metrics::counter!(names::SNAPSHOT_FAILURES).increment(1);
                tracing::error!(error = %e, "snapshot failed");
            }
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
        // The index's own counts only when it is the store: over Redis / Valkey the
        // replica holds none of them (the store's own metrics do), and a 0 would mislead.
        if let Some(index) = self.store.memory() {
            metrics::gauge!(names::INDEXED_USERS).set(index.len() as f64);
            metrics::gauge!(names::OCCUPIED_CELLS).set(index.cell_count() as f64);
            metrics::gauge!(names::MAX_USERS).set(index.config().max_users as f64);
            // In memory the store is this process: up while it answers scrapes. A remote
            // store's gauge is kept by its health probe (server::tasks).
            metrics::gauge!(names::STORE_UP).set(1.0);
        }
        let (direct, through_cluster) = crate::store::redis::routed_calls();
        if direct + through_cluster > 0 {
            metrics::counter!(names::STORE_CALLS, "route" => "direct").absolute(direct);
            metrics::counter!(names::STORE_CALLS, "route" => "cluster_client")
                .absolute(through_cluster);
            metrics::counter!(names::STORE_WRITTEN_TOGETHER)
                .absolute(crate::store::redis::written_together());
        }
        if let NearbyStore::Redis(remote) = &self.store {
            let (stood, written) = remote.ping_calls();
            metrics::counter!(names::STORE_PINGS, "record" => "stood").absolute(stood);
            metrics::counter!(names::STORE_PINGS, "record" => "written").absolute(written);
        }
        metrics::gauge!(names::WAITING_SHAKES).set(self.shakes.waiting() as f64);
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
