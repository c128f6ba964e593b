//! Compiles the .proto files with protox (pure Rust, no system `protoc`).

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/sluice/v1/errors.proto",
        "proto/sluice/v1/produce.proto",
        "proto/sluice/v1/fetch.proto",
        "proto/sluice/v1/admin.proto",
        "proto/sluice/v1/group.proto",
        "proto/sluice/v1/controller.proto",
        "proto/sluice/v1/replica.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("sluice_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
