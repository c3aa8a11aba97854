//! One pull, start to finish, in a work directory of its own: the manifest
//! (through an index to linux/amd64), the config and the layers, each
//! verified against its digest and bounded by the size limit; the layers
//! applied with [`Unpacker`](super::Unpacker); the ext4 base built with
//! [`build_ext4`](super::build_ext4); the result published under the
//! manifest digest. Whatever happens, the work directory is removed at the
//! end, so a failed pull leaves nothing behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::digest::hex_of;
use super::error::ImageError;
use super::layer::Unpacker;
use super::local;
use super::manifest::{Blob, Document, contents, image_config, parse, pick_platform};
use super::registry::Remote;
use super::rootfs::build_ext4;
use super::store::{Entry, Store};

/// Where a pull's documents and blobs come from.
#[derive(Debug)]
pub(crate) enum Fetch {
    /// A registry; `top` is the digest the caller resolved.
    Remote { remote: Remote, top: String },
    /// An OCI layout; `copy` = false for metald's own work directories
    /// (verified in place instead of copied).
    Layout { dir: PathBuf, top: String, size: u64, copy: bool },
    /// A `docker save` archive.
    Archive { path: PathBuf },
}

/// Blobs downloaded at the same time, ahead of the layer being unpacked.
const AHEAD: usize = 3;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ImageError::Task(e.to_string()))?
}

impl Fetch {
    fn top(&self) -> (String, Option<u64>) {
        match self {
            Fetch::Remote { top, .. } => (top.clone(), None),
            Fetch::Layout { top, size, .. } => (top.clone(), Some(*size)),
            Fetch::Archive { .. } => (String::new(), None),
        }
    }

    async fn manifest(&self, digest: &str, size: Option<u64>) -> Result<Vec<u8>, ImageError> {
        match self {
            Fetch::Remote { remote, .. } => remote.manifest(digest, size).await,
            Fetch::Layout { dir, .. } => {
                let (dir, digest) = (dir.clone(), digest.to_owned());
                blocking(move || local::layout_manifest(&dir, &digest, size)).await
            }
            Fetch::Archive { .. } => Err(ImageError::Task("archive not imported".into())),
        }
    }

    /// Fetches a blob into `dir` (or verifies it in place); its path.
    async fn blob(&self, blob: &Blob, dir: &Path) -> Result<PathBuf, ImageError> {
        let dest = dir.join(hex_of(&blob.digest)?);
        match self {
            Fetch::Remote { remote, .. } => {
                remote.blob(blob, &dest).await?;
                Ok(dest)
            }
            Fetch::Layout { dir, copy, .. } => {
                let (dir, blob, copy) = (dir.clone(), blob.clone(), *copy);
                blocking(move || {
                    if copy {
                        local::layout_blob(&dir, &blob, Some(&dest))?;
                        Ok(dest)
                    } else {
                        local::layout_blob(&dir, &blob, None)?;
                        local::blob_path(&dir, &blob.digest)
                    }
                })
                .await
            }
            Fetch::Archive { .. } => Err(ImageError::Task("archive not imported".into())),
        }
    }
}

/// Runs one pull in a fresh work directory and removes it afterwards.
pub(crate) async fn build(inner: &Arc<Store>, fetch: Fetch) -> Result<Entry, ImageError> {
    let work = inner.root().join("work").join(format!("pull-{:016x}", rand::random::<u64>()));
    let w = work.clone();
    blocking(move || fs::create_dir_all(w.join("blobs")).map_err(ImageError::io("create", &w))).await?;
    let result = build_in(inner, fetch, &work).await;
    let w = work.clone();
    let removed = blocking(move || fs::remove_dir_all(&w).map_err(ImageError::io("remove", &w))).await;
    if let Err(e) = removed {
        tracing::warn!(error = %crate::util::chain(&e), "cannot remove a pull's work directory");
    }
    if let Err(e) = &result {
        tracing::info!(error = %crate::util::chain(e), "image pull failed");
    }
    result
}

async fn build_in(inner: &Arc<Store>, fetch: Fetch, work: &Path) -> Result<Entry, ImageError> {
    let fetch = match fetch {
        Fetch::Archive { path } => {
            let out = work.join("archive");
            let max = inner.settings.limits.max_bytes;
            let o = out.clone();
            let (top, size) = blocking(move || local::import_archive(&path, &o, max)).await?;
            Fetch::Layout { dir: out, top, size, copy: false }
        }
        other => other,
    };
    let (top, top_size) = fetch.top();
    let bytes = fetch.manifest(&top, top_size).await?;
    let (digest, manifest_bytes, manifest) = match parse(&bytes)? {
        Document::Manifest(m) => (top.clone(), bytes, m),
        Document::Index(index) => {
            let pick = pick_platform(&index)?;
            let bytes = fetch.manifest(&pick.digest, Some(pick.size)).await?;
            match parse(&bytes)? {
                Document::Manifest(m) => (pick.digest, bytes, m),
                Document::Index(_) => return Err(ImageError::Unsupported("an index inside an index".into())),
            }
        }
    };
    if let Some(entry) = inner.lookup(&digest) {
        // The same manifest, already built under another top digest.
        let (i, t, e) = (Arc::clone(inner), top.clone(), entry.clone());
        blocking(move || i.publish(None, Some(&t), &e)).await?;
        return Ok(entry);
    }
    let (config_blob, layers) = contents(&manifest, inner.settings.max_compressed_bytes)?;
    let started = Instant::now();
    let blobs = work.join("blobs");
    let config_path = fetch.blob(&config_blob, &blobs).await?;
    let c = config_path.clone();
    let config_bytes = blocking(move || fs::read(&c).map_err(ImageError::io("read", &c))).await?;
    let (config, diff_ids) = image_config(&config_bytes)?;
    if diff_ids.len() != layers.len() {
        return Err(ImageError::Unsupported(format!(
            "the manifest has {} layers but the config lists {} diff_ids",
            layers.len(),
            diff_ids.len()
        )));
    }
    // Downloads run ahead of unpacking (up to `AHEAD` blobs at a time,
    // yielded in layer order): layer i is applied, on a blocking thread, as
    // soon as it and every layer below it are downloaded and verified, while
    // the next ones are still arriving. Nothing unverified is unpacked.
    let entry = Entry { digest: digest.clone(), config };
    let count = layers.len();
    let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
    let (i, w, l) = (Arc::clone(inner), work.to_owned(), layers.clone());
    let unpack = tokio::task::spawn_blocking(move || -> Result<Duration, ImageError> {
        let staging = w.join("rootfs");
        fs::create_dir(&staging).map_err(ImageError::io("create", &staging))?;
        let mut unpacker =
            Unpacker::new(&staging, i.settings.limits)?.preserve_owners(nix::unistd::geteuid().is_root());
        let mut busy = Duration::ZERO;
        for layer in &l {
            // A closed channel: a download failed, its error is returned.
            let Ok(path) = rx.recv() else { return Ok(busy) };
            let t = Instant::now();
            let f = fs::File::open(&path).map_err(ImageError::io("open", &path))?;
            unpacker.apply(std::io::BufReader::with_capacity(256 << 10, f), layer.compression)?;
            busy += t.elapsed();
        }
        Ok(busy)
    });
    let (fetch, blobs) = (&fetch, &blobs);
    let mut seen: Vec<PathBuf> = Vec::with_capacity(layers.len());
    let mut fetches = Vec::with_capacity(layers.len());
    for layer in &layers {
        let done = blobs.join(hex_of(&layer.digest)?);
        // A layer repeated: the earlier download (yielded first) is reused.
        let again = seen.contains(&done);
        seen.push(done.clone());
        fetches.push(async move { if again { Ok(done) } else { fetch.blob(layer, blobs).await } });
    }
    let mut downloads = futures::stream::iter(fetches).buffered(AHEAD);
    let mut failed = None;
    while let Some(result) = downloads.next().await {
        match result {
            // A send fails only when unpacking stopped: its error wins.
            Ok(path) => {
                if tx.send(path).is_err() {
                    break;
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(downloads);
    drop(tx);
    let downloaded = started.elapsed();
    let unpack_busy = unpack.await.map_err(|e| ImageError::Task(e.to_string()))??;
    if let Some(e) = failed {
        return Err(e);
    }
    let unpacked = started.elapsed();

    let (i, w, e) = (Arc::clone(inner), work.to_owned(), entry.clone());
    let built = blocking(move || {
        let staging = w.join("rootfs");
        let out = w.join("out");
        fs::create_dir(&out).map_err(ImageError::io("create", &out))?;
        build_ext4(&i.settings.mkfs, &staging, &out.join("base.ext4"))?;
        let built = started.elapsed();
        let write = |name: &str, bytes: &[u8]| {
            let p = out.join(name);
            fs::write(&p, bytes).and_then(|()| fs::File::open(&p)?.sync_all()).map_err(ImageError::io("write", &p))
        };
        write("manifest.json", &manifest_bytes)?;
        write("config.json", &config_bytes)?;
        let json = serde_json::to_vec_pretty(&e).map_err(|err| ImageError::Task(err.to_string()))?;
        // Last: its presence marks a complete base.
        write("image.json", &json)?;
        i.publish(Some(&out), Some(&top), &e)?;
        Ok(built)
    })
    .await?;
    tracing::info!(
        digest = %entry.digest,
        layers = count,
        download_ms = downloaded.as_millis(),
        unpack_ms = unpack_busy.as_millis(),
        unpack_done_ms = unpacked.as_millis(),
        mkfs_ms = (built - unpacked).as_millis(),
        publish_ms = (started.elapsed() - built).as_millis(),
        "image base built"
    );
    Ok(entry)
}
