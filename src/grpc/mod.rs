//! The gRPC edge: generated code, service adapters, and the one place domain types meet
//! protobuf ones. Nothing outside this module names tonic or prost.

pub mod admission;
pub mod auth;
mod bulk;
pub mod codec;
mod convert;
#[doc(hidden)]
pub mod fuzz;
pub mod layer;
mod nearby;
mod shake;
pub mod status;

pub use nearby::NearbyService;
pub use shake::{ShakeService, stamp_deadline};

/// Generated protobuf and tonic code for `geomatch.v1`.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms
)]
pub mod pb {
    tonic::include_proto!("geomatch.v1");

    /// Encoded descriptor set of `geomatch.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/geomatch_descriptor.bin"));
}
