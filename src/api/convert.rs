//! Wire ⇄ domain conversions for `vmprovisioner.v1`. No logic beyond mapping.

use std::collections::BTreeMap;
use std::path::PathBuf;

use buffa::{EnumValue, MessageField};

use crate::core::{LiveMetrics, VmDetails, VmView};
use crate::error::Error;
use crate::model::{
    BootSpec, ConsoleSpec, CpuSpec, DiskSpec, Ipv4Spec, Ipv6Spec, MemorySpec, NicSpec, PortSpec, RateLimit, Topology,
    VmSpec,
};
use crate::model::{ImageSpec, RegistryAuth, StopInfo, StopReason, VmState, WorkloadExit};
use crate::pb::vmprovisioner::v1 as pb;

type PbMap = buffa::__private::HashMap<String, String>;

fn map_in(m: &PbMap) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn map_out(m: &BTreeMap<String, String>) -> PbMap {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn path_in(s: &str) -> Option<PathBuf> {
    if s.is_empty() { None } else { Some(PathBuf::from(s)) }
}

fn path_out(p: &std::path::Path) -> String {
    p.display().to_string()
}

pub fn state_out(s: VmState) -> pb::VmState {
    match s {
        VmState::Created => pb::VmState::VM_STATE_CREATED,
        VmState::Running => pb::VmState::VM_STATE_RUNNING,
        VmState::Paused => pb::VmState::VM_STATE_PAUSED,
        VmState::Shutdown => pb::VmState::VM_STATE_SHUTDOWN,
        VmState::Suspended => pb::VmState::VM_STATE_SUSPENDED,
    }
}

/// A state filter value from the wire; unspecified or unknown is an error.
pub fn state_in(v: &EnumValue<pb::VmState>) -> Result<VmState, Error> {
    match v.as_known() {
        Some(pb::VmState::VM_STATE_CREATED) => Ok(VmState::Created),
        Some(pb::VmState::VM_STATE_RUNNING) => Ok(VmState::Running),
        Some(pb::VmState::VM_STATE_PAUSED) => Ok(VmState::Paused),
        Some(pb::VmState::VM_STATE_SHUTDOWN) => Ok(VmState::Shutdown),
        Some(pb::VmState::VM_STATE_SUSPENDED) => Ok(VmState::Suspended),
        Some(pb::VmState::VM_STATE_UNSPECIFIED) | None => Err(Error::invalid(
            "state_filter",
            format!("{} is not a VM state; use CREATED, RUNNING, PAUSED, SHUTDOWN or SUSPENDED", v.to_i32()),
        )),
    }
}

fn i32_to_i64(v: i32) -> i64 {
    i64::from(v)
}

fn i64_to_i32(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn rate_in(r: &MessageField<pb::RateLimit, buffa::Inline<pb::RateLimit>>) -> Option<RateLimit> {
    r.as_option().map(|r| RateLimit { bandwidth: r.bandwidth, refill_time_ms: r.refill_time, burst: r.burst })
}

fn rate_out(r: &Option<RateLimit>) -> MessageField<pb::RateLimit, buffa::Inline<pb::RateLimit>> {
    r.map(|r| pb::RateLimit {
        bandwidth: r.bandwidth,
        refill_time: r.refill_time_ms,
        burst: r.burst,
        ..Default::default()
    })
    .into()
}

/// Wire config → domain spec, as given (validation happens in the core).
pub fn spec_in(c: &pb::VmConfig) -> VmSpec {
    let cpu = c.cpu.as_option().map(|cpu| CpuSpec {
        vcpus: i32_to_i64(cpu.vcpu_count),
        max_vcpus: i32_to_i64(cpu.max_vcpu_count),
        topology: cpu.topology.as_option().map(|t| Topology {
            sockets: i32_to_i64(t.sockets),
            cores_per_socket: i32_to_i64(t.cores_per_socket),
            threads_per_core: i32_to_i64(t.threads_per_core),
        }),
        features: map_in(&cpu.features),
    });
    let memory = c.memory.as_option().map(|m| MemorySpec {
        size_bytes: m.size_bytes,
        hotplug: m.hotplug_enabled,
        max_size_bytes: m.max_size_bytes,
        backing: map_in(&m.backing),
    });
    let boot = c.boot.as_option().map(|b| BootSpec {
        kernel: PathBuf::from(&b.kernel_path),
        initrd: path_in(&b.initrd_path),
        kernel_args: b.kernel_args.clone(),
        options: map_in(&b.boot_options),
    });
    VmSpec {
        cpu: cpu.unwrap_or_default(),
        memory: memory.unwrap_or_default(),
        boot: boot.unwrap_or_default(),
        storage: c
            .storage
            .iter()
            .map(|d| DiskSpec {
                id: d.id.clone(),
                path: PathBuf::from(&d.path),
                read_only: d.read_only,
                is_root: d.is_root_device,
                interface: d.interface_type.clone(),
                options: map_in(&d.options),
            })
            .collect(),
        network: c
            .network
            .iter()
            .map(|n| NicSpec {
                id: n.id.clone(),
                mac: n.mac_address.clone(),
                tap: n.tap_device.clone(),
                interface: n.interface_type.clone(),
                options: map_in(&n.options),
                ipv4: n.ipv4_config.as_option().map(|v| Ipv4Spec {
                    address: v.address.clone(),
                    netmask: v.netmask.clone(),
                    gateway: v.gateway.clone(),
                    dns_servers: v.dns_servers.clone(),
                    dhcp: v.dhcp,
                }),
                ipv6: n.ipv6_config.as_option().map(|v| Ipv6Spec {
                    address: v.address.clone(),
                    prefix_length: i32_to_i64(v.prefix_length),
                    gateway: v.gateway.clone(),
                    dns_servers: v.dns_servers.clone(),
                    slaac: v.slaac,
                    privacy_extensions: v.privacy_extensions,
                    link_local: v.link_local.clone(),
                }),
                mode: n.mode.to_i32(),
                rx_rate_limit: rate_in(&n.rx_rate_limit),
                tx_rate_limit: rate_in(&n.tx_rate_limit),
                managed: false,
                ports: ports_in(&n.port_mappings),
            })
            .collect(),
        console: c.console.as_option().map(|c| ConsoleSpec {
            enabled: c.enabled,
            output: c.output.clone(),
            input: c.input.clone(),
            console_type: c.console_type.clone(),
        }),
        metadata: map_in(&c.metadata),
        image: c.image.as_option().map(|i| ImageSpec {
            reference: i.reference.clone(),
            env: map_in(&i.env),
            entrypoint: i.entrypoint.clone(),
            cmd: i.cmd.clone(),
            digest: String::new(),
            credentials: i
                .credentials
                .as_option()
                .map(|c| RegistryAuth { username: c.username.clone(), password: c.password.clone() }),
        }),
    }
}

/// Domain spec → wire config.
pub fn spec_out(s: &VmSpec) -> pb::VmConfig {
    pb::VmConfig {
        cpu: pb::CpuConfig {
            vcpu_count: i64_to_i32(s.cpu.vcpus),
            max_vcpu_count: i64_to_i32(s.cpu.max_vcpus),
            topology: s
                .cpu
                .topology
                .map(|t| pb::CpuTopology {
                    sockets: i64_to_i32(t.sockets),
                    cores_per_socket: i64_to_i32(t.cores_per_socket),
                    threads_per_core: i64_to_i32(t.threads_per_core),
                    ..Default::default()
                })
                .into(),
            features: map_out(&s.cpu.features),
            ..Default::default()
        }
        .into(),
        memory: pb::MemoryConfig {
            size_bytes: s.memory.size_bytes,
            hotplug_enabled: s.memory.hotplug,
            max_size_bytes: s.memory.max_size_bytes,
            backing: map_out(&s.memory.backing),
            ..Default::default()
        }
        .into(),
        boot: pb::BootConfig {
            kernel_path: path_out(&s.boot.kernel),
            initrd_path: s.boot.initrd.as_deref().map(path_out).unwrap_or_default(),
            kernel_args: s.boot.kernel_args.clone(),
            boot_options: map_out(&s.boot.options),
            ..Default::default()
        }
        .into(),
        storage: s
            .storage
            .iter()
            .map(|d| pb::StorageDevice {
                id: d.id.clone(),
                path: path_out(&d.path),
                read_only: d.read_only,
                is_root_device: d.is_root,
                interface_type: d.interface.clone(),
                options: map_out(&d.options),
                ..Default::default()
            })
            .collect(),
        network: s
            .network
            .iter()
            .map(|n| pb::NetworkInterface {
                id: n.id.clone(),
                mac_address: n.mac.clone(),
                tap_device: n.tap.clone(),
                interface_type: n.interface.clone(),
                options: map_out(&n.options),
                ipv4_config: n
                    .ipv4
                    .as_ref()
                    .map(|v| pb::IPv4Config {
                        address: v.address.clone(),
                        netmask: v.netmask.clone(),
                        gateway: v.gateway.clone(),
                        dns_servers: v.dns_servers.clone(),
                        dhcp: v.dhcp,
                        ..Default::default()
                    })
                    .into(),
                ipv6_config: n
                    .ipv6
                    .as_ref()
                    .map(|v| pb::IPv6Config {
                        address: v.address.clone(),
                        prefix_length: i64_to_i32(v.prefix_length),
                        gateway: v.gateway.clone(),
                        dns_servers: v.dns_servers.clone(),
                        slaac: v.slaac,
                        privacy_extensions: v.privacy_extensions,
                        link_local: v.link_local.clone(),
                        ..Default::default()
                    })
                    .into(),
                mode: EnumValue::from(n.mode),
                rx_rate_limit: rate_out(&n.rx_rate_limit),
                tx_rate_limit: rate_out(&n.tx_rate_limit),
                port_mappings: ports_out(&n.ports),
                ..Default::default()
            })
            .collect(),
        console: s
            .console
            .as_ref()
            .map(|c| pb::ConsoleConfig {
                enabled: c.enabled,
                output: c.output.clone(),
                input: c.input.clone(),
                console_type: c.console_type.clone(),
                ..Default::default()
            })
            .into(),
        metadata: map_out(&s.metadata),
        // Credentials are never returned.
        image: s
            .image
            .as_ref()
            .map(|i| pb::ContainerImage {
                reference: i.reference.clone(),
                env: map_out(&i.env),
                entrypoint: i.entrypoint.clone(),
                cmd: i.cmd.clone(),
                digest: i.digest.clone(),
                ..Default::default()
            })
            .into(),
        ..Default::default()
    }
}

fn u64_to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn metrics_out(m: &LiveMetrics) -> pb::VmMetrics {
    let u = &m.usage;
    pb::VmMetrics {
        cpu_usage_percent: m.cpu_percent,
        memory_usage_bytes: u64_to_i64(u.memory_bytes),
        network_stats: pb::NetworkStats {
            bytes_received: u64_to_i64(u.net_rx_bytes),
            bytes_transmitted: u64_to_i64(u.net_tx_bytes),
            packets_received: u64_to_i64(u.net_rx_packets),
            packets_transmitted: u64_to_i64(u.net_tx_packets),
            ..Default::default()
        }
        .into(),
        storage_stats: pb::StorageStats {
            bytes_read: u64_to_i64(u.disk_read_bytes),
            bytes_written: u64_to_i64(u.disk_write_bytes),
            read_operations: u64_to_i64(u.disk_read_ops),
            write_operations: u64_to_i64(u.disk_write_ops),
            ..Default::default()
        }
        .into(),
        uptime_seconds: m.uptime_secs,
        ..Default::default()
    }
}

fn ports_out(ports: &[PortSpec]) -> Vec<pb::PortMapping> {
    ports
        .iter()
        .map(|p| pb::PortMapping {
            protocol: p.protocol.clone(),
            host_port: i64_to_i32(p.host_port),
            guest_port: i64_to_i32(p.guest_port),
            ..Default::default()
        })
        .collect()
}

/// Network facts of every interface (for a metald-managed one, what it
/// leased: the spec holds it since create).
fn networks_out(d: &VmDetails) -> Vec<pb::VmNetworkInfo> {
    let extra = d.view.status.runtime().map(|rt| &rt.extra);
    d.view
        .spec
        .network
        .iter()
        .map(|nic| {
            let fact = |key: &str, fallback: &str| {
                extra.and_then(|e| e.get(&format!("{key}.{}", nic.id))).cloned().unwrap_or_else(|| fallback.to_owned())
            };
            let (v4, v6) = (nic.ipv4.as_ref(), nic.ipv6.as_ref());
            let prefix4 = v4
                .and_then(|v| v.netmask.parse::<std::net::Ipv4Addr>().ok())
                .map_or(0, |m| i32::try_from(u32::from(m).count_ones()).unwrap_or(0));
            let mut dns: Vec<String> = v4.map(|v| v.dns_servers.clone()).unwrap_or_default();
            dns.extend(v6.map(|v| v.dns_servers.clone()).unwrap_or_default());
            pb::VmNetworkInfo {
                ip_address: v4.map(|v| v.address.clone()).unwrap_or_default(),
                mac_address: fact("mac", &nic.mac),
                tap_device: fact("tap", &nic.tap),
                network_namespace: fact("netns", ""),
                gateway: v4.map(|v| v.gateway.clone()).unwrap_or_default(),
                dns_servers: dns,
                ipv6_address: v6.map(|v| v.address.clone()).unwrap_or_default(),
                ipv6_gateway: v6.map(|v| v.gateway.clone()).unwrap_or_default(),
                port_mappings: ports_out(&nic.ports),
                interface_id: nic.id.clone(),
                ipv4_prefix_length: prefix4,
                ipv6_prefix_length: v6.map_or(0, |v| i64_to_i32(v.prefix_length)),
                ..Default::default()
            }
        })
        .collect()
}

/// Port mappings from the wire (checked by validation, or by the clone).
pub fn ports_in(ports: &[pb::PortMapping]) -> Vec<PortSpec> {
    ports
        .iter()
        .map(|p| PortSpec {
            protocol: p.protocol.clone(),
            host_port: i64::from(p.host_port),
            guest_port: i64::from(p.guest_port),
        })
        .collect()
}

/// A snapshot as the API shows it.
pub fn snapshot_out(s: &crate::model::SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        name: s.name.to_string(),
        source_vm_id: s.source.to_string(),
        size_bytes: i64::try_from(s.size_bytes).unwrap_or(i64::MAX),
        created_timestamp: s.created_at,
        hypervisor: s.backend.clone(),
        vcpu_count: i64_to_i32(s.spec.cpu.vcpus),
        memory_size_bytes: s.spec.memory.size_bytes,
        ..Default::default()
    }
}

pub fn info_out(d: &VmDetails) -> pb::GetVmInfoResponse {
    let networks = networks_out(d);
    pb::GetVmInfoResponse {
        vm_id: d.view.id.to_string(),
        config: spec_out(&d.view.spec).into(),
        state: state_out(d.view.state()).into(),
        metrics: d.metrics.as_ref().map(metrics_out).into(),
        backend_info: map_out(&d.backend_info),
        network_info: networks.first().cloned().into(),
        network_interfaces: networks,
        operation_in_progress: d.view.pending.map(|p| p.op.to_owned()).unwrap_or_default(),
        operation_started_timestamp: d.view.pending.map(|p| p.since).unwrap_or(0),
        state_reconciling: d.view.reconciling,
        snapshot_size_bytes: i64::try_from(d.saved_bytes).unwrap_or(i64::MAX),
        workload_exit: d
            .workload_exit
            .map(|e| match e {
                WorkloadExit::Code(code) => pb::WorkloadExit { code, ..Default::default() },
                WorkloadExit::Signal(signal) => pb::WorkloadExit { signal, ..Default::default() },
            })
            .into(),
        stop: d.view.stopped.as_ref().map(stop_out).into(),
        ..Default::default()
    }
}

fn stop_out(s: &StopInfo) -> pb::VmStop {
    let reason = match s.reason {
        StopReason::Requested => pb::StopReason::STOP_REASON_REQUESTED,
        StopReason::GuestPowerOff => pb::StopReason::STOP_REASON_GUEST_POWER_OFF,
        StopReason::Crashed => pb::StopReason::STOP_REASON_CRASHED,
        StopReason::Killed => pb::StopReason::STOP_REASON_KILLED,
        StopReason::OutOfMemory => pb::StopReason::STOP_REASON_OUT_OF_MEMORY,
        StopReason::Unknown => pb::StopReason::STOP_REASON_UNKNOWN,
    };
    pb::VmStop { reason: reason.into(), detail: s.detail.clone(), stopped_timestamp: s.at, ..Default::default() }
}

pub fn summary_out(v: &VmView) -> pb::VmInfo {
    pb::VmInfo {
        vm_id: v.id.to_string(),
        state: state_out(v.state()).into(),
        vcpu_count: i64_to_i32(v.spec.cpu.vcpus),
        memory_size_bytes: v.spec.memory.size_bytes,
        created_timestamp: v.created_at,
        modified_timestamp: v.modified_at,
        metadata: map_out(&v.spec.metadata),
        customer_id: v.customer.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_through_the_domain() {
        let mut wire = pb::VmConfig {
            cpu: pb::CpuConfig {
                vcpu_count: 2,
                max_vcpu_count: 4,
                topology: pb::CpuTopology {
                    sockets: 1,
                    cores_per_socket: 2,
                    threads_per_core: 2,
                    ..Default::default()
                }
                .into(),
                ..Default::default()
            }
            .into(),
            memory: pb::MemoryConfig { size_bytes: 256 << 20, ..Default::default() }.into(),
            boot: pb::BootConfig {
                kernel_path: "/a/k".into(),
                initrd_path: "/a/i".into(),
                kernel_args: "console=ttyS0".into(),
                ..Default::default()
            }
            .into(),
            storage: vec![pb::StorageDevice {
                id: "root".into(),
                path: "/a/r".into(),
                is_root_device: true,
                ..Default::default()
            }],
            network: vec![pb::NetworkInterface {
                id: "eth0".into(),
                mode: pb::NetworkMode::NETWORK_MODE_IPV4_ONLY.into(),
                rx_rate_limit: pb::RateLimit { bandwidth: 10, refill_time: 100, burst: 5, ..Default::default() }.into(),
                ipv4_config: pb::IPv4Config { address: "10.0.0.2".into(), ..Default::default() }.into(),
                ..Default::default()
            }],
            console: pb::ConsoleConfig { enabled: true, ..Default::default() }.into(),
            ..Default::default()
        };
        wire.metadata.insert("team".into(), "a".into());
        let back = spec_out(&spec_in(&wire));
        assert_eq!(back, wire);
    }

    #[test]
    fn unspecified_state_filter_is_rejected() {
        assert!(state_in(&EnumValue::from(pb::VmState::VM_STATE_UNSPECIFIED)).is_err());
        assert!(state_in(&EnumValue::<pb::VmState>::from(42)).is_err());
        assert_eq!(state_in(&EnumValue::from(pb::VmState::VM_STATE_PAUSED)).unwrap(), VmState::Paused);
    }
}
