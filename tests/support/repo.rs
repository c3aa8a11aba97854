//! Paths in this checkout: the repository root (protos, docs, scripts) and
//! the npm test peers that `make js-deps` installs into `tests/js` (`buf`,
//! `tsx`).

use std::path::PathBuf;

/// The repository root (`CARGO_MANIFEST_DIR`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/js`: the npm test peers' package (Connect clients and servers).
pub fn js_dir() -> PathBuf {
    repo_root().join("tests/js")
}

/// The npm-installed executable `name` (`buf`, `tsx`) in
/// `tests/js/node_modules/.bin`; fails the test saying how to install it
/// when it is missing.
pub fn js_bin(name: &str) -> PathBuf {
    let p = js_dir().join("node_modules/.bin").join(name);
    assert!(p.exists(), "{} is missing: run `make deps` (npm install in tests/js)", p.display());
    p
}
