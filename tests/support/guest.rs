//! The real guest image for end-to-end tests and benches (`tests/e2e_qemu.rs`,
//! `tests/billing_qemu.rs`, the real-VMM tests, `benches/boot.rs`): built by `scripts/guest-image.sh` on first use
//! into `target/guest-image`, or `METALD_GUEST_IMAGE_DIR` (`make test` points
//! it at `build/guest`). The script is idempotent and cached. Also reading
//! a guest's console log for the markers its init prints.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::repo::repo_root;

/// Builds (or reuses) the guest image once per test process.
pub fn guest_image() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("METALD_GUEST_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/guest-image"));
        let status = std::process::Command::new("bash")
            .arg(repo_root().join("scripts/guest-image.sh"))
            .arg(&dir)
            .status()
            .expect("running scripts/guest-image.sh");
        assert!(status.success(), "scripts/guest-image.sh failed: {status}");
        std::fs::canonicalize(dir).unwrap()
    })
}

/// The text of a console log so far (empty while it does not exist).
pub fn console_text(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// How many lines of a console log are `marker` (surrounding blanks ignored).
pub fn count_lines(path: &Path, marker: &str) -> usize {
    console_text(path).lines().filter(|l| l.trim() == marker).count()
}
