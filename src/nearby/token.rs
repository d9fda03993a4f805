//! Opaque, tamper-evident page tokens.
//!
//! A token carries the sort key of the last user on the previous page and a 128-bit keyed
//! BLAKE3 MAC over that cursor and the query it was issued for (searcher, centre, radius,
//! gender filter). A forged, truncated or corrupted token, or one replayed with a different
//! query, fails the MAC and is rejected. The key is drawn at start-up, so tokens are valid
//! for the life of the process that issued them.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use thiserror::Error;

use crate::id::{MAX_ID_BYTES, UserId};

const VERSION: u8 = 1;
const MAC_LEN: usize = 16;
const HEADER_LEN: usize = 1 + 8;
/// Longest token accepted before decoding, in characters.
pub const MAX_TOKEN_LEN: usize = (HEADER_LEN + MAX_ID_BYTES + MAC_LEN).div_ceil(3) * 4;

/// Why a page token was refused. Deliberately coarse: a client learns nothing about the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TokenError {
    /// Not something this server issued for this query.
    #[error(
        "is not a valid page token for this query (tokens are opaque: pass back next_page_token unchanged, with the same query)"
    )]
    Invalid,
}

/// Position in the result order: strictly after `(distance_key, user)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// [`crate::geo::distance_key`] of the last user returned.
    pub distance_key: u64,
    /// The last user returned.
    pub user: UserId,
}

/// The query a token is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The searcher's id.
    pub searcher: &'a str,
    /// Search centre latitude, degrees.
    pub lat: f64,
    /// Search centre longitude, degrees.
    pub lng: f64,
    /// Effective radius, metres.
    pub radius_m: f64,
    /// Gender filter, as its wire number (0 = everyone).
    pub gender: u8,
}

/// Issues and checks page tokens with one secret key.
#[derive(Clone)]
pub struct PageTokens {
    key: [u8; 32],
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens { key: <redacted> }")
    }
}

impl PageTokens {
    /// Tokens signed with `key`.
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// The secret key, for a store that keeps it for every replica (never logged).
    pub(crate) fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// Tokens signed with a fresh random key.
    ///
    /// # Errors
    /// When the operating system has no randomness to give.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut key = [0; 32];
        getrandom::fill(&mut key)?;
        Ok(Self::new(key))
    }

    fn mac(&self, scope: &Scope<'_>, body: &[u8]) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&(scope.searcher.len() as u64).to_le_bytes());
        h.update(scope.searcher.as_bytes());
        h.update(&scope.lat.to_bits().to_le_bytes());
        h.update(&scope.lng.to_bits().to_le_bytes());
        h.update(&scope.radius_m.to_bits().to_le_bytes());
        h.update(&[scope.gender]);
        h.update(body);
        let mut out = [0; MAC_LEN];
        out.copy_from_slice(&h.finalize().as_bytes()[..MAC_LEN]);
        out
    }

    /// Encodes `cursor` for the query `scope`.
    pub fn encode(&self, scope: &Scope<'_>, cursor: &Cursor) -> String {
        let user = cursor.user.as_str().as_bytes();
        let mut buf = Vec::with_capacity(HEADER_LEN + user.len() + MAC_LEN);
        buf.push(VERSION);
        buf.extend_from_slice(&cursor.distance_key.to_le_bytes());
        buf.extend_from_slice(user);
        let mac = self.mac(scope, &buf);
        buf.extend_from_slice(&mac);
        URL_SAFE_NO_PAD.encode(buf)
    }

    /// Decodes a token issued by [`Self::encode`] for the same `scope`.
    ///
    /// # Errors
    /// [`TokenError::Invalid`] for anything else.
    pub fn decode(&self, scope: &Scope<'_>, token: &str) -> Result<Cursor, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Invalid);
        }
        let buf = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Invalid)?;
        if buf.len() <= HEADER_LEN + MAC_LEN || buf[0] != VERSION {
            return Err(TokenError::Invalid);
        }
        let (body, mac) = buf.split_at(buf.len() - MAC_LEN);
        let want = self.mac(scope, body);
        // Constant-time comparison: no timing oracle on the MAC.
        if !constant_time_eq(&want, mac) {
            return Err(TokenError::Invalid);
        }
        let mut key = [0; 8];
        key.copy_from_slice(&body[1..HEADER_LEN]);
        let user = std::str::from_utf8(&body[HEADER_LEN..]).map_err(|_| TokenError::Invalid)?;
        let user = UserId::new("page_token", user).map_err(|_| TokenError::Invalid)?;
        Ok(Cursor {
            distance_key: u64::from_le_bytes(key),
            user,
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(searcher: &str) -> Scope<'_> {
        Scope {
            searcher,
            lat: 31.23,
            lng: 121.47,
            radius_m: 1_000.0,
            gender: 0,
        }
    }

    fn cursor() -> Cursor {
        Cursor {
            distance_key: 123_456,
            user: UserId::new("u", "user:000000000042").unwrap(),
        }
    }

    #[test]
    fn round_trips() {
        let t = PageTokens::new([7; 32]);
        let token = t.encode(&scope("me"), &cursor());
        assert_eq!(t.decode(&scope("me"), &token), Ok(cursor()));
        assert!(token.len() <= MAX_TOKEN_LEN);
    }

    #[test]
    fn rejects_every_single_byte_corruption() {
        let t = PageTokens::new([7; 32]);
        let token = t.encode(&scope("me"), &cursor());
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..raw.len() {
            for bit in 0..8 {
                let mut bad = raw.clone();
                bad[i] ^= 1 << bit;
                let bad = URL_SAFE_NO_PAD.encode(bad);
                assert_eq!(t.decode(&scope("me"), &bad), Err(TokenError::Invalid));
            }
        }
        for cut in 0..token.len() {
            assert_eq!(
                t.decode(&scope("me"), &token[..cut]),
                Err(TokenError::Invalid)
            );
        }
    }

    #[test]
    fn rejects_other_queries_and_other_keys() {
        let t = PageTokens::new([7; 32]);
        let token = t.encode(&scope("me"), &cursor());
        assert!(t.decode(&scope("you"), &token).is_err());
        let mut moved = scope("me");
        moved.lat += 1e-9;
        assert!(t.decode(&moved, &token).is_err());
        let mut wider = scope("me");
        wider.radius_m = 2_000.0;
        assert!(t.decode(&wider, &token).is_err());
        let mut filtered = scope("me");
        filtered.gender = 1;
        assert!(t.decode(&filtered, &token).is_err());
        assert!(
            PageTokens::new([8; 32])
                .decode(&scope("me"), &token)
                .is_err()
        );
    }

    #[test]
    fn rejects_garbage() {
        let t = PageTokens::new([7; 32]);
        for junk in ["", "!!!!", "AAAA", &"A".repeat(10_000), "é"] {
            assert_eq!(t.decode(&scope("me"), junk), Err(TokenError::Invalid));
        }
    }
}
