//! Positions, great-circle distances and the privacy rules applied to them; with
//! [`cell`] (the H3 policy: covering a radius with cells, provably exactly) and [`value`]
//! (the validated request values: radius, page size, time to live).
//!
//! Every distance geomatch reports or filters on goes through [`distance_m`], and every
//! distance it shows a client goes through [`band_m`]: one definition each.

use geo::{Distance as _, Haversine, Point};
use h3o::{CellIndex, LatLng, Resolution};

pub mod cell;
pub mod centre;
pub mod value;

use crate::error::{Error, Result};

/// A number a client sent, shown in an error the way a person reads it: plainly when it
/// is of everyday size, in scientific notation when it is huge or tiny (`1e308`, not a
/// 309-digit number).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shown(pub f64);

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let x = self.0;
        let a = x.abs();
        if x.is_finite() && x != 0.0 && !(1e-4..1e9).contains(&a) {
            write!(f, "{x:e}")
        } else {
            write!(f, "{x}")
        }
    }
}

/// A validated WGS84 position: finite, latitude in `-90..=90`, longitude in `-180..=180`.
///
/// h3o only checks finiteness, so the range check lives here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coordinates(LatLng);

impl Coordinates {
    /// Validates a position given in degrees.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `<field>.lat` or `<field>.lng` when a value is not
    /// finite or out of range.
    pub fn new(field: &'static str, lat: f64, lng: f64) -> Result<Self> {
        let (lat_field, lng_field) = subfields(field);
        if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
            return Err(Error::invalid(
                lat_field,
                format!(
                    "must be a finite latitude in -90..=90 degrees, got {}",
                    Shown(lat)
                ),
            ));
        }
        if !lng.is_finite() || !(-180.0..=180.0).contains(&lng) {
            return Err(Error::invalid(
                lng_field,
                format!(
                    "must be a finite longitude in -180..=180 degrees, got {}",
                    Shown(lng)
                ),
            ));
        }
        LatLng::new(lat, lng)
            .map(Self)
            .map_err(|e| Error::invalid(field, e.to_string()))
    }

    /// The position as an h3o coordinate.
    pub fn latlng(self) -> LatLng {
        self.0
    }

    /// The H3 cell holding this position at `resolution`.
    pub fn cell(self, resolution: Resolution) -> CellIndex {
        self.0.to_cell(resolution)
    }
}

fn subfields(field: &'static str) -> (&'static str, &'static str) {
    match field {
        "position" => ("position.lat", "position.lng"),
        _ => (field, field),
    }
}

/// Great-circle (haversine) distance in metres, on the mean Earth radius.
pub fn distance_m(a: LatLng, b: LatLng) -> f64 {
    Haversine.distance(Point::new(a.lng(), a.lat()), Point::new(b.lng(), b.lat()))
}

/// The Earth radius [`distance_m`] measures on (geo's GRS80 mean radius), in metres.
pub const EARTH_RADIUS_M: f64 = geo::HaversineMeasure::GRS80_MEAN_RADIUS.radius();

/// `p` as a point on the unit sphere.
pub fn unit_vector(p: LatLng) -> [f64; 3] {
    let (lat, lng) = (p.lat_radians(), p.lng_radians());
    let (sin_lat, cos_lat) = lat.sin_cos();
    let (sin_lng, cos_lng) = lng.sin_cos();
    [cos_lat * cos_lng, cos_lat * sin_lng, sin_lat]
}

/// The squared straight-line distance, through the unit sphere, between two points
/// `distance_m` metres apart along it (4 for antipodes and beyond).
///
/// It grows with the distance, so comparing `chord2(u, v)` of two unit vectors with
/// `chord2_of_m(d)` says whether they lie within `d` of each other, as [`distance_m`]
/// would (haversine's own `a` is this over 4), with a multiplication per point instead of
/// trigonometry.
pub fn chord2_of_m(distance_m: f64) -> f64 {
    let half_angle =
        (distance_m.max(0.0) / (2.0 * EARTH_RADIUS_M)).min(std::f64::consts::FRAC_PI_2);
    let s = half_angle.sin();
    4.0 * s * s
}

/// The squared straight-line distance between two points of the unit sphere (see
/// [`chord2_of_m`]).
#[inline]
pub fn chord2(u: [f64; 3], v: [f64; 3]) -> f64 {
    let (dx, dy, dz) = (u[0] - v[0], u[1] - v[1], u[2] - v[2]);
    dx * dx + dy * dy + dz * dz
}

/// The position a user is shown at to everyone else: the centre of their privacy cell.
///
/// Computed each time: only shakes ask (once per shake, and the Redis store's shake for each
/// waiter it reads), at spots that seldom repeat (see [`cell::Centres`]).
pub fn snapped(cell: CellIndex) -> LatLng {
    LatLng::from(cell)
}

/// Rounds a distance up to the band shown to clients: 100 m if within 100 m, then the next
/// multiple of 100 m up to 1 000 m, then the next multiple of 1 000 m.
pub fn band_m(distance_m: f64) -> u32 {
    let d = distance_m.max(0.0);
    let banded = if d <= 100.0 {
        100.0
    } else if d <= 1_000.0 {
        (d / 100.0).ceil() * 100.0
    } else {
        (d / 1_000.0).ceil() * 1_000.0
    };
    // Radii are bounded far below u32::MAX metres; saturate rather than wrap regardless.
    if banded >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        banded as u32
    }
}

/// Orders distances exactly and deterministically: millimetres, rounded.
pub fn distance_key(distance_m: f64) -> u64 {
    (distance_m.max(0.0) * 1_000.0).round() as u64
}

/// A point `dx_m` east and `dy_m` north of (lat, lng), clamped to valid coordinates: how
/// unit tests place users at known distances.
#[cfg(test)]
pub(crate) fn offset(lat: f64, lng: f64, dx_m: f64, dy_m: f64) -> (f64, f64) {
    const M_PER_DEG_LAT: f64 = 111_195.08;
    let lat2 = (lat + dy_m / M_PER_DEG_LAT).clamp(-89.999, 89.999);
    let lng2 = lng + dx_m / (M_PER_DEG_LAT * lat.to_radians().cos().max(0.01));
    (lat2, lng2.clamp(-180.0, 180.0))
}

/// A point drawn uniformly in latitude and longitude over the whole globe, poles and
/// antimeridian included: how unit tests sample spots anywhere.
#[cfg(test)]
pub(crate) fn anywhere(rng: &mut impl rand::Rng) -> LatLng {
    let lat = rng.random_range(-90.0..=90.0);
    let lng = rng.random_range(-180.0..=180.0);
    LatLng::new(lat, lng).expect("a latitude and longitude in range")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chords order points as `distance_m` does: the chord of two unit vectors is the
    /// chord of their haversine distance, to rounding, from metres to antipodes.
    #[test]
    fn chords_agree_with_haversine_distances() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(23);
        for _ in 0..20_000 {
            let a = anywhere(&mut rng);
            let b = if rng.random_bool(0.5) {
                // Nearby pairs, where searches compare.
                LatLng::new(
                    (a.lat() + rng.random_range(-0.5..0.5)).clamp(-90.0, 90.0),
                    a.lng() + rng.random_range(-0.5..0.5),
                )
                .unwrap()
            } else {
                LatLng::new(
                    rng.random_range(-90.0..=90.0),
                    rng.random_range(-180.0..=180.0),
                )
                .unwrap()
            };
            let (c, d) = (chord2(unit_vector(a), unit_vector(b)), distance_m(a, b));
            assert!(
                (c - chord2_of_m(d)).abs() <= 1e-12,
                "{a:?} {b:?}: {c} vs {d} m"
            );
            // Strictly growing: a metre more or less is told apart at every distance.
            assert!(chord2_of_m(d + 1.0) > c || d + 1.0 > std::f64::consts::PI * EARTH_RADIUS_M);
            assert!(chord2_of_m((d - 1.0).max(0.0)) < c || d < 1.0);
        }
        assert_eq!(chord2_of_m(0.0), 0.0);
        assert_eq!(chord2_of_m(1e12), 4.0);
    }

    #[test]
    fn bands_follow_the_contract() {
        let cases = [
            (0.0, 100),
            (99.9, 100),
            (100.0, 100),
            (100.1, 200),
            (250.0, 300),
            (999.0, 1_000),
            (1_000.0, 1_000),
            (1_000.5, 2_000),
            (9_999.0, 10_000),
            (49_000.1, 50_000),
        ];
        for (d, want) in cases {
            assert_eq!(band_m(d), want, "band of {d}");
        }
    }

    #[test]
    fn bands_never_understate_and_are_monotonic() {
        let mut last = 0;
        for i in 0..200_000 {
            let d = f64::from(i) * 0.37;
            let b = band_m(d);
            assert!(f64::from(b) >= d, "{d} banded to {b}");
            assert!(b >= last);
            last = b;
        }
    }

    #[test]
    fn coordinates_reject_out_of_range_and_non_finite() {
        for (lat, lng, field) in [
            (90.1, 0.0, "position.lat"),
            (-90.1, 0.0, "position.lat"),
            (f64::NAN, 0.0, "position.lat"),
            (f64::INFINITY, 0.0, "position.lat"),
            (0.0, 180.5, "position.lng"),
            (0.0, f64::NEG_INFINITY, "position.lng"),
            (0.0, f64::NAN, "position.lng"),
        ] {
            match Coordinates::new("position", lat, lng) {
                Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
                other => panic!("({lat}, {lng}) gave {other:?}"),
            }
        }
        assert!(Coordinates::new("position", 90.0, -180.0).is_ok());
        assert!(Coordinates::new("position", -90.0, 180.0).is_ok());
    }

    #[test]
    fn distance_matches_a_known_figure() {
        // One degree of latitude on the mean Earth radius (6 371 008.8 m).
        let a = LatLng::new(0.0, 0.0).unwrap();
        let b = LatLng::new(1.0, 0.0).unwrap();
        let d = distance_m(a, b);
        assert!((d - 111_195.08).abs() < 1.0, "{d}");
    }
}
