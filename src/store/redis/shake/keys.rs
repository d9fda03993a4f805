//! The records of a shake in the store: its keys, its listing in a waiting index, and the
//! replies of the Functions.

use std::time::Duration;

use h3o::CellIndex;

use super::super::tag_of_coarse;
use crate::{
    error::{Error, Result},
    geo::snapped,
    id::UserId,
    shake::{Match, MatchId, Outcome, Tier},
};

/// The keys of one shake.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub(super) pointer: String,
    pub(super) state: String,
    /// The shake id itself (ids may hold any character, so it is never parsed back out of
    /// a key).
    pub(super) shake_id: String,
}

impl Keys {
    pub(super) fn new(user: &str, shake_id: &str) -> Self {
        Self {
            pointer: format!("gm1:sh:{{{user}}}:p"),
            state: format!("gm1:sh:{{{user}}}:s:{shake_id}"),
            shake_id: shake_id.to_owned(),
        }
    }

    pub(super) fn tombstone(state: &str, mid: &str) -> String {
        format!("{state}:a:{mid}")
    }
}

/// The waiting index of a bucket.
pub(super) fn index_key(bucket: CellIndex) -> String {
    format!("gm1:{{{}}}:sw:{bucket}", tag_of_coarse(bucket))
}

/// A waiting shake as listed: what a newcomer needs to judge it before claiming it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Listing {
    pub(super) cell: CellIndex,
    pub(super) max_distance_m: u32,
    pub(super) seq: u64,
    pub(super) shake_id: String,
    pub(super) user: String,
}

impl Listing {
    /// `<cell: 16 hex><max m: 8 hex><seq: 16 hex><id length: 2 hex><shake id><user>`.
    pub(super) fn encode(&self) -> String {
        format!(
            "{:016x}{:08x}{:016x}{:02x}{}{}",
            u64::from(self.cell),
            self.max_distance_m,
            self.seq,
            self.shake_id.len(),
            self.shake_id,
            self.user
        )
    }

    pub(super) fn decode(s: &str) -> Option<Self> {
        let hex =
            |r: std::ops::Range<usize>| s.get(r).and_then(|h| u64::from_str_radix(h, 16).ok());
        let cell = CellIndex::try_from(hex(0..16)?).ok()?;
        let max_distance_m = u32::try_from(hex(16..24)?).ok()?;
        let seq = hex(24..40)?;
        let id_len = usize::try_from(hex(40..42)?).ok()?;
        let shake_id = s.get(42..42 + id_len)?.to_owned();
        let user = s.get(42 + id_len..)?.to_owned();
        Some(Self {
            cell,
            max_distance_m,
            seq,
            shake_id,
            user,
        })
    }

    pub(super) fn state(&self) -> String {
        Keys::new(&self.user, &self.shake_id).state
    }
}

/// A store reply: a status word and its fields.
pub(super) type Reply = Vec<Option<String>>;

pub(super) fn word(r: &Reply) -> &str {
    r.first().and_then(Option::as_deref).unwrap_or("")
}

pub(super) fn field(r: &Reply, i: usize) -> &str {
    r.get(i).and_then(Option::as_deref).unwrap_or("")
}

/// The outcome in a `{'done', st, p, d, mid, t}` reply (fields from 1).
pub(super) fn outcome_of(r: &Reply) -> Result<Option<Outcome>> {
    match field(r, 1) {
        "N" => Ok(Some(Outcome::NoMatch)),
        "M" => matched(field(r, 2), field(r, 3), field(r, 4), field(r, 5)).map(Some),
        _ => Ok(None),
    }
}

pub(super) fn matched(partner: &str, band: &str, mid: &str, tier: &str) -> Result<Outcome> {
    let corrupt = || Error::Unavailable("the store holds a malformed shake outcome".into());
    Ok(Outcome::Matched(Match {
        partner: UserId::stored(partner).ok_or_else(corrupt)?,
        distance_m: band.parse().map_err(|_| corrupt())?,
        match_id: MatchId::from_hex(mid).ok_or_else(corrupt)?,
        tier: if tier == "a" {
            Tier::Anywhere
        } else {
            Tier::Nearby
        },
    }))
}

pub(super) fn tier_code(tier: Tier) -> &'static str {
    match tier {
        Tier::Nearby => "n",
        Tier::Anywhere => "a",
    }
}

pub(super) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn index_key_of(l: &Listing, bucket_resolution: h3o::Resolution) -> String {
    index_key(snapped(l.cell).to_cell(bucket_resolution))
}

pub(super) fn encode_excludes(ids: &[UserId]) -> String {
    let mut out = String::new();
    for id in ids {
        let s = id.as_str();
        // Ids are at most MAX_ID_BYTES (128) long: one length byte, below 0x80, is ASCII.
        out.push(char::from(u8::try_from(s.len()).unwrap_or(0)));
        out.push_str(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn listings_read_back() {
        let cell = crate::geo::Coordinates::new("p", 31.23, 121.47)
            .unwrap()
            .cell(h3o::Resolution::Nine);
        for (id, user) in [("s1", "alice"), ("", "b"), ("ü|x", "名字:{x}")] {
            let l = Listing {
                cell,
                max_distance_m: 5_000,
                seq: 123_456_789,
                shake_id: id.into(),
                user: user.into(),
            };
            assert_eq!(Listing::decode(&l.encode()), Some(l));
        }
        assert_eq!(Listing::decode("zz"), None);
    }

    #[test]
    pub(super) fn outcomes_read_back() {
        let mid = MatchId::new(7, 9).to_string();
        let r: Reply = ["done", "M", "bob", "200", mid.as_str(), "a"]
            .into_iter()
            .map(|s| Some(s.to_owned()))
            .collect();
        let Some(Outcome::Matched(m)) = outcome_of(&r).unwrap() else {
            panic!("not a match");
        };
        assert_eq!(
            (m.partner.as_str(), m.distance_m, m.tier),
            ("bob", 200, Tier::Anywhere)
        );
        assert_eq!(m.match_id, MatchId::new(7, 9));
        let none: Reply = vec![Some("done".into()), Some("N".into())];
        assert_eq!(outcome_of(&none).unwrap(), Some(Outcome::NoMatch));
        let bad: Reply = ["done", "M", "bob", "x", "y", "n"]
            .into_iter()
            .map(|s| Some(s.to_owned()))
            .collect();
        assert!(outcome_of(&bad).is_err());
    }
}
