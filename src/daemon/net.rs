//! Plugs the kernel datapath (`network::Datapath`) into the core's
//! [`HostNet`]: leases become [`NicWiring`]s (alias
//! `metald:<host id>:<nic id>`), and a host where networking cannot work
//! still starts, refusing managed NICs with the reason and the fix.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use tracing::{info, warn};

use crate::core::{HostNet, NetHandle};
use crate::model::net::{NetLease, Pools};
use crate::model::{BackendKind, VmId};
use crate::network::{ALIAS_PREFIX, Datapath, NetError, NetSettings, NicLimits, NicWiring, PortWiring, parse_mac};

/// Host networking as the core sees it.
pub struct KernelNet {
    pools: Pools,
    dns: Vec<IpAddr>,
    dp: Result<Arc<Datapath>, String>,
    /// The host enforces NICs' rate limits (the hypervisor has no limiter).
    host_limits: bool,
}

/// Whether the host must enforce NIC rate limits for `backend`: Firecracker
/// and Cloud Hypervisor get them in their own limiters (`backend::restvmm`),
/// QEMU has none (and the fake backend stands in for any hypervisor).
/// Enforcing them twice would also take away the VMMs' one-time burst.
pub fn host_enforces_limits(backend: BackendKind) -> bool {
    match backend {
        BackendKind::Qemu | BackendKind::Fake => true,
        BackendKind::Firecracker | BackendKind::CloudHypervisor => false,
    }
}

impl KernelNet {
    /// Starts the datapath per `settings` for VMs of `backend`: `None` when
    /// networking is off, else a handle that works or says why it cannot.
    pub async fn start(settings: &NetSettings, backend: BackendKind) -> (NetHandle, Option<Arc<KernelNet>>) {
        if !settings.enabled {
            info!("host networking is off (UNKEY_METALD_NETWORK_ENABLED=false): only operator TAPs");
            return (NetHandle(None), None);
        }
        let dp = match Datapath::start(settings.clone()).await {
            Ok(dp) => {
                info!(
                    ipv4_pool = ?settings.ipv4_pool,
                    ipv6_pool = ?settings.ipv6_pool,
                    table = %settings.table,
                    "host networking ready"
                );
                Ok(dp)
            }
            Err(e @ NetError::Unavailable { .. }) => {
                warn!(error = %e, "host networking is unavailable; VMs with managed NICs are refused");
                Err(e.to_string())
            }
            Err(e) => {
                warn!(error = %e, "host networking could not start; VMs with managed NICs are refused");
                Err(e.to_string())
            }
        };
        let host_limits = host_enforces_limits(backend);
        let net = Arc::new(KernelNet { pools: settings.pools(), dns: settings.dns.clone(), dp, host_limits });
        (NetHandle(Some(net.clone())), Some(net))
    }

    /// Why networking is unavailable, for `/_/health`.
    pub fn problem(&self) -> Option<&str> {
        self.dp.as_ref().err().map(String::as_str)
    }

    fn dp(&self) -> Result<&Arc<Datapath>, String> {
        self.dp.as_ref().map_err(Clone::clone)
    }
}

/// `lease`'s NICs as the kernel needs them; their rate limits only when
/// `host_limits` (see [`host_enforces_limits`]).
pub fn wiring(vm: &VmId, lease: &NetLease, host_limits: bool) -> Vec<NicWiring> {
    lease
        .nics
        .iter()
        .map(|n| NicWiring {
            tap: n.tap.clone(),
            alias: format!("{ALIAS_PREFIX}{vm}:{}", n.nic_id),
            guest_mac: parse_mac(&n.mac).unwrap_or([2, 0, 0, 0, 0, 0]),
            ipv4: n.ipv4,
            ipv6: n.ipv6,
            tag: lease.tag,
            ports: n
                .ports
                .iter()
                .map(|p| PortWiring { proto: p.proto, host_port: p.host_port, guest_port: p.guest_port })
                .collect(),
            owner: None,
            limits: if host_limits {
                NicLimits::from_spec(n.rates.rx.as_ref(), n.rates.tx.as_ref())
            } else {
                NicLimits::default()
            },
        })
        .collect()
}

#[async_trait::async_trait]
impl HostNet for KernelNet {
    fn pools(&self) -> &Pools {
        &self.pools
    }

    fn dns(&self) -> &[IpAddr] {
        &self.dns
    }

    fn unavailable(&self) -> Option<String> {
        self.problem().map(str::to_owned)
    }

    async fn add(&self, vm: &VmId, lease: &NetLease) -> Result<(), String> {
        let dp = self.dp()?;
        for nic in wiring(vm, lease, self.host_limits) {
            dp.add(&nic).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn remove(&self, vm: &VmId, lease: &NetLease) -> Result<(), String> {
        let dp = self.dp()?;
        for nic in wiring(vm, lease, self.host_limits) {
            dp.remove(&nic).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn counters(&self, taps: &[String]) -> Option<(u64, u64, u64, u64)> {
        let all = self.dp.as_ref().ok()?.counters();
        let mut sum = (0, 0, 0, 0);
        for t in taps {
            let c = all.get(t)?;
            sum = (sum.0 + c.rx_bytes, sum.1 + c.tx_bytes, sum.2 + c.rx_packets, sum.3 + c.tx_packets);
        }
        Some(sum)
    }

    async fn rebuild(&self, all: &BTreeMap<VmId, NetLease>) -> Result<String, String> {
        let dp = self.dp()?;
        let nics: Vec<NicWiring> = all.iter().flat_map(|(vm, l)| wiring(vm, l, self.host_limits)).collect();
        let r = dp.rebuild(&nics).await.map_err(|e| e.to_string())?;
        Ok(format!("{} NICs, {} TAPs made, {} stray TAPs removed", r.nics, r.taps_created, r.taps_removed))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::RateLimit;
    use crate::model::net::{NicLease, NicRates};

    #[test]
    fn rate_limits_are_wired_only_where_the_hypervisor_has_no_limiter() {
        let rl = RateLimit { bandwidth: 65536, refill_time_ms: 0, burst: 0 };
        let lease = NetLease {
            tag: 1,
            nics: vec![NicLease {
                nic_id: "eth0".into(),
                tap: "mt-0000000a".into(),
                mac: "02:00:00:00:00:0a".into(),
                ipv4: None,
                ipv6: None,
                ports: vec![],
                rates: NicRates { rx: Some(rl), tx: None },
            }],
        };
        let vm = VmId::parse("vm").unwrap();
        let host = wiring(&vm, &lease, true);
        assert_eq!(host[0].limits, NicLimits::from_spec(Some(&rl), None));
        assert!(host[0].limits.rx.is_some());
        assert_eq!(wiring(&vm, &lease, false)[0].limits, NicLimits::default());
        assert!(host_enforces_limits(BackendKind::Qemu) && host_enforces_limits(BackendKind::Fake));
        assert!(!host_enforces_limits(BackendKind::Firecracker) && !host_enforces_limits(BackendKind::CloudHypervisor));
    }
}
