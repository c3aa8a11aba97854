//! Local image sources (blocking code): an OCI image layout directory
//! (`index.json`, `blobs/sha256/<hex>`), whose blobs are copied out and
//! verified like a registry's, and a `docker save` archive, which is
//! unpacked into an OCI-layout-shaped work directory with a manifest made
//! for it (a `docker save` archive has none): each layer is checked
//! against the config's `diff_ids`, and the config against its file name
//! when that is its digest.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::ImageIndex;
use serde::Deserialize;
use serde_json::json;

use super::digest;
use super::error::ImageError;
use super::layer::Compression;
use super::manifest::{Blob, OCI_MANIFEST, image_config};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn not_found(e: io::Error, what: &str) -> ImageError {
    if e.kind() == io::ErrorKind::NotFound {
        ImageError::NotFound(format!("{what} does not exist"))
    } else {
        ImageError::Unsupported(format!("{what}: {e}"))
    }
}

/// The path of a blob in a layout.
pub fn blob_path(dir: &Path, digest_: &str) -> Result<PathBuf, ImageError> {
    Ok(dir.join("blobs/sha256").join(digest::hex_of(digest_)?))
}

/// The manifest (or index) digest and size the layout's `index.json` names
/// for `tag` (its only entry without a tag).
pub fn layout_top(dir: &Path, tag: Option<&str>) -> Result<(String, u64), ImageError> {
    let text = fs::read(dir.join("index.json")).map_err(|e| not_found(e, "the layout's index.json"))?;
    let index: ImageIndex = serde_json::from_slice(&text)
        .map_err(|e| ImageError::Unsupported(format!("malformed layout index.json: {e}")))?;
    let named = |d: &&oci_spec::image::Descriptor| {
        let name = d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).map(String::as_str).unwrap_or("");
        match tag {
            Some(t) => name == t || name.ends_with(&format!(":{t}")),
            None => true,
        }
    };
    let found: Vec<_> = index.manifests().iter().filter(named).collect();
    match (found.as_slice(), tag) {
        ([d], _) => Ok((d.digest().to_string(), d.size())),
        ([], Some(t)) => Err(ImageError::NotFound(format!("the layout has no image tagged {t:?}"))),
        (_, None) => Err(ImageError::BadReference(format!("the layout has {} images: name a tag", found.len()))),
        (_, Some(t)) => Err(ImageError::Unsupported(format!("the layout has several images tagged {t:?}"))),
    }
}

/// Reads and verifies a manifest blob of a layout.
pub fn layout_manifest(dir: &Path, digest_: &str, size: Option<u64>) -> Result<Vec<u8>, ImageError> {
    let path = blob_path(dir, digest_)?;
    let meta = fs::metadata(&path).map_err(|e| not_found(e, "a manifest blob of the layout"))?;
    if meta.len() > 4 << 20 {
        return Err(ImageError::Unsupported("a manifest larger than 4 MiB".into()));
    }
    let bytes = fs::read(&path).map_err(ImageError::io("read", &path))?;
    digest::verify(digest_, size, &digest::of_bytes(&bytes), bytes.len() as u64)?;
    Ok(bytes)
}

/// Copies a layout's blob to `dest` while hashing it, and verifies it (so
/// what is used is exactly what was verified, whatever happens to the
/// source afterwards). With `dest` = `None` the blob is verified in place
/// (for metald's own work directory).
pub fn layout_blob(dir: &Path, blob: &Blob, dest: Option<&Path>) -> Result<(), ImageError> {
    let src = blob_path(dir, &blob.digest)?;
    let input = File::open(&src).map_err(|e| not_found(e, "a blob of the layout"))?;
    // Never read past the descriptor's size (+1 to notice a longer file).
    let limited = input.take(blob.size.saturating_add(1));
    let (actual, size) = match dest {
        None => digest::of_reader(limited).map_err(ImageError::io("read", &src))?,
        Some(dest) => {
            let out = File::create(dest).map_err(ImageError::io("create", dest))?;
            let mut tee = Tee { inner: limited, out };
            // Not synced: a pull's work copy, removed after the build.
            digest::of_reader(&mut tee).map_err(ImageError::io("copy to", dest))?
        }
    };
    digest::verify(&blob.digest, Some(blob.size), &actual, size)
}

/// A reader that writes what it reads to `out`.
struct Tee<R> {
    inner: R,
    out: File,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SavedImage {
    config: String,
    layers: Vec<String>,
}

fn compression_of(path: &Path) -> Result<Compression, ImageError> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).map_err(ImageError::io("open", path))?;
    let n = f.read(&mut magic).map_err(ImageError::io("read", path))?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    })
}

fn media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

/// The sha256 of a layer's uncompressed tar stream (its diff id).
fn diff_id(path: &Path, c: Compression) -> Result<String, ImageError> {
    let f = File::open(path).map_err(ImageError::io("open", path))?;
    let r: Box<dyn Read> = match c {
        Compression::None => Box::new(f),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(f).map_err(ImageError::io("read", path))?),
    };
    let (d, _) = digest::of_reader(r).map_err(|e| ImageError::Unsupported(format!("a layer is not readable: {e}")))?;
    Ok(d)
}

/// Unpacks the `docker save` archive `archive` into `out` (an empty
/// directory) as an OCI layout's `blobs/sha256`, with a manifest made for
/// it; returns that manifest's digest and size. `max_bytes` bounds the
/// archive's content.
pub fn import_archive(archive: &Path, out: &Path, max_bytes: u64) -> Result<(String, u64), ImageError> {
    let file = File::open(archive).map_err(|e| not_found(e, "the archive"))?;
    let files = out.join("files");
    let blobs = out.join("blobs/sha256");
    fs::create_dir_all(&files).map_err(ImageError::io("create", &files))?;
    fs::create_dir_all(&blobs).map_err(ImageError::io("create", &blobs))?;
    let malformed = |e: io::Error| ImageError::Unsupported(format!("not a docker-archive tar: {e}"));
    let mut members: HashMap<String, PathBuf> = HashMap::new();
    let mut total = 0u64;
    let mut tar = tar::Archive::new(file);
    for (i, entry) in tar.entries().map_err(malformed)?.enumerate() {
        let mut entry = entry.map_err(malformed)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        total = total.saturating_add(entry.size());
        if total > max_bytes {
            return Err(ImageError::TooBig { size: total, limit: max_bytes });
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).trim_start_matches("./").to_owned();
        let path = files.join(i.to_string());
        let mut f = File::create(&path).map_err(ImageError::io("create", &path))?;
        io::copy(&mut entry, &mut f).map_err(malformed)?;
        members.insert(name, path);
    }
    let member = |name: &str| {
        members
            .get(name.trim_start_matches("./"))
            .ok_or_else(|| ImageError::Unsupported(format!("the archive has no member {name:?}")))
    };
    let saved: Vec<SavedImage> = serde_json::from_slice(
        &fs::read(member("manifest.json")?).map_err(ImageError::io("read", Path::new("manifest.json")))?,
    )
    .map_err(|e| ImageError::Unsupported(format!("malformed docker-archive manifest.json: {e}")))?;
    let [image] = saved.as_slice() else {
        return Err(ImageError::Unsupported(format!("the archive holds {} images, not one", saved.len())));
    };

    let config_path = member(&image.config)?;
    let config = fs::read(config_path).map_err(ImageError::io("read", config_path))?;
    let config_digest = digest::of_bytes(&config);
    // `<hex>.json` (docker save) or `blobs/sha256/<hex>` names the digest.
    let stem = image.config.rsplit('/').next().unwrap_or("").trim_end_matches(".json");
    if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) && format!("sha256:{stem}") != config_digest {
        return Err(ImageError::DigestMismatch {
            digest: format!("sha256:{stem}"),
            reason: format!("the config hashes to {config_digest}"),
        });
    }
    let (_, diff_ids) = image_config(&config)?;
    if diff_ids.len() != image.layers.len() {
        return Err(ImageError::Unsupported(format!(
            "{} layers but the config lists {} diff_ids",
            image.layers.len(),
            diff_ids.len()
        )));
    }
    let config_blob = blobs.join(digest::hex_of(&config_digest)?);
    fs::write(&config_blob, &config).map_err(ImageError::io("write", &config_blob))?;
    let mut layers = Vec::new();
    for (name, want) in image.layers.iter().zip(&diff_ids) {
        let path = member(name)?;
        let compression = compression_of(path)?;
        let got = diff_id(path, compression)?;
        if &got != want {
            return Err(ImageError::DigestMismatch {
                digest: want.clone(),
                reason: format!("the layer's tar hashes to {got}"),
            });
        }
        let (d, size) = digest::of_file(path)?;
        let dest = blobs.join(digest::hex_of(&d)?);
        fs::rename(path, &dest)
            .or_else(|_| fs::copy(path, &dest).map(|_| ()))
            .map_err(ImageError::io("move", &dest))?;
        layers.push(json!({"mediaType": media_type(compression), "digest": d, "size": size}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layers,
    }))
    .map_err(|e| ImageError::Unsupported(e.to_string()))?;
    let manifest_digest = digest::of_bytes(&manifest);
    let path = blobs.join(digest::hex_of(&manifest_digest)?);
    fs::write(&path, &manifest).map_err(ImageError::io("write", &path))?;
    let _ = fs::remove_dir_all(&files);
    Ok((manifest_digest, manifest.len() as u64))
}
