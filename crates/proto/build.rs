//! Generates the Rust types and gRPC stubs of `proto/medrl.proto` with a vendored protoc, so no
//! system protobuf compiler is needed, and writes the file descriptor set used by reflection.

use std::env;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_dir = manifest.join("../../proto");
    let proto = proto_dir.join("medrl.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let out = PathBuf::from(env::var("OUT_DIR")?);

    // Config::protoc_executable avoids env::set_var("PROTOC"), which is unsafe in edition 2024.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        // Payload fields become `bytes::Bytes`: weight chunks and images are passed on without copies.
        .bytes(".medrl.v1.GetImageResponse.data")
        .bytes(".medrl.v1.WeightChunk.data")
        .bytes(".medrl.v1.PublishNcclIdRequest.unique_id")
        .bytes(".medrl.v1.NcclRendezvous.unique_id")
        // prost's format with the whole message reserved before encoding (`src/codec.rs`).
        .codec_path("crate::codec::ReservingCodec")
        .file_descriptor_set_path(out.join("medrl_descriptor.bin"))
        .compile_with_config(config, &[proto], &[proto_dir])?;
    Ok(())
}
