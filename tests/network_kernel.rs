//! The kernel datapath (`network::Datapath`) against the real kernel and
//! the real `nft`, each test in a network namespace of its own (the test
//! thread unshares one; `nft` children inherit it), so nothing touches the
//! host's: TAPs with alias and routes, the table and its elements, a
//! rebuild that removes strays and makes what is missing, a rule count
//! that does not grow with NICs, links that are not metald's left alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use support::{in_netns, ip};

use metald::model::net::Proto;
use metald::network::{Datapath, NetError, NetSettings, NicLimits, NicWiring, PortWiring};

fn nft_list() -> String {
    let out = Command::new("nft").args(["list", "table", "inet", "metald"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every set's and map's elements, sorted (the kernel's listing order is
/// its hash order).
fn elements() -> std::collections::BTreeMap<String, Vec<String>> {
    let out = Command::new("nft").args(["-j", "list", "table", "inet", "metald"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut sets = std::collections::BTreeMap::new();
    for o in v["nftables"].as_array().unwrap() {
        if let Some(set) = o.get("set").or_else(|| o.get("map")) {
            let mut elems: Vec<String> =
                set["elem"].as_array().map(|a| a.iter().map(ToString::to_string).collect()).unwrap_or_default();
            elems.sort();
            sets.insert(set["name"].as_str().unwrap().to_owned(), elems);
        }
    }
    sets
}

fn nic(i: u8, tag: u32) -> NicWiring {
    NicWiring {
        tap: format!("mt-000000{i:02x}"),
        alias: format!("metald:vm-{i}:eth0"),
        guest_mac: [2, 0, 0, 0, 0, i],
        ipv4: Some(std::net::Ipv4Addr::new(10, 200, 0, i)),
        ipv6: Some(format!("fd00:6d65:7461:6c64::{i:x}").parse().unwrap()),
        inner: Default::default(),
        tag,
        ports: vec![PortWiring { proto: Proto::Tcp, host_port: 20000 + u16::from(i), guest_port: 80 }],
        owner: None,
        limits: NicLimits::default(),
    }
}

fn nft_installed() -> bool {
    Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn nics_are_wired_removed_and_rebuilt_from_a_list() {
    assert!(nft_installed(), "nft is missing: scripts/install-deps.sh installs nftables");
    in_netns(|| async {
        ip(&["tuntap", "add", "dev", "other0", "mode", "tap"]);
        let dp = Datapath::start(NetSettings::default()).await.unwrap();
        // Idempotent start.
        let dp2 = Datapath::start(NetSettings::default()).await.unwrap();
        drop(dp2);
        let gw = ip(&["-o", "addr", "show", "dev", "metald0"]);
        assert!(gw.contains("10.200.0.1/32") && gw.contains("fd00:6d65:7461:6c64::1/128"), "{gw}");
        // Start-up derives the table from the store: here, no NICs.
        dp.rebuild(&[]).await.unwrap();
        let empty_rules = dp.rule_count().await.unwrap();
        assert!(empty_rules > 10, "{empty_rules}");

        let (a, b, c) = (nic(2, 1), nic(3, 1), nic(4, 2));
        for n in [&a, &b, &c] {
            dp.add(n).await.unwrap();
        }
        dp.add(&a).await.unwrap(); // idempotent
        let link = ip(&["-d", "link", "show", "dev", &a.tap]);
        assert!(link.contains("tun") && link.contains("alias metald:vm-2:eth0"), "{link}");
        let routes = ip(&["route", "show", "dev", &a.tap]);
        assert!(routes.contains("10.200.0.2"), "{routes}");
        let routes6 = ip(&["-6", "route", "show", "dev", &a.tap]);
        assert!(routes6.contains("fd00:6d65:7461:6c64::2"), "{routes6}");
        let table = nft_list();
        for needle in [
            "\"mt-00000002\" . 02:00:00:00:00:02 . 10.200.0.2",
            "\"mt-00000004\" : 0x00000002",
            "tcp . 20003 : 10.200.0.3 . 80",
        ] {
            assert!(table.contains(needle), "{needle} not in\n{table}");
        }
        assert_eq!(dp.rule_count().await.unwrap(), empty_rules, "rules do not grow with NICs");
        let mut many = Vec::new();
        for i in 10..110u8 {
            many.push(nic(i, u32::from(i)));
        }
        for n in &many {
            dp.add(n).await.unwrap();
        }
        assert_eq!(dp.rule_count().await.unwrap(), empty_rules, "nor with 100 more");
        for n in &many {
            dp.remove(n).await.unwrap();
        }
        // Removals go in batches off the caller's path: elements in one
        // transaction, TAPs in one link-group deletion.
        dp.reaped().await;
        let links = ip(&["-o", "link", "show"]);
        assert_eq!(links.matches(" mt-").count(), 3, "only a, b, c are left:\n{links}");
        assert_eq!(elements()["vm_taps"].len(), 3);
        assert_eq!(links.matches(" group default ").count(), links.lines().count(), "links in other groups:\n{links}");

        // Remove twice: fine.
        dp.remove(&c).await.unwrap();
        dp.remove(&c).await.unwrap();
        dp.reaped().await;
        assert!(!ip(&["link", "show"]).contains(&c.tap));
        assert!(!nft_list().contains("mt-00000004"));

        // A removed NIC's host port, address and MAC leased to a new NIC
        // right away: the add deletes the stale elements in its own
        // transaction (a map element of the same key with other data would
        // otherwise refuse the add), whether or not the batch ran yet.
        for round in 0..5u8 {
            let old = nic(200, 7);
            dp.add(&old).await.unwrap();
            dp.remove(&old).await.unwrap();
            let mut new = nic(201, 8);
            new.ipv4 = old.ipv4;
            new.guest_mac = old.guest_mac;
            new.ports[0].host_port = old.ports[0].host_port;
            new.ports[0].guest_port = 8080;
            dp.add(&new).await.unwrap();
            let table = nft_list();
            assert!(table.contains("tcp . 20200 : 10.200.0.200 . 8080"), "round {round}:\n{table}");
            assert!(!table.contains("mt-000000c8") && !table.contains("tcp . 20200 : 10.200.0.200 . 80,"), "{table}");
            dp.remove(&new).await.unwrap();
            dp.reaped().await;
            assert!(!nft_list().contains("mt-000000c9"));
            assert!(!ip(&["link", "show"]).contains("mt-000000c"));
        }

        // What add() and remove() left: a's and b's elements.
        let added = elements();
        assert_eq!(added["vm_taps"].len(), 2, "{added:?}");
        // Every set and map of the table (the four clone maps empty here).
        assert_eq!(added.len(), 12, "{added:?}");
        // A stray element, a stray TAP of ours (alias) and a missing one:
        // rebuild fixes all three.
        Command::new("nft").args(["add", "element", "inet", "metald", "vm_taps", "{ \"mt-stale\" }"]).status().unwrap();
        assert_ne!(elements(), added);
        ip(&["tuntap", "add", "dev", "mt-stray", "mode", "tap"]);
        ip(&["link", "set", "mt-stray", "alias", "metald:gone:eth0"]);
        ip(&["link", "del", &b.tap]);
        let report = dp.rebuild(&[a.clone(), b.clone()]).await.unwrap();
        assert_eq!((report.taps_removed, report.taps_created), (1, 1), "{report:?}");
        assert_eq!(elements(), added, "the rebuilt table holds what add() made");
        let links = ip(&["link", "show"]);
        assert!(!links.contains("mt-stray") && links.contains(&b.tap) && links.contains("other0"), "{links}");
        let mut taps = dp.taps().await.unwrap();
        taps.sort();
        assert_eq!(taps, vec![a.tap.clone(), b.tap.clone()]);
        let table = nft_list();
        assert!(table.contains("mt-00000003") && !table.contains("mt-00000004"), "{table}");
        assert_eq!(dp.rule_count().await.unwrap(), empty_rules);
        // Counters of our TAPs are there (zero traffic yet).
        assert!(dp.counters().contains_key(&a.tap));
    });
}

/// The root qdiscs of `dev` (`tc -j`): kind and options.
fn root_qdiscs(dev: &str) -> Vec<serde_json::Value> {
    let out = Command::new("tc").args(["-j", "qdisc", "show", "dev", dev, "root"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The table's `limit` objects: name → (rate, burst) as `nft -j` shows them.
fn limit_objects() -> std::collections::BTreeMap<String, serde_json::Value> {
    let out = Command::new("nft").args(["-j", "list", "table", "inet", "metald"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("limit"))
        .map(|l| (l["name"].as_str().unwrap().to_owned(), l.clone()))
        .collect()
}

#[test]
fn rate_limited_nics_get_a_qdisc_and_a_limit_object_removed_and_rebuilt_with_them() {
    use metald::model::RateLimit;
    in_netns(|| async {
        let dp = Datapath::start(NetSettings::default()).await.unwrap();
        dp.rebuild(&[]).await.unwrap();
        let rules = dp.rule_count().await.unwrap();
        let rl = RateLimit { bandwidth: 65536, refill_time_ms: 100, burst: 0 };
        let both = NicWiring { limits: NicLimits::from_spec(Some(&rl), Some(&rl)), ..nic(2, 1) };
        let rx_only = NicWiring { limits: NicLimits::from_spec(Some(&rl), None), ..nic(3, 1) };
        let free = nic(4, 1);
        for n in [&both, &rx_only, &free, &both] {
            dp.add(n).await.unwrap();
        }
        assert_eq!(dp.rule_count().await.unwrap(), rules, "limits add no rule");
        // rx: a tbf at the limit's rate on the TAP (the guest's receive).
        let check_tbf = |dev: &str| {
            let q = root_qdiscs(dev);
            assert_eq!(q.len(), 1, "{q:?}");
            assert_eq!(q[0]["kind"], "tbf", "{q:?}");
            assert_eq!(q[0]["options"]["rate"], 65536, "bytes/s: {q:?}");
        };
        check_tbf(&both.tap);
        check_tbf(&rx_only.tap);
        assert_ne!(root_qdiscs(&free.tap).first().map(|q| q["kind"].clone()), Some("tbf".into()));
        // tx: one limit object and one map element, for `both` only.
        let objects = limit_objects();
        assert_eq!(objects.keys().cloned().collect::<Vec<_>>(), vec![format!("tx_{}", both.tap)], "{objects:?}");
        let o = &objects[&format!("tx_{}", both.tap)];
        assert_eq!(
            (o["rate"].as_u64(), o["rate_unit"].as_str(), o["inv"].as_bool()),
            (Some(64), Some("kbytes"), Some(true))
        );
        let map = elements()["tx_limits"].clone();
        assert_eq!(map, vec![format!("[\"{}\",\"tx_{}\"]", both.tap, both.tap)], "{map:?}");

        // Rebuild: the same objects, elements and qdiscs, none twice, also
        // for a TAP a crash left without its qdisc.
        let before = elements();
        ip(&["link", "del", &rx_only.tap]);
        dp.rebuild(&[both.clone(), rx_only.clone(), free.clone()]).await.unwrap();
        dp.rebuild(&[both.clone(), rx_only.clone(), free.clone()]).await.unwrap();
        assert_eq!(elements(), before);
        assert_eq!(limit_objects().len(), 1);
        check_tbf(&both.tap);
        check_tbf(&rx_only.tap);
        assert_eq!(dp.rule_count().await.unwrap(), rules);

        // Removal: element then object (twice is fine); the qdisc goes with the TAP.
        // (In a batch, off the caller's path.)
        dp.remove(&both).await.unwrap();
        dp.remove(&both).await.unwrap();
        dp.reaped().await;
        assert!(limit_objects().is_empty(), "{:?}", limit_objects());
        assert!(elements()["tx_limits"].is_empty());
        assert!(!ip(&["link", "show"]).contains(&both.tap));

        // A rebuild without a NIC takes its object and element away too.
        dp.add(&both).await.unwrap();
        assert_eq!(limit_objects().len(), 1);
        dp.rebuild(&[rx_only.clone(), free.clone()]).await.unwrap();
        assert!(limit_objects().is_empty() && elements()["tx_limits"].is_empty());
        assert!(!ip(&["link", "show"]).contains(&both.tap));
        check_tbf(&rx_only.tap);
    });
}

#[test]
fn without_nft_or_tc_networking_is_unavailable_and_says_what_to_do() {
    in_netns(|| async {
        let s = NetSettings { nft: "/nonexistent/nft".into(), ..NetSettings::default() };
        match Datapath::start(s).await {
            Err(NetError::Unavailable { why, fix }) => {
                assert!(why.contains("/nonexistent/nft"), "{why}");
                assert!(fix.contains("apt-get install nftables"), "{fix}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("started without nft"),
        }
        let s = NetSettings { tc: "/nonexistent/tc".into(), ..NetSettings::default() };
        match Datapath::start(s).await {
            Err(NetError::Unavailable { why, fix }) => {
                assert!(why.contains("/nonexistent/tc"), "{why}");
                assert!(fix.contains("apt-get install iproute2"), "{fix}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("started without tc"),
        }
    });
}

#[test]
fn ipv6_forwarding_is_not_turned_on_over_router_advertised_routes() {
    in_netns(|| async {
        // up0's IPv6 routes came from router advertisements (accept_ra=1,
        // the default): forwarding on would let them expire.
        ip(&["tuntap", "add", "dev", "up0", "mode", "tap"]);
        ip(&["link", "set", "up0", "up"]);
        ip(&["-6", "route", "add", "2001:db8::/64", "dev", "up0", "proto", "ra"]);
        let forwarding = || std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap();
        match Datapath::start(NetSettings::default()).await {
            Err(NetError::Unavailable { why, fix }) => {
                assert!(why.contains("up0") && why.contains("router advertisements"), "{why}");
                assert!(fix.contains("net.ipv6.conf.up0.accept_ra=2"), "{fix}");
                assert!(fix.contains("UNKEY_METALD_NETWORK_IPV6_POOL=off"), "{fix}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("started over router-advertised routes"),
        }
        // Refusing changed nothing.
        assert_eq!(forwarding().trim(), "0");
        assert!(!Command::new("ip").args(["link", "show", "metald0"]).output().unwrap().status.success());
        // Without an IPv6 pool there is nothing to forward.
        let v4 = NetSettings { ipv6_pool: None, ..NetSettings::default() };
        Datapath::start(v4).await.unwrap();
        assert_eq!(forwarding().trim(), "0");
        // The fix the error names works.
        std::fs::write("/proc/sys/net/ipv6/conf/up0/accept_ra", "2").unwrap();
        Datapath::start(NetSettings::default()).await.unwrap();
        assert_eq!(forwarding().trim(), "1");
        assert!(ip(&["-6", "route", "show", "dev", "up0"]).contains("2001:db8::/64 proto ra"));
    });
}

/// Drops this thread's (only this thread's: the raw syscall, not libc's
/// process-wide wrapper) root identity and with it every capability.
#[allow(unsafe_code)]
fn become_nobody_on_this_thread() {
    // SAFETY: setresgid and setresuid take three integers; the raw
    // syscalls change the calling thread's credentials only.
    let r = unsafe { libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534) };
    assert_eq!(r, 0, "setresgid: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let r = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
    assert_eq!(r, 0, "setresuid: {}", std::io::Error::last_os_error());
}

/// Attaches to the existing TAP `name` through the TUN device node `node`
/// as Firecracker does (`TUNSETIFF`); the queue closes again on return.
#[allow(unsafe_code)]
fn attach(node: &std::path::Path, name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const FLAGS: libc::c_short = 0x0002 | 0x1000 | 0x4000; // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    let tun = std::fs::OpenOptions::new().read(true).write(true).open(node)?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: FLAGS, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `tun` is an open TUN device; `req` is a properly sized and
    // initialised `struct ifreq` that lives across the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A jailed Firecracker runs as the jailer's uid/gid without
/// `CAP_NET_ADMIN` and opens its TAP through the `/dev/net/tun` node the
/// jailer made in its chroot: metald makes the TAP owned by that uid/gid
/// (`NicWiring::owner`, from `UNKEY_METALD_JAILER_UID`/`GID`), and only
/// such a TAP can be opened that way.
#[test]
fn a_tap_with_an_owner_is_opened_by_that_owner_without_privileges() {
    in_netns(|| async {
        let dp = Datapath::start(NetSettings::default()).await.unwrap();
        dp.rebuild(&[]).await.unwrap();
        let mut jailed = nic(2, 1);
        jailed.owner = Some((65534, 65534));
        let plain = nic(3, 1);
        dp.add(&jailed).await.unwrap();
        dp.add(&plain).await.unwrap();
        let details = ip(&["-d", "link", "show", "dev", &jailed.tap]);
        assert!(details.contains("user nobody") || details.contains("user 65534"), "{details}");
        // The jailer's device node: /dev/net/tun's numbers, owned by the
        // jailed uid.
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let node = dir.path().join("tun");
        let ok = Command::new("mknod").arg(&node).args(["c", "10", "200"]).status().unwrap();
        assert!(ok.success());
        std::os::unix::fs::chown(&node, Some(65534), Some(65534)).unwrap();
        let (a, b) = (jailed.tap.clone(), plain.tap.clone());
        let (owned, other) = std::thread::spawn(move || {
            become_nobody_on_this_thread();
            (attach(&node, &a), attach(&node, &b))
        })
        .join()
        .unwrap();
        owned.unwrap();
        // Every other TAP (and the gateway) is root's: refused.
        assert_eq!(other.unwrap_err().raw_os_error(), Some(libc::EPERM), "another uid's TAP");
        let gw = std::thread::spawn(move || {
            become_nobody_on_this_thread();
            attach(&dir.path().join("tun"), "metald0")
        })
        .join()
        .unwrap();
        assert_eq!(gw.unwrap_err().raw_os_error(), Some(libc::EPERM), "the gateway device");
    });
}

#[test]
fn without_cap_net_admin_networking_is_unavailable_and_says_what_to_do() {
    in_netns(|| async {
        become_nobody_on_this_thread();
        match Datapath::start(NetSettings::default()).await {
            Err(NetError::Unavailable { why, fix }) => {
                // Opening /dev/net/tun (mode 0660 or 0600 here) or TUNSETIFF.
                assert!(why.contains("TAP metald0"), "{why}");
                assert!(why.contains("Permission denied") || why.contains("Operation not permitted"), "{why}");
                assert!(fix.contains("CAP_NET_ADMIN"), "{fix}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("started without CAP_NET_ADMIN"),
        }
    });
}
