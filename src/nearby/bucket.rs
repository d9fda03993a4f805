//! The packed member list of one privacy cell.
//!
//! A bucket is one boxed byte string: the cell's members back to back, sorted by user id,
//! each encoded as
//!
//! ```text
//! [id length: u8][id bytes][last seen, ms: 6 bytes LE][time to live, ms: u32 LE][flags: u8]
//! ```
//!
//! so a 17-byte id costs 29 bytes, with no per-member pointer, padding or allocation. A
//! search reads a bucket front to back; an update that stays in its cell (the usual case:
//! a user who moved a few metres) rewrites the member in place.

use super::Gender;

/// Bytes of a member besides its id.
const FIXED: usize = 1 + 6 + 4 + 1;
/// Latest last-seen time a member can hold (2^48 ms: the year 10889).
const MAX_SEEN_MS: i64 = (1 << 48) - 1;
/// Flag bit: the user is never returned to others.
const INVISIBLE: u8 = 1 << 2;

/// One member, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Member<'a> {
    /// The user's id bytes (valid UTF-8: ids are validated strings).
    pub(crate) user: &'a [u8],
    /// Unix ms of the user's last ping.
    pub(crate) last_seen_ms: i64,
    /// How long the ping stays visible, from `last_seen_ms`.
    pub(crate) ttl_ms: u32,
    /// The user's gender.
    pub(crate) gender: Gender,
    /// Whether others may find the user.
    pub(crate) visible: bool,
}

impl Member<'_> {
    /// Unix ms when the ping stops being visible.
    pub(crate) fn expires_at_ms(&self) -> i64 {
        self.last_seen_ms.saturating_add(i64::from(self.ttl_ms))
    }

    /// Whether the ping has expired at `now_ms`.
    pub(crate) fn expired(&self, now_ms: i64) -> bool {
        now_ms >= self.expires_at_ms()
    }

    /// The member's id as a string.
    pub(super) fn user_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.user)
    }

    fn encoded_len(&self) -> usize {
        FIXED + self.user.len()
    }

    fn encode_into(&self, out: &mut [u8]) {
        let n = self.user.len();
        out[0] = n as u8;
        out[1..=n].copy_from_slice(self.user);
        let seen = self.last_seen_ms.clamp(0, MAX_SEEN_MS).to_le_bytes();
        out[n + 1..n + 7].copy_from_slice(&seen[..6]);
        out[n + 7..n + 11].copy_from_slice(&self.ttl_ms.to_le_bytes());
        out[n + 11] = self.gender.wire() | if self.visible { 0 } else { INVISIBLE };
    }
}

/// Members of a bucket, in id order.
#[derive(Debug, Clone)]
pub(crate) struct Iter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Iter<'a> {
    type Item = Member<'a>;

    fn next(&mut self) -> Option<Member<'a>> {
        let (&n, tail) = self.rest.split_first()?;
        let n = usize::from(n);
        let (user, tail) = tail.split_at_checked(n)?;
        let (fixed, tail) = tail.split_at_checked(FIXED - 1)?;
        self.rest = tail;
        let mut seen = [0u8; 8];
        seen[..6].copy_from_slice(&fixed[..6]);
        let mut ttl = [0u8; 4];
        ttl.copy_from_slice(&fixed[6..10]);
        let flags = fixed[10];
        Some(Member {
            user,
            last_seen_ms: i64::from_le_bytes(seen),
            ttl_ms: u32::from_le_bytes(ttl),
            gender: Gender::from_wire(flags & 3).unwrap_or_default(),
            visible: flags & INVISIBLE == 0,
        })
    }
}

/// The members of `bucket`, in id order.
pub(crate) fn iter(bucket: &[u8]) -> Iter<'_> {
    Iter { rest: bucket }
}

/// The members of `bucket` whose id sorts after `user`.
pub(super) fn after<'a>(bucket: &'a [u8], user: &[u8]) -> Iter<'a> {
    let mut it = iter(bucket);
    loop {
        let before = it.rest;
        match it.next() {
            Some(m) if m.user <= user => {}
            _ => return Iter { rest: before },
        }
    }
}

/// Where `user` is, or would go, in `bucket`: `Ok(offset)` of its member, or
/// `Err(offset)` of the first member that sorts after it.
fn locate(bucket: &[u8], user: &[u8]) -> Result<usize, usize> {
    let mut it = iter(bucket);
    loop {
        let offset = bucket.len() - it.rest.len();
        match it.next() {
            Some(m) if m.user < user => {}
            Some(m) if m.user == user => return Ok(offset),
            _ => return Err(offset),
        }
    }
}

/// The member for `user`, if the bucket holds one.
pub(crate) fn get<'a>(bucket: &'a [u8], user: &[u8]) -> Option<Member<'a>> {
    let offset = locate(bucket, user).ok()?;
    iter(&bucket[offset..]).next()
}

/// Whether `bucket` holds `user`.
pub(super) fn contains(bucket: &[u8], user: &[u8]) -> bool {
    locate(bucket, user).is_ok()
}

/// Puts `member` in `bucket` (replacing the same user's member). Rewrites in place when
/// the user is already there; otherwise builds the bucket anew, exactly sized.
pub(super) fn upsert(bucket: &mut Box<[u8]>, member: &Member<'_>) {
    let len = member.encoded_len();
    match locate(bucket, member.user) {
        Ok(at) => member.encode_into(&mut bucket[at..at + len]),
        Err(at) => {
            let mut grown = vec![0u8; bucket.len() + len];
            grown[..at].copy_from_slice(&bucket[..at]);
            member.encode_into(&mut grown[at..at + len]);
            grown[at + len..].copy_from_slice(&bucket[at..]);
            *bucket = grown.into_boxed_slice();
        }
    }
}

/// A bucket holding just `member`.
pub(super) fn single(member: &Member<'_>) -> Box<[u8]> {
    let mut b = vec![0u8; member.encoded_len()].into_boxed_slice();
    member.encode_into(&mut b);
    b
}

/// Bytes of a member's fields without its id (what a remote store's functions read the
/// last-seen time from, and hand back when they remove a member).
pub(crate) const FIELDS: usize = FIXED - 1;

/// A member's fields without its id: last seen (6 bytes LE), time to live (u32 LE),
/// flags. Their layout is the tail of the in-memory member encoding.
pub(crate) fn fields(member: &Member<'_>) -> [u8; FIELDS] {
    let mut b = [0u8; FIXED];
    Member {
        user: &[],
        ..*member
    }
    .encode_into(&mut b);
    let mut out = [0u8; FIELDS];
    out.copy_from_slice(&b[1..]);
    out
}

/// A member read back from its id and [`fields`]; `None` when they do not fit (an id
/// over 255 bytes or fields of the wrong length: never written by this crate).
pub(crate) fn from_fields<'a>(user: &'a [u8], fields: &[u8]) -> Option<Member<'a>> {
    if fields.len() != FIELDS || user.len() > usize::from(u8::MAX) {
        return None;
    }
    let mut b = Vec::with_capacity(FIXED);
    b.push(0);
    b.extend_from_slice(fields);
    let m = iter(&b).next()?;
    Some(Member { user, ..m })
}

/// A bucket from a remote store's cell string: the same encoding, members in any order
/// (the store appends and replaces without comparing ids). Sorted by id here; decoding
/// stops at the first member that does not fit.
pub(crate) fn from_unsorted(raw: &[u8]) -> Box<[u8]> {
    let mut members: Vec<Member<'_>> = iter(raw).collect();
    members.sort_unstable_by(|a, b| a.user.cmp(b.user));
    members.dedup_by(|a, b| a.user == b.user);
    let mut out = vec![0u8; members.iter().map(Member::encoded_len).sum()];
    let mut at = 0;
    for m in &members {
        let len = m.encoded_len();
        m.encode_into(&mut out[at..at + len]);
        at += len;
    }
    out.into_boxed_slice()
}

/// Takes `user` out of `bucket` if `pred` holds for its member; returns the member's
/// expiry and whether it was visible, or `None` when nothing was removed.
pub(super) fn remove_if(
    bucket: &mut Box<[u8]>,
    user: &[u8],
    pred: impl FnOnce(&Member<'_>) -> bool,
) -> Option<Member<'static>> {
    let at = locate(bucket, user).ok()?;
    let m = iter(&bucket[at..]).next()?;
    if !pred(&m) {
        return None;
    }
    let removed = Member { user: &[], ..m };
    let len = m.encoded_len();
    let mut shrunk = Vec::with_capacity(bucket.len() - len);
    shrunk.extend_from_slice(&bucket[..at]);
    shrunk.extend_from_slice(&bucket[at + len..]);
    *bucket = shrunk.into_boxed_slice();
    Some(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(user: &str, seen: i64) -> Member<'_> {
        Member {
            user: user.as_bytes(),
            last_seen_ms: seen,
            ttl_ms: 900_000,
            gender: Gender::Female,
            visible: true,
        }
    }

    #[test]
    fn fields_round_trip_and_unsorted_cells_read_back_sorted() {
        let a = m("b", 1_700_000_000_123);
        let back = from_fields(a.user, &fields(&a)).unwrap();
        assert_eq!(back, a);
        assert!(from_fields(b"x", &[1, 2, 3]).is_none());
        let hidden = Member {
            visible: false,
            gender: Gender::Male,
            ..m("a", 5)
        };
        // As a store writes a cell: appended in arrival order, then a torn tail.
        let mut raw = single(&a).into_vec();
        raw.extend_from_slice(&single(&hidden));
        raw.extend_from_slice(&[3, b'x']);
        let bucket = from_unsorted(&raw);
        let got: Vec<Member<'_>> = iter(&bucket).collect();
        assert_eq!(got, [hidden, a]);
    }

    #[test]
    fn members_stay_sorted_and_round_trip() {
        let mut b = single(&m("m", 1));
        for (u, t) in [("c", 2), ("x", 3), ("a", 4), ("m", 5)] {
            upsert(&mut b, &m(u, t));
        }
        let got: Vec<_> = iter(&b)
            .map(|x| (x.user_str().into_owned(), x.last_seen_ms))
            .collect();
        let want = [("a", 4), ("c", 2), ("m", 5), ("x", 3)].map(|(u, t)| (u.to_string(), t));
        assert_eq!(got, want);
        assert_eq!(b.len(), 4 * (FIXED + 1), "exactly sized");
        let after_c: Vec<_> = after(&b, b"c").map(|x| x.user_str().into_owned()).collect();
        assert_eq!(after_c, ["m", "x"]);
        assert_eq!(after(&b, b"b").count(), 3);
        assert_eq!(after(&b, b"z").count(), 0);
        assert!(contains(&b, b"x") && !contains(&b, b"y"));
    }

    #[test]
    fn every_field_survives_encoding() {
        let long = "é".repeat(64);
        let want = Member {
            user: long.as_bytes(),
            last_seen_ms: MAX_SEEN_MS,
            ttl_ms: u32::MAX,
            gender: Gender::Male,
            visible: false,
        };
        let b = single(&want);
        assert_eq!(get(&b, long.as_bytes()), Some(want));
        assert_eq!(want.expires_at_ms(), MAX_SEEN_MS + i64::from(u32::MAX));
        // Out-of-range times are clamped, not wrapped.
        let b = single(&Member {
            last_seen_ms: -5,
            ..want
        });
        assert_eq!(iter(&b).next().map(|x| x.last_seen_ms), Some(0));
    }

    #[test]
    fn removal_honours_the_predicate() {
        let mut b = single(&m("a", 1));
        upsert(&mut b, &m("b", 2));
        assert!(remove_if(&mut b, b"a", |x| x.last_seen_ms > 1).is_none());
        assert!(remove_if(&mut b, b"zz", |_| true).is_none());
        let gone = remove_if(&mut b, b"a", |_| true);
        assert_eq!(gone.map(|x| x.last_seen_ms), Some(1));
        assert_eq!(iter(&b).count(), 1);
        assert!(remove_if(&mut b, b"b", |_| true).is_some());
        assert!(b.is_empty());
    }
}
