//! Opaque, tamper-evident page tokens.
//!
//! A token is the cursor (the sort key of the last user on the previous page: its exact
//! distance key and id) encrypted and authenticated with AES-256-GCM-SIV, an AEAD from
//! the RustCrypto `aes-gcm-siv` crate (AES-NI where the CPU has it), under a random
//! 96-bit nonce and a key derived from the server's token key. The query it was issued
//! for (searcher, centre, radius, gender filter) is the associated data. So a client
//! learns nothing from a token (not the exact distance, which would be finer than the
//! band), and a forged, truncated or corrupted token, or one replayed with a different
//! query, fails authentication and is rejected. Tokens stay stateless: the key is all a
//! server keeps, drawn at start-up (or shared through a remote store by every replica).
//!
//! GCM-SIV because the key is long-lived and shared by replicas that draw nonces
//! independently: a repeated nonce, unlikely as it is, reveals only that two tokens hold
//! the same cursor for the same query, where GCM or ChaCha20-Poly1305 would lose both
//! secrecy and authenticity. Version 2 tokens (XChaCha20-Poly1305 under a 192-bit nonce,
//! the raw key) are still read, so a page issued by a replica not yet upgraded continues
//! on an upgraded one; only version 3 is issued, at about a tenth of the cost per page.

use aes_gcm_siv::Aes256GcmSiv;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use thiserror::Error;

use crate::id::{MAX_ID_BYTES, UserId};

/// Version 3: AES-256-GCM-SIV. (Version 1 tokens, a MAC over a cursor in clear, are refused.)
const VERSION: u8 = 3;
const NONCE_LEN: usize = 12;
/// Version 2: XChaCha20-Poly1305, read but no longer issued.
const VERSION_2: u8 = 2;
const NONCE_LEN_2: usize = 24;
const TAG_LEN: usize = 16;
/// The cursor's distance key, before the user id.
const KEY_LEN: usize = 8;
const OVERHEAD: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;
const OVERHEAD_2: usize = 1 + NONCE_LEN_2 + KEY_LEN + TAG_LEN;
/// Longest token accepted before decoding, in characters (a version 2 token's).
pub const MAX_TOKEN_LEN: usize = (OVERHEAD_2 + MAX_ID_BYTES).div_ceil(3) * 4;
/// BLAKE3 key-derivation context of the version 3 key (the version 2 cipher takes the
/// token key itself; one key never serves two algorithms).
const V3_CONTEXT: &str = "geomatch 2026-12 page tokens v3 AES-256-GCM-SIV";

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

impl Scope<'_> {
    /// The associated data a token of `version` is bound to: every field, unambiguously.
    fn aad(&self, version: u8) -> Vec<u8> {
        let mut a = Vec::with_capacity(8 + self.searcher.len() + 3 * 8 + 2);
        a.push(version);
        a.extend_from_slice(&(self.searcher.len() as u64).to_le_bytes());
        a.extend_from_slice(self.searcher.as_bytes());
        a.extend_from_slice(&self.lat.to_bits().to_le_bytes());
        a.extend_from_slice(&self.lng.to_bits().to_le_bytes());
        a.extend_from_slice(&self.radius_m.to_bits().to_le_bytes());
        a.push(self.gender);
        a
    }
}

/// Issues and checks page tokens with one secret key. The key, the version 3 key derived
/// from it and both ciphers' key schedules are wiped from memory when the value is dropped
/// (`aes` is built with its `zeroize` feature for that).
#[derive(Clone)]
pub struct PageTokens {
    key: zeroize::Zeroizing<[u8; 32]>,
    cipher: Aes256GcmSiv,
    cipher_2: XChaCha20Poly1305,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens { key: <redacted> }")
    }
}

impl PageTokens {
    /// Tokens sealed with `key`.
    pub fn new(key: [u8; 32]) -> Self {
        let v3 = zeroize::Zeroizing::new(blake3::derive_key(V3_CONTEXT, &key));
        Self {
            cipher: Aes256GcmSiv::new(&(*v3).into()),
            cipher_2: XChaCha20Poly1305::new(&key.into()),
            key: zeroize::Zeroizing::new(key),
        }
    }

    /// The secret key, for a store that keeps it for every replica (never logged).
    pub(crate) fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// Tokens sealed with a fresh random key.
    ///
    /// # Errors
    /// When the operating system has no randomness to give.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut key = [0; 32];
        getrandom::fill(&mut key)?;
        Ok(Self::new(key))
    }

    /// Encodes `cursor` for the query `scope`.
    pub fn encode(&self, scope: &Scope<'_>, cursor: &Cursor) -> String {
        let nonce: [u8; NONCE_LEN] = random_nonce();
        let plain = plaintext(cursor);
        let aad = scope.aad(VERSION);
        let payload = Payload {
            msg: &plain,
            aad: &aad,
        };
        let sealed = self
            .cipher
            .encrypt(aes_gcm_siv::Nonce::from_slice(&nonce), payload)
            // Encryption fails only for messages of gigabytes.
            .unwrap_or_default();
        framed(VERSION, &nonce, &sealed)
    }

    /// Decodes a token issued by [`Self::encode`] (or, as version 2, by a server before
    /// version 3) for the same `scope`.
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
        let plain = match buf.first() {
            Some(&VERSION) if buf.len() > OVERHEAD => {
                let (nonce, sealed) = buf[1..].split_at(NONCE_LEN);
                let aad = scope.aad(VERSION);
                self.cipher.decrypt(
                    aes_gcm_siv::Nonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &aad,
                    },
                )
            }
            Some(&VERSION_2) if buf.len() > OVERHEAD_2 => {
                let (nonce, sealed) = buf[1..].split_at(NONCE_LEN_2);
                let aad = scope.aad(VERSION_2);
                self.cipher_2.decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &aad,
                    },
                )
            }
            _ => return Err(TokenError::Invalid),
        }
        .map_err(|_| TokenError::Invalid)?;
        let (key, user) = plain.split_at(KEY_LEN);
        let mut k = [0; KEY_LEN];
        k.copy_from_slice(key);
        let user = std::str::from_utf8(user).map_err(|_| TokenError::Invalid)?;
        let user = UserId::stored(user).ok_or(TokenError::Invalid)?;
        Ok(Cursor {
            distance_key: u64::from_le_bytes(k),
            user,
        })
    }

    /// A version 2 token, as servers before version 3 issued them (for the tests that
    /// check they are still read).
    #[cfg(test)]
    fn encode_v2(&self, scope: &Scope<'_>, cursor: &Cursor) -> String {
        let nonce: [u8; NONCE_LEN_2] = random_nonce();
        let plain = plaintext(cursor);
        let aad = scope.aad(VERSION_2);
        let payload = Payload {
            msg: &plain,
            aad: &aad,
        };
        let sealed = self
            .cipher_2
            .encrypt(XNonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        framed(VERSION_2, &nonce, &sealed)
    }
}

/// What a token seals: the cursor's distance key, then its user id.
fn plaintext(cursor: &Cursor) -> Vec<u8> {
    let user = cursor.user.as_str().as_bytes();
    let mut plain = Vec::with_capacity(KEY_LEN + user.len());
    plain.extend_from_slice(&cursor.distance_key.to_le_bytes());
    plain.extend_from_slice(user);
    plain
}

/// The token as sent: version, nonce and sealed cursor, in URL-safe base64.
fn framed(version: u8, nonce: &[u8], sealed: &[u8]) -> String {
    let mut buf = Vec::with_capacity(1 + nonce.len() + sealed.len());
    buf.push(version);
    buf.extend_from_slice(nonce);
    buf.extend_from_slice(sealed);
    URL_SAFE_NO_PAD.encode(buf)
}

/// A random nonce from this thread's CSPRNG (ChaCha12, seeded once per thread by the
/// operating system): a page costs no system call. Independent per-thread streams repeat
/// a 96-bit nonce with negligible probability, and GCM-SIV survives even that (see the
/// module docs). Without randomness to seed from, [`fallback_nonce`].
fn random_nonce<const N: usize>() -> [u8; N] {
    use rand::{RngCore as _, SeedableRng as _, rngs::StdRng};
    thread_local! {
        static NONCES: std::cell::RefCell<Option<StdRng>> =
            std::cell::RefCell::new(StdRng::try_from_os_rng().ok());
    }
    NONCES
        .try_with(|rng| {
            rng.try_borrow_mut().ok().and_then(|mut rng| {
                let rng = rng.as_mut()?;
                let mut nonce = [0u8; N];
                rng.fill_bytes(&mut nonce);
                Some(nonce)
            })
        })
        .ok()
        .flatten()
        .unwrap_or_else(fallback_nonce)
}

/// A nonce for a system without randomness: a process-wide 64-bit counter (never
/// repeated within a process) after a prefix hashed once from the process's start time
/// and id (so two processes seldom share one).
fn fallback_nonce<const N: usize>() -> [u8; N] {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static PREFIX: OnceLock<[u8; 32]> = OnceLock::new();
    let prefix = PREFIX.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut h = blake3::Hasher::new();
        h.update(&now.to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        *h.finalize().as_bytes()
    });
    let count = COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes();
    let mut n = [0u8; N];
    // The counter last, whole; the prefix in what is left before it.
    let split = N.saturating_sub(count.len());
    n[split..].copy_from_slice(&count[..N - split]);
    for (b, p) in n[..split].iter_mut().zip(prefix) {
        *b = *p;
    }
    n
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
    fn hides_the_cursor() {
        let t = PageTokens::new([7; 32]);
        let a = URL_SAFE_NO_PAD
            .decode(t.encode(&scope("me"), &cursor()))
            .unwrap();
        let b = URL_SAFE_NO_PAD
            .decode(t.encode(&scope("me"), &cursor()))
            .unwrap();
        // Fresh nonces: one cursor never gives the same token twice.
        assert_ne!(a, b);
        // Neither the distance key nor the user id appears in clear.
        let key = cursor().distance_key.to_le_bytes();
        for raw in [&a, &b] {
            assert!(!raw.windows(key.len()).any(|w| w == key));
            assert!(!raw.windows(4).any(|w| w == b"user"));
        }
        // Two cursors' tokens differ in no systematic way: flipping the distance key
        // changes bytes all over the ciphertext, not in one place.
        let other = Cursor {
            distance_key: cursor().distance_key + 1,
            ..cursor()
        };
        let c = URL_SAFE_NO_PAD
            .decode(t.encode(&scope("me"), &other))
            .unwrap();
        assert_eq!(a.len(), c.len());
        assert!(
            a[1 + NONCE_LEN..]
                .iter()
                .zip(&c[1 + NONCE_LEN..])
                .filter(|(x, y)| x != y)
                .count()
                > 8
        );
    }

    #[test]
    fn nonces_never_repeat_across_threads_and_tokens_issued_on_one_decode_on_another() {
        let t = PageTokens::new([7; 32]);
        let barrier = std::sync::Barrier::new(4);
        let tokens: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        (0..2_000)
                            .map(|_| t.encode(&scope("me"), &cursor()))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let nonces: std::collections::HashSet<Vec<u8>> = tokens
            .iter()
            .map(|tok| URL_SAFE_NO_PAD.decode(tok).unwrap()[1..1 + NONCE_LEN].to_vec())
            .collect();
        assert_eq!(nonces.len(), tokens.len());
        for tok in &tokens {
            assert_eq!(t.decode(&scope("me"), tok), Ok(cursor()));
        }
        // The fallback's nonces differ from one another too.
        assert_ne!(fallback_nonce::<NONCE_LEN>(), fallback_nonce::<NONCE_LEN>());
    }

    #[test]
    fn version_2_tokens_are_still_read_for_their_own_query_and_key_only() {
        let t = PageTokens::new([7; 32]);
        let old = t.encode_v2(&scope("me"), &cursor());
        assert_eq!(t.decode(&scope("me"), &old), Ok(cursor()));
        assert!(old.len() <= MAX_TOKEN_LEN);
        assert_eq!(t.decode(&scope("you"), &old), Err(TokenError::Invalid));
        assert_eq!(
            PageTokens::new([8; 32]).decode(&scope("me"), &old),
            Err(TokenError::Invalid)
        );
        // What is issued now is version 3, and shorter.
        let new = t.encode(&scope("me"), &cursor());
        let (old_raw, new_raw) = (
            URL_SAFE_NO_PAD.decode(&old).unwrap(),
            URL_SAFE_NO_PAD.decode(&new).unwrap(),
        );
        assert_eq!((old_raw[0], new_raw[0]), (VERSION_2, VERSION));
        assert_eq!(old_raw.len() - new_raw.len(), NONCE_LEN_2 - NONCE_LEN);
        // Neither passes for the other: the version byte picks the cipher and is bound
        // into the associated data.
        for (raw, other) in [(&old_raw, VERSION), (&new_raw, VERSION_2)] {
            let mut relabelled = raw.clone();
            relabelled[0] = other;
            let relabelled = URL_SAFE_NO_PAD.encode(relabelled);
            assert_eq!(
                t.decode(&scope("me"), &relabelled),
                Err(TokenError::Invalid)
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        let t = PageTokens::new([7; 32]);
        for junk in ["", "!!!!", "AAAA", &"A".repeat(10_000), "é"] {
            assert_eq!(t.decode(&scope("me"), junk), Err(TokenError::Invalid));
        }
    }
}
