//! Typed request and response bodies of Firecracker's REST API, written from
//! its OpenAPI description (`src/firecracker/swagger/firecracker.yaml`,
//! Firecracker v1.10+; the snapshot endpoints as of v1.16). Only the endpoints metald uses are modelled; field
//! names and optionality follow the definitions there (Firecracker rejects
//! unknown fields, so optional fields are omitted rather than sent as null).

use serde::{Deserialize, Serialize};

pub use crate::backend::restvmm::{RateLimiter, TokenBucket};

/// `PUT /machine-config` (`MachineConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    /// 1..=32; with SMT only 1 or even.
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
}

/// `PUT /boot-source` (`BootSource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub initrd_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}` (`Drive`, virtio-block flavour).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}` (`NetworkInterface`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guest_mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /actions` (`InstanceActionInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    /// x86 only: a Ctrl+Alt+Del keypress; with `reboot=k` the guest's
    /// reboot ends the Firecracker process.
    SendCtrlAltDel,
}

/// `PATCH /vm` (`Vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub state: VmRunState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmRunState {
    Paused,
    Resumed,
}

/// `GET /` (`InstanceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    pub vmm_version: String,
}

/// `GET /vm/config` (`FullVmConfiguration`), the parts metald checks.
/// Of each device only its id and backing file or TAP are read: the other
/// optional fields differ between versions and device flavours.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct FullVmConfiguration {
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfiguration>,
    #[serde(default)]
    pub drives: Vec<ConfiguredDrive>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<ConfiguredNic>,
}

/// A drive of [`FullVmConfiguration`] (`Drive`): its id and file (absent
/// for vhost-user drives).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfiguredDrive {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
}

/// A NIC of [`FullVmConfiguration`] (`NetworkInterface`): id and TAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfiguredNic {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `PATCH /drives/{drive_id}` (`PartialDrive`): post-boot (and after a
/// snapshot load) the drive's backing file can be swapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path_on_host: Option<String>,
}

/// `PUT /snapshot/create` (`SnapshotCreateParams`): the microVM must be
/// `Paused`; Firecracker writes both files itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    /// The guest memory.
    pub mem_file_path: String,
    /// The microVM (device, vCPU, KVM) state.
    pub snapshot_path: String,
    pub snapshot_type: SnapshotType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/load` (`SnapshotLoadParams`): only on a fresh process,
/// before any configuration but the logger and metrics. The microVM is
/// `Paused` afterwards unless `resume_vm`. On failure Firecracker exits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    pub mem_backend: MemoryBackend,
    pub resume_vm: bool,
    /// TAP devices that replace the saved ones (Firecracker v1.12+).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub network_overrides: Vec<NetworkOverride>,
}

/// `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    /// `File`: the memory file, mapped `MAP_PRIVATE` for the life of the
    /// restored microVM (it must not change meanwhile).
    pub backend_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

/// `NetworkOverride`: the TAP a restored interface is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `Error`: the body of every 4xx/5xx answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    pub fault_message: String,
}

/// The message of an error body: `fault_message` when present, else the
/// raw text.
pub fn fault_message(body: &[u8]) -> String {
    match serde_json::from_slice::<Fault>(body) {
        Ok(f) => f.fault_message,
        Err(_) => crate::backend::uds_http::text_error_body(body),
    }
}

/// One line of Firecracker's metrics output. Its counters are *increments
/// since the previous flush*, so totals are the sum over all lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsLine {
    #[serde(default)]
    pub block: BlockMetrics,
    #[serde(default)]
    pub net: NetMetrics,
}

/// Aggregate of all block devices (`"block"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMetrics {
    #[serde(default)]
    pub read_bytes: u64,
    #[serde(default)]
    pub write_bytes: u64,
    #[serde(default)]
    pub read_count: u64,
    #[serde(default)]
    pub write_count: u64,
}

/// Aggregate of all network devices (`"net"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMetrics {
    #[serde(default)]
    pub rx_bytes_count: u64,
    #[serde(default)]
    pub tx_bytes_count: u64,
    #[serde(default)]
    pub rx_packets_count: u64,
    #[serde(default)]
    pub tx_packets_count: u64,
}

impl MetricsLine {
    pub fn add(&mut self, o: &MetricsLine) {
        let b = &mut self.block;
        b.read_bytes = b.read_bytes.saturating_add(o.block.read_bytes);
        b.write_bytes = b.write_bytes.saturating_add(o.block.write_bytes);
        b.read_count = b.read_count.saturating_add(o.block.read_count);
        b.write_count = b.write_count.saturating_add(o.block.write_count);
        let n = &mut self.net;
        n.rx_bytes_count = n.rx_bytes_count.saturating_add(o.net.rx_bytes_count);
        n.tx_bytes_count = n.tx_bytes_count.saturating_add(o.net.tx_bytes_count);
        n.rx_packets_count = n.rx_packets_count.saturating_add(o.net.rx_packets_count);
        n.tx_packets_count = n.tx_packets_count.saturating_add(o.net.tx_packets_count);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::RateLimit;
    use serde_json::json;

    #[test]
    fn bodies_match_the_api_reference() {
        let d = Drive {
            drive_id: "rootfs".into(),
            path_on_host: "/r.ext4".into(),
            is_root_device: true,
            is_read_only: false,
            rate_limiter: None,
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true, "is_read_only": false})
        );
        let a = InstanceActionInfo { action_type: ActionType::SendCtrlAltDel };
        assert_eq!(serde_json::to_value(a).unwrap(), json!({"action_type": "SendCtrlAltDel"}));
        assert_eq!(serde_json::to_value(Vm { state: VmRunState::Paused }).unwrap(), json!({"state": "Paused"}));
        let rl = RateLimiter::from_spec(Some(&RateLimit { bandwidth: 1_000_000, refill_time_ms: 100, burst: 0 }));
        assert_eq!(serde_json::to_value(rl).unwrap(), json!({"bandwidth": {"size": 100_000, "refill_time": 100}}));
        assert_eq!(RateLimiter::from_spec(Some(&RateLimit::default())), None);
    }

    #[test]
    fn snapshot_bodies_match_the_api_reference() {
        let create = SnapshotCreateParams {
            mem_file_path: "/s/memory".into(),
            snapshot_path: "/s/vmstate".into(),
            snapshot_type: SnapshotType::Full,
        };
        assert_eq!(
            serde_json::to_value(&create).unwrap(),
            json!({"mem_file_path": "/s/memory", "snapshot_path": "/s/vmstate", "snapshot_type": "Full"})
        );
        let mut load = SnapshotLoadParams {
            snapshot_path: "/s/vmstate".into(),
            mem_backend: MemoryBackend { backend_type: MemoryBackendType::File, backend_path: "/s/memory".into() },
            resume_vm: false,
            network_overrides: Vec::new(),
        };
        assert_eq!(
            serde_json::to_value(&load).unwrap(),
            json!({"snapshot_path": "/s/vmstate", "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"},
                   "resume_vm": false}),
            "no network_overrides field unless one is needed (older versions reject it)"
        );
        load.network_overrides.push(NetworkOverride { iface_id: "eth0".into(), host_dev_name: "tap9".into() });
        assert_eq!(
            serde_json::to_value(&load).unwrap()["network_overrides"],
            json!([{"iface_id": "eth0", "host_dev_name": "tap9"}])
        );
        let patch = PartialDrive { drive_id: "root".into(), path_on_host: Some("drive-root".into()) };
        assert_eq!(serde_json::to_value(&patch).unwrap(), json!({"drive_id": "root", "path_on_host": "drive-root"}));
        // What v1.16 answers to GET /vm/config (abridged).
        let c: FullVmConfiguration = serde_json::from_value(json!({
            "drives": [{"drive_id": "root", "partuuid": null, "is_root_device": false, "cache_type": "Unsafe",
                        "is_read_only": false, "path_on_host": "drive-root", "rate_limiter": null,
                        "io_engine": "Sync", "socket": null}],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "smt": false, "track_dirty_pages": false,
                               "huge_pages": "None"},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": null}]
        }))
        .unwrap();
        assert_eq!(c.drives[0].path_on_host.as_deref(), Some("drive-root"));
        assert_eq!(c.network_interfaces[0].host_dev_name, "tap0");
    }

    #[test]
    fn faults_and_metrics_parse() {
        assert_eq!(fault_message(br#"{"fault_message": "bad drive"}"#), "bad drive");
        assert_eq!(fault_message(b"plain"), "plain");
        let line: MetricsLine = serde_json::from_str(
            r#"{"utc_timestamp_ms": 1, "block": {"read_bytes": 5, "write_count": 2}, "net": {"tx_bytes_count": 7}, "vcpu": {}}"#,
        )
        .unwrap();
        let mut total = MetricsLine::default();
        total.add(&line);
        total.add(&line);
        assert_eq!((total.block.read_bytes, total.block.write_count, total.net.tx_bytes_count), (10, 4, 14));
    }
}
