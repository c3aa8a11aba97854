//! [`Images`], the image cache service: resolves a reference (the tenancy
//! check), pulls and verifies an image once however many callers want it
//! at the same time, builds its read-only ext4 base, publishes it under the
//! manifest digest, records which customer resolved which reference to
//! which digest, and garbage-collects unused bases ([`Images::gc`]).
//!
//! Layout of the cache directory (`docs/IMAGES.md`, "Cache"):
//!
//! ```text
//! bases/<hex>/base.ext4   the base of manifest sha256:<hex>
//! bases/<hex>/image.json  digest + ImageConfig; its mtime is the last use
//! bases/<hex>/manifest.json, config.json   the verified documents
//! tops/<hex>              manifest digest an index (or other top) digest resolved to
//! refs/<sha256(customer)>/<sha256(reference)>   the digest that customer resolved
//! work/<random>/          one pull: blobs, the staging tree, the base being built
//! ```
//!
//! Everything appears by rename: a crash leaves only `work/` entries and
//! `*.tmp` files, which [`Images::open`] removes.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use super::auth::{Credentials, CredentialsFile};
use super::build::{Fetch, build};
use super::error::ImageError;
use super::manifest::ImageConfig;
use super::reference::Source;
use super::registry::{Connect, Remote};
use super::settings::ImageSettings;
use super::store::{Entry, Store, write_atomic};

/// A prepared image: its base and how to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The image manifest's digest, `sha256:…` (for an index: the
    /// linux/amd64 manifest's).
    pub digest: String,
    /// The read-only ext4 base, shared by every VM of this digest.
    pub base: PathBuf,
    /// Entrypoint, cmd, env, working directory and user.
    pub config: ImageConfig,
    /// The reference, normalized (`docker.io/library/alpine:latest`).
    pub reference: String,
}

/// What [`Images::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Digests whose bases were removed.
    pub removed: Vec<String>,
    /// Bases kept (in use or used recently).
    pub kept: usize,
    /// Bytes of files removed.
    pub freed_bytes: u64,
    /// Problems (a base that could not be removed is kept and named here).
    pub errors: Vec<String>,
}

type Flight = Shared<BoxFuture<'static, Result<Entry, Arc<ImageError>>>>;

/// The image cache service. Cheap to share (`Arc` inside).
#[derive(Debug, Clone)]
pub struct Images {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    store: Arc<Store>,
    creds: CredentialsFile,
    connect: Connect,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Pulls under way, by the digest (or archive) they were started for.
    flights: HashMap<String, Flight>,
    /// Builds finished by this process, by the same key.
    done: HashMap<String, Entry>,
    /// Pulls started (a test and metric figure).
    builds: u64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ImageError::Task(e.to_string()))?
}

fn size_of_tree(path: &Path) -> u64 {
    let Ok(md) = fs::symlink_metadata(path) else { return 0 };
    if !md.is_dir() {
        return md.len();
    }
    fs::read_dir(path).map(|rd| rd.flatten().map(|e| size_of_tree(&e.path())).sum()).unwrap_or(0)
}

impl Images {
    /// Opens (creating) the cache directory and removes what a crash left:
    /// work directories (partial blobs, staging trees, unfinished bases)
    /// and temporary files. Blocking: call before serving, or on
    /// `spawn_blocking`.
    pub fn open(settings: ImageSettings) -> Result<Images, ImageError> {
        let creds = match &settings.credentials_file {
            Some(path) => CredentialsFile::load(path)?,
            None => CredentialsFile::default(),
        };
        let connect = Connect::new(&settings)?;
        let root = &settings.cache_dir;
        let work = root.join("work");
        if work.exists() {
            fs::remove_dir_all(&work).map_err(ImageError::io("remove", &work))?;
        }
        for dir in ["bases", "tops", "refs", "work"] {
            let d = root.join(dir);
            fs::create_dir_all(&d).map_err(ImageError::io("create", &d))?;
        }
        // Temporary files of interrupted atomic writes.
        for dir in [root.join("tops")]
            .into_iter()
            .chain(fs::read_dir(root.join("refs")).into_iter().flatten().flatten().map(|e| e.path()))
        {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.path().extension().is_some_and(|x| x == "tmp") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        // A base directory without its image.json was never published.
        for e in fs::read_dir(root.join("bases")).into_iter().flatten().flatten() {
            if !e.path().join("image.json").exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(Images {
            inner: Arc::new(Inner { store: Arc::new(Store { settings }), creds, connect, state: Mutex::default() }),
        })
    }

    /// The settings the cache was opened with.
    pub fn settings(&self) -> &ImageSettings {
        &self.inner.store.settings
    }

    /// How many pulls (image builds) this process started: one per image
    /// however many callers asked for it at once.
    pub fn builds_started(&self) -> u64 {
        self.inner.lock().builds
    }

    /// Resolves `reference` for `customer` and returns its base, pulling
    /// and building it unless cached. Registry references are resolved
    /// against the registry with `creds` (else the credentials file's entry
    /// for that registry, else anonymously) on every call except a digest
    /// reference this customer already resolved; that resolution is what
    /// gives the customer the cached base (`docs/IMAGES.md`, "Tenancy").
    /// Local `oci-layout:`/`docker-archive:` paths must already be confined
    /// by the caller.
    pub async fn prepare(
        &self,
        customer: &str,
        reference: &str,
        creds: Option<Credentials>,
    ) -> Result<Prepared, ImageError> {
        let source = Source::parse(reference)?;
        let normalized = source.normalized();
        let record = self.inner.store.record_file(customer, &normalized);
        let entry = match source {
            Source::Registry(r) => {
                let digest_ref = r.digest().is_some();
                let creds = creds.or_else(|| self.inner.creds.get(r.registry()).cloned());
                let remote = Remote::new(r, creds, &self.inner.connect)?;
                if digest_ref && let Some(entry) = self.recorded(&record).await {
                    entry
                } else {
                    match remote.resolve().await {
                        Ok(top) => self.get(top.clone(), Fetch::Remote { remote, top }).await?,
                        Err(e) if e.code() == crate::model::Code::Unavailable => {
                            // The registry is down: what this customer
                            // resolved before is still theirs.
                            match self.recorded(&record).await {
                                Some(entry) => {
                                    tracing::warn!(digest = %entry.digest, error = %e, "registry unreachable: using the digest this customer resolved before");
                                    entry
                                }
                                None => return Err(e),
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Source::OciLayout { dir, tag } => {
                let d = dir.clone();
                let (top, size) = blocking(move || super::local::layout_top(&d, tag.as_deref())).await?;
                self.get(top.clone(), Fetch::Layout { dir, top, size, copy: true }).await?
            }
            Source::DockerArchive(path) => self.get(normalized.clone(), Fetch::Archive { path }).await?,
        };
        let base = self.inner.store.base_dir(&entry.digest)?.join("base.ext4");
        let digest = entry.digest.clone();
        blocking(move || write_atomic(&record, format!("{digest}\n").as_bytes())).await?;
        Ok(Prepared { digest: entry.digest, base, config: entry.config, reference: normalized })
    }

    /// The entry recorded for this (customer, reference), if its base is
    /// still there (and is claimed as used now).
    async fn recorded(&self, record: &Path) -> Option<Entry> {
        let record = record.to_owned();
        let inner = Arc::clone(&self.inner);
        let entry = blocking(move || {
            let digest = fs::read_to_string(&record).map_err(ImageError::io("read", &record))?;
            inner.store.lookup(digest.trim()).ok_or_else(|| ImageError::NotFound(String::new()))
        })
        .await
        .ok()?;
        self.claim(&entry).then_some(entry)
    }

    /// Marks a base used now (its `image.json`'s mtime), under the lock GC
    /// takes, so a base handed out is never removed by a GC running at
    /// the same moment. False when the base is gone.
    fn claim(&self, entry: &Entry) -> bool {
        let _state = self.inner.lock();
        let Ok(dir) = self.inner.store.base_dir(&entry.digest) else { return false };
        fs::File::options()
            .write(true)
            .open(dir.join("image.json"))
            .and_then(|f| f.set_modified(SystemTime::now()))
            .is_ok()
            && dir.join("base.ext4").exists()
    }

    /// The entry for `key` (a top digest, or a local archive's name):
    /// cached, being pulled (wait for it), or pulled now by a task of its
    /// own that finishes (and cleans up) even if every caller goes away.
    async fn get(&self, key: String, fetch: Fetch) -> Result<Entry, ImageError> {
        if !matches!(fetch, Fetch::Archive { .. }) {
            let inner = Arc::clone(&self.inner);
            let k = key.clone();
            if let Some(entry) = blocking(move || Ok(inner.store.lookup(&k))).await?
                && self.claim(&entry)
            {
                return Ok(entry);
            }
        }
        let flight = {
            let mut state = self.inner.lock();
            if let Some(entry) = state.done.get(&key).cloned() {
                drop(state);
                if self.claim(&entry) {
                    return Ok(entry);
                }
                state = self.inner.lock();
                state.done.remove(&key);
            }
            match state.flights.get(&key) {
                Some(f) => f.clone(),
                None => {
                    state.builds += 1;
                    let inner = Arc::clone(&self.inner);
                    let k = key.clone();
                    // Spawned while the lock is held: its removal from
                    // `flights` comes after this insertion.
                    let task = tokio::spawn(async move {
                        let result = build(&inner.store, fetch).await;
                        let mut state = inner.lock();
                        state.flights.remove(&k);
                        // Archives are read again each time (their file may change).
                        if let Ok(entry) = result.as_ref()
                            && k.starts_with("sha256:")
                        {
                            state.done.insert(k, entry.clone());
                        }
                        result.map_err(Arc::new)
                    });
                    let f: Flight =
                        async move { task.await.unwrap_or_else(|e| Err(Arc::new(ImageError::Task(e.to_string())))) }
                            .boxed()
                            .shared();
                    state.flights.insert(key, f.clone());
                    f
                }
            }
        };
        let entry = flight.await.map_err(|e| Arc::try_unwrap(e).unwrap_or_else(ImageError::Shared))?;
        self.claim(&entry);
        Ok(entry)
    }

    /// Removes the bases whose digest is not in `in_use` and whose last use
    /// ([`prepare`](Images::prepare) returning it) is older than the GC age
    /// (at least [`MIN_GC_AGE`](super::settings::MIN_GC_AGE)) at `now`, with
    /// their `tops/` entries. `in_use` must include the digests of creates
    /// whose image is prepared but whose VM is not recorded yet. Records of
    /// customers are kept (they point at digests; a removed base is pulled
    /// again, after the usual resolution). Blocking: run it on
    /// `spawn_blocking`.
    pub fn gc(&self, in_use: &HashSet<String>, now: SystemTime) -> GcReport {
        let mut report = GcReport::default();
        let root = self.inner.store.root().to_owned();
        let bases = root.join("bases");
        let mut removed_hex = HashSet::new();
        let age = self.inner.store.settings.gc_age.max(super::settings::MIN_GC_AGE);
        for e in fs::read_dir(&bases).into_iter().flatten().flatten() {
            let hex = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{hex}");
            let mut state = self.inner.lock();
            let last_use = fs::metadata(e.path().join("image.json")).and_then(|m| m.modified()).ok();
            let old = last_use.is_none_or(|t| now.duration_since(t).unwrap_or_default() > age);
            if in_use.contains(&digest) || !old {
                report.kept += 1;
                continue;
            }
            // Out of sight first (one rename), then removed.
            let size = size_of_tree(&e.path());
            let grave = root.join("work").join(format!("gc-{hex}"));
            match fs::rename(e.path(), &grave) {
                Ok(()) => {
                    state.done.retain(|_, entry| entry.digest != digest);
                    drop(state);
                    if let Err(err) = fs::remove_dir_all(&grave) {
                        report.errors.push(format!("{digest}: {err}"));
                    }
                    report.freed_bytes += size;
                    report.removed.push(digest);
                    removed_hex.insert(hex);
                }
                Err(err) => {
                    report.errors.push(format!("{digest}: {err}"));
                    report.kept += 1;
                }
            }
        }
        for e in fs::read_dir(root.join("tops")).into_iter().flatten().flatten() {
            let target = fs::read_to_string(e.path()).unwrap_or_default();
            if target.trim().strip_prefix("sha256:").is_some_and(|h| removed_hex.contains(h)) {
                let _ = fs::remove_file(e.path());
            }
        }
        report
    }
}
