//! geomatch: location matching over gRPC.
//!
//! Crate map:
//! - [`error`]: the domain error type (no transport types).
//! - [`geo`]: validated coordinates, distances, privacy snapping and distance bands.
//! - [`cell`]: H3 policy: covering a radius with cells, ring by ring, provably exactly.
//! - [`id`]: validated user and shake ids.
//! - [`clock`]: injected wall-clock time.
//! - [`nearby`]: the People Nearby location index and its page tokens.
//! - [`shake`]: the Shake matcher.
//! - [`limits`]: abuse controls: per-user rate limits and the impossible-travel check.
//! - `shard`: the padded `RwLock` shards every in-memory map uses.
//! - [`config`]: command-line and environment configuration.
//! - [`grpc`]: the only module that knows tonic/prost: generated code, adapters, status mapping.
//! - [`telemetry`]: log setup.
//! - [`snapshot`]: crash-safe, checksummed snapshots of the index.
//! - [`server`]: wires the domain and the gRPC services together and serves until shutdown.

pub mod cell;
pub mod clock;
pub mod config;
pub mod error;
pub mod geo;
pub mod grpc;
pub mod id;
pub mod limits;
pub mod nearby;
pub mod server;
pub mod shake;
mod shard;
pub mod snapshot;
pub mod telemetry;
mod wait;
