//! Compiles every `.proto` under the workspace's `proto/` folder into Rust, with a
//! descriptor set for gRPC reflection. protoc comes from `protoc-bin-vendored`, so
//! the build needs no system protoc and no network.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto").canonicalize()?;
    let third_party = proto_root.join("third_party");
    let mut protos = Vec::new();
    collect_protos(&proto_root, &third_party, &mut protos)?;
    protos.sort();
    // Of the vendored protos only `google.api.HttpRule` gets Rust types (the
    // REST mapping test reads the `google.api.http` option with them);
    // `annotations.proto` lands in the descriptor set as an import.
    protos.push(third_party.join("google/api/http.proto"));

    // tonic-prost-build does not emit rerun-if-changed lines itself: without these,
    // cargo reruns this script on every build (or never, once it sees one line).
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    // Point prost at the vendored protoc through its config rather than the
    // PROTOC environment variable: setting process env is `unsafe` in edition 2024.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // `third_party` first: protoc names a file after the first include that holds it.
    let includes = [third_party, proto_root, include];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("flashsale_descriptor.bin"))
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &protos, &includes)?;
    Ok(())
}

/// Our own protos: every `.proto` under `dir` but those under `skip`.
fn collect_protos(dir: &Path, skip: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path == skip {
            continue;
        } else if path.is_dir() {
            collect_protos(&path, skip, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
