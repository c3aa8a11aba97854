//! Host networking vocabulary: port mappings as requested ([`PortSpec`]),
//! what a metald-managed NIC asks of the address pools ([`NicRequest`]),
//! the pools themselves ([`Pools`]), and what the store hands out for it
//! ([`NicLease`]: TAP name, MAC, addresses, host ports), plus the checks of
//! the network part of a spec that need no pool (`check_nic`).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use super::invalid::Invalid;
use super::spec::{Ipv4Spec, Ipv6Spec, NicSpec, PortSpec, RateLimit, ValidSpec, VmSpec};

/// Port mappings one NIC may ask for.
pub const MAX_PORTS_PER_NIC: usize = 64;

/// `NetworkMode` wire values.
pub const MODE_DUAL_STACK: i32 = 1;
pub const MODE_IPV4_ONLY: i32 = 2;
pub const MODE_IPV6_ONLY: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "" | "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a NIC wants of one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want<A> {
    No,
    Any,
    Exactly(A),
}

/// A port mapping as the pools see it: `host_port` 0 means "allocate".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRequest {
    pub proto: Proto,
    pub host_port: u16,
    pub guest_port: u16,
}

/// A NIC's rate limits as requested: `rx` what the guest receives, `tx`
/// what it sends. Kept with its lease: where the hypervisor has no limiter
/// of its own, the host enforces them, and rebuilds them from the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicRates {
    pub rx: Option<RateLimit>,
    pub tx: Option<RateLimit>,
}

impl NicRates {
    pub fn is_none(&self) -> bool {
        self.rx.is_none() && self.tx.is_none()
    }
}

/// The addresses a clone's guest has inside (its snapshot's source's):
/// the host maps the clone's leased addresses to them 1:1 on its TAP
/// (docs/NETWORK.md, "Clones"). Empty for every other NIC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InGuest {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl InGuest {
    pub fn is_none(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

/// What one metald-managed NIC asks of the pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicRequest {
    pub nic_id: String,
    /// The guest's MAC (validation generated one when the request had none).
    pub mac: String,
    pub v4: Want<Ipv4Addr>,
    pub v6: Want<Ipv6Addr>,
    pub ports: Vec<PortRequest>,
    pub rates: NicRates,
    /// A clone's in-guest addresses.
    pub inner: InGuest,
}

/// A host port leased to a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortLease {
    pub proto: Proto,
    pub host_port: u16,
    pub guest_port: u16,
}

/// What the store handed out for one metald-managed NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicLease {
    pub nic_id: String,
    /// The host's TAP device (`mt-` + 8 hex digits).
    pub tap: String,
    pub mac: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub ports: Vec<PortLease>,
    /// The NIC's rate limits (from its spec).
    #[serde(default)]
    pub rates: NicRates,
    /// A clone's in-guest addresses (its leased ones are mapped to them).
    #[serde(default)]
    pub inner: InGuest,
}

/// Everything a VM leased: its customer's isolation tag and its NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetLease {
    /// The same for every VM of one customer, different across customers.
    pub tag: u32,
    pub nics: Vec<NicLease>,
}

/// The address pools and the host-port range (from the network settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pools {
    pub v4: Option<ipnet::Ipv4Net>,
    pub v6: Option<ipnet::Ipv6Net>,
    pub ports: RangeInclusive<u16>,
}

impl Pools {
    /// The guests' IPv4 gateway: the pool's first host address.
    pub fn gateway4(&self) -> Option<Ipv4Addr> {
        self.v4.map(|n| Ipv4Addr::from(u32::from(n.network()).wrapping_add(1)))
    }

    /// The guests' IPv6 gateway as the pool sees it (the pool's `::1`;
    /// guests route via `fe80::1` on their link).
    pub fn gateway6(&self) -> Option<Ipv6Addr> {
        self.v6.map(|n| Ipv6Addr::from(u128::from(n.network()).wrapping_add(1)))
    }

    /// Addresses a NIC may lease, lowest first: the pool without its
    /// network address, the gateway and (IPv4) the broadcast address.
    pub fn leasable4(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let (lo, hi) = self
            .v4
            .map_or((1, 0), |n| (u32::from(n.network()).saturating_add(2), u32::from(n.broadcast()).saturating_sub(1)));
        (lo..=hi).map(Ipv4Addr::from)
    }

    pub fn leasable6(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        let (lo, hi) =
            self.v6.map_or((1, 0), |n| (u128::from(n.network()).saturating_add(2), u128::from(n.broadcast())));
        (lo..=hi).map(Ipv6Addr::from)
    }

    /// Why `a` cannot be asked for explicitly, if it cannot.
    pub fn refuse4(&self, a: Ipv4Addr) -> Option<String> {
        let Some(net) = self.v4 else { return Some("IPv4 networking is off on this host".into()) };
        let n = u32::from(a);
        if !net.contains(&a) {
            Some(format!("{a} is outside the IPv4 pool {net} (UNKEY_METALD_NETWORK_IPV4_POOL)"))
        } else if n < u32::from(net.network()).saturating_add(2) || n >= u32::from(net.broadcast()) {
            Some(format!("{a} is the pool's network, gateway or broadcast address; pick another in {net}"))
        } else {
            None
        }
    }

    pub fn refuse6(&self, a: Ipv6Addr) -> Option<String> {
        let Some(net) = self.v6 else { return Some("IPv6 networking is off on this host".into()) };
        if !net.contains(&a) {
            Some(format!("{a} is outside the IPv6 pool {net} (UNKEY_METALD_NETWORK_IPV6_POOL)"))
        } else if u128::from(a) < u128::from(net.network()).saturating_add(2) {
            Some(format!("{a} is the pool's network or gateway address; pick another in {net}"))
        } else {
            None
        }
    }

    /// Why host port `p` cannot be asked for explicitly, if it cannot.
    pub fn refuse_port(&self, p: u16) -> Option<String> {
        (!self.ports.contains(&p)).then(|| {
            format!(
                "host port {p} is outside {}-{} (UNKEY_METALD_NETWORK_PORT_RANGE): ports outside it may belong to \
                 the host's own services",
                self.ports.start(),
                self.ports.end()
            )
        })
    }
}

/// A random locally administered unicast MAC (`02:…`).
pub fn random_mac() -> String {
    let b: [u8; 5] = rand::random();
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4])
}

/// Checks the network fields of `nic` (at `field`) that need no pool and
/// fills in what a managed NIC leaves out: `managed` (no `tap_device`), the
/// MAC, each mapping's protocol.
pub(super) fn check_nic(field: &str, nic: &mut NicSpec) -> Result<(), Invalid> {
    nic.managed = nic.tap.is_empty();
    if nic.mac.is_empty() {
        nic.mac = random_mac();
    }
    nic.mac.make_ascii_lowercase();
    if !matches!(nic.mode, 0 | MODE_DUAL_STACK | MODE_IPV4_ONLY | MODE_IPV6_ONLY) {
        return Err(Invalid::new(format!("{field}.mode"), format!("{} is not a NetworkMode", nic.mode)));
    }
    if !nic.managed {
        if !nic.ports.is_empty() {
            return Err(Invalid::new(
                format!("{field}.port_mappings"),
                "needs an interface metald manages: leave tap_device empty",
            ));
        }
        return Ok(());
    }
    if let Some(v4) = &nic.ipv4
        && !v4.address.is_empty()
    {
        if v4.address.parse::<Ipv4Addr>().is_err() {
            return Err(Invalid::new(
                format!("{field}.ipv4_config.address"),
                format!("{:?} is not an IPv4 address", v4.address),
            ));
        }
        if nic.mode == MODE_IPV6_ONLY {
            return Err(Invalid::new(format!("{field}.ipv4_config.address"), "is set but mode is IPV6_ONLY"));
        }
    }
    if let Some(v6) = &nic.ipv6
        && !v6.address.is_empty()
    {
        if v6.address.parse::<Ipv6Addr>().is_err() {
            return Err(Invalid::new(
                format!("{field}.ipv6_config.address"),
                format!("{:?} is not an IPv6 address", v6.address),
            ));
        }
        if nic.mode == MODE_IPV4_ONLY {
            return Err(Invalid::new(format!("{field}.ipv6_config.address"), "is set but mode is IPV4_ONLY"));
        }
    }
    if nic.ports.len() > MAX_PORTS_PER_NIC {
        return Err(Invalid::new(
            format!("{field}.port_mappings"),
            format!("has {} entries, at most {MAX_PORTS_PER_NIC} are allowed", nic.ports.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (j, p) in nic.ports.iter_mut().enumerate() {
        let f = format!("{field}.port_mappings[{j}]");
        let Some(proto) = Proto::parse(&p.protocol) else {
            return Err(Invalid::new(format!("{f}.protocol"), format!("{:?} is not \"tcp\" or \"udp\"", p.protocol)));
        };
        p.protocol = proto.as_str().into();
        if !(1..=65535).contains(&p.guest_port) {
            return Err(Invalid::new(format!("{f}.guest_port"), format!("{} is not a port (1-65535)", p.guest_port)));
        }
        if !(0..=65535).contains(&p.host_port) {
            return Err(Invalid::new(
                format!("{f}.host_port"),
                format!("{} is not a port (1-65535, or 0 to allocate one)", p.host_port),
            ));
        }
        if p.host_port != 0 && !seen.insert((proto, p.host_port)) {
            return Err(Invalid::new(format!("{f}.host_port"), format!("{proto} {} is mapped twice", p.host_port)));
        }
    }
    Ok(())
}

/// What the managed NICs of `nics` ask of the pools (none for a VM
/// without managed NICs). Pool membership is checked by the caller.
pub fn requests(nics: &[NicSpec]) -> Vec<NicRequest> {
    nics.iter()
        .filter(|n| n.managed)
        .map(|n| {
            let fixed4 = n.ipv4.as_ref().and_then(|c| c.address.parse().ok());
            let fixed6 = n.ipv6.as_ref().and_then(|c| c.address.parse().ok());
            let v4 = match (n.mode, fixed4) {
                (MODE_IPV6_ONLY, _) => Want::No,
                (_, Some(a)) => Want::Exactly(a),
                _ => Want::Any,
            };
            let v6 = match (n.mode, fixed6) {
                (MODE_IPV4_ONLY, _) => Want::No,
                (_, Some(a)) => Want::Exactly(a),
                _ => Want::Any,
            };
            let ports = n
                .ports
                .iter()
                .map(|p| PortRequest {
                    proto: Proto::parse(&p.protocol).unwrap_or(Proto::Tcp),
                    host_port: u16::try_from(p.host_port).unwrap_or(0),
                    guest_port: u16::try_from(p.guest_port).unwrap_or(0),
                })
                .collect();
            let rates = NicRates { rx: n.rx_rate_limit, tx: n.tx_rate_limit };
            NicRequest { nic_id: n.id.clone(), mac: n.mac.clone(), v4, v6, ports, rates, inner: InGuest::default() }
        })
        .collect()
}

/// What a clone's managed NICs ask of the pools: new addresses (of the
/// families the source had) mapped to the source's in-guest ones, its MAC
/// and rate limits, and `ports` on the first managed NIC (the source's own
/// host ports stay the source's).
pub fn clone_requests(source: &[NicSpec], ports: &[PortSpec]) -> Vec<NicRequest> {
    let mut out = requests(source);
    for (k, (req, nic)) in out.iter_mut().zip(source.iter().filter(|n| n.managed)).enumerate() {
        let v4: Option<Ipv4Addr> = nic.ipv4.as_ref().and_then(|c| c.address.parse().ok());
        let v6: Option<Ipv6Addr> = nic.ipv6.as_ref().and_then(|c| c.address.parse().ok());
        req.v4 = if v4.is_some() { Want::Any } else { Want::No };
        req.v6 = if v6.is_some() { Want::Any } else { Want::No };
        req.inner = InGuest { v4, v6 };
        req.ports = if k == 0 {
            ports
                .iter()
                .map(|p| PortRequest {
                    proto: Proto::parse(&p.protocol).unwrap_or(Proto::Tcp),
                    host_port: u16::try_from(p.host_port).unwrap_or(0),
                    guest_port: u16::try_from(p.guest_port).unwrap_or(0),
                })
                .collect()
        } else {
            Vec::new()
        };
    }
    out
}

/// The in-guest IPv6 gateway: the link-local address metald puts on every
/// TAP it manages.
pub const GUEST_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

impl ValidSpec {
    /// A clone's spec: this one (its snapshot's source's) with each managed
    /// NIC's TAP, addresses and host ports from the clone's lease. The MAC
    /// and the kernel command line stay the source's: the guest keeps its
    /// in-guest configuration, which the host maps (and a cold boot of the
    /// clone configures the same).
    pub fn for_clone(&self, lease: &NetLease) -> ValidSpec {
        let mut spec: VmSpec = (**self).clone();
        for nic in spec.network.iter_mut().filter(|n| n.managed) {
            let Some(l) = lease.nics.iter().find(|l| l.nic_id == nic.id) else { continue };
            nic.tap = l.tap.clone();
            if let (Some(c), Some(a)) = (nic.ipv4.as_mut(), l.ipv4) {
                c.address = a.to_string();
            }
            if let (Some(c), Some(a)) = (nic.ipv6.as_mut(), l.ipv6) {
                c.address = a.to_string();
            }
            nic.ports = l
                .ports
                .iter()
                .map(|p| PortSpec {
                    protocol: p.proto.as_str().into(),
                    host_port: i64::from(p.host_port),
                    guest_port: i64::from(p.guest_port),
                })
                .collect();
        }
        ValidSpec::accepted(spec)
    }

    /// This spec with what the store leased filled in: each managed NIC's
    /// TAP, addresses (as its `ipv4`/`ipv6` config, with gateway and DNS)
    /// and host ports; and the guest's network configuration appended to
    /// the kernel command line: `ip=` (IPv4 of the first managed NIC, the
    /// kernel's syntax) and per managed NIC
    /// `metald.net=<mac>,<ipv4>/<len>,<gw4>,<ipv6>/128,fe80::1` (a part is
    /// empty when the NIC has no such address), then `metald.dns=<a>,<b>`,
    /// which the project's guest init applies after loading virtio-net.
    pub fn with_leases(&self, lease: &NetLease, pools: &Pools, dns: &[std::net::IpAddr]) -> ValidSpec {
        let mut spec: VmSpec = (**self).clone();
        let dns4: Vec<String> = dns.iter().filter(|a| a.is_ipv4()).map(ToString::to_string).collect();
        let dns6: Vec<String> = dns.iter().filter(|a| a.is_ipv6()).map(ToString::to_string).collect();
        let mut args = Vec::new();
        for nic in spec.network.iter_mut().filter(|n| n.managed) {
            let Some(l) = lease.nics.iter().find(|l| l.nic_id == nic.id) else { continue };
            nic.tap = l.tap.clone();
            nic.mac = l.mac.clone();
            let (mut a4, mut a6) = (String::new(), String::new());
            if let (Some(a), Some(net), Some(gw)) = (l.ipv4, pools.v4, pools.gateway4()) {
                if args.is_empty() {
                    args.push(format!("ip={a}::{gw}:{}::eth0:off", net.netmask()));
                }
                a4 = format!("{a}/{},{gw}", net.prefix_len());
                nic.ipv4 = Some(Ipv4Spec {
                    address: a.to_string(),
                    netmask: net.netmask().to_string(),
                    gateway: gw.to_string(),
                    dns_servers: dns4.clone(),
                    dhcp: false,
                });
            } else {
                nic.ipv4 = None;
            }
            if let Some(a) = l.ipv6 {
                a6 = format!("{a}/128,{GUEST_GATEWAY6}");
                nic.ipv6 = Some(Ipv6Spec {
                    address: a.to_string(),
                    prefix_length: 128,
                    gateway: GUEST_GATEWAY6.to_string(),
                    dns_servers: dns6.clone(),
                    ..Default::default()
                });
            } else {
                nic.ipv6 = None;
            }
            let a4 = if a4.is_empty() { ",".to_owned() } else { a4 };
            let a6 = if a6.is_empty() { ",".to_owned() } else { a6 };
            args.push(format!("metald.net={},{a4},{a6}", l.mac));
            nic.ports = l
                .ports
                .iter()
                .map(|p| PortSpec {
                    protocol: p.proto.as_str().into(),
                    host_port: i64::from(p.host_port),
                    guest_port: i64::from(p.guest_port),
                })
                .collect();
        }
        if !args.is_empty() && !dns.is_empty() {
            let all: Vec<String> = dns.iter().map(ToString::to_string).collect();
            args.push(format!("metald.dns={}", all.join(",")));
        }
        if !args.is_empty() {
            let cmdline = &mut spec.boot.kernel_args;
            for a in args {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(&a);
            }
        }
        ValidSpec::accepted(spec)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pools() -> Pools {
        Pools { v4: Some("10.9.0.0/29".parse().unwrap()), v6: Some("fd00::/125".parse().unwrap()), ports: 100..=199 }
    }

    #[test]
    fn leasable_addresses_skip_network_gateway_and_broadcast() {
        let p = pools();
        assert_eq!(p.gateway4(), Some("10.9.0.1".parse().unwrap()));
        let v4: Vec<String> = p.leasable4().map(|a| a.to_string()).collect();
        assert_eq!(v4, ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]);
        assert_eq!(p.gateway6(), Some("fd00::1".parse().unwrap()));
        assert_eq!(p.leasable6().count(), 6);
        assert!(p.refuse4("10.9.0.7".parse().unwrap()).unwrap().contains("broadcast"));
        assert!(p.refuse4("10.9.0.1".parse().unwrap()).unwrap().contains("gateway"));
        assert!(p.refuse4("10.9.1.2".parse().unwrap()).unwrap().contains("outside"));
        assert_eq!(p.refuse4("10.9.0.6".parse().unwrap()), None);
        assert!(p.refuse6("fd01::2".parse().unwrap()).unwrap().contains("outside"));
        assert!(p.refuse_port(22).unwrap().contains("UNKEY_METALD_NETWORK_PORT_RANGE"));
        assert_eq!(p.refuse_port(150), None);
        let none = Pools { v4: None, v6: None, ports: 1..=1 };
        assert_eq!(none.leasable4().count(), 0);
        assert!(none.refuse4("10.0.0.2".parse().unwrap()).unwrap().contains("off"));
    }

    #[test]
    fn a_managed_nic_gets_a_mac_and_its_fields_are_checked() {
        let mut nic = NicSpec::default();
        check_nic("n", &mut nic).unwrap();
        assert!(nic.managed);
        assert!(nic.mac.starts_with("02:") && nic.mac.len() == 17, "{}", nic.mac);
        let bad = |f: fn(&mut NicSpec)| {
            let mut n = NicSpec::default();
            f(&mut n);
            check_nic("n", &mut n).unwrap_err().field
        };
        assert_eq!(bad(|n| n.mode = 9), "n.mode");
        assert_eq!(
            bad(|n| n.ipv4 = Some(Ipv4Spec { address: "10.1".into(), ..Default::default() })),
            "n.ipv4_config.address"
        );
        assert_eq!(
            bad(|n| {
                n.mode = MODE_IPV4_ONLY;
                n.ipv6 = Some(Ipv6Spec { address: "fd00::5".into(), ..Default::default() });
            }),
            "n.ipv6_config.address"
        );
        assert_eq!(
            bad(|n| n.ports = vec![PortSpec { protocol: "sctp".into(), host_port: 0, guest_port: 80 }]),
            "n.port_mappings[0].protocol"
        );
        assert_eq!(
            bad(|n| n.ports = vec![PortSpec { protocol: String::new(), host_port: 0, guest_port: 0 }]),
            "n.port_mappings[0].guest_port"
        );
        assert_eq!(
            bad(|n| n.ports = vec![PortSpec { protocol: String::new(), host_port: 70000, guest_port: 1 }]),
            "n.port_mappings[0].host_port"
        );
        assert_eq!(
            bad(|n| {
                let twice = PortSpec { protocol: "tcp".into(), host_port: 150, guest_port: 80 };
                n.ports = vec![twice.clone(), twice];
            }),
            "n.port_mappings[1].host_port"
        );
        assert_eq!(
            bad(|n| {
                n.tap = "tap0".into();
                n.ports = vec![PortSpec { protocol: String::new(), host_port: 0, guest_port: 80 }];
            }),
            "n.port_mappings"
        );
    }

    #[test]
    fn leases_are_filled_into_the_spec_and_the_kernel_command_line() {
        let mut spec = VmSpec::default();
        spec.boot.kernel_args = "console=ttyS0".into();
        spec.network = vec![
            NicSpec { id: "eth0".into(), managed: true, ..Default::default() },
            NicSpec { id: "eth1".into(), managed: true, mode: MODE_IPV6_ONLY, ..Default::default() },
            NicSpec { id: "op".into(), tap: "tap9".into(), ..Default::default() },
        ];
        let lease = NetLease {
            tag: 3,
            nics: vec![
                NicLease {
                    nic_id: "eth0".into(),
                    tap: "mt-0000000a".into(),
                    mac: "02:00:00:00:00:0a".into(),
                    ipv4: Some("10.9.0.2".parse().unwrap()),
                    ipv6: Some("fd00::2".parse().unwrap()),
                    ports: vec![PortLease { proto: Proto::Tcp, host_port: 150, guest_port: 80 }],
                    rates: NicRates::default(),
                    inner: InGuest::default(),
                },
                NicLease {
                    nic_id: "eth1".into(),
                    tap: "mt-0000000b".into(),
                    mac: "02:00:00:00:00:0b".into(),
                    ipv4: None,
                    ipv6: Some("fd00::3".parse().unwrap()),
                    ports: vec![],
                    rates: NicRates::default(),
                    inner: InGuest::default(),
                },
            ],
        };
        let dns = ["10.0.0.53".parse().unwrap(), "fd00::53".parse().unwrap()];
        let out = super::ValidSpec::accepted(spec).with_leases(&lease, &pools(), &dns);
        assert_eq!(
            out.boot.kernel_args,
            "console=ttyS0 ip=10.9.0.2::10.9.0.1:255.255.255.248::eth0:off \
             metald.net=02:00:00:00:00:0a,10.9.0.2/29,10.9.0.1,fd00::2/128,fe80::1 \
             metald.net=02:00:00:00:00:0b,,,fd00::3/128,fe80::1 metald.dns=10.0.0.53,fd00::53"
        );
        let eth0 = &out.network[0];
        assert_eq!((eth0.tap.as_str(), eth0.mac.as_str()), ("mt-0000000a", "02:00:00:00:00:0a"));
        let v4 = eth0.ipv4.as_ref().unwrap();
        assert_eq!(
            (v4.address.as_str(), v4.gateway.as_str(), v4.netmask.as_str()),
            ("10.9.0.2", "10.9.0.1", "255.255.255.248")
        );
        assert_eq!(v4.dns_servers, ["10.0.0.53"]);
        assert_eq!(eth0.ipv6.as_ref().unwrap().dns_servers, ["fd00::53"]);
        assert_eq!(eth0.ports, [PortSpec { protocol: "tcp".into(), host_port: 150, guest_port: 80 }]);
        assert!(out.network[1].ipv4.is_none());
        assert_eq!(out.network[2].tap, "tap9", "an operator's TAP is left alone");
    }

    #[test]
    fn requests_follow_mode_and_fixed_addresses() {
        let mut a = NicSpec { id: "eth0".into(), ..Default::default() };
        a.ipv4 = Some(Ipv4Spec { address: "10.9.0.5".into(), ..Default::default() });
        a.ports = vec![PortSpec { protocol: "udp".into(), host_port: 0, guest_port: 53 }];
        let mut b = NicSpec { id: "eth1".into(), mode: MODE_IPV6_ONLY, ..Default::default() };
        let mut op = NicSpec { id: "eth2".into(), tap: "tap9".into(), ..Default::default() };
        for n in [&mut a, &mut b, &mut op] {
            check_nic("n", n).unwrap();
        }
        let r = requests(&[a, b, op]);
        assert_eq!(r.len(), 2, "the operator's TAP asks nothing of the pools");
        assert_eq!(r[0].v4, Want::Exactly("10.9.0.5".parse().unwrap()));
        assert_eq!(r[0].v6, Want::Any);
        assert_eq!(r[0].ports, [PortRequest { proto: Proto::Udp, host_port: 0, guest_port: 53 }]);
        assert_eq!((r[1].v4, r[1].v6), (Want::No, Want::Any));
    }
}
