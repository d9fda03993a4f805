//! The attacker's view: trilateration from fake positions against the running service
//! learns a victim's privacy cell, and nothing finer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    build::{SearchExt as _, clear, ping, search},
    fixtures::{SHANGHAI, cell_centre, moved, point, privacy_cell},
    start,
};
use geomatch::{geo::distance_m, grpc::pb::nearby_client::NearbyClient};
use h3o::LatLng;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::transport::Channel;

/// The attacker: searches from any position it likes and reads the victim's banded
/// distance (None when the victim is not within the radius).
struct Attacker {
    client: NearbyClient<Channel>,
    victim: String,
    /// Local frame: metres east / north of this point.
    origin: (f64, f64),
    queries: usize,
}

impl Attacker {
    fn at(&self, x: f64, y: f64) -> (f64, f64) {
        moved(self.origin, x, y)
    }

    async fn band(&mut self, x: f64, y: f64) -> Option<u32> {
        self.queries += 1;
        let page = self
            .client
            .search_nearby(search("attacker", self.at(x, y)).radius(1_000.0).limit(100))
            .await
            .unwrap()
            .into_inner();
        page.users
            .iter()
            .find(|u| u.user_id == self.victim)
            .map(|u| u.distance_m)
    }

    /// Where along the ray from (x0, y0) in direction `theta` the victim's band turns
    /// from 100 (within 100 m) to more: a point exactly 100 m from what the service
    /// measures to. Bisection to well under a millimetre.
    async fn edge(&mut self, (x0, y0): (f64, f64), theta: f64) -> (f64, f64) {
        let (mut inside, mut outside) = (0.0, 400.0);
        for _ in 0..24 {
            let t = (inside + outside) / 2.0;
            let near = self.band(x0 + t * theta.cos(), y0 + t * theta.sin()).await == Some(100);
            if near {
                inside = t;
            } else {
                outside = t;
            }
        }
        let t = (inside + outside) / 2.0;
        (x0 + t * theta.cos(), y0 + t * theta.sin())
    }

    /// The attacker's best estimate of the victim's position, in the local frame: find a
    /// spot within the 100 m band, then six points on that band's edge, and average the
    /// centres of the circles through alternate triples.
    async fn locate(&mut self) -> (f64, f64) {
        let mut start = None;
        'grid: for i in -5..=5 {
            for j in -5..=5 {
                let (x, y) = (f64::from(i) * 100.0, f64::from(j) * 100.0);
                if self.band(x, y).await == Some(100) {
                    start = Some((x, y));
                    break 'grid;
                }
            }
        }
        let start = start.expect("some grid point lies within 100 m of the victim");
        let mut pts = Vec::new();
        for k in 0..6 {
            pts.push(
                self.edge(start, f64::from(k) * std::f64::consts::TAU / 6.0)
                    .await,
            );
        }
        let a = circumcentre(pts[0], pts[2], pts[4]);
        let b = circumcentre(pts[1], pts[3], pts[5]);
        ((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0)
    }
}

fn circumcentre((ax, ay): (f64, f64), (bx, by): (f64, f64), (cx, cy): (f64, f64)) -> (f64, f64) {
    let d = 2.0 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by));
    let a2 = ax * ax + ay * ay;
    let b2 = bx * bx + by * by;
    let c2 = cx * cx + cy * cy;
    (
        (a2 * (by - cy) + b2 * (cy - ay) + c2 * (ay - by)) / d,
        (a2 * (cx - bx) + b2 * (ax - cx) + c2 * (bx - ax)) / d,
    )
}

/// One victim: placed, attacked, cleared. Returns (queries, how much closer than the cell
/// centre the attacker got).
async fn attack(client: NearbyClient<Channel>, v: u64) -> (usize, f64) {
    let mut rng = StdRng::seed_from_u64(2024 + v);
    let mut feed = client.clone();
    let victim = format!("victim-{v}");
    // Victims far apart (one per 20 km square), so each attack sees only its own.
    let truth = moved(
        SHANGHAI,
        (v % 20) as f64 * 20_000.0 + rng.random_range(-3_000.0..3_000.0),
        (v / 20) as f64 * 20_000.0 + rng.random_range(-3_000.0..3_000.0),
    );
    feed.update_location(ping(&victim, truth)).await.unwrap();
    // The attacker starts from a rough fix within 100 m of the victim.
    let origin = moved(
        truth,
        rng.random_range(-70.0..70.0),
        rng.random_range(-70.0..70.0),
    );
    let mut attacker = Attacker {
        client,
        victim: victim.clone(),
        origin,
        queries: 0,
    };
    let (x, y) = attacker.locate().await;
    let estimate = attacker.at(x, y);
    let centre = LatLng::from(privacy_cell(truth));
    let error = distance_m(point(estimate), point(truth));
    let offset_from_centre = distance_m(point(truth), centre);
    // The guarantee: no better than the privacy cell's centre tells.
    assert!(
        error >= offset_from_centre - 5.0,
        "victim {v}: estimate {error:.1} m off, but the cell centre is {offset_from_centre:.1} m off"
    );
    // And the attack works as well as the service allows: it finds that centre.
    assert!(
        distance_m(point(estimate), centre) < 1.0,
        "victim {v}: the attack should pin the cell centre"
    );
    feed.clear_location(clear(&victim)).await.unwrap();
    (attacker.queries, offset_from_centre - error)
}

/// `victims` attacked at once through `client`: each attack pins the privacy cell's
/// centre, takes hundreds of queries, and gets no closer than that centre.
async fn attacks(client: NearbyClient<Channel>, victims: u64) {
    let attacks: Vec<_> = (0..victims)
        .map(|v| tokio::spawn(attack(client.clone(), v)))
        .collect();
    let mut total_queries = 0;
    let mut worst_gain = f64::NEG_INFINITY;
    for a in attacks {
        let (queries, gain) = a.await.unwrap();
        total_queries += queries;
        worst_gain = worst_gain.max(gain);
    }
    assert!(
        total_queries >= victims as usize * 150,
        "hundreds of queries per victim: {total_queries}"
    );
    assert!(worst_gain <= 5.0, "{worst_gain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trilateration_learns_the_privacy_cell_and_nothing_finer() {
    let server = start(&[]).await;
    attacks(server.nearby().await, 200).await;
    server.stop().await;
}

/// The same attack against replicas over a Redis Cluster: the store holds nothing finer
/// either (fewer victims: each query crosses the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trilateration_over_a_cluster_learns_the_privacy_cell_and_nothing_finer() {
    let Some(cluster) = common::redis::shared_cluster().await else {
        return;
    };
    let nodes = cluster.seeds().join(",");
    let server = common::start_store(&["--store", "redis-cluster", "--redis-nodes", &nodes]).await;
    attacks(server.nearby().await, 20).await;
    server.stop().await;
}

#[tokio::test]
async fn users_in_one_privacy_cell_come_back_in_id_order_wherever_they_stand() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let cell = privacy_cell(SHANGHAI);
    let centre = cell_centre(SHANGHAI);
    // Ids in reverse order of their true distance from the searcher: only ids may order
    // users of one cell.
    let mut placed = 0;
    let mut rng = StdRng::seed_from_u64(5);
    while placed < 12 {
        let at = moved(
            centre,
            rng.random_range(-150.0..150.0),
            rng.random_range(-150.0..150.0),
        );
        if privacy_cell(at) != cell {
            continue;
        }
        c.update_location(ping(&format!("u{:02}", 99 - placed), at))
            .await
            .unwrap();
        placed += 1;
    }
    let searcher = moved(centre, 700.0, 0.0);
    let page = c
        .search_nearby(search("searcher", searcher).radius(2_000.0).limit(100))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = page.users.iter().map(|u| u.user_id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted);
    assert!(
        page.users
            .iter()
            .all(|u| u.distance_m == page.users[0].distance_m)
    );
    server.stop().await;
}

/// Page tokens are opaque: the exact distance of the last user of a page (finer than
/// its band) is nowhere in a token, decoded as an attacker would (base64), from many
/// spots; two searches from one spot give two different tokens.
#[tokio::test]
async fn page_tokens_reveal_nothing_finer_than_the_band() {
    use base64::Engine as _;
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let victim_at = moved(SHANGHAI, 123.0, -45.0);
    c.update_location(ping("tv:victim", victim_at))
        .await
        .unwrap();
    c.update_location(ping("tv:other", moved(SHANGHAI, 400.0, 400.0)))
        .await
        .unwrap();
    let victim_centre = LatLng::from(privacy_cell(victim_at));
    let mut rng = StdRng::seed_from_u64(77);
    let mut tokens = std::collections::HashSet::new();
    for _ in 0..50 {
        let from = moved(
            SHANGHAI,
            rng.random_range(-300.0..300.0),
            rng.random_range(-300.0..300.0),
        );
        let page = c
            .search_nearby(search("tv:attacker", from).radius(2_000.0).limit(1))
            .await
            .unwrap()
            .into_inner();
        if page.users.first().map(|u| u.user_id.as_str()) != Some("tv:victim") {
            continue;
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&page.next_page_token)
            .unwrap();
        let exact = geomatch::geo::distance_key(distance_m(point(from), victim_centre));
        for k in [exact.saturating_sub(1), exact, exact + 1] {
            let le = k.to_le_bytes();
            let be = k.to_be_bytes();
            assert!(
                !raw.windows(8).any(|w| w == le || w == be),
                "a token holds the exact distance"
            );
        }
        assert!(
            !raw.windows(9).any(|w| w == b"tv:victim"),
            "a token holds the id in clear"
        );
        assert!(tokens.insert(page.next_page_token), "a token repeated");
    }
    assert!(
        tokens.len() >= 10,
        "the victim came first from enough spots"
    );
    server.stop().await;
}
