//! WatchNearby flags: hysteresis, per-stream buffer and the cap on open streams.

use anyhow::bail;
use clap::Args;

use super::human::Share;
use crate::nearby::WatchConfig;

/// Limits of WatchNearby streams; defaults from [`WatchConfig::default`].
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// WatchNearby hysteresis: a user who entered leaves only beyond the radius plus this
    /// share of it (e.g. 10% or 0.1), and at least one privacy cell's width.
    #[arg(long, env = "GEOMATCH_WATCH_HYSTERESIS", default_value_t = Share(WatchConfig::default().hysteresis))]
    pub watch_hysteresis: Share,

    /// Events a WatchNearby stream may have queued; a consumer further behind has its
    /// stream ended with RESOURCE_EXHAUSTED.
    #[arg(long, env = "GEOMATCH_WATCH_BUFFER", default_value_t = WatchConfig::default().buffer)]
    pub watch_buffer: usize,

    /// WatchNearby streams open at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "GEOMATCH_MAX_WATCHES", default_value_t = WatchConfig::default().max_watches)]
    pub max_watches: usize,
}

impl WatchArgs {
    /// The watches' settings.
    ///
    /// # Errors
    /// When `--watch-buffer` or `--max-watches` is 0.
    pub fn settings(&self) -> anyhow::Result<WatchConfig> {
        if self.watch_buffer == 0 {
            bail!("--watch-buffer 0: at least 1");
        }
        if self.max_watches == 0 {
            bail!("--max-watches 0: at least 1");
        }
        Ok(WatchConfig {
            buffer: self.watch_buffer,
            hysteresis: self.watch_hysteresis.fraction(),
            max_watches: self.max_watches,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    #[test]
    fn watch_values_are_checked_and_converted() {
        let (_, s) = parse(&["--watch-hysteresis", "25%", "--watch-buffer", "8"]).unwrap();
        assert_eq!(s.nearby.watch.hysteresis, 0.25);
        assert_eq!(s.nearby.watch.buffer, 8);
        for (args, needle) in [
            (&["--watch-buffer", "0"][..], "--watch-buffer 0"),
            (&["--max-watches", "0"][..], "--max-watches 0"),
            (&["--watch-hysteresis", "2000%"][..], "2000%"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
