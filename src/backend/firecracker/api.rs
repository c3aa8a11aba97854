//! Typed request and response bodies of Firecracker's REST API, written from
//! its OpenAPI description (`src/firecracker/swagger/firecracker.yaml`,
//! Firecracker v1.10+). Only the endpoints metald uses are modelled; field
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

/// `PUT /logger` (`Logger`). The log file must exist (Firecracker does not
/// create it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    pub log_path: String,
    pub level: LogLevel,
    pub show_level: bool,
    pub show_log_origin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
}

/// `PUT /metrics` (`Metrics`). The file must exist; every flush appends one
/// JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub metrics_path: String,
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
/// Devices stay untyped: their optional fields differ between versions and
/// device flavours, and only their number is compared.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct FullVmConfiguration {
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfiguration>,
    #[serde(default)]
    pub drives: Vec<serde_json::Value>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<serde_json::Value>,
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct MetricsLine {
    #[serde(default)]
    pub block: BlockMetrics,
    #[serde(default)]
    pub net: NetMetrics,
}

/// Aggregate of all block devices (`"block"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
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
