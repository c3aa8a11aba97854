//! Plugs the kernel datapath (`network::Datapath`) into the core's
//! [`HostNet`]: leases become [`NicWiring`]s (alias
//! `metald:<host id>:<nic id>`), and a host where networking cannot work
//! still starts, refusing managed NICs with the reason and the fix.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use tracing::{info, warn};

use crate::backend::firecracker::config::FirecrackerSettings;
use crate::core::{HostNet, NetHandle, TapCounters};
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
    taps: TapPolicy,
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

/// What the chosen backend needs of the TAPs of managed NICs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapPolicy {
    /// The (uid, gid) that opens the TAPs when it is not root: the
    /// jailer's, whose Firecracker attaches to its TAP without
    /// `CAP_NET_ADMIN` (the kernel lets a TAP's owner do that).
    pub owner: Option<(u32, u32)>,
    /// Why managed NICs cannot work with the backend's settings, and what
    /// to change.
    pub refuse: Option<String>,
}

impl TapPolicy {
    /// The policy for `kind` with `fc`'s jailer settings: a jailed
    /// Firecracker's TAPs are owned by the jailer's uid/gid; one the jailer
    /// moves into a network namespace of its own cannot see metald's
    /// routed TAPs in the host namespace, so managed NICs are refused.
    pub fn for_backend(kind: BackendKind, fc: &FirecrackerSettings) -> TapPolicy {
        let Some(j) = fc.jailer.as_ref().filter(|_| kind == BackendKind::Firecracker) else {
            return TapPolicy::default();
        };
        TapPolicy {
            owner: (j.uid != 0 || j.gid != 0).then_some((j.uid, j.gid)),
            refuse: j.netns.as_ref().map(|ns| {
                format!(
                    "the jailer runs Firecracker in network namespace {ns} (UNKEY_METALD_JAILER_NETNS), and the \
                     TAPs of metald-managed NICs live in metald's own namespace: unset UNKEY_METALD_JAILER_NETNS, \
                     or give each NIC a tap_device that exists in that namespace"
                )
            }),
        }
    }
}

impl KernelNet {
    /// Starts the datapath per `settings` for VMs of `backend`, their TAPs
    /// as `taps` says: `None` when networking is off, else a handle that
    /// works or says why it cannot.
    pub async fn start(
        settings: &NetSettings,
        backend: BackendKind,
        taps: TapPolicy,
    ) -> (NetHandle, Option<Arc<KernelNet>>) {
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
        if let Some(why) = &taps.refuse {
            warn!(reason = %why, "VMs with managed NICs are refused");
        }
        let host_limits = host_enforces_limits(backend);
        let net = Arc::new(KernelNet { pools: settings.pools(), dns: settings.dns.clone(), dp, host_limits, taps });
        (NetHandle(Some(net.clone())), Some(net))
    }

    /// Why networking is unavailable, for `/_/health`.
    pub fn problem(&self) -> Option<&str> {
        self.dp.as_ref().err().or(self.taps.refuse.as_ref()).map(String::as_str)
    }

    fn dp(&self) -> Result<&Arc<Datapath>, String> {
        self.dp.as_ref().map_err(Clone::clone)
    }
}

/// `lease`'s NICs as the kernel needs them: their TAPs owned by `owner`,
/// their rate limits only when `host_limits` (see [`host_enforces_limits`]).
pub fn wiring(vm: &VmId, lease: &NetLease, owner: Option<(u32, u32)>, host_limits: bool) -> Vec<NicWiring> {
    lease
        .nics
        .iter()
        .map(|n| NicWiring {
            tap: n.tap.clone(),
            alias: format!("{ALIAS_PREFIX}{vm}:{}", n.nic_id),
            guest_mac: parse_mac(&n.mac).unwrap_or([2, 0, 0, 0, 0, 0]),
            ipv4: n.ipv4,
            ipv6: n.ipv6,
            inner: n.inner,
            tag: lease.tag,
            ports: n
                .ports
                .iter()
                .map(|p| PortWiring { proto: p.proto, host_port: p.host_port, guest_port: p.guest_port })
                .collect(),
            owner,
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
        if let Some(why) = &self.taps.refuse {
            return Err(why.clone());
        }
        let dp = self.dp()?;
        for nic in wiring(vm, lease, self.taps.owner, self.host_limits) {
            dp.add(&nic).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn remove(&self, vm: &VmId, lease: &NetLease) -> Result<(), String> {
        let dp = self.dp()?;
        for nic in wiring(vm, lease, self.taps.owner, self.host_limits) {
            dp.remove(&nic).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn tap_counters(&self) -> Option<TapCounters> {
        let all = self.dp.as_ref().ok()?.counters();
        Some(all.into_iter().map(|(t, c)| (t, (c.rx_bytes, c.tx_bytes, c.rx_packets, c.tx_packets))).collect())
    }

    async fn rebuild(&self, all: &BTreeMap<VmId, NetLease>) -> Result<String, String> {
        let dp = self.dp()?;
        let nics: Vec<NicWiring> =
            all.iter().flat_map(|(vm, l)| wiring(vm, l, self.taps.owner, self.host_limits)).collect();
        let r = dp.rebuild(&nics).await.map_err(|e| e.to_string())?;
        Ok(format!("{} NICs, {} TAPs made, {} stray TAPs removed", r.nics, r.taps_created, r.taps_removed))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backend::firecracker::config::JailerSettings;
    use crate::model::RateLimit;
    use crate::model::net::{NicLease, NicRates};

    #[test]
    fn a_jailed_firecracker_owns_its_taps_and_its_own_namespace_is_refused() {
        let mut fc = FirecrackerSettings::default();
        assert_eq!(TapPolicy::for_backend(BackendKind::Firecracker, &fc), TapPolicy::default());
        fc.jailer = Some(JailerSettings { uid: 123, gid: 456, ..JailerSettings::default() });
        let p = TapPolicy::for_backend(BackendKind::Firecracker, &fc);
        assert_eq!((p.owner, p.refuse), (Some((123, 456)), None));
        // The jailer's settings matter only to Firecracker.
        assert_eq!(TapPolicy::for_backend(BackendKind::Qemu, &fc), TapPolicy::default());
        // A root jailer needs no owner.
        fc.jailer = Some(JailerSettings::default());
        assert_eq!(TapPolicy::for_backend(BackendKind::Firecracker, &fc).owner, None);
        fc.jailer = Some(JailerSettings { netns: Some("/var/run/netns/{vm_id}".into()), ..JailerSettings::default() });
        let why = TapPolicy::for_backend(BackendKind::Firecracker, &fc).refuse.unwrap();
        assert!(why.contains("UNKEY_METALD_JAILER_NETNS") && why.contains("tap_device"), "{why}");
    }

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
                inner: Default::default(),
            }],
        };
        let vm = VmId::parse("vm").unwrap();
        let host = wiring(&vm, &lease, None, true);
        assert_eq!(host[0].limits, NicLimits::from_spec(Some(&rl), None));
        assert!(host[0].limits.rx.is_some());
        assert_eq!(wiring(&vm, &lease, None, false)[0].limits, NicLimits::default());
        assert!(host_enforces_limits(BackendKind::Qemu) && host_enforces_limits(BackendKind::Fake));
        assert!(!host_enforces_limits(BackendKind::Firecracker) && !host_enforces_limits(BackendKind::CloudHypervisor));
    }
}
