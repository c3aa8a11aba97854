//! Host networking settings from `UNKEY_METALD_NETWORK_*`.

use std::net::IpAddr;

use crate::config::Reader;
use crate::model::net::Pools;

/// Validated networking configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSettings {
    /// `UNKEY_METALD_NETWORK_ENABLED`: `false` turns managed NICs off.
    pub enabled: bool,
    pub ipv4_pool: Option<ipnet::Ipv4Net>,
    pub ipv6_pool: Option<ipnet::Ipv6Net>,
    /// DNS servers guests are told about (none by default).
    pub dns: Vec<IpAddr>,
    /// Interface egress NAT is restricted to; empty: any interface that is
    /// not a VM's TAP or the gateway device.
    pub uplink: String,
    pub port_range: (u16, u16),
    /// The dummy device holding the gateway addresses.
    pub gateway_device: String,
    /// The nftables table (family `inet`) metald owns.
    pub table: String,
    /// The `nft` binary.
    pub nft: String,
    /// The `tc` binary (iproute2): rate limits to guests (`limits`).
    pub tc: String,
}

impl Default for NetSettings {
    fn default() -> Self {
        NetSettings {
            enabled: true,
            ipv4_pool: Some(ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 200, 0, 0), 16).unwrap_or_default()),
            ipv6_pool: Some(
                ipnet::Ipv6Net::new(std::net::Ipv6Addr::new(0xfd00, 0x6d65, 0x7461, 0x6c64, 0, 0, 0, 0), 64)
                    .unwrap_or_default(),
            ),
            dns: Vec::new(),
            uplink: String::new(),
            port_range: (20000, 29999),
            gateway_device: "metald0".into(),
            table: "metald".into(),
            nft: "nft".into(),
            tc: "tc".into(),
        }
    }
}

fn ifname_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl NetSettings {
    /// Reads the networking variables; problems are added to `r`.
    pub fn read(r: &mut Reader<'_>) -> NetSettings {
        let d = NetSettings::default();
        let enabled = r.bool("NETWORK_ENABLED", d.enabled);
        let ipv4_pool = match r.raw("NETWORK_IPV4_POOL") {
            None => d.ipv4_pool,
            Some("" | "off") => None,
            Some(s) => match s.parse::<ipnet::Ipv4Net>() {
                Ok(n) if n.prefix_len() <= 30 => Some(n.trunc()),
                Ok(_) => {
                    r.error("NETWORK_IPV4_POOL", format!("{s} is too small: use a /30 or larger (e.g. 10.200.0.0/16)"));
                    None
                }
                Err(_) => {
                    r.error("NETWORK_IPV4_POOL", format!("{s:?} is not an IPv4 prefix like 10.200.0.0/16 (or off)"));
                    None
                }
            },
        };
        let ipv6_pool = match r.raw("NETWORK_IPV6_POOL") {
            None => d.ipv6_pool,
            Some("" | "off") => None,
            Some(s) => match s.parse::<ipnet::Ipv6Net>() {
                Ok(n) if n.prefix_len() <= 120 => Some(n.trunc()),
                Ok(_) => {
                    r.error(
                        "NETWORK_IPV6_POOL",
                        format!("{s} is too small: use a /120 or larger (e.g. fd00:6d65:7461:6c64::/64)"),
                    );
                    None
                }
                Err(_) => {
                    r.error(
                        "NETWORK_IPV6_POOL",
                        format!("{s:?} is not an IPv6 prefix like fd00:6d65:7461:6c64::/64 (or off)"),
                    );
                    None
                }
            },
        };
        if enabled && ipv4_pool.is_none() && ipv6_pool.is_none() {
            r.error(
                "NETWORK_IPV4_POOL",
                "and UNKEY_METALD_NETWORK_IPV6_POOL are both off; keep one or set UNKEY_METALD_NETWORK_ENABLED=false",
            );
        }
        let mut dns = Vec::new();
        for s in r.string("NETWORK_DNS", "").split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match s.parse::<IpAddr>() {
                Ok(a) => dns.push(a),
                Err(_) => r.error("NETWORK_DNS", format!("{s:?} is not an IP address (comma-separated list)")),
            }
        }
        let uplink = r.string("NETWORK_UPLINK", "");
        if !uplink.is_empty() && !ifname_ok(&uplink) {
            r.error("NETWORK_UPLINK", format!("{uplink:?} is not an interface name"));
        }
        let range = r.string("NETWORK_PORT_RANGE", "20000-29999");
        let port_range = match range.split_once('-').map(|(a, b)| (a.trim().parse::<u16>(), b.trim().parse::<u16>())) {
            Some((Ok(a), Ok(b))) if a >= 1024 && a <= b => (a, b),
            _ => {
                r.error("NETWORK_PORT_RANGE", format!("{range:?} must be LOW-HIGH with 1024 <= LOW <= HIGH <= 65535"));
                d.port_range
            }
        };
        let gateway_device = r.string("NETWORK_GATEWAY_DEVICE", &d.gateway_device);
        if !ifname_ok(&gateway_device) {
            r.error("NETWORK_GATEWAY_DEVICE", format!("{gateway_device:?} is not an interface name"));
        }
        let table = r.string("NETWORK_NFT_TABLE", &d.table);
        if table.is_empty() || !table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            r.error("NETWORK_NFT_TABLE", format!("{table:?} must be letters, digits and '_'"));
        }
        let nft = r.string("NETWORK_NFT", &d.nft);
        let tc = r.string("NETWORK_TC", &d.tc);
        NetSettings { enabled, ipv4_pool, ipv6_pool, dns, uplink, port_range, gateway_device, table, nft, tc }
    }

    /// The pools leases come from.
    pub fn pools(&self) -> Pools {
        Pools { v4: self.ipv4_pool, v6: self.ipv6_pool, ports: self.port_range.0..=self.port_range.1 }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(pairs: &[(&str, &str)]) -> (NetSettings, Vec<String>) {
        let src: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (format!("UNKEY_METALD_{k}"), v.to_string())).collect();
        let mut r = Reader::new(&src);
        let s = NetSettings::read(&mut r);
        let problems = match r.finish() {
            Ok(()) => Vec::new(),
            Err(e) => e.to_string().lines().map(str::to_owned).collect(),
        };
        (s, problems)
    }

    #[test]
    fn defaults_and_overrides() {
        let (s, p) = read(&[]);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(s.pools().gateway4().unwrap().to_string(), "10.200.0.1");
        assert_eq!(s.pools().gateway6().unwrap().to_string(), "fd00:6d65:7461:6c64::1");
        let (s, p) = read(&[
            ("NETWORK_IPV4_POOL", "192.168.77.9/24"),
            ("NETWORK_IPV6_POOL", "off"),
            ("NETWORK_DNS", "10.0.0.53, fd00::53"),
            ("NETWORK_PORT_RANGE", "30000-30010"),
        ]);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(s.ipv4_pool.unwrap().to_string(), "192.168.77.0/24");
        assert_eq!(s.ipv6_pool, None);
        assert_eq!(s.dns.len(), 2);
        assert_eq!(s.port_range, (30000, 30010));
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (k, v) in [
            ("NETWORK_IPV4_POOL", "10.0.0.0/31"),
            ("NETWORK_IPV4_POOL", "ten"),
            ("NETWORK_IPV6_POOL", "fd00::/124"),
            ("NETWORK_DNS", "x"),
            ("NETWORK_PORT_RANGE", "80-90"),
            ("NETWORK_PORT_RANGE", "3000"),
            ("NETWORK_UPLINK", "a-very-long-interface"),
            ("NETWORK_NFT_TABLE", "a b"),
        ] {
            let (_, p) = read(&[(k, v)]);
            assert!(p.iter().any(|l| l.contains(k)), "{k}={v}: {p:?}");
        }
        let (_, p) = read(&[("NETWORK_IPV4_POOL", "off"), ("NETWORK_IPV6_POOL", "off")]);
        assert!(!p.is_empty());
    }
}
