//! The kernel command line: its parameters, and the network plan metald puts there (the same
//! options the busybox guest init of scripts/guest-image.sh reads):
//!
//! * `metald.net=<mac>,<ipv4>/<len>,<gw4>,<ipv6>/<len>,<gw6>` — one per managed NIC, parts empty
//!   when absent, the interface found by its MAC (what metald's `with_leases` writes);
//! * without any `metald.net=`: the kernel's `ip=<addr>::<gw>:<netmask>:<host>:<dev>:<autoconf>`
//!   (static form only) and `metald.ip6=<addr>/<len>[,<gw6>]` for the same device (default `eth0`);
//! * `metald.dns=<a>,<b>,...` — nameservers for `/etc/resolv.conf`.
//!
//! Also the disks: `metald.base=/dev/vda` and `metald.rw=/dev/vdb` (the defaults).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The parsed command line: `name=value` or bare `name` words, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    params: Vec<(String, Option<String>)>,
}

impl Cmdline {
    /// Splits at blanks outside double quotes (the kernel's quoting); stops at `--`.
    pub fn parse(text: &str) -> Cmdline {
        let mut params = Vec::new();
        let mut word = String::new();
        let mut quoted = false;
        let mut push = |w: &mut String| {
            if !w.is_empty() {
                let taken = std::mem::take(w);
                match taken.split_once('=') {
                    Some((k, v)) => params.push((k.to_owned(), Some(v.to_owned()))),
                    None => params.push((taken, None)),
                }
            }
        };
        for c in text.chars() {
            match c {
                '"' => quoted = !quoted,
                c if c.is_whitespace() && !quoted => {
                    if word == "--" {
                        word.clear();
                        break;
                    }
                    push(&mut word);
                }
                c => word.push(c),
            }
        }
        if word != "--" {
            push(&mut word);
        }
        Cmdline { params }
    }

    /// The value of the last `name=value` (the kernel's rule: the last one wins).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().rev().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
    }

    /// Every value of `name=value`, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.params.iter().filter(move |(k, _)| k == name).filter_map(|(_, v)| v.as_deref())
    }

    /// The network configuration this command line asks for.
    pub fn net_plan(&self) -> Result<NetPlan, NetError> {
        let mut nics = Vec::new();
        for spec in self.all("metald.net") {
            nics.push(parse_metald_net(spec)?);
        }
        if nics.is_empty() {
            let v4 = match self.get("ip") {
                Some(spec) => parse_kernel_ip(spec)?,
                None => None,
            };
            let v6 = self.get("metald.ip6").map(parse_ip6).transpose()?;
            if v4.is_some() || v6.is_some() {
                let dev = v4.as_ref().and_then(|(_, d)| d.clone()).unwrap_or_else(|| "eth0".to_owned());
                nics.push(Nic { link: Link::Name(dev), v4: v4.map(|(a, _)| a), v6 });
            }
        }
        let mut dns = Vec::new();
        for a in self.get("metald.dns").unwrap_or("").split(',').filter(|a| !a.is_empty()) {
            dns.push(a.parse::<IpAddr>().map_err(|_| NetError::new("metald.dns", a))?);
        }
        Ok(NetPlan { nics, dns })
    }
}

/// The network the guest sets up before the workload starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPlan {
    pub nics: Vec<Nic>,
    pub dns: Vec<IpAddr>,
}

/// One interface to configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub link: Link,
    pub v4: Option<Addr<Ipv4Addr>>,
    pub v6: Option<Addr<Ipv6Addr>>,
}

/// How the interface is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// By MAC address (lower case, `aa:bb:...`), as `/sys/class/net/*/address` shows it.
    Mac(String),
    /// By name (`eth0`).
    Name(String),
}

/// An address with its prefix length and the default gateway through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr<A> {
    pub addr: A,
    pub prefix: u8,
    pub gateway: Option<A>,
}

/// A network option that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetError {
    pub option: &'static str,
    pub value: String,
}

impl NetError {
    fn new(option: &'static str, value: &str) -> NetError {
        NetError { option, value: value.to_owned() }
    }
}

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kernel command line: cannot read {}={:?}", self.option, self.value)
    }
}

impl std::error::Error for NetError {}

/// `<mac>,<ipv4>/<len>,<gw4>,<ipv6>/<len>,<gw6>`.
fn parse_metald_net(spec: &str) -> Result<Nic, NetError> {
    let err = || NetError::new("metald.net", spec);
    let parts: Vec<&str> = spec.split(',').collect();
    let [mac, a4, g4, a6, g6] = parts[..] else { return Err(err()) };
    if mac.len() != 17 || !mac.split(':').all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok()) {
        return Err(err());
    }
    let v4 = addr::<Ipv4Addr>(a4, g4, 32).ok_or_else(err)?;
    let v6 = addr::<Ipv6Addr>(a6, g6, 128).ok_or_else(err)?;
    Ok(Nic { link: Link::Mac(mac.to_ascii_lowercase()), v4, v6 })
}

/// `Some(None)` for an empty address, `Some(Some(..))` for a valid one, `None` when invalid.
#[allow(clippy::option_option)]
fn addr<A: std::str::FromStr>(cidr: &str, gw: &str, max: u8) -> Option<Option<Addr<A>>> {
    if cidr.is_empty() {
        return gw.is_empty().then_some(None);
    }
    let (a, len) = cidr.split_once('/')?;
    let prefix: u8 = len.parse().ok().filter(|p| *p <= max)?;
    let gateway = if gw.is_empty() { None } else { Some(gw.parse().ok()?) };
    Some(Some(Addr { addr: a.parse().ok()?, prefix, gateway }))
}

/// The address and device (when named) of the kernel's `ip=`.
type KernelIp = (Addr<Ipv4Addr>, Option<String>);

/// The kernel's `ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>` in its
/// static form; `ip=off|none|dhcp|...` (no address) is `None`.
fn parse_kernel_ip(spec: &str) -> Result<Option<KernelIp>, NetError> {
    let err = || NetError::new("ip", spec);
    let f: Vec<&str> = spec.split(':').collect();
    if f.len() < 2 {
        return Ok(None);
    }
    let addr: Ipv4Addr = f[0].parse().map_err(|_| err())?;
    let field = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
    let gateway = field(2).map(str::parse).transpose().map_err(|_| err())?;
    let prefix = match field(3) {
        Some(m) => netmask_prefix(m.parse().map_err(|_| err())?).ok_or_else(err)?,
        None => 24,
    };
    Ok(Some((Addr { addr, prefix, gateway }, field(5).map(str::to_owned))))
}

/// `<addr>/<len>[,<gw6>]`.
fn parse_ip6(spec: &str) -> Result<Addr<Ipv6Addr>, NetError> {
    let (cidr, gw) = spec.split_once(',').unwrap_or((spec, ""));
    match addr::<Ipv6Addr>(cidr, gw, 128) {
        Some(Some(a)) => Ok(a),
        _ => Err(NetError::new("metald.ip6", spec)),
    }
}

/// The prefix length of a contiguous netmask.
fn netmask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let ones = bits.leading_ones();
    (bits.checked_shl(ones).unwrap_or(0) == 0).then(|| u8::try_from(ones).unwrap_or(32))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn v4(a: &str, prefix: u8, gw: Option<&str>) -> Option<Addr<Ipv4Addr>> {
        Some(Addr { addr: a.parse().unwrap(), prefix, gateway: gw.map(|g| g.parse().unwrap()) })
    }

    fn v6(a: &str, prefix: u8, gw: Option<&str>) -> Option<Addr<Ipv6Addr>> {
        Some(Addr { addr: a.parse().unwrap(), prefix, gateway: gw.map(|g| g.parse().unwrap()) })
    }

    #[test]
    fn words_quotes_and_the_double_dash() {
        let c = Cmdline::parse("console=ttyS0 quiet rdinit=/metald-init x=\"a b\" x=last -- ip=ignored");
        assert_eq!(c.get("console"), Some("ttyS0"));
        assert_eq!(c.get("quiet"), None, "a bare word has no value");
        assert_eq!(c.get("x"), Some("last"));
        assert_eq!(c.all("x").collect::<Vec<_>>(), ["a b", "last"]);
        assert_eq!(c.get("ip"), None, "after -- the words belong to init");
        assert_eq!(Cmdline::parse("  a=1\n").get("a"), Some("1"));
    }

    #[test]
    fn metald_net_is_what_metald_writes() {
        // The exact line of metald's model::net test (`with_leases`).
        let c = Cmdline::parse(
            "console=ttyS0 ip=10.9.0.2::10.9.0.1:255.255.255.248::eth0:off \
             metald.net=02:00:00:00:00:0A,10.9.0.2/29,10.9.0.1,fd00::2/128,fe80::1 \
             metald.net=02:00:00:00:00:0b,,,fd00::3/128,fe80::1 metald.dns=10.0.0.53,fd00::53",
        );
        let plan = c.net_plan().unwrap();
        assert_eq!(
            plan.nics,
            [
                Nic {
                    link: Link::Mac("02:00:00:00:00:0a".into()),
                    v4: v4("10.9.0.2", 29, Some("10.9.0.1")),
                    v6: v6("fd00::2", 128, Some("fe80::1")),
                },
                Nic { link: Link::Mac("02:00:00:00:00:0b".into()), v4: None, v6: v6("fd00::3", 128, Some("fe80::1")) },
            ]
        );
        let dns: Vec<String> = plan.dns.iter().map(ToString::to_string).collect();
        assert_eq!(dns, ["10.0.0.53", "fd00::53"]);
    }

    #[test]
    fn kernel_ip_and_metald_ip6_without_metald_net() {
        let c = Cmdline::parse("ip=10.9.0.2::10.9.0.1:255.255.255.248::eth0:off metald.ip6=fd00::2/128,fe80::1");
        let plan = c.net_plan().unwrap();
        assert_eq!(
            plan.nics,
            [Nic {
                link: Link::Name("eth0".into()),
                v4: v4("10.9.0.2", 29, Some("10.9.0.1")),
                v6: v6("fd00::2", 128, Some("fe80::1")),
            }]
        );
        let plan = Cmdline::parse("ip=192.168.1.5:::::eth1:off").net_plan().unwrap();
        assert_eq!(plan.nics, [Nic { link: Link::Name("eth1".into()), v4: v4("192.168.1.5", 24, None), v6: None }]);
        let plan = Cmdline::parse("metald.ip6=fd00::9/64").net_plan().unwrap();
        assert_eq!(plan.nics, [Nic { link: Link::Name("eth0".into()), v4: None, v6: v6("fd00::9", 64, None) }]);
        for off in ["ip=off", "ip=dhcp", "console=ttyS0"] {
            assert_eq!(Cmdline::parse(off).net_plan().unwrap(), NetPlan::default(), "{off}");
        }
    }

    #[test]
    fn bad_network_options_are_errors() {
        for (line, option) in [
            ("metald.net=02:00:00:00:00:0a,10.9.0.2/29,10.9.0.1", "metald.net"),
            ("metald.net=02:00:00:00:0a,10.9.0.2/29,10.9.0.1,,", "metald.net"),
            ("metald.net=02:00:00:00:00:0a,10.9.0.2/33,,,", "metald.net"),
            ("metald.net=02:00:00:00:00:0a,10.9.0.2,,,", "metald.net"),
            ("metald.net=02:00:00:00:00:0a,,10.9.0.1,,", "metald.net"),
            ("metald.net=02:00:00:00:00:0a,,,fd00::2/128,nope", "metald.net"),
            ("ip=10.9.0.2::10.9.0.1:255.0.255.0::eth0:off", "ip"),
            ("ip=10.9.0.300::::::off", "ip"),
            ("metald.ip6=fd00::2", "metald.ip6"),
            ("metald.dns=10.0.0.1,x", "metald.dns"),
        ] {
            assert_eq!(Cmdline::parse(line).net_plan().unwrap_err().option, option, "{line}");
        }
    }

    #[test]
    fn netmasks() {
        for (mask, want) in [("255.255.255.248", Some(29)), ("0.0.0.0", Some(0)), ("255.255.255.255", Some(32))] {
            assert_eq!(netmask_prefix(mask.parse().unwrap()), want, "{mask}");
        }
        assert_eq!(netmask_prefix("255.0.255.0".parse().unwrap()), None);
    }
}
