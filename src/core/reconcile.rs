//! Making the store, the hypervisors and `<data dir>/vms/` agree.
//!
//! - At start ([`Manager::recover`]): every stored VM is reattached to its
//!   VMM (gone ones become `SHUTDOWN`); an operation a crash interrupted (an
//!   intent row) is finished — a delete is carried out — or settled — the
//!   hypervisor is asked what the guest does and that is committed; a create
//!   that never reached its VM row is rolled back. Then every process whose
//!   command line names a VM directory but which is not that VM's recorded
//!   VMM is killed, and every VM directory without a VM is removed. Nothing
//!   of metald's outlives the VM it belonged to.
//! - After a failed or timed-out backend call ([`Manager::settle`]): the
//!   hypervisor is asked; when it does not answer (a frozen VMM), the VM is
//!   marked unsure and a task keeps asking until it does.
//! - After a failed store write ([`Manager::flush_unsaved`]): memory keeps
//!   the truth; the flusher writes it once the store takes writes again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Cause, Cell, Manager, Slot, StoreHealth, VmEvent};
use crate::backend::Observed;
use crate::backend::process::{kill_stray, processes_under};
use crate::error::Error;
use crate::model::net::NetLease;
use crate::model::{Op, Status, StopInfo, StopReason, VmId};
use crate::store::{Intent, VmRow};
use crate::util::unix_now;

/// How long the hypervisor gets to say what its guest does.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest wait between two questions to an unsure hypervisor.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Wait between two attempts to write what the store did not take.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// What start-up reconciliation did, for its log line.
#[derive(Debug, Default)]
struct Report {
    vms: usize,
    reattached: usize,
    settled: usize,
    deletes_finished: usize,
    creates_rolled_back: usize,
    strays_killed: usize,
    dirs_removed: usize,
    backend_swept: usize,
    snapshots: usize,
    snapshots_removed: usize,
}

impl Manager {
    pub(super) async fn recover(&self) -> Result<(), Error> {
        let rows = self.store_call(|s| s.load_all()).await?;
        let intents: HashMap<VmId, Intent> =
            self.store_call(|s| s.intents()).await?.into_iter().map(|i| (i.vm_id.clone(), i)).collect();
        let mut leases = self.store_call(|s| s.net_leases()).await?;
        let mut report = Report { vms: rows.len(), ..Report::default() };
        (report.snapshots, report.snapshots_removed) = self.recover_snapshots().await?;
        for row in rows {
            let intent = intents.get(&row.id).map(|i| i.op.as_str());
            let lease = leases.remove(&row.id).map(Arc::new);
            let slot = self.install_row(row, lease);
            if intent == Some(Op::Delete { force: true }.name()) {
                info!(vm_id = %slot.id, "finishing a delete a restart interrupted");
                self.finish_delete(&slot).await?;
                report.deletes_finished += 1;
                continue;
            }
            self.recover_vm(&slot, intent, &mut report).await?;
        }
        for intent in intents.values().filter(|i| !self.index().by_id.contains_key(&i.vm_id)) {
            // A create that never stored its VM: its process and directory
            // go with the sweeps below.
            info!(vm_id = %intent.vm_id, op = %intent.op, "rolling back a create a restart interrupted");
            let id = intent.vm_id.clone();
            if let Err(e) = self.store_call(move |s| s.abort_create(&id)).await {
                warn!(vm_id = %intent.vm_id, error = %e.chain(), "could not roll back the create's intent and leases");
            }
            report.creates_rolled_back += 1;
        }
        report.strays_killed = self.kill_strays().await;
        report.dirs_removed = self.remove_stray_dirs();
        let live: HashSet<String> = self.index().by_id.keys().map(|id| id.as_str().to_owned()).collect();
        report.backend_swept = self.inner.backend.sweep(&live).await;
        self.rebuild_net().await?;
        info!(
            vms = report.vms,
            reattached = report.reattached,
            settled = report.settled,
            deletes_finished = report.deletes_finished,
            creates_rolled_back = report.creates_rolled_back,
            strays_killed = report.strays_killed,
            dirs_removed = report.dirs_removed,
            backend_swept = report.backend_swept,
            snapshots = report.snapshots,
            snapshots_removed = report.snapshots_removed,
            "state recovered from the store"
        );
        Ok(())
    }

    /// Derives the kernel's network state from the store: the leases of
    /// every VM (and of nothing else) get their objects, the rest go.
    async fn rebuild_net(&self) -> Result<(), Error> {
        let Some(net) = self.inner.cfg.net.0.clone() else { return Ok(()) };
        if let Some(why) = net.unavailable() {
            warn!(why = %why, "host networking is unavailable; VMs with managed NICs stay without their network");
            return Ok(());
        }
        let leases = self.store_call(|s| s.net_leases()).await?;
        match net.rebuild(&leases).await {
            Ok(summary) => info!(vms = leases.len(), summary = %summary, "host network rebuilt from the store"),
            Err(e) => {
                // Serving VMs without networking beats not serving at all;
                // health and the log say so.
                warn!(error = %e, "could not rebuild the host network from the store");
            }
        }
        Ok(())
    }

    fn install_row(&self, row: VmRow, net: Option<Arc<NetLease>>) -> Arc<Slot> {
        let status = Status::from_parts(row.state, row.runtime).unwrap_or(Status::Shutdown);
        let slot = Arc::new(Slot {
            id: row.id,
            name: row.name,
            customer: row.customer,
            spec: Arc::new(row.spec),
            net,
            created_at: row.created_at,
            op: tokio::sync::Mutex::new(()),
            cell: RwLock::new(Cell { stopped: row.stopped, ..Cell::new(status, row.modified_at) }),
        });
        self.install(&slot);
        slot
    }

    /// Reattaches one VM; `intent` names an operation a crash interrupted.
    async fn recover_vm(&self, slot: &Arc<Slot>, intent: Option<&str>, report: &mut Report) -> Result<(), Error> {
        if self.recover_save(slot, intent).await? {
            return Ok(());
        }
        let status = slot.cell().status.clone();
        let from = status.state();
        let Some(rt) = status.runtime() else {
            if from.has_process() {
                // A process state without a runtime: the record is wrong.
                self.commit(slot, Cause::Recovered, from, Status::Shutdown).await?;
            } else if intent.is_some() {
                // E.g. a boot of a shut-down VM: its new process, if any,
                // is a stray (no record names it) and is killed below.
                self.finish(&slot.id).await;
            }
            return Ok(());
        };
        let ctx = self.ctx(slot);
        let alive = match self.inner.backend.reattach(&ctx, rt).await {
            Ok(alive) => alive,
            Err(e) => {
                warn!(vm_id = %slot.id, error = %crate::util::chain(&e), "could not reattach; treating the VMM as gone");
                false
            }
        };
        if !alive {
            info!(vm_id = %slot.id, state = %from, "VMM is gone since the last run; marking the VM shut down");
            let _ = self.inner.backend.reap(&ctx, rt).await;
            let stop = StopInfo::new(
                StopReason::Unknown,
                "the VMM ended while metald was not running; its exit status is unknown",
                crate::util::unix_now(),
            );
            self.commit_stop(slot, Cause::Op(Op::GuestExited), from, Status::Shutdown, Some(stop)).await?;
            return Ok(());
        }
        report.reattached += 1;
        self.publish(VmEvent {
            vm_id: slot.id.clone(),
            customer: slot.customer.clone(),
            cause: Cause::Recovered,
            from: Some(from),
            to: Some(from),
            runtime: Some(rt.clone()),
            spec: slot.spec.clone(),
            stopped: None,
        });
        if let Some(op) = intent {
            info!(vm_id = %slot.id, op, "asking the hypervisor how an interrupted operation ended");
            self.run_on_after_save(slot, op, &status).await;
            self.settle(slot, status).await;
            report.settled += 1;
        }
        self.continue_if_pending(slot).await;
        Ok(())
    }

    /// Carries out a delete a crash interrupted (every step is idempotent).
    async fn finish_delete(&self, slot: &Arc<Slot>) -> Result<(), Error> {
        let status = slot.cell().status.clone();
        let ctx = self.ctx(slot);
        if let Err(e) = self.inner.backend.delete(&ctx, status.runtime()).await {
            warn!(vm_id = %slot.id, error = %crate::util::chain(&e), "releasing the VM's hypervisor failed; deleting anyway");
        }
        self.commit_delete(slot, Op::Delete { force: true }, status.state()).await
    }

    /// Kills every process that names a VM directory but is not the
    /// recorded VMM of that directory's VM.
    async fn kill_strays(&self) -> usize {
        let vms = self.inner.cfg.data_dir.join("vms");
        let found = tokio::task::spawn_blocking(move || processes_under(&vms)).await.unwrap_or_default();
        let mut killed = 0;
        for (name, pid) in found {
            let owned = self.index().by_id.iter().any(|(id, slot)| {
                id.as_str() == name
                    && slot.cell().status.runtime().is_some_and(|rt| {
                        rt.pid == Some(pid.pid) && rt.pid_start_ticks.is_none_or(|t| t == pid.start_ticks)
                    })
            });
            if owned {
                continue;
            }
            warn!(dir = %name, pid = pid.pid, "killing a hypervisor process no VM owns");
            match kill_stray(pid).await {
                Ok(()) => killed += 1,
                Err(e) => warn!(pid = pid.pid, error = %crate::util::chain(&e), "could not kill a stray process"),
            }
        }
        killed
    }

    /// Removes every entry of `<data dir>/vms/` that belongs to no VM.
    fn remove_stray_dirs(&self) -> usize {
        let vms = self.inner.cfg.data_dir.join("vms");
        let Ok(entries) = std::fs::read_dir(&vms) else { return 0 };
        let known: HashSet<String> = self.index().by_id.keys().map(|id| id.as_str().to_owned()).collect();
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            let path = entry.path();
            let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            match gone {
                Ok(()) => {
                    info!(dir = %path.display(), "removed a VM directory no VM owns");
                    removed += 1;
                }
                Err(e) => warn!(dir = %path.display(), error = %e, "could not remove a stray VM directory"),
            }
        }
        removed
    }

    /// What the hypervisor says `slot`'s guest does, as a status; `None`
    /// when it does not answer in time.
    async fn observe(&self, slot: &Slot, status: &Status) -> Option<Status> {
        // No process to ask: the state is what the record says.
        let Some(rt) = status.runtime() else { return Some(status.clone()) };
        let ctx = self.ctx(slot);
        let observed = match tokio::time::timeout(OBSERVE_TIMEOUT, self.inner.backend.observe(&ctx, rt)).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                warn!(vm_id = %slot.id, error = %crate::util::chain(&e), "the hypervisor did not say what the guest does");
                return None;
            }
            Err(_) => {
                warn!(vm_id = %slot.id, "the hypervisor did not say what the guest does within {OBSERVE_TIMEOUT:?}");
                return None;
            }
        };
        Some(match observed {
            Observed::Created => Status::Created(rt.clone()),
            Observed::Running => {
                let mut rt = rt.clone();
                rt.booted_at.get_or_insert_with(unix_now);
                Status::Running(rt)
            }
            Observed::Paused => Status::Paused(rt.clone()),
            Observed::Gone => {
                let _ = self.inner.backend.reap(&ctx, rt).await;
                Status::Shutdown
            }
        })
    }

    /// After an operation failed (or on start, after a crash interrupted
    /// one): commits what the hypervisor says, or, when it does not
    /// answer, marks the VM unsure and keeps asking. Called holding the
    /// VM's operation lock.
    pub(super) async fn settle(&self, slot: &Arc<Slot>, status: Status) {
        match self.observe(slot, &status).await {
            Some(seen) => self.adopt(slot, &status, seen).await,
            None => {
                let first = {
                    let mut c = slot.cell_mut();
                    !std::mem::replace(&mut c.unsure, true)
                };
                if first {
                    tokio::spawn(self.clone().ask_until_sure(slot.clone()));
                }
            }
        }
    }

    /// Commits `seen` if it differs from `status`, else just ends the intent.
    async fn adopt(&self, slot: &Arc<Slot>, status: &Status, seen: Status) {
        slot.cell_mut().unsure = false;
        if &seen == status {
            self.finish(&slot.id).await;
            return;
        }
        let from = status.state();
        info!(vm_id = %slot.id, recorded = %from, hypervisor = %seen.state(), "adopting the hypervisor's state");
        if let Err(e) = self.commit(slot, Cause::Reconciled, from, seen).await {
            warn!(vm_id = %slot.id, error = %e.chain(), "could not commit the hypervisor's state");
        }
    }

    /// Asks an unsure VM's hypervisor until it answers (or the VM is gone,
    /// or an operation settled it meanwhile).
    async fn ask_until_sure(self, slot: Arc<Slot>) {
        let mut wait = RETRY_FIRST;
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
            let _op = slot.op.lock().await;
            let status = {
                let c = slot.cell();
                if c.deleted || !c.unsure {
                    return;
                }
                c.status.clone()
            };
            if let Some(seen) = self.observe(&slot, &status).await {
                self.adopt(&slot, &status, seen).await;
                return;
            }
        }
    }

    /// Remembers a change the store did not take and wakes the flusher.
    pub(super) fn mark_unsaved(&self, id: &VmId, slot: Option<Arc<Slot>>) {
        self.inner.unsaved.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), slot);
        self.inner.flush.notify_one();
    }

    /// Number of VMs whose latest change is not in the store yet.
    pub fn unsaved_count(&self) -> usize {
        self.inner.unsaved.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the store takes writes, for `/_/health` and the metrics.
    pub fn store_health(&self) -> StoreHealth {
        let w = self.inner.store.write_health();
        StoreHealth { write_errors: w.errors, failing_since: w.failing_since, unsaved_vms: self.unsaved_count() }
    }

    /// Writes what the store did not take, every [`FLUSH_EVERY`] until all
    /// of it is in, until `stop`.
    pub(super) async fn flush_unsaved(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.inner.flush.notified() => {}
            }
            while self.unsaved_count() > 0 {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(FLUSH_EVERY) => {}
                }
                self.flush_once().await;
            }
        }
    }

    async fn flush_once(&self) {
        let todo: Vec<(VmId, Option<Arc<Slot>>)> = self
            .inner
            .unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, slot) in todo {
            let written = match slot {
                None => {
                    let vm = id.clone();
                    self.store_call(move |s| s.delete(&vm)).await.is_ok()
                }
                Some(slot) => {
                    let _op = slot.op.lock().await;
                    let (state, rt, stopped, at, skip) = {
                        let mut c = slot.cell_mut();
                        if c.deleted {
                            // Deleted since; its record went with the delete.
                            c.unsaved = false;
                        }
                        // An unsure VM keeps its intent until the hypervisor answers.
                        (
                            c.status.state(),
                            c.status.runtime().cloned(),
                            c.stopped.clone(),
                            c.modified_at,
                            c.deleted || c.unsure || !c.unsaved,
                        )
                    };
                    if skip {
                        true
                    } else {
                        let vm = id.clone();
                        let ok = self
                            .store_call(move |s| s.update_state(&vm, state, rt.as_ref(), stopped.as_ref(), at))
                            .await
                            .is_ok();
                        if ok {
                            slot.cell_mut().unsaved = false;
                        }
                        ok
                    }
                }
            };
            if written {
                let mut unsaved = self.inner.unsaved.lock().unwrap_or_else(|p| p.into_inner());
                // A newer change of the same VM may have replaced this one.
                if unsaved.get(&id).is_some_and(|s| s.as_ref().is_none_or(|s| !s.cell().unsaved)) {
                    unsaved.remove(&id);
                }
            } else {
                return;
            }
        }
        if self.unsaved_count() == 0 {
            info!("the changes the store had refused are written");
        }
    }
}
