//! What metald persists and reports about a VM's hypervisor process: the
//! [`Runtime`] handle that finds it again after a restart, its [`Usage`]
//! counters, which hypervisor drives it ([`BackendKind`]) and how to stop it
//! ([`StopMode`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which hypervisor a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Fake,
    Qemu,
    Firecracker,
    CloudHypervisor,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Fake => "fake",
            BackendKind::Qemu => "qemu",
            BackendKind::Firecracker => "firecracker",
            BackendKind::CloudHypervisor => "cloudhypervisor",
        }
    }
}

/// Persisted handle to a VM's hypervisor process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    /// Process id of the VMM.
    pub pid: Option<u32>,
    /// Process start time (clock ticks since boot, from `/proc/<pid>/stat`) so
    /// a recycled pid is never mistaken for our VMM.
    pub pid_start_ticks: Option<u64>,
    /// The VMM's control socket (QMP, Firecracker or Cloud Hypervisor API).
    pub api_socket: Option<PathBuf>,
    /// Where the guest's serial console is written.
    pub console_log: Option<PathBuf>,
    /// Unix seconds when the guest was last booted (for uptime).
    pub booted_at: Option<i64>,
    /// Backend-specific facts (tap names, chroot, accelerator, ...).
    pub extra: BTreeMap<String, String>,
}

/// How to stop a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopMode {
    /// Ask the guest to power off, wait up to the timeout, then force.
    Graceful { timeout: Duration },
    /// Stop at once.
    Force,
}

/// Resource usage of a VM, counters cumulative since its VMM started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub cpu_time_ns: u64,
    pub memory_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub disk_read_ops: u64,
    pub disk_write_ops: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub net_rx_packets: u64,
    pub net_tx_packets: u64,
}
