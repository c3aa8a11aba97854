//! Host networking end to end: metald in-process with the QEMU backend
//! (TCG) and host networking on, inside a network namespace this test
//! makes (its thread unshares one; metald's threads and QEMU inherit it),
//! with a second namespace behind a veth playing "the internet". No packet
//! leaves this machine.
//!
//! Three real guests of two customers. The guest image's probes
//! (`metald.ping=`, `metald.tcp=`) print what a guest can reach on its
//! console: its customer's other VM (v4 and v6) yes, the other customer's
//! VM no, the internet through NAT (the server sees the host's uplink
//! address), metald's API port on the gateway no. From the host, a port
//! mapping reaches the guest's HTTP server on 127.0.0.1 and on the uplink
//! address; after a metald restart it still does; after delete the TAP,
//! the mapping and the table elements are gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::ip;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use metald::client::{VmClient, WireProtocol, vm_client};
use metald::daemon::{Config, Daemon};
use metald::pb::vmprovisioner::v1 as pb;
use support::{console_text, guest_image, metald_env, wait_until};

const BOOT: Duration = Duration::from_secs(120);

fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// ICMP echo requests "the internet" (thread `tid`'s namespace) received.
fn in_echos(tid: i32) -> u64 {
    let snmp = std::fs::read_to_string(format!("/proc/{tid}/net/snmp")).unwrap();
    let rows: Vec<Vec<&str>> =
        snmp.lines().filter(|l| l.starts_with("Icmp:")).map(|l| l.split_whitespace().collect()).collect();
    let col = rows[0].iter().position(|h| *h == "InEchos").unwrap();
    rows[1][col].parse().unwrap()
}

/// "The internet": a thread in a namespace of its own with `inet0`
/// (10.99.0.2/24) and a TCP server on :8080 that answers `hello <peer>`.
fn start_internet() -> i32 {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tx.send(gettid()).unwrap();
        // Wait until the peer end was moved in here.
        ready_rx.recv().unwrap();
        ip(&["link", "set", "lo", "up"]);
        ip(&["addr", "add", "10.99.0.2/24", "dev", "inet0"]);
        ip(&["link", "set", "inet0", "up"]);
        let l = TcpListener::bind("10.99.0.2:8080").unwrap();
        for s in l.incoming().flatten() {
            let peer = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let mut s = s;
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            let _ = writeln!(s, "hello {peer}");
        }
    });
    let tid = rx.recv().unwrap();
    ip(&["link", "add", "up0", "type", "veth", "peer", "name", "inet0"]);
    ip(&["link", "set", "inet0", "netns", &tid.to_string()]);
    ready_tx.send(()).unwrap();
    ip(&["addr", "add", "10.99.0.1/24", "dev", "up0"]);
    ip(&["link", "set", "up0", "up"]);
    ip(&["route", "add", "default", "via", "10.99.0.2"]);
    tid
}

/// An HTTP GET of `/` at `addr`; the body's first line.
fn http_get(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut lines = BufReader::new(s).lines().map_while(Result::ok);
    // Skip the status line and headers.
    for l in lines.by_ref() {
        if l.trim().is_empty() {
            break;
        }
    }
    lines.next()
}

fn nft_list() -> String {
    let out = Command::new("nft").args(["list", "table", "inet", "metald"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Net {
    v4: String,
    v6: String,
    tap: String,
    ports: Vec<(i32, i32)>,
}

async fn create(c: &VmClient, id: &str, args: &str, ports: &[(i32, i32)]) -> Net {
    let nic = pb::NetworkInterface {
        port_mappings: ports
            .iter()
            .map(|&(h, g)| pb::PortMapping { host_port: h, guest_port: g, ..Default::default() })
            .collect(),
        ..Default::default()
    };
    let config = pb::VmConfig {
        cpu: pb::CpuConfig { vcpu_count: 1, ..Default::default() }.into(),
        memory: pb::MemoryConfig { size_bytes: 128 << 20, ..Default::default() }.into(),
        boot: pb::BootConfig {
            kernel_path: guest_image().join("vmlinux").display().to_string(),
            initrd_path: guest_image().join("initramfs.cpio.gz").display().to_string(),
            kernel_args: args.into(),
            ..Default::default()
        }
        .into(),
        network: vec![nic],
        ..Default::default()
    };
    c.create_vm(pb::CreateVmRequest { vm_id: id.into(), config: config.into(), ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("create {id}: {e:?}"));
    let info =
        c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap().into_owned();
    let n = info.network_info.as_option().expect("network_info").clone();
    assert_eq!(n.ipv4_prefix_length, 16);
    assert_eq!(n.gateway, "10.200.0.1");
    assert_eq!(n.ipv6_gateway, "fe80::1");
    Net {
        v4: n.ip_address.clone(),
        v6: n.ipv6_address.clone(),
        tap: n.tap_device.clone(),
        ports: n.port_mappings.iter().map(|p| (p.host_port, p.guest_port)).collect(),
    }
}

async fn boot(c: &VmClient, id: &str) -> PathBuf {
    c.boot_vm(pb::BootVmRequest { vm_id: id.into(), ..Default::default() }).await.unwrap();
    let info =
        c.get_vm_info(pb::GetVmInfoRequest { vm_id: id.into(), ..Default::default() }).await.unwrap().into_owned();
    PathBuf::from(&info.backend_info["console_log"])
}

async fn wait_console(path: &std::path::Path, what: &str, pred: impl Fn(&str) -> bool) {
    wait_until(&format!("{what} (console {})", path.display()), BOOT, || {
        let ok = pred(&console_text(path));
        async move { ok }
    })
    .await;
}

#[test]
fn guests_get_addresses_isolation_egress_nat_and_port_mappings() {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run());
    })
    .join()
    .unwrap();
}

async fn run() {
    ip(&["link", "set", "lo", "up"]);
    let internet = start_internet();
    let tmp = tempfile::Builder::new().prefix("metald-net-").tempdir().unwrap();
    // Billing to the in-process development service (in this namespace).
    let db = tmp.path().join("billing.db");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let billing_addr = listener.local_addr().unwrap();
    let billing_stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let (db, stop) = (db.clone(), billing_stop.clone());
        async move { metald::billing::devserver::serve(listener, &db, stop).await }
    });
    let env = metald_env([
        ("BACKEND", "qemu".to_owned()),
        ("QEMU_ACCEL", "tcg".to_owned()),
        ("AUTH_DEV_TOKENS", "true".to_owned()),
        // Every address of this namespace: the guests must still not reach it.
        ("ADDRESS", "0.0.0.0".to_owned()),
        ("PORT", "0".to_owned()),
        ("DATA_DIR", tmp.path().join("data").display().to_string()),
        ("ASSET_DIRS", guest_image().display().to_string()),
        ("SHUTDOWN_GRACE_SECONDS", "5".to_owned()),
        ("NETWORK_ENABLED", "true".to_owned()),
        ("BILLING_ENDPOINT", format!("http://{billing_addr}")),
        ("BILLING_BATCH_SIZE", "20".to_owned()),
        ("BILLING_FLUSH_MS", "500".to_owned()),
        ("BILLING_COMMIT_MS", "100".to_owned()),
    ]);
    let _kill = support::KillOnDrop(tmp.path().to_path_buf());
    let mut daemon: Option<Daemon> = Some(metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap());
    let port = daemon.as_ref().unwrap().addr.port();
    let client = |token: &str| {
        vm_client(&format!("http://127.0.0.1:{port}"), token, WireProtocol::ConnectProto, Duration::from_secs(120))
            .unwrap()
    };
    let (acme, other) = (client("dev_customer_acme"), client("dev_customer_other"));

    // b1 also pings the internet from an address it was not given (no echo
    // request may arrive there); b2 takes another MAC.
    let b1 =
        create(&other, "b1", "console=ttyS0 quiet metald.ping=10.200.0.1 metald.spoof=10.200.0.250@10.99.0.2", &[])
            .await;
    let b2 =
        create(&other, "b2", "console=ttyS0 quiet metald.spoofmac=02:00:00:00:00:99 metald.ping=10.200.0.1", &[]).await;
    assert_ne!(b2.v4, b1.v4);
    let a2 = create(&acme, "a2", "console=ttyS0 quiet metald.httpd=80", &[]).await;
    let probes = format!(
        "console=ttyS0 quiet metald.httpd=80 metald.ping={},{},{},{} metald.tcp=10.99.0.2:8080,10.200.0.1:{port},{}:80",
        a2.v4, b1.v4, a2.v6, b1.v6, b1.v4
    );
    let a1 = create(&acme, "a1", &probes, &[(0, 80)]).await;
    assert_ne!(a1.v4, a2.v4);
    let host_port = u16::try_from(a1.ports[0].0).unwrap();
    assert_eq!(a1.ports[0].1, 80);
    assert!(nft_list().contains(&a1.tap));

    let (cb1, ca2, cb2) = (boot(&other, "b1").await, boot(&acme, "a2").await, boot(&other, "b2").await);
    wait_console(&cb1, "b1 to be up", |t| t.contains("METALD_NET_UP")).await;
    wait_console(&ca2, "a2 to be up", |t| t.contains("METALD_NET_UP") && t.contains("METALD_GUEST_READY")).await;
    let ca1 = boot(&acme, "a1").await;
    wait_console(&ca1, "a1 to be up", |t| t.contains(&format!("METALD_NET_UP eth0 {}/16", a1.v4))).await;

    // Same customer: reachable, both families.
    wait_console(&ca1, "a1 to reach a2", |t| t.contains(&format!("METALD_PING {} ok", a2.v4))).await;
    wait_console(&ca1, "a1 to reach a2 over IPv6", |t| t.contains(&format!("METALD_PING {} ok", a2.v6))).await;
    // The internet, through NAT: the server sees the host's uplink address.
    wait_console(&ca1, "a1 to reach the internet", |t| t.contains("METALD_TCP 10.99.0.2:8080 ok hello 10.99.0.1"))
        .await;
    // Other customer, metald's API on the gateway: never, after several tries.
    let api = format!("METALD_TCP 10.200.0.1:{port}");
    wait_console(&ca1, "a1's probes of b1 and the API to fail a few times", |t| {
        t.matches(&format!("METALD_PING {} fail", b1.v4)).count() >= 3
            && t.matches(&format!("METALD_PING {} fail", b1.v6)).count() >= 3
            && t.matches(&format!("{api} fail")).count() >= 3
    })
    .await;
    let text = console_text(&ca1);
    assert!(!text.contains(&format!("METALD_PING {} ok", b1.v4)), "a1 reached another customer's VM:\n{text}");
    assert!(!text.contains(&format!("METALD_PING {} ok", b1.v6)), "a1 reached another customer's VM (v6):\n{text}");
    assert!(!text.contains(&format!("METALD_TCP {}:80 ok", b1.v4)), "a1 reached another customer's VM:\n{text}");
    assert!(!text.contains(&format!("{api} ok")), "a guest reached metald's API:\n{text}");
    // ...which the host itself does reach on that address.
    assert!(TcpStream::connect_timeout(&format!("10.200.0.1:{port}").parse().unwrap(), Duration::from_secs(2)).is_ok());

    // Anti-spoofing: from its own address and MAC a guest reaches the
    // gateway and the internet; from an address or a MAC it was not given,
    // nothing.
    // (a1 reached the internet above, so egress works; no VM pings it
    // from its own address.)
    wait_console(&cb1, "b1 to ping the gateway", |t| t.contains("METALD_PING 10.200.0.1 ok")).await;
    wait_console(&cb1, "b1 to send spoofed echo requests", |t| t.contains("METALD_SPOOF_SENT 5")).await;
    assert_eq!(in_echos(internet), 0, "echo requests from a spoofed source reached the internet");
    wait_console(&cb2, "b2 (another MAC) to fail to ping the gateway", |t| {
        t.contains("METALD_SPOOFMAC") && t.matches("METALD_PING 10.200.0.1 fail").count() >= 3
    })
    .await;
    assert!(!console_text(&cb2).contains("METALD_PING 10.200.0.1 ok"), "{}", console_text(&cb2));

    // The port mapping, from the host: loopback and the uplink address.
    for addr in [format!("127.0.0.1:{host_port}"), format!("10.99.0.1:{host_port}")] {
        let body = http_get(addr.parse().unwrap());
        assert_eq!(body.as_deref(), Some("metald-guest"), "GET http://{addr}/");
    }

    // GetVmInfo counts a1's traffic from its TAP (the guest's side).
    let info =
        acme.get_vm_info(pb::GetVmInfoRequest { vm_id: "a1".into(), ..Default::default() }).await.unwrap().into_owned();
    let s = info.metrics.as_option().expect("metrics").network_stats.as_option().expect("network_stats").clone();
    assert!(s.bytes_received > 0 && s.bytes_transmitted > 0 && s.packets_transmitted > 0, "{s:?}");
    // ...and so do its billing samples (QEMU counts no traffic itself):
    // within a few flushes the service has samples with the TAP's counters,
    // never more than GetVmInfo read after them.
    let conn = metald::billing::devserver::open_db(&db).unwrap();
    let billed = || -> (i64, i64) {
        conn.query_row(
            "SELECT coalesce(max(net_rx), 0), coalesce(max(net_tx), 0) FROM samples WHERE vm_id = 'a1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    let t0 = std::time::Instant::now();
    while billed().0 == 0 || billed().1 == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no billing sample of a1 with network traffic: {:?}", billed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (rx, tx) = billed();
    let info =
        acme.get_vm_info(pb::GetVmInfoRequest { vm_id: "a1".into(), ..Default::default() }).await.unwrap().into_owned();
    let now = info.metrics.as_option().unwrap().network_stats.as_option().unwrap().clone();
    assert!(rx <= now.bytes_received && tx <= now.bytes_transmitted, "billed ({rx}, {tx}) vs {now:?}");

    // A restart rebuilds the table from the store; the guest still answers.
    let rules_before = nft_list().lines().count();
    let d = daemon.take().unwrap();
    d.shutdown();
    d.wait().await.unwrap();
    daemon = Some(metald::daemon::start(Config::from_source(&env).unwrap()).await.unwrap());
    let port2 = daemon.as_ref().unwrap().addr.port();
    assert_eq!(nft_list().lines().count(), rules_before, "the same table after the rebuild");
    assert_eq!(http_get(format!("127.0.0.1:{host_port}").parse().unwrap()).as_deref(), Some("metald-guest"));

    // Delete: the TAP, the mapping and the elements go.
    let acme = vm_client(
        &format!("http://127.0.0.1:{port2}"),
        "dev_customer_acme",
        WireProtocol::ConnectProto,
        Duration::from_secs(120),
    )
    .unwrap();
    acme.delete_vm(pb::DeleteVmRequest { vm_id: "a1".into(), force: true, ..Default::default() }).await.unwrap();
    // The elements and the TAP go right after the call, in a batch.
    wait_until(&format!("TAP {} to be deleted", a1.tap), Duration::from_secs(10), || {
        let links = Command::new("ip").args(["link", "show"]).output().unwrap();
        let gone = !String::from_utf8_lossy(&links.stdout).contains(&a1.tap);
        async move { gone }
    })
    .await;
    let table = nft_list();
    assert!(!table.contains(&a1.tap) && !table.contains(&format!(": {} . 80", a1.v4)), "{table}");
    assert!(http_get(format!("127.0.0.1:{host_port}").parse().unwrap()).is_none(), "the mapping outlived its VM");
    daemon.take().unwrap().shutdown();
    billing_stop.cancel();
}
