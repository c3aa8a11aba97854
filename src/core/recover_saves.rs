//! Start-up repair of saves a crash interrupted (see `core/snapshot.rs`
//! for the files): a suspend whose save was published is finished, one
//! whose save was not is rolled back (the guest runs on); a restored guest
//! whose record names it is continued; snapshots that never became ready
//! and files no record names are removed.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::{info, warn};

use super::snapshot::{CONT_PENDING, SNAPSHOT_TMP_PREFIX, SUSPENDED_DIR, SUSPENDING_DIR};
use super::{Cause, Manager, Slot};
use crate::backend::Observed;
use crate::error::Error;
use crate::model::{META_FILE, Op, Status, VmState};

impl Manager {
    /// Settles a VM's save files before it is reattached; `true` when that
    /// settled the VM (a finished suspend).
    pub(super) async fn recover_save(&self, slot: &Arc<Slot>, intent: Option<&str>) -> Result<bool, Error> {
        let dir = self.vm_dir(&slot.id);
        let status = slot.cell().status.clone();
        let _ = std::fs::remove_dir_all(dir.join(SUSPENDING_DIR));
        let saved = dir.join(SUSPENDED_DIR).join(META_FILE).is_file();
        match &status {
            Status::Suspended => {
                let _ = std::fs::remove_file(dir.join(CONT_PENDING));
                if !saved {
                    warn!(vm_id = %slot.id, "a suspended VM's saved state is gone; marking it shut down");
                    // What may be left of it is no save.
                    let _ = std::fs::remove_dir_all(dir.join(SUSPENDED_DIR));
                    self.commit(slot, Cause::Recovered, VmState::Suspended, Status::Shutdown).await?;
                } else if intent.is_some() {
                    // A resume a crash interrupted before its record named
                    // the new process: that process is a stray (killed
                    // later), the save is intact.
                    self.finish(&slot.id).await;
                }
                Ok(true)
            }
            _ if saved && intent == Some(Op::Suspend.name()) => {
                info!(vm_id = %slot.id, "finishing a suspend a restart interrupted (its save is complete)");
                let ctx = self.ctx(slot);
                if let Err(e) = self.inner.backend.delete(&ctx, status.runtime()).await {
                    warn!(vm_id = %slot.id, error = %crate::util::chain(&e), "could not end the suspended VM's VMM");
                }
                self.commit(slot, Cause::Recovered, status.state(), Status::Suspended).await?;
                Ok(true)
            }
            _ => {
                // A save of a VM that is not suspended is stale (its guest
                // ran on after it was restored).
                let _ = std::fs::remove_dir_all(dir.join(SUSPENDED_DIR));
                Ok(false)
            }
        }
    }

    /// After a crash interrupted a suspend or a snapshot of a running VM
    /// (which pause the guest): runs the guest on if it is paused.
    pub(super) async fn run_on_after_save(&self, slot: &Arc<Slot>, op: &str, status: &Status) {
        let Status::Running(rt) = status else { return };
        if op != Op::Suspend.name() && op != Op::Snapshot.name() {
            return;
        }
        let ctx = self.ctx(slot);
        if let Ok(Observed::Paused) = self.inner.backend.observe(&ctx, rt).await {
            info!(vm_id = %slot.id, op, "running on a guest an interrupted save had paused");
            let mut rt = rt.clone();
            if let Err(e) = self.inner.backend.resume(&ctx, &mut rt).await {
                warn!(vm_id = %slot.id, error = %crate::util::chain(&e), "could not run the guest on");
            }
        }
    }

    /// A restored guest whose record names it but that was not continued
    /// yet (`cont-pending`): continues it.
    pub(super) async fn continue_if_pending(&self, slot: &Arc<Slot>) {
        let marker = self.vm_dir(&slot.id).join(CONT_PENDING);
        if !marker.exists() {
            return;
        }
        let status = slot.cell().status.clone();
        let Status::Running(mut rt) = status else {
            let _ = std::fs::remove_file(&marker);
            return;
        };
        info!(vm_id = %slot.id, "continuing a restored guest a restart interrupted");
        let ctx = self.ctx(slot);
        if let Ok(seen) = self.continue_restored(&ctx, &mut rt).await
            && seen.state() != VmState::Running
        {
            let _ = self.commit(slot, Cause::Reconciled, VmState::Running, seen).await;
        }
    }

    /// Loads the snapshots: removes those that never became ready and every
    /// file under `snapshots/` that no ready one owns; keeps the image
    /// digests the rest name. Returns (kept, removed).
    pub(super) async fn recover_snapshots(&self) -> Result<(usize, usize), Error> {
        let all = self.store_call(|s| s.all_snapshots()).await?;
        let root = self.snapshots_dir();
        std::fs::create_dir_all(&root).map_err(|e| Error::Internal(format!("creating {}: {e}", root.display())))?;
        let mut keep = HashSet::new();
        let mut removed = 0;
        for (rec, ready) in all {
            if ready && root.join(&rec.id).join(META_FILE).is_file() {
                if let Some(image) = &rec.spec.image {
                    self.index_mut().snapshot_digests.insert(rec.id.clone(), image.digest.clone());
                }
                keep.insert(rec.id);
                continue;
            }
            info!(snapshot = %rec.name, customer_id = %rec.customer, "removing a snapshot a restart interrupted");
            let id = rec.id.clone();
            self.store_call(move |s| s.delete_snapshot(&id)).await?;
            removed += 1;
        }
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            let what = if name.starts_with(SNAPSHOT_TMP_PREFIX) { "unfinished" } else { "unowned" };
            info!(dir = %entry.path().display(), "removing {what} snapshot files");
            let _ = std::fs::remove_dir_all(entry.path());
        }
        Ok((keep.len(), removed))
    }
}
