//! libFuzzer target: a `CreateVm` request's decoding and validation
//! (the shared target in `tests/support/fuzz.rs`).

#![no_main]

#[path = "../../tests/support/fuzz.rs"]
mod fuzz;

use std::sync::OnceLock;

use metald::model::Limits;

/// An asset directory with a kernel and a disk, made once per process.
fn limits() -> &'static Limits {
    static LIMITS: OnceLock<(tempfile::TempDir, Limits)> = OnceLock::new();
    &LIMITS
        .get_or_init(|| {
            let tmp = tempfile::tempdir().expect("temp dir");
            let assets = tmp.path().join("assets");
            std::fs::create_dir_all(&assets).expect("assets");
            std::fs::write(assets.join("vmlinux"), b"k").expect("kernel");
            std::fs::write(assets.join("rootfs.ext4"), b"r").expect("disk");
            let assets = std::fs::canonicalize(assets).expect("canonical");
            (tmp, Limits { max_vcpus: 8, max_memory_mb: 4096, asset_dirs: vec![assets] })
        })
        .1
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz::create_vm(data, limits());
});
