//! Creating a VM: validation, the per-customer id and host id
//! ([`Reservation`]), the intent written with the network leases, the
//! host side of metald-managed NICs made before the hypervisor, and the
//! roll-back of every step when a later one fails; for an image VM, the
//! image prepared first and its writable disk made in the VM's directory
//! (`core::image`).

use std::sync::{Arc, RwLock};

use tracing::{Instrument, info, info_span, warn};

use super::image::WRITABLE_DISK;
use super::{Cause, Cell, Manager, Slot, VmEvent, VmView};
use crate::backend::VmContext;
use crate::error::Error;
use crate::model::net::{NetLease, NicRequest, Want};
use crate::model::{CustomerId, GuestKernel, ImageSpec, InitConfig, Status, ValidSpec, VmId, VmSpec, VmState};
use crate::store::{Intent, VmRow};
use crate::util::unix_now;

impl Manager {
    pub async fn create(&self, caller: &CustomerId, id: Option<VmId>, spec: VmSpec) -> Result<VmView, Error> {
        let this = self.clone();
        let caller = caller.clone();
        self.detached(async move { this.create_inner(caller, id, spec).await }).await
    }

    async fn create_inner(&self, caller: CustomerId, id: Option<VmId>, spec: VmSpec) -> Result<VmView, Error> {
        let spec = info_span!("validate").in_scope(|| -> Result<ValidSpec, Error> {
            let spec = crate::model::validate(spec, &self.inner.cfg.limits)?;
            if spec.image.is_none() {
                self.inner.backend.check(&spec)?;
            }
            Ok(spec)
        })?;
        let nics = crate::model::net::requests(&spec.network);
        self.check_net(&nics)?;
        let name = id.unwrap_or_else(VmId::generate);
        let reservation = self.reserve(&caller, &name)?;
        let id = reservation.id.clone();
        // An image is had before the intent (see `core::image`).
        let (spec, init) = match &spec.image {
            Some(image) => {
                let image = image.clone();
                let (spec, init) = self.prepare_image(&caller, &id, &name, &spec, &image).await?;
                // The base is this create's until its VM row names it (or
                // it fails): the cache's GC keeps it (`image_digests`).
                if let Some(i) = &spec.image {
                    self.index_mut().preparing.insert(id.clone(), i.digest.clone());
                }
                (spec, init)
            }
            None => (spec, None),
        };
        // The intent goes first, with the network leases: a crash from here
        // on leaves a row that start-up reconciliation rolls back (process,
        // directory, leases and the kernel objects made from them).
        let lease = self.begin_create(&id, &caller, nics).await?;
        let created = self.create_reserved(&caller, &id, &name, spec, lease, init).await;
        self.end_create(reservation, created).await
    }

    /// Ends a create (or clone) whose intent is written: a failed one's
    /// intent and leases are rolled back, a made one's reservation is done.
    pub(super) async fn end_create(
        &self,
        reservation: Reservation,
        created: Result<Arc<Slot>, Error>,
    ) -> Result<VmView, Error> {
        if created.is_err() {
            let id = reservation.id.clone();
            if let Err(e) = self.store_call(move |s| s.abort_create(&id)).await {
                warn!(error = %e.chain(), "could not roll back a failed create's intent; the next start will");
            }
        }
        let slot = created?;
        reservation.done();
        Ok(slot.view())
    }

    /// Pulls (or finds) `image` for `caller` and returns the spec the VM
    /// runs with (guest kernel, metald-init, base and writable disks) and
    /// the guest's config for its writable disk.
    async fn prepare_image(
        &self,
        caller: &CustomerId,
        id: &VmId,
        name: &VmId,
        spec: &ValidSpec,
        image: &ImageSpec,
    ) -> Result<(ValidSpec, Option<InitConfig>), Error> {
        let Some(images) = self.inner.cfg.images.0.clone() else {
            return Err(Error::FailedPrecondition(
                "container images are off on this host (UNKEY_METALD_IMAGES_ENABLED=false): give a kernel and disks, \
                 or enable them"
                    .into(),
            ));
        };
        let guest = if spec.boot.kernel.as_os_str().is_empty() {
            images.guest()?
        } else {
            GuestKernel { kernel: spec.boot.kernel.clone(), initrd: spec.boot.initrd.clone().unwrap_or_default() }
        };
        let prepared = images.prepare(caller, image).instrument(info_span!("image.prepare", vm_id = %id)).await?;
        let spec = spec.with_image(&prepared, &guest, &self.vm_dir(id).join(WRITABLE_DISK));
        self.inner.backend.check(&spec)?;
        let init = InitConfig::new(image, &prepared, name.as_str(), images.grace_seconds());
        Ok((spec, Some(init)))
    }

    /// Refuses managed NICs when networking is off or unavailable, and
    /// addresses or host ports asked for by name that the pools do not
    /// allow, before anything is written.
    pub(super) fn check_net(&self, nics: &[NicRequest]) -> Result<(), Error> {
        if nics.is_empty() {
            return Ok(());
        }
        let Some(net) = &self.inner.cfg.net.0 else {
            return Err(Error::FailedPrecondition(
                "host networking is off on this host (UNKEY_METALD_NETWORK_ENABLED=false): name an existing TAP \
                 in tap_device or enable it"
                    .into(),
            ));
        };
        if let Some(why) = net.unavailable() {
            return Err(Error::FailedPrecondition(format!("host networking is unavailable: {why}")));
        }
        let pools = net.pools();
        for (i, nic) in nics.iter().enumerate() {
            let field = |f: &str| format!("config.network[{i}].{f}");
            if let Want::Exactly(a) = nic.v4
                && let Some(why) = pools.refuse4(a)
            {
                return Err(Error::invalid(field("ipv4_config.address"), why));
            }
            if let Want::Exactly(a) = nic.v6
                && let Some(why) = pools.refuse6(a)
            {
                return Err(Error::invalid(field("ipv6_config.address"), why));
            }
            if nic.v4 == Want::Any && pools.v4.is_none() && nic.v6 == Want::Any && pools.v6.is_none() {
                return Err(Error::FailedPrecondition("no address pool is configured on this host".into()));
            }
            for (j, p) in nic.ports.iter().enumerate() {
                if p.host_port != 0
                    && let Some(why) = pools.refuse_port(p.host_port)
                {
                    return Err(Error::invalid(field(&format!("port_mappings[{j}].host_port")), why));
                }
            }
        }
        Ok(())
    }

    /// Writes a create's intent and, in the same transaction, leases what
    /// `nics` ask for.
    pub(super) async fn begin_create(
        &self,
        id: &VmId,
        customer: &CustomerId,
        nics: Vec<NicRequest>,
    ) -> Result<Option<NetLease>, Error> {
        let intent =
            Intent { vm_id: id.clone(), customer: customer.clone(), op: "create".into(), started_at: unix_now() };
        let Some(net) = self.inner.cfg.net.0.clone().filter(|_| !nics.is_empty()) else {
            self.store_call(move |s| s.begin(&intent)).instrument(info_span!("store.intent", vm_id = %id)).await?;
            return Ok(None);
        };
        let lease = self
            .store_call(move |s| s.begin_create(&intent, &nics, net.pools()))
            .instrument(info_span!("store.intent", vm_id = %id))
            .await?;
        Ok(Some(lease))
    }

    /// Creates a VM whose id is reserved and whose intent (and leases) are
    /// written.
    async fn create_reserved(
        &self,
        caller: &CustomerId,
        id: &VmId,
        name: &VmId,
        spec: ValidSpec,
        lease: Option<NetLease>,
        init: Option<InitConfig>,
    ) -> Result<Arc<Slot>, Error> {
        let (caller, id) = (caller.clone(), id.clone());
        let net = self.inner.cfg.net.0.clone();
        let (spec, lease) = match (lease, &net) {
            (Some(lease), Some(net)) => {
                let spec = spec.with_leases(&lease, net.pools(), net.dns());
                // Before the hypervisor: it opens the TAPs by name.
                if let Err(e) = net.add(&id, &lease).instrument(info_span!("network.add", vm_id = %id)).await {
                    let _ = net.remove(&id, &lease).await;
                    return Err(Error::Internal(format!("setting up the VM's network: {e}")));
                }
                (spec, Some(Arc::new(lease)))
            }
            _ => (spec, None),
        };
        let created = self.create_vm(&caller, &id, name, Arc::new(spec), lease.clone(), init).await;
        if created.is_err()
            && let (Some(net), Some(lease)) = (&net, &lease)
            && let Err(e) = net.remove(&id, lease).await
        {
            warn!(vm_id = %id, error = %e, "could not remove a failed create's network; the next start will");
        }
        created
    }

    async fn create_vm(
        &self,
        caller: &CustomerId,
        id: &VmId,
        name: &VmId,
        spec: Arc<ValidSpec>,
        lease: Option<Arc<NetLease>>,
        init: Option<InitConfig>,
    ) -> Result<Arc<Slot>, Error> {
        let (caller, id) = (caller.clone(), id.clone());
        let dir = self.vm_dir(&id);
        if dir.exists() {
            // Leftover of a VM whose record is gone (e.g. a crash mid-delete).
            warn!(vm_id = %id, dir = %dir.display(), "removing stale VM directory");
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::Internal(format!("creating {}: {e}", dir.display())))?;
        if let (Some(init), Some(images)) = (&init, &self.inner.cfg.images.0) {
            let disk = dir.join(WRITABLE_DISK);
            if let Err(e) = images.writable_disk(&disk, init).instrument(info_span!("image.writable_disk")).await {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        }
        let ctx = VmContext { id: &id, spec: &spec, dir: dir.as_path().into() };
        let rt = match self.inner.backend.create(&ctx).instrument(info_span!("backend.create", vm_id = %id)).await {
            Ok(rt) => rt,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        };
        let now = unix_now();
        let row = VmRow {
            id: id.clone(),
            name: name.clone(),
            customer: caller.clone(),
            state: VmState::Created,
            spec: (*spec).clone(),
            runtime: Some(rt.clone()),
            created_at: now,
            modified_at: now,
            stopped: None,
        };
        if let Err(e) = self.store_call(move |s| s.insert(&row)).instrument(info_span!("store.insert")).await {
            let _ = self.inner.backend.delete(&ctx, Some(&rt)).await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let slot = Arc::new(Slot {
            id: id.clone(),
            name: name.clone(),
            customer: caller.clone(),
            spec: spec.clone(),
            net: lease,
            created_at: now,
            op: tokio::sync::Mutex::new(()),
            cell: RwLock::new(Cell::new(Status::Created(rt.clone()), now)),
        });
        self.install(&slot);
        info!(vm_id = %id, name = %name, customer_id = %caller, "VM created");
        self.publish(VmEvent {
            vm_id: id,
            customer: caller,
            cause: Cause::Created,
            from: None,
            to: Some(VmState::Created),
            runtime: Some(rt),
            spec,
            stopped: None,
        });
        Ok(slot)
    }

    /// Reserves `name` among `caller`'s VMs and a host id for it. Only the
    /// caller's own VMs can make a name taken.
    pub(super) fn reserve(&self, caller: &CustomerId, name: &VmId) -> Result<Reservation, Error> {
        let mut idx = self.index_mut();
        let key = (caller.clone(), name.clone());
        if idx.by_customer.get(caller).is_some_and(|m| m.contains_key(name)) || idx.reserved_names.contains(&key) {
            return Err(Error::AlreadyExists(name.to_string()));
        }
        let max = self.inner.cfg.max_vms;
        if idx.by_id.len() + idx.reserved.len() >= max {
            return Err(Error::ResourceExhausted(format!(
                "this host runs its maximum of {max} VMs (UNKEY_METALD_MAX_VMS); delete one first"
            )));
        }
        let unsaved = self.inner.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        let free = |id: &VmId| !idx.by_id.contains_key(id) && !idx.reserved.contains(id) && !unsaved.contains_key(id);
        let mut id = name.clone();
        while !free(&id) {
            // Another VM on this host has this id: same name, new host id.
            let base = &name.as_str()[..name.as_str().len().min(55)];
            id =
                VmId::parse(&format!("{base}-{:06x}", rand::random::<u32>() >> 8)).unwrap_or_else(|_| VmId::generate());
        }
        drop(unsaved);
        idx.reserved.insert(id.clone());
        idx.reserved_names.insert(key.clone());
        Ok(Reservation { mgr: self.clone(), id, name: key })
    }
}

/// Holds an id while its VM is being created; released on drop.
pub(super) struct Reservation {
    mgr: Manager,
    /// The host id chosen.
    pub(super) id: VmId,
    name: (CustomerId, VmId),
}

impl Reservation {
    pub(super) fn done(self) {}
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut idx = self.mgr.index_mut();
        idx.reserved.remove(&self.id);
        idx.reserved_names.remove(&self.name);
        // Installed (or failed): the VM row is what keeps its base now.
        idx.preparing.remove(&self.id);
    }
}
