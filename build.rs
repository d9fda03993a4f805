//! Compiles the wire contract with protox (pure Rust, no system `protoc`) and
//! keeps the encoded descriptor set for gRPC server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/geomatch/v1/geomatch.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("geomatch_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec, except that an undecodable request is INVALID_ARGUMENT, not
        // INTERNAL (src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::GeomatchCodec")
        .compile_fds(fds)?;
    Ok(())
}
