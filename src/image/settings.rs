//! [`ImageSettings`]: the image cache's configuration from
//! `UNKEY_METALD_IMAGE_*` (documented in `docs/IMAGES.md`, "Cache").

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::layer::Limits;
use super::rootfs::Mkfs;
use crate::config::Reader;

/// The least GC age: a base handed out by `prepare` a moment ago is kept
/// at least this long, covering the moment between `prepare` returning and
/// the create registering the digest with its VM manager (which then keeps
/// it until the VM is gone). `docs/IMAGES.md`, "GC".
pub const MIN_GC_AGE: Duration = Duration::from_secs(60);

/// Validated image pull and cache settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSettings {
    /// `UNKEY_METALD_IMAGE_CACHE_DIR`: bases, records, work directories.
    /// Default `<UNKEY_METALD_DATA_DIR>/images`.
    pub cache_dir: PathBuf,
    /// `UNKEY_METALD_IMAGE_INSECURE_REGISTRIES`: `host[:port]` names (comma
    /// separated) pulled over plain HTTP instead of HTTPS.
    pub insecure_registries: Vec<String>,
    /// `UNKEY_METALD_IMAGE_CREDENTIALS_FILE`: Docker `config.json` with
    /// per-registry credentials, used when a request brings none.
    pub credentials_file: Option<PathBuf>,
    /// `UNKEY_METALD_IMAGE_CA_FILE`: a PEM bundle of extra root CAs trusted
    /// for HTTPS registries (beside the built-in roots), e.g. the CA of a
    /// registry inside the operator's network.
    pub ca_file: Option<PathBuf>,
    /// `UNKEY_METALD_IMAGE_MAX_COMPRESSED_BYTES`: the sum of an image's
    /// layer (and config) blob sizes. Default 4 GiB.
    pub max_compressed_bytes: u64,
    /// `UNKEY_METALD_IMAGE_MAX_UNPACKED_BYTES` and
    /// `UNKEY_METALD_IMAGE_MAX_ENTRIES`: the unpack limits over all layers.
    pub limits: Limits,
    /// `UNKEY_METALD_IMAGE_GC_AGE_SECONDS`: a base no VM uses is removed by
    /// [`Images::gc`](super::Images::gc) once its last use is older. Default
    /// one day, at least [`MIN_GC_AGE`] (also when set in code).
    pub gc_age: Duration,
    /// `UNKEY_METALD_IMAGE_PULL_RETRIES`: how many times a broken blob
    /// download is resumed from its offset before the pull fails. Default 3.
    pub retries: u32,
    /// The `mkfs.ext4` that builds bases.
    pub mkfs: Mkfs,
}

impl ImageSettings {
    /// Defaults, with the cache in `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> ImageSettings {
        ImageSettings {
            cache_dir: cache_dir.into(),
            insecure_registries: Vec::new(),
            credentials_file: None,
            ca_file: None,
            max_compressed_bytes: 4 << 30,
            limits: Limits::default(),
            gc_age: Duration::from_secs(24 * 3600),
            retries: 3,
            mkfs: Mkfs::default(),
        }
    }

    /// Reads the `IMAGE_*` variables; `data_dir` is metald's data directory
    /// (the cache's default parent). Problems are added to `r`.
    pub fn read(r: &mut Reader<'_>, data_dir: &Path) -> ImageSettings {
        let d = ImageSettings::new(data_dir.join("images"));
        let cache_dir = r.raw("IMAGE_CACHE_DIR").map_or(d.cache_dir.clone(), PathBuf::from);
        // (A relative default is the data directory's problem, reported for it.)
        if r.raw("IMAGE_CACHE_DIR").is_some() && !cache_dir.is_absolute() {
            r.error("IMAGE_CACHE_DIR", format!("{} is not an absolute path", cache_dir.display()));
        }
        let mut insecure_registries = Vec::new();
        for host in r.raw("IMAGE_INSECURE_REGISTRIES").unwrap_or("").split(',').map(str::trim) {
            if host.is_empty() {
                continue;
            }
            let ok = !host.contains('/')
                && !host.contains("://")
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
            if ok {
                insecure_registries.push(host.to_ascii_lowercase());
            } else {
                r.error("IMAGE_INSECURE_REGISTRIES", format!("{host:?} is not a host[:port]"));
            }
        }
        let credentials_file = r.raw("IMAGE_CREDENTIALS_FILE").map(PathBuf::from);
        if let Some(f) = credentials_file.as_ref().filter(|f| !f.is_absolute()) {
            r.error("IMAGE_CREDENTIALS_FILE", format!("{} is not an absolute path", f.display()));
        }
        let ca_file = r.raw("IMAGE_CA_FILE").map(PathBuf::from);
        if let Some(f) = ca_file.as_ref().filter(|f| !f.is_absolute()) {
            r.error("IMAGE_CA_FILE", format!("{} is not an absolute path", f.display()));
        }
        let max_compressed_bytes = r.range("IMAGE_MAX_COMPRESSED_BYTES", d.max_compressed_bytes, 1 << 20, 1 << 50);
        let max_bytes = r.range("IMAGE_MAX_UNPACKED_BYTES", d.limits.max_bytes, 1 << 20, 1 << 50);
        let max_entries = r.range("IMAGE_MAX_ENTRIES", d.limits.max_entries, 16, 1 << 32);
        let gc_age = Duration::from_secs(r.range(
            "IMAGE_GC_AGE_SECONDS",
            d.gc_age.as_secs(),
            MIN_GC_AGE.as_secs(),
            10 * 365 * 86400,
        ));
        let retries = r.range("IMAGE_PULL_RETRIES", d.retries, 0, 100);
        ImageSettings {
            cache_dir,
            insecure_registries,
            credentials_file,
            ca_file,
            max_compressed_bytes,
            limits: Limits { max_bytes, max_entries },
            gc_age,
            retries,
            mkfs: d.mkfs,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::PREFIX;

    fn read(pairs: &[(&str, &str)]) -> (ImageSettings, Vec<String>) {
        let src: HashMap<String, String> = pairs.iter().map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string())).collect();
        let mut r = Reader::new(&src);
        let s = ImageSettings::read(&mut r, Path::new("/var/lib/metald"));
        (s, r.finish().err().map(|e| e.0).unwrap_or_default())
    }

    #[test]
    fn defaults_live_under_the_data_dir() {
        let (s, errors) = read(&[]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(s, ImageSettings::new("/var/lib/metald/images"));
    }

    #[test]
    fn every_knob_is_read_and_bad_values_are_all_reported() {
        let (s, errors) = read(&[
            ("IMAGE_CACHE_DIR", "/srv/images"),
            ("IMAGE_INSECURE_REGISTRIES", "127.0.0.1:5000, Registry.local ,"),
            ("IMAGE_CREDENTIALS_FILE", "/etc/metald/auth.json"),
            ("IMAGE_CA_FILE", "/etc/metald/registry-ca.pem"),
            ("IMAGE_MAX_COMPRESSED_BYTES", "2097152"),
            ("IMAGE_MAX_UNPACKED_BYTES", "4194304"),
            ("IMAGE_MAX_ENTRIES", "100"),
            ("IMAGE_GC_AGE_SECONDS", "60"),
            ("IMAGE_PULL_RETRIES", "5"),
        ]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(s.cache_dir, PathBuf::from("/srv/images"));
        assert_eq!(s.insecure_registries, vec!["127.0.0.1:5000".to_owned(), "registry.local".to_owned()]);
        assert_eq!(s.credentials_file, Some(PathBuf::from("/etc/metald/auth.json")));
        assert_eq!(s.ca_file, Some(PathBuf::from("/etc/metald/registry-ca.pem")));
        assert_eq!((s.max_compressed_bytes, s.limits.max_bytes, s.limits.max_entries), (2 << 20, 4 << 20, 100));
        assert_eq!((s.gc_age, s.retries), (Duration::from_secs(60), 5));

        let (_, errors) = read(&[
            ("IMAGE_CACHE_DIR", "images"),
            ("IMAGE_INSECURE_REGISTRIES", "http://x:5000"),
            ("IMAGE_CREDENTIALS_FILE", "auth.json"),
            ("IMAGE_CA_FILE", "ca.pem"),
            ("IMAGE_MAX_ENTRIES", "3"),
            ("IMAGE_GC_AGE_SECONDS", "0"),
        ]);
        assert_eq!(errors.len(), 6, "{errors:?}");
    }
}
