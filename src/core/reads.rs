//! The read side of the manager: one VM as its owner sees it, its live
//! figures (`GetVmInfo`), pages of a customer's VMs, counts by state and the
//! VMs with a live VMM. Reads take no operation lock: they never wait for an
//! operation in progress (which they show, see [`super::VmView::pending`]).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::Instant;

use tracing::debug;

use super::{ListPage, ListQuery, LiveMetrics, Manager, Slot, VmDetails, VmView};
use crate::error::Error;
use crate::model::{CustomerId, Runtime, Usage, VmId, VmState};
use crate::util::unix_now;

impl Manager {
    pub fn get(&self, caller: &CustomerId, id: &VmId) -> Result<VmView, Error> {
        Ok(self.lookup(caller, id)?.view())
    }

    /// Config, state, live metrics and backend facts of one VM. Does not wait
    /// for an operation in progress on the VM.
    pub async fn info(&self, caller: &CustomerId, id: &VmId) -> Result<VmDetails, Error> {
        let slot = self.lookup(caller, id)?;
        let view = slot.view();
        let mut backend_info = BTreeMap::new();
        backend_info.insert("backend".to_owned(), self.inner.backend.kind().as_str().to_owned());
        let mut metrics = None;
        if let Some(rt) = view.status.runtime() {
            backend_info = self.inner.backend.info(rt);
            if matches!(view.state(), VmState::Running | VmState::Paused) {
                let ctx = self.ctx(&slot);
                match self.inner.backend.usage(&ctx, rt).await {
                    Ok(mut usage) => {
                        self.add_nic_counters(&slot, &mut usage);
                        metrics = Some(self.live_metrics(&slot, rt, usage, view.state()));
                    }
                    Err(e) => debug!(vm_id = %id, error = %crate::util::chain(&e), "usage unavailable"),
                }
            }
        }
        // The id billing, metrics and logs know the VM by (see `core`).
        backend_info.insert("host_id".to_owned(), view.host_id.to_string());
        let workload_exit = match (&slot.spec.image, view.state()) {
            (Some(_), VmState::Shutdown) => super::image::workload_exit(&self.vm_dir(&slot.id)),
            _ => None,
        };
        let saved_bytes = if view.state() == VmState::Suspended { self.saved_size(&slot.id) } else { 0 };
        Ok(VmDetails { view, metrics, backend_info, workload_exit, saved_bytes })
    }

    /// A VM's managed NICs' traffic, from their TAPs (the hypervisor does
    /// not count it for QEMU), added to `usage`.
    fn add_nic_counters(&self, slot: &Slot, usage: &mut Usage) {
        let (Some(net), Some(lease)) = (&self.inner.cfg.net.0, &slot.net) else { return };
        if let Some(all) = net.tap_counters() {
            super::net::add_tap_counters(usage, lease.nics.iter().map(|n| n.tap.as_str()), &all);
        }
    }

    fn live_metrics(&self, slot: &Slot, rt: &Runtime, usage: Usage, state: VmState) -> LiveMetrics {
        let now = Instant::now();
        let uptime_secs = rt.booted_at.map(|b| (unix_now() - b).max(0)).unwrap_or(0);
        let mut c = slot.cell_mut();
        let cpu_percent = match (state, c.last_cpu) {
            (VmState::Paused, _) => 0.0,
            (_, Some((at, cpu))) if now > at && usage.cpu_time_ns >= cpu => {
                let wall = now.duration_since(at).as_nanos() as f64;
                (usage.cpu_time_ns - cpu) as f64 / wall * 100.0
            }
            // No earlier sample: average since boot.
            _ if uptime_secs > 0 => usage.cpu_time_ns as f64 / (uptime_secs as f64 * 1e9) * 100.0,
            _ => 0.0,
        };
        c.last_cpu = Some((now, usage.cpu_time_ns));
        LiveMetrics { cpu_percent, usage, uptime_secs }
    }

    /// One page of the caller's VMs, ordered by id.
    pub fn list(&self, caller: &CustomerId, q: &ListQuery) -> ListPage {
        let idx = self.index();
        let Some(vms) = idx.by_customer.get(caller) else {
            return ListPage { vms: Vec::new(), next_after: None, total: 0 };
        };
        let wanted = |s: &Slot| q.states.is_empty() || q.states.contains(&s.cell().status.state());
        let total = if q.states.is_empty() { vms.len() } else { vms.values().filter(|s| wanted(s)).count() };
        let start = match &q.after {
            Some(a) => Bound::Excluded(a.clone()),
            None => Bound::Unbounded,
        };
        let mut page = Vec::with_capacity(q.page_size.min(total));
        let mut more = false;
        for slot in vms.range((start, Bound::Unbounded)).map(|(_, s)| s) {
            if !wanted(slot) {
                continue;
            }
            if page.len() == q.page_size {
                more = true;
                break;
            }
            page.push(slot.view());
        }
        let next_after = if more { page.last().map(|v: &VmView| v.id.clone()) } else { None };
        ListPage { vms: page, next_after, total }
    }

    /// Number of VMs in each state, for health and metrics.
    pub fn counts(&self) -> BTreeMap<VmState, usize> {
        let mut m: BTreeMap<VmState, usize> = VmState::ALL.iter().map(|s| (*s, 0)).collect();
        for slot in self.index().by_id.values() {
            *m.entry(slot.cell().status.state()).or_default() += 1;
        }
        m
    }

    /// Every VM with a live VMM (for metering after a restart, say).
    pub fn active(&self) -> Vec<VmView> {
        self.index().by_id.values().map(|s| s.view()).filter(|v| v.status.runtime().is_some()).collect()
    }

    /// The image digests the VMs on this host run, and those of creates
    /// in progress whose image is prepared (their bases must stay).
    pub fn image_digests(&self) -> std::collections::HashSet<String> {
        let idx = self.index();
        idx.by_id
            .values()
            .filter_map(|s| s.spec.image.as_ref().map(|i| i.digest.clone()))
            .chain(idx.preparing.values().cloned())
            .chain(idx.snapshot_digests.values().cloned())
            .filter(|d| !d.is_empty())
            .collect()
    }

    /// Host networking: `None` when off, else why it is unavailable
    /// (`Some(None)`: it works).
    pub fn network_status(&self) -> Option<Option<String>> {
        self.inner.cfg.net.0.as_ref().map(|n| n.unavailable())
    }
}
