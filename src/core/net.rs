//! The core's view of host networking: [`HostNet`], what the core asks of
//! the host side of metald-managed NICs (the daemon plugs in the kernel
//! datapath of `network`; tests a [`RecordingNet`]), and [`NetHandle`], how
//! the manager holds it.
//!
//! The store is the truth: leases are written with a create's intent, the
//! kernel objects are made from them ([`HostNet::add`]) before the
//! hypervisor opens its TAP, removed ([`HostNet::remove`]) after it is gone
//! and before the leases are released, and at start the whole kernel state
//! is derived again from the store ([`HostNet::rebuild`]).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::model::net::{NetLease, Pools};
use crate::model::{Usage, ValidSpec, VmId};

/// Guest-side traffic of every TAP of managed NICs, read at once: TAP
/// name → (rx bytes, tx bytes, rx packets, tx packets).
pub type TapCounters = HashMap<String, (u64, u64, u64, u64)>;

/// Adds the traffic of `taps` (from one [`HostNet::tap_counters`] read) to
/// `usage` when the hypervisor counted none (QEMU does not; Firecracker
/// and Cloud Hypervisor do, and are not counted twice). The one rule for
/// GetVmInfo and billing samples.
pub fn add_tap_counters<'a>(usage: &mut Usage, taps: impl IntoIterator<Item = &'a str>, all: &TapCounters) {
    if usage.net_rx_bytes != 0 || usage.net_tx_bytes != 0 {
        return;
    }
    let mut sum = (0, 0, 0, 0);
    for t in taps {
        let Some(c) = all.get(t) else { return };
        sum = (sum.0 + c.0, sum.1 + c.1, sum.2 + c.2, sum.3 + c.3);
    }
    (usage.net_rx_bytes, usage.net_tx_bytes, usage.net_rx_packets, usage.net_tx_packets) = sum;
}

/// The TAPs of `spec`'s metald-managed NICs.
pub fn managed_taps(spec: &ValidSpec) -> impl Iterator<Item = &str> {
    spec.network.iter().filter(|n| n.managed && !n.tap.is_empty()).map(|n| n.tap.as_str())
}

/// The host side of managed NICs. Every call is idempotent.
#[async_trait::async_trait]
pub trait HostNet: Send + Sync + 'static {
    /// The pools leases are taken from.
    fn pools(&self) -> &Pools;
    /// DNS servers the guests are told about.
    fn dns(&self) -> &[IpAddr];
    /// Why managed NICs cannot be had on this host (not root, no `nft`,
    /// ...), with what to do about it; `None` when they can.
    fn unavailable(&self) -> Option<String>;
    /// Makes `vm`'s NICs exist in the kernel as `lease` says.
    async fn add(&self, vm: &VmId, lease: &NetLease) -> Result<(), String>;
    /// Removes what [`HostNet::add`] made for `vm` (missing is fine).
    async fn remove(&self, vm: &VmId, lease: &NetLease) -> Result<(), String>;
    /// Makes the kernel match `all` exactly (start-up): removes what
    /// belongs to no lease, makes what is missing. Returns a summary for
    /// the log.
    async fn rebuild(&self, all: &BTreeMap<VmId, NetLease>) -> Result<String, String>;
    /// Guest-side traffic of every TAP now, in one read (cheap: no
    /// hypervisor round trip); `None` when unknown.
    fn tap_counters(&self) -> Option<TapCounters> {
        None
    }
}

/// The manager's networking: off (`None`) or a [`HostNet`].
#[derive(Clone, Default)]
pub struct NetHandle(pub Option<Arc<dyn HostNet>>);

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "NetHandle(on)" } else { "NetHandle(off)" })
    }
}

/// A [`HostNet`] that makes no kernel objects and records what it was
/// asked (unit and API tests; the real datapath is tested on its own and
/// end to end).
pub struct RecordingNet {
    pools: Pools,
    dns: Vec<IpAddr>,
    /// `vm → lease` as the "kernel" holds it now.
    pub wired: Mutex<BTreeMap<VmId, NetLease>>,
    /// The next `add` fails with this message.
    pub fail_next_add: Mutex<Option<String>>,
    /// Why it is unavailable, when set.
    pub unavailable: Mutex<Option<String>>,
    /// What [`HostNet::tap_counters`] answers.
    pub taps: Mutex<Option<TapCounters>>,
}

impl RecordingNet {
    pub fn new(pools: Pools, dns: Vec<IpAddr>) -> RecordingNet {
        RecordingNet {
            pools,
            dns,
            wired: Mutex::default(),
            fail_next_add: Mutex::default(),
            unavailable: Mutex::default(),
            taps: Mutex::default(),
        }
    }

    pub fn wired(&self) -> BTreeMap<VmId, NetLease> {
        self.wired.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait::async_trait]
impl HostNet for RecordingNet {
    fn pools(&self) -> &Pools {
        &self.pools
    }

    fn dns(&self) -> &[IpAddr] {
        &self.dns
    }

    fn unavailable(&self) -> Option<String> {
        self.unavailable.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn add(&self, vm: &VmId, lease: &NetLease) -> Result<(), String> {
        if let Some(e) = self.fail_next_add.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        self.wired.lock().unwrap_or_else(|p| p.into_inner()).insert(vm.clone(), lease.clone());
        Ok(())
    }

    async fn remove(&self, vm: &VmId, _lease: &NetLease) -> Result<(), String> {
        self.wired.lock().unwrap_or_else(|p| p.into_inner()).remove(vm);
        Ok(())
    }

    fn tap_counters(&self) -> Option<TapCounters> {
        self.taps.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn rebuild(&self, all: &BTreeMap<VmId, NetLease>) -> Result<String, String> {
        let mut w = self.wired.lock().unwrap_or_else(|p| p.into_inner());
        let removed = w.keys().filter(|k| !all.contains_key(*k)).count();
        let added = all.keys().filter(|k| !w.contains_key(*k)).count();
        *w = all.clone();
        Ok(format!("{added} added, {removed} removed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_counters_complete_usage_only_where_the_hypervisor_counted_none() {
        let all: TapCounters =
            [("mt-a".to_owned(), (100, 200, 1, 2)), ("mt-b".to_owned(), (10, 20, 3, 4))].into_iter().collect();
        let mut u = Usage::default();
        add_tap_counters(&mut u, ["mt-a", "mt-b"], &all);
        assert_eq!((u.net_rx_bytes, u.net_tx_bytes, u.net_rx_packets, u.net_tx_packets), (110, 220, 4, 6));
        // Firecracker counted its own: not twice.
        let mut fc = Usage { net_rx_bytes: 5, ..Usage::default() };
        add_tap_counters(&mut fc, ["mt-a"], &all);
        assert_eq!((fc.net_rx_bytes, fc.net_tx_bytes), (5, 0));
        // A TAP that is not there (being made again): nothing rather than
        // a partial sum.
        let mut gone = Usage::default();
        add_tap_counters(&mut gone, ["mt-a", "mt-x"], &all);
        assert_eq!(gone.net_rx_bytes, 0);
    }
}
