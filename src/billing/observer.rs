//! The first stage: turns committed VM events into metering starts and
//! stops — it keeps the [`MeterSet`] and tells the spool writer (through its
//! [`SpoolHandle`]) when a run starts or stops. Imports the leaves and
//! [`super::spool`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::meter::{Clock, MeterSet, Metered};
use super::spool::SpoolHandle;
use crate::core::{Cause, Observer, VmEvent};
use crate::model::Runtime;
use crate::model::VmState;
use crate::model::{ValidSpec, VmId};

/// Turns committed VM events into metering starts and stops.
pub struct BillingObserver {
    set: Arc<MeterSet>,
    spool: SpoolHandle,
    clock: Clock,
    vms_dir: PathBuf,
    next_generation: AtomicU64,
}

impl BillingObserver {
    pub(super) fn new(set: Arc<MeterSet>, spool: SpoolHandle, clock: Clock, vms_dir: PathBuf) -> BillingObserver {
        BillingObserver { set, spool, clock, vms_dir, next_generation: AtomicU64::new(1) }
    }

    /// Starts or stops metering `id` as its state says (`recovered`: found
    /// running again after a restart).
    pub(super) fn meter(
        &self,
        id: &VmId,
        customer: &str,
        spec: &Arc<ValidSpec>,
        rt: Option<&Runtime>,
        running: bool,
        recovered: bool,
    ) {
        let mut g = self.set.lock();
        let was = g.vms.get(id).cloned();
        match (was, running, rt) {
            (None, true, Some(rt)) => {
                let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                let key: Arc<str> = Arc::from(id.as_str());
                g.vms.insert(
                    id.clone(),
                    Arc::new(Metered {
                        id: id.clone(),
                        key: key.clone(),
                        spec: spec.clone(),
                        rt: rt.clone(),
                        dir: self.vms_dir.join(id.as_str()),
                        generation,
                    }),
                );
                g.snapshot = None;
                self.spool.start(key, customer.to_owned(), generation, recovered, self.clock.unix_ns());
            }
            (Some(m), true, Some(rt)) if &m.rt != rt => {
                // Same run, new runtime (e.g. a reboot that restarted the VMM).
                let updated = Metered {
                    rt: rt.clone(),
                    key: m.key.clone(),
                    id: m.id.clone(),
                    spec: m.spec.clone(),
                    dir: m.dir.clone(),
                    generation: m.generation,
                };
                g.vms.insert(id.clone(), Arc::new(updated));
                g.snapshot = None;
            }
            (Some(m), false, _) | (Some(m), true, None) => {
                g.vms.remove(id);
                g.snapshot = None;
                self.spool.stop(m.key.clone(), self.clock.unix_ns());
            }
            _ => {}
        }
    }
}

impl Observer for BillingObserver {
    fn on_event(&self, ev: &VmEvent) {
        let running = ev.to == Some(VmState::Running);
        self.meter(&ev.vm_id, &ev.customer.0, &ev.spec, ev.runtime.as_ref(), running, ev.cause == Cause::Recovered);
    }
}
