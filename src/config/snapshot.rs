//! Snapshot flags: the file, how often it is written, and what to do with a corrupt one.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail};
use clap::Args;

use super::{human::Human, longer_than_zero};

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

/// The snapshot's flags; defaults from [`SnapshotConfig::default`].
#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    /// Snapshot file of the People Nearby index: loaded at start (dropping pings that
    /// expired meanwhile), written every --snapshot-interval and on graceful shutdown.
    /// Off when not given.
    #[arg(long, env = "GEOMATCH_SNAPSHOT")]
    pub snapshot: Option<PathBuf>,

    /// How often the snapshot is written (with --snapshot).
    #[arg(long, env = "GEOMATCH_SNAPSHOT_INTERVAL", default_value_t = Human(SnapshotConfig::default().interval))]
    pub snapshot_interval: Human,

    /// Start empty (with a warning, moving the bad file to `<path>.corrupt`) instead of
    /// refusing to start when the snapshot is corrupt or of an unknown version.
    #[arg(long, env = "GEOMATCH_SNAPSHOT_IGNORE_CORRUPT")]
    pub snapshot_ignore_corrupt: bool,
}

impl SnapshotArgs {
    /// The snapshot's settings.
    ///
    /// # Errors
    /// When `--snapshot-interval` is zero (checked even without `--snapshot`), or when the
    /// snapshot could not be written: its folder is missing or not writable, or the path
    /// is a folder. Checked at start, so persistence is never silently off.
    pub fn settings(&self) -> anyhow::Result<SnapshotConfig> {
        longer_than_zero("--snapshot-interval", self.snapshot_interval.get())?;
        if let Some(path) = &self.snapshot {
            writable(path)?;
        }
        Ok(SnapshotConfig {
            path: self.snapshot.clone(),
            interval: self.snapshot_interval.get(),
            ignore_corrupt: self.snapshot_ignore_corrupt,
        })
    }
}

/// Whether a snapshot could be written at `path`: the file is written beside itself
/// (`PATH.tmp`, then renamed), so its folder must exist and take a new file.
fn writable(path: &Path) -> anyhow::Result<()> {
    let shown = path.display();
    if path.is_dir() {
        bail!("--snapshot {shown}: is a directory, not a file");
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "--snapshot {shown}: the directory {} does not exist",
            dir.display()
        );
    }
    let probe = dir.join(format!(".geomatch-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .map_err(|e| anyhow!("--snapshot {shown}: cannot write in {}: {e}", dir.display()))?;
    // The probe is only a test of the folder; failing to remove it changes nothing.
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    #[test]
    fn snapshot_flags_are_checked_and_converted() {
        let (_, s) = parse(&["--snapshot", "/tmp/x.snap", "--snapshot-interval", "2s"]).unwrap();
        let snap = s.server.snapshot;
        assert_eq!(
            snap.path.as_deref(),
            Some(std::path::Path::new("/tmp/x.snap"))
        );
        assert_eq!(snap.interval, std::time::Duration::from_secs(2));
        assert!(!snap.ignore_corrupt);
        let err = parse(&["--snapshot-interval", "0s"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--snapshot-interval 0"), "{err}");
    }

    #[test]
    fn a_snapshot_that_could_not_be_written_stops_start_up() {
        let err = parse(&["--snapshot", "/no/such/dir/x.snap"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--snapshot /no/such/dir/x.snap") && err.contains("does not exist"),
            "{err}"
        );
        let dir = std::env::temp_dir();
        let err = parse(&["--snapshot", dir.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a directory"), "{err}");
        // A folder that exists but takes no new file (/proc is never writable).
        let err = parse(&["--snapshot", "/proc/x.snap"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot write in /proc"), "{err}");
    }
}
