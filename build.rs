//! Generates the protobuf messages, ConnectRPC service traits and clients for
//! `proto/vmprovisioner/v1/vm.proto` (served) and `proto/billing/v1/billing.proto`
//! (called). Descriptors come from `protox` (pure Rust) so no `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["vmprovisioner/v1/vm.proto", "billing/v1/billing.proto"];
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(files)?;
    let descriptor_path = out_dir.join("metald_descriptor.bin");
    std::fs::write(&descriptor_path, compiler.encode_file_descriptor_set())?;

    connectrpc_build::Config::new()
        .descriptor_set(&descriptor_path)
        .files(&files)
        .include_file("_connectrpc.rs")
        .emit_rerun_directives(false)
        .compile()?;

    for f in files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    Ok(())
}
