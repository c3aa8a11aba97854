//! The cache directory's layout (`docs/IMAGES.md`, "Cache"): where bases,
//! `tops/` entries and customer records live, reading a published base
//! ([`Store::lookup`]), publishing one by rename ([`Store::publish`]) and
//! atomic small files ([`write_atomic`]). Blocking code.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::digest::{hex_of, name_for};
use super::error::ImageError;
use super::manifest::ImageConfig;
use super::settings::ImageSettings;

/// A published base, as stored in `image.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub digest: String,
    pub config: ImageConfig,
}

/// The cache directory and the settings it was opened with.
#[derive(Debug)]
pub(crate) struct Store {
    pub settings: ImageSettings,
}

impl Store {
    pub fn root(&self) -> &Path {
        &self.settings.cache_dir
    }

    pub fn base_dir(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root().join("bases").join(hex_of(digest)?))
    }

    pub fn top_file(&self, top: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root().join("tops").join(hex_of(top)?))
    }

    pub fn record_file(&self, customer: &str, reference: &str) -> PathBuf {
        self.root().join("refs").join(name_for(customer)).join(name_for(reference))
    }

    /// The published entry `top` leads to, from disk.
    pub fn lookup(&self, top: &str) -> Option<Entry> {
        let digest = match fs::read_to_string(self.top_file(top).ok()?) {
            Ok(d) => d.trim().to_owned(),
            Err(_) => top.to_owned(),
        };
        let text = fs::read(self.base_dir(&digest).ok()?.join("image.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Publishes a built base directory (`out`, complete with `image.json`)
    /// under its digest, and `top` → digest when they differ.
    /// With `out` = `None` only the `tops/` entry is written.
    pub fn publish(&self, out: Option<&Path>, top: Option<&str>, entry: &Entry) -> Result<(), ImageError> {
        let dest = self.base_dir(&entry.digest)?;
        if let Some(out) = out {
            match fs::rename(out, &dest) {
                Ok(()) => {}
                // Published meanwhile (another source of the same digest).
                Err(_) if dest.join("image.json").exists() => {}
                Err(e) => return Err(ImageError::io("publish", &dest)(e)),
            }
            fs::File::open(dest.parent().unwrap_or(&dest))
                .and_then(|d| d.sync_all())
                .map_err(ImageError::io("sync", &dest))?;
        }
        if let Some(top) = top.filter(|t| *t != entry.digest) {
            write_atomic(&self.top_file(top)?, format!("{}\n", entry.digest).as_bytes())?;
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically (temporary file, sync, rename).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    // Unique: the same record may be written by concurrent calls.
    let tmp = path.with_extension(format!("{:016x}.tmp", rand::random::<u64>()));
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(ImageError::io("create", parent))?;
    }
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        ImageError::io("write", path)(e)
    })
}
