//! Typed bodies of Cloud Hypervisor's REST API (`/api/v1/...`), written
//! from its OpenAPI description (`vmm/src/api/openapi/cloud-hypervisor.yaml`,
//! Cloud Hypervisor v40+; snapshot and restore as of v53). Only what metald
//! sends and reads is modelled; optional fields are omitted so Cloud
//! Hypervisor applies its defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::backend::restvmm::{RateLimiter, TokenBucket};

/// `PUT /api/v1/vm.create` (`VmConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub disks: Vec<DiskConfig>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub net: Vec<NetConfig>,
    pub serial: ConsoleConfig,
    pub console: ConsoleConfig,
}

/// `CpusConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
}

/// `MemoryConfig`; sizes in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hotplug_size: Option<u64>,
}

/// `PayloadConfig`: what the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    pub kernel: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub initramfs: Option<String>,
}

/// `DiskConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: String,
    pub readonly: bool,
    pub id: String,
}

/// `NetConfig` on an existing TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mac: Option<String>,
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate_limiter_config: Option<RateLimiterConfig>,
}

/// `RateLimiterConfig`: the same JSON as Firecracker's `RateLimiter`
/// (Cloud Hypervisor applies one limiter to both directions of a NIC).
pub type RateLimiterConfig = RateLimiter;

/// `SerialConfig` / `ConsoleConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub file: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

/// `GET /api/v1/vm.info` (`VmInfo`), the parts metald reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VmInfo {
    /// "Created", "Running", "Shutdown" or "Paused".
    pub state: String,
    #[serde(default)]
    pub memory_actual_size: Option<u64>,
    #[serde(default)]
    pub config: serde_json::Value,
}

/// `PUT /api/v1/vm.snapshot` (`VmSnapshotConfig`): the VM must be paused;
/// Cloud Hypervisor writes `config.json`, `state.json` and `memory-ranges`
/// into the (existing) directory of a `file://` URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotConfig {
    pub destination_url: String,
}

/// `PUT /api/v1/vm.restore` (`RestoreConfig`): only in a VMM without a VM;
/// the VM comes back paused (`resume` unset). Memory is copied from the
/// snapshot before the call returns (`memory_restore_mode` unset: `Copy`),
/// so the snapshot's files are not needed afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    pub source_url: String,
}

/// `GET /api/v1/vmm.ping` (`VmmPingResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmmPingResponse {
    pub version: String,
    #[serde(default)]
    pub build_version: Option<String>,
    #[serde(default)]
    pub pid: Option<i64>,
}

/// `GET /api/v1/vm.counters` (`VmCounters`): device id -> counter -> value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// The message of an error answer. Cloud Hypervisor (v50+) answers a JSON
/// array of its error chain (`["Error from API", "The VM could not be
/// snapshotted", ..., <cause>]`): its messages joined with ": ", without
/// the generic first one and without stack backtraces. Anything else: the
/// text as it is.
pub fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<Vec<String>>(body) {
        Ok(chain) if !chain.is_empty() => chain
            .iter()
            .filter(|m| m.as_str() != "Error from API")
            .map(|m| m.split("\n\nStack backtrace:").next().unwrap_or_default().trim())
            .collect::<Vec<_>>()
            .join(": "),
        _ => crate::backend::uds_http::text_error_body(body),
    }
}

/// Sums one counter over all devices.
pub fn counter_sum(c: &VmCounters, name: &str) -> u64 {
    c.values().filter_map(|d| d.get(name)).fold(0u64, |a, v| a.saturating_add(*v))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodies_match_the_api_reference() {
        let c = ConsoleConfig { mode: ConsoleMode::File, file: Some("/c.log".into()) };
        assert_eq!(serde_json::to_value(&c).unwrap(), json!({"mode": "File", "file": "/c.log"}));
        let off = ConsoleConfig { mode: ConsoleMode::Off, file: None };
        assert_eq!(serde_json::to_value(&off).unwrap(), json!({"mode": "Off"}));
        let snap = VmSnapshotConfig { destination_url: "file:///s/1".into() };
        assert_eq!(serde_json::to_value(&snap).unwrap(), json!({"destination_url": "file:///s/1"}));
        let restore = RestoreConfig { source_url: "file:///s/1".into() };
        assert_eq!(serde_json::to_value(&restore).unwrap(), json!({"source_url": "file:///s/1"}));
        let counters: VmCounters = serde_json::from_value(json!({
            "_disk0": {"read_bytes": 5, "write_bytes": 1, "read_ops": 1, "write_ops": 1},
            "disk1": {"read_bytes": 7},
            "_net2": {"rx_bytes": 3, "tx_frames": 2}
        }))
        .unwrap();
        assert_eq!(counter_sum(&counters, "read_bytes"), 12);
        assert_eq!(counter_sum(&counters, "tx_frames"), 2);
        assert_eq!(counter_sum(&counters, "nope"), 0);
    }

    #[test]
    fn error_chains_read_as_one_message() {
        let body = br#"["Error from API","The VM could not be snapshotted","Cannot snapshot VM","Could not get vCPU state GetNestedState(Invalid argument (os error 22)\n\nStack backtrace:\n   0: <unknown>\n)"]"#;
        assert_eq!(
            error_message(body),
            "The VM could not be snapshotted: Cannot snapshot VM: Could not get vCPU state GetNestedState(Invalid \
             argument (os error 22)"
        );
        assert_eq!(error_message(b"VM is not created"), "VM is not created");
        assert_eq!(error_message(b""), "(empty body)");
    }
}
