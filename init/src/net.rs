//! Applies a [`NetPlan`] in the guest, before the switch into the workload's root: `lo` up, each
//! NIC found (by MAC or name, waiting for virtio-net to register it), up, its addresses and
//! default routes — the same steps, markers (`METALD_NET_UP <if> <ipv4|-> <ipv6|->`,
//! `METALD_GUEST_ERROR ...`) and tolerance as the busybox guest init.
//!
//! The work is done by busybox `ip` from the initramfs rather than netlink from Rust: the
//! initramfs carries busybox for its default init anyway, the commands are the ones the shell
//! init has been running in every test, and it keeps this binary free of a netlink crate (the
//! maintained ones, `rtnetlink`/`netlink-packet-route`, are async on tokio) or of ~300 lines of
//! hand-built netlink messages. It runs before the initramfs is freed.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmdline::{Link, NetPlan, Nic};
use crate::console::marker;

/// busybox in the initramfs (its `ip` applet is run as `busybox ip`, wherever the link lives).
const BUSYBOX: &str = "/bin/busybox";
/// How long a NIC may take to show up after its driver loaded.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

/// Configures every NIC of `plan`; failures are reported on the console, not fatal (a
/// workload without network still runs, as in the busybox init).
pub fn apply(plan: &NetPlan) {
    let _ = ip(&["link", "set", "lo", "up"]);
    for nic in &plan.nics {
        let Some(ifname) = find(&nic.link) else {
            let have: Vec<String> = interfaces().into_iter().map(|(n, mac)| format!("{n}={mac}")).collect();
            marker(&format!("METALD_GUEST_ERROR no interface {:?} (have: {})", nic.link, have.join(" ")));
            continue;
        };
        match configure(&ifname, nic) {
            Ok(()) => {
                let v4 = nic.v4.map_or("-".to_owned(), |a| format!("{}/{}", a.addr, a.prefix));
                let v6 = nic.v6.map_or("-".to_owned(), |a| format!("{}/{}", a.addr, a.prefix));
                marker(&format!("METALD_NET_UP {ifname} {v4} {v6}"));
            }
            Err(e) => marker(&format!("METALD_GUEST_ERROR network setup of {ifname} failed: {e}")),
        }
    }
}

/// `/etc/resolv.conf` for the plan's nameservers (`None` without any).
pub fn resolv_conf(plan: &NetPlan) -> Option<String> {
    if plan.dns.is_empty() {
        return None;
    }
    Some(plan.dns.iter().map(|a| format!("nameserver {a}\n")).collect())
}

fn configure(ifname: &str, nic: &Nic) -> Result<(), String> {
    // No duplicate address detection: the address is ours (metald leased it) and usable at once.
    let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad"), "0");
    ip(&["link", "set", ifname, "up"])?;
    if let Some(a) = nic.v4 {
        ip(&["addr", "add", &format!("{}/{}", a.addr, a.prefix), "dev", ifname])?;
        if let Some(gw) = a.gateway {
            ip(&["route", "add", "default", "via", &gw.to_string(), "dev", ifname])?;
        }
    }
    if let Some(a) = nic.v6 {
        ip(&["-6", "addr", "add", &format!("{}/{}", a.addr, a.prefix), "dev", ifname])?;
        if let Some(gw) = a.gateway {
            ip(&["-6", "route", "add", "default", "via", &gw.to_string(), "dev", ifname])?;
        }
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new(BUSYBOX).arg("ip").args(args).output().map_err(|e| format!("{BUSYBOX} ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("ip {}: {}", args.join(" "), err.trim()))
    }
}

/// The interface `link` names, waiting up to [`LINK_TIMEOUT`] for it to appear.
fn find(link: &Link) -> Option<String> {
    let start = Instant::now();
    loop {
        let found = interfaces().into_iter().find(|(name, mac)| match link {
            Link::Mac(want) => mac == want,
            Link::Name(want) => name == want,
        });
        if let Some((name, _)) = found {
            return Some(name);
        }
        if start.elapsed() > LINK_TIMEOUT {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `(name, mac)` of every interface in `/sys/class/net`.
fn interfaces() -> Vec<(String, String)> {
    let Ok(entries) = fs::read_dir("/sys/class/net") else { return Vec::new() };
    entries
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mac = fs::read_to_string(Path::new("/sys/class/net").join(&name).join("address")).unwrap_or_default();
            (name, mac.trim().to_ascii_lowercase())
        })
        .collect()
}
