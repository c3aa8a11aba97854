//! Settings of the Cloud Hypervisor backend (`UNKEY_METALD_CLOUD_HYPERVISOR_*`).

use std::time::Duration;

use crate::config::Reader;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudHypervisorSettings {
    /// Binary name (looked up in PATH) or path.
    pub binary: String,
    /// Bound of every API request.
    pub api_timeout: Duration,
}

impl Default for CloudHypervisorSettings {
    fn default() -> Self {
        CloudHypervisorSettings { binary: "/usr/bin/cloud-hypervisor".into(), api_timeout: Duration::from_secs(10) }
    }
}

impl CloudHypervisorSettings {
    pub fn read(r: &mut Reader<'_>) -> CloudHypervisorSettings {
        let d = CloudHypervisorSettings::default();
        let binary = r.string("CLOUD_HYPERVISOR_BINARY", &d.binary);
        let api_timeout = Duration::from_millis(r.range("CLOUD_HYPERVISOR_API_TIMEOUT_MS", 10_000u64, 100, 600_000));
        CloudHypervisorSettings { binary, api_timeout }
    }
}
