//! Protobuf <-> domain conversions. Every request is decoded and validated here into the
//! domain type its room acts on (by that room's rules), once; a missing message field is
//! INVALID_ARGUMENT. The services and the fuzz entry points share these functions.

use tokio::time::Instant;

use super::pb;
use crate::{
    error::{Error, Result},
    geo::{
        Coordinates,
        value::{RadiusRule, TtlRule},
    },
    id::{ShakeId, UserId},
    nearby::{Found, Gender, LocationStatus, Ping, Query, SearchRequest, WatchRequest},
    shake::{Fallback, Match, Outcome, ShakeRequest, Tier, ValidShake},
    store::{NearbyStore, ShakeStore},
};

pub(super) fn user_id(value: &str) -> Result<UserId> {
    UserId::new("user_id", value)
}

fn shake_id(value: &str) -> Result<ShakeId> {
    ShakeId::new("shake_id", value)
}

pub(super) fn position(value: Option<pb::LatLng>) -> Result<Coordinates> {
    let p = value.ok_or_else(|| Error::invalid("position", "is required"))?;
    Coordinates::new("position", p.lat, p.lng)
}

pub(super) fn gender(value: i32) -> Result<Gender> {
    match pb::Gender::try_from(value) {
        Ok(pb::Gender::Unspecified) => Ok(Gender::Unspecified),
        Ok(pb::Gender::Female) => Ok(Gender::Female),
        Ok(pb::Gender::Male) => Ok(Gender::Male),
        Err(_) => Err(Error::invalid(
            "gender",
            format!(
                "unknown value {value}; expected GENDER_UNSPECIFIED, GENDER_FEMALE or GENDER_MALE"
            ),
        )),
    }
}

fn visible(value: i32) -> Result<bool> {
    match pb::Visibility::try_from(value) {
        Ok(pb::Visibility::Visible) => Ok(true),
        Ok(pb::Visibility::Invisible) => Ok(false),
        Err(_) => Err(Error::invalid(
            "visibility",
            format!("unknown value {value}; expected VISIBILITY_VISIBLE or VISIBILITY_INVISIBLE"),
        )),
    }
}

/// A location ping, its time to live checked by `ttl`.
pub(super) fn ping(req: pb::UpdateLocationRequest, ttl: &TtlRule) -> Result<Ping> {
    Ok(Ping {
        user: user_id(&req.user_id)?,
        position: position(req.position)?,
        gender: gender(req.gender)?,
        visible: visible(req.visibility)?,
        ttl: ttl.apply(req.ttl_s)?,
    })
}

/// A WatchNearby request, its radius checked by `radius`.
pub(super) fn watch(req: &pb::WatchNearbyRequest, radius: &RadiusRule) -> Result<WatchRequest> {
    Ok(WatchRequest {
        watcher: user_id(&req.user_id)?,
        radius: radius.apply(req.radius_m)?,
        gender: gender(req.gender)?,
    })
}

/// A shake, checked by the matcher's rules; `deadline` is the caller's own.
pub(super) fn shake(
    req: pb::ShakeRequest,
    matcher: &ShakeStore,
    deadline: Option<Instant>,
) -> Result<ValidShake> {
    matcher.validate(ShakeRequest {
        user: user_id(&req.user_id)?,
        position: position(req.position)?,
        shake_id: shake_id(&req.shake_id)?,
        max_distance_m: req.max_distance_m,
        exclude: excludes(&req.exclude_user_ids)?,
        deadline,
        fallback: fallback(req.fallback)?,
    })
}

pub(super) fn location_status(s: Option<LocationStatus>) -> pb::GetLocationStatusResponse {
    let Some(s) = s else {
        return pb::GetLocationStatusResponse::default();
    };
    let visibility = if s.visible {
        pb::Visibility::Visible
    } else {
        pb::Visibility::Invisible
    };
    pb::GetLocationStatusResponse {
        found: true,
        cell: s.cell.to_string(),
        visibility: visibility.into(),
        last_seen_ms: s.last_seen_ms,
        expires_at_ms: s.expires_at_ms,
        gender: gender_to_pb(s.gender).into(),
    }
}

fn fallback(value: i32) -> Result<Fallback> {
    match pb::shake_request::Fallback::try_from(value) {
        Ok(pb::shake_request::Fallback::None) => Ok(Fallback::None),
        Ok(pb::shake_request::Fallback::Anywhere) => Ok(Fallback::Anywhere),
        Err(_) => Err(Error::invalid(
            "fallback",
            format!("unknown value {value}; expected NONE or ANYWHERE"),
        )),
    }
}

/// A search, checked by the store's rules and page-token key.
pub(super) fn search(req: pb::SearchNearbyRequest, store: &NearbyStore) -> Result<Query> {
    store.query(&SearchRequest {
        searcher: user_id(&req.user_id)?,
        centre: position(req.position)?,
        radius_m: req.radius_m,
        limit: req.limit,
        gender: gender(req.gender)?,
        page_token: req.page_token,
    })
}

fn excludes(values: &[String]) -> Result<Vec<UserId>> {
    values
        .iter()
        .map(|v| UserId::new("exclude_user_ids", v))
        .collect()
}

fn gender_to_pb(g: Gender) -> pb::Gender {
    match g {
        Gender::Unspecified => pb::Gender::Unspecified,
        Gender::Female => pb::Gender::Female,
        Gender::Male => pb::Gender::Male,
    }
}

pub(super) fn found(f: Found) -> pb::NearbyUser {
    pb::NearbyUser {
        user_id: f.user.to_string(),
        distance_m: f.distance_m,
        gender: gender_to_pb(f.gender).into(),
        last_seen_ms: f.last_seen_ms,
    }
}

pub(super) fn outcome(o: Outcome) -> pb::ShakeResponse {
    use pb::shake_response::Outcome as PbOutcome;
    match o {
        Outcome::Matched(Match {
            partner,
            distance_m,
            match_id,
            tier,
        }) => pb::ShakeResponse {
            outcome: PbOutcome::Matched.into(),
            partner_user_id: partner.to_string(),
            distance_m,
            match_id: match_id.to_string(),
            tier: match tier {
                Tier::Nearby => pb::shake_response::Tier::Nearby,
                Tier::Anywhere => pb::shake_response::Tier::Anywhere,
            }
            .into(),
        },
        Outcome::NoMatch => pb::ShakeResponse {
            outcome: PbOutcome::NoMatch.into(),
            ..Default::default()
        },
    }
}
