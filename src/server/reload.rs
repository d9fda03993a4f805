//! Reading files again when they change: their modification time and size are checked
//! every second, and SIGHUP forces a read. Used for the TLS files and the auth files.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use tokio::task::JoinHandle;

/// How often the files are checked for a change.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// What the files looked like: modification time and size of each.
fn stamp(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Calls `reload` whenever one of `paths` changes, or on SIGHUP, until the handle is
/// aborted. `reload` says why a new set could not be used; the caller keeps the old one.
/// `what` names the files in the log and in `geomatch_reloads_total`.
pub(crate) fn watch(
    what: &'static str,
    paths: Vec<PathBuf>,
    reload: impl Fn() -> Result<(), String> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = stamp(&paths);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            let signalled = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => true,
            };
            let now = stamp(&paths);
            if !signalled && now == seen {
                continue;
            }
            seen = now;
            match reload() {
                Ok(()) => {
                    metrics::counter!(crate::telemetry::names::RELOADS, "files" => what, "result" => "ok")
                        .increment(1);
                    tracing::info!(files = what, signalled, "reloaded");
                }
                Err(e) => {
                    metrics::counter!(crate::telemetry::names::RELOADS, "files" => what, "result" => "error")
                        .increment(1);
                    tracing::error!(files = what, error = %e, "reload failed: still using the previous files");
                }
            }
        }
    })
}
