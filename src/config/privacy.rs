//! The privacy resolution flag: the H3 resolution both the index and the matcher snap
//! positions to, resolved once and handed to each.

use anyhow::bail;
use clap::Args;
use h3o::Resolution;

use crate::geo::cell::PRIVACY_RESOLUTION;

/// The privacy cells' resolution.
#[derive(Debug, Clone, Args)]
pub struct PrivacyArgs {
    /// H3 resolution positions are snapped to before any distance is measured or shown
    /// (9: cells of ~0.1 km², average edge 201 m). 5..=10.
    #[arg(long, env = "GEOMATCH_PRIVACY_RESOLUTION", default_value_t = u8::from(PRIVACY_RESOLUTION))]
    pub privacy_resolution: u8,
}

impl PrivacyArgs {
    /// The privacy resolution.
    ///
    /// # Errors
    /// When `--privacy-resolution` is not an H3 resolution or not within 5..=10.
    pub fn resolution(&self) -> anyhow::Result<Resolution> {
        let privacy = super::resolution("--privacy-resolution", self.privacy_resolution)?;
        if !(Resolution::Five..=Resolution::Ten).contains(&privacy) {
            bail!(
                "--privacy-resolution {}: must be within 5..=10",
                self.privacy_resolution
            );
        }
        Ok(privacy)
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    #[test]
    fn bad_resolutions_are_named() {
        for (args, needle) in [
            (
                &["--privacy-resolution", "16"][..],
                "--privacy-resolution 16",
            ),
            (
                &["--privacy-resolution", "11"][..],
                "--privacy-resolution 11",
            ),
            (&["--privacy-resolution", "4"][..], "--privacy-resolution 4"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn both_rooms_get_the_one_resolution() {
        let (_, s) = parse(&["--privacy-resolution", "8", "--shake-resolution", "6"]).unwrap();
        assert_eq!(s.nearby.privacy_resolution, h3o::Resolution::Eight);
        assert_eq!(s.shake.privacy_resolution, h3o::Resolution::Eight);
        assert_eq!(s.shake.bucket_resolution, h3o::Resolution::Six);
    }
}
