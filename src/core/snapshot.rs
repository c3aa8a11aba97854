//! Saved guests: suspend to disk and resume (the carry-outs of
//! `Plan::Suspend`, `Plan::Restore` and `Plan::Discard`), named snapshots
//! ([`Manager::snapshot`], [`Manager::snapshots`],
//! [`Manager::delete_snapshot`]) and the space all saves may take
//! (`UNKEY_METALD_SNAPSHOT_MAX_GB`). Clones are `core/clone.rs`; what a
//! restart finds half-done is settled in `core/reconcile.rs`.
//!
//! Files (every save is written under a temporary name, synced, and
//! published by a rename before the hypervisor is let go):
//! - `<vm dir>/suspended/`: a suspended VM's saved state (the backend's
//!   files, then `meta.json`), written as `suspended.tmp/` (and renamed
//!   back to that name to be discarded);
//! - `<vm dir>/cont-pending`: a restored guest that its record already
//!   names but that has not been continued yet (holding `clone` for a
//!   clone, which gets a new generation before it continues);
//! - `<data dir>/snapshots/<id>/`: a named snapshot (state, `meta.json`,
//!   copies of the writable disks), written as `.tmp-<id>/`.

use std::path::{Path, PathBuf};

use tracing::{Instrument, info, info_span, warn};

use super::{Manager, Pending, PendingGuard, Slot};
use crate::backend::{Observed, VmContext};
use crate::error::Error;
use crate::model::{
    CustomerId, META_FILE, Op, Plan, Runtime, SavedDisk, SavedMeta, SnapshotRecord, Status, StopMode, VmId,
    compat_mismatch, plan,
};
use crate::util::files::{copy_disk, dir_usage, sync_dir, sync_dir_tree};
use crate::util::unix_now;

/// A suspended VM's saved state, in its directory.
pub const SUSPENDED_DIR: &str = "suspended";
/// The same while it is written.
pub const SUSPENDING_DIR: &str = "suspended.tmp";
/// Marks a restored guest not yet continued (see the module doc).
pub const CONT_PENDING: &str = "cont-pending";
/// What [`CONT_PENDING`] holds for a clone.
pub const CLONE_MARK: &[u8] = b"clone";
/// Prefix of a named snapshot's directory while it is written.
pub const SNAPSHOT_TMP_PREFIX: &str = ".tmp-";

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Internal(format!("{what}: {e}"))
}

/// A fresh, empty directory at `dir` (whatever was there goes).
fn fresh_dir(dir: &Path) -> Result<(), Error> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(io(format_args!("creating {}", dir.display())))
}

fn write_meta(dir: &Path, meta: &SavedMeta) -> Result<(), Error> {
    let path = dir.join(META_FILE);
    let json = serde_json::to_vec_pretty(meta).map_err(|e| Error::Internal(format!("encoding {META_FILE}: {e}")))?;
    std::fs::write(&path, json).map_err(io(format_args!("writing {}", path.display())))
}

/// The description of a complete save in `dir`.
pub fn read_meta(dir: &Path) -> Result<SavedMeta, Error> {
    let path = dir.join(META_FILE);
    let raw = std::fs::read(&path).map_err(io(format_args!("reading {}", path.display())))?;
    serde_json::from_slice(&raw).map_err(|e| Error::Internal(format!("{} is unreadable: {e}", path.display())))
}

/// Syncs `tmp`'s files and renames it to `dir` (durably).
fn publish_dir(tmp: &Path, dir: &Path) -> Result<(), Error> {
    sync_dir_tree(tmp).map_err(io(format_args!("syncing {}", tmp.display())))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(tmp, dir).map_err(io(format_args!("renaming {} to {}", tmp.display(), dir.display())))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent).map_err(io(format_args!("syncing {}", parent.display())))?;
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("file task: {e}")))?
}

impl Manager {
    pub(super) fn saved_dir(&self, id: &VmId) -> PathBuf {
        self.vm_dir(id).join(SUSPENDED_DIR)
    }

    pub(super) fn snapshots_dir(&self) -> PathBuf {
        self.inner.cfg.data_dir.join("snapshots")
    }

    /// Bytes on disk of a suspended VM's saved state (0 when none).
    pub fn saved_size(&self, host_id: &VmId) -> u64 {
        dir_usage(&self.saved_dir(host_id)).unwrap_or(0)
    }

    /// Refuses a save of about `need` bytes that would take the saves on
    /// this host past `UNKEY_METALD_SNAPSHOT_MAX_GB`.
    async fn check_room(&self, need: u64) -> Result<(), Error> {
        let max = self.inner.cfg.snapshot_max_bytes;
        let (vms, snaps) = (self.inner.cfg.data_dir.join("vms"), self.snapshots_dir());
        let used = blocking(move || {
            let entries = |root: &Path| -> Vec<PathBuf> {
                std::fs::read_dir(root).into_iter().flatten().flatten().map(|e| e.path()).collect()
            };
            let suspended: u64 = entries(&vms).iter().map(|vm| dir_usage(&vm.join(SUSPENDED_DIR)).unwrap_or(0)).sum();
            let snapshots: u64 = entries(&snaps).iter().map(|s| dir_usage(s).unwrap_or(0)).sum();
            Ok(suspended + snapshots)
        })
        .await?;
        if used.saturating_add(need) > max {
            return Err(Error::ResourceExhausted(format!(
                "saved guests on this host take {used} bytes and this save needs about {need} more, past the \
                 {max} bytes allowed (UNKEY_METALD_SNAPSHOT_MAX_GB); delete snapshots or suspended VMs first"
            )));
        }
        Ok(())
    }

    /// Refuses to restore a save whose recorded facts differ from what the
    /// backend would record for `spec` now.
    pub(super) fn check_compat(&self, meta: &SavedMeta, spec: &crate::model::ValidSpec) -> Result<(), Error> {
        match compat_mismatch(&meta.compat, &self.inner.backend.compat(spec)) {
            None => Ok(()),
            Some(why) => {
                Err(Error::FailedPrecondition(format!("the saved guest cannot be restored on this host: {why}")))
            }
        }
    }

    /// `Plan::Suspend`: pause, save into `suspended.tmp/`, publish it as
    /// `suspended/`, then let the VMM go. A failure before the publish
    /// leaves the VM as it was.
    pub(super) async fn carry_suspend(
        &self,
        ctx: &VmContext<'_>,
        mut rt: Runtime,
        running: bool,
    ) -> Result<Status, Error> {
        self.check_room(ctx.spec.memory_bytes()).await?;
        let backend = &self.inner.backend;
        let (tmp, dir) = (ctx.dir.join(SUSPENDING_DIR), ctx.dir.join(SUSPENDED_DIR));
        fresh_dir(&tmp)?;
        if running && let Err(e) = backend.pause(ctx, &mut rt).await {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.into());
        }
        backend.ready().await;
        let compat = backend.compat(ctx.spec);
        let saved = async {
            backend.save(ctx, &rt, &tmp).instrument(info_span!("backend.save", vm_id = %ctx.id)).await?;
            let meta = SavedMeta { compat, created_at: unix_now(), booted_at: rt.booted_at, disks: Vec::new() };
            let (tmp, dir) = (tmp.clone(), dir.clone());
            blocking(move || {
                write_meta(&tmp, &meta)?;
                publish_dir(&tmp, &dir)
            })
            .await
        }
        .await;
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&tmp);
            if running && let Err(r) = backend.resume(ctx, &mut rt).await {
                warn!(vm_id = %ctx.id, error = %crate::util::chain(&r), "could not run the guest on after a failed suspend");
            }
            return Err(e);
        }
        // The save is complete and durable: the process may go.
        if let Err(e) = backend.shutdown(ctx, &rt, StopMode::Force).await {
            warn!(vm_id = %ctx.id, error = %crate::util::chain(&e), "could not end the suspended VM's VMM");
        }
        info!(vm_id = %ctx.id, bytes = dir_usage(&dir).unwrap_or(0), "VM suspended");
        Ok(Status::Suspended)
    }

    /// `Plan::Restore`: a VMM from `suspended/`, named by the VM's record
    /// before its guest runs on (so a crash cannot lose it or run the save
    /// twice), then continued; the save is dropped once the guest runs.
    pub(super) async fn carry_restore(&self, slot: &Slot, ctx: &VmContext<'_>) -> Result<Status, Error> {
        let dir = ctx.dir.join(SUSPENDED_DIR);
        let meta = read_meta(&dir).map_err(|e| {
            Error::FailedPrecondition(format!("the VM's saved state is missing or damaged ({}); delete the VM", e))
        })?;
        self.inner.backend.ready().await;
        self.check_compat(&meta, ctx.spec)?;
        let mut rt =
            self.inner.backend.restore(ctx, &dir).instrument(info_span!("backend.restore", vm_id = %ctx.id)).await?;
        // The guest's uptime goes on (it was booted, not restarted).
        rt.booted_at = meta.booted_at.or(rt.booted_at).or_else(|| Some(unix_now()));
        let status = self.run_restored(&slot.id, ctx, rt).await?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(status)
    }

    /// Records `rt` as the VM's running process (marked `cont-pending`),
    /// then continues the guest. The store refusing leaves nothing behind.
    pub(super) async fn run_restored(&self, id: &VmId, ctx: &VmContext<'_>, mut rt: Runtime) -> Result<Status, Error> {
        let marker = ctx.dir.join(CONT_PENDING);
        let persisted = async {
            std::fs::write(&marker, b"").map_err(io(format_args!("writing {}", marker.display())))?;
            sync_dir(&ctx.dir).map_err(io(format_args!("syncing {}", ctx.dir.display())))?;
            let (id, rt, now) = (id.clone(), rt.clone(), unix_now());
            self.store_call(move |s| s.update_state(&id, crate::model::VmState::Running, Some(&rt), None, now)).await
        }
        .await;
        if let Err(e) = persisted {
            let _ = self.inner.backend.delete(ctx, Some(&rt)).await;
            let _ = std::fs::remove_file(&marker);
            return Err(e);
        }
        self.continue_restored(ctx, &mut rt).await
    }

    /// Continues a restored guest and drops its `cont-pending` marker. A
    /// guest that does not continue stays paused (and is reported so).
    pub(super) async fn continue_restored(&self, ctx: &VmContext<'_>, rt: &mut Runtime) -> Result<Status, Error> {
        if std::fs::read(ctx.dir.join(CONT_PENDING)).is_ok_and(|m| m == CLONE_MARK) {
            self.new_generation(ctx, rt).await;
        }
        match self.inner.backend.resume(ctx, rt).await {
            Ok(()) => {
                let _ = std::fs::remove_file(ctx.dir.join(CONT_PENDING));
                Ok(Status::Running(rt.clone()))
            }
            // A continue whose reply was lost may have acted: ask.
            Err(_) if matches!(self.inner.backend.observe(ctx, rt).await, Ok(Observed::Running)) => {
                let _ = std::fs::remove_file(ctx.dir.join(CONT_PENDING));
                Ok(Status::Running(rt.clone()))
            }
            Err(e) => {
                warn!(vm_id = %ctx.id, error = %crate::util::chain(&e), "the restored guest did not continue; it stays paused");
                let _ = std::fs::remove_file(ctx.dir.join(CONT_PENDING));
                Ok(Status::Paused(rt.clone()))
            }
        }
    }

    /// Gives a clone's paused guest fresh randomness (`Backend::new_generation`;
    /// docs/SNAPSHOTS.md, "Fresh randomness"). A backend without a way is
    /// logged, not fatal: the clone runs, its generator reseeding by itself later.
    async fn new_generation(&self, ctx: &VmContext<'_>, rt: &Runtime) {
        let seed: [u8; 32] = rand::random();
        match self.inner.backend.new_generation(ctx, rt, &seed).await {
            Ok(how) => info!(vm_id = %ctx.id, how, "gave the clone's guest a new generation"),
            Err(e) => warn!(
                vm_id = %ctx.id, error = %crate::util::chain(&e),
                "the clone's guest gets no new generation: its random number generator goes on from the snapshot's \
                 state until its kernel reseeds by itself"
            ),
        }
    }

    /// `Plan::Discard`: a suspended VM shut down; its save goes. It is
    /// renamed out of the way first, so a crash inside the removal cannot
    /// leave a `suspended/` without some of its files (which a start would
    /// take for a save if `meta.json` were still there); the next start
    /// removes what is left of `suspended.tmp/`.
    pub(super) fn carry_discard(&self, ctx: &VmContext<'_>) -> Result<Status, Error> {
        let (dir, doomed) = (ctx.dir.join(SUSPENDED_DIR), ctx.dir.join(SUSPENDING_DIR));
        let _ = std::fs::remove_dir_all(&doomed);
        match std::fs::rename(&dir, &doomed) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&doomed);
                Ok(Status::Shutdown)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Status::Shutdown),
            Err(e) => Err(Error::Internal(format!("renaming {} to {}: {e}", dir.display(), doomed.display()))),
        }
    }

    // ---- named snapshots ----------------------------------------------------

    /// Saves a named snapshot of the caller's running or paused VM: memory,
    /// devices and copies of its writable disks at one point (the guest is
    /// paused meanwhile); the VM goes on as it was.
    pub async fn snapshot(&self, caller: &CustomerId, id: &VmId, name: VmId) -> Result<SnapshotRecord, Error> {
        let slot = self.lookup(caller, id)?;
        let this = self.clone();
        self.detached(async move { this.snapshot_locked(slot, name).await }).await
    }

    async fn snapshot_locked(&self, slot: std::sync::Arc<Slot>, name: VmId) -> Result<SnapshotRecord, Error> {
        let _op = slot.op.lock().await;
        let (status, deleted) = {
            let c = slot.cell();
            (c.status.clone(), c.deleted)
        };
        if deleted {
            return Err(Error::NotFound(slot.name.to_string()));
        }
        let (rt, running) = match plan(&status, Op::Snapshot) {
            Ok(Plan::Snapshot { rt, running }) => (rt, running),
            Ok(other) => return Err(Error::Internal(format!("snapshot planned as {other:?}"))),
            Err(source) => return Err(Error::WrongState { vm_id: slot.name.to_string(), source }),
        };
        let disks: u64 = slot
            .spec
            .storage
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| std::fs::metadata(&d.path).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0))
            .sum();
        self.check_room(slot.spec.memory_bytes() + disks).await?;
        let rec = SnapshotRecord {
            id: format!("{:016x}", rand::random::<u64>()),
            customer: slot.customer.clone(),
            name: name.clone(),
            source: slot.name.clone(),
            spec: (*slot.spec).clone(),
            backend: self.inner.backend.kind().as_str().into(),
            size_bytes: 0,
            created_at: unix_now(),
        };
        let r = rec.clone();
        if !self.store_call(move |s| s.begin_snapshot(&r)).await? {
            return Err(Error::Taken(format!("snapshot {name} already exists; pick another name or delete it first")));
        }
        if let Err(e) = self.begin(&slot.id, &slot.customer, Op::Snapshot.name()).await {
            self.drop_snapshot_row(&rec.id).await;
            return Err(e);
        }
        slot.cell_mut().pending = Some(Pending { op: Op::Snapshot.name(), since: unix_now() });
        let _pending = PendingGuard(&slot);
        let made = self.write_snapshot(&slot, rec, rt, running).await;
        if made.is_ok() {
            self.finish(&slot.id).await;
        } else {
            // A pause whose reply was lost may have acted: commit what the
            // hypervisor says, as after any failed operation.
            let now = slot.cell().status.clone();
            self.settle(&slot, now).await;
        }
        made
    }

    async fn write_snapshot(
        &self,
        slot: &std::sync::Arc<Slot>,
        mut rec: SnapshotRecord,
        mut rt: Runtime,
        running: bool,
    ) -> Result<SnapshotRecord, Error> {
        let ctx = self.ctx(slot);
        let backend = &self.inner.backend;
        let tmp = self.snapshots_dir().join(format!("{SNAPSHOT_TMP_PREFIX}{}", rec.id));
        let dir = self.snapshots_dir().join(&rec.id);
        backend.ready().await;
        let compat = backend.compat(&slot.spec);
        let made = async {
            fresh_dir(&tmp)?;
            if running {
                backend.pause(&ctx, &mut rt).await?;
            }
            let saved = async {
                backend.save(&ctx, &rt, &tmp).instrument(info_span!("backend.save", vm_id = %slot.id)).await?;
                // The guest is paused and the hypervisor has flushed: the
                // disks are at the saved point.
                let disks: Vec<(String, PathBuf)> =
                    slot.spec.storage.iter().filter(|d| !d.read_only).map(|d| (d.id.clone(), d.path.clone())).collect();
                let tmp = tmp.clone();
                blocking(move || {
                    let mut saved = Vec::new();
                    for (id, path) in disks {
                        let file = format!("disk-{id}.img");
                        copy_disk(&path, &tmp.join(&file)).map_err(io(format_args!("copying disk {id}")))?;
                        saved.push(SavedDisk { id, file });
                    }
                    Ok(saved)
                })
                .instrument(info_span!("snapshot.copy_disks"))
                .await
            }
            .await;
            if running && let Err(e) = backend.resume(&ctx, &mut rt).await {
                warn!(vm_id = %slot.id, error = %crate::util::chain(&e), "could not run the guest on after its snapshot");
                self.settle(slot, Status::Running(rt.clone())).await;
            }
            let disks = saved?;
            let meta = SavedMeta { compat, created_at: rec.created_at, booted_at: rt.booted_at, disks };
            let (t, d) = (tmp.clone(), dir.clone());
            let size = blocking(move || {
                write_meta(&t, &meta)?;
                publish_dir(&t, &d)?;
                Ok(dir_usage(&d).unwrap_or(0))
            })
            .await?;
            let id = rec.id.clone();
            self.store_call(move |s| s.finish_snapshot(&id, size)).await?;
            Ok::<u64, Error>(size)
        }
        .await;
        match made {
            Ok(size) => {
                rec.size_bytes = size;
                if let Some(image) = &rec.spec.image {
                    self.index_mut().snapshot_digests.insert(rec.id.clone(), image.digest.clone());
                }
                info!(vm_id = %slot.id, snapshot = %rec.name, bytes = size, "snapshot saved");
                Ok(rec)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                let _ = std::fs::remove_dir_all(&dir);
                self.drop_snapshot_row(&rec.id).await;
                Err(e)
            }
        }
    }

    async fn drop_snapshot_row(&self, id: &str) {
        let owned = id.to_owned();
        if let Err(e) = self.store_call(move |s| s.delete_snapshot(&owned)).await {
            warn!(snapshot = id, error = %e.chain(), "could not remove a failed snapshot's row; the next start will");
        }
    }

    /// The caller's snapshots, by name.
    pub async fn snapshots(&self, caller: &CustomerId) -> Result<Vec<SnapshotRecord>, Error> {
        let caller = caller.clone();
        self.store_call(move |s| s.snapshots(&caller)).await
    }

    /// The caller's snapshot `name`; another customer's is not found.
    pub(super) async fn find_snapshot(&self, caller: &CustomerId, name: &VmId) -> Result<SnapshotRecord, Error> {
        let (c, n) = (caller.clone(), name.clone());
        self.store_call(move |s| s.snapshot(&c, &n)).await?.ok_or_else(|| Error::SnapshotNotFound(name.to_string()))
    }

    /// Deletes the caller's snapshot (clones made from it are not
    /// affected: they have their own disks and memory).
    pub async fn delete_snapshot(&self, caller: &CustomerId, name: &VmId) -> Result<(), Error> {
        let rec = self.find_snapshot(caller, name).await?;
        let id = rec.id.clone();
        // Row first: a crash between the two leaves a directory without a
        // row, which the next start removes.
        self.store_call(move |s| s.delete_snapshot(&id)).await?;
        self.index_mut().snapshot_digests.remove(&rec.id);
        let dir = self.snapshots_dir().join(&rec.id);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(dir = %dir.display(), error = %e, "could not remove a deleted snapshot's files; the next start will");
        }
        info!(snapshot = %name, customer_id = %caller, "snapshot deleted");
        Ok(())
    }
}
