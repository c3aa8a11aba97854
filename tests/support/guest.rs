//! The real guest image for end-to-end tests and benches (`tests/e2e_qemu.rs`,
//! `tests/billing_qemu.rs`, the real-VMM tests, `benches/boot.rs`): built by `scripts/guest-image.sh` on first use
//! into `target/guest-image`, or `METALD_GUEST_IMAGE_DIR` (`make test` points
//! it at `build/guest`). The script is idempotent and cached.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds (or reuses) the guest image once per test process.
pub fn guest_image() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("METALD_GUEST_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/guest-image"));
        let status = std::process::Command::new("bash")
            .arg(repo().join("scripts/guest-image.sh"))
            .arg(&dir)
            .status()
            .expect("running scripts/guest-image.sh");
        assert!(status.success(), "scripts/guest-image.sh failed: {status}");
        std::fs::canonicalize(dir).unwrap()
    })
}
