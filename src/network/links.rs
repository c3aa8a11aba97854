//! Kernel links, addresses, routes and sysctls of the datapath, over
//! netlink (`rtnetlink`), plus the one thing netlink cannot do: making a
//! persistent TAP (`TUNSETIFF` on `/dev/net/tun`, an ioctl).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteProtocol};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::types::NetError;

/// The link-local address metald puts on every TAP: the guests' IPv6
/// gateway.
pub const TAP_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

fn kernel(what: String) -> impl FnOnce(rtnetlink::Error) -> NetError {
    move |e| NetError::Kernel(what, io_error(e))
}

/// A netlink error as the errno it carries, anything else as text.
fn io_error(e: rtnetlink::Error) -> std::io::Error {
    match &e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() < 0 => std::io::Error::from_raw_os_error(-m.raw_code()),
        _ => std::io::Error::other(e.to_string()),
    }
}

/// A link as listed: index, name, alias.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub alias: Option<String>,
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link { index: m.header.index, name: String::new(), alias: None };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name.clone_from(n),
            LinkAttribute::IfAlias(a) => l.alias = Some(a.clone()),
            _ => {}
        }
    }
    l
}

/// Every link of this network namespace.
pub async fn list(h: &Handle) -> Result<Vec<Link>, NetError> {
    let mut s = h.link().get().execute();
    let mut out = Vec::new();
    while let Some(m) = s.try_next().await.map_err(kernel("listing links".into()))? {
        out.push(link_of(&m));
    }
    Ok(out)
}

/// The link named `name`, if it exists.
pub async fn get(h: &Handle, name: &str) -> Result<Option<Link>, NetError> {
    let mut s = h.link().get().match_name(name.to_owned()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m.as_ref().map(link_of)),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(NetError::Kernel(format!("looking up {name}"), io_error(e))),
    }
}

pub async fn delete(h: &Handle, index: u32, name: &str) -> Result<(), NetError> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        Err(e) => Err(NetError::Kernel(format!("deleting {name}"), io_error(e))),
    }
}

/// The link group TAPs are moved into right before [`delete_many`]
/// deletes them: `mtld` in ASCII, far from the groups people number by
/// hand. Nothing stays in it.
pub const REAP_GROUP: u32 = 0x6d74_6c64;

/// Deletes `links` in one kernel operation: moves them into
/// [`REAP_GROUP`], then deletes the group (`ip link del group`). One
/// `RTM_DELLINK` for a group unregisters all its devices in one batch with
/// one set of RCU grace periods: 50 TAPs go in ~30 ms, against ~20 ms each
/// one by one. Links that vanished meanwhile are fine.
pub async fn delete_many(h: &Handle, links: &[Link]) -> Result<(), NetError> {
    let mut any = false;
    for l in links {
        let msg = LinkUnspec::new_with_index(l.index).link_group(REAP_GROUP).build();
        match h.link().set(msg).execute().await {
            Ok(()) => any = true,
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            Err(e) => {
                return Err(NetError::Kernel(format!("moving {} to link group {REAP_GROUP}", l.name), io_error(e)));
            }
        }
    }
    if !any {
        return Ok(());
    }
    let mut req = h.link().del(0);
    req.message_mut().attributes.push(LinkAttribute::Group(REAP_GROUP));
    match req.execute().await {
        Ok(()) => Ok(()),
        // Nothing left in the group (someone deleted them first).
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        Err(e) => Err(NetError::Kernel(format!("deleting link group {REAP_GROUP}"), io_error(e))),
    }
}

/// Creates the gateway device if missing (a persistent TAP no one opens:
/// the `dummy` module is not on every host, TUN is wherever metald can work
/// at all; addresses on an up link without carrier are the host's all the
/// same); returns its index.
pub async fn ensure_gateway(h: &Handle, name: &str, alias: &str) -> Result<u32, NetError> {
    if get(h, name).await?.is_none() {
        create_tap(name, None)?;
    }
    let l = get(h, name).await?.ok_or_else(|| NetError::kernel(format!("creating {name}"), "it vanished"))?;
    set_up(h, l.index, name, alias).await?;
    Ok(l.index)
}

/// Sets `alias` on link `index` and brings it up.
pub async fn set_up(h: &Handle, index: u32, name: &str, alias: &str) -> Result<(), NetError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).alias(alias).up().build())
        .execute()
        .await
        .map_err(kernel(format!("setting {name} up")))
}

/// Adds (or keeps) `addr/prefix` on link `index`, without duplicate
/// address detection.
pub async fn add_address(h: &Handle, index: u32, addr: IpAddr, prefix: u8, name: &str) -> Result<(), NetError> {
    let mut req = h.address().add(index, addr, prefix).replace();
    req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    req.execute().await.map_err(kernel(format!("adding {addr}/{prefix} to {name}")))
}

/// Routes `addr` (a /32 or /128) through link `index`.
pub async fn add_host_route(h: &Handle, index: u32, addr: IpAddr, name: &str) -> Result<(), NetError> {
    let msg = match addr {
        IpAddr::V4(a) => {
            RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(a, 32).output_interface(index).build()
        }
        IpAddr::V6(a) => {
            RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(a, 128).output_interface(index).build()
        }
    };
    h.route().add(msg).replace().execute().await.map_err(kernel(format!("routing {addr} via {name}")))
}

/// Names of the links that have an IPv6 route learned from router
/// advertisements (`proto ra`), sorted.
pub async fn ra_route_links(h: &Handle) -> Result<Vec<String>, NetError> {
    let mut s = h.route().get(RouteMessageBuilder::<Ipv6Addr>::new().build()).execute();
    let mut indexes = std::collections::BTreeSet::new();
    while let Some(m) = s.try_next().await.map_err(kernel("listing IPv6 routes".into()))? {
        if m.header.protocol != RouteProtocol::Ra {
            continue;
        }
        for a in &m.attributes {
            match a {
                RouteAttribute::Oif(i) => {
                    indexes.insert(*i);
                }
                RouteAttribute::MultiPath(hops) => indexes.extend(hops.iter().map(|n| n.interface_index)),
                _ => {}
            }
        }
    }
    let mut names: Vec<String> =
        list(h).await?.into_iter().filter(|l| indexes.contains(&l.index)).map(|l| l.name).collect();
    names.sort();
    Ok(names)
}

/// Reads a sysctl under `/proc/sys/net/` (`None` if it cannot be read).
pub fn sysctl_get(path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/net/{path}")).ok().map(|v| v.trim().to_owned())
}

/// Writes a sysctl under `/proc/sys/net/`.
pub fn sysctl(path: &str, value: &str) -> Result<(), NetError> {
    let full = format!("/proc/sys/net/{path}");
    std::fs::write(&full, value).map_err(|e| NetError::Kernel(format!("writing {value} to {full}"), e))
}

// TAP creation. <linux/if_tun.h>; the `libc` crate does not export these.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Makes `name` a persistent TAP (the hypervisor opens it by name later),
/// owned by `owner` (uid, gid), by root when not given. A TAP without an
/// owner can be attached by anyone who can open `/dev/net/tun` (0666 on
/// most distributions): a local user could then send and receive as a
/// stopped VM, or as the gateway. Owned, only that uid/gid or a holder of
/// `CAP_NET_ADMIN` can. Hand-written because no crate
/// makes a *persistent* TAP without also keeping its queue open.
#[allow(unsafe_code)]
pub fn create_tap(name: &str, owner: Option<(u32, u32)>) -> Result<(), NetError> {
    use std::os::fd::AsRawFd as _;
    let err = |what: &str, e: std::io::Error| NetError::Kernel(format!("{what} TAP {name}"), e);
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetError::kernel(format!("TAP name {name:?}"), "must be 1-15 bytes"));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| err("opening /dev/net/tun for", e))?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = tun.as_raw_fd();
    // SAFETY: `fd` is an open /dev/net/tun; `req` is a properly sized and
    // initialised `struct ifreq` that lives across the call.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(err("creating", std::io::Error::last_os_error()));
    }
    let (uid, gid) = owner.unwrap_or((0, 0));
    // SAFETY: TUNSETOWNER/TUNSETGROUP take an integer argument by value.
    if unsafe { libc::ioctl(fd, TUNSETOWNER, libc::c_ulong::from(uid)) } < 0
        || unsafe { libc::ioctl(fd, TUNSETGROUP, libc::c_ulong::from(gid)) } < 0
    {
        return Err(err("setting the owner of", std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(fd, TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(err("persisting", std::io::Error::last_os_error()));
    }
    Ok(())
}
