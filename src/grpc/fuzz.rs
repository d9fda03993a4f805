//! Entry points for fuzzing: everything a client can send, decoded and validated exactly
//! as the services do, must end in a value or a clear error, never a panic.
//!
//! Driven by the cargo-fuzz targets in `fuzz/` (run by `.ci/run` where a nightly
//! toolchain is available) and by the smoke tests below, which `cargo test` runs
//! everywhere, together with every input in `fuzz/corpus/` (seeds and any crash
//! reproducer found, kept as regression tests).

use std::sync::OnceLock;

use prost::Message;

use super::{convert, pb};
use crate::{
    error::Error,
    id::UserId,
    nearby::{NearbyConfig, NearbyIndex, PageTokens, SearchRequest},
    shake::{Matcher, ShakeConfig},
    store::{NearbyStore, ShakeStore},
};

struct Fixture {
    index: std::sync::Arc<NearbyIndex>,
    store: NearbyStore,
    matcher: ShakeStore,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let index = std::sync::Arc::new(NearbyIndex::new(
            NearbyConfig::default(),
            PageTokens::new([9; 32]),
        ));
        Fixture {
            store: NearbyStore::Memory(index.clone()),
            index,
            matcher: ShakeStore::Memory(std::sync::Arc::new(Matcher::new(ShakeConfig::default()))),
        }
    })
}

/// What became of one fuzz input, for the smoke tests' statistics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Verdicts {
    /// Messages the input decoded as.
    pub decoded: u32,
    /// Decoded messages that also passed validation.
    pub valid: u32,
}

fn tally(v: &mut Verdicts, r: Result<(), Error>) {
    v.decoded += 1;
    if r.is_ok() {
        v.valid += 1;
    }
}

/// Decodes `data` as every request message the services take and validates each that
/// decodes, without storing anything.
pub fn requests(data: &[u8]) -> Verdicts {
    let f = fixture();
    let mut v = Verdicts::default();
    if let Ok(req) = pb::UpdateLocationRequest::decode(data) {
        tally(&mut v, convert::ping(req, &f.index.config().ttl).map(drop));
    }
    if let Ok(req) = pb::SearchNearbyRequest::decode(data) {
        // The index is empty: this validates radius, limit and token, and stores nothing.
        let r = convert::search(req, &f.store).map(|q| drop(f.index.search(&q, 0)));
        tally(&mut v, r);
    }
    if let Ok(req) = pb::ShakeRequest::decode(data) {
        let r = convert::shake(req, &f.matcher, None).map(drop);
        tally(&mut v, r);
    }
    if let Ok(req) = pb::WatchNearbyRequest::decode(data) {
        let r = (|| {
            let w = convert::watch(&req, &f.index.config().radius)?;
            // Nobody has a location in the fixture: a valid request ends in
            // FAILED_PRECONDITION, never in an open watch.
            match f.index.watch(&w, 0) {
                Err(Error::FailedPrecondition { .. }) => Ok(()),
                Err(e) => Err(e),
                Ok(_) => Err(Error::ResourceExhausted("unexpected watch".into())),
            }
        })();
        tally(&mut v, r);
    }
    for id in [
        pb::ClearLocationRequest::decode(data).map(|r| r.user_id),
        pb::GetLocationStatusRequest::decode(data).map(|r| r.user_id),
    ]
    .into_iter()
    .flatten()
    {
        tally(&mut v, UserId::new("user_id", &id).map(drop));
    }
    v
}

/// Decodes `token` as a page token of a fixed query (through the search path, as a client
/// would send it); returns whether it was accepted.
pub fn page_token(token: &str) -> bool {
    let f = fixture();
    let Ok(centre) = crate::geo::Coordinates::new("position", 31.23, 121.47) else {
        return false;
    };
    let q = SearchRequest {
        searcher: UserId::trusted("fuzzer"),
        centre,
        radius_m: 1_000.0,
        limit: 10,
        gender: crate::nearby::Gender::Unspecified,
        page_token: token.to_string(),
    };
    f.index.query(&q).is_ok()
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                out.push(std::fs::read(e.path()).unwrap());
            }
        }
        out
    }

    fn valid_messages() -> Vec<Vec<u8>> {
        vec![
            pb::UpdateLocationRequest {
                user_id: "alice".into(),
                position: Some(pb::LatLng {
                    lat: 31.23,
                    lng: 121.47,
                }),
                gender: 1,
                visibility: 1,
                ttl_s: 3_600,
            }
            .encode_to_vec(),
            pb::SearchNearbyRequest {
                user_id: "bob".into(),
                position: Some(pb::LatLng { lat: 1.0, lng: 2.0 }),
                radius_m: 500.0,
                limit: 10,
                gender: 2,
                page_token: "abc".into(),
            }
            .encode_to_vec(),
            pb::ShakeRequest {
                user_id: "carol".into(),
                position: Some(pb::LatLng { lat: 1.0, lng: 2.0 }),
                shake_id: "s".into(),
                max_distance_m: 100.0,
                exclude_user_ids: vec!["x".into(), "y".into()],
                fallback: 1,
            }
            .encode_to_vec(),
        ]
    }

    #[test]
    fn random_and_mutated_requests_never_panic() {
        let mut rng = StdRng::seed_from_u64(99);
        let seeds: Vec<Vec<u8>> = valid_messages()
            .into_iter()
            .chain(corpus("requests"))
            .collect();
        let mut total = Verdicts::default();
        for seed in &seeds {
            let v = requests(seed);
            total.decoded += v.decoded;
            total.valid += v.valid;
        }
        assert!(total.valid > 0, "the seeds include valid requests");
        for i in 0..60_000 {
            let data: Vec<u8> = if i % 2 == 0 {
                let n = rng.random_range(0..64);
                (0..n).map(|_| rng.random()).collect()
            } else {
                let mut d = seeds[rng.random_range(0..seeds.len())].clone();
                for _ in 0..rng.random_range(1..6) {
                    if d.is_empty() {
                        break;
                    }
                    let at = rng.random_range(0..d.len());
                    match rng.random_range(0..3) {
                        0 => d[at] = rng.random(),
                        1 => {
                            d.remove(at);
                        }
                        _ => d.insert(at, rng.random()),
                    }
                }
                d
            };
            let v = requests(&data);
            total.decoded += v.decoded;
            total.valid += v.valid;
        }
        assert!(total.decoded > total.valid, "mutations hit the validators");
        assert_eq!(fixture().index.len(), 0, "validation stores nothing");
    }

    #[test]
    fn random_and_mutated_page_tokens_are_refused_without_panicking() {
        let mut rng = StdRng::seed_from_u64(7);
        let seeds: Vec<String> = corpus("page_token")
            .into_iter()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .chain(["".to_string(), "AAAA".to_string(), "-_-_".repeat(40)])
            .collect();
        let alphabet: Vec<char> = ('A'..='Z')
            .chain('a'..='z')
            .chain('0'..='9')
            .chain(['-', '_', '=', '+', '/', 'é', '\0'])
            .collect();
        for i in 0..30_000 {
            let token: String = if i % 2 == 0 {
                let n = rng.random_range(0..120);
                (0..n)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect()
            } else {
                let mut t: Vec<char> = seeds[rng.random_range(0..seeds.len())].chars().collect();
                if !t.is_empty() {
                    let at = rng.random_range(0..t.len());
                    t[at] = alphabet[rng.random_range(0..alphabet.len())];
                }
                t.into_iter().collect()
            };
            // Only the empty token (first page) is accepted: nothing forged gets through.
            assert_eq!(page_token(&token), token.is_empty(), "{token:?}");
        }
    }
}
