//! Round trips, expiry across restarts, and every way a file can be damaged.

use h3o::Resolution;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::{
    geo::Coordinates,
    nearby::{NearbyConfig, PageTokens, Ping},
};

const TTL: i64 = 15 * 60 * 1_000;

fn index() -> NearbyIndex {
    NearbyIndex::new(NearbyConfig::default(), PageTokens::new([1; 32]))
}

fn populated(n: usize, now: i64) -> NearbyIndex {
    let idx = index();
    let mut rng = StdRng::seed_from_u64(n as u64);
    for i in 0..n {
        let p = Coordinates::new(
            "p",
            rng.random_range(-60.0..60.0),
            rng.random_range(-180.0..180.0),
        )
        .unwrap();
        let g = Gender::from_wire(rng.random_range(0..3)).unwrap();
        let seen = now - rng.random_range(0..TTL);
        idx.update(
            UserId::new("u", &format!("user:{i:012}")).unwrap(),
            p,
            g,
            seen,
        );
    }
    idx
}

fn records(idx: &NearbyIndex) -> Vec<Record> {
    let mut out = Vec::new();
    idx.for_each_record(|r| out.push(r.clone()));
    out.sort_by(|a, b| a.user.cmp(&b.user));
    out
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("geomatch-snap-{}-{name}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir.join("index.snap")
}

#[test]
fn round_trips_through_a_file() {
    let now = 1_700_000_000_000;
    let idx = populated(5_000, now);
    let path = temp_path("round-trip");
    let written = write(&idx, &path, now).unwrap();
    assert_eq!(written.users, 5_000);
    assert_eq!(written.bytes, fs::metadata(&path).unwrap().len());
    let restored = index();
    let loaded = load(&restored, &path, now).unwrap().unwrap();
    assert_eq!((loaded.users, loaded.expired), (5_000, 0));
    assert_eq!(records(&restored), records(&idx));
    assert!(!tmp_path(&path).exists());
}

#[test]
fn pings_that_expired_meanwhile_are_dropped() {
    let now = 1_700_000_000_000;
    let idx = populated(2_000, now);
    let path = temp_path("expiry");
    write(&idx, &path, now).unwrap();
    // Restart ten minutes later: whoever was last seen over 15 minutes before is gone.
    let later = now + 10 * 60 * 1_000;
    let restored = index();
    let loaded = load(&restored, &path, later).unwrap().unwrap();
    let want: Vec<_> = records(&idx)
        .into_iter()
        .filter(|r| r.last_seen_ms + TTL > later)
        .collect();
    assert_eq!(records(&restored), want);
    assert_eq!(loaded.users as usize, want.len());
    assert_eq!((loaded.users + loaded.expired) as usize, 2_000);
    assert!(loaded.expired > 0 && loaded.users > 0);
}

#[test]
fn a_missing_snapshot_is_no_snapshot() {
    let path = temp_path("missing").with_file_name("nothing-here.snap");
    assert!(load(&index(), &path, 0).unwrap().is_none());
}

#[test]
fn torn_files_are_refused_at_every_length() {
    let idx = populated(50, 1_000_000);
    let (bytes, _) = encode(&idx, 1_000_000);
    let path = Path::new("torn.snap");
    for len in 0..bytes.len() {
        let target = index();
        let err = decode(&bytes[..len], path, 9, 1_000, |r| {
            target.restore(r, 0);
        })
        .unwrap_err();
        assert!(
            matches!(err, SnapshotError::Corrupt { .. }),
            "length {len}: {err}"
        );
        assert!(target.is_empty(), "nothing loaded from a torn file");
    }
}

#[test]
fn every_flipped_byte_is_caught() {
    let idx = populated(20, 1_000_000);
    let (bytes, _) = encode(&idx, 1_000_000);
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x40;
        let mut called = false;
        let got = decode(&bad, Path::new("x"), 9, 1_000, |_| called = true);
        assert!(got.is_err(), "flip at {i} accepted");
        assert!(!called, "records handed out from a damaged file");
    }
}

#[test]
fn unknown_versions_and_other_resolutions_are_named() {
    let idx = populated(3, 1_000_000);
    let (mut bytes, _) = encode(&idx, 1_000_000);
    let path = Path::new("v.snap");
    let msg = decode(&bytes, path, u8::from(Resolution::Eight), 1_000, |_| {})
        .unwrap_err()
        .to_string();
    assert!(msg.contains("privacy resolution 9"), "{msg}");
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    let err = decode(&bytes, path, 9, 1_000, |_| {}).unwrap_err();
    assert!(
        matches!(err, SnapshotError::UnsupportedVersion { found: 7, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("unsupported snapshot version 7"));
    let not_ours = [b"\x89PNG not a snapshot ".as_slice(); 8].concat();
    let err = decode(&not_ours, path, 9, 1_000, |_| {}).unwrap_err();
    assert!(err.to_string().contains("bad magic"), "{err}");
}

#[test]
fn a_leftover_temp_file_is_ignored_and_replaced() {
    let now = 1_700_000_000_000;
    let idx = populated(100, now);
    let path = temp_path("leftover");
    fs::write(tmp_path(&path), b"half a snapshot from a killed process").unwrap();
    write(&idx, &path, now).unwrap();
    assert!(!tmp_path(&path).exists());
    let restored = index();
    assert_eq!(load(&restored, &path, now).unwrap().unwrap().users, 100);
}

#[test]
fn visibility_and_per_ping_ttl_survive_a_round_trip() {
    let now = 1_700_000_000_000;
    let idx = index();
    for (i, (visible, ttl_s)) in [(true, 0), (false, 60), (false, 3 * 86_400), (true, 7)]
        .into_iter()
        .enumerate()
    {
        let ping = Ping {
            user: UserId::new("u", &format!("p{i}")).unwrap(),
            position: Coordinates::new("p", 31.2, 121.4 + i as f64 * 0.01).unwrap(),
            gender: Gender::Male,
            visible,
            ttl: idx.config().ttl.apply(ttl_s).unwrap(),
        };
        idx.ping(&ping, now).unwrap();
    }
    let (bytes, n) = encode(&idx, now);
    assert_eq!(n, 4);
    let back = index();
    decode(&bytes, Path::new("x"), 9, 1_000, |r| {
        assert!(back.restore(r, now));
    })
    .unwrap();
    let got = records(&back);
    assert_eq!(got, records(&idx));
    let flags: Vec<(bool, u32)> = got.iter().map(|r| (r.visible, r.ttl_ms)).collect();
    assert_eq!(
        flags,
        [
            (true, TTL as u32),
            (false, 60_000),
            (false, 3 * 86_400_000),
            (true, 7_000)
        ]
    );
}

#[test]
fn version_1_files_still_load_visible_with_the_server_ttl() {
    let cell = h3o::LatLng::new(31.2, 121.4)
        .unwrap()
        .to_cell(Resolution::Nine);
    let mut body = Vec::new();
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&1u32.to_le_bytes());
    body.push(9);
    body.extend_from_slice(&5i64.to_le_bytes());
    body.push(3);
    body.extend_from_slice(b"old");
    body.extend_from_slice(&u64::from(cell).to_le_bytes());
    body.push(Gender::Female.wire());
    body.extend_from_slice(&1_234i64.to_le_bytes());
    body.extend_from_slice(&1u64.to_le_bytes());
    let hash = blake3::hash(&body);
    body.extend_from_slice(hash.as_bytes());
    let mut got = Vec::new();
    decode(&body, Path::new("v1"), 9, 4_321, |r| got.push(r)).unwrap();
    assert_eq!(
        got,
        [Record {
            user: UserId::new("u", "old").unwrap(),
            cell,
            gender: Gender::Female,
            last_seen_ms: 1_234,
            ttl_ms: 4_321,
            visible: true,
        }]
    );
}

#[test]
fn ids_from_before_the_alphabet_rule_still_load() {
    let now = 1_700_000_000_000;
    let idx = index();
    let p = Coordinates::new("p", 31.23, 121.47).unwrap();
    // Held before ids had an alphabet: accepted then, refused now at the edge.
    for old in ["a\u{0}b", "\u{202e}evil", " padded "] {
        assert!(UserId::new("user_id", old).is_err(), "{old:?}");
        idx.update(UserId::trusted(old), p, Gender::Unspecified, now);
    }
    let path = temp_path("old-ids");
    write(&idx, &path, now).unwrap();
    let back = index();
    load(&back, &path, now).unwrap();
    assert_eq!(records(&back), records(&idx));
    assert_eq!(back.len(), 3);
}
