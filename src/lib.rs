//! geomatch: location matching over gRPC.
//!
//! Crate map, one room per concept (ARCHITECTURE.md draws the data flow and lock orders):
//! - [`base`]: the floor: validated ids ([`id`]), injected time ([`clock`]), sharded
//!   locks, waiting on a notification. Imports nothing else of the crate.
//! - [`error`]: the domain error type (no transport types).
//! - [`geo`]: coordinates, distances, privacy bands, the H3 cell policy, and the
//!   validated request values (radius, page size, time to live).
//! - [`nearby`]: People Nearby: the location index, its search, page tokens, watches and
//!   snapshots.
//! - [`shake`]: the Shake matcher.
//! - [`store`]: where People Nearby is held: in memory, or in Redis / Valkey (one server
//!   or a Cluster) for any number of replicas.
//! - [`guard`]: abuse controls: per-user rate limits and the impossible-travel check.
//! - [`grpc`]: the only module that knows tonic/prost: generated code, admission,
//!   adapters, conversions, status mapping.
//! - [`telemetry`]: logs, metric names and the Prometheus recorder.
//! - [`config`]: command-line and environment configuration, turned into each room's
//!   settings.
//! - [`server`]: wires the rooms together, runs the background tasks and serves until
//!   shutdown.

pub mod base;
pub mod config;
pub mod error;
pub mod geo;
pub mod grpc;
pub mod guard;
pub mod nearby;
pub mod server;
pub mod shake;
pub mod store;
pub mod telemetry;

pub use base::{clock, id};
