//! Clones: a new VM started from a named snapshot (`CreateVm` with
//! `from_snapshot`). It gets a new id, its own copies of the snapshot's
//! writable disks (`util::files::copy_disk`: reflink or sparse copy) in its
//! own directory, and the snapshot's memory; read-only disks (an image's
//! base, an operator's asset) are shared in place. Crash safety is the
//! create's (intent first, rolled back at start) plus the restore's
//! (`cont-pending`, see `core/snapshot.rs`). Its guest gets a new
//! generation before it runs (`Backend::new_generation`: fresh randomness).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tracing::{Instrument, info, info_span, warn};

use super::snapshot::{CLONE_MARK, CONT_PENDING, read_meta};
use super::{Cause, Cell, Manager, Slot, VmEvent, VmView};
use crate::backend::VmContext;
use crate::error::Error;
use crate::model::net::{NetLease, clone_requests};
use crate::model::{CustomerId, PortSpec, SavedMeta, SnapshotRecord, ValidSpec, VmId, VmState};
use crate::store::VmRow;
use crate::util::files::{copy_disk, sync_dir};
use crate::util::unix_now;

impl Manager {
    /// Creates the caller's VM `id` (generated when `None`) from their
    /// snapshot `snapshot`, running.
    pub async fn clone_vm(
        &self,
        caller: &CustomerId,
        id: Option<VmId>,
        snapshot: VmId,
        ports: Vec<PortSpec>,
    ) -> Result<VmView, Error> {
        let this = self.clone();
        let caller = caller.clone();
        self.detached(async move { this.clone_inner(caller, id, snapshot, ports).await }).await
    }

    async fn clone_inner(
        &self,
        caller: CustomerId,
        id: Option<VmId>,
        snapshot: VmId,
        ports: Vec<PortSpec>,
    ) -> Result<VmView, Error> {
        let rec = self.find_snapshot(&caller, &snapshot).await?;
        let snap_dir = self.snapshots_dir().join(&rec.id);
        let meta = read_meta(&snap_dir)?;
        self.inner.backend.ready().await;
        self.check_compat(&meta, &rec.spec)?;
        if let Some(n) = rec.spec.network.iter().find(|n| !n.managed) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {snapshot} is of a VM with the operator's TAP device {:?}, which serves one VM only; \
                 clone VMs whose interfaces metald manages",
                n.tap
            )));
        }
        let nics = clone_requests(&rec.spec.network, &ports);
        if nics.is_empty() && !ports.is_empty() {
            return Err(Error::invalid("port_mappings", "the snapshot's VM has no interface metald manages"));
        }
        check_ports(&ports)?;
        self.check_net(&nics)?;
        let name = id.unwrap_or_else(VmId::generate);
        let reservation = self.reserve(&caller, &name)?;
        let id = reservation.id.clone();
        // The intent goes first: a crash from here on is rolled back at
        // start (directory, process).
        let lease = self.begin_create(&id, &caller, nics).await?;
        let created = self.clone_networked(&caller, &id, &name, &rec, &meta, snap_dir, lease).await;
        self.end_create(reservation, created).await
    }

    /// The clone's network (leased with its intent) made before its
    /// hypervisor, which opens the TAPs; removed again when the clone fails.
    #[allow(clippy::too_many_arguments)]
    async fn clone_networked(
        &self,
        caller: &CustomerId,
        id: &VmId,
        name: &VmId,
        rec: &SnapshotRecord,
        meta: &SavedMeta,
        snap_dir: PathBuf,
        lease: Option<NetLease>,
    ) -> Result<Arc<Slot>, Error> {
        let net = self.inner.cfg.net.0.clone();
        let (spec, lease) = match (lease, &net) {
            (Some(lease), Some(net)) => {
                if let Err(e) = net.add(id, &lease).instrument(info_span!("network.add", vm_id = %id)).await {
                    let _ = net.remove(id, &lease).await;
                    return Err(Error::Internal(format!("setting up the clone's network: {e}")));
                }
                (rec.spec.for_clone(&lease), Some(Arc::new(lease)))
            }
            _ => (rec.spec.clone(), None),
        };
        let created = self.clone_reserved(caller, id, name, rec, spec, meta, snap_dir, lease.clone()).await;
        if created.is_err()
            && let (Some(net), Some(lease)) = (&net, &lease)
            && let Err(e) = net.remove(id, lease).await
        {
            warn!(vm_id = %id, error = %e, "could not remove a failed clone's network; the next start will");
        }
        created
    }

    #[allow(clippy::too_many_arguments)]
    async fn clone_reserved(
        &self,
        caller: &CustomerId,
        id: &VmId,
        name: &VmId,
        rec: &SnapshotRecord,
        spec: ValidSpec,
        meta: &SavedMeta,
        snap_dir: PathBuf,
        lease: Option<Arc<NetLease>>,
    ) -> Result<Arc<Slot>, Error> {
        let dir = self.vm_dir(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::Internal(format!("creating {}: {e}", dir.display())))?;
        let fail = |e: Error| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        let copies: Vec<(String, PathBuf, PathBuf)> =
            meta.disks.iter().map(|d| (d.id.clone(), snap_dir.join(&d.file), dir.join(&d.file))).collect();
        let paths: HashMap<String, PathBuf> = copies.iter().map(|(id, _, to)| (id.clone(), to.clone())).collect();
        tokio::task::spawn_blocking(move || {
            for (id, from, to) in copies {
                copy_disk(&from, &to).map_err(|e| Error::Internal(format!("copying the snapshot's disk {id}: {e}")))?;
            }
            Ok::<(), Error>(())
        })
        .instrument(info_span!("clone.copy_disks", vm_id = %id))
        .await
        .map_err(|e| Error::Internal(format!("copy task: {e}")))
        .and_then(|r| r)
        .map_err(fail)?;
        let spec = Arc::new(spec.with_disk_paths(|d| paths.get(&d.id).cloned()));
        let ctx = VmContext { id, spec: &spec, dir: dir.as_path().into() };
        let mut rt = self
            .inner
            .backend
            .restore(&ctx, &snap_dir)
            .instrument(info_span!("backend.restore", vm_id = %id))
            .await
            .map_err(|e| fail(e.into()))?;
        let now = unix_now();
        // A clone's own run starts now (its guest was booted before, in the
        // source).
        rt.booted_at = Some(now);
        let row = VmRow {
            id: id.clone(),
            name: name.clone(),
            customer: caller.clone(),
            state: VmState::Running,
            spec: (*spec).clone(),
            runtime: Some(rt.clone()),
            created_at: now,
            modified_at: now,
            stopped: None,
        };
        let marker = dir.join(CONT_PENDING);
        let inserted = async {
            std::fs::write(&marker, CLONE_MARK)
                .map_err(|e| Error::Internal(format!("writing {}: {e}", marker.display())))?;
            sync_dir(&dir).map_err(|e| Error::Internal(format!("syncing {}: {e}", dir.display())))?;
            self.store_call(move |s| s.insert(&row)).instrument(info_span!("store.insert")).await
        }
        .await;
        if let Err(e) = inserted {
            let _ = self.inner.backend.delete(&ctx, Some(&rt)).await;
            return Err(fail(e));
        }
        let status = self.continue_restored(&ctx, &mut rt).await?;
        if status.state() != VmState::Running {
            let (i, r) = (id.clone(), rt.clone());
            let _ = self.store_call(move |s| s.update_state(&i, VmState::Paused, Some(&r), None, now)).await;
        }
        let slot = Arc::new(Slot {
            id: id.clone(),
            name: name.clone(),
            customer: caller.clone(),
            spec: spec.clone(),
            net: lease,
            created_at: now,
            op: tokio::sync::Mutex::new(()),
            cell: RwLock::new(Cell::new(status.clone(), now)),
        });
        self.install(&slot);
        info!(vm_id = %id, name = %name, snapshot = %rec.name, customer_id = %caller, "VM cloned from a snapshot");
        self.publish(VmEvent {
            vm_id: id.clone(),
            customer: caller.clone(),
            cause: Cause::Created,
            from: None,
            to: Some(status.state()),
            runtime: status.runtime().cloned(),
            spec,
            stopped: None,
        });
        Ok(slot)
    }
}

/// A clone's port mappings: the same rules as a new VM's.
fn check_ports(ports: &[PortSpec]) -> Result<(), Error> {
    for (i, p) in ports.iter().enumerate() {
        let field = |f: &str| format!("port_mappings[{i}].{f}");
        if !matches!(p.protocol.as_str(), "" | "tcp" | "udp") {
            return Err(Error::invalid(field("protocol"), format!("{:?} is not tcp or udp", p.protocol)));
        }
        if !(1..=65535).contains(&p.guest_port) {
            return Err(Error::invalid(field("guest_port"), format!("is {}, must be 1-65535", p.guest_port)));
        }
        if !(0..=65535).contains(&p.host_port) {
            return Err(Error::invalid(field("host_port"), format!("is {}, must be 0 (any) or 1-65535", p.host_port)));
        }
    }
    Ok(())
}
