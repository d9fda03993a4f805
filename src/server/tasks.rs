//! Background tasks with one owner: [`Tasks`] starts each with a shared stop signal and,
//! at shutdown, raises it and joins every task and thread, so a stopped server leaves
//! nothing running.
//!
//! The tasks: the sweep (every `--sweep-interval`, on a blocking thread), the snapshot
//! writer (an OS thread at nice 10, every `--snapshot-interval`) and the `/metrics`
//! endpoint (with its upkeep every 5 s).

use std::{
    future::Future,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use super::{App, ServeError};
use crate::telemetry;

/// How often histogram samples are folded in when nobody scrapes.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// How long open `/metrics` connections may take to finish once the tasks are stopped.
const METRICS_GRACE: Duration = Duration::from_secs(1);

/// The stop signal every background task watches: raised once, seen by async tasks
/// through [`Stop::raised`] and by threads through [`Stop::wait_timeout`].
#[derive(Debug, Clone)]
pub(super) struct Stop(Arc<StopState>);

#[derive(Debug)]
struct StopState {
    raised: Mutex<bool>,
    threads: Condvar,
    tasks: watch::Sender<bool>,
}

impl Stop {
    fn new() -> Self {
        Self(Arc::new(StopState {
            raised: Mutex::new(false),
            threads: Condvar::new(),
            tasks: watch::Sender::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, bool> {
        self.0.raised.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn raise(&self) {
        let mut raised = self.lock();
        *raised = true;
        drop(raised);
        self.0.threads.notify_all();
        self.0.tasks.send_replace(true);
    }

    /// Resolves once the signal is raised (at once if it already was).
    pub(super) async fn raised(&self) {
        let mut rx = self.0.tasks.subscribe();
        // The sender lives as long as `self`, so this ends only when the signal is raised.
        let _ = rx.wait_for(|raised| *raised).await;
    }

    /// Blocks for up to `timeout`; whether the signal was raised.
    pub(super) fn wait_timeout(&self, timeout: Duration) -> bool {
        let (raised, _) = self
            .0
            .threads
            .wait_timeout_while(self.lock(), timeout, |raised| !*raised)
            .unwrap_or_else(PoisonError::into_inner);
        *raised
    }
}

/// Owns the background tasks and threads. [`Tasks::shutdown`] stops and joins them all;
/// dropping it instead (the server future was dropped) raises the stop signal and aborts
/// the async tasks, and each thread ends by itself at its next check.
#[derive(Debug)]
pub(super) struct Tasks {
    stop: Stop,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    threads: Vec<(&'static str, std::thread::JoinHandle<()>)>,
}

impl Tasks {
    fn new() -> Self {
        Self {
            stop: Stop::new(),
            tasks: Vec::new(),
            threads: Vec::new(),
        }
    }

    /// Spawns the async task `body` makes from the stop signal; it must end soon after
    /// the signal is raised.
    fn spawn<F>(&mut self, name: &'static str, body: impl FnOnce(Stop) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(body(self.stop.clone()));
        self.tasks.push((name, handle));
    }

    /// Starts `body` on its own OS thread `geomatch-<name>`; it must return soon after
    /// the signal is raised.
    fn spawn_thread(
        &mut self,
        name: &'static str,
        body: impl FnOnce(Stop) + Send + 'static,
    ) -> std::io::Result<()> {
        let stop = self.stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("geomatch-{name}"))
            .spawn(move || body(stop))?;
        self.threads.push((name, handle));
        Ok(())
    }

    /// Raises the stop signal and waits until every task and thread has ended.
    pub(super) async fn shutdown(mut self) {
        self.stop.raise();
        for (name, handle) in std::mem::take(&mut self.tasks) {
            if let Err(e) = handle.await {
                tracing::warn!(task = name, error = %e, "background task failed");
            }
        }
        for (name, handle) in std::mem::take(&mut self.threads) {
            // Joining blocks until the thread's current write is done: not on a worker.
            let joined = tokio::task::spawn_blocking(move || handle.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::warn!(task = name, "background thread failed");
            }
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.stop.raise();
        for (_, handle) in &self.tasks {
            handle.abort();
        }
    }
}

/// Starts `app`'s background tasks: the sweep, the snapshot writer when a snapshot file
/// is configured, and the `/metrics` endpoint on `metrics` when given.
///
/// # Errors
/// [`ServeError::Metrics`] when the metrics recorder cannot be installed.
pub(super) fn start(
    app: &App,
    metrics: Option<TcpListener>,
    health: tonic_health::server::HealthReporter,
) -> Result<Tasks, ServeError> {
    let mut tasks = Tasks::new();
    if let crate::store::NearbyStore::Redis(remote) = &app.store {
        let up = Arc::new(AtomicBool::new(true));
        let (watched, seen) = (remote.clone(), up.clone());
        tasks.spawn("store", move |stop| {
            watch_store(watched, health, seen, stop)
        });
        let (swept, sweeping) = (remote.clone(), app.clone());
        tasks.spawn("store-sweep", move |stop| {
            sweep_store(sweeping, swept, up, stop)
        });
    }
    if let Some(listener) = metrics {
        let handle = telemetry::install_metrics().map_err(ServeError::Metrics)?;
        let app = app.clone();
        tasks.spawn("metrics", move |stop| {
            serve_metrics(app, listener, handle, stop)
        });
    }
    let sweeping = app.clone();
    tasks.spawn("sweep", move |stop| sweep_every(sweeping, stop));
    if app.config.snapshot.path.is_some() {
        let writing = app.clone();
        if let Err(e) = tasks.spawn_thread("snapshot", move |stop| snapshot_every(&writing, &stop))
        {
            tracing::error!(error = %e, "cannot start the snapshot thread: snapshots only at shutdown");
        }
    }
    Ok(tasks)
}

/// How often a remote store's health is probed.
const STORE_PROBE: Duration = Duration::from_secs(1);

/// Probes a remote store every second, reporting NOT_SERVING while it cannot be reached
/// (at the first refusal, or after a few probes in a row without an answer in time:
/// [`super::store_health`]) and SERVING again once it answers; `up` tells the sweep
/// ([`sweep_store`]) which. The sweep runs apart, so that one over many tags never
/// delays a probe.
async fn watch_store(
    remote: Arc<crate::store::redis::RedisNearby>,
    health: tonic_health::server::HealthReporter,
    up_now: Arc<AtomicBool>,
    stop: Stop,
) {
    use crate::{grpc::pb::nearby_server::NearbyServer, store::redis::Probe};
    let mut probe = tokio::time::interval(STORE_PROBE);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = super::store_health::StoreHealth::new();
    loop {
        tokio::select! {
            _ = probe.tick() => {}
            () = stop.raised() => return,
        }
        let mut found = remote.probe().await;
        if found == Probe::TimedOut && state.serving() {
            tracing::warn!("store probe got no answer in time");
        }
        if found == Probe::Answered && !state.serving() {
            // Back: a store restarted empty needs its functions again before any call.
            if let Err(e) = remote.prepare_again().await {
                tracing::warn!(error = %e, "store answers but cannot be prepared: not serving");
                found = Probe::Failed;
            }
        }
        metrics::counter!(
            telemetry::names::STORE_PROBES,
            "result" => match found {
                Probe::Answered => "answered",
                Probe::TimedOut => "timed_out",
                Probe::Failed => "failed",
            }
        )
        .increment(1);
        let serving = state.serving();
        let up = state.observe(found);
        up_now.store(up, Ordering::Relaxed);
        metrics::gauge!(telemetry::names::STORE_UP).set(if up { 1.0 } else { 0.0 });
        if up != serving {
            if up {
                tracing::info!("store reachable again: serving");
                health
                    .set_serving::<NearbyServer<crate::grpc::NearbyService>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
            } else {
                tracing::warn!("store unreachable: not serving");
                health
                    .set_not_serving::<NearbyServer<crate::grpc::NearbyService>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            }
        }
    }
}

/// Sweeps a remote store's expired pings every `--sweep-interval` while it is up (as
/// [`watch_store`] last found it), one replica at a time.
async fn sweep_store(
    app: App,
    remote: Arc<crate::store::redis::RedisNearby>,
    up: Arc<AtomicBool>,
    stop: Stop,
) {
    let mut tick = tokio::time::interval(app.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is at once: the first sweep one interval in
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.raised() => return,
        }
        if !up.load(Ordering::Relaxed) {
            continue;
        }
        // One replica sweeps at a time: the lease outlives two intervals, so a live
        // holder keeps it and a dead one's passes to another replica.
        match remote.sweep_lease(app.config.sweep_interval * 2).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "store sweep lease failed");
                continue;
            }
        }
        let swept = tokio::select! {
            swept = remote.sweep(app.clock.now_ms()) => swept,
            () = stop.raised() => return,
        };
        match swept {
            Ok(n) => {
                metrics::counter!(crate::telemetry::names::EXPIRATIONS).increment(n as u64);
                tracing::debug!(expired_users = n, "store sweep done");
            }
            Err(e) => tracing::warn!(error = %e, "store sweep failed"),
        }
    }
}

/// Sweeps every `--sweep-interval` until stopped.
async fn sweep_every(app: App, stop: Stop) {
    let mut tick = tokio::time::interval(app.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.raised() => return,
        }
        // The sweep walks every shard: keep it off the async workers. The blocking thread
        // then gives back the pages it freed (it is not a worker: no park hook).
        let app = app.clone();
        if tokio::task::spawn_blocking(move || {
            app.sweep();
            crate::base::alloc::collect_now();
        })
        .await
        .is_err()
        {
            tracing::warn!("sweep task failed");
        }
    }
}

/// The snapshot writer's thread: at low CPU priority, so a snapshot of a large index
/// takes only CPU the request handlers leave idle, it writes every `--snapshot-interval`
/// until stopped. (The final snapshot is written by `serve` once this thread is joined.)
fn snapshot_every(app: &App, stop: &Stop) {
    lower_thread_priority();
    while !stop.wait_timeout(app.config.snapshot.interval) {
        app.write_snapshot();
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

/// Serves `/metrics` on `listener` until stopped, folding histogram samples in every
/// [`METRICS_UPKEEP`] even when nobody scrapes (or the buffer grows with every request).
async fn serve_metrics(app: App, listener: TcpListener, handle: PrometheusHandle, stop: Stop) {
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
    let stopping = stop.clone();
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move { stopping.raised().await });
    let upkeep = async {
        let mut tick = tokio::time::interval(METRICS_UPKEEP);
        loop {
            tick.tick().await;
            upkeep_handle.run_upkeep();
        }
    };
    // A scrape still open after the grace period must not hold the shutdown up.
    let overdue = async {
        stop.raised().await;
        tokio::time::sleep(METRICS_GRACE).await;
    };
    tokio::select! {
        served = served => {
            if let Err(e) = served {
                tracing::warn!(error = %e, "metrics listener failed");
            }
        }
        () = upkeep => {}
        () = overdue => tracing::warn!("metrics connections still open: closing them"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_see_the_signal_at_once_and_time_out_without_it() {
        let stop = Stop::new();
        assert!(!stop.wait_timeout(Duration::from_millis(1)));
        let waiting = stop.clone();
        let thread = std::thread::spawn(move || waiting.wait_timeout(Duration::from_secs(60)));
        stop.raise();
        assert!(thread.join().unwrap());
        assert!(stop.wait_timeout(Duration::from_secs(60)));
    }

    #[tokio::test]
    async fn shutdown_stops_and_joins_every_task_and_thread() {
        let mut tasks = Tasks::new();
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
        for name in ["a", "b"] {
            let tx = ended_tx.clone();
            tasks.spawn(name, move |stop| async move {
                stop.raised().await;
                let _ = tx.send(name);
            });
        }
        let tx = ended_tx.clone();
        tasks
            .spawn_thread("test", move |stop| {
                while !stop.wait_timeout(Duration::from_millis(5)) {}
                let _ = tx.send("thread");
            })
            .unwrap();
        drop(ended_tx);
        tasks.shutdown().await;
        let mut seen = Vec::new();
        while let Some(name) = ended.recv().await {
            seen.push(name);
        }
        seen.sort_unstable();
        assert_eq!(seen, ["a", "b", "thread"]);
    }

    #[tokio::test]
    async fn a_dropped_owner_ends_its_tasks() {
        let mut tasks = Tasks::new();
        let stop = tasks.stop.clone();
        let (alive, mut ended) = tokio::sync::mpsc::channel::<()>(1);
        // Ignores the signal: only the abort on drop ends it.
        tasks.spawn("stubborn", move |_| async move {
            let _alive = alive;
            std::future::pending::<()>().await;
        });
        drop(tasks);
        let closed = tokio::time::timeout(Duration::from_secs(5), ended.recv()).await;
        assert_eq!(closed, Ok(None), "the task ended and dropped its sender");
        assert!(stop.wait_timeout(Duration::ZERO), "the signal is raised");
    }
}
