//! The People Nearby contract as a brute-force model: a random population pinged through
//! real gRPC, and for any query the exact list a walk of every page must return. One model
//! for every store, so memory, Redis and a Cluster are held to the same answers.

use std::collections::HashMap;

use geomatch::{
    geo::{band_m, distance_key, distance_m, snapped},
    grpc::pb::{Gender, nearby_client::NearbyClient},
};
use rand::Rng;
use tonic::transport::Channel;

use super::{
    build::{PingExt as _, SearchExt as _, ping, search},
    fixtures::{point, privacy_cell, scattered},
};

/// Who was pinged where, with which gender (wire number).
#[derive(Debug, Default)]
pub struct Model {
    pub users: HashMap<String, ((f64, f64), i32)>,
}

/// Pings `n` users named `{prefix}{i}` scattered within `deg` of `centre`, with random
/// genders, through `c`.
pub async fn populate(
    c: &mut NearbyClient<Channel>,
    rng: &mut impl Rng,
    prefix: &str,
    n: usize,
    centre: (f64, f64),
    deg: f64,
) -> Model {
    let mut model = Model::default();
    for i in 0..n {
        let id = format!("{prefix}{i:06}");
        let at = scattered(rng, centre, deg);
        let gender = [Gender::Unspecified, Gender::Female, Gender::Male][rng.random_range(0..3)];
        c.update_location(ping(&id, at).with_gender(gender))
            .await
            .unwrap();
        model.users.insert(id, (at, gender.into()));
    }
    model
}

/// A random query around `centre`: (searcher, position, radius, limit, gender).
pub fn random_query(
    rng: &mut impl Rng,
    model: &Model,
    centre: (f64, f64),
    deg: f64,
) -> geomatch::grpc::pb::SearchNearbyRequest {
    let mut ids: Vec<&String> = model.users.keys().collect();
    ids.sort();
    let searcher = ids[rng.random_range(0..ids.len())].clone();
    search(&searcher, scattered(rng, centre, deg))
        .radius([0.0, 300.0, 1_000.0, 3_000.0][rng.random_range(0..4)])
        .limit([0, 3, 50, 100][rng.random_range(0..4)])
        .with_gender(rng.random_range(0..3))
}

/// Walks every page of `req`, page `i` through `clients[i % len]` (a token issued by one
/// replica continued on another); returns (user, banded distance) in order.
pub async fn walk(
    clients: &mut [NearbyClient<Channel>],
    mut req: geomatch::grpc::pb::SearchNearbyRequest,
) -> Vec<(String, u32)> {
    let mut got = Vec::new();
    for i in 0.. {
        let c = &mut clients[i % clients.len()];
        let page = c.search_nearby(req.clone()).await.unwrap().into_inner();
        got.extend(page.users.into_iter().map(|u| (u.user_id, u.distance_m)));
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    got
}

/// What a walk of every page of `req` must return over `model` (server default radius
/// 1 km): everyone but the searcher within the radius of the searcher's exact position,
/// measured to their privacy cell's centre, filtered by gender, nearest first, ties by id.
pub fn expected(
    model: &Model,
    req: &geomatch::grpc::pb::SearchNearbyRequest,
) -> Vec<(String, u32)> {
    let at = req.position.as_ref().map_or((0.0, 0.0), |p| (p.lat, p.lng));
    let q = point(at);
    let r = if req.radius_m == 0.0 {
        1_000.0
    } else {
        req.radius_m
    };
    let mut want: Vec<_> = model
        .users
        .iter()
        .filter(|(id, (_, g))| **id != req.user_id && (req.gender == 0 || *g == req.gender))
        .filter_map(|(id, (at, _))| {
            let d = distance_m(q, snapped(privacy_cell(*at)));
            (d <= r).then(|| (distance_key(d), id.clone(), band_m(d)))
        })
        .collect();
    want.sort();
    want.into_iter().map(|(_, id, band)| (id, band)).collect()
}
