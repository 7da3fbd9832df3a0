//! Compiles `proto/*.proto` into Rust without `protoc`: `protox` parses the
//! files into descriptors, `prost-build` generates the message types and
//! `pbjson-build` their proto3-JSON serde implementations. `Timestamp` is our
//! own type (see `src/timestamp.rs`).

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/process.proto", "proto/filesystem.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = prost_build::Config::new();
    config.extern_path(".google.protobuf.Timestamp", "crate::Timestamp");
    config.compile_fds(fds.clone())?;

    let descriptors = fds.encode_to_vec();
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .out_dir(&out)
        .ignore_unknown_fields()
        .build(&[".process", ".filesystem"])?;
    Ok(())
}
