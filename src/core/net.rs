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

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::model::VmId;
use crate::model::net::{NetLease, Pools};

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
    /// Guest-side traffic of `taps` summed: (rx bytes, tx bytes, rx
    /// packets, tx packets); `None` when unknown.
    fn counters(&self, taps: &[String]) -> Option<(u64, u64, u64, u64)> {
        let _ = taps;
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
}

impl RecordingNet {
    pub fn new(pools: Pools, dns: Vec<IpAddr>) -> RecordingNet {
        RecordingNet {
            pools,
            dns,
            wired: Mutex::default(),
            fail_next_add: Mutex::default(),
            unavailable: Mutex::default(),
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

    async fn rebuild(&self, all: &BTreeMap<VmId, NetLease>) -> Result<String, String> {
        let mut w = self.wired.lock().unwrap_or_else(|p| p.into_inner());
        let removed = w.keys().filter(|k| !all.contains_key(*k)).count();
        let added = all.keys().filter(|k| !w.contains_key(*k)).count();
        *w = all.clone();
        Ok(format!("{added} added, {removed} removed"))
    }
}
