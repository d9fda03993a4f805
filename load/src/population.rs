//! The standard benchmark population, reproducible from a seed: what the load generator,
//! the criterion benches and the peer comparison all index.
//!
//! N users with 17-byte ids `user:%012d`; 80 % Gaussian around ten Chinese city centres
//! (σ = 5 km on each axis), 20 % uniform over lat 20..45, lng 100..125.

use rand::{Rng, SeedableRng, rngs::StdRng};

/// The ten city centres, (name, lat, lng).
pub const CITIES: [(&str, f64, f64); 10] = [
    ("Shanghai", 31.2304, 121.4737),
    ("Beijing", 39.9042, 116.4074),
    ("Guangzhou", 23.1291, 113.2644),
    ("Shenzhen", 22.5431, 114.0579),
    ("Chengdu", 30.5728, 104.0668),
    ("Chongqing", 29.5630, 106.5516),
    ("Wuhan", 30.5928, 114.3055),
    ("Xi'an", 34.3416, 108.9398),
    ("Nanjing", 32.0603, 118.7969),
    ("Qingdao", 36.0671, 120.3826),
];

/// Metres per degree of latitude on the mean Earth radius.
pub const M_PER_DEG_LAT: f64 = 111_195.08;
const SIGMA_M: f64 = 5_000.0;

/// The id of user `i`: `user:%012d` (17 bytes).
pub fn user_id(i: u64) -> String {
    format!("user:{i:012}")
}

/// A standard normal sample (Box–Muller).
pub fn gaussian(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A point `dx_m` east and `dy_m` north of (lat, lng), clamped to valid coordinates.
pub fn offset(lat: f64, lng: f64, dx_m: f64, dy_m: f64) -> (f64, f64) {
    let lat2 = (lat + dy_m / M_PER_DEG_LAT).clamp(-89.999, 89.999);
    let lng2 = lng + dx_m / (M_PER_DEG_LAT * lat.to_radians().cos().max(0.01));
    (lat2, lng2.clamp(-180.0, 180.0))
}

/// One user's position.
pub fn position(rng: &mut impl Rng) -> (f64, f64) {
    position_spread(rng, SIGMA_M)
}

/// One user's position, with the cities spread by `sigma_m` instead of 5 km: scaling
/// sigma with the square root of the population keeps local density equal across sizes.
pub fn position_spread(rng: &mut impl Rng, sigma_m: f64) -> (f64, f64) {
    if rng.random_bool(0.8) {
        let (_, lat, lng) = CITIES[rng.random_range(0..CITIES.len())];
        offset(lat, lng, gaussian(rng) * sigma_m, gaussian(rng) * sigma_m)
    } else {
        (rng.random_range(20.0..45.0), rng.random_range(100.0..125.0))
    }
}

/// The positions of users `0..n`, deterministic for `seed`.
pub fn positions(n: u64, seed: u64) -> Vec<(f64, f64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| position(&mut rng)).collect()
}

/// A point at least 100 km from every city (for sparse searches), deterministic from `rng`.
pub fn sparse_point(rng: &mut impl Rng) -> (f64, f64) {
    loop {
        let (lat, lng) = (rng.random_range(20.0..45.0), rng.random_range(100.0..125.0));
        let far = CITIES.iter().all(|&(_, clat, clng)| {
            let dy = (lat - clat) * M_PER_DEG_LAT;
            let dx = (lng - clng) * M_PER_DEG_LAT * clat.to_radians().cos();
            dx.hypot(dy) > 100_000.0
        });
        if far {
            return (lat, lng);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_reproducible_and_shaped_as_documented() {
        let a = positions(20_000, 42);
        assert_eq!(a, positions(20_000, 42));
        assert_ne!(a, positions(20_000, 43));
        assert_eq!(user_id(7).len(), 17);
        // About 80 % within 20 km (4 σ) of a city centre.
        let near = a
            .iter()
            .filter(|&&(lat, lng)| {
                CITIES.iter().any(|&(_, clat, clng)| {
                    let dy = (lat - clat) * M_PER_DEG_LAT;
                    let dx = (lng - clng) * M_PER_DEG_LAT * clat.to_radians().cos();
                    dx.hypot(dy) < 20_000.0
                })
            })
            .count();
        let share = near as f64 / a.len() as f64;
        assert!((0.79..0.83).contains(&share), "{share}");
        // The Gaussian has σ ≈ 1.
        let mut rng = StdRng::seed_from_u64(1);
        let xs: Vec<f64> = (0..50_000).map(|_| gaussian(&mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.03,
            "{mean} {var}"
        );
    }
}
