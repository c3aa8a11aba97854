//! The core: the one place where VM state changes.
//!
//! [`Manager`] serves every VM operation. Each one goes: look up the VM as the
//! caller (another customer's VM is "not found") → take that VM's operation
//! lock (calls on one VM are serialised, calls on different VMs run in
//! parallel; no global lock is held across a backend call) → validate the
//! transition → do the side effects in the backend → persist the new state →
//! publish it to observers (metering, telemetry). Mutating operations run in
//! their own task so a client that disconnects cannot cut one in half.
//!
//! Crash safety: before an operation touches anything outside the store it
//! writes an intent row ([`crate::store::Intent`]); its outcome is committed
//! in the transaction that ends the intent. When a backend call fails or times
//! out, the hypervisor is asked what really happened and that is committed;
//! when the store cannot be written, memory keeps the truth and a flusher
//! retries. Start-up and these repairs live in `core/reconcile.rs`.
//!
//! Ids are per customer: a VM's `name` is the id its customer gave (or got),
//! unique among that customer's VMs only, so one customer cannot learn
//! whether another uses an id. Below the API a VM is known by its host id
//! (directory, processes, metering, logs): the name itself when no other VM
//! on the host has it, else the name with a random suffix.

mod clone;
mod create;
mod image;
pub mod logs;
mod net;
mod reads;
mod reconcile;
mod recover_saves;
mod snapshot;

pub use image::{ImageHandle, ImageSource, StaticImages, WRITABLE_DISK, workload_exit};
pub use net::{HostNet, NetHandle, RecordingNet, TapCounters, add_tap_counters, managed_taps};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use opentelemetry::context::FutureExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::backend::{Backend, ExitEvent, VmContext};
use crate::error::Error;
use crate::model::net::NetLease;
use crate::model::{
    CustomerId, Limits, Op, Plan, Runtime, Status, StopInfo, StopMode, Target, Usage, ValidSpec, VmId, VmState, plan,
};
use crate::store::{Intent, Store};
use crate::util::unix_now;

/// Default wait for a graceful shutdown before forcing.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest graceful wait a caller may ask for.
pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub max_vms: usize,
    /// Host networking for metald-managed NICs (off when `None`).
    pub net: NetHandle,
    /// Container images for image VMs (off when `None`).
    pub images: ImageHandle,
    /// Bytes all saved guests (suspended VMs, snapshots) may take
    /// (`UNKEY_METALD_SNAPSHOT_MAX_GB`).
    pub snapshot_max_bytes: u64,
    /// Cap of each log file a VM's hypervisor writes
    /// (`UNKEY_METALD_VM_LOG_MAX_BYTES`, see [`logs`]).
    pub vm_log_max_bytes: u64,
}

/// What caused a [`VmEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Created,
    Op(Op),
    /// Found running again after a metald restart.
    Recovered,
    /// The hypervisor, asked after a failed or interrupted operation,
    /// reported a state other than the recorded one.
    Reconciled,
}

/// Whether the store takes writes ([`Manager::store_health`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreHealth {
    /// Store writes that failed since start.
    pub write_errors: u64,
    /// Unix seconds since when writes fail; `None` when the last succeeded.
    pub failing_since: Option<i64>,
    /// VMs whose latest change is not in the store yet.
    pub unsaved_vms: usize,
}

impl StoreHealth {
    pub fn ok(&self) -> bool {
        self.failing_since.is_none() && self.unsaved_vms == 0
    }
}

/// An operation in progress on a VM (shown by `GetVmInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub op: &'static str,
    /// Unix seconds when it started.
    pub since: i64,
}

/// A committed change of a VM, published to observers in commit order.
#[derive(Debug, Clone)]
pub struct VmEvent {
    pub vm_id: VmId,
    pub customer: CustomerId,
    pub cause: Cause,
    pub from: Option<VmState>,
    /// `None` when the VM was deleted.
    pub to: Option<VmState>,
    pub runtime: Option<Runtime>,
    pub spec: Arc<ValidSpec>,
    /// Why the VM stopped, when this change made it `SHUTDOWN`.
    pub stopped: Option<StopInfo>,
}

/// Hooks called synchronously after each commit; must not block.
pub trait Observer: Send + Sync {
    fn on_event(&self, event: &VmEvent);
}

/// A VM as the API sees it.
#[derive(Debug, Clone)]
pub struct VmView {
    /// The id its customer knows it by (unique per customer).
    pub id: VmId,
    /// Its id on this host: directory, processes, metering.
    pub host_id: VmId,
    pub customer: CustomerId,
    pub spec: Arc<ValidSpec>,
    pub status: Status,
    pub created_at: i64,
    pub modified_at: i64,
    /// The operation running on the VM now, if any.
    pub pending: Option<Pending>,
    /// The state is not yet confirmed: the hypervisor did not answer after a
    /// failed call, or the store could not be written; metald keeps trying.
    pub reconciling: bool,
    /// Why it last stopped, while `SHUTDOWN`.
    pub stopped: Option<StopInfo>,
}

impl VmView {
    pub fn state(&self) -> VmState {
        self.status.state()
    }
}

/// Live figures of a running or paused VM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveMetrics {
    pub cpu_percent: f64,
    pub usage: Usage,
    pub uptime_secs: i64,
}

#[derive(Debug, Clone)]
pub struct VmDetails {
    pub view: VmView,
    pub metrics: Option<LiveMetrics>,
    pub backend_info: BTreeMap<String, String>,
    /// How an image VM's workload ended, once the VM is shut down.
    pub workload_exit: Option<crate::model::WorkloadExit>,
    /// Bytes on disk of a suspended VM's saved state (0 otherwise).
    pub saved_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Empty means every state.
    pub states: Vec<VmState>,
    pub page_size: usize,
    /// Return VMs whose id sorts after this one.
    pub after: Option<VmId>,
}

#[derive(Debug, Clone)]
pub struct ListPage {
    pub vms: Vec<VmView>,
    /// Id to continue after; `None` on the last page.
    pub next_after: Option<VmId>,
    pub total: usize,
}

struct Cell {
    status: Status,
    modified_at: i64,
    /// Set when the VM is deleted, for callers that waited on its lock.
    deleted: bool,
    /// Previous usage sample for the CPU % of `GetVmInfo`.
    last_cpu: Option<(Instant, u64)>,
    pending: Option<Pending>,
    /// The hypervisor's state is unknown after a failed call; a task asks
    /// until it answers.
    unsure: bool,
    /// `status` is not in the store yet (a write failed); the flusher
    /// retries.
    unsaved: bool,
    /// Why the VM last stopped, while `SHUTDOWN` (stored with the state).
    stopped: Option<StopInfo>,
}

impl Cell {
    fn new(status: Status, modified_at: i64) -> Cell {
        Cell {
            status,
            modified_at,
            deleted: false,
            last_cpu: None,
            pending: None,
            unsure: false,
            unsaved: false,
            stopped: None,
        }
    }
}

struct Slot {
    /// Host id (see the module doc).
    id: VmId,
    /// The customer's id of the VM.
    name: VmId,
    customer: CustomerId,
    spec: Arc<ValidSpec>,
    /// What its metald-managed NICs leased (`None` without any).
    net: Option<Arc<NetLease>>,
    created_at: i64,
    /// Serialises mutating operations on this VM.
    op: tokio::sync::Mutex<()>,
    cell: RwLock<Cell>,
}

impl Slot {
    fn cell(&self) -> std::sync::RwLockReadGuard<'_, Cell> {
        // Cells are replaced wholesale, so a panic elsewhere cannot leave one
        // half-written; keep serving.
        self.cell.read().unwrap_or_else(|p| p.into_inner())
    }

    fn cell_mut(&self) -> std::sync::RwLockWriteGuard<'_, Cell> {
        self.cell.write().unwrap_or_else(|p| p.into_inner())
    }

    fn view(&self) -> VmView {
        let c = self.cell();
        VmView {
            id: self.name.clone(),
            host_id: self.id.clone(),
            customer: self.customer.clone(),
            spec: self.spec.clone(),
            status: c.status.clone(),
            created_at: self.created_at,
            modified_at: c.modified_at,
            pending: c.pending,
            reconciling: c.unsure || c.unsaved,
            stopped: c.stopped.clone(),
        }
    }
}

/// Clears a slot's pending operation when the operation ends, however.
struct PendingGuard<'a>(&'a Slot);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.cell_mut().pending = None;
    }
}

#[derive(Default)]
struct Index {
    by_id: HashMap<VmId, Arc<Slot>>,
    /// Each customer's VMs by name.
    by_customer: HashMap<CustomerId, BTreeMap<VmId, Arc<Slot>>>,
    /// Host ids whose creation is in progress; they count against `max_vms`.
    reserved: HashSet<VmId>,
    /// Names whose creation is in progress, per customer.
    reserved_names: HashSet<(CustomerId, VmId)>,
    /// Image digests of creates in progress (by reserved host id): their
    /// bases were prepared but no VM row names them yet, and the image
    /// cache's GC must keep them (`image_digests`).
    preparing: HashMap<VmId, String>,
    /// Image digests named by snapshots (by snapshot id): their bases stay
    /// cached while the snapshot exists.
    snapshot_digests: HashMap<String, String>,
}

struct Inner {
    cfg: ManagerConfig,
    backend: Arc<dyn Backend>,
    store: Store,
    index: RwLock<Index>,
    observers: RwLock<Vec<Arc<dyn Observer>>>,
    /// Changes the store could not take yet: a slot whose state is to be
    /// written, or `None` for a VM whose record is to be removed.
    unsaved: std::sync::Mutex<HashMap<VmId, Option<Arc<Slot>>>>,
    /// Wakes the flusher of `unsaved`.
    flush: tokio::sync::Notify,
}

/// The VM manager; cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

impl Manager {
    /// Loads every VM from the store, reattaches to VMMs that are still
    /// alive (those that are gone become `SHUTDOWN`), and starts watching
    /// `exits` until `shutdown` is cancelled.
    pub async fn open(
        cfg: ManagerConfig,
        backend: Arc<dyn Backend>,
        store: Store,
        exits: mpsc::UnboundedReceiver<ExitEvent>,
        shutdown: CancellationToken,
    ) -> Result<Manager, Error> {
        std::fs::create_dir_all(cfg.data_dir.join("vms"))
            .map_err(|e| Error::Internal(format!("creating {}: {e}", cfg.data_dir.join("vms").display())))?;
        let mgr = Manager {
            inner: Arc::new(Inner {
                cfg,
                backend,
                store,
                index: RwLock::new(Index::default()),
                observers: RwLock::new(Vec::new()),
                unsaved: std::sync::Mutex::default(),
                flush: tokio::sync::Notify::new(),
            }),
        };
        mgr.recover().await?;
        tokio::spawn(mgr.clone().flush_unsaved(shutdown.clone()));
        tokio::spawn(mgr.clone().watch_exits(exits, shutdown));
        Ok(mgr)
    }

    pub fn add_observer(&self, o: Arc<dyn Observer>) {
        self.inner.observers.write().unwrap_or_else(|p| p.into_inner()).push(o);
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// Host networking of managed NICs, when on (their TAPs' counters
    /// complete the usage of hypervisors that count no traffic).
    pub fn host_net(&self) -> Option<Arc<dyn HostNet>> {
        self.inner.cfg.net.0.clone()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.inner.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.inner.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.inner.cfg.data_dir.join("vms").join(id.as_str())
    }

    fn ctx<'a>(&self, slot: &'a Slot) -> VmContext<'a> {
        VmContext { id: &slot.id, spec: &slot.spec, dir: self.vm_dir(&slot.id).into() }
    }

    async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> crate::store::Result<T> + Send + 'static,
    ) -> Result<T, Error> {
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::Internal(format!("store task: {e}")))?
            .map_err(Error::from)
    }

    fn publish(&self, ev: VmEvent) {
        let observers = self.inner.observers.read().unwrap_or_else(|p| p.into_inner());
        for o in observers.iter() {
            o.on_event(&ev);
        }
    }

    /// Finds a VM owned by `caller`. Another customer's VM is not found.
    fn lookup(&self, caller: &CustomerId, id: &VmId) -> Result<Arc<Slot>, Error> {
        self.index()
            .by_customer
            .get(caller)
            .and_then(|m| m.get(id))
            .cloned()
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Runs a mutating operation in its own task so that a dropped caller
    /// cannot abandon it between a backend call and the commit.
    async fn detached<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        // The task keeps the caller's span and trace context (its spans
        // are children of the RPC's server span).
        tokio::spawn(fut.in_current_span().with_current_context())
            .await
            .map_err(|e| Error::Internal(format!("operation task: {e}")))?
    }

    /// Adds a VM to the index.
    fn install(&self, slot: &Arc<Slot>) {
        let mut idx = self.index_mut();
        idx.by_id.insert(slot.id.clone(), slot.clone());
        idx.by_customer.entry(slot.customer.clone()).or_default().insert(slot.name.clone(), slot.clone());
    }

    /// Writes the intent of `op` on `id`; refuses the operation if the
    /// store cannot take it (nothing has been done yet).
    async fn begin(&self, id: &VmId, customer: &CustomerId, op: &'static str) -> Result<(), Error> {
        let intent =
            Intent { vm_id: id.clone(), customer: customer.clone(), op: op.to_owned(), started_at: unix_now() };
        self.store_call(move |s| s.begin(&intent)).instrument(info_span!("store.intent", vm_id = %id)).await
    }

    /// Ends `id`'s intent after an operation that changed nothing. A failure
    /// leaves the row: the next start asks the hypervisor again, harmlessly.
    async fn finish(&self, id: &VmId) {
        let vm = id.clone();
        if let Err(e) = self.store_call(move |s| s.finish(&vm)).await {
            warn!(vm_id = %id, error = %e.chain(), "could not end the operation's intent; the next start re-checks the VM");
        }
    }

    // ---- lifecycle operations --------------------------------------------

    pub async fn boot(&self, caller: &CustomerId, id: &VmId) -> Result<VmState, Error> {
        self.operate(caller, id, Op::Boot).await
    }

    pub async fn pause(&self, caller: &CustomerId, id: &VmId) -> Result<VmState, Error> {
        self.operate(caller, id, Op::Pause).await
    }

    pub async fn resume(&self, caller: &CustomerId, id: &VmId) -> Result<VmState, Error> {
        self.operate(caller, id, Op::Resume).await
    }

    pub async fn reboot(&self, caller: &CustomerId, id: &VmId, force: bool) -> Result<VmState, Error> {
        self.operate(caller, id, Op::Reboot { force }).await
    }

    pub async fn shutdown(&self, caller: &CustomerId, id: &VmId, mode: StopMode) -> Result<VmState, Error> {
        self.operate(caller, id, Op::Shutdown { mode }).await
    }

    pub async fn suspend(&self, caller: &CustomerId, id: &VmId) -> Result<VmState, Error> {
        self.operate(caller, id, Op::Suspend).await
    }

    pub async fn delete(&self, caller: &CustomerId, id: &VmId, force: bool) -> Result<(), Error> {
        self.operate(caller, id, Op::Delete { force }).await.map(|_| ())
    }

    /// Carries out `op` on the caller's VM.
    pub async fn operate(&self, caller: &CustomerId, id: &VmId, op: Op) -> Result<VmState, Error> {
        let slot = self.lookup(caller, id)?;
        let this = self.clone();
        self.detached(async move { this.operate_locked(slot, op).await }).await
    }

    async fn operate_locked(&self, slot: Arc<Slot>, op: Op) -> Result<VmState, Error> {
        let _op = slot.op.lock().await;
        let (status, deleted) = {
            let c = slot.cell();
            (c.status.clone(), c.deleted)
        };
        if deleted {
            return Err(Error::NotFound(slot.name.to_string()));
        }
        let from = status.state();
        let plan = plan(&status, op).map_err(|source| Error::WrongState { vm_id: slot.name.to_string(), source })?;
        let target = plan.target();
        self.begin(&slot.id, &slot.customer, op.name()).await?;
        slot.cell_mut().pending = Some(Pending { op: op.name(), since: unix_now() });
        let _pending = PendingGuard(&slot);
        let span = info_span!("backend.call", vm_id = %slot.id, op = op.name());
        let new_status = match self.carry_out(&slot, plan).instrument(span).await {
            Ok(s) => s,
            Err(e) => {
                // The call may have taken effect anyway (a timeout, say):
                // commit what the hypervisor says now.
                self.settle(&slot, status).await;
                return Err(e);
            }
        };
        match target {
            Target::Deleted => {
                self.commit_delete(&slot, op, from).await?;
                Ok(VmState::Shutdown)
            }
            Target::State(_) => self.commit(&slot, Cause::Op(op), from, new_status).await,
        }
    }

    /// The backend side of a plan: one arm per [`Plan`], no other case.
    async fn carry_out(&self, slot: &Slot, plan: Plan) -> Result<Status, Error> {
        let ctx = self.ctx(slot);
        let backend = &self.inner.backend;
        Ok(match plan {
            Plan::Boot(mut rt) => {
                backend.boot(&ctx, &mut rt).await?;
                Status::Running(rt)
            }
            Plan::Start => {
                let mut rt = backend.create(&ctx).await?;
                if let Err(e) = backend.boot(&ctx, &mut rt).await {
                    // Shutdown owns no process: release the one just made.
                    let _ = backend.delete(&ctx, Some(&rt)).await;
                    return Err(e.into());
                }
                Status::Running(rt)
            }
            Plan::Pause(mut rt) => {
                backend.pause(&ctx, &mut rt).await?;
                Status::Paused(rt)
            }
            Plan::Resume(mut rt) => {
                backend.resume(&ctx, &mut rt).await?;
                Status::Running(rt)
            }
            Plan::Reboot { mut rt, force } => {
                backend.reboot(&ctx, &mut rt, force).await?;
                Status::Running(rt)
            }
            Plan::Shutdown { rt, mode } => {
                backend.shutdown(&ctx, &rt, mode).await?;
                Status::Shutdown
            }
            Plan::Delete(rt) => {
                backend.delete(&ctx, rt.as_ref()).await?;
                Status::Shutdown
            }
            Plan::Reap(rt) => {
                backend.reap(&ctx, &rt).await?;
                Status::Shutdown
            }
            Plan::Suspend { rt, running } => self.carry_suspend(&ctx, rt, running).await?,
            Plan::Restore => self.carry_restore(slot, &ctx).await?,
            Plan::Discard => self.carry_discard(&ctx)?,
            // A snapshot has a name and a record to return: `Manager::snapshot`
            // carries it out under the same lock and intent rules.
            Plan::Snapshot { .. } => {
                return Err(Error::Internal("a snapshot is taken by Manager::snapshot, not Manager::operate".into()));
            }
        })
    }

    /// Persists and publishes a new status. The in-memory state always
    /// follows reality (the backend already acted); when the store cannot
    /// take it, the VM is marked unsaved and the flusher retries (its intent,
    /// written before the operation, stays in the store until then, so a
    /// crash meanwhile is reconciled from the hypervisor at the next start).
    async fn commit(&self, slot: &Arc<Slot>, cause: Cause, from: VmState, status: Status) -> Result<VmState, Error> {
        self.commit_stop(slot, cause, from, status, None).await
    }

    /// [`Manager::commit`] with the reason of a stop the core did not ask
    /// for (`stop`, from the VMM's exit); other stops get theirs from
    /// `cause` ([`stop_of`]).
    async fn commit_stop(
        &self,
        slot: &Arc<Slot>,
        cause: Cause,
        from: VmState,
        status: Status,
        stop: Option<StopInfo>,
    ) -> Result<VmState, Error> {
        let now = unix_now();
        let state = status.state();
        let rt = status.runtime().cloned();
        let id = slot.id.clone();
        let stopped = (state == VmState::Shutdown).then(|| stop.unwrap_or_else(|| stop_of(cause, now)));
        if let Some(s) = &stopped {
            info!(vm_id = %slot.id, reason = %s.reason, detail = %s.detail, "VM stopped");
        }
        let kept = stopped.clone();
        let persisted = self
            .store_call(move |s| s.update_state(&id, state, rt.as_ref(), kept.as_ref(), now))
            .instrument(info_span!("store.update", vm_id = %slot.id))
            .await;
        {
            let mut c = slot.cell_mut();
            c.status = status.clone();
            c.modified_at = now;
            if state != VmState::Running {
                c.last_cpu = None;
            }
            c.unsaved = persisted.is_err();
            c.unsure = false;
            c.stopped = stopped.clone();
        }
        if let Err(e) = &persisted {
            warn!(vm_id = %slot.id, state = %state, error = %e.chain(), "could not store the new state; retrying");
            self.mark_unsaved(&slot.id, Some(slot.clone()));
        }
        info!(vm_id = %slot.id, from = %from, to = %state, "VM state changed");
        self.publish(VmEvent {
            vm_id: slot.id.clone(),
            customer: slot.customer.clone(),
            cause,
            from: Some(from),
            to: Some(state),
            runtime: status.runtime().cloned(),
            spec: slot.spec.clone(),
            stopped,
        });
        Ok(state)
    }

    async fn commit_delete(&self, slot: &Arc<Slot>, op: Op, from: VmState) -> Result<(), Error> {
        // The hypervisor is gone: its kernel objects go before its leases.
        if let (Some(net), Some(lease)) = (&self.inner.cfg.net.0, &slot.net)
            && let Err(e) = net.remove(&slot.id, lease).instrument(info_span!("network.remove", vm_id = %slot.id)).await
        {
            warn!(vm_id = %slot.id, error = %e, "could not remove the VM's network objects; the next start will");
        }
        let id = slot.id.clone();
        let persisted =
            self.store_call(move |s| s.delete(&id)).instrument(info_span!("store.delete", vm_id = %slot.id)).await;
        slot.cell_mut().deleted = true;
        if let Err(e) = &persisted {
            warn!(vm_id = %slot.id, error = %e.chain(), "could not remove the VM's record; retrying");
            self.mark_unsaved(&slot.id, None);
        }
        {
            let mut idx = self.index_mut();
            idx.by_id.remove(&slot.id);
            if let Some(m) = idx.by_customer.get_mut(&slot.customer) {
                m.remove(&slot.name);
                if m.is_empty() {
                    idx.by_customer.remove(&slot.customer);
                }
            }
        }
        let dir = self.vm_dir(&slot.id);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(vm_id = %slot.id, dir = %dir.display(), error = %e, "could not remove VM directory");
        }
        info!(vm_id = %slot.id, "VM deleted");
        self.publish(VmEvent {
            vm_id: slot.id.clone(),
            customer: slot.customer.clone(),
            cause: Cause::Op(op),
            from: Some(from),
            to: None,
            runtime: None,
            spec: slot.spec.clone(),
            stopped: None,
        });
        Ok(())
    }
}

/// The reason of a stop to `SHUTDOWN` caused by `cause` (an exit's own
/// reason comes with it, see [`Manager::commit_stop`]).
fn stop_of(cause: Cause, now: i64) -> StopInfo {
    use crate::model::StopReason;
    match cause {
        Cause::Op(Op::Shutdown { mode: StopMode::Force }) => {
            StopInfo::new(StopReason::Requested, "ShutdownVm (forced)", now)
        }
        Cause::Op(Op::Shutdown { .. }) => StopInfo::new(StopReason::Requested, "ShutdownVm", now),
        Cause::Op(op) => StopInfo::new(StopReason::Unknown, format!("the VMM ended during {}", op.name()), now),
        Cause::Recovered | Cause::Reconciled | Cause::Created => {
            StopInfo::new(StopReason::Unknown, "found stopped when metald checked its hypervisor", now)
        }
    }
}

mod exits;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod tests_reconcile;

#[cfg(test)]
mod tests_net;

#[cfg(test)]
mod tests_image;

#[cfg(test)]
mod tests_snapshot;
