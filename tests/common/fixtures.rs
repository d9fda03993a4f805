//! Places the tests put users at, and the geometry to move between them.

use geomatch_load::population::offset;
use h3o::{CellIndex, LatLng, Resolution};
use rand::Rng;

/// Central Shanghai, as (lat, lng): where the tests put their users unless a test is about
/// distance.
pub const SHANGHAI: (f64, f64) = (31.2304, 121.4737);

/// Central Beijing: over 1 000 km from [`SHANGHAI`].
pub const BEIJING: (f64, f64) = (39.9042, 116.4074);

/// The resolution of the server's privacy cells (its default).
pub const PRIVACY_RES: Resolution = Resolution::Nine;

/// `east_m` metres east and `north_m` metres north of `at`.
pub fn moved((lat, lng): (f64, f64), east_m: f64, north_m: f64) -> (f64, f64) {
    offset(lat, lng, east_m, north_m)
}

/// `north_m` metres due north of `at`.
pub fn north_of(at: (f64, f64), north_m: f64) -> (f64, f64) {
    moved(at, 0.0, north_m)
}

/// A random point up to `deg` degrees from `at` in latitude and in longitude.
pub fn scattered(rng: &mut impl Rng, (lat, lng): (f64, f64), deg: f64) -> (f64, f64) {
    (
        lat + rng.random_range(-deg..deg),
        lng + rng.random_range(-deg..deg),
    )
}

/// `at` as an h3o point.
pub fn point((lat, lng): (f64, f64)) -> LatLng {
    LatLng::new(lat, lng).unwrap()
}

/// The privacy cell holding `at`.
pub fn privacy_cell(at: (f64, f64)) -> CellIndex {
    point(at).to_cell(PRIVACY_RES)
}

/// The centre of the privacy cell holding `at`: where the server measures from.
pub fn cell_centre(at: (f64, f64)) -> (f64, f64) {
    let c = LatLng::from(privacy_cell(at));
    (c.lat(), c.lng())
}
