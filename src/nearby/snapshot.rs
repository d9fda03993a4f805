//! Snapshots of the People Nearby index, so a deploy does not blank it.
//!
//! File layout (little-endian):
//!
//! ```text
//! magic "GEOMSNAP" | version u32 = 2 | privacy resolution u8 | taken_at_ms i64
//! records: user_len u8 | user bytes | cell u64 | gender u8 | last_seen_ms i64
//!          | ttl_ms u32 | visible u8                                            (repeated)
//! trailer: record count u64 | BLAKE3 hash (32 bytes) of everything before the hash
//! ```
//!
//! Writing is crash-safe: the bytes go to `<path>.tmp`, which is fsynced, renamed over
//! `<path>`, and the directory is fsynced. A `kill -9` at any moment leaves either the old
//! or the new snapshot under `<path>`, never a torn one; a leftover `.tmp` is ignored and
//! overwritten. Waiting shakes are not persisted (they live for seconds).
//!
//! The index is serialised one bucket at a time under shard read locks (searches keep
//! running; a writer to a shard waits for at most that shard's serialisation) and streamed
//! to the file in 256 KiB chunks, hashed on the way, so memory stays flat at any size.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use h3o::CellIndex;
use thiserror::Error;

use crate::{
    id::UserId,
    nearby::{Gender, NearbyIndex, Record},
};

const MAGIC: &[u8; 8] = b"GEOMSNAP";
/// The format version this build writes. It also reads version 1 (no per-ping TTL or
/// visibility: those records get the server's TTL and are visible).
pub const VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 1 + 8;
const HASH_LEN: usize = 32;
const TRAILER_LEN: usize = 8 + HASH_LEN;

/// Why a snapshot could not be written or read.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file is not a geomatch snapshot, or it is damaged.
    #[error("{path}: corrupt snapshot: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Written by a newer (or unknown) format version.
    #[error("{path}: unsupported snapshot version {found} (this build reads version {VERSION})")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version it claims.
        found: u32,
    },
    /// Taken at another privacy resolution than the server now uses.
    #[error(
        "{path}: snapshot was taken at privacy resolution {found}, the server uses {expected}; \
         start with --privacy-resolution {found} or move the snapshot away"
    )]
    ResolutionMismatch {
        /// The file.
        path: PathBuf,
        /// The snapshot's resolution.
        found: u8,
        /// The server's resolution.
        expected: u8,
    },
}

/// What a write or load did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Users written, or restored.
    pub users: u64,
    /// Users in the file that had expired meanwhile (load only).
    pub expired: u64,
    /// Size of the file, bytes.
    pub bytes: u64,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Flushes serialised records to the output in chunks of this size, so a snapshot of any
/// size needs only this much memory.
const CHUNK: usize = 256 * 1024;

/// Hashes everything written through it and passes it on in [`CHUNK`]-sized writes.
struct Sink<'w, W: io::Write> {
    out: &'w mut W,
    buf: Vec<u8>,
    hasher: blake3::Hasher,
    written: u64,
    failed: Option<io::Error>,
}

impl<W: io::Write> Sink<'_, W> {
    fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.failed.is_none() {
            self.hasher.update(&self.buf);
            self.written += self.buf.len() as u64;
            if let Err(e) = self.out.write_all(&self.buf) {
                self.failed = Some(e);
            }
        }
        self.buf.clear();
    }
}

/// Serialises the index into `out`; returns (users, bytes).
///
/// Records are serialised under each bucket's shard read lock and handed to `out` in
/// 256 KiB chunks, so searches are never blocked and memory stays flat.
///
/// # Errors
/// The first error `out` returned.
pub fn encode_to(
    index: &NearbyIndex,
    taken_at_ms: i64,
    out: &mut impl io::Write,
) -> io::Result<(u64, u64)> {
    let mut sink = Sink {
        out,
        buf: Vec::with_capacity(CHUNK + 256),
        hasher: blake3::Hasher::new(),
        written: 0,
        failed: None,
    };
    sink.put(MAGIC);
    sink.put(&VERSION.to_le_bytes());
    sink.put(&[u8::from(index.config().privacy_resolution)]);
    sink.put(&taken_at_ms.to_le_bytes());
    let mut count: u64 = 0;
    index.for_each_record(|r| {
        let user = r.user.as_str().as_bytes();
        // Ids are validated to at most 128 bytes on the way in.
        sink.put(&[user.len() as u8]);
        sink.put(user);
        sink.put(&u64::from(r.cell).to_le_bytes());
        sink.put(&[r.gender.wire()]);
        sink.put(&r.last_seen_ms.to_le_bytes());
        sink.put(&r.ttl_ms.to_le_bytes());
        sink.put(&[u8::from(r.visible)]);
        count += 1;
    });
    sink.put(&count.to_le_bytes());
    sink.flush();
    if let Some(e) = sink.failed {
        return Err(e);
    }
    let hash = sink.hasher.finalize();
    sink.out.write_all(hash.as_bytes())?;
    Ok((count, sink.written + HASH_LEN as u64))
}

/// Serialises the index to snapshot bytes in memory; returns (bytes, users).
pub fn encode(index: &NearbyIndex, taken_at_ms: i64) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let (users, _) = encode_to(index, taken_at_ms, &mut out).unwrap_or((0, 0));
    (out, users)
}

/// Writes a snapshot of `index` to `path`, crash-safely (temp file, fsync, rename, fsync
/// of the directory).
///
/// # Errors
/// [`SnapshotError::Io`] when the file system refuses; the previous snapshot stays intact.
pub fn write(index: &NearbyIndex, path: &Path, taken_at_ms: i64) -> Result<Stats, SnapshotError> {
    let tmp = tmp_path(path);
    let (users, bytes) = {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        let written = encode_to(index, taken_at_ms, &mut f).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        written
    };
    fs::rename(&tmp, path).map_err(io_err(path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(Stats {
        users,
        expired: 0,
        bytes,
    })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.buf.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u64(&mut self) -> Option<u64> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Some(u64::from_le_bytes(a))
    }
}

/// Parses and verifies snapshot bytes, calling `f` with each record.
///
/// # Errors
/// [`SnapshotError::Corrupt`], [`SnapshotError::UnsupportedVersion`] or
/// [`SnapshotError::ResolutionMismatch`]; `f` is called only once the whole file checked out.
pub fn decode(
    bytes: &[u8],
    path: &Path,
    expected_resolution: u8,
    default_ttl_ms: u32,
    mut f: impl FnMut(Record),
) -> Result<(), SnapshotError> {
    let corrupt = |reason: &str| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt("too short"));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt("not a geomatch snapshot (bad magic)"));
    }
    let mut version = [0; 4];
    version.copy_from_slice(&bytes[8..12]);
    let version = u32::from_le_bytes(version);
    if version != VERSION && version != 1 {
        return Err(SnapshotError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let (body, hash) = bytes.split_at(bytes.len() - HASH_LEN);
    if blake3::hash(body).as_bytes() != hash {
        return Err(corrupt("checksum mismatch (torn or damaged file)"));
    }
    let resolution = bytes[12];
    if resolution != expected_resolution {
        return Err(SnapshotError::ResolutionMismatch {
            path: path.to_path_buf(),
            found: resolution,
            expected: expected_resolution,
        });
    }
    let records_end = body.len() - 8;
    let mut r = Reader {
        buf: &body[..records_end],
        at: HEADER_LEN,
    };
    let mut parsed = Vec::new();
    while r.at < records_end {
        let bad = || corrupt("truncated record");
        let len = r.u8().ok_or_else(bad)? as usize;
        let user = r.take(len).ok_or_else(bad)?;
        let user = std::str::from_utf8(user)
            .ok()
            .and_then(UserId::stored)
            .ok_or_else(|| corrupt("invalid user id"))?;
        let cell =
            CellIndex::try_from(r.u64().ok_or_else(bad)?).map_err(|_| corrupt("invalid cell"))?;
        let gender =
            Gender::from_wire(r.u8().ok_or_else(bad)?).ok_or_else(|| corrupt("invalid gender"))?;
        let last_seen_ms = r.u64().ok_or_else(bad)? as i64;
        let (ttl_ms, visible) = if version == 1 {
            (default_ttl_ms, true)
        } else {
            let ttl = r.take(4).ok_or_else(bad)?;
            let ttl_ms = u32::from_le_bytes([ttl[0], ttl[1], ttl[2], ttl[3]]);
            let visible = match r.u8().ok_or_else(bad)? {
                0 => false,
                1 => true,
                _ => return Err(corrupt("invalid visibility")),
            };
            (ttl_ms, visible)
        };
        parsed.push(Record {
            user,
            cell,
            gender,
            last_seen_ms,
            ttl_ms,
            visible,
        });
    }
    let mut count = [0; 8];
    count.copy_from_slice(&body[records_end..]);
    if u64::from_le_bytes(count) != parsed.len() as u64 {
        return Err(corrupt("record count mismatch"));
    }
    parsed.into_iter().for_each(&mut f);
    Ok(())
}

/// Loads the snapshot at `path` into `index`, dropping pings expired by `now_ms`.
/// Returns `Ok(None)` when there is no snapshot yet.
///
/// # Errors
/// [`SnapshotError`] for an unreadable, corrupt, unknown-version or mismatched snapshot;
/// nothing is loaded then.
pub fn load(index: &NearbyIndex, path: &Path, now_ms: i64) -> Result<Option<Stats>, SnapshotError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut stats = Stats {
        users: 0,
        expired: 0,
        bytes: bytes.len() as u64,
    };
    let resolution = u8::from(index.config().privacy_resolution);
    decode(&bytes, path, resolution, index.ttl_ms(), |record| {
        if index.restore(record, now_ms) {
            stats.users += 1;
        } else {
            stats.expired += 1;
        }
    })?;
    Ok(Some(stats))
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
