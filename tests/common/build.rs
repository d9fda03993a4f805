//! One builder per request message: the fields every call needs, proto defaults for the
//! rest. Tests vary a request with struct-update syntax (`pb::X { field, ..ping(..) }`) or,
//! for the fields varied most, the chained helpers of [`PingExt`] and [`SearchExt`].

use geomatch::grpc::pb;

/// A `pb::LatLng` field value.
pub fn latlng(lat: f64, lng: f64) -> Option<pb::LatLng> {
    Some(pb::LatLng { lat, lng })
}

/// `user` reports standing at `at`.
pub fn ping(user: &str, (lat, lng): (f64, f64)) -> pb::UpdateLocationRequest {
    pb::UpdateLocationRequest {
        user_id: user.into(),
        position: latlng(lat, lng),
        ..Default::default()
    }
}

/// `user` searches around `at` with the server's default radius and page size.
pub fn search(user: &str, (lat, lng): (f64, f64)) -> pb::SearchNearbyRequest {
    pb::SearchNearbyRequest {
        user_id: user.into(),
        position: latlng(lat, lng),
        ..Default::default()
    }
}

/// `user` shakes at `at`, within the default distance.
pub fn shake(user: &str, shake_id: &str, (lat, lng): (f64, f64)) -> pb::ShakeRequest {
    pb::ShakeRequest {
        user_id: user.into(),
        position: latlng(lat, lng),
        shake_id: shake_id.into(),
        ..Default::default()
    }
}

/// `user` watches everyone within `radius_m` of where it last pinged.
pub fn watch(user: &str, radius_m: f64) -> pb::WatchNearbyRequest {
    pb::WatchNearbyRequest {
        user_id: user.into(),
        radius_m,
        ..Default::default()
    }
}

pub fn clear(user: &str) -> pb::ClearLocationRequest {
    pb::ClearLocationRequest {
        user_id: user.into(),
    }
}

pub fn status(user: &str) -> pb::GetLocationStatusRequest {
    pb::GetLocationStatusRequest {
        user_id: user.into(),
    }
}

/// Chained variations on [`ping`].
pub trait PingExt {
    /// `gender` is a `pb::Gender` or, to send an invalid one, any `i32`.
    fn with_gender(self, gender: impl Into<i32>) -> Self;
}

impl PingExt for pb::UpdateLocationRequest {
    fn with_gender(self, gender: impl Into<i32>) -> Self {
        Self {
            gender: gender.into(),
            ..self
        }
    }
}

/// Chained variations on [`search`].
pub trait SearchExt {
    fn radius(self, radius_m: f64) -> Self;
    fn limit(self, limit: u32) -> Self;
    /// Only users of `gender` (a `pb::Gender` or any `i32`).
    fn with_gender(self, gender: impl Into<i32>) -> Self;
}

impl SearchExt for pb::SearchNearbyRequest {
    fn radius(self, radius_m: f64) -> Self {
        Self { radius_m, ..self }
    }

    fn limit(self, limit: u32) -> Self {
        Self { limit, ..self }
    }

    fn with_gender(self, gender: impl Into<i32>) -> Self {
        Self {
            gender: gender.into(),
            ..self
        }
    }
}
