//! The datapath's filtering and NAT proven with packets, without a VM: in a
//! network namespace of the test's own, the test opens each managed TAP's
//! queue itself (as a hypervisor does) and plays the guests by writing and
//! reading raw Ethernet frames; a TAP metald does not manage plays the
//! uplink, its far end "the internet" (10.99.0.2, fd99::2).
//!
//! Shown: anti-spoofing (another guest's address, another MAC; the drop is
//! `pre_filter`'s: with that chain flushed the same frame gets through),
//! host protection (echo to the gateway only; nothing else of the host is
//! reachable), isolation by customer tag (v4 and v6), the metadata address,
//! DNAT of a port mapping from 127.0.0.1 (a whole TCP handshake with a
//! host socket), from the uplink (and the reply un-DNATed) and from another
//! customer's guest (a mapping is public), a UDP mapping on the same host
//! port (from the uplink, the reply un-DNATed, and from 127.0.0.1), no way
//! into a guest but a mapping, and masquerade towards the uplink (v4 and v6).
//!
//! Reverse-path filtering is turned off in the namespace so that nft is the
//! only thing that can drop a frame here.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// One ioctl (TUNSETIFF) opens a TAP's queue, as a hypervisor does.
#![allow(unsafe_code)]

mod support;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{in_netns, ip};

use metald::model::net::Proto;
use metald::network::{Datapath, NetSettings, NicLimits, NicWiring, PortWiring};

/// How long a frame that must not come is waited for.
const QUIET: Duration = Duration::from_millis(300);
/// How long a frame that must come is waited for.
const LOUD: Duration = Duration::from_secs(3);

const OUT_MAC: [u8; 6] = [2, 0x99, 0, 0, 0, 2];
const OUT4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const UP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const GW4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

fn out6() -> Ipv6Addr {
    "fd99::2".parse().unwrap()
}
fn up6() -> Ipv6Addr {
    "fd99::1".parse().unwrap()
}
fn gw6() -> Ipv6Addr {
    "fd00:6d65:7461:6c64::1".parse().unwrap()
}

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP6: u8 = 58;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn nft(args: &[&str]) {
    let out = Command::new("nft").args(args).output().unwrap();
    assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A sysctl under /proc/sys/net (this thread's namespace).
fn sysctl(path: &str, value: &str) {
    std::fs::write(format!("/proc/sys/net/{path}"), value).unwrap();
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The host's MAC on `dev`.
fn host_mac(dev: &str) -> [u8; 6] {
    let text = ip(&["-o", "link", "show", "dev", dev]);
    let m = text.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).unwrap();
    metald::network::parse_mac(m).unwrap()
}

/// ICMP and ICMPv6 echo requests this namespace's host stack took in
/// (`/proc/thread-self/net` follows the calling thread's namespace).
fn echos_in() -> (u64, u64) {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
    let rows: Vec<Vec<&str>> =
        snmp.lines().filter(|l| l.starts_with("Icmp:")).map(|l| l.split_whitespace().collect()).collect();
    let col = rows[0].iter().position(|h| *h == "InEchos").unwrap();
    let v4 = rows[1][col].parse().unwrap();
    let snmp6 = std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap();
    let v6 = snmp6
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find_map(|w| (w.first() == Some(&"Icmp6InEchos")).then(|| w[1].parse().unwrap()))
        .unwrap();
    (v4, v6)
}

fn nic(i: u8, tag: u32, ports: Vec<PortWiring>) -> NicWiring {
    NicWiring {
        tap: format!("mt-000000{i:02x}"),
        alias: format!("metald:vm-{i}:eth0"),
        guest_mac: [2, 0, 0, 0, 0, i],
        ipv4: Some(Ipv4Addr::new(10, 200, 0, i)),
        ipv6: Some(format!("fd00:6d65:7461:6c64::{i:x}").parse().unwrap()),
        inner: Default::default(),
        tag,
        ports,
        owner: None,
        limits: NicLimits::default(),
    }
}

// ---- frames ------------------------------------------------------------

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !u16::try_from(acc).unwrap()
}

/// What goes above IP.
enum L4 {
    Echo { id: u16 },
    Udp { sport: u16, dport: u16 },
    Tcp { sport: u16, dport: u16, seq: u32, ack: u32, flags: u8 },
}

impl L4 {
    fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Echo { .. } if v6 => ICMP6,
            L4::Echo { .. } => ICMP,
            L4::Udp { .. } => UDP,
            L4::Tcp { .. } => TCP,
        }
    }

    /// The bytes, checksum included; `pseudo` is the pseudo-header's sum
    /// (`None` for ICMPv4, which has none).
    fn bytes(&self, v6: bool, pseudo: impl Fn(usize) -> Option<u32>) -> Vec<u8> {
        let (mut b, at) = match *self {
            L4::Echo { id } => {
                let mut b = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
                b.extend(id.to_be_bytes());
                b.extend(1u16.to_be_bytes());
                b.extend(b"metald echo");
                (b, 2)
            }
            L4::Udp { sport, dport } => {
                let mut b = Vec::new();
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(13u16.to_be_bytes());
                b.extend([0, 0]);
                b.extend(b"hello");
                (b, 6)
            }
            L4::Tcp { sport, dport, seq, ack, flags } => {
                let mut b = Vec::new();
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(seq.to_be_bytes());
                b.extend(ack.to_be_bytes());
                b.extend([5 << 4, flags]);
                b.extend(64240u16.to_be_bytes());
                b.extend([0, 0, 0, 0]);
                (b, 16)
            }
        };
        let acc = sum16(&b, pseudo(b.len()).unwrap_or(0));
        b[at..at + 2].copy_from_slice(&fold(acc).to_be_bytes());
        b
    }
}

/// An Ethernet frame carrying an IPv4 or IPv6 packet.
fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst_mac);
    f.extend(src_mac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let proto = l4.proto(false);
            let body = l4.bytes(false, |len| {
                (proto != ICMP)
                    .then(|| sum16(&[s.octets(), d.octets()].concat(), u32::from(proto) + u32::try_from(len).unwrap()))
            });
            let mut h = vec![0x45, 0];
            h.extend(u16::try_from(20 + body.len()).unwrap().to_be_bytes());
            h.extend([0, 1, 0x40, 0, 64, proto, 0, 0]);
            h.extend(s.octets());
            h.extend(d.octets());
            let c = fold(sum16(&h, 0));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend([0x08, 0x00]);
            f.extend(h);
            f.extend(body);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let proto = l4.proto(true);
            let body = l4.bytes(true, |len| {
                Some(sum16(&[s.octets(), d.octets()].concat(), u32::from(proto) + u32::try_from(len).unwrap()))
            });
            f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
            f.extend([proto, 64]);
            f.extend(s.octets());
            f.extend(d.octets());
            f.extend(body);
        }
        _ => panic!("mixed families"),
    }
    f
}

/// The fields of a received frame the tests look at.
#[derive(Debug)]
struct Pkt {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    /// ICMP type, or TCP flags.
    kind: u8,
    seq: u32,
}

fn parse(f: &[u8]) -> Option<Pkt> {
    let be16 = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let (src, dst, proto, l4) = match be16(f.get(..14)?, 12) {
        0x0800 if f.len() >= 34 => {
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let a = |i: usize| IpAddr::V4(Ipv4Addr::new(f[i], f[i + 1], f[i + 2], f[i + 3]));
            (a(26), a(30), f[23], f.get(14 + ihl..)?)
        }
        0x86dd if f.len() >= 54 => {
            let a = |i: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&f[i..i + 16]).unwrap()));
            (a(22), a(38), f[20], &f[54..])
        }
        _ => return None,
    };
    let mut p = Pkt { src, dst, proto, sport: 0, dport: 0, kind: 0, seq: 0 };
    match proto {
        ICMP | ICMP6 if !l4.is_empty() => p.kind = l4[0],
        UDP if l4.len() >= 8 => (p.sport, p.dport) = (be16(l4, 0), be16(l4, 2)),
        TCP if l4.len() >= 20 => {
            (p.sport, p.dport) = (be16(l4, 0), be16(l4, 2));
            p.seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
            p.kind = l4[13];
        }
        ICMP | ICMP6 | UDP | TCP => return None,
        _ => {}
    }
    Some(p)
}

// ---- a TAP's queue -----------------------------------------------------

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// One TAP's queue, opened as a hypervisor does (without the virtio-net
/// header: frames are plain Ethernet), non-blocking.
struct Queue {
    file: std::fs::File,
    name: String,
}

impl Queue {
    fn open(name: &str) -> Queue {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: the fd is an open /dev/net/tun; `req` is a properly sized
        // and initialised `struct ifreq` that lives across the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        assert!(r == 0, "attaching to {name}: {}", std::io::Error::last_os_error());
        Queue { file, name: name.to_owned() }
    }

    fn send(&self, f: &[u8]) {
        (&self.file).write_all(f).unwrap();
    }

    /// The first frame within `within` that `want` accepts.
    fn recv(&self, within: Duration, want: impl Fn(&Pkt) -> bool) -> Option<Pkt> {
        let end = Instant::now() + within;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < end {
            match (&self.file).read(&mut buf) {
                Ok(n) => {
                    if let Some(p) = parse(&buf[..n]).filter(&want) {
                        return Some(p);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => panic!("reading {}: {e}", self.name),
            }
        }
        None
    }

    fn expect(&self, what: &str, want: impl Fn(&Pkt) -> bool) -> Pkt {
        self.recv(LOUD, want).unwrap_or_else(|| panic!("{what}: nothing came out of {}", self.name))
    }

    fn expect_none(&self, what: &str, want: impl Fn(&Pkt) -> bool) {
        if let Some(p) = self.recv(QUIET, want) {
            panic!("{what}: {} carried {p:?}", self.name);
        }
    }
}

/// A guest: its NIC, its TAP's queue and the host's MAC on that TAP.
struct Guest {
    nic: NicWiring,
    q: Queue,
    host_mac: [u8; 6],
}

impl Guest {
    fn v4(&self) -> IpAddr {
        IpAddr::V4(self.nic.ipv4.unwrap())
    }
    fn v6(&self) -> IpAddr {
        IpAddr::V6(self.nic.ipv6.unwrap())
    }
    /// Sends `l4` from `src` (the guest's MAC unless `mac`) to `dst`.
    fn send(&self, src: IpAddr, dst: IpAddr, l4: &L4) {
        self.send_as(self.nic.guest_mac, src, dst, l4);
    }
    fn send_as(&self, mac: [u8; 6], src: IpAddr, dst: IpAddr, l4: &L4) {
        self.q.send(&frame(self.host_mac, mac, src, dst, l4));
    }
}

fn is_echo_reply(p: &Pkt) -> bool {
    (p.proto == ICMP && p.kind == 0) || (p.proto == ICMP6 && p.kind == 129)
}

#[test]
fn the_table_filters_isolates_and_translates_real_packets() {
    in_netns(|| async {
        ip(&["link", "set", "lo", "up"]);
        // The uplink: a TAP that is not metald's, with "the internet"
        // (10.99.0.2, fd99::2) behind it.
        ip(&["tuntap", "add", "dev", "up0", "mode", "tap"]);
        ip(&["addr", "add", "10.99.0.1/24", "dev", "up0"]);
        ip(&["-6", "addr", "add", "fd99::1/64", "dev", "up0", "nodad"]);
        ip(&["link", "set", "up0", "up"]);

        let dp = Datapath::start(NetSettings::default()).await.unwrap();
        let mapping = PortWiring { proto: Proto::Tcp, host_port: 20002, guest_port: 80 };
        let udp = PortWiring { proto: Proto::Udp, host_port: 20002, guest_port: 53 };
        let nics = [nic(2, 1, vec![mapping, udp]), nic(3, 1, vec![]), nic(4, 2, vec![])];
        dp.rebuild(&nics).await.unwrap();

        for dev in ["all", "default", "up0", "mt-00000002", "mt-00000003", "mt-00000004"] {
            sysctl(&format!("ipv4/conf/{dev}/rp_filter"), "0");
        }
        // A guest would answer ARP and ND; static entries stand in for that.
        for n in &nics {
            let mac = mac_str(n.guest_mac);
            ip(&["neigh", "replace", &n.ipv4.unwrap().to_string(), "lladdr", &mac, "dev", &n.tap, "nud", "permanent"]);
            ip(&["-6", "neigh", "replace", &n.ipv6.unwrap().to_string(), "lladdr", &mac, "dev", &n.tap]);
        }
        let out_mac = mac_str(OUT_MAC);
        ip(&["neigh", "replace", "10.99.0.2", "lladdr", &out_mac, "dev", "up0", "nud", "permanent"]);
        ip(&["-6", "neigh", "replace", "fd99::2", "lladdr", &out_mac, "dev", "up0", "nud", "permanent"]);
        // Were the metadata address not dropped, it would leave here.
        ip(&["route", "add", "169.254.169.254/32", "via", "10.99.0.2", "dev", "up0"]);

        let [a, b, c] = nics.map(|nic| {
            let q = Queue::open(&nic.tap);
            let host_mac = host_mac(&nic.tap);
            Guest { nic, q, host_mac }
        });
        let up = Queue::open("up0");
        let up_mac = host_mac("up0");

        // --- Anti-spoofing and host protection (ICMP echo to the host). ---
        let (gw4, gw6) = (IpAddr::V4(GW4), IpAddr::V6(gw6()));
        let e0 = echos_in();
        a.send(a.v4(), gw4, &L4::Echo { id: 1 });
        a.q.expect("echo to the gateway", |p| is_echo_reply(p) && p.src == gw4 && p.dst == a.v4());
        a.send(a.v6(), gw6, &L4::Echo { id: 2 });
        a.q.expect("echo to the IPv6 gateway", |p| is_echo_reply(p) && p.src == gw6 && p.dst == a.v6());
        assert_eq!(echos_in(), (e0.0 + 1, e0.1 + 1));

        // Another guest's address, another MAC, from a's TAP: dropped.
        let e0 = echos_in();
        a.send(b.v4(), gw4, &L4::Echo { id: 3 });
        a.send(b.v6(), gw6, &L4::Echo { id: 4 });
        a.send_as([2, 0, 0, 0, 0, 0x99], a.v4(), gw4, &L4::Echo { id: 5 });
        a.send_as([2, 0, 0, 0, 0, 0x99], a.v6(), gw6, &L4::Echo { id: 6 });
        b.q.expect_none("replies to a spoofed source", is_echo_reply);
        a.q.expect_none("replies to another MAC", is_echo_reply);
        assert_eq!(echos_in(), e0, "a spoofed echo request reached the host");
        // ...by pre_filter: without its rules the same frames get through.
        nft(&["flush", "chain", "inet", "metald", "pre_filter"]);
        a.send(b.v4(), gw4, &L4::Echo { id: 7 });
        b.q.expect("a spoofed echo's reply with pre_filter flushed", is_echo_reply);
        a.send_as([2, 0, 0, 0, 0, 0x99], a.v4(), gw4, &L4::Echo { id: 8 });
        a.q.expect("another MAC's echo reply with pre_filter flushed", is_echo_reply);
        let r = dp.rebuild(&[a.nic.clone(), b.nic.clone(), c.nic.clone()]).await.unwrap();
        assert_eq!((r.taps_created, r.taps_removed), (0, 0), "{r:?}");
        let e0 = echos_in();
        a.send(b.v4(), gw4, &L4::Echo { id: 9 });
        b.q.expect_none("a spoofed echo's reply after the rebuild", is_echo_reply);
        assert_eq!(echos_in(), e0);

        // The host beyond the gateway's echo: nothing.
        let _listener = std::net::TcpListener::bind("0.0.0.0:7777").unwrap();
        let e0 = echos_in();
        a.send(a.v4(), IpAddr::V4(UP4), &L4::Echo { id: 10 });
        a.send(a.v6(), IpAddr::V6(up6()), &L4::Echo { id: 14 });
        a.send(a.v4(), gw4, &L4::Tcp { sport: 40000, dport: 7777, seq: 1, ack: 0, flags: SYN });
        a.q.expect_none("an answer from the host to a guest", |p| {
            (is_echo_reply(p) && (p.src == IpAddr::V4(UP4) || p.src == IpAddr::V6(up6())))
                || (p.proto == TCP && p.sport == 7777)
        });
        assert_eq!(echos_in(), e0, "a guest's echo to the host's uplink address was taken in");
        // fe80::1, the guests' IPv6 gateway, answers.
        let fe80 = IpAddr::V6(metald::network::TAP_GATEWAY6);
        a.send(a.v6(), fe80, &L4::Echo { id: 15 });
        a.q.expect("echo to fe80::1", |p| is_echo_reply(p) && p.src == fe80 && p.dst == a.v6());

        // --- Isolation by customer tag; the metadata address. ---
        a.send(a.v4(), b.v4(), &L4::Udp { sport: 5000, dport: 9 });
        b.q.expect("a to b (same customer)", |p| p.proto == UDP && p.src == a.v4() && p.dport == 9);
        a.send(a.v6(), b.v6(), &L4::Echo { id: 11 });
        b.q.expect("a to b over IPv6", |p| p.proto == ICMP6 && p.kind == 128 && p.src == a.v6());
        a.send(a.v4(), c.v4(), &L4::Udp { sport: 5000, dport: 9 });
        a.send(a.v6(), c.v6(), &L4::Echo { id: 12 });
        c.q.expect_none("a to c (another customer)", |p| p.src == a.v4() || p.src == a.v6());
        let md = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
        a.send(a.v4(), md, &L4::Tcp { sport: 40001, dport: 80, seq: 1, ack: 0, flags: SYN });
        up.expect_none("the metadata address", |p| p.dst == md);

        // --- Masquerade towards the uplink. ---
        let (out4, out6) = (IpAddr::V4(OUT4), IpAddr::V6(out6()));
        a.send(a.v4(), out4, &L4::Udp { sport: 5001, dport: 53 });
        up.expect("a's datagram to the internet, masqueraded", |p| {
            p.proto == UDP && p.src == IpAddr::V4(UP4) && p.dst == out4 && p.dport == 53
        });
        a.send(a.v6(), out6, &L4::Echo { id: 13 });
        up.expect("a's IPv6 echo to the internet, masqueraded", |p| {
            p.proto == ICMP6 && p.src == IpAddr::V6(up6()) && p.dst == out6
        });

        // --- Port mapping from 127.0.0.1: a whole handshake. ---
        // The connecting thread is spawned from this one: it is in this
        // namespace too (else it would reach the host's own loopback).
        let conn = std::thread::spawn(|| {
            std::net::TcpStream::connect_timeout(&"127.0.0.1:20002".parse().unwrap(), LOUD)
                .map(|s| s.peer_addr().unwrap())
        });
        let syn = a.q.expect("the mapping's SYN from 127.0.0.1", |p| p.proto == TCP && p.kind == SYN);
        // DNAT to the guest's port, 127.0.0.1 rewritten to the gateway.
        assert_eq!((syn.dst, syn.dport, syn.src), (a.v4(), 80, gw4), "{syn:?}");
        a.send(
            a.v4(),
            gw4,
            &L4::Tcp { sport: 80, dport: syn.sport, seq: 1000, ack: syn.seq.wrapping_add(1), flags: SYN | ACK },
        );
        assert_eq!(conn.join().unwrap().unwrap().to_string(), "127.0.0.1:20002");

        // --- Port mapping from the uplink, and the reply un-DNATed. ---
        let to_up = |dst: IpAddr, dport: u16| {
            up.send(&frame(up_mac, OUT_MAC, out4, dst, &L4::Tcp { sport: 41000, dport, seq: 7, ack: 0, flags: SYN }));
        };
        to_up(IpAddr::V4(UP4), 20002);
        let syn = a.q.expect("the mapping's SYN from the internet", |p| p.proto == TCP && p.kind == SYN);
        assert_eq!((syn.src, syn.sport, syn.dst, syn.dport), (out4, 41000, a.v4(), 80), "{syn:?}");
        a.send(a.v4(), out4, &L4::Tcp { sport: 80, dport: 41000, seq: 5000, ack: 8, flags: SYN | ACK });
        let reply = up.expect("the guest's SYN-ACK on the uplink", |p| p.proto == TCP && p.kind == SYN | ACK);
        assert_eq!((reply.src, reply.sport, reply.dst), (IpAddr::V4(UP4), 20002, out4), "{reply:?}");

        // A mapping is public: another customer's guest reaches it through
        // the host's address as the internet does (and sees the host's
        // address and port in the reply, not the guest's).
        c.send(c.v4(), gw4, &L4::Tcp { sport: 42000, dport: 20002, seq: 70, ack: 0, flags: SYN });
        let syn = a.q.expect("the mapping's SYN from c", |p| p.proto == TCP && p.sport == 42000);
        assert_eq!((syn.src, syn.dst, syn.dport), (c.v4(), a.v4(), 80), "{syn:?}");
        a.send(a.v4(), c.v4(), &L4::Tcp { sport: 80, dport: 42000, seq: 9000, ack: 71, flags: SYN | ACK });
        let reply = c.q.expect("a's SYN-ACK at c", |p| p.proto == TCP && p.dport == 42000);
        assert_eq!((reply.src, reply.sport), (gw4, 20002), "{reply:?}");

        // --- A UDP mapping (same host port, other protocol): from the
        // uplink, the reply un-DNATed; from 127.0.0.1. ---
        up.send(&frame(up_mac, OUT_MAC, out4, IpAddr::V4(UP4), &L4::Udp { sport: 43000, dport: 20002 }));
        let dgram = a.q.expect("the UDP mapping's datagram from the internet", |p| p.proto == UDP);
        assert_eq!((dgram.src, dgram.sport, dgram.dst, dgram.dport), (out4, 43000, a.v4(), 53), "{dgram:?}");
        a.send(a.v4(), out4, &L4::Udp { sport: 53, dport: 43000 });
        let reply = up.expect("the guest's UDP answer on the uplink", |p| p.proto == UDP && p.dport == 43000);
        assert_eq!((reply.src, reply.sport), (IpAddr::V4(UP4), 20002), "{reply:?}");
        std::thread::spawn(|| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.send_to(b"hello", "127.0.0.1:20002").unwrap();
        })
        .join()
        .unwrap();
        let dgram = a.q.expect("the UDP mapping's datagram from 127.0.0.1", |p| p.proto == UDP && p.dport == 53);
        assert_eq!((dgram.src, dgram.dst), (gw4, a.v4()), "{dgram:?}");
        // Not to the TCP mapping's guest port.
        up.send(&frame(up_mac, OUT_MAC, out4, IpAddr::V4(UP4), &L4::Udp { sport: 43001, dport: 20003 }));
        a.q.expect_none("a datagram to an unmapped UDP port", |p| p.proto == UDP && p.sport == 43001);

        // --- Into a guest without a mapping: never. ---
        to_up(a.v4(), 22);
        a.q.expect_none("a SYN from the internet straight to a guest", |p| p.proto == TCP && p.dport == 22);
    });
}
